//! Real contracts end to end: a tenant's limits per route (`[tenants.routes.NAME]`) on top of
//! its own, and affiliates' aggregate limits (`[[groups]]`), each with its own 429 code.

mod common;

use std::time::Duration;

use bureau_sim::mock_bureau::MockConfig;
use common::*;

const KEY_C: &str = "key-c";

fn score(env: &Env, i: usize) -> String {
    env.url(&format!("/v1/score/S-{i}"))
}

async fn score_as(env: &Env, key: &str, i: usize) -> Resp {
    get(&score(env, i), &[("x-api-key", key)]).await
}

/// Another route of the tenant's (`echo_get`), with no limits of its own.
async fn other_route_as(env: &Env, key: &str) -> Resp {
    get(&env.url("/echo/x"), &[("x-api-key", key)]).await
}

/// Tenant b's lines, then tenant c (key-c), then `groups`.
fn with_c_and(tenant_b: &str, groups: &str) -> String {
    format!("{tenant_b}\n[[tenants]]\nid = \"c\"\napi_key_sha256 = \"{}\"\n{groups}", sha(KEY_C))
}

#[tokio::test]
async fn a_route_rate_refuses_while_the_tenant_rate_has_room() {
    let tenant_a = "rate = 100\nburst = 100\n[tenants.routes.score]\nrate = 0.5\nburst = 2";
    let env = Env::with(fast_mock(), &Extras { tenant_a, ..Extras::default() }).await;
    for remaining in [1, 0] {
        let r = score_as(&env, KEY_A, 1).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["ratelimit-policy"], r#""rate";q=100;w=1, "route.rate";q=2;w=4"#);
        let rl = r.headers["ratelimit"].to_str().unwrap().to_string();
        assert!(rl.contains(&format!(r#""route.rate";r={remaining};t="#)), "{rl}");
    }
    let r = score_as(&env, KEY_A, 1).await;
    assert_eq!(r.status, 429);
    let j = r.json();
    assert_eq!(j["error"], "route_rate_limited");
    assert_eq!(j["tenant"], "a");
    assert!(j["message"].as_str().unwrap().starts_with("route score: over 0.5 requests/s"), "{j}");
    assert_eq!(r.headers["retry-after"], "2");
    // The tenant's other routes, and other tenants on this route, are not held by it.
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200);
    assert_eq!(score_as(&env, KEY_B, 1).await.status, 200);
    // (The mock counts look-ups, not `/echo`.)
    assert_eq!(env.mock.bureau.stats().calls_total, 3, "the refused request never reached the bureau");
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    let series = r#"bureau_guard_limit_rejections_total{mode="enforced",reason="route_rate_limited",tenant="a"}"#;
    assert_eq!(metric_value(&metrics, series), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn the_tenant_rate_refuses_while_the_route_rate_has_room() {
    let tenant_a = "rate = 0.5\nburst = 2\n[tenants.routes.score]\nrate = 100\nburst = 100";
    let env = Env::with(fast_mock(), &Extras { tenant_a, ..Extras::default() }).await;
    assert_eq!(score_as(&env, KEY_A, 1).await.status, 200);
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200, "the tenant's rate counts every route");
    let r = score_as(&env, KEY_A, 1).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "rate_limited");
}

#[tokio::test]
async fn a_refusal_by_the_route_limit_does_not_charge_the_tenant_wide_limits() {
    // The tenant may make 3 bureau calls today and 3 requests in a burst (no refill to speak
    // of); the score route only 1 of each.
    let tenant_a = "rate = 0.0001\nburst = 3\ndaily_quota = 3\n\
                    [tenants.routes.score]\nrate = 0.0001\nburst = 1\ndaily_quota = 5";
    let env = Env::with(fast_mock(), &Extras { tenant_a, ..Extras::default() }).await;
    assert_eq!(score_as(&env, KEY_A, 1).await.status, 200);
    for _ in 0..5 {
        let r = score_as(&env, KEY_A, 2).await;
        assert_eq!(r.json()["error"], "route_rate_limited");
    }
    // Were the refused ones charged to the tenant's bucket, nothing would be left for these.
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200);
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200);
    assert_eq!(other_route_as(&env, KEY_A).await.json()["error"], "rate_limited");
    assert_eq!(env.tenants().await["a"]["usage"]["daily_used"], 3);
}

#[tokio::test]
async fn a_route_quota_refusal_gives_the_tenant_quota_back() {
    let tenant_a = "daily_quota = 3\n[tenants.routes.score]\ndaily_quota = 1";
    let env = Env::with(fast_mock(), &Extras { tenant_a, ..Extras::default() }).await;
    assert_eq!(score_as(&env, KEY_A, 1).await.status, 200);
    for i in 2..6 {
        let r = score_as(&env, KEY_A, i).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"], "route_daily_quota_exhausted");
        let rl = r.headers["ratelimit"].to_str().unwrap().to_string();
        assert!(rl.contains(r#""daily";r=2;"#) && rl.contains(r#""route.daily";r=0;"#), "{rl}");
    }
    // Two of the tenant's three calls are left: the refusals above took none.
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200);
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200);
    assert_eq!(other_route_as(&env, KEY_A).await.json()["error"], "daily_quota_exhausted");
    let tenants = env.tenants().await;
    assert_eq!(tenants["a"]["usage"]["daily_used"], 3);
    assert_eq!(tenants["a"]["routes"]["score"]["usage"]["daily_used"], 1);
    assert_eq!(tenants["a"]["routes"]["score"]["limits"]["daily_quota"], 1);
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    let used = r#"bureau_guard_route_quota_used{route="score",tenant="a",window="daily"}"#;
    assert_eq!(metric_value(&metrics, used), Some(1.0), "{metrics}");
    assert!(tenants["b"].get("routes").is_none(), "b has no route limits");
    // (The mock counts look-ups, not `/echo`.)
    assert_eq!(env.mock.bureau.stats().calls_total, 1);
}

#[tokio::test]
async fn a_tenant_quota_refusal_does_not_charge_the_route_quota() {
    let tenant_a = "daily_quota = 1\n[tenants.routes.score]\ndaily_quota = 5";
    let env = Env::with(fast_mock(), &Extras { tenant_a, ..Extras::default() }).await;
    assert_eq!(other_route_as(&env, KEY_A).await.status, 200);
    for i in 0..3 {
        assert_eq!(score_as(&env, KEY_A, i).await.json()["error"], "daily_quota_exhausted");
    }
    assert_eq!(env.tenants().await["a"]["routes"]["score"]["usage"]["daily_used"], 0);
}

#[tokio::test]
async fn three_affiliates_in_a_group_cannot_exceed_its_rate_together() {
    // Each affiliate alone has room for 10 at once; the group for 6 (and no refill to speak of).
    let groups = "[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"b\", \"c\"]\nweight = 3\nrate = 0.0001\nburst = 6";
    let tenant_b = with_c_and("", groups);
    let env = Env::with(
        fast_mock(),
        &Extras { tenant_a: "rate = 0.0001\nburst = 10", tenant_b: &tenant_b, ..Extras::default() },
    )
    .await;
    let mut ok = 0;
    let mut refused = 0;
    for round in 0..4 {
        for key in [KEY_A, KEY_B, KEY_C] {
            let r = score_as(&env, key, round).await;
            match r.status.as_u16() {
                200 => ok += 1,
                429 => {
                    assert_eq!(r.json()["error"], "group_rate_limited");
                    assert!(r.json()["message"].as_str().unwrap().starts_with("group kb: "));
                    refused += 1;
                }
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert_eq!((ok, refused), (6, 6), "the group's burst, shared by its members");
    assert_eq!(env.mock.bureau.stats().calls_total, 6);
    let tenants = env.tenants().await;
    assert_eq!(tenants["c"]["group"]["id"], "kb");
    assert_eq!(tenants["c"]["group"]["weight"], 3);
    assert_eq!(tenants["c"]["group"]["limits"]["burst"], 6);
    // A tenant outside the group is not held by it (the test config's tenants are all in it, so
    // only the group's refusal code tells; a's own bucket still had room for 4 more).
    assert_eq!(tenants["a"]["limits"]["burst"], 10);
}

#[tokio::test]
async fn a_group_daily_quota_caps_its_members_together_and_leaves_other_tenants_alone() {
    let groups = "[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"c\"]\ndaily_quota = 3";
    let tenant_b = with_c_and("", groups);
    let env = Env::with(fast_mock(), &Extras { tenant_b: &tenant_b, ..Extras::default() }).await;
    for (key, want) in [(KEY_A, 200), (KEY_C, 200), (KEY_A, 200), (KEY_C, 429), (KEY_A, 429)] {
        let r = score_as(&env, key, 1).await;
        assert_eq!(r.status, want);
        if want == 429 {
            assert_eq!(r.json()["error"], "group_daily_quota_exhausted");
            let rl = r.headers["ratelimit"].to_str().unwrap().to_string();
            assert!(rl.contains(r#""group.daily";r=0;"#), "{rl}");
        }
    }
    for i in 0..5 {
        assert_eq!(score_as(&env, KEY_B, i).await.status, 200, "b is in no group");
    }
    let tenants = env.tenants().await;
    assert_eq!(tenants["a"]["group"]["usage"]["daily_used"], 3);
    assert!(tenants["b"].get("group").is_none());
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    assert_eq!(metric_value(&metrics, r#"bureau_guard_group_quota_used{group="kb",window="daily"}"#), Some(3.0));
    assert_eq!(metric_value(&metrics, r#"bureau_guard_group_quota_limit{group="kb",window="daily"}"#), Some(3.0));
}

#[tokio::test]
async fn a_group_in_flight_cap_holds_across_its_members() {
    let slow = MockConfig {
        service_time: Duration::from_millis(400),
        jitter: Duration::ZERO,
        workers: 16,
        ..MockConfig::default()
    };
    let groups = "[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"b\"]\nmax_in_flight = 2";
    let env = Env::with(slow, &Extras { tenant_b: groups, ..Extras::default() }).await;
    let mut held = Vec::new();
    for (i, key) in [KEY_A, KEY_B].into_iter().enumerate() {
        let url = score(&env, i);
        held.push(tokio::spawn(async move { get(&url, &[("x-api-key", key)]).await.status }));
    }
    let bureau = env.mock.bureau.clone();
    wait_until("2 requests at the bureau", || bureau.stats().in_flight == 2).await;
    let r = score_as(&env, KEY_A, 9).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "group_too_many_in_flight");
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    let tenants = env.tenants().await;
    assert_eq!(tenants["a"]["group"]["usage"]["in_flight"], 0, "every guard released");
    assert_eq!(tenants["a"]["usage"]["in_flight"], 0);
    assert_eq!(score_as(&env, KEY_A, 11).await.status, 200);
}

#[tokio::test]
async fn an_admin_reset_starts_the_tenants_route_counts_over_too() {
    let tenant_a = "daily_quota = 10\n[tenants.routes.score]\ndaily_quota = 1";
    let env = Env::with(fast_mock(), &Extras { tenant_a, ..Extras::default() }).await;
    assert_eq!(score_as(&env, KEY_A, 1).await.status, 200);
    assert_eq!(score_as(&env, KEY_A, 2).await.json()["error"], "route_daily_quota_exhausted");
    let reset = env.admin_url("/admin/tenants/a/reset");
    let r = send(&client(), http::Method::POST, &reset, &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reset"]["routes"]["score"]["daily_was"], 1);
    assert_eq!(score_as(&env, KEY_A, 3).await.status, 200, "the route's quota starts over");
}

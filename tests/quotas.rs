//! Per-tenant quotas end to end: rate, burst, in-flight, daily/monthly, persistence, headers.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bureau_guard::app;
use bureau_guard::clock::ManualClock;
use bureau_sim::mock_bureau::MockConfig;
use common::*;
use http::Method;

// 2026-11-23T14:59:59Z = 23:59:59 in Seoul (+09:00, the default quota offset).
const BEFORE_KST_MIDNIGHT_MS: i64 = 1_795_445_999_000;

fn score(env: &Env, i: usize) -> String {
    env.url(&format!("/v1/score/S-{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_rate_stays_within_5_percent_of_the_configured_rate() {
    // A burst above one lets the bucket absorb the phase between arrivals and refills, so the
    // admitted count is exactly burst + rate × time (with burst 1, GCRA admits only arrivals
    // that land after each refill, below the rate).
    let env = Env::with(fast_mock(), &Extras { tenant_a: "rate = 40\nburst = 10", ..Extras::default() }).await;
    let c = client();
    // Offer 4x the rate, paced, for 3 s; count what is admitted.
    let offered_per_s = 160.0;
    let run = Duration::from_secs(3);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / offered_per_s));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0;
    while start.elapsed() < run {
        tick.tick().await;
        let (c, url) = (c.clone(), score(&env, i));
        i += 1;
        tasks.push(tokio::spawn(async move { send(&c, Method::GET, &url, &[("x-api-key", KEY_A)], b"").await.status }));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut admitted = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap().as_u16() {
            200 => admitted += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let expected = 10.0 + 40.0 * elapsed;
    let error = (f64::from(admitted) - expected).abs() / expected;
    assert!(
        error <= 0.05,
        "admitted {admitted}, expected ~{expected:.0} ({:.1}% off); {limited} limited",
        error * 100.0
    );
    assert!(limited > admitted, "the excess was refused");
    assert_eq!(env.mock.bureau.stats().calls_by_tenant.get("a").copied(), Some(admitted as u64));
}

#[tokio::test]
async fn burst_is_honoured_then_429_with_exact_retry_after_and_ratelimit_fields() {
    let env = Env::with(fast_mock(), &Extras { tenant_a: "rate = 0.5\nburst = 3", ..Extras::default() }).await;
    let c = client();
    for remaining in [2, 1, 0] {
        let r = send(&c, Method::GET, &score(&env, 1), &[("x-api-key", KEY_A)], b"").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["ratelimit-policy"], r#""rate";q=3;w=6"#);
        let rl = r.headers["ratelimit"].to_str().unwrap().to_string();
        assert!(rl.starts_with(&format!(r#""rate";r={remaining};t="#)), "{rl}");
    }
    let r = send(&c, Method::GET, &score(&env, 1), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.status, 429);
    // One unit comes back every 2 s; the bucket emptied microseconds ago.
    assert_eq!(r.headers["retry-after"], "2");
    assert_eq!(r.headers["ratelimit"], r#""rate";r=0;t=2"#);
    let j = r.json();
    assert_eq!(j["error"], "rate_limited");
    assert_eq!(j["tenant"], "a");
    assert_eq!(j["retry_after_s"], 2);
    assert_eq!(env.mock.bureau.stats().calls_total, 3, "the refused request never reached the bureau");
    // Another tenant is untouched by a's bucket.
    assert_eq!(send(&c, Method::GET, &score(&env, 1), &[("x-api-key", KEY_B)], b"").await.status, 200);
}

#[tokio::test]
async fn in_flight_cap_holds_with_a_slow_bureau_and_frees_on_completion() {
    let slow = MockConfig {
        service_time: Duration::from_millis(400),
        jitter: Duration::ZERO,
        workers: 16,
        ..MockConfig::default()
    };
    let env = Env::with(slow, &Extras { tenant_a: "max_in_flight = 3", ..Extras::default() }).await;
    let mut held = Vec::new();
    for i in 0..3 {
        let url = score(&env, i);
        held.push(tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await.status }));
    }
    let bureau = env.mock.bureau.clone();
    wait_until("3 requests at the bureau", || bureau.stats().in_flight == 3).await;
    let r = get(&score(&env, 9), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "too_many_in_flight");
    assert_eq!(r.headers["retry-after"], "1");
    // Tenant b is not capped by a's in-flight count.
    let b = get(&score(&env, 10), &[("x-api-key", KEY_B)]).await;
    assert_eq!(b.status, 200);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(env.tenants().await["a"]["usage"]["in_flight"], 0, "every guard released");
    assert_eq!(get(&score(&env, 11), &[("x-api-key", KEY_A)]).await.status, 200);
}

#[tokio::test]
async fn in_flight_place_stays_with_the_bureau_call_when_the_client_goes_away() {
    // The bureau keeps working on a call whose client has gone: the tenant's place stays taken
    // until it answers, or max_in_flight would let a disconnecting client pile calls on it.
    let slow = MockConfig { service_time: Duration::from_millis(800), jitter: Duration::ZERO, ..MockConfig::default() };
    let env = Env::with(slow, &Extras { tenant_a: "max_in_flight = 1", ..Extras::default() }).await;
    let url = score(&env, 1);
    let task = tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await });
    let bureau = env.mock.bureau.clone();
    wait_until("the request at the bureau", || bureau.stats().in_flight == 1).await;
    task.abort(); // the client disconnects
    let _ = task.await;
    let shared = env.proxy.shared.clone();
    wait_until("the request gone", || shared.metrics.requests_in_flight.get() == 0).await;
    assert_eq!(env.tenants().await["a"]["usage"]["in_flight"], 1, "the call still holds its place");
    let r = get(&score(&env, 2), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (429, Some("too_many_in_flight")));
    let abandoned = shared.metrics.bureau_calls_abandoned_total.with_label_values(&["a"]);
    wait_until("the call ended, abandoned", || abandoned.get() == 1).await;
    assert_eq!(bureau.stats().in_flight, 0);
    assert_eq!(env.tenants().await["a"]["usage"]["in_flight"], 0);
    assert_eq!(get(&score(&env, 3), &[("x-api-key", KEY_A)]).await.status, 200);
}

async fn quota_env(clock: Arc<ManualClock>, tenant_a: &str, state: &str) -> Env {
    let mock = start_mock(fast_mock()).await;
    let text = config_with(&mock.url(), &Extras { tenant_a, sections: state, ..Extras::default() });
    let proxy = app::start_with_clock(parse(&text), clock).await.unwrap();
    Env { mock, proxy }
}

#[tokio::test]
async fn daily_quota_is_exhausted_then_resets_at_local_midnight() {
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let env = quota_env(clock.clone(), "daily_quota = 2", "").await;
    let c = client();
    for remaining in [1, 0] {
        let r = send(&c, Method::GET, &score(&env, 1), &[("x-api-key", KEY_A)], b"").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["ratelimit-policy"], r#""daily";q=2;w=86400"#);
        assert_eq!(r.headers["ratelimit"], format!(r#""daily";r={remaining};t=1"#).as_str());
    }
    let r = send(&c, Method::GET, &score(&env, 1), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "1", "one second to midnight in Seoul");
    let j = r.json();
    assert_eq!(j["error"], "daily_quota_exhausted");
    assert_eq!(j["retry_after_s"], 1);
    assert_eq!(env.mock.bureau.stats().calls_total, 2);

    // Tenant b, with no quota, is unaffected by a's exhaustion.
    for _ in 0..5 {
        assert_eq!(send(&c, Method::GET, &score(&env, 2), &[("x-api-key", KEY_B)], b"").await.status, 200);
    }
    let tenants = env.tenants().await;
    assert_eq!(tenants["b"]["usage"]["daily_used"], 5);
    assert_eq!(tenants["a"]["usage"]["daily_used"], 2);

    clock.set(BEFORE_KST_MIDNIGHT_MS + 1000);
    let r = send(&c, Method::GET, &score(&env, 1), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.status, 200, "a new day in Seoul");
    assert_eq!(r.headers["ratelimit"], r#""daily";r=1;t=86400"#);
}

#[tokio::test]
async fn monthly_quota_refuses_until_the_first_of_the_month() {
    // 2026-11-30T14:59:59Z = 23:59:59 on the last day of November in Seoul.
    let clock = Arc::new(ManualClock::new(1_796_050_799_000));
    let env = quota_env(clock.clone(), "monthly_quota = 1", "").await;
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 200);
    let r = get(&score(&env, 1), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "monthly_quota_exhausted");
    assert_eq!(r.headers["retry-after"], "1");
    clock.set(1_796_050_800_000);
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 200, "December");
}

#[tokio::test]
async fn refused_requests_are_not_charged_to_the_quota() {
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let env = quota_env(clock, "daily_quota = 100\nrate = 0.1\nburst = 2", "").await;
    for _ in 0..6 {
        get(&score(&env, 1), &[("x-api-key", KEY_A)]).await;
    }
    assert_eq!(env.tenants().await["a"]["usage"]["daily_used"], 2, "only the two admitted bureau calls count");
}

#[tokio::test]
async fn dry_run_counts_and_logs_but_does_not_refuse() {
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let env = quota_env(clock, "daily_quota = 1\ndry_run = [\"daily\"]", "").await;
    for _ in 0..3 {
        assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 200);
    }
    assert_eq!(env.mock.bureau.stats().calls_total, 3);
    let text = String::from_utf8(get(&env.admin_url("/metrics"), &[]).await.body.to_vec()).unwrap();
    let series = r#"bureau_guard_limit_rejections_total{mode="dry_run",reason="daily_quota_exhausted",tenant="a"}"#;
    assert_eq!(metric_value(&text, series), Some(2.0), "{text}");
}

#[tokio::test]
async fn admin_reset_restores_a_tenants_quota_and_requires_the_token() {
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let mock = start_mock(fast_mock()).await;
    let admin = format!("token_sha256 = \"{}\"", sha("admin-secret"));
    let text = config_with(&mock.url(), &Extras { tenant_a: "daily_quota = 1", admin: &admin, ..Extras::default() });
    let env = Env { proxy: app::start_with_clock(parse(&text), clock).await.unwrap(), mock };
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 200);
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 429);

    let c = client();
    let reset = env.admin_url("/admin/tenants/a/reset");
    assert_eq!(send(&c, Method::POST, &reset, &[], b"").await.status, 401);
    assert_eq!(send(&c, Method::POST, &reset, &[("authorization", "Bearer wrong")], b"").await.status, 401);
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 429, "nothing changed");
    let unknown = env.admin_url("/admin/tenants/zz/reset");
    let r = send(&c, Method::POST, &unknown, &[("authorization", "Bearer admin-secret")], b"").await;
    assert_eq!(r.status, 404);

    let r = send(&c, Method::POST, &reset, &[("authorization", "Bearer admin-secret"), ("x-operator", "ops-kim")], b"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reset"]["daily_was"], 1);
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 200);
}

#[tokio::test]
async fn admin_tenants_shows_limits_and_usage() {
    let env = Env::with(
        fast_mock(),
        &Extras {
            tenant_a: "rate = 10\nburst = 20\nmax_in_flight = 5\ndaily_quota = 1000\ndry_run = true",
            ..Extras::default()
        },
    )
    .await;
    get(&score(&env, 1), &[("x-api-key", KEY_A)]).await;
    let t = env.tenants().await;
    let a = &t["a"];
    assert_eq!(a["limits"]["rate"], 10.0);
    assert_eq!(a["limits"]["burst"], 20);
    assert_eq!(a["limits"]["max_in_flight"], 5);
    assert_eq!(a["limits"]["daily_quota"], 1000);
    assert_eq!(a["limits"]["dry_run"], serde_json::json!(["rate", "in_flight", "daily", "monthly"]));
    assert_eq!(a["usage"]["daily_used"], 1);
    assert_eq!(t["b"]["limits"]["rate"], serde_json::Value::Null);
}

#[tokio::test]
async fn counters_survive_a_clean_restart() {
    let dir = temp_dir("restart");
    let state = format!("[state]\nfile = \"{}\"\n", dir.join("state.json").display());
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let env = quota_env(clock.clone(), "daily_quota = 10", &state).await;
    for i in 0..4 {
        assert_eq!(get(&score(&env, i), &[("x-api-key", KEY_A)]).await.status, 200);
    }
    let Env { proxy, mock } = env;
    assert!(proxy.shutdown().await);

    let text =
        config_with(&mock.url(), &Extras { tenant_a: "daily_quota = 10", sections: &state, ..Extras::default() });
    let env = Env { proxy: app::start_with_clock(parse(&text), clock).await.unwrap(), mock };
    let t = env.tenants().await;
    assert_eq!(t["a"]["usage"]["daily_used"], 4);
    assert_eq!(t["a"]["usage"]["monthly_used"], 4);
}

#[tokio::test]
async fn corrupt_state_file_is_reported_moved_aside_and_the_proxy_starts() {
    let dir = temp_dir("corrupt");
    let file = dir.join("state.json");
    std::fs::write(&file, b"{\"version\": 1, \"tenants\": {\"a\": {\"day\": \"oops\"").unwrap();
    let state = format!("[state]\nfile = \"{}\"\n", file.display());
    let env = Env::with(fast_mock(), &Extras { sections: &state, ..Extras::default() }).await;
    assert_eq!(get(&score(&env, 1), &[("x-api-key", KEY_A)]).await.status, 200, "the proxy serves");
    let text = String::from_utf8(get(&env.admin_url("/metrics"), &[]).await.body.to_vec()).unwrap();
    assert_eq!(metric_value(&text, "bureau_guard_state_load_errors_total"), Some(1.0));
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept for inspection");
}

#[tokio::test]
async fn a_state_file_that_cannot_be_read_stops_start_up_and_is_left_untouched() {
    let dir = temp_dir("unreadable");
    let file = dir.join("state.json");
    // A directory at the file's path: unreadable as a file even for root, where mode 000 is not.
    std::fs::create_dir(&file).unwrap();
    std::fs::write(file.join("keep"), b"counters someone needs").unwrap();
    let mock = start_mock(fast_mock()).await;
    let state = format!("[state]\nfile = \"{}\"\n", file.display());
    let text = config_with(&mock.url(), &Extras { sections: &state, ..Extras::default() });
    let err = match app::start(parse(&text)).await {
        Ok(_) => panic!("started on a state file it could not read"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("cannot read the quota state file {}", file.display())), "{err}");
    assert!(err.contains("Is a directory"), "the OS error is named: {err}");
    assert_eq!(std::fs::read(file.join("keep")).unwrap(), b"counters someone needs");
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["state.json"], "nothing moved aside, nothing written beside it");
}

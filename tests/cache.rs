//! Caching and coalescing end to end: duplicates spared, and never one tenant's data for another.

mod common;

use std::time::Duration;

use bureau_guard::app::Running;
use bureau_sim::mock_bureau::{MockConfig, MockHandle};
use common::*;
use http::Method;

/// Test config with caching routes: `score` (coalesced + cached by path), `report` (POST, keyed
/// by JSON body fields), `ref` (shared scope, reference data).
fn config(mock_url: &str, score_extra: &str, upstream_extra: &str, sections: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
insecure_no_token = true
[upstream]
url = "{mock_url}"
{upstream_extra}
[log]
access_log = false
{sections}
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
coalesce = true
cache_key = ["path.subject_id"]
{score_extra}
[[routes]]
name = "report"
method = "POST"
path = "/v1/credit-report"
coalesce = true
cache_ttl = "10m"
cache_key = ["body.subject_id", "body.report_type"]
[[routes]]
name = "query"
method = "GET"
path = "/echo/query/{{*rest}}"
cache_ttl = "10m"
cache_key = ["query.report_type"]
[[routes]]
name = "ref"
method = "GET"
path = "/echo/ref/{{code}}"
cache_ttl = "10m"
cache_key = ["path.code"]
scope = "shared"
[[tenants]]
id = "a"
api_key_sha256 = "{}"
[[tenants]]
id = "b"
api_key_sha256 = "{}"
"#,
        sha(KEY_A),
        sha(KEY_B)
    )
}

async fn env(mock: MockConfig, score_extra: &str, upstream_extra: &str, sections: &str) -> (MockHandle, Running) {
    let mock = start_mock(mock).await;
    let proxy = start_proxy(&config(&mock.url(), score_extra, upstream_extra, sections)).await;
    (mock, proxy)
}

fn slow(ms: u64) -> MockConfig {
    MockConfig { service_time: Duration::from_millis(ms), jitter: Duration::ZERO, workers: 64, ..MockConfig::default() }
}

async fn daily_used(proxy: &Running, tenant: &str) -> u64 {
    let list = get(&format!("http://{}/admin/tenants", proxy.admin_addr), &[]).await.json();
    list.as_array().unwrap().iter().find(|t| t["id"] == tenant).unwrap()["usage"]["daily_used"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_identical_look_ups_make_one_bureau_call_and_one_charge() {
    // Coalescing only (no cache): a flight long enough for all 200 to arrive while it is out.
    let (mock, proxy) = env(slow(1500), "", "", "").await;
    let url = format!("http://{}/v1/score/S-42", proxy.addr);
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move { send(&c, Method::GET, &url, &[("x-api-key", KEY_A)], b"").await }));
    }
    let mut bodies = std::collections::HashSet::new();
    let mut by_cache = std::collections::HashMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        bodies.insert(r.body.clone());
        *by_cache.entry(r.headers["x-cache"].to_str().unwrap().to_string()).or_insert(0) += 1;
    }
    assert_eq!(mock.bureau.stats().calls_total, 1, "exactly one bureau call");
    assert_eq!(bodies.len(), 1, "everyone got the same answer");
    assert_eq!(by_cache.get("MISS"), Some(&1), "{by_cache:?}");
    assert_eq!(by_cache.get("COALESCED"), Some(&199), "{by_cache:?}");
    assert_eq!(daily_used(&proxy, "a").await, 1, "coalesced followers are not charged");
    let text =
        String::from_utf8(get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.body.to_vec()).unwrap();
    assert_eq!(
        metric_value(&text, r#"bureau_guard_requests_total{outcome="coalesced",route="score",tenant="a"}"#),
        Some(199.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_goes_on_when_the_leading_client_disconnects() {
    let (mock, proxy) = env(slow(500), "", "", "").await;
    let url = format!("http://{}/v1/score/S-7", proxy.addr);
    let leader = tokio::spawn({
        let url = url.clone();
        async move { get(&url, &[("x-api-key", KEY_A)]).await }
    });
    let shared = proxy.shared.clone();
    wait_until("the leader's call in flight", || shared.coalescer.in_flight() == 1).await;
    let follower = tokio::spawn({
        let url = url.clone();
        async move { get(&url, &[("x-api-key", KEY_A)]).await }
    });
    let bureau = mock.bureau.clone();
    wait_until("the call at the bureau", || bureau.stats().in_flight == 1).await;
    leader.abort();
    let r = follower.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(mock.bureau.stats().calls_total, 1, "no second call after the leader left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_gives_every_waiter_the_same_error_without_retries() {
    let (mock, proxy) = env(slow(3000), "", "response_timeout = \"300ms\"", "").await;
    let url = format!("http://{}/v1/score/S-9", proxy.addr);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 504);
        assert_eq!(r.json()["error"], "bureau_timeout");
    }
    assert_eq!(mock.bureau.stats().calls_total, 1);
}

#[tokio::test]
async fn a_cached_answer_is_a_hit_with_age_and_costs_no_quota() {
    let (mock, proxy) = env(fast_mock(), "cache_ttl = \"10m\"", "", "").await;
    let url = format!("http://{}/v1/score/S-1", proxy.addr);
    let first = get(&url, &[("x-api-key", KEY_A)]).await;
    assert_eq!(first.headers["x-cache"], "MISS");
    let second = get(&url, &[("x-api-key", KEY_A)]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["x-cache"], "HIT");
    assert_eq!(second.headers["age"], "0");
    assert_eq!(second.body, first.body);
    assert_ne!(second.headers["x-request-id"], first.headers["x-request-id"], "each answer carries its own request id");
    assert_eq!(mock.bureau.stats().calls_total, 1);
    assert_eq!(daily_used(&proxy, "a").await, 1, "the hit is not charged to the daily quota");
}

#[tokio::test]
async fn one_tenant_never_receives_another_tenants_cached_answer() {
    let (mock, proxy) = env(fast_mock(), "cache_ttl = \"10m\"", "", "").await;
    let url = format!("http://{}/v1/score/S-1", proxy.addr);
    assert_eq!(get(&url, &[("x-api-key", KEY_A)]).await.headers["x-cache"], "MISS");
    let b = get(&url, &[("x-api-key", KEY_B)]).await;
    assert_eq!(b.headers["x-cache"], "MISS", "tenant scope: b's look-up goes to the bureau for b");
    let stats = mock.bureau.stats();
    assert_eq!(stats.calls_by_tenant.get("a"), Some(&1));
    assert_eq!(stats.calls_by_tenant.get("b"), Some(&1));

    // A route explicitly marked shared (reference data) does share.
    let ref_url = format!("http://{}/echo/ref/KRW", proxy.addr);
    assert_eq!(get(&ref_url, &[("x-api-key", KEY_A)]).await.headers["x-cache"], "MISS");
    let shared = get(&ref_url, &[("x-api-key", KEY_B)]).await;
    assert_eq!(shared.headers["x-cache"], "HIT");
}

#[tokio::test]
async fn json_field_order_and_whitespace_do_not_change_the_key_and_bad_json_is_400() {
    let (mock, proxy) = env(fast_mock(), "", "", "").await;
    let url = format!("http://{}/v1/credit-report", proxy.addr);
    let c = client();
    let r =
        send(&c, Method::POST, &url, &[("x-api-key", KEY_A)], br#"{"subject_id":"S-5","report_type":"full"}"#).await;
    assert_eq!(r.headers["x-cache"], "MISS");
    let r = send(
        &c,
        Method::POST,
        &url,
        &[("x-api-key", KEY_A)],
        b"{ \"report_type\" : \"full\",\n  \"subject_id\": \"S-5\" }",
    )
    .await;
    assert_eq!(r.headers["x-cache"], "HIT");
    let r =
        send(&c, Method::POST, &url, &[("x-api-key", KEY_A)], br#"{"subject_id":"S-5","report_type":"summary"}"#).await;
    assert_eq!(r.headers["x-cache"], "MISS", "a different report type is a different look-up");
    let r = send(&c, Method::POST, &url, &[("x-api-key", KEY_A)], b"{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request");
    assert_eq!(mock.bureau.stats().calls_total, 2, "the malformed look-up never reached the bureau");
}

#[tokio::test]
async fn an_expired_entry_answers_when_the_bureau_fails_within_stale_if_error() {
    let (mock, proxy) =
        env(fast_mock(), "cache_ttl = \"1s\"\nstale_if_error = \"1h\"", "response_timeout = \"200ms\"", "").await;
    let url = format!("http://{}/v1/score/S-3", proxy.addr);
    let fresh = get(&url, &[("x-api-key", KEY_A)]).await;
    assert_eq!(fresh.status, 200);
    // The bureau degrades, and the entry's one-second freshness runs out (time has to pass here).
    mock.bureau.set_service_time(Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&url, &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-cache"], "STALE");
    assert!(r.headers["warning"].to_str().unwrap().starts_with("110"));
    assert_eq!(r.body, fresh.body);
    // Without a stale entry the same failure is an error.
    let r = get(&format!("http://{}/v1/score/S-4", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 504);
}

#[tokio::test]
async fn purge_by_tenant_forces_the_next_look_up_to_the_bureau() {
    let (mock, proxy) = env(fast_mock(), "cache_ttl = \"10m\"", "", "").await;
    let url = format!("http://{}/v1/score/S-1", proxy.addr);
    get(&url, &[("x-api-key", KEY_A)]).await;
    get(&url, &[("x-api-key", KEY_B)]).await;
    assert_eq!(get(&url, &[("x-api-key", KEY_A)]).await.headers["x-cache"], "HIT");
    let c = client();
    let purge = format!("http://{}/admin/cache/purge?tenant=a", proxy.admin_addr);
    let r = send(&c, Method::POST, &purge, &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["purged"], 1);
    assert_eq!(get(&url, &[("x-api-key", KEY_A)]).await.headers["x-cache"], "MISS", "a's entry is gone");
    assert_eq!(get(&url, &[("x-api-key", KEY_B)]).await.headers["x-cache"], "HIT", "b's is kept");
    let bad =
        send(&c, Method::POST, &format!("http://{}/admin/cache/purge?subject=S-1", proxy.admin_addr), &[], b"").await;
    assert_eq!(bad.status, 400);
    assert_eq!(mock.bureau.stats().calls_total, 3);
}

#[tokio::test]
async fn the_audit_log_attributes_every_answer_without_raw_subject_ids() {
    let dir = temp_dir("audit");
    let file = dir.join("audit.jsonl");
    let sections = format!("[audit]\nfile = \"{}\"\n", file.display());
    let (_mock, proxy) = env(fast_mock(), "cache_ttl = \"10m\"", "", &sections).await;
    let url = format!("http://{}/v1/score/SUBJ-991", proxy.addr);
    get(&url, &[("x-api-key", KEY_A)]).await;
    get(&url, &[("x-api-key", KEY_A)]).await;
    get(&url, &[("x-api-key", KEY_B)]).await;
    assert!(proxy.shutdown().await);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("SUBJ-991"), "no raw subject id in the audit log");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seen: Vec<(String, String)> =
        lines.iter().map(|l| (l["tenant"].as_str().unwrap().into(), l["outcome"].as_str().unwrap().into())).collect();
    assert_eq!(
        seen,
        [("a".into(), "bureau".into()), ("a".into(), "cache_hit".into()), ("b".into(), "bureau".into())],
        "{text}"
    );
    assert_eq!(lines[0]["subject"], lines[1]["subject"], "same look-up, same keyed hash");
    assert_ne!(lines[0]["subject"], lines[2]["subject"], "scoped per tenant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_answer_on_a_shared_route_never_reaches_another_tenant() {
    // The score route, shared and coalescing, in front of a bureau that marks answers private.
    let (mock, proxy) = env(slow(600), "cache_ttl = \"10m\"\nscope = \"shared\"", "", "").await;
    mock.bureau.set_cache_control(Some("private, max-age=60"));
    let url = format!("http://{}/v1/score/S-77", proxy.addr);
    let leader = tokio::spawn({
        let url = url.clone();
        async move { get(&url, &[("x-api-key", KEY_A)]).await }
    });
    let shared = proxy.shared.clone();
    wait_until("a's call in flight", || shared.coalescer.in_flight() == 1).await;
    let other = get(&url, &[("x-api-key", KEY_B)]).await;
    let a = leader.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-cache"], "MISS");
    assert_eq!(other.status, 503, "b joined a's call but must not receive a's private answer");
    assert_eq!(other.json()["error"], "bureau_busy");
    assert_eq!(other.headers["retry-after"], "1");
    // And the private answer was not cached either: b's retry goes to the bureau for b.
    let retry = get(&url, &[("x-api-key", KEY_B)]).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.headers["x-cache"], "MISS");
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("b"), Some(&1));
}

#[tokio::test]
async fn the_bureaus_no_store_is_honoured() {
    let (mock, proxy) = env(fast_mock(), "cache_ttl = \"10m\"", "", "").await;
    mock.bureau.set_cache_control(Some("no-store"));
    let url = format!("http://{}/v1/score/S-8", proxy.addr);
    assert_eq!(get(&url, &[("x-api-key", KEY_A)]).await.headers["x-cache"], "MISS");
    assert_eq!(get(&url, &[("x-api-key", KEY_A)]).await.headers["x-cache"], "MISS", "not stored");
    mock.bureau.set_cache_control(Some("max-age=0"));
    get(&url, &[("x-api-key", KEY_A)]).await;
    assert_eq!(
        get(&url, &[("x-api-key", KEY_A)]).await.headers["x-cache"],
        "MISS",
        "max-age=0 lowers the TTL to nothing"
    );
    assert_eq!(mock.bureau.stats().calls_total, 4);
}

/// Each answer of the mock's `/echo/...` says what the bureau saw: a cached answer is only right
/// for a request whose forwarded target was byte for byte the same.
#[tokio::test]
async fn cached_answers_go_only_to_requests_the_bureau_sees_as_the_same_bytes() {
    let (_mock, proxy) = env(fast_mock(), "", "", "").await;
    let c = client();
    let ask = |path: &'static str| {
        let c = c.clone();
        let url = format!("http://{}{path}", proxy.addr);
        async move {
            let r = send(&c, Method::GET, &url, &[("x-api-key", KEY_A)], b"").await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            let j = r.json();
            let query = j["query"].as_str().map(|q| format!("?{q}")).unwrap_or_default();
            (format!("{}{query}", j["path"].as_str().unwrap()), r.headers.get("x-cache").cloned())
        }
    };
    // `%2D` is `-` to every server: normalised before routing, forwarded as `-`, one key.
    assert_eq!(ask("/echo/ref/S%2D1001").await.0, "/echo/ref/S-1001");
    assert_eq!(ask("/echo/ref/S-1001").await.0, "/echo/ref/S-1001");
    // `%2B` and `+` are different bytes for a bureau reading raw paths or queries.
    assert_eq!(ask("/echo/ref/a%2Bb").await.0, "/echo/ref/a%2Bb");
    assert_eq!(ask("/echo/ref/a+b").await.0, "/echo/ref/a+b");
    assert_eq!(ask("/echo/query/x?report_type=a%2Bb").await.0, "/echo/query/x?report_type=a%2Bb");
    assert_eq!(ask("/echo/query/x?report_type=a+b").await.0, "/echo/query/x?report_type=a+b");
    assert_eq!(ask("/echo/query/x?report_type=a%2bb").await.0, "/echo/query/x?report_type=a%2bb");
    // A name a decoding parser reads as `report_type` is keyed too.
    assert_eq!(ask("/echo/query/x?report%5Ftype=B").await.0, "/echo/query/x?report%5Ftype=B");
    assert_eq!(ask("/echo/query/x?report%5Ftype=C").await.0, "/echo/query/x?report%5Ftype=C");
    // And a repeat is still a hit.
    let (seen, cache) = ask("/echo/query/x?report_type=a+b").await;
    assert_eq!(seen, "/echo/query/x?report_type=a+b");
    assert!(cache.is_some_and(|v| v.to_str().unwrap().contains("HIT")), "a repeat is served from the cache");
}

#[tokio::test]
async fn body_field_names_equal_but_for_case_are_refused_before_the_bureau() {
    let (mock, proxy) = env(fast_mock(), "", "", "").await;
    let url = format!("http://{}/v1/credit-report", proxy.addr);
    let body = br#"{"subject_id":"S-1","report_type":"full","Subject_ID":"S-2"}"#;
    let r = send(&client(), Method::POST, &url, &[("x-api-key", KEY_A)], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "bad_request");
    assert_eq!(mock.bureau.stats().calls_total, 0);
}

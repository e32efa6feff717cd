//! A request's own deadline end to end (issue 17): work nobody waits for never reaches the
//! bureau, and the bureau is told how long the client still waits.

mod common;

use std::time::Duration;

use bureau_sim::mock_bureau::MockConfig;
use common::*;

fn one_worker(service_ms: u64) -> MockConfig {
    MockConfig {
        workers: 1,
        service_time: Duration::from_millis(service_ms),
        jitter: Duration::ZERO,
        queue: 10_000,
        queue_timeout: Duration::from_secs(30),
    }
}

fn config() -> Extras<'static> {
    Extras {
        upstream: "max_concurrency = 1\nqueue_timeout = \"10s\"",
        tenant_a: "max_queue = 100",
        ..Extras::default()
    }
}

fn spawn_get(url: String, headers: Vec<(&'static str, &'static str)>) -> tokio::task::JoinHandle<Resp> {
    tokio::spawn(async move { get(&url, &headers).await })
}

#[tokio::test]
async fn the_bureau_is_told_the_time_left_and_never_sees_the_clients_field() {
    let env = Env::with(fast_mock(), &config()).await;
    let r = get(&env.url("/echo/x"), &[("x-api-key", KEY_A), ("x-request-timeout-ms", "5000")]).await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert!(h.get("x-request-timeout-ms").is_none(), "{h}");
    let left: u64 = h["x-expected-timeout-ms"].as_str().expect("told").parse().expect("a number");
    assert!((4000..=5000).contains(&left), "{left}");
    // A client's own x-expected-timeout-ms is not passed on either.
    let r = get(&env.url("/echo/x"), &[("x-api-key", KEY_A), ("x-expected-timeout-ms", "99")]).await;
    assert!(r.json()["headers"].get("x-expected-timeout-ms").is_none(), "{}", r.json());
    let r = get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A), ("x-request-timeout-ms", "soon")]).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("whole number of milliseconds"), "{}", r.text());
}

/// A request whose deadline passes while it waits for a slot is answered 503 then, and the
/// bureau never sees it: its own count of calls is the requests that had time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_deadline_passes_in_the_queue_never_reaches_the_bureau() {
    let env = Env::with(one_worker(300), &config()).await;
    let busy = spawn_get(env.url("/v1/score/A"), vec![("x-api-key", KEY_A)]);
    wait_until("the slot is taken", || env.proxy.shared.scheduler.in_flight() == 1).await;
    let hurried = spawn_get(env.url("/v1/score/B"), vec![("x-api-key", KEY_B), ("x-request-timeout-ms", "100")]);
    let patient = spawn_get(env.url("/v1/score/C"), vec![("x-api-key", KEY_B), ("x-request-timeout-ms", "5000")]);
    let hurried = hurried.await.unwrap();
    assert_eq!(hurried.status, 503);
    assert!(hurried.text().contains("x-request-timeout-ms passed"), "{}", hurried.text());
    assert!(hurried.headers.contains_key("retry-after"));
    assert_eq!(busy.await.unwrap().status, 200);
    assert_eq!(patient.await.unwrap().status, 200);
    assert_eq!(env.mock.bureau.stats().calls_total, 2, "the bureau saw A and C, never B");
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    assert_eq!(
        metric_value(&metrics, r#"bureau_guard_sheds_total{reason="deadline",tenant="b"}"#),
        Some(1.0),
        "{metrics}"
    );
}

/// With a measured drain rate, a request the queue cannot serve in time is refused at once
/// (not when its deadline passes), and never reaches the bureau.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_queue_cannot_serve_in_time_is_refused_at_once() {
    let env = Env::with(one_worker(60), &config()).await;
    // A drain rate: ten calls in a row (about 16 a second through the one slot).
    for i in 0..10 {
        assert_eq!(get(&env.url(&format!("/v1/score/W{i}")), &[("x-api-key", KEY_A)]).await.status, 200);
    }
    // Tenant a queues six behind a seventh in service: about 7 x 60 ms of queue for its next.
    let backlog: Vec<_> =
        (0..7).map(|i| spawn_get(env.url(&format!("/v1/score/Q{i}")), vec![("x-api-key", KEY_A)])).collect();
    wait_until("the backlog is queued", || env.proxy.shared.scheduler.queued_total() == 6).await;
    let r = get(&env.url("/v1/score/late"), &[("x-api-key", KEY_A), ("x-request-timeout-ms", "150")]).await;
    assert_eq!(r.status, 503);
    // Refused with the estimate (a request queued until its deadline passed says so instead).
    assert!(r.text().contains("a bureau slot is about"), "{}", r.text());
    for t in backlog {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(env.mock.bureau.stats().calls_total, 17, "10 + 7 calls; the late one never reached the bureau");
}

/// A coalesced look-up serves whoever joins it: one client's short deadline must not shed the
/// flight the others joined (it runs to the queue's own deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_short_deadline_does_not_shed_a_coalesced_flight() {
    let x = Extras { score: "coalesce = true\ncache_key = [\"path.subject_id\"]", ..config() };
    let env = Env::with(one_worker(300), &x).await;
    let busy = spawn_get(env.url("/v1/score/A"), vec![("x-api-key", KEY_A)]);
    wait_until("the slot is taken", || env.proxy.shared.scheduler.in_flight() == 1).await;
    let leader = spawn_get(env.url("/v1/score/S-1"), vec![("x-api-key", KEY_A), ("x-request-timeout-ms", "100")]);
    wait_until("the flight is queued", || env.proxy.shared.scheduler.queued_total() == 1).await;
    let follower = get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(follower.status, 200, "{}", follower.text());
    assert_eq!(leader.await.unwrap().status, 200);
    assert_eq!(busy.await.unwrap().status, 200);
    assert_eq!(env.mock.bureau.stats().calls_total, 2, "one call for A, one for the flight");
}

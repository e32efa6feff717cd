use std::collections::BTreeMap;
use std::time::Instant as StdInstant;

use http::header::RETRY_AFTER;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

use super::stats::Inside;
use super::*;

#[test]
fn reports_are_deterministic_and_about_1_5_kb() {
    let a = credit_report("S-1", "full");
    assert_eq!(a, credit_report("S-1", "full"));
    assert_ne!(a, credit_report("S-2", "full"));
    assert!((1200..2000).contains(&a.len()), "{} bytes", a.len());
}

// ---------------------------------------------------------------------------------------------
// Harness: the mock on 127.0.0.1:0 and a real HTTP client.

async fn mock(cfg: MockConfig) -> MockHandle {
    start(cfg, TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0"))
}

fn slow(workers: usize, service: Duration) -> MockConfig {
    MockConfig {
        workers,
        service_time: service,
        jitter: Duration::ZERO,
        queue_timeout: Duration::from_secs(30),
        ..MockConfig::default()
    }
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: serde_json::Value,
}

/// One request on a connection of its own (a test's calls never share a pooled connection).
async fn call(method: Method, url: String, tenant: &str, body: &str) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-tenant", tenant)
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("a valid request");
    let resp = client.request(req).await.expect("the mock answers");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    }
}

fn score(m: &MockHandle, tenant: &str) -> JoinHandle<Reply> {
    let (url, tenant) = (format!("{}/v1/score/S-{}", m.url(), fastrand::u32(..)), tenant.to_string());
    tokio::spawn(async move { call(Method::GET, url, &tenant, "").await })
}

async fn control(m: &MockHandle, body: &str) -> Reply {
    call(Method::POST, format!("{}/control", m.url()), "-", body).await
}

/// Waits (bounded, real time) until `cond` holds: the condition lives in another task.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(StdInstant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------------------------------
// Accepted calls run to their end.

#[tokio::test]
async fn a_call_whose_client_leaves_still_finishes_and_counts_for_nobody() {
    let m = mock(slow(1, Duration::from_millis(300))).await;
    let mut conn = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    conn.write_all(b"GET /v1/score/S-1 HTTP/1.1\r\nhost: bureau\r\nx-tenant: a\r\n\r\n").await.unwrap();
    wait_until("the call at work", || m.bureau.stats().working == 1).await;
    drop(conn); // the client leaves mid-service

    // The call stays inside the bureau until its work ends, then counts as finished for nobody.
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        let s = m.bureau.stats();
        if s.finished_for_nobody == 1 {
            break;
        }
        assert_eq!((s.in_flight, s.working), (1, 1), "the call left the bureau before its work ended");
        assert!(StdInstant::now() < deadline, "the abandoned call never finished");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_until("the call out", || m.bureau.stats().in_flight == 0).await;
    let s = m.bureau.stats();
    assert_eq!((s.calls_ok, s.finished_for_nobody, s.working), (1, 1, 0));
    assert_eq!(s.served_by_tenant, map(&[("a", 1)]), "a call finished for nobody is still served");

    // A call whose client stays is delivered, not counted for nobody.
    assert_eq!(score(&m, "a").await.unwrap().status, StatusCode::OK);
    assert_eq!(m.bureau.stats().finished_for_nobody, 1);
}

#[tokio::test]
async fn an_unbounded_queue_lets_more_than_64_calls_wait() {
    let cfg = MockConfig { queue: UNBOUNDED, ..slow(0, Duration::ZERO) };
    assert!(cfg.queue > MockConfig::default().queue);
    let m = mock(cfg).await;
    let calls: Vec<_> = (0..100).map(|_| score(&m, "a")).collect();
    wait_until("100 calls waiting", || m.bureau.stats().in_flight == 100).await;
    assert_eq!(m.bureau.stats().calls_overloaded, 0);

    m.bureau.set_workers(100);
    for c in calls {
        assert_eq!(c.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(m.bureau.stats().served_by_tenant, map(&[("a", 100)]));
}

// ---------------------------------------------------------------------------------------------
// Back-pressure.

#[tokio::test]
async fn a_full_refusal_answers_at_once_with_retry_after_and_counts_per_tenant() {
    // No worker and a long queue timeout: a call that queued would hang, so only an answer
    // given before the queue comes back.
    let m = mock(slow(0, Duration::ZERO)).await;
    let refusal = Refusal { status: StatusCode::TOO_MANY_REQUESTS, share: 1.0, retry_after_s: Some(2), duration: None };
    m.bureau.set_refusal(Some(refusal)).unwrap();
    for tenant in ["a", "a", "b"] {
        let r = score(&m, tenant).await.unwrap();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers[RETRY_AFTER], "2");
        assert_eq!(r.body["error"], "bureau_refused");
    }
    let s = m.bureau.stats();
    assert_eq!((s.calls_total, s.calls_refused, s.calls_ok), (3, 3, 0));
    assert_eq!(s.calls_by_tenant, map(&[("a", 2), ("b", 1)]));
    assert_eq!(s.refused_by_tenant, map(&[("a", 2), ("b", 1)]));
    assert!(s.served_by_tenant.is_empty());
}

#[tokio::test]
async fn overload_503s_carry_retry_after_and_count_as_refused() {
    let m = mock(MockConfig { queue: 0, ..slow(0, Duration::ZERO) }).await;
    let r = score(&m, "a").await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body["error"], "bureau_overloaded");
    assert_eq!(r.headers[RETRY_AFTER], "1");
    let s = m.bureau.stats();
    assert_eq!((s.calls_overloaded, s.calls_refused), (1, 0));
    assert_eq!(s.refused_by_tenant, map(&[("a", 1)]));
}

#[tokio::test(start_paused = true)]
async fn a_refusal_for_a_while_expires_after_its_duration() {
    let bureau = MockBureau::new(MockConfig::default());
    let refusal = Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        share: 1.0,
        retry_after_s: None,
        duration: Some(Duration::from_secs(3)),
    };
    bureau.set_refusal(Some(refusal)).unwrap();
    assert!(bureau.refuse("a").is_some_and(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE));
    tokio::time::advance(Duration::from_millis(2999)).await;
    assert!(bureau.refuse("a").is_some(), "still refusing before the end");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(bureau.refuse("a").is_none(), "the refusal expired");
    assert_eq!(bureau.refusal(), None);
    assert_eq!(bureau.stats().refused_by_tenant, map(&[("a", 2)]));
}

#[test]
fn a_refusal_with_a_bad_status_or_share_changes_nothing() {
    let bureau = MockBureau::new(MockConfig::default());
    let bad = Refusal { status: StatusCode::IM_A_TEAPOT, share: 1.5, retry_after_s: None, duration: None };
    let err = bureau.set_refusal(Some(bad)).unwrap_err();
    assert_eq!(err.0.len(), 2, "every problem: {err}");
    assert_eq!(bureau.refusal(), None);
}

// ---------------------------------------------------------------------------------------------
// Live changes.

#[tokio::test]
async fn fewer_workers_cap_calls_once_running_ones_finish_and_more_let_queued_calls_in() {
    let m = mock(slow(2, Duration::from_millis(400))).await;
    let bureau = m.bureau.clone();
    let a: Vec<_> = (0..2).map(|_| score(&m, "a")).collect();
    wait_until("2 calls at work", || bureau.stats().working == 2).await;

    bureau.set_workers(1);
    let b: Vec<_> = (0..3).map(|_| score(&m, "b")).collect();
    wait_until("3 more calls queued", || bureau.stats().in_flight == 5).await;
    assert_eq!(bureau.stats().working, 2, "no running call is interrupted");
    for r in a {
        assert_eq!(r.await.unwrap().status, StatusCode::OK);
    }

    // One worker now: the queued calls go one at a time.
    wait_until("the next call at work", || bureau.stats().working == 1).await;
    wait_until("the first queued call done", || {
        let s = bureau.stats();
        assert!(s.working <= 1, "{} calls at work with one worker", s.working);
        s.calls_ok == 3
    })
    .await;
    wait_until("the second queued call at work", || bureau.stats().working == 1).await;

    // More workers: the last queued call starts at once, beside the running one.
    bureau.set_workers(3);
    wait_until("the last queued call at work", || bureau.stats().working == 2).await;
    assert_eq!(bureau.stats().calls_ok, 3, "it started before a worker finished");
    for r in b {
        assert_eq!(r.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(bureau.workers(), 3);
}

#[tokio::test]
async fn control_with_any_bad_field_answers_400_and_changes_nothing() {
    let m = mock(slow(4, Duration::from_millis(20))).await;
    for bad in [
        "not json",
        r#"{"wrkers": 2}"#,
        r#"{"workers": 2, "service_ms": "fast"}"#,
        r#"{"workers": 2, "service_ms": 5, "refuse": {"status": 418}}"#,
        r#"{"workers": 2, "refuse": {"status": 429, "share": 1.5}}"#,
        r#"{"service_ms": 5, "workers": 1000000}"#,
        r#"{"workers": -1}"#,
    ] {
        let r = control(&m, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.body["error"], "bad_request", "{bad}");
    }
    assert_eq!(m.bureau.workers(), 4);
    assert_eq!(m.bureau.service_time(), Duration::from_millis(20));
    assert_eq!(m.bureau.refusal(), None);

    // The old form still works.
    let r = control(&m, r#"{"service_ms": 7}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["service_ms"], 7);
    assert_eq!(m.bureau.service_time(), Duration::from_millis(7));

    let r =
        control(&m, r#"{"workers": 3, "refuse": {"status": 503, "share": 0.5, "retry_after_s": 2, "for_ms": 60000}}"#)
            .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!((r.body["workers"].as_u64(), r.body["refuse"]["status"].as_u64()), (Some(3), Some(503)));
    assert_eq!(m.bureau.workers(), 3);
    let on = m.bureau.refusal().expect("refusing");
    assert_eq!((on.status, on.share, on.retry_after_s), (StatusCode::SERVICE_UNAVAILABLE, 0.5, Some(2)));

    let r = control(&m, r#"{"refuse": null}"#).await;
    assert_eq!((r.status, r.body["refuse"].is_null()), (StatusCode::OK, true));
    assert_eq!(m.bureau.refusal(), None);
    assert_eq!(m.bureau.workers(), 3, "an absent field changes nothing");
}

// ---------------------------------------------------------------------------------------------
// The in-flight window.

#[tokio::test(start_paused = true)]
async fn the_window_p95_is_time_weighted_and_a_reset_starts_afresh() {
    let bureau = MockBureau::new(MockConfig::default());
    let mut inside = Vec::new();
    // 2 inside for 96 s, then a spike of 7 for 4 s: the max sees the spike, the p95 does not.
    inside.extend((0..2).map(|_| Inside::enter(&bureau)));
    tokio::time::advance(Duration::from_secs(96)).await;
    inside.extend((0..5).map(|_| Inside::enter(&bureau)));
    tokio::time::advance(Duration::from_secs(4)).await;
    let w = bureau.stats().window;
    assert_eq!(w, Window { since_ms: 100_000, max_in_flight: 7, p95_in_flight: 2 });

    // 7 for 6 s more: now 10 of 106 s at 7, more than 5%.
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(bureau.stats().window.p95_in_flight, 7);

    inside.truncate(3);
    bureau.reset_window();
    assert_eq!(bureau.stats().window, Window { since_ms: 0, max_in_flight: 3, p95_in_flight: 3 });
    tokio::time::advance(Duration::from_secs(10)).await;
    inside.clear();
    tokio::time::advance(Duration::from_secs(30)).await;
    let s = bureau.stats();
    assert_eq!(s.window, Window { since_ms: 40_000, max_in_flight: 3, p95_in_flight: 3 });
    assert_eq!((s.in_flight, s.max_in_flight), (0, 7), "the lifetime figures do not reset");
}

#[tokio::test]
async fn post_stats_reset_starts_a_new_window() {
    let m = mock(slow(4, Duration::ZERO)).await;
    assert_eq!(score(&m, "a").await.unwrap().status, StatusCode::OK);
    assert_eq!(m.bureau.stats().window.max_in_flight, 1);
    let r = call(Method::POST, format!("{}/stats/reset", m.url()), "-", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["window"]["max_in_flight"], 0);
    assert_eq!(r.body["max_in_flight"], 1);
    assert_eq!(r.body["calls_ok"], 1);
}

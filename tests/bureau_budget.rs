//! The bureau budget counts the bureau's work, not the clients' patience (issue 13): a call
//! keeps its slot, its tenant's in-flight place and its charge until the bureau answers, whatever
//! its client does; a request that leaves while queued costs nothing; shutdown waits for calls
//! whose clients have gone; a failing bureau is answered for at once (circuit breaker).

mod common;

use std::time::Duration;

use bureau_guard::app::Running;
use bureau_sim::mock_bureau::{MockConfig, MockHandle, Refusal};
use common::*;

/// Tenants `a` and `b` (daily quota 100 each); routes `score` (plain) and `cached` (coalesced and
/// cached, keyed by subject). Bureau budget 1; `queue_timeout` 5 s unless `upstream_extra` says.
fn config(mock_url: &str, upstream_extra: &str) -> String {
    let queue = if upstream_extra.contains("queue_timeout") { "" } else { "queue_timeout = \"5s\"" };
    let budget = if upstream_extra.contains("max_concurrency") { "" } else { "max_concurrency = 1" };
    let upstream_extra = format!("{queue}\n{budget}\n{upstream_extra}");
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
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[routes]]
name = "cached"
method = "POST"
path = "/v1/credit-report"
coalesce = true
cache_ttl = "10m"
cache_key = ["body.subject_id", "body.report_type"]
[[tenants]]
id = "a"
api_key_sha256 = "{}"
daily_quota = 100
[[tenants]]
id = "b"
api_key_sha256 = "{}"
daily_quota = 100
"#,
        sha(KEY_A),
        sha(KEY_B)
    )
}

fn bureau(service_ms: u64) -> MockConfig {
    MockConfig { service_time: Duration::from_millis(service_ms), jitter: Duration::ZERO, ..MockConfig::default() }
}

async fn env(mock: MockConfig, upstream_extra: &str) -> (MockHandle, Running) {
    let mock = start_mock(mock).await;
    let proxy = start_proxy(&config(&mock.url(), upstream_extra)).await;
    (mock, proxy)
}

fn score(proxy: &Running, subject: &str) -> String {
    format!("http://{}/v1/score/{subject}", proxy.addr)
}

async fn report(proxy: &Running, key: &str, subject: &str) -> Resp {
    let url = format!("http://{}/v1/credit-report", proxy.addr);
    let body = format!(r#"{{"subject_id":"{subject}","report_type":"full"}}"#);
    send(&client(), http::Method::POST, &url, &[("x-api-key", key)], body.as_bytes()).await
}

async fn daily_used(proxy: &Running, tenant: &str) -> u64 {
    let list = get(&format!("http://{}/admin/tenants", proxy.admin_addr), &[]).await.json();
    list.as_array().unwrap().iter().find(|t| t["id"] == tenant).unwrap()["usage"]["daily_used"].as_u64().unwrap()
}

fn abandoned(proxy: &Running, tenant: &str) -> u64 {
    proxy.shared.metrics.bureau_calls_abandoned_total.with_label_values(&[tenant]).get()
}

/// Starts a request in a task and waits until the bureau is working on it.
async fn at_the_bureau(mock: &MockHandle, url: String, key: &'static str) -> tokio::task::JoinHandle<Resp> {
    let before = mock.bureau.stats().calls_total;
    let task = tokio::spawn(async move { get(&url, &[("x-api-key", key)]).await });
    let bureau = mock.bureau.clone();
    wait_until("the call at the bureau", || bureau.stats().calls_total > before).await;
    task
}

/// The client goes away: its connection is closed.
async fn give_up(task: tokio::task::JoinHandle<Resp>, proxy: &Running) {
    task.abort();
    let _ = task.await;
    let shared = proxy.shared.clone();
    wait_until("the request gone from the proxy", || shared.metrics.requests_in_flight.get() == 0).await;
}

#[tokio::test]
async fn abandoned_call_keeps_its_slot_and_charge_until_the_bureau_answers() {
    let (mock, proxy) = env(bureau(2000), "").await;
    let first = at_the_bureau(&mock, score(&proxy, "S-1"), KEY_A).await;
    give_up(first, &proxy).await;

    // The bureau is still working on it: the slot and the charge stay.
    assert_eq!(proxy.shared.scheduler.in_flight(), 1, "the budget still counts the abandoned call");
    assert_eq!(daily_used(&proxy, "a").await, 1, "charged: the bureau does the work");

    // Another bank's request waits for the slot instead of going in on top.
    let url = score(&proxy, "S-2");
    let second = tokio::spawn(async move { get(&url, &[("x-api-key", KEY_B)]).await });
    let sched = proxy.shared.scheduler.clone();
    wait_until("the second request queued", || sched.queued_total() == 1).await;
    assert_eq!(second.await.unwrap().status, 200);

    let stats = mock.bureau.stats();
    assert_eq!(stats.max_in_flight, 1, "the bureau never held more than the budget");
    assert_eq!(stats.calls_ok, 2);
    assert_eq!(abandoned(&proxy, "a"), 1);
    assert_eq!(abandoned(&proxy, "b"), 0);
    assert_eq!(daily_used(&proxy, "a").await, 1);
}

#[tokio::test]
async fn response_timeout_answers_504_but_the_slot_stays_until_the_bureau_answers() {
    let (mock, proxy) = env(bureau(700), "response_timeout = \"150ms\"").await;
    let r = get(&score(&proxy, "S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (504, Some("bureau_timeout")));
    assert_eq!(proxy.shared.scheduler.in_flight(), 1, "the bureau is still working on the call");

    // The next call waits for the first to end, then is fast.
    mock.bureau.set_service_time(Duration::ZERO);
    let r = get(&score(&proxy, "S-2"), &[("x-api-key", KEY_B)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.bureau.stats().max_in_flight, 1);
    let shared = proxy.shared.clone();
    wait_until("the first call recorded as abandoned", || abandoned(&proxy, "a") == 1).await;
    assert_eq!(shared.metrics.bureau_calls_cut_total.get(), 0, "it ended by answering, not by the hard bound");
}

#[tokio::test]
async fn max_call_time_cuts_a_hung_call_and_frees_its_slot() {
    let (_mock, proxy) = env(bureau(10_000), "response_timeout = \"100ms\"\nmax_call_time = \"300ms\"").await;
    let r = get(&score(&proxy, "S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 504);
    let shared = proxy.shared.clone();
    wait_until("the call cut", || shared.metrics.bureau_calls_cut_total.get() == 1).await;
    wait_until("its slot freed", || shared.scheduler.in_flight() == 0).await;
    assert_eq!(daily_used(&proxy, "a").await, 1, "the bureau received it: charged");
}

#[tokio::test]
async fn queued_request_whose_client_leaves_costs_nothing_and_never_reaches_the_bureau() {
    let (mock, proxy) = env(bureau(2000), "").await;
    let holder = at_the_bureau(&mock, score(&proxy, "S-1"), KEY_B).await;
    let url = score(&proxy, "S-2");
    let queued = tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await });
    let sched = proxy.shared.scheduler.clone();
    wait_until("a's request queued", || sched.queued_total() == 1).await;
    assert_eq!(daily_used(&proxy, "a").await, 1, "reserved while queued");
    queued.abort();
    let _ = queued.await;
    wait_until("a's request out of the queue", || sched.queued_total() == 0).await;
    assert_eq!(daily_used(&proxy, "a").await, 0, "refunded: no call was made");
    assert_eq!(holder.await.unwrap().status, 200);
    let stats = mock.bureau.stats();
    assert_eq!(stats.calls_by_tenant.get("a"), None, "a's call never reached the bureau");
    assert_eq!(abandoned(&proxy, "a"), 0);
}

#[tokio::test]
async fn coalesced_flight_whose_waiters_all_leave_while_queued_is_never_sent() {
    let (mock, proxy) = env(bureau(2000), "").await;
    let holder = at_the_bureau(&mock, score(&proxy, "S-1"), KEY_B).await;
    let p = format!("http://{}/v1/credit-report", proxy.addr);
    let leader = tokio::spawn(async move {
        let body = br#"{"subject_id":"S-9","report_type":"full"}"#;
        send(&client(), http::Method::POST, &p, &[("x-api-key", KEY_A)], body).await
    });
    let shared = proxy.shared.clone();
    wait_until("the flight queued", || shared.scheduler.queued_total() == 1).await;
    assert_eq!(shared.coalescer.in_flight(), 1);
    leader.abort();
    let _ = leader.await;
    wait_until("the flight gone", || shared.coalescer.in_flight() == 0 && shared.scheduler.queued_total() == 0).await;
    assert_eq!(daily_used(&proxy, "a").await, 0, "nothing charged");
    assert_eq!(holder.await.unwrap().status, 200);
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("a"), None, "the flight never reached the bureau");
}

#[tokio::test]
async fn abandoned_coalesced_call_still_answers_followers_and_fills_the_cache() {
    let (mock, proxy) = env(bureau(2000), "").await;
    let p = format!("http://{}/v1/credit-report", proxy.addr);
    let post = |p: String| async move {
        let body = br#"{"subject_id":"S-7","report_type":"full"}"#;
        send(&client(), http::Method::POST, &p, &[("x-api-key", KEY_A)], body).await
    };
    let leader = tokio::spawn(post(p.clone()));
    let bureau = mock.bureau.clone();
    wait_until("the call at the bureau", || bureau.stats().in_flight == 1).await;
    let follower = tokio::spawn(post(p.clone()));
    let shared = proxy.shared.clone();
    wait_until("the follower joined", || shared.metrics.requests_in_flight.get() == 2).await;
    give_up_one(leader).await;

    let r = follower.await.unwrap();
    assert_eq!((r.status.as_u16(), r.headers["x-cache"].to_str().unwrap()), (200, "COALESCED"));
    let r = report(&proxy, KEY_A, "S-7").await;
    assert_eq!((r.status.as_u16(), r.headers["x-cache"].to_str().unwrap()), (200, "HIT"));
    assert_eq!(abandoned(&proxy, "a"), 0, "the follower received the answer");

    // Alone, the leader's answer is cached all the same, and counted as abandoned.
    let leader = tokio::spawn(async move {
        let body = br#"{"subject_id":"S-8","report_type":"full"}"#;
        send(&client(), http::Method::POST, &p, &[("x-api-key", KEY_A)], body).await
    });
    wait_until("the call at the bureau", || bureau.stats().calls_total == 2).await;
    give_up(leader, &proxy).await;
    wait_until("the call ended, abandoned", || abandoned(&proxy, "a") == 1).await;
    let r = report(&proxy, KEY_A, "S-8").await;
    assert_eq!((r.status.as_u16(), r.headers["x-cache"].to_str().unwrap()), (200, "HIT"));
    assert_eq!(mock.bureau.stats().calls_total, 2);
    assert_eq!(daily_used(&proxy, "a").await, 2);
}

async fn give_up_one(task: tokio::task::JoinHandle<Resp>) {
    task.abort();
    let _ = task.await;
}

#[tokio::test]
async fn shutdown_waits_for_calls_whose_clients_have_gone() {
    let (mock, proxy) = env(bureau(700), "").await;
    let first = at_the_bureau(&mock, score(&proxy, "S-1"), KEY_A).await;
    give_up(first, &proxy).await;
    let shared = proxy.shared.clone();
    assert!(proxy.shutdown().await, "drained in time");
    assert_eq!(
        shared.metrics.bureau_calls_abandoned_total.with_label_values(&["a"]).get(),
        1,
        "shutdown returned only once the call had ended"
    );
    assert_eq!(mock.bureau.stats().calls_ok, 1);
    assert_eq!(shared.scheduler.in_flight(), 0);
}

#[tokio::test]
async fn breaker_opens_answers_fast_half_opens_and_closes() {
    // A bureau that is down: connections refused on a port nobody listens on.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = port.local_addr().unwrap();
    drop(port);
    let extra = "[upstream.breaker]\nfailures = 3\nopen_for = \"300ms\"\nprobes = 2";
    let proxy = start_proxy(&config(&format!("http://{addr}"), extra)).await;
    let metrics = &proxy.shared.metrics;
    for i in 0..3 {
        let r = get(&score(&proxy, &format!("S-{i}")), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.json()["error"], "bureau_unreachable");
    }
    assert_eq!((metrics.breaker_state.get(), metrics.breaker_opened_total.get()), (1, 1), "open");
    let r = get(&score(&proxy, "S-4"), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (503, Some("bureau_unavailable")));
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(daily_used(&proxy, "a").await, 0, "nothing charged");

    // The bureau comes back on the same address; after open_for, two probes close it.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _mock = bureau_sim::mock_bureau::start(fast_mock(), listener);
    let mut answers = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metrics.breaker_state.get() != 0 {
        assert!(std::time::Instant::now() < deadline, "the breaker never closed: {answers:?}");
        let r = get(&score(&proxy, "S-5"), &[("x-api-key", KEY_A)]).await;
        answers.push(r.status.as_u16());
        if r.status != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(answers.iter().all(|s| [200, 503].contains(s)), "only fast refusals, then answers: {answers:?}");
    assert_eq!(answers.iter().rev().take(2).collect::<Vec<_>>(), [&200, &200], "two probes answered");
    assert_eq!(metrics.breaker_opened_total.get(), 1);
}

fn refuse(mock: &MockHandle, status: u16, retry_after_s: u32) {
    let refusal = Refusal {
        status: http::StatusCode::from_u16(status).unwrap(),
        share: 1.0,
        retry_after_s: Some(retry_after_s),
        duration: None,
    };
    mock.bureau.set_refusal(Some(refusal)).expect("a valid refusal");
}

#[tokio::test]
async fn bureau_429_is_not_charged_and_holds_that_tenant_s_calls_for_its_retry_after() {
    let (mock, proxy) = env(bureau(0), "queue_timeout = \"500ms\"").await;
    refuse(&mock, 429, 3);
    let r = get(&score(&proxy, "S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (503, Some("bureau_busy")), "retryable");
    assert_eq!(r.headers["retry-after"], "3");
    assert_eq!(daily_used(&proxy, "a").await, 0, "refused by the bureau: not charged");

    // The bureau would answer now, but asked a for 3 s: a's request cannot wait that long, so it
    // is answered at once and the bureau sees nothing.
    mock.bureau.set_refusal(None).unwrap();
    let r = get(&score(&proxy, "S-2"), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (503, Some("bureau_busy")));
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&wait), "the rest of the hold: {wait}");
    assert_eq!(mock.bureau.stats().calls_total, 1, "no call of a's during its hold");
    assert_eq!(proxy.shared.metrics.sheds_total.with_label_values(&["a", "bureau_hold"]).get(), 1);
    assert_eq!(proxy.shared.metrics.bureau_holds_total.get(), 1);

    // A 429 is about the tenant that got it: another bank is not held.
    let r = get(&score(&proxy, "S-3"), &[("x-api-key", KEY_B)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(daily_used(&proxy, "a").await, 0);
    assert_eq!(daily_used(&proxy, "b").await, 1);
}

#[tokio::test]
async fn bureau_503s_to_two_tenants_hold_everyone_and_a_request_that_can_wait_is_sent_after() {
    let (mock, proxy) = env(bureau(0), "").await; // queue_timeout 5 s
    refuse(&mock, 503, 2);
    let idle = std::sync::atomic::AtomicU64::new(0);
    let r = get(&score(&proxy, "S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (503, Some("bureau_busy")));
    assert!(proxy.shared.breaker.held(&idle, tokio::time::Instant::now()).is_none(), "one tenant's 503: its own hold");
    let r = get(&score(&proxy, "S-2"), &[("x-api-key", KEY_B)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (503, Some("bureau_busy")));
    let until = proxy.shared.breaker.held(&idle, tokio::time::Instant::now()).expect("a second tenant: everyone held");
    mock.bureau.set_refusal(None).unwrap();
    let r = get(&score(&proxy, "S-3"), &[("x-api-key", KEY_B)]).await;
    assert_eq!(r.status, 200);
    assert!(tokio::time::Instant::now() >= until, "sent only once the hold had ended");
    let stats = mock.bureau.stats();
    assert_eq!((stats.calls_total, stats.served_by_tenant.get("b").copied()), (3, Some(1)));
    assert_eq!(daily_used(&proxy, "a").await, 0, "refused calls are not charged");
    assert_eq!(daily_used(&proxy, "b").await, 1);
}

#[tokio::test]
async fn one_tenant_cannot_pin_every_slot_with_calls_the_bureau_hangs_on() {
    // Budget 2: a's look-ups hang; after response_timeout they keep their slots (the bureau is
    // working), but a may hold at most half the budget that way; b is still served.
    let (mock, proxy) = env(bureau(3000), "max_concurrency = 2\nresponse_timeout = \"100ms\"").await;
    let r = get(&score(&proxy, "S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 504);
    let r = get(&score(&proxy, "S-2"), &[("x-api-key", KEY_A)]).await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (503, Some("bureau_busy")), "a holds half already");
    assert_eq!(proxy.shared.metrics.sheds_total.with_label_values(&["a", "overdue"]).get(), 1);
    mock.bureau.set_service_time(Duration::ZERO);
    let r = get(&score(&proxy, "S-3"), &[("x-api-key", KEY_B)]).await;
    assert_eq!(r.status, 200, "b gets the other slot");
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("a"), Some(&1));
}

#[tokio::test]
async fn a_coalesced_look_up_retried_after_its_504_joins_the_call_still_at_the_bureau() {
    let (mock, proxy) = env(bureau(1500), "response_timeout = \"200ms\"").await;
    let r = report(&proxy, KEY_A, "S-5").await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (504, Some("bureau_timeout")));
    // The client retries at once: it joins the call the bureau is still working on.
    let task = tokio::spawn({
        let url = format!("http://{}/v1/credit-report", proxy.addr);
        async move {
            let body = br#"{"subject_id":"S-5","report_type":"full"}"#;
            send(&client(), http::Method::POST, &url, &[("x-api-key", KEY_A)], body).await
        }
    });
    let _ = task.await;
    let stats = mock.bureau.stats();
    assert_eq!(stats.calls_total, 1, "one call at the bureau, not two");
    assert_eq!(daily_used(&proxy, "a").await, 1, "charged once");
}

#[tokio::test]
async fn a_held_tenant_gives_its_slot_back_instead_of_sleeping_on_it() {
    // Budget 1. a gets a 429 asking for 3 s; a's next request, already queued behind b's call,
    // must not take the slot and sleep on it while b's next request waits.
    let (mock, proxy) = env(bureau(300), "").await;
    refuse(&mock, 429, 3);
    let r = get(&score(&proxy, "S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 503);
    mock.bureau.set_refusal(None).unwrap();
    let b_first = at_the_bureau(&mock, score(&proxy, "S-2"), KEY_B).await;
    let url = score(&proxy, "S-3");
    let a_next = tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await });
    let url = score(&proxy, "S-4");
    let b_next = tokio::spawn(async move { get(&url, &[("x-api-key", KEY_B)]).await });
    assert_eq!(b_first.await.unwrap().status, 200);
    let b_next = b_next.await.unwrap();
    assert_eq!(b_next.status, 200);
    let idle = std::sync::atomic::AtomicU64::new(0);
    let a_state = proxy.shared.states.get_or_create("a");
    assert!(
        proxy.shared.breaker.held(&a_state.bureau_hold, tokio::time::Instant::now()).is_some(),
        "b's second call was served while a was still held"
    );
    assert!(proxy.shared.breaker.held(&idle, tokio::time::Instant::now()).is_none());
    assert_eq!(a_next.await.unwrap().status, 200, "a's request went once its hold was over");
}

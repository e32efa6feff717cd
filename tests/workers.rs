//! Worker threads (`server.workers`, issue 16): each accepts on its own socket of one
//! `SO_REUSEPORT` group and serves its connections, their bureau calls and what outlives them on
//! a runtime of its own; `0` keeps one shared runtime. Both must serve, and both must keep the
//! bureau-budget guarantee at shutdown: a call whose client has gone runs to its end.

mod common;

use std::time::Duration;

use bureau_sim::mock_bureau::MockConfig;
use common::*;
use tokio::net::TcpStream;

fn slow_bureau(service_ms: u64) -> MockConfig {
    MockConfig { service_time: Duration::from_millis(service_ms), jitter: Duration::ZERO, ..MockConfig::default() }
}

/// The per-worker connection gauges, as `(worker, open)`, from `/metrics`.
fn per_worker(env: &Env) -> Vec<(usize, i64)> {
    let text = String::from_utf8(env.proxy.shared.metrics.encode()).unwrap();
    let mut out: Vec<(usize, i64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("bureau_guard_worker_connections{worker=\""))
        .filter_map(|rest| {
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test]
async fn connections_spread_over_the_worker_threads() {
    let env = Env::new(fast_mock(), "workers = 4", "").await;
    // Every worker's series exists from the start, at zero.
    assert_eq!(per_worker(&env), [(1, 0), (2, 0), (3, 0), (4, 0)]);
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(TcpStream::connect(env.proxy.addr).await.unwrap());
    }
    let open = |env: &Env| per_worker(env).iter().map(|(_, n)| n).sum::<i64>();
    wait_until("32 connections admitted", || open(&env) == 32).await;
    let busy = per_worker(&env).iter().filter(|(_, n)| *n > 0).count();
    // The kernel hashes each connection to one of the four sockets: all 32 on one has a chance
    // of 4 × 4^-32.
    assert!(busy >= 2, "the connections were not spread: {:?}", per_worker(&env));
    assert_eq!(get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await.status, 200);
    drop(held);
    wait_until("every connection closed", || open(&env) == 0).await;
}

/// A request reaches a bureau that takes 700 ms, its client leaves, the proxy shuts down: the
/// shutdown returns only after the bureau answered, and the call is counted as abandoned.
async fn shutdown_waits_for_an_abandoned_call(workers: &str) {
    let env = Env::new(slow_bureau(700), workers, "").await;
    let url = env.url("/v1/score/S-1");
    let request = tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await });
    let bureau = env.mock.bureau.clone();
    wait_until("the call at the bureau", || bureau.stats().calls_total == 1).await;
    request.abort();
    let _ = request.await;
    let shared = env.proxy.shared.clone();
    wait_until("the request gone from the proxy", || shared.metrics.requests_in_flight.get() == 0).await;
    assert_eq!(env.mock.bureau.stats().calls_ok, 0, "the bureau is still working on it");
    assert!(env.proxy.shutdown().await, "drained in time");
    assert_eq!(shared.metrics.bureau_calls_abandoned_total.with_label_values(&["a"]).get(), 1);
    assert_eq!(env.mock.bureau.stats().calls_ok, 1, "the call ran to its end");
    assert_eq!(shared.scheduler.in_flight(), 0);
}

#[tokio::test]
async fn on_worker_threads_shutdown_waits_for_calls_whose_clients_have_gone() {
    shutdown_waits_for_an_abandoned_call("workers = 3").await;
}

#[tokio::test]
async fn on_the_shared_runtime_shutdown_waits_for_calls_whose_clients_have_gone() {
    shutdown_waits_for_an_abandoned_call("workers = 0").await;
}

#[tokio::test]
async fn the_shared_runtime_has_no_worker_series() {
    let env = Env::new(fast_mock(), "workers = 0", "").await;
    assert_eq!(get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await.status, 200);
    assert_eq!(per_worker(&env), []);
}

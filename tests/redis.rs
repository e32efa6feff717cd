//! `state.backend = "redis"`: several replicas, one contract, against a real `redis-server`.
//!
//! Each test starts its own Redis on an ephemeral port when `redis-server` is on PATH, and is
//! skipped (with a line on stderr) when it is not — unless `BUREAU_GUARD_REQUIRE_REDIS` is set,
//! as `.ci/run` does, which turns a missing Redis into a failure.
//!
//! One file of about 1,200 lines: every test here shares the fixtures that start and stop
//! `redis-server` (single, TLS, a 3-node cluster) and the replica processes; split, those
//! fixtures would move to `common/` for this file alone.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bureau_guard::app;
use common::*;

/// A `redis-server` of the test's own on a Unix socket in its own directory (no TCP port that
/// a parallel test could take), with an append-only file so a restart keeps its data.
struct RedisServer {
    child: Option<Child>,
    dir: PathBuf,
}

/// Whether the Redis tests can run here (false: skip them), failing when
/// `BUREAU_GUARD_REQUIRE_REDIS` is set and `redis-server` is missing.
fn redis_available() -> bool {
    if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("BUREAU_GUARD_REQUIRE_REDIS").is_none(),
        "BUREAU_GUARD_REQUIRE_REDIS is set but redis-server is not on PATH (apt-get install redis-server)"
    );
    eprintln!("skipped: redis-server is not on PATH");
    false
}

impl RedisServer {
    fn start(name: &str) -> Option<RedisServer> {
        if !redis_available() {
            return None;
        }
        let mut r = RedisServer { child: None, dir: temp_dir(name) };
        r.launch();
        Some(r)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket", self.socket().to_str().unwrap(), "--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a Redis that hangs (a network partition, a stuck server) rather than
    /// refusing connections.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// One command through `redis-cli`; its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-s", self.socket().to_str().unwrap()]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    }
}

/// Starts `redis-server` with `args(port)` on a free TCP port (cluster nodes, TLS), trying
/// another port if a parallel test took the one picked: it is ours once `redis-cli` (with
/// `cli` options) finds our directory in its config.
fn start_tcp_redis(dir: &Path, args: impl Fn(u16) -> Vec<String>, cli: &[String]) -> (Proc, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut proc = Proc(
            Command::new("redis-server")
                .args(args(port))
                .args(["--save", "", "--dir", dir.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if proc.0.try_wait().unwrap().is_some() {
                break; // could not bind: another port
            }
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(cli)
                .args(["CONFIG", "GET", "dir"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if out.contains(dir.to_str().unwrap()) {
                return (proc, port);
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("no free port for redis-server after 5 tries");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `[state]` for Redis with fast heartbeats, plus `extra` lines in `[state.redis]`.
fn redis_state(url: &str, extra: &str) -> String {
    format!(
        "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"{url}\"\nheartbeat_interval = \"100ms\"\nlease_ttl = \"1s\"\ntimeout = \"50ms\"\n{extra}\n"
    )
}

/// A replica's config file (ports 0: the process picks its own), returning its path.
fn replica_config(dir: &Path, n: usize, text: &str) -> PathBuf {
    let path = dir.join(format!("replica-{n}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn status(url: &str, key: &str) -> u16 {
    get(url, &[("x-api-key", key)]).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_tenants_rate_and_daily_quota() {
    let Some(redis) = RedisServer::start("redis-three") else { return };
    let mock = start_mock(fast_mock()).await;
    let dir = temp_dir("redis-three-cfg");
    let (rate, burst, daily) = (60.0, 6u32, 150u64);
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), ""),
            tenant_a: &format!("rate = {rate}\nburst = {burst}"),
            tenant_b: &format!("daily_quota = {daily}"),
            ..Extras::default()
        },
    );
    let replicas: Vec<_> = (0..3).map(|n| spawn_serving(&replica_config(&dir, n, &text))).collect();
    for (_, _, admin) in &replicas {
        wait_healthy(admin).await;
    }
    // All three counted each other in: each takes a third of the bureau budget (64 → 22/21/21).
    let deadline = Instant::now() + Duration::from_secs(5);
    for (_, _, admin) in &replicas {
        loop {
            let m = get(&format!("http://{admin}/metrics"), &[]).await.text();
            if metric_value(&m, "bureau_guard_replicas") == Some(3.0) {
                let limit = metric_value(&m, "bureau_guard_bureau_concurrency_limit").unwrap();
                assert!((21.0..=22.0).contains(&limit), "a third of 64, got {limit}");
                break;
            }
            assert!(Instant::now() < deadline, "replicas did not see each other");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Tenant a: each replica is offered the whole contracted rate (3x in total) for 4 s.
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (_, addr, _) in &replicas {
        let (addr, admitted) = (addr.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut i = 0;
            while started.elapsed() < Duration::from_secs(4) {
                pace.tick().await;
                let url = format!("http://{addr}/v1/score/S-{i}");
                i += 1;
                match status(&url, KEY_A).await {
                    200 => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {}
                    other => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = f64::from(burst) + rate * elapsed;
    let got = admitted.load(Ordering::Relaxed) as f64;
    eprintln!("rate: admitted {got} in {elapsed:.2} s across 3 replicas; contract {expected:.1}");
    assert!(
        (got - expected).abs() / expected <= 0.05,
        "admitted {got} across 3 replicas, contract allows {expected:.0}"
    );

    // Tenant b: 150 look-ups a day in all, asked for 240 times round-robin.
    let mut ok = 0;
    for i in 0..240 {
        let (_, addr, _) = &replicas[i % 3];
        match status(&format!("http://{addr}/v1/score/D-{i}"), KEY_B).await {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    eprintln!("daily quota: {ok} of {daily} served across 3 replicas");
    assert!(ok <= daily, "{ok} look-ups passed a daily quota of {daily}");
    assert!(ok as f64 >= daily as f64 * 0.95, "only {ok} of a daily quota of {daily} were usable");
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("b").copied().unwrap_or(0), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_releases_its_in_flight_slots_when_its_lease_expires() {
    let Some(redis) = RedisServer::start("redis-kill") else { return };
    let mock = start_mock(fast_mock()).await;
    mock.bureau.set_service_time(Duration::from_secs(30));
    let dir = temp_dir("redis-kill-cfg");
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), ""),
            server: "request_timeout = \"60s\"",
            upstream: "response_timeout = \"60s\"",
            tenant_a: "max_in_flight = 3",
            ..Extras::default()
        },
    );
    let (mut doomed, addr1, admin1) = spawn_serving(&replica_config(&dir, 1, &text));
    let (_survivor, addr2, admin2) = spawn_serving(&replica_config(&dir, 2, &text));
    wait_healthy(&admin1).await;
    wait_healthy(&admin2).await;

    // Three slow look-ups fill the tenant's in-flight limit through replica 1.
    let mut hanging = Vec::new();
    for i in 0..3 {
        let url = format!("http://{addr1}/v1/score/K-{i}");
        hanging.push(tokio::spawn(async move { status(&url, KEY_A).await }));
    }
    wait_until_async("3 look-ups at the bureau", || async { mock.bureau.stats().in_flight == 3 }).await;
    // Replica 2 sees the limit held by replica 1.
    let r = get(&format!("http://{addr2}/v1/score/K-x"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "too_many_in_flight");

    // kill -9: replica 1 cannot give its slots back; they must expire with its lease.
    mock.bureau.set_service_time(Duration::ZERO);
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    let killed = Instant::now();
    // Its last renewal, as Redis holds it: `held:expiry_ms` (Redis's clock) per replica.
    let key = redis.cli(&["--scan", "--pattern", "*:a}:inflight"]);
    let slots = redis.cli(&["HGETALL", key.trim()]);
    let dead_expiry: u64 = slots
        .lines()
        .find_map(|l| l.strip_prefix("3:"))
        .unwrap_or_else(|| panic!("replica 1's 3 slots in {slots:?}"))
        .parse()
        .unwrap();
    let redis_now_ms = || {
        let t: Vec<u64> = redis.cli(&["TIME"]).lines().map(|l| l.parse().unwrap()).collect();
        t[0] * 1000 + t[1] / 1000
    };
    let url = format!("http://{addr2}/v1/score/K-y");
    let mut refused = 0;
    loop {
        let asked_at = redis_now_ms();
        match status(&url, KEY_A).await {
            200 => {
                // Admitted only once the dead replica's lease had run out (never on a guess).
                assert!(
                    redis_now_ms() >= dead_expiry,
                    "admitted at {asked_at} before the lease expired at {dead_expiry}"
                );
                break;
            }
            429 => {
                refused += 1;
                assert!(redis_now_ms() < dead_expiry + 1000, "still refused 1 s after the lease expired");
            }
            other => panic!("unexpected status {other}"),
        }
        assert!(killed.elapsed() < Duration::from_secs(5), "the dead replica's slots never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "in-flight slots of the killed replica freed after {:?} ({refused} refusals meanwhile)",
        killed.elapsed()
    );
    for h in hanging {
        let _ = h.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_open_then_recovery_adds_outage_units_once() {
    let Some(mut redis) = RedisServer::start("redis-outage") else { return };
    let mock = start_mock(fast_mock()).await;
    // One unit per request (lease = 0), so Redis's count is exactly the look-ups charged.
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), "lease = \"0s\"\non_unavailable = \"fail_open\""),
            tenant_a: "daily_quota = 1000",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/O-{i}", proxy.addr);
    for i in 0..5 {
        assert_eq!(status(&url(i), KEY_A).await, 200);
    }
    let day_key = || {
        let keys = redis.cli(&["--scan", "--pattern", "*:a}:daily:*"]);
        keys.lines().next().map(str::to_string).expect("a daily key for tenant a")
    };
    let key = day_key();
    assert_eq!(redis.cli(&["GET", &key]), "5");

    redis.stop();
    // fail_open: look-ups go on under this replica's share, counted locally.
    for i in 5..12 {
        assert_eq!(status(&url(i), KEY_A).await, 200, "fail_open serves while Redis is down");
    }
    let metrics = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&metrics, "bureau_guard_state_redis_up"), Some(0.0));
    assert!(metric_value(&metrics, "bureau_guard_state_fallback_decisions_total{limit=\"daily\"}").unwrap() >= 7.0);

    redis.launch();
    // Recovery: the 7 outage units are added to the 5 Redis kept, once.
    wait_until_async("outage units synced", || async { redis.cli(&["GET", &key]) == "12" }).await;
    let metrics = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&metrics, "bureau_guard_state_redis_up"), Some(1.0));
    // More heartbeats pass; nothing is added twice.
    let synced_at = metric_value(&metrics, "bureau_guard_state_redis_calls_total{op=\"heartbeat\"}").unwrap();
    wait_until_async("three more heartbeats", || async {
        let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
        metric_value(&m, "bureau_guard_state_redis_calls_total{op=\"heartbeat\"}").unwrap() >= synced_at + 3.0
    })
    .await;
    assert_eq!(redis.cli(&["GET", &key]), "12");
    assert_eq!(status(&url(99), KEY_A).await, 200);
    assert_eq!(redis.cli(&["GET", &key]), "13", "shared counting resumed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_a_request_at_most_the_budget() {
    let Some(redis) = RedisServer::start("redis-hung") else { return };
    let mock = start_mock(fast_mock()).await;
    // Budget 200 ms; Redis calls themselves time out only after 1 s.
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), "lease = \"0s\"").replace("timeout = \"50ms\"", "timeout = \"200ms\""),
            tenant_a: "rate = 1000\ndaily_quota = 1000\nmonthly_quota = 10000",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/H-{i}", proxy.addr);
    assert_eq!(status(&url(0), KEY_A).await, 200);
    redis.signal("-STOP");
    let started = Instant::now();
    assert_eq!(status(&url(1), KEY_A).await, 200, "fail_open: decided locally");
    let waited = started.elapsed();
    redis.signal("-CONT");
    // Not a speed measurement: three limits (rate, daily, monthly) share one 200 ms budget, so
    // the request waits about 200 ms, not 600 ms (a budget per limit) nor the 1 s a Redis call
    // may take; the bound leaves room for a slow machine.
    assert!(waited < Duration::from_millis(400), "a request waited {waited:?} for a hung Redis");
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert!(metric_value(&m, "bureau_guard_state_redis_budget_exceeded_total").unwrap() >= 1.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_closed_refuses_with_503() {
    let Some(mut redis) = RedisServer::start("redis-closed") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), "on_unavailable = \"fail_closed\""),
            tenant_a: "rate = 100\ndaily_quota = 1000",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = format!("http://{}/v1/score/C-1", proxy.addr);
    assert_eq!(status(&url, KEY_A).await, 200);
    redis.stop();
    // Whatever the replica still holds is spent first; then every request is refused.
    let mut last = get(&url, &[("x-api-key", KEY_A)]).await;
    for _ in 0..500 {
        if last.status == 503 {
            break;
        }
        last = get(&url, &[("x-api-key", KEY_A)]).await;
    }
    assert_eq!(last.status, 503);
    assert_eq!(last.json()["error"], "state_unavailable");
    assert!(last.headers.contains_key("retry-after"));
    // A tenant without shared limits is not affected.
    assert_eq!(status(&url, KEY_B).await, 200);
    redis.launch();
    wait_until_async("served again once Redis is back", || async { status(&url, KEY_A).await == 200 }).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_down_takes_only_its_share_of_the_expected_fleet() {
    let Some(mut redis) = RedisServer::start("redis-expected") else { return };
    redis.stop();
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), "expected_replicas = 4"),
            upstream: "max_concurrency = 64",
            tenant_a: "daily_quota = 20",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let metrics = || async { get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text() };
    let m = metrics().await;
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(0.0));
    assert_eq!(metric_value(&m, "bureau_guard_replicas"), Some(4.0));
    assert_eq!(metric_value(&m, "bureau_guard_bureau_concurrency_limit"), Some(16.0), "a quarter of 64");
    // fail_open, no use known: a quarter of the daily quota, not all of it.
    let mut ok = 0;
    for i in 0..30 {
        match status(&format!("http://{}/v1/score/E-{i}", proxy.addr), KEY_A).await {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 5, "a quarter of 20");
    // Redis answers: the live count (this replica alone) replaces the assumption, and the
    // outage's 5 units are added to the shared count.
    redis.launch();
    wait_until_async("the first heartbeat", || async {
        metric_value(&metrics().await, "bureau_guard_bureau_concurrency_limit") == Some(64.0)
    })
    .await;
    wait_until_async("the outage units synced", || async {
        let key = redis.cli(&["--scan", "--pattern", "*:a}:daily:*"]);
        !key.trim().is_empty() && redis.cli(&["GET", key.trim()]).trim() == "5"
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_in_one_tenants_key_is_no_outage_for_the_others() {
    let Some(redis) = RedisServer::start("redis-wrongtype") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), "on_unavailable = \"fail_closed\""),
            tenant_a: "rate = 1000\nburst = 2",
            tenant_b: "rate = 1000\nburst = 2",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/T-{i}", proxy.addr);
    assert_eq!(status(&url(0), KEY_A).await, 200);
    assert_eq!(status(&url(1), KEY_B).await, 200);
    // Someone overwrites tenant a's GCRA key with a value of another type: every rate script on
    // it now fails with WRONGTYPE. (Tokens a holds already are spent first.)
    let key = redis.cli(&["--scan", "--pattern", "*:a}:rate"]);
    redis.cli(&["DEL", key.trim()]);
    redis.cli(&["HSET", key.trim(), "not", "a-number"]);
    let mut last = 200;
    for i in 0..50 {
        last = status(&url(100 + i), KEY_A).await;
        if last == 503 {
            break;
        }
    }
    assert_eq!(last, 503, "tenant a is decided by fail_closed");
    // Redis itself is fine: tenant b goes on through it, and nobody calls it an outage.
    for i in 0..20 {
        assert_eq!(status(&url(200 + i), KEY_B).await, 200);
    }
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(1.0));
    assert!(metric_value(&m, "bureau_guard_state_redis_errors_total{op=\"rate_lease\"}").unwrap() >= 1.0);
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_budget_exceeded_total"), Some(0.0), "nobody spun on it");
    // The key repaired, tenant a is served through Redis again (after the 1 s hold).
    redis.cli(&["DEL", key.trim()]);
    wait_until_async("tenant a served again", || async { status(&url(300), KEY_A).await == 200 }).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_proxy_restart() {
    let Some(redis) = RedisServer::start("redis-restart") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), tenant_a: "daily_quota = 7", ..Extras::default() },
    );
    let first = app::start(parse(&text)).await.unwrap();
    for i in 0..5 {
        assert_eq!(status(&format!("http://{}/v1/score/R-{i}", first.addr), KEY_A).await, 200);
    }
    // A clean shutdown gives back the units leased but not spent.
    first.shutdown().await;

    let second = app::start(parse(&text)).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/R2-{i}", second.addr);
    assert_eq!(status(&url(0), KEY_A).await, 200);
    assert_eq!(status(&url(1), KEY_A).await, 200);
    let r = get(&url(2), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429, "5 before the restart + 2 after = the quota of 7");
    assert_eq!(r.json()["error"], "daily_quota_exhausted");
    let tenants = get(&format!("http://{}/admin/tenants", second.admin_addr), &[]).await.json();
    let a = tenants.as_array().unwrap().iter().find(|t| t["id"] == "a").unwrap();
    assert_eq!(a["usage"]["daily_used"], 7);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bureau_budget_is_split_among_live_replicas() {
    let Some(redis) = RedisServer::start("redis-budget") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), upstream: "max_concurrency = 9", ..Extras::default() },
    );
    let one = app::start(parse(&text)).await.unwrap();
    assert_eq!(one.shared.scheduler.limit(), 9, "alone: the whole budget");
    let two = app::start(parse(&text)).await.unwrap();
    wait_until("both see two replicas", || {
        one.shared.scheduler.limit() + two.shared.scheduler.limit() == 9
            && one.shared.scheduler.limit() >= 4
            && two.shared.scheduler.limit() >= 4
    })
    .await;
    // A replica that leaves (clean shutdown) is counted out at once; its budget goes back.
    two.shutdown().await;
    wait_until("the remaining replica takes the whole budget", || one.shared.scheduler.limit() == 9).await;
    one.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reset_starts_the_shared_count_over() {
    let Some(redis) = RedisServer::start("redis-reset") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), tenant_a: "daily_quota = 3", ..Extras::default() },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/Z-{i}", proxy.addr);
    for i in 0..3 {
        assert_eq!(status(&url(i), KEY_A).await, 200);
    }
    assert_eq!(status(&url(3), KEY_A).await, 429);
    let c = client();
    let r = send(&c, http::Method::POST, &format!("http://{}/admin/tenants/a/reset", proxy.admin_addr), &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reset"]["daily_was"], 3);
    assert_eq!(status(&url(4), KEY_A).await, 200, "the quota starts over after a reset");
    proxy.shutdown().await;
}

/// Polls an async condition every 20 ms, up to 10 s.
async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three masters on ephemeral ports, slots spread over them by `redis-cli --cluster create`.
struct RedisCluster {
    nodes: Vec<Proc>,
    ports: Vec<u16>,
}

impl RedisCluster {
    fn start(name: &str) -> Option<RedisCluster> {
        if !redis_available() {
            return None;
        }
        let (mut nodes, mut ports) = (Vec::new(), Vec::new());
        for n in 0..3 {
            let dir = temp_dir(&format!("{name}-{n}"));
            // The cluster bus listens on port + 10000; a node that cannot bind it exits and
            // start_tcp_redis tries another port.
            let (node, port) = start_tcp_redis(
                &dir,
                |port| {
                    ["--bind", "127.0.0.1", "--port", &port.to_string(), "--appendonly", "no"]
                        .into_iter()
                        .chain(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                        .map(String::from)
                        .collect()
                },
                &[],
            );
            nodes.push(node);
            ports.push(port);
        }
        let cluster = RedisCluster { nodes, ports };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        assert!(created.success(), "cluster create failed");
        for port in &cluster.ports {
            while !cluster.cli(*port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline + Duration::from_secs(10), "cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(cluster)
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-c", "-p", &port.to_string()]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    }

    /// The port of the node that serves `key`'s slot: the only one that answers without MOVED.
    fn owner(&self, key: &str) -> u16 {
        let answers_locally = |port: &u16| {
            let out = Command::new("redis-cli").args(["-p", &port.to_string(), "EXISTS", key]).output().unwrap();
            !String::from_utf8_lossy(&out.stdout).contains("MOVED")
        };
        *self.ports.iter().find(|p| answers_locally(p)).expect("some node owns every slot")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_redis_cluster_with_each_tenant_in_its_own_hash_slot() {
    let Some(cluster) = RedisCluster::start("redis-cluster") else { return };
    assert_eq!(cluster.nodes.len(), 3);
    let mock = start_mock(fast_mock()).await;
    let seed = format!("redis://127.0.0.1:{}", cluster.ports[0]);
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&seed, "cluster = true\nkey_prefix = \"bg\""),
            tenant_a: "daily_quota = 4\nrate = 1000\nmax_in_flight = 10",
            tenant_b: "daily_quota = 6\nrate = 1000\nmax_in_flight = 10",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    // Tenants a and b hash to slots on different nodes here ({bg:a} and {bg:b}), so each
    // script must reach the node of its own tenant.
    assert_ne!(cluster.owner("{bg:a}"), cluster.owner("{bg:b}"), "the test wants two nodes");
    for (key, quota) in [(KEY_A, 4), (KEY_B, 6)] {
        for i in 0..quota {
            assert_eq!(status(&format!("http://{}/v1/score/C-{i}", proxy.addr), key).await, 200);
        }
        let r = get(&format!("http://{}/v1/score/C-x", proxy.addr), &[("x-api-key", key)]).await;
        assert_eq!(r.status, 429, "quota {quota} enforced through the cluster");
        assert_eq!(r.json()["error"], "daily_quota_exhausted");
    }
    let metrics = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&metrics, "bureau_guard_state_redis_up"), Some(1.0));
    assert_eq!(metric_value(&metrics, "bureau_guard_replicas"), Some(1.0));
    assert_eq!(metric_value(&metrics, "bureau_guard_state_redis_errors_total{op=\"quota_lease\"}"), Some(0.0));
    // Usage: one pipeline over keys in both tenants' slots, and a statement across them.
    assert!(proxy.shared.usage.ship(proxy.shared.redis.as_ref().unwrap()).await, "usage copied through the cluster");
    let served = mock.bureau.stats().served_by_tenant;
    assert_eq!(statement_calls(proxy.admin_addr).await, Ok(served));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_does_not_sit_on_in_flight_slots_others_need() {
    let Some(redis) = RedisServer::start("redis-idle") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), tenant_a: "max_in_flight = 1", ..Extras::default() },
    );
    let (one, two) = (app::start(parse(&text)).await.unwrap(), app::start(parse(&text)).await.unwrap());
    // One look-up through replica 1, finished: nothing is in flight anywhere now.
    assert_eq!(status(&format!("http://{}/v1/score/I-1", one.addr), KEY_A).await, 200);
    // Within a heartbeat or two replica 1 gives its slot back, and replica 2 can use it.
    let url = format!("http://{}/v1/score/I-2", two.addr);
    wait_until_async("replica 2 admitted", || async { status(&url, KEY_A).await == 200 }).await;
    assert_eq!(one.shared.states.get_or_create("a").leases().held.load(Ordering::Acquire), 0);
    one.shutdown().await;
    two.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_just_before_midnight_is_charged_to_the_new_day() {
    use bureau_guard::clock::{Clock, ManualClock, SystemClock};
    let Some(redis) = RedisServer::start("redis-midnight") else { return };
    let mock = start_mock(fast_mock()).await;
    // 23:59:59 in Seoul (quota.utc_offset defaults to +09:00) of the coming night: a date taken
    // from the real clock, because the quota keys expire (EXPIREAT) after the window plus a
    // grace on Redis's own clock, so a fixed date in the past would expire them at once.
    const SEOUL_S: i64 = 9 * 3600;
    let now_s = SystemClock.now_unix_s();
    let next_midnight_s = ((now_s + SEOUL_S) / 86_400 + 1) * 86_400 - SEOUL_S;
    let before_midnight_ms = (next_midnight_s - 1) * 1000;
    let clock = Arc::new(ManualClock::new(before_midnight_ms));
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), tenant_a: "daily_quota = 5", ..Extras::default() },
    );
    let proxy = app::start_with_clock(parse(&text), clock.clone()).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/M-{i}", proxy.addr);
    for i in 0..5 {
        assert_eq!(status(&url(i), KEY_A).await, 200);
    }
    assert_eq!(status(&url(5), KEY_A).await, 429, "the day's quota is used up");
    clock.set(before_midnight_ms + 1000); // midnight: a new day, a new quota
    assert_eq!(status(&url(6), KEY_A).await, 200);
    // A request that computed yesterday's window (here: the clock read just before midnight)
    // after the pool moved on is charged to the new day: no refill storm, no false 429.
    clock.set(before_midnight_ms);
    let m0 = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(status(&url(7), KEY_A).await, 200);
    let m1 = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    let leases = |m: &str| metric_value(m, "bureau_guard_state_redis_calls_total{op=\"quota_lease\"}").unwrap();
    assert!(leases(&m1) - leases(&m0) <= 1.0, "at most one lease for the late request");
    let days: Vec<String> = redis.cli(&["--scan", "--pattern", "*:a}:daily:*"]).lines().map(str::to_string).collect();
    assert_eq!(days.len(), 2, "{days:?}");
    let counts: Vec<u64> = days.iter().map(|k| redis.cli(&["GET", k]).parse().unwrap()).collect();
    assert!(counts.contains(&5), "yesterday stays at its quota: {counts:?}");
    proxy.shutdown().await;
}

#[test]
fn an_outage_sync_resent_with_its_token_counts_once() {
    let Some(redis) = RedisServer::start("redis-sync") else { return };
    let script = bureau_guard::state::redis::QUOTA_SYNC;
    let sync = || redis.cli(&["EVAL", script, "2", "{p:a}:daily:1", "{p:a}:sync:r1:7", "4", "4102444800", "86400"]);
    assert_eq!(sync(), "1\n4", "the first sync adds its units, and answers the total");
    assert_eq!(sync(), "0\n4", "the same batch resent (its answer was lost) adds nothing");
    assert_eq!(redis.cli(&["GET", "{p:a}:daily:1"]), "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_client_certificate() {
    use pki::{Ca, LeafSpec};
    if !redis_available() {
        return;
    }
    let dir = temp_dir("redis-tls");
    let ca = Ca::new("Redis CA");
    let server = ca.issue(&LeafSpec { cn: "redis", ip: true, ..LeafSpec::default() });
    let me = ca.issue(&LeafSpec { cn: "bureau-guard", ..LeafSpec::default() });
    let (server_cert, server_key) = server.write(&dir, "redis");
    let (my_cert, my_key) = me.write(&dir, "guard");
    let ca_file = pki::write(&dir, "ca.pem", &ca.pem);
    // TLS only, and client certificates required.
    let files = |cert: &Path, key: &Path| -> Vec<String> {
        ["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap(), "--cacert", &ca_file, "--tls"]
            .into_iter()
            .map(String::from)
            .collect()
    };
    let (_redis, port) = start_tcp_redis(
        &dir,
        |port| {
            ["--bind", "127.0.0.1", "--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "yes"]
                .into_iter()
                .map(String::from)
                .chain(["--tls-cert-file".into(), server_cert.display().to_string()])
                .chain(["--tls-key-file".into(), server_key.display().to_string()])
                .chain(["--tls-ca-cert-file".into(), ca_file.clone()])
                .collect()
        },
        &files(&my_cert, &my_key),
    );
    let mock = start_mock(fast_mock()).await;
    let url = format!("rediss://127.0.0.1:{port}");
    let tls =
        format!("ca = \"{ca_file}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"", my_cert.display(), my_key.display());
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&url, &tls), tenant_a: "daily_quota = 3", ..Extras::default() },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let addr = proxy.admin_addr;
    wait_until_async("the heartbeat over TLS", || async {
        let m = get(&format!("http://{addr}/metrics"), &[]).await.text();
        metric_value(&m, "bureau_guard_state_redis_calls_total{op=\"heartbeat\"}").unwrap() >= 1.0
            && metric_value(&m, "bureau_guard_state_redis_errors_total{op=\"heartbeat\"}") == Some(0.0)
    })
    .await;
    for i in 0..3 {
        assert_eq!(status(&format!("http://{}/v1/score/T-{i}", proxy.addr), KEY_A).await, 200);
    }
    let r = get(&format!("http://{}/v1/score/T-x", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429, "the quota is kept in Redis over TLS");
    let m = get(&format!("http://{addr}/metrics"), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(1.0));
    let expiry = "bureau_guard_tls_certificate_expiry_timestamp_seconds{cert=\"redis_client\"}";
    assert!(metric_value(&m, expiry).is_some(), "the Redis client certificate's expiry is exported: {m}");
    proxy.shutdown().await;

    // Without the client certificate, Redis refuses the handshake: Redis counts as down.
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&url, &format!("ca = \"{ca_file}\"")),
            tenant_a: "daily_quota = 3",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(0.0));
    proxy.shutdown().await;
}

/// A TCP `redis-server` that requires `password` (`requirepass`).
fn start_redis_with_password(name: &str, password: &str) -> Option<(Proc, u16)> {
    if !redis_available() {
        return None;
    }
    let dir = temp_dir(name);
    let auth = ["-a", password, "--no-auth-warning"].map(String::from);
    let args = |port: u16| -> Vec<String> {
        ["--bind", "127.0.0.1", "--port", &port.to_string(), "--appendonly", "no", "--requirepass", password]
            .into_iter()
            .map(String::from)
            .collect()
    };
    Some(start_tcp_redis(&dir, args, &auth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_is_an_outage_the_policy_decides_at_once() {
    const RIGHT: &str = "right-Pw-7f3a";
    const WRONG: &str = "wrong-Pw-c91e";
    let Some((_redis, port)) = start_redis_with_password("redis-wrongpw", RIGHT) else { return };
    let mock = start_mock(fast_mock()).await;
    let url = format!("redis://:{WRONG}@127.0.0.1:{port}");
    let limits = "rate = 1000\ndaily_quota = 1000\nmax_in_flight = 10";

    // fail_closed: refused at once, no request waits out its budget on a Redis that answers
    // every call with WRONGPASS/NOAUTH.
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&url, "on_unavailable = \"fail_closed\""),
            tenant_a: limits,
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    for i in 0..20 {
        let r = get(&format!("http://{}/v1/score/W-{i}", proxy.addr), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.status, 503, "fail_closed refuses while Redis refuses us");
        assert_eq!(r.json()["error"], "state_unavailable");
    }
    assert_eq!(status(&format!("http://{}/v1/score/W-b", proxy.addr), KEY_B).await, 200, "b has no shared limit");
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(0.0));
    assert_eq!(
        metric_value(&m, "bureau_guard_state_redis_budget_exceeded_total"),
        Some(0.0),
        "no request spun on Redis for its budget"
    );
    assert!(metric_value(&m, "bureau_guard_state_redis_errors_total{op=\"heartbeat\"}").unwrap() >= 1.0);
    assert!(
        metric_value(&m, "bureau_guard_state_redis_calls_total{op=\"rate_lease\"}").unwrap() <= 1.0,
        "no refill per request while Redis is known to refuse"
    );
    proxy.shutdown().await;

    // fail_open, as an operator runs it: served locally, logged once, the password nowhere.
    let dir = temp_dir("redis-wrongpw-cfg");
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&url, "on_unavailable = \"fail_open\""),
            tenant_a: limits,
            ..Extras::default()
        },
    );
    let config = replica_config(&dir, 1, &text);
    let (mut replica, addr, admin) = spawn_serving(&config);
    wait_healthy(&admin).await;
    for i in 0..20 {
        assert_eq!(status(&format!("http://{addr}/v1/score/W-{i}"), KEY_A).await, 200, "fail_open decides locally");
    }
    let m = get(&format!("http://{admin}/metrics"), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(0.0));
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_budget_exceeded_total"), Some(0.0));
    assert!(metric_value(&m, "bureau_guard_state_fallback_decisions_total{limit=\"daily\"}").unwrap() >= 20.0);
    let pid = replica.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while replica.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the replica did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log_file = config.with_extension("log");
    wait_until_async("the whole log", || async {
        std::fs::read_to_string(&log_file).unwrap_or_default().contains("drained; bye")
    })
    .await;
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(!log.contains(WRONG) && !log.contains(RIGHT), "a password in the log:\n{log}");
    let outage_errors = log.lines().filter(|l| l.contains("ERROR") && l.contains(" op=")).count();
    assert_eq!(outage_errors, 1, "one error line per outage, not one per call:\n{log}");
    assert!(log.contains("WRONGPASS") || log.contains("NOAUTH") || log.contains("uthentication"), "{log}");

    // `check` prints the config's summary without the password.
    let out = Command::new(BIN).args(["check", "--config", config.to_str().unwrap()]).output().unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{printed}");
    assert!(!printed.contains(WRONG), "{printed}");
    // The fix for the operator: the right password, which `check --diff` reports (a restart
    // is needed) without showing either.
    let fixed = replica_config(&dir, 2, &text.replace(WRONG, RIGHT));
    let out = Command::new(BIN)
        .args(["check", "--config", fixed.to_str().unwrap(), "--diff", config.to_str().unwrap()])
        .output()
        .unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("state.redis.url: ") && printed.contains("(needs a restart)"), "{printed}");
    assert!(!printed.contains(WRONG) && !printed.contains(RIGHT), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_redis_url_authenticates() {
    const RIGHT: &str = "right-Pw-5b20";
    let Some((_redis, port)) = start_redis_with_password("redis-rightpw", RIGHT) else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&format!("redis://:{RIGHT}@127.0.0.1:{port}"), ""),
            tenant_a: "daily_quota = 3",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    for i in 0..3 {
        assert_eq!(status(&format!("http://{}/v1/score/P-{i}", proxy.addr), KEY_A).await, 200);
    }
    let r = get(&format!("http://{}/v1/score/P-x", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429, "the quota is kept in the password-protected Redis");
    assert_eq!(r.json()["error"], "daily_quota_exhausted");
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(1.0));
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_errors_total{op=\"quota_lease\"}"), Some(0.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_with_a_fixed_id_adds_its_next_outage_too() {
    let Some(mut redis) = RedisServer::start("redis-fixed-id") else { return };
    let mock = start_mock(fast_mock()).await;
    // lease = 0: Redis's count is exactly the look-ups charged.
    let extra = "lease = \"0s\"\non_unavailable = \"fail_open\"\nreplica_id = \"bg-fixed-1\"";
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), extra), tenant_a: "daily_quota = 1000", ..Extras::default() },
    );
    let mut expected = 0;
    // The same replica id in two processes, one after the other, each through one outage: the
    // second one's sync must not be taken for the first one's, already added.
    for round in 0..2 {
        let proxy = app::start(parse(&text)).await.unwrap();
        let url = |i: usize| format!("http://{}/v1/score/F{round}-{i}", proxy.addr);
        assert_eq!(status(&url(0), KEY_A).await, 200);
        redis.stop();
        for i in 1..4 {
            assert_eq!(status(&url(i), KEY_A).await, 200, "fail_open serves while Redis is down");
        }
        redis.launch();
        expected += 4;
        let key = redis.cli(&["--scan", "--pattern", "*:a}:daily:*"]);
        wait_until_async(&format!("round {round}: {expected} look-ups counted in Redis"), || async {
            redis.cli(&["GET", &key]) == expected.to_string()
        })
        .await;
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outage_opens_no_new_share_of_a_used_up_quota() {
    let Some(mut redis) = RedisServer::start("redis-second-outage") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), "lease = \"0s\"\non_unavailable = \"fail_open\""),
            tenant_a: "daily_quota = 20",
            ..Extras::default()
        },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = |i: usize| format!("http://{}/v1/score/Q-{i}", proxy.addr);
    let mut served = 0;
    for i in 0..10 {
        assert_eq!(status(&url(i), KEY_A).await, 200);
        served += 1;
    }
    // First outage: this (only) replica's share of the 10 left at the last contact.
    redis.stop();
    for i in 10..25 {
        if status(&url(i), KEY_A).await == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 20, "the share of what was left, and no more");
    redis.launch();
    let key = redis.cli(&["--scan", "--pattern", "*:a}:daily:*"]);
    wait_until_async("the outage units added", || async { redis.cli(&["GET", &key]) == "20" }).await;
    // Second outage, before any look-up has leased again: the sync's answer says the quota
    // is used up, so there is no share left to open.
    redis.stop();
    for i in 25..35 {
        if status(&url(i), KEY_A).await == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 20, "{served} look-ups passed a daily quota of 20 over two outages");
    proxy.shutdown().await;
}

/// `[state]` for Redis with no heartbeat after the first (10 s apart): what the test does to
/// Redis is not noticed by a heartbeat in between.
fn redis_state_quiet(url: &str) -> String {
    redis_state(url, "").replace(
        "heartbeat_interval = \"100ms\"\nlease_ttl = \"1s\"",
        "heartbeat_interval = \"10s\"\nlease_ttl = \"20s\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_against_a_hung_redis_is_bounded() {
    let Some(redis) = RedisServer::start("redis-hung-exit") else { return };
    let mock = start_mock(fast_mock()).await;
    let limits = "rate = 1000\ndaily_quota = 1000\nmonthly_quota = 10000\nmax_in_flight = 10";
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state_quiet(&redis.url()), tenant_a: limits, tenant_b: limits, ..Extras::default() },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    for i in 0..3 {
        for key in [KEY_A, KEY_B] {
            assert_eq!(status(&format!("http://{}/v1/score/X-{i}", proxy.addr), key).await, 200);
        }
    }
    // Both tenants hold rate tokens, quota units and in-flight slots: four give-backs each,
    // every one of which would wait the full call timeout on a hung Redis.
    redis.signal("-STOP");
    let started = Instant::now();
    proxy.shutdown().await;
    let took = started.elapsed();
    redis.signal("-CONT");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?} against a hung Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_leaves_the_replica_set_even_after_an_outage() {
    let Some(mut redis) = RedisServer::start("redis-leave") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state_quiet(&redis.url()), tenant_a: "daily_quota = 1000", ..Extras::default() },
    );
    let proxy = app::start(parse(&text)).await.unwrap();
    let members = |redis: &RedisServer| redis.cli(&["ZCARD", "{bureau-guard}:replicas"]);
    assert_eq!(members(&redis), "1");
    // An outage this replica noticed; Redis is back before any heartbeat has seen it.
    redis.stop();
    assert_eq!(status(&format!("http://{}/v1/score/L-1", proxy.addr), KEY_A).await, 200);
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(metric_value(&m, "bureau_guard_state_redis_up"), Some(0.0));
    redis.launch();
    proxy.shutdown().await;
    assert_eq!(members(&redis), "0", "a clean shutdown leaves the replica set, so the others take its budget now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dear_request_refused_by_the_shared_rate_leaves_no_tokens_and_waits_for_its_cost() {
    let Some(redis) = RedisServer::start("redis-cost") else { return };
    let mock = start_mock(fast_mock()).await;
    // One token a second, burst 4; a report costs 3.
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), tenant_a: "rate = 1\nburst = 4", ..Extras::default() },
    )
    .replace("name = \"report\"\n", "name = \"report\"\ncost = 3\n");
    let proxy = app::start(parse(&text)).await.unwrap();
    let url = format!("http://{}/v1/credit-report", proxy.addr);
    let body = br#"{"subject_id":"S-9","report_type":"full"}"#;
    let report = || async { send(&client(), http::Method::POST, &url, &[("x-api-key", KEY_A)], body).await };
    assert_eq!(report().await.status, 200, "3 of the 4 tokens");
    // One token is left in Redis; the next report needs 3: refused, with the time until 3 are
    // there (2 s), and the one token stays in Redis rather than idle in this replica's pool.
    let r = report().await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "rate_limited");
    assert_eq!(r.headers["retry-after"], "2", "the wait for the request's cost, not for one token");
    let pooled = proxy.shared.states.get_or_create("a").leases().rate.avail.load().1;
    assert_eq!(pooled, 0, "no tokens leased that the request could not use");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_empty_keeps_each_replica_on_its_share_and_says_so() {
    let Some(redis) = RedisServer::start("redis-empty") else { return };
    let mock = start_mock(fast_mock()).await;
    // Heartbeats only when the test calls them (the start-up one, then by hand), so the order
    // below is the order Redis sees.
    let sections = redis_state(&redis.url(), "").replace("\"100ms\"", "\"30s\"").replace("\"1s\"", "\"60s\"");
    let text =
        config_with(&mock.url(), &Extras { sections: &sections, upstream: "max_concurrency = 8", ..Extras::default() });
    let one = app::start(parse(&text)).await.unwrap();
    let two = app::start(parse(&text)).await.unwrap();
    let (r1, r2) = (one.shared.redis.clone().unwrap(), two.shared.redis.clone().unwrap());
    assert!(r1.heartbeat().await);
    let limits = || (one.shared.scheduler.limit(), two.shared.scheduler.limit());
    assert_eq!(limits(), (4, 4), "two replicas, a budget of 8");

    // Redis restarts without its data (or fails over to a replica that lagged).
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    assert!(r1.heartbeat().await);
    assert_eq!(limits(), (4, 4), "alone in a new replica set, one keeps its share: the other has not heartbeaten yet");
    assert!(r2.heartbeat().await);
    assert_eq!(limits(), (4, 4));

    for proxy in [&one, &two] {
        let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
        assert!(m.contains("bureau_guard_state_redis_data_lost_total 1"), "{m}");
        let ready = get(&format!("http://{}/readyz", proxy.admin_addr), &[]).await;
        assert_eq!(ready.status, 200, "every replica lost the same data: none leaves the load balancer");
        assert!(ready.text().contains("Redis lost its data"), "{}", ready.text());
    }
    two.shutdown().await;
    one.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_under_a_live_replicas_id_refuses_to_start() {
    let Some(redis) = RedisServer::start("redis-dup-id") else { return };
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), "replica_id = \"bg-1\""), ..Extras::default() },
    );
    let first = app::start(parse(&text)).await.unwrap();
    // It waits one lease ttl (1 s here) for a holder that died to lose the id, then refuses.
    let err = app::start(parse(&text)).await.err().expect("the second process under bg-1 must not start");
    assert!(err.to_string().contains("replica_id \"bg-1\""), "{err}");
    assert_eq!(redis.cli(&["ZCARD", "{bureau-guard}:replicas"]), "1");
    // A clean shutdown gives the id up at once: the next process under it starts.
    first.shutdown().await;
    let again = app::start(parse(&text)).await.unwrap();
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_id_taken_later_is_logged_counted_and_not_ready() {
    let Some(redis) = RedisServer::start("redis-dup-later") else { return };
    let mock = start_mock(fast_mock()).await;
    // Heartbeats only by hand (see above).
    let sections =
        redis_state(&redis.url(), "replica_id = \"bg-2\"").replace("\"100ms\"", "\"30s\"").replace("\"1s\"", "\"60s\"");
    let text = config_with(&mock.url(), &Extras { sections: &sections, ..Extras::default() });
    let proxy = app::start(parse(&text)).await.unwrap();
    let r = proxy.shared.redis.clone().unwrap();
    let ready = || async { get(&format!("http://{}/readyz", proxy.admin_addr), &[]).await };
    assert_eq!(ready().await.status, 200);
    // Another process took bg-2 while this one could not reach Redis (and renews it).
    redis.cli(&["HSET", "{bureau-guard}:owners", "bg-2", "0123456789abcdef:99999999999999"]);
    assert!(r.heartbeat().await);
    let resp = ready().await;
    assert_eq!(resp.status, 503, "out of the load balancer until the id is its own");
    assert!(resp.text().contains("replica id \"bg-2\" is in use by another live process"), "{}", resp.text());
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert!(m.contains("bureau_guard_state_replica_id_conflicts_total 1"), "{m}");
    // The other process is gone: ready again.
    redis.cli(&["HDEL", "{bureau-guard}:owners", "bg-2"]);
    assert!(r.heartbeat().await);
    assert_eq!(ready().await.status, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_route_and_group_quotas() {
    let Some(redis) = RedisServer::start("redis-contracts") else { return };
    let mock = start_mock(fast_mock()).await;
    let (route_daily, group_daily) = (10u64, 16u64);
    let groups = format!("[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"b\"]\ndaily_quota = {group_daily}\n");
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), ""),
            tenant_a: &format!("[tenants.routes.score]\ndaily_quota = {route_daily}"),
            tenant_b: &groups,
            ..Extras::default()
        },
    );
    let replicas = [app::start(parse(&text)).await.unwrap(), app::start(parse(&text)).await.unwrap()];
    let url = |n: usize, path: &str| format!("http://{}{path}", replicas[n % 2].addr);

    // a's score look-ups, round-robin over both replicas: the route's quota is one for both.
    let mut a_ok = 0;
    for i in 0..30 {
        match get(&url(i, &format!("/v1/score/A-{i}")), &[("x-api-key", KEY_A)]).await {
            r if r.status == 200 => a_ok += 1,
            r => assert_eq!(r.json()["error"], "route_daily_quota_exhausted"),
        }
    }
    assert!(a_ok <= route_daily, "{a_ok} look-ups passed a route quota of {route_daily} across 2 replicas");
    assert!(a_ok + 2 >= route_daily, "only {a_ok} of a route quota of {route_daily} were usable");

    // b shares the group's quota with a: what a used is gone for b too, on either replica.
    let mut b_ok = 0;
    for i in 0..30 {
        match get(&url(i, &format!("/v1/score/B-{i}")), &[("x-api-key", KEY_B)]).await {
            r if r.status == 200 => b_ok += 1,
            r => assert_eq!(r.json()["error"], "group_daily_quota_exhausted"),
        }
    }
    assert!(a_ok + b_ok <= group_daily, "a {a_ok} + b {b_ok} passed a group quota of {group_daily}");
    assert!(a_ok + b_ok + 2 >= group_daily, "only {} of a group quota of {group_daily} were usable", a_ok + b_ok);
    assert_eq!(mock.bureau.stats().calls_total, a_ok + b_ok);
    // The shared counts are in Redis under the contracts' own keys.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(keys.contains("a/score}:daily:") && keys.contains("group:kb}:daily:"), "{keys}");
    for r in replicas {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_route_rate_refusal_gives_the_tenant_its_tokens_back() {
    let Some(redis) = RedisServer::start("redis-route-refund") else { return };
    let mock = start_mock(fast_mock()).await;
    let tenant_a = "rate = 0.0001\nburst = 4\n[tenants.routes.score]\nrate = 0.0001\nburst = 1";
    let text =
        config_with(&mock.url(), &Extras { sections: &redis_state(&redis.url(), ""), tenant_a, ..Extras::default() });
    let proxy = app::start(parse(&text)).await.unwrap();
    let score = |i: usize| format!("http://{}/v1/score/R-{i}", proxy.addr);
    assert_eq!(status(&score(0), KEY_A).await, 200);
    for i in 1..6 {
        let r = get(&score(i), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.json()["error"], "route_rate_limited");
    }
    // Three of the tenant's four tokens are left: the refused look-ups took none.
    let echo = format!("http://{}/echo/x", proxy.addr);
    for _ in 0..3 {
        assert_eq!(status(&echo, KEY_A).await, 200);
    }
    assert_eq!(get(&echo, &[("x-api-key", KEY_A)]).await.json()["error"], "rate_limited");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_a_group_to_its_rate_together() {
    let Some(redis) = RedisServer::start("redis-group-rate") else { return };
    let mock = start_mock(fast_mock()).await;
    // The group's burst of 8 and no refill to speak of; each member alone has room for 20.
    let burst = 8;
    let groups = format!("[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"b\"]\nrate = 0.0001\nburst = {burst}\n");
    let text = config_with(
        &mock.url(),
        &Extras {
            sections: &redis_state(&redis.url(), ""),
            tenant_a: "rate = 0.0001\nburst = 20",
            tenant_b: &format!("rate = 0.0001\nburst = 20\n{groups}"),
            ..Extras::default()
        },
    );
    let replicas = [app::start(parse(&text)).await.unwrap(), app::start(parse(&text)).await.unwrap()];
    let mut ok = 0;
    for i in 0..40 {
        let key = if i % 3 == 0 { KEY_B } else { KEY_A };
        let url = format!("http://{}/v1/score/G-{i}", replicas[i % 2].addr);
        match get(&url, &[("x-api-key", key)]).await {
            r if r.status == 200 => ok += 1,
            r => assert_eq!(r.json()["error"], "group_rate_limited"),
        }
    }
    assert!(ok <= burst, "{ok} passed a group burst of {burst} across 2 replicas");
    assert!(ok + 2 >= burst, "only {ok} of a group burst of {burst} were usable");
    for r in replicas {
        r.shutdown().await;
    }
}

/// Each tenant's `bureau_calls` in a statement from the replica at `admin` (days around today).
async fn statement_calls(admin: std::net::SocketAddr) -> Result<std::collections::BTreeMap<String, u64>, u16> {
    let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
    let today =
        bureau_guard::usage::day_at(bureau_guard::clock::Clock::now_unix_ms(&bureau_guard::clock::SystemClock), kst);
    let (from, to) = (bureau_guard::usage::store::date_of(today - 1), bureau_guard::usage::store::date_of(today + 1));
    let r = get(&format!("http://{admin}/admin/usage?from={from}&to={to}"), &[]).await;
    if r.status != 200 {
        return Err(r.status.as_u16());
    }
    let j = r.json();
    Ok(j["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["totals"]["bureau_calls"].as_u64() != Some(0))
        .map(|t| (t["tenant"].as_str().unwrap().to_string(), t["totals"]["bureau_calls"].as_u64().unwrap()))
        .collect())
}

/// Known traffic: `n` look-ups of a and of b, alternating over the replicas, some answered from
/// each replica's cache (not billed) and some sent.
async fn usage_traffic(replicas: &[&app::Running], tag: &str, n: usize) {
    for i in 0..n {
        let (ra, rb) = (replicas[i % replicas.len()], replicas[(i + 1) % replicas.len()]);
        let a = get(&format!("http://{}/v1/score/{tag}-A{}", ra.addr, i % 3), &[("x-api-key", KEY_A)]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let b = get(&format!("http://{}/v1/score/{tag}-B{i}", rb.addr), &[("x-api-key", KEY_B)]).await;
        assert_eq!(b.status, 200, "{}", b.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_statement_from_either_replica_is_the_bureaus_count_through_outage_and_restart() {
    let Some(mut redis) = RedisServer::start("redis-usage") else { return };
    let mock = start_mock(fast_mock()).await;
    let dirs = [temp_dir("redis-usage-0"), temp_dir("redis-usage-1")];
    let redis_url = redis.url();
    // Flushes only when the test says (the periodic one is an hour away): each step below is
    // what one periodic flush does.
    let text = |n: usize| {
        let usage = format!("[usage]\ndir = \"{}\"\nflush_interval = \"1h\"\n", dirs[n].display());
        config_with(
            &mock.url(),
            &Extras {
                score: "cache_ttl = \"10m\"\ncache_key = [\"path.subject_id\"]",
                sections: &(redis_state(&redis_url, "") + &usage),
                ..Extras::default()
            },
        )
    };
    let mut replicas = vec![app::start(parse(&text(0))).await.unwrap(), app::start(parse(&text(1))).await.unwrap()];
    let flush = |r: &app::Running| {
        let (usage, redis) = (r.shared.usage.clone(), r.shared.redis.clone().unwrap());
        async move { usage.ship(&redis).await }
    };
    let billed = || -> std::collections::BTreeMap<String, u64> {
        mock.bureau.stats().served_by_tenant.into_iter().filter(|(_, n)| *n > 0).collect()
    };

    usage_traffic(&[&replicas[0], &replicas[1]], "one", 12).await;
    for r in &replicas {
        assert!(flush(r).await);
    }
    let want = billed();
    assert_eq!(want.len(), 2, "both tenants called: {want:?}");
    for r in &replicas {
        assert_eq!(statement_calls(r.admin_addr).await, Ok(want.clone()), "either replica: every call of both");
    }
    let covers =
        get(&format!("http://{}/admin/usage?from=2026-01-01&to=2026-01-02", replicas[0].admin_addr), &[]).await;
    assert!(covers.json()["covers"].as_str().unwrap().starts_with("every replica"), "{}", covers.text());
    // Within one replica the cache answered some: the statement is the bureau's, not the requests'.
    assert!(want["a"] < 12, "{want:?}");

    // Redis down at flush time: the counts stay, a statement says it cannot be made, and the
    // next flush Redis answers copies them, once.
    redis.stop();
    usage_traffic(&[&replicas[0]], "two", 4).await;
    assert!(!flush(&replicas[0]).await, "Redis is down");
    assert!(!flush(&replicas[0]).await, "still down: tried again");
    assert_eq!(statement_calls(replicas[0].admin_addr).await, Err(503));
    redis.launch();
    assert!(flush(&replicas[0]).await);
    assert!(flush(&replicas[0]).await, "a flush with nothing new changes nothing");
    let want = billed();
    for r in &replicas {
        assert_eq!(statement_calls(r.admin_addr).await, Ok(want.clone()), "after the outage, exactly");
    }

    // A restart continues its own totals from its files: nothing twice.
    let first = replicas.remove(0);
    first.shutdown().await;
    let again = app::start(parse(&text(0))).await.unwrap();
    usage_traffic(&[&again], "three", 3).await;
    assert!(flush(&again).await);
    let want = billed();
    assert_eq!(statement_calls(again.admin_addr).await, Ok(want.clone()));
    assert_eq!(statement_calls(replicas[0].admin_addr).await, Ok(want));
    let keys = redis.cli(&["KEYS", "*usage*"]);
    assert!(keys.contains(":a}:usage:") && keys.contains(":usage:") && keys.contains(":tenants"), "{keys}");
    again.shutdown().await;
    for r in replicas {
        r.shutdown().await;
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `kill -9` of a replica mid-traffic: its restart copies the days written since its last copy
/// again, so the statement across replicas misses no billed call (it can be above the bureau's
/// count only by the calls the kill stopped between their charge and their send: at most the
/// requests in flight, 4 per tenant here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_usage_reaches_the_shared_statement_after_its_restart() {
    let Some(redis) = RedisServer::start("redis-usage-kill") else { return };
    let mock =
        start_mock(bureau_sim::mock_bureau::MockConfig { service_time: Duration::from_millis(5), ..fast_mock() }).await;
    let dir = temp_dir("redis-usage-kill");
    // The periodic flush (an hour) plays no part: only the charges on disk, and the restart.
    let usage = format!("[usage]\ndir = \"{}\"\nflush_interval = \"1h\"\n", dir.join("usage").display());
    let text =
        config_with(&mock.url(), &Extras { sections: &(redis_state(&redis.url(), "") + &usage), ..Extras::default() });
    let config = replica_config(&dir, 0, &text);
    let other = app::start(parse(&config_with(
        &mock.url(),
        &Extras { sections: &redis_state(&redis.url(), ""), ..Extras::default() },
    )))
    .await
    .unwrap();
    let (mut proc, addr, admin) = spawn_serving(&config);
    wait_healthy(&admin).await;
    let clients = clients_back_to_back(&addr, 8);
    let bureau = mock.bureau.clone();
    wait_until("200 calls served", || bureau.stats().calls_ok >= 200).await;
    proc.0.kill().unwrap(); // SIGKILL: no drain, no final flush, no copy to Redis
    proc.0.wait().unwrap();
    for c in clients {
        c.abort();
    }
    wait_until("the bureau idle", || bureau.stats().in_flight == 0).await;
    // The other replica's own calls, flushed (what its periodic flush does).
    usage_traffic(&[&other], "other", 3).await;
    assert!(other.shared.usage.ship(other.shared.redis.as_ref().unwrap()).await);

    let (_proc, _, admin) = spawn_serving(&config);
    wait_healthy(&admin).await;
    let served = mock.bureau.stats().served_by_tenant;
    let from_restarted = statement_calls(admin.parse().unwrap()).await.unwrap();
    for tenant in ["a", "b"] {
        let (charged, billed) = (from_restarted[tenant], served[tenant]);
        assert!((billed..=billed + 4).contains(&charged), "{tenant}: statement {charged}, the bureau billed {billed}");
    }
    assert_eq!(statement_calls(other.admin_addr).await.unwrap(), from_restarted, "the same from either replica");
    other.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

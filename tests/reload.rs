//! Hot reload: validated before anything changes, swapped atomically, live state kept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bureau_guard::app::{self, Options, Running};
use common::*;
use http::Method;

const BIN: &str = env!("CARGO_BIN_EXE_bureau-guard");
const ADMIN_TOKEN: &str = "reload-token";

fn tenant_c() -> String {
    format!("[[tenants]]\nid = \"c\"\napi_key_sha256 = \"{}\"\n", sha("key-c"))
}

fn write_config(path: &Path, mock_url: &str, tenant_a: &str, with_b: bool, extra_tenants: &str) {
    let admin = format!("token_sha256 = \"{}\"", sha(ADMIN_TOKEN));
    let mut text = config_with(mock_url, &Extras { tenant_a, admin: &admin, ..Extras::default() });
    if !with_b {
        let start = text.find("[[tenants]]\nid = \"b\"").expect("tenant b in the test config");
        text.truncate(start);
    }
    text.push_str(extra_tenants);
    std::fs::write(path, text).unwrap();
}

/// Tenant a's score look-ups on 4 connections, back to back, counting those not answered 200.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: std::net::SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                let c = client();
                let url = format!("http://{addr}/v1/score/S-{w}");
                while !stop.load(Ordering::Relaxed) {
                    let r = send(&c, Method::GET, &url, &[("x-api-key", KEY_A)], b"").await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if r.status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Traffic { stop, sent, failed, workers }
    }

    /// Stops the traffic: (requests sent, requests that failed).
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        (self.sent.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

async fn start_from_file(path: &Path) -> Running {
    let config = bureau_guard::config::Config::load(path).expect("valid initial config");
    app::start_with(config, Options { config_path: Some(path.to_path_buf()), ..Default::default() }).await.unwrap()
}

async fn reload(admin: &str) -> Resp {
    send(
        &client(),
        Method::POST,
        &format!("http://{admin}/admin/reload"),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        b"",
    )
    .await
}

fn config_path(name: &str) -> PathBuf {
    temp_dir(name).join("bureau-guard.toml")
}

#[tokio::test]
async fn reload_applies_tenant_and_limit_changes_at_once_and_keeps_counters() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("reload-apply");
    write_config(&path, &mock.url(), "daily_quota = 100", true, "");
    let proxy = start_from_file(&path).await;
    let url = |p: &str| format!("http://{}{}", proxy.addr, p);
    for _ in 0..3 {
        assert_eq!(get(&url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await.status, 200);
    }
    assert_eq!(get(&url("/v1/score/S-1"), &[("x-api-key", KEY_B)]).await.status, 200);
    assert_eq!(get(&url("/v1/score/S-1"), &[("x-api-key", "key-c")]).await.status, 401);

    // a's quota tightened to 4, b removed, c added.
    write_config(&path, &mock.url(), "daily_quota = 4", false, &tenant_c());
    let r = reload(&proxy.admin_addr.to_string()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let out = r.json();
    assert_eq!(out["result"], "applied");
    let changes: Vec<String> = out["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}: {}", c["path"].as_str().unwrap(), c["what"].as_str().unwrap()))
        .collect();
    assert!(changes.contains(&"tenants[a].daily_quota: 100 → 4".to_string()), "{changes:?}");
    assert!(changes.contains(&"tenants[b]: removed".to_string()), "{changes:?}");
    assert!(changes.contains(&"tenants[c]: added".to_string()), "{changes:?}");

    assert_eq!(
        get(&url("/v1/score/S-1"), &[("x-api-key", KEY_B)]).await.status,
        401,
        "a removed tenant's key stops at once"
    );
    assert_eq!(
        get(&url("/v1/score/S-1"), &[("x-api-key", "key-c")]).await.status,
        200,
        "an added tenant works at once"
    );
    // a had 3 calls under the old config: one more fits in the new quota of 4, then 429.
    assert_eq!(get(&url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await.status, 200);
    let r = get(&url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 429, "the counters carried over");
    assert_eq!(r.json()["error"], "daily_quota_exhausted");
}

#[tokio::test]
async fn a_rejected_reload_changes_nothing_and_says_why() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("reload-reject");
    write_config(&path, &mock.url(), "", true, "");
    let proxy = start_from_file(&path).await;
    let before = proxy.shared.snapshot.load_full();

    std::fs::write(
        &path,
        std::fs::read_to_string(&path).unwrap().replace("id = \"b\"", "id = \"b\"\nweight = 0\nrate = -1"),
    )
    .unwrap();
    let r = reload(&proxy.admin_addr.to_string()).await;
    assert_eq!(r.status, 422);
    let out = r.json();
    assert_eq!(out["result"], "rejected");
    let problems: Vec<&str> = out["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(problems.contains(&"tenants[1].weight: 0 must be between 1 and 1000"), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("tenants[1].rate: -1")), "{problems:?}");
    assert!(Arc::ptr_eq(&before, &proxy.shared.snapshot.load_full()), "the running snapshot is untouched");
    assert_eq!(get(&format!("http://{}/v1/score/S-1", proxy.addr), &[("x-api-key", KEY_B)]).await.status, 200);

    let unauthorized =
        send(&client(), Method::POST, &format!("http://{}/admin/reload", proxy.admin_addr), &[], b"").await;
    assert_eq!(unauthorized.status, 401);
    let text =
        String::from_utf8(get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.body.to_vec()).unwrap();
    assert_eq!(metric_value(&text, r#"bureau_guard_reloads_total{result="rejected"}"#), Some(1.0), "{text}");
    assert_eq!(metric_value(&text, r#"bureau_guard_reloads_total{result="applied"}"#), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_steady_traffic_fail_no_request_and_each_takes_effect() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("reload-50");
    write_config(&path, &mock.url(), "rate = 100000", true, "");
    let proxy = start_from_file(&path).await;
    let addr = proxy.addr;

    // Steady traffic from tenant a (never removed) on 4 connections while the config churns.
    let traffic = Traffic::start(addr);

    let admin = proxy.admin_addr.to_string();
    for i in 0..50 {
        if i % 2 == 1 {
            std::fs::write(&path, "[server]\nlisten = \"not an address\"\n").unwrap();
            let r = reload(&admin).await;
            assert_eq!(r.status, 422, "reload {i}");
            continue;
        }
        // Valid changes: c comes and goes; a's rate moves.
        let with_c = i % 4 == 0;
        let rate = format!("rate = {}", 100_000 + i);
        let extra = if with_c { tenant_c() } else { String::new() };
        write_config(&path, &mock.url(), &rate, true, &extra);
        let r = reload(&admin).await;
        assert_eq!(r.status, 200, "reload {i}: {:?}", r.body);
        let c_status = get(&format!("http://{addr}/v1/score/S-c"), &[("x-api-key", "key-c")]).await.status;
        assert_eq!(c_status, if with_c { 200 } else { 401 }, "reload {i} in effect at once");
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        let tenants = get(&format!("http://{admin}/admin/tenants"), &[("authorization", &bearer)]).await.json();
        let a = tenants.as_array().unwrap().iter().find(|t| t["id"] == "a").unwrap().clone();
        assert_eq!(a["limits"]["rate"], f64::from(100_000 + i), "reload {i}");
    }
    let (sent, failed) = traffic.stop().await;
    assert!(sent > 100, "traffic ran throughout ({sent} requests)");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed during reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_command_prints_changes_and_problems_and_sets_its_exit_code() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("reload-cli");
    write_config(&path, &mock.url(), "", true, "");
    let proxy = start_from_file(&path).await;
    let admin = format!("http://{}", proxy.admin_addr);
    let run = |admin: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN).args(["reload", "--admin", &admin, "--token", ADMIN_TOKEN]).output().unwrap()
        })
    };

    write_config(&path, &mock.url(), "max_in_flight = 7", true, "");
    let out = run(admin.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("reload applied: 1 change(s)"), "{stdout}");
    assert!(stdout.contains("tenants[a].max_in_flight: none → 7"), "{stdout}");

    std::fs::write(&path, "[upstream]\nurl = 42\n").unwrap();
    let out = run(admin.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("reload rejected: 1 problem(s); the running config is unchanged"), "{stdout}");
    assert!(stdout.contains("upstream.url: invalid type: integer `42`"), "{stdout}");

    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN).args(["reload", "--admin", &admin, "--token", "wrong"]).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));
}

#[test]
fn check_diff_prints_what_a_config_changes() {
    let old = config_path("diff-old");
    let new = config_path("diff-new");
    write_config(&old, "http://127.0.0.1:8081", "rate = 10", true, "");
    write_config(&new, "http://127.0.0.1:8081", "rate = 20", false, &tenant_c());
    let out = Command::new(BIN)
        .args(["check", "--config", new.to_str().unwrap(), "--diff", old.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in ["  tenants[a].rate: 10 → 20", "  tenants[b]: removed", "  tenants[c]: added"] {
        assert!(stdout.contains(line), "missing {line:?} in {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_running_process() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("sighup");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fix_ports = |p: &Path| {
        let text = std::fs::read_to_string(p)
            .unwrap()
            .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1)
            .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{admin_port}\""), 1);
        std::fs::write(p, text).unwrap();
    };
    write_config(&path, &mock.url(), "", true, "");
    fix_ports(&path);
    let mut child = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id().to_string();
    let _guard = Kill(&mut child);
    let key_c_works = || async move {
        let c = client();
        let req = http::Request::get(format!("http://127.0.0.1:{port}/v1/score/S-1"))
            .header("x-api-key", "key-c")
            .body(Default::default())
            .unwrap();
        matches!(tokio::time::timeout(std::time::Duration::from_millis(500), c.request(req)).await, Ok(Ok(r)) if r.status() == 200)
    };
    // Up, and c unknown.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let c = client();
        let req = http::Request::get(format!("http://127.0.0.1:{admin_port}/readyz")).body(Default::default()).unwrap();
        if matches!(tokio::time::timeout(std::time::Duration::from_millis(500), c.request(req)).await, Ok(Ok(r)) if r.status() == 200)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!key_c_works().await);

    write_config(&path, &mock.url(), "", true, &tenant_c());
    fix_ports(&path);
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !key_c_works().await {
        assert!(std::time::Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reload_reopens_the_rotated_audit_log_even_when_the_config_is_rejected() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("reload-audit");
    let log = path.with_file_name("audit.jsonl");
    let rotated = path.with_file_name("audit.jsonl.1");
    let admin = format!("token_sha256 = \"{}\"", sha(ADMIN_TOKEN));
    let sections = format!("[audit]\nfile = \"{}\"\n", log.display());
    let text = config_with(&mock.url(), &Extras { admin: &admin, sections: &sections, ..Extras::default() });
    std::fs::write(&path, &text).unwrap();
    let proxy = start_from_file(&path).await;
    let audit = proxy.shared.audit.as_ref().expect("audit log configured");
    let url = |p: &str| format!("http://{}{}", proxy.addr, p);
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap_or_default().lines().count();

    assert_eq!(get(&url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await.status, 200);
    assert!(audit.flush().await);
    // logrotate: rename, then SIGHUP from postrotate (a reload); the config has a typo meanwhile.
    std::fs::rename(&log, &rotated).unwrap();
    std::fs::write(&path, text.replace("[audit]", "[audit]\nfail_closed = \"maybe\"")).unwrap();
    assert_eq!(reload(&proxy.admin_addr.to_string()).await.status, 422);
    assert_eq!(get(&url("/v1/score/S-2"), &[("x-api-key", KEY_A)]).await.status, 200);
    assert!(audit.flush().await);
    assert_eq!((lines(&rotated), lines(&log)), (1, 1), "the record after the reload is in the new file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_group_limits_change_under_load_without_a_failed_request_and_keep_their_counts() {
    let mock = start_mock(fast_mock()).await;
    let path = config_path("reload-contracts");
    let write = |i: u32, route_quota: u64| {
        let tenant_a = format!("[tenants.routes.score]\nrate = {}\ndaily_quota = {route_quota}", 100_000 + i);
        let group = format!("[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"b\"]\ndaily_quota = {}\n", 1_000_000 + i);
        write_config(&path, &mock.url(), &tenant_a, true, &group);
    };
    write(0, 1_000_000);
    let proxy = start_from_file(&path).await;
    let (addr, admin) = (proxy.addr, proxy.admin_addr.to_string());

    let traffic = Traffic::start(addr);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let tenant_a = async || {
        let tenants = get(&format!("http://{admin}/admin/tenants"), &[("authorization", &bearer)]).await.json();
        tenants.as_array().unwrap().iter().find(|t| t["id"] == "a").unwrap().clone()
    };
    for i in 1..=20 {
        write(i, 1_000_000);
        let r = reload(&admin).await;
        assert_eq!(r.status, 200, "reload {i}: {:?}", r.body);
        let changes = r.json()["changes"].to_string();
        assert!(changes.contains("tenants[a].routes[score].rate"), "reload {i}: {changes}");
        assert!(changes.contains("groups[kb].daily_quota"), "reload {i}: {changes}");
        let a = tenant_a().await;
        assert_eq!(a["routes"]["score"]["limits"]["rate"], f64::from(100_000 + i), "reload {i} in effect");
        assert_eq!(a["group"]["limits"]["daily_quota"], 1_000_000 + i);
    }
    let (sent, failed) = traffic.stop().await;
    assert!(sent > 100, "traffic ran throughout ({sent} requests)");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed during reloads");

    // Every call was counted across the 20 reloads: the route's and the group's counters belong
    // to their ids, not to a config.
    let a = tenant_a().await;
    assert_eq!(a["routes"]["score"]["usage"]["daily_used"], sent, "{a}");
    assert_eq!(a["group"]["usage"]["daily_used"], sent, "{a}");
    // So a quota lowered to what was used refuses at once.
    write(21, sent);
    assert_eq!(reload(&admin).await.status, 200);
    let r = get(&format!("http://{addr}/v1/score/S-x"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.json()["error"], "route_daily_quota_exhausted");
    assert_eq!(get(&format!("http://{addr}/echo/x"), &[("x-api-key", KEY_A)]).await.status, 200, "other routes go on");
}

#[test]
fn check_diff_shows_route_limits_and_groups() {
    let old = config_path("diff-contracts-old");
    let new = config_path("diff-contracts-new");
    write_config(&old, "http://127.0.0.1:8081", "[tenants.routes.score]\nrate = 1", true, "");
    let group = "[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"b\"]\nweight = 2\n";
    write_config(
        &new,
        "http://127.0.0.1:8081",
        "[tenants.routes.score]\nrate = 2\n[tenants.routes.report]\ndaily_quota = 5",
        true,
        group,
    );
    let out = Command::new(BIN)
        .args(["check", "--config", new.to_str().unwrap(), "--diff", old.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in ["  tenants[a].routes[score].rate: 1 → 2", "  tenants[a].routes[report]: added", "  groups[kb]: added"]
    {
        assert!(stdout.contains(line), "missing {line:?} in {stdout}");
    }
    // And `check` names a bad one by its path.
    write_config(
        &new,
        "http://127.0.0.1:8081",
        "[tenants.routes.scor]\nrate = 2",
        true,
        "[[groups]]\nid = \"kb\"\nmembers = [\"a\", \"z\"]\n",
    );
    let out = Command::new(BIN).args(["check", "--config", new.to_str().unwrap()]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("tenants[0].routes.scor: unknown route \"scor\""), "{text}");
    assert!(text.contains("groups[0].members[1]: unknown tenant \"z\""), "{text}");
}

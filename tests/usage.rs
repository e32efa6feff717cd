//! Usage statements end to end: known traffic over a simulated midnight, a restart, the
//! endpoint's answers to bad input, CSV, and the `bureau-guard usage` command.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bureau_guard::app::{self, Running};
use bureau_guard::clock::ManualClock;
use bureau_guard::usage;
use bureau_sim::mock_bureau::{MockConfig, Refusal};
use common::*;
use http::StatusCode;

// 2026-11-23T14:59:59Z = 23:59:59 in Seoul (+09:00, the default quota offset).
const BEFORE_KST_MIDNIGHT_MS: i64 = 1_795_445_999_000;
const DAY1: &str = "2026-11-23";
const DAY2: &str = "2026-11-24";

/// Routes: `score` cached (10 min) and coalesced by subject; tenant `a` has a daily quota of 4.
fn usage_config(mock_url: &str, sections: &str) -> String {
    config_with(
        mock_url,
        &Extras {
            score: "coalesce = true\ncache_ttl = \"10m\"\ncache_key = [\"path.subject_id\"]",
            tenant_a: "daily_quota = 4",
            sections,
            ..Extras::default()
        },
    )
}

fn mock_config() -> MockConfig {
    // A long queue wait: the coalescing step stalls the bureau (0 workers) while followers join.
    MockConfig { queue_timeout: Duration::from_secs(60), ..fast_mock() }
}

async fn score(proxy: &Running, key: &str, subject: &str) -> Resp {
    get(&format!("http://{}/v1/score/{subject}", proxy.addr), &[("x-api-key", key)]).await
}

async fn statement(proxy: &Running, query: &str) -> Resp {
    get(&format!("http://{}/admin/usage?{query}", proxy.admin_addr), &[]).await
}

/// The statement's totals of `tenant` over DAY1..=DAY2.
async fn totals(proxy: &Running, tenant: &str) -> serde_json::Value {
    let s = statement(proxy, &format!("from={DAY1}&to={DAY2}")).await;
    assert_eq!(s.status, 200, "{}", s.text());
    let j = s.json();
    j["tenants"].as_array().unwrap().iter().find(|t| t["tenant"] == tenant).unwrap()["totals"].clone()
}

/// Known traffic: a and b call, hit the cache, coalesce, are refused (a's quota, the bureau's
/// 503 for b) on both sides of midnight in Seoul.
async fn drive(proxy: &Running, mock: &bureau_sim::mock_bureau::MockHandle, clock: &ManualClock) {
    // Day 1, a: 1 call led, 3 followers coalesced into it (the bureau stalled until all have
    // joined; each reserves a unit of a's quota of 4 until it joins, so this comes first).
    mock.bureau.set_workers(0);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                get(&format!("http://{addr}/v1/score/A4"), &[("x-api-key", KEY_A)]).await.headers["x-cache"]
                    .to_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    let shared = proxy.shared.clone();
    let bureau = mock.bureau.clone();
    wait_until("1 call at the bureau and 4 requests waiting on it", || {
        bureau.stats().in_flight == 1 && shared.metrics.requests_in_flight.get() == 4
    })
    .await;
    mock.bureau.set_workers(8);
    let mut caches: Vec<String> = Vec::new();
    for t in tasks {
        caches.push(t.await.unwrap());
    }
    caches.sort();
    assert_eq!(caches, ["COALESCED", "COALESCED", "COALESCED", "MISS"]);
    // a: 3 calls, 2 cache hits.
    for s in ["A1", "A2", "A3", "A1", "A2"] {
        assert_eq!(score(proxy, KEY_A, s).await.status, 200);
    }
    // a's daily quota (4) is used up: refused, not sent.
    let r = score(proxy, KEY_A, "A5").await;
    assert_eq!(r.json()["error"], "daily_quota_exhausted");
    // b: 2 calls, 1 hit.
    for s in ["B1", "B2", "B1"] {
        assert_eq!(score(proxy, KEY_B, s).await.status, 200);
    }

    // Midnight in Seoul.
    clock.set(BEFORE_KST_MIDNIGHT_MS + 1000);
    // Day 2, a: the quota is back: 2 calls, 1 hit (the cache does not turn at midnight).
    for s in ["A5", "A6", "A1"] {
        assert_eq!(score(proxy, KEY_A, s).await.status, 200);
    }
    // b: the bureau refuses one call (503, not charged), then serves one.
    mock.bureau
        .set_refusal(Some(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            share: 1.0,
            retry_after_s: None,
            duration: None,
        }))
        .unwrap();
    let r = score(proxy, KEY_B, "B3").await;
    assert_eq!(r.status, 503, "{}", r.text());
    mock.bureau.set_refusal(None).unwrap();
    // The refusal holds b's calls for a second (the bureau's default Retry-After).
    wait_until("the bureau's hold over", || {
        let snap = proxy.shared.snapshot.load();
        let t = snap.tenants.by_id("b").unwrap();
        proxy.shared.breaker.held(&t.state.bureau_hold, tokio::time::Instant::now()).is_none()
    })
    .await;
    assert_eq!(score(proxy, KEY_B, "B4").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_equals_the_bureaus_own_count_per_tenant_across_midnight() {
    let mock = start_mock(mock_config()).await;
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let proxy = app::start_with_clock(parse(&usage_config(&mock.url(), "")), clock.clone()).await.unwrap();
    drive(&proxy, &mock, &clock).await;

    let stats = mock.bureau.stats();
    for tenant in ["a", "b"] {
        let t = totals(&proxy, tenant).await;
        assert_eq!(
            t["bureau_calls"].as_u64(),
            stats.served_by_tenant.get(tenant).copied(),
            "{tenant}: the statement's calls are the bureau's billable calls: {t}"
        );
        assert_eq!(
            t["bureau_refused"].as_u64(),
            Some(stats.refused_by_tenant.get(tenant).copied().unwrap_or(0)),
            "{tenant}: the bureau's refusals, not charged: {t}"
        );
    }
    let a = totals(&proxy, "a").await;
    assert_eq!(a["bureau_calls"], 6);
    assert_eq!((a["cache_hits"].as_i64(), a["coalesced"].as_i64()), (Some(3), Some(3)));
    assert_eq!(a["answered_without_bureau"], 6, "savings: hits + coalesced");
    assert_eq!(a["refused_by_reason"]["daily_quota_exhausted"], 1);
    let b = totals(&proxy, "b").await;
    assert_eq!(
        (b["bureau_calls"].as_i64(), b["bureau_refused"].as_i64(), b["cache_hits"].as_i64()),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(b["refused_by_reason"]["bureau_busy"], 1, "the client saw the bureau's refusal as a 503");
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    for (tenant, calls) in [("a", 6.0), ("b", 3.0)] {
        let series = format!("bureau_guard_bureau_calls_charged_total{{tenant=\"{tenant}\"}}");
        assert_eq!(metric_value(&m, &series), Some(calls), "the dashboard's count is the statement's");
    }

    // By day: the calls before midnight in Seoul on the 23rd, after it on the 24th.
    let j = statement(&proxy, &format!("from={DAY1}&to={DAY2}&tenant=a")).await.json();
    let rows = j["tenants"][0]["rows"].as_array().unwrap().clone();
    let days: Vec<(String, i64)> =
        rows.iter().map(|r| (r["day"].as_str().unwrap().to_string(), r["bureau_calls"].as_i64().unwrap())).collect();
    assert_eq!(days, [(DAY1.to_string(), 4), (DAY2.to_string(), 2)]);
    assert_eq!(j["tenants"].as_array().unwrap().len(), 1, "only the tenant asked for");
    let day2 = statement(&proxy, &format!("from={DAY2}&to={DAY2}")).await.json();
    assert_eq!(day2["totals"]["bureau_calls"], 3, "a's 2 and b's 1 on the 24th");
    assert_eq!(day2["covers"], "this replica", "no Redis: no other replica's look-ups");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_restart_and_adds_up_after_it() {
    let dir = temp_dir("usage-restart");
    let sections = format!("[usage]\ndir = \"{}\"\nflush_interval = \"1h\"", dir.display());
    let mock = start_mock(mock_config()).await;
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let text = usage_config(&mock.url(), &sections);
    let proxy = app::start_with_clock(parse(&text), clock.clone()).await.unwrap();
    drive(&proxy, &mock, &clock).await;
    let before = statement(&proxy, &format!("from={DAY1}&to={DAY2}")).await.json();
    let m = get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text();
    assert_eq!(
        metric_value(&m, "bureau_guard_usage_charge_seconds_count"),
        Some(10.0),
        "every call sent waited for its charge on disk: a's 6, b's 4 (B3 refused by the bureau included)"
    );
    // A graceful stop flushes what the hourly flush has not (and the statement above did).
    assert_eq!(score(&proxy, KEY_B, "B9").await.status, 200);
    proxy.shutdown().await;

    let proxy = app::start_with_clock(parse(&text), clock.clone()).await.unwrap();
    let after = statement(&proxy, &format!("from={DAY1}&to={DAY2}")).await.json();
    assert_eq!(after["tenants"][0], before["tenants"][0], "a's statement, as before the restart");
    assert_eq!(after["tenants"][1]["totals"]["bureau_calls"], 4, "b's call after the statement was flushed at stop");
    let stats = mock.bureau.stats();
    assert_eq!(after["totals"]["bureau_calls"].as_u64(), Some(stats.served_by_tenant.values().sum::<u64>()));
    // More traffic after the restart adds to the same day.
    assert_eq!(score(&proxy, KEY_B, "B10").await.status, 200);
    let again = statement(&proxy, &format!("from={DAY2}&to={DAY2}&tenant=b")).await.json();
    assert_eq!(again["tenants"][0]["totals"]["bureau_calls"], 3, "b on the 24th: B4, B9, B10 (B3 refused)");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 2, "one file per day: {files:?}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_queries_are_answered_400_and_csv_has_a_header_row() {
    let mock = start_mock(fast_mock()).await;
    let clock = Arc::new(ManualClock::new(BEFORE_KST_MIDNIGHT_MS));
    let proxy = app::start_with_clock(parse(&usage_config(&mock.url(), "")), clock).await.unwrap();
    assert_eq!(score(&proxy, KEY_A, "A1").await.status, 200);
    assert_eq!(score(&proxy, KEY_A, "A1").await.status, 200);
    for (query, message) in [
        ("from=2026-11-31&to=2026-12-01", "is not a date"),
        (&format!("from={DAY2}&to={DAY1}") as &str, "is after to"),
        (&format!("from={DAY1}&to={DAY1}&tenant=zz"), "unknown tenant \"zz\""),
        ("to=2026-11-23", "from and to are required"),
        ("from=2020-01-01&to=2026-11-23", "usage.retention keeps 400"),
    ] {
        let r = statement(&proxy, query).await;
        assert_eq!(r.status, 400, "{query}");
        assert!(r.json()["message"].as_str().unwrap().contains(message), "{query}: {}", r.text());
    }
    let csv = statement(&proxy, &format!("from={DAY1}&to={DAY1}&format=csv")).await;
    assert_eq!(csv.status, 200);
    assert!(csv.headers["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = csv.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("day,tenant,route,answered_without_bureau,refused,bureau_calls,cache_hits"));
    assert_eq!(lines.len(), 2, "{text}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let row: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(header.len(), row.len());
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((col("day"), col("tenant"), col("route")), (DAY1, "a", "score"));
    assert_eq!((col("bureau_calls"), col("cache_hits"), col("answered_without_bureau")), ("1", "1", "1"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_needs_the_admin_token_and_the_cli_prints_the_statement() {
    let mock = start_mock(fast_mock()).await;
    let text = config_with(
        &mock.url(),
        &Extras { admin: &format!("token_sha256 = \"{}\"", sha("admin-secret")), ..Extras::default() },
    );
    let proxy = start_proxy(&text).await;
    assert_eq!(get(&format!("http://{}/v1/score/S1", proxy.addr), &[("x-api-key", KEY_A)]).await.status, 200);
    // Around the real clock's day in Seoul (the request may have been a second before midnight).
    let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
    let today = usage::day_at(bureau_guard::clock::Clock::now_unix_ms(&bureau_guard::clock::SystemClock), kst);
    let (from, to) = (usage::store::date_of(today - 1), usage::store::date_of(today + 1));
    let query = format!("from={from}&to={to}");
    assert_eq!(statement(&proxy, &query).await.status, 401);

    let bin = env!("CARGO_BIN_EXE_bureau-guard");
    let admin = format!("http://{}", proxy.admin_addr);
    let run = |args: Vec<String>| {
        let admin = admin.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(bin).arg("usage").arg("--admin").arg(admin).args(args).output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    let with_token = |extra: &[&str]| {
        let mut v: Vec<String> = ["--token", "admin-secret", "--from", &from.to_string(), "--to", &to.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let out = run(with_token(&["--csv"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("day,tenant,route,"), "{csv}");
    assert!(csv.contains(",a,score,0,0,1,"), "{csv}");

    let out = run(with_token(&["--tenant", "nobody"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown tenant \"nobody\""));

    let out = run(vec!["--from".into(), from.to_string(), "--to".into(), to.to_string()]).await;
    assert_eq!(out.status.code(), Some(1), "no token");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn dashboard_series_exist_at_zero_from_the_start_and_leave_with_their_tenant() {
    let mock = start_mock(fast_mock()).await;
    let text = usage_config(&mock.url(), "");
    let proxy = start_proxy(&text).await;
    let metrics = || async { get(&format!("http://{}/metrics", proxy.admin_addr), &[]).await.text() };
    let m = metrics().await;
    for series in [
        r#"bureau_guard_limit_rejections_total{mode="enforced",reason="daily_quota_exhausted",tenant="b"}"#,
        r#"bureau_guard_sheds_total{reason="queue_timeout",tenant="a"}"#,
        r#"bureau_guard_requests_total{outcome="coalesced",route="score",tenant="b"}"#,
        r#"bureau_guard_bureau_calls_abandoned_total{tenant="a"}"#,
        r#"bureau_guard_cache_stores_total{result="stored"}"#,
    ] {
        assert_eq!(metric_value(&m, series), Some(0.0), "{series} before any traffic");
    }
    // A reload without tenant b drops its series; a's stay.
    let without_b = text.replace("[[tenants]]\nid = \"b\"", "[[tenants]]\nid = \"c\"");
    let report = bureau_guard::ops::reload::apply(&proxy.shared, parse(&without_b));
    assert!(report.applied(), "{report:?}");
    let m = metrics().await;
    assert!(!m.contains("tenant=\"b\""), "b's series are gone");
    assert_eq!(metric_value(&m, r#"bureau_guard_sheds_total{reason="queue_timeout",tenant="c"}"#), Some(0.0));
    assert_eq!(metric_value(&m, r#"bureau_guard_sheds_total{reason="queue_timeout",tenant="a"}"#), Some(0.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_finds_its_call_and_the_answers_that_rode_on_it_across_a_rotation() {
    let dir = temp_dir("usage-reconcile");
    let audit_file = dir.join("audit.jsonl");
    let sections = format!("[audit]\nfile = \"{}\"", audit_file.display());
    let mock = start_mock(mock_config()).await;
    let proxy = start_proxy(&usage_config(&mock.url(), &sections)).await;
    // A coalesced follower rides on its leader's call: both answered once both are in.
    mock.bureau.set_workers(0);
    let pair: Vec<_> = (0..2)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move { get(&format!("http://{addr}/v1/score/S0"), &[("x-api-key", KEY_A)]).await })
        })
        .collect();
    let (shared, bureau) = (proxy.shared.clone(), mock.bureau.clone());
    wait_until("the leader at the bureau, the follower joined", || {
        bureau.stats().in_flight == 1 && shared.metrics.requests_in_flight.get() == 2
    })
    .await;
    mock.bureau.set_workers(8);
    let mut leader = None;
    for t in pair {
        let r = t.await.unwrap();
        if r.headers["x-cache"] == "MISS" {
            leader = Some(r.headers["x-request-id"].to_str().unwrap().to_string());
        }
    }
    let leader = leader.expect("one of the two led the call");

    let call = score(&proxy, KEY_A, "S1").await;
    assert_eq!(call.headers["x-cache"], "MISS");
    let id = call.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(score(&proxy, KEY_A, "S1").await.headers["x-cache"], "HIT");
    let audit = proxy.shared.audit.as_ref().unwrap();
    assert!(audit.flush().await);
    // logrotate: rename, then the writer reopens the path.
    std::fs::rename(&audit_file, dir.join("audit.jsonl.1")).unwrap();
    audit.reopen();
    assert_eq!(score(&proxy, KEY_A, "S1").await.headers["x-cache"], "HIT");
    assert_eq!(score(&proxy, KEY_A, "S2").await.status, 200, "another call: not found");
    assert!(audit.flush().await);

    let bin = env!("CARGO_BIN_EXE_bureau-guard");
    let admin = format!("http://{}", proxy.admin_addr);
    let run = move |args: Vec<String>| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin).arg("usage").arg("--admin").arg(admin).args(args).output().unwrap()
        })
    };
    let out = run(vec!["--request-id".into(), id.clone()]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = found["records"].as_array().unwrap();
    let got: Vec<(&str, &str)> =
        records.iter().map(|r| (r["outcome"].as_str().unwrap(), r["matched"].as_str().unwrap())).collect();
    assert_eq!(got, [("bureau", "request_id"), ("cache_hit", "rode_on"), ("cache_hit", "rode_on")], "{found}");
    assert!(records.iter().all(|r| r["tenant"] == "a" && r["route"] == "score"));
    assert_eq!(found["scanned"].as_array().unwrap().len(), 2, "the rotated file and the current one");

    let out = run(vec!["--request-id".into(), leader]).await.unwrap();
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut got: Vec<(&str, &str)> = found["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["outcome"].as_str().unwrap(), r["matched"].as_str().unwrap()))
        .collect();
    got.sort(); // answered in the same millisecond
    assert_eq!(got, [("bureau", "request_id"), ("coalesced", "rode_on")], "{found}");

    let out = run(vec!["--request-id".into(), "00000000-0000000000000bad".into()]).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no audit record"));
    let bad = get(&format!("http://{}/admin/usage/request?id=a%20b", proxy.admin_addr), &[]).await;
    assert_eq!(bad.status, 400);
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy with an audit file in a directory of its own: the directory and the proxy.
async fn audited(name: &str, mock: &bureau_sim::mock_bureau::MockHandle) -> (std::path::PathBuf, Running) {
    let dir = temp_dir(name);
    let sections = format!("[audit]\nfile = \"{}\"", dir.join("audit.jsonl").display());
    (dir.clone(), start_proxy(&usage_config(&mock.url(), &sections)).await)
}

async fn search(proxy: &Running, query: &str) -> Resp {
    get(&format!("http://{}/admin/usage/request?{query}", proxy.admin_addr), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_request_id_is_searched_within_its_own_tenant_only() {
    let mock = start_mock(fast_mock()).await;
    let (dir, proxy) = audited("usage-client-id", &mock).await;
    let url = |s: &str| format!("http://{}/v1/score/{s}", proxy.addr);
    // Bank b's look-up with its own client id.
    let b = get(&url("B1"), &[("x-api-key", KEY_B), ("x-client-request-id", "dispute-42")]).await;
    let b_id = b.headers["x-request-id"].to_str().unwrap().to_string();
    // Bank a sends b's client id, and b's request id as a client id of its own.
    assert_eq!(get(&url("A1"), &[("x-api-key", KEY_A), ("x-client-request-id", "dispute-42")]).await.status, 200);
    assert_eq!(get(&url("A2"), &[("x-api-key", KEY_A), ("x-client-request-id", &b_id)]).await.status, 200);
    assert!(proxy.shared.audit.as_ref().unwrap().flush().await);
    let tenants = |r: &Resp| -> Vec<String> {
        let j = r.json();
        j["records"].as_array().unwrap().iter().map(|r| format!("{}:{}", r["tenant"], r["matched"])).collect()
    };

    // Our request id: b's call only; a's record that carries it as a client id is not b's.
    let ours = search(&proxy, &format!("id={b_id}")).await;
    assert_eq!(tenants(&ours), ["\"b\":\"request_id\""], "{}", ours.text());
    // A client id needs its tenant, and finds that tenant's records only.
    let unscoped = search(&proxy, "client_request_id=dispute-42").await;
    assert_eq!(unscoped.status, 400);
    assert!(unscoped.json()["message"].as_str().unwrap().contains("needs tenant=ID"));
    let scoped = search(&proxy, "client_request_id=dispute-42&tenant=b").await;
    assert_eq!(tenants(&scoped), ["\"b\":\"client_request_id\""], "{}", scoped.text());
    assert_eq!(scoped.json()["tenant"], "b");

    // The CLI: --client-request-id with --tenant; without it clap refuses before any request.
    let bin = env!("CARGO_BIN_EXE_bureau-guard");
    let admin = format!("http://{}", proxy.admin_addr);
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin).arg("usage").arg("--admin").arg(admin).args(args).output().unwrap()
        })
    };
    let out = run(&["--client-request-id", "dispute-42", "--tenant", "a"]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["records"].as_array().unwrap().len(), 1);
    assert_eq!(found["records"][0]["tenant"], "a");
    let out = run(&["--client-request-id", "dispute-42"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "clap: --tenant is required");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tenant"));
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_is_limited_and_one_scan_runs_at_a_time() {
    let mock = start_mock(fast_mock()).await;
    let (dir, proxy) = audited("usage-bounded", &mock).await;
    let call = score(&proxy, KEY_A, "S1").await;
    let id = call.headers["x-request-id"].to_str().unwrap().to_string();
    for _ in 0..4 {
        assert_eq!(score(&proxy, KEY_A, "S1").await.headers["x-cache"], "HIT");
    }
    assert!(proxy.shared.audit.as_ref().unwrap().flush().await);

    let all = search(&proxy, &format!("id={id}")).await.json();
    assert_eq!((all["records"].as_array().unwrap().len(), &all["truncated"]), (5, &false.into()), "{all}");
    let cut = search(&proxy, &format!("id={id}&limit=2")).await.json();
    assert_eq!(cut["records"].as_array().unwrap().len(), 2);
    assert_eq!(cut["truncated"], true);
    assert_eq!(cut["records"][0]["matched"], "request_id", "the oldest first: the call");
    for bad in ["0", "1001", "many"] {
        let r = search(&proxy, &format!("id={id}&limit={bad}")).await;
        assert_eq!(r.status, 400, "limit={bad}");
        assert!(r.json()["message"].as_str().unwrap().contains("from 1 to 1000"), "{}", r.text());
    }

    // While a scan runs, another is refused with 429, Retry-After and a JSON error.
    let running = proxy.shared.usage.scans().try_start().expect("no scan runs");
    let busy = search(&proxy, &format!("id={id}")).await;
    assert_eq!(busy.status, 429);
    assert!(busy.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(busy.json()["error"], "scan_in_progress");
    drop(running);
    assert_eq!(search(&proxy, &format!("id={id}")).await.status, 200, "the next scan once it has ended");

    let bin = env!("CARGO_BIN_EXE_bureau-guard");
    let admin = format!("http://{}", proxy.admin_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["usage", "--admin", &admin, "--request-id", &id, "--limit", "3"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((found["records"].as_array().unwrap().len(), &found["truncated"]), (3, &true.into()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

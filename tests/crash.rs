//! Quota counters survive `kill -9` of a real bureau-guard process, losing at most about one
//! flush interval (1 s by default).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn saved_daily(file: &std::path::Path, tenant: &str) -> Option<u64> {
    let bytes = std::fs::read(file).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["tenants"][tenant]["daily"].as_u64()
}

/// The test config with `sections`, on fixed free ports (a restarted process binds the same
/// ones), written in `dir`: its path, the proxy's port and the admin address.
fn config_file(dir: &std::path::Path, mock_url: &str, sections: &str) -> (std::path::PathBuf, u16, String) {
    let (port, admin_port) = (free_port(), free_port());
    let text = config_with(mock_url, &Extras { sections, ..Extras::default() })
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1)
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{admin_port}\""), 1);
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    (config, port, format!("127.0.0.1:{admin_port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_kill_9_losing_at_most_one_flush_interval() {
    let mock = start_mock(fast_mock()).await;
    let dir = temp_dir("kill9");
    let state_file = dir.join("state.json");
    let state = format!("[state]\nfile = \"{}\"\n", state_file.display());
    let (config, port, admin) = config_file(&dir, &mock.url(), &state);

    let mut proc = spawn(&config);
    wait_healthy(&admin).await;
    for i in 0..7 {
        let r = get(&format!("http://127.0.0.1:{port}/v1/score/S-{i}"), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.status, 200);
    }
    let sent = Instant::now();
    // The periodic flush must capture them within about one interval.
    while saved_daily(&state_file, "a") != Some(7) {
        assert!(sent.elapsed() < Duration::from_millis(2500), "counts not persisted within ~1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proc.0.kill().unwrap(); // SIGKILL: no shutdown flush
    proc.0.wait().unwrap();

    let _proc = spawn(&config);
    wait_healthy(&admin).await;
    let tenants = get(&format!("http://{admin}/admin/tenants"), &[]).await.json();
    let a = tenants.as_array().unwrap().iter().find(|t| t["id"] == "a").unwrap();
    assert_eq!(a["usage"]["daily_used"], 7);
}

/// After `kill -9` in the middle of traffic, no call the bureau served (and bills) is missing
/// from the statement: each charge is written before its call is sent (group commit), and the
/// periodic flush (an hour here) plays no part. The statement can only be above the bureau's
/// count, by the calls whose charge was written but that the kill stopped before they left: at
/// most the tenant's requests in flight at the kill (4 clients each here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_statement_misses_no_billed_call_after_kill_9_mid_traffic() {
    let mock =
        start_mock(bureau_sim::mock_bureau::MockConfig { service_time: Duration::from_millis(5), ..fast_mock() }).await;
    let dir = temp_dir("kill9-usage");
    let usage = format!("[usage]\ndir = \"{}\"\nflush_interval = \"1h\"\n", dir.join("usage").display());
    let (config, port, admin) = config_file(&dir, &mock.url(), &usage);

    let mut proc = spawn(&config);
    wait_healthy(&admin).await;
    // 8 clients send look-ups back to back until the process dies under them.
    let clients = clients_back_to_back(&format!("127.0.0.1:{port}"), 8);
    let bureau = mock.bureau.clone();
    wait_until("300 calls served", || bureau.stats().calls_ok >= 300).await;
    proc.0.kill().unwrap(); // SIGKILL: no drain, no final flush
    proc.0.wait().unwrap();
    for c in clients {
        c.abort();
    }
    // Calls already at the bureau finish there (and are billed) without their client.
    wait_until("the bureau idle", || bureau.stats().in_flight == 0).await;

    let _proc = spawn(&config);
    wait_healthy(&admin).await;
    let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
    let today =
        bureau_guard::usage::day_at(bureau_guard::clock::Clock::now_unix_ms(&bureau_guard::clock::SystemClock), kst);
    let date = bureau_guard::usage::store::date_of;
    let url = format!("http://{admin}/admin/usage?from={}&to={}", date(today - 1), date(today + 1));
    let statement = get(&url, &[]).await.json();
    let stats = mock.bureau.stats();
    for tenant in ["a", "b"] {
        let t = statement["tenants"].as_array().unwrap().iter().find(|t| t["tenant"] == tenant).unwrap();
        let charged = t["totals"]["bureau_calls"].as_u64().unwrap();
        let served = stats.served_by_tenant.get(tenant).copied().unwrap_or(0);
        assert!(
            (served..=served + 4).contains(&charged),
            "{tenant}: statement {charged} after kill -9, the bureau served {served} ({} in all)",
            stats.calls_ok
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

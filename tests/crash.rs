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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_kill_9_losing_at_most_one_flush_interval() {
    let mock = start_mock(fast_mock()).await;
    let dir = temp_dir("kill9");
    let state_file = dir.join("state.json");
    let (port, admin_port) = (free_port(), free_port());
    let state = format!("[state]\nfile = \"{}\"\n", state_file.display());
    let text = config_with(&mock.url(), &Extras { sections: &state, ..Extras::default() })
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1)
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{admin_port}\""), 1);
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    let admin = format!("127.0.0.1:{admin_port}");

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

//! Usage shared through Redis (`usage/shared.rs`) at the scale the store is sized for: 10,000
//! tenants × 5 routes. The first copy of a day (every pair changed: a start after a crash, or
//! the first flush of a busy day), a flush where 1,000 pairs changed (a typical second), and
//! statements read back from Redis: one day of every tenant, and one tenant over 30 days.
//!
//! Run: `cargo bench --bench usage_shared` (starts its own `redis-server` on a Unix socket in
//! target/usage-shared; skipped when redis-server is not on PATH).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bureau_guard::usage::Column;

fn main() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/usage-shared");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("redis.sock");
    let Ok(mut redis) = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket", socket.to_str().unwrap(), "--save", "", "--dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
    else {
        eprintln!("skipped: redis-server is not on PATH");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ninsecure_no_token = true\n[upstream]\nurl = \"http://127.0.0.1:1\"\n[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"unix://{}\"\n[usage]\ndir = \"{}\"\n[[routes]]\nname = \"s\"\nmethod = \"GET\"\npath = \"/s\"\n[[tenants]]\nid = \"a\"\napi_key_sha256 = \"{}\"\n",
        socket.display(),
        dir.join("usage").display(),
        "0".repeat(64)
    );
    let config = bureau_guard::config::Config::from_toml(&text, &|_| None).unwrap();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
        let proxy = bureau_guard::app::start(config).await.unwrap();
        let (usage, redis) = (proxy.shared.usage.clone(), proxy.shared.redis.clone().unwrap());
        // Recent days: older ones would expire in Redis at once (past usage.retention).
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let day = bureau_guard::usage::day_at(now, chrono::FixedOffset::east_opt(9 * 3600).unwrap());
        let (tenants, routes) = (10_000, 5);
        let ids: Vec<Arc<str>> = (0..tenants).map(|i| Arc::from(format!("bank-{i:05}"))).collect();
        let names: Vec<Arc<str>> = (0..routes).map(|i| Arc::from(format!("route-{i}"))).collect();
        for d in day - 29..=day {
            for t in &ids {
                for r in &names {
                    usage.add(d, t, r, Column::BureauCalls, 40);
                    usage.add(d, t, r, Column::CacheHits, 12);
                }
            }
            let started = Instant::now();
            assert!(usage.ship(&redis).await);
            if d == day {
                println!("first copy of a day, {} pairs: {:.1?}", tenants * routes, started.elapsed());
            }
        }
        for t in ids.iter().take(1000) {
            usage.add(day, t, &names[0], Column::BureauCalls, 1);
        }
        let started = Instant::now();
        assert!(usage.ship(&redis).await);
        println!("a flush with 1,000 pairs changed: {:.1?}", started.elapsed());
        let started = Instant::now();
        let rows = redis.read_usage(day, day, None).await.unwrap();
        println!("statement of 1 day, all tenants: {} rows in {:.1?}", rows.len(), started.elapsed());
        let started = Instant::now();
        let rows = redis.read_usage(day - 29, day, Some("bank-04321")).await.unwrap();
        println!("statement of 30 days, one tenant: {} rows in {:.1?}", rows.len(), started.elapsed());
        let info = Command::new("redis-cli").args(["-s", socket.to_str().unwrap(), "INFO", "memory"]).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        let used = info.lines().find_map(|l| l.strip_prefix("used_memory_human:")).unwrap_or("?");
        println!("Redis memory for 30 days x {} pairs: {used}", tenants * routes);
        proxy.shutdown().await;
    });
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

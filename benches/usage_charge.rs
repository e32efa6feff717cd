//! What a durable charge (`usage/journal.rs`) adds to a bureau call: the latency of
//! `Usage::charge` (write + group-committed `fdatasync` of the day file) and its CPU per call,
//! at a steady, open-loop rate of calls (one every 1/rate s, each in a task of its own, as
//! bureau calls are). The CPU is the process's (user + system) during the run, less that of the
//! same run with usage in memory (no file, nothing synced): what the durability costs.
//!
//! Run: `cargo bench --bench usage_charge` (the files go to target/usage-bench, on the disk
//! the repository is on; point USAGE_BENCH_DIR at the disk a deployment would use).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bureau_guard::config::UsageConfig;
use bureau_guard::ops::metrics::UsageMetrics;
use bureau_guard::usage::Usage;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th, stime the 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

struct Run {
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu: f64,
    calls: usize,
}

async fn run(usage: Arc<Usage>, rate: f64, secs: f64) -> Run {
    let (t, r): (Arc<str>, Arc<str>) = (Arc::from("bank-a"), Arc::from("score"));
    let calls = (rate * secs) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let cpu0 = cpu_seconds();
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        tick.tick().await;
        let (usage, t, r) = (usage.clone(), t.clone(), r.clone());
        let r = if i % 4 == 0 { Arc::from("report") } else { r };
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            usage.charge(20_000, &t, &r).await;
            start.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(calls);
    for task in tasks {
        lat.push(task.await.unwrap());
    }
    let cpu = cpu_seconds() - cpu0;
    lat.sort();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Run { p50: at(0.50), p99: at(0.99), max: *lat.last().unwrap(), cpu, calls }
}

fn main() {
    let dir = std::env::var_os("USAGE_BENCH_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/usage-bench"),
        std::path::PathBuf::from,
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("durable charge: latency of Usage::charge and CPU per call (dir {})", dir.display());
    println!("{:>7} {:>9} {:>9} {:>9} {:>12} {:>10}", "rate/s", "p50", "p99", "max", "cpu/call", "syncs/call");
    for rate in [200.0, 1000.0, 5000.0] {
        let secs = 5.0;
        let _ = std::fs::remove_dir_all(&dir);
        let memory = Arc::new(Usage::open(&UsageConfig::default(), UsageMetrics::unregistered()).unwrap());
        let base = rt.block_on(run(memory, rate, secs));
        let files = Arc::new(
            Usage::open(&UsageConfig { dir: Some(dir.clone()), ..Default::default() }, UsageMetrics::unregistered())
                .unwrap(),
        );
        let durable = rt.block_on(run(files.clone(), rate, secs));
        let cpu_per_call = (durable.cpu - base.cpu).max(0.0) / durable.calls as f64;
        println!(
            "{rate:>7} {:>9.2?} {:>9.2?} {:>9.2?} {:>10.1}us {:>10.2}",
            durable.p50,
            durable.p99,
            durable.max,
            cpu_per_call * 1e6,
            files.charge_batches() as f64 / durable.calls as f64,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    // The request path's count (a hit, a refusal): one shard lock and one hash-map update.
    let usage = Arc::new(Usage::open(&UsageConfig::default(), UsageMetrics::unregistered()).unwrap());
    let per_thread = 2_000_000u32;
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let usage = usage.clone();
            std::thread::spawn(move || {
                let tenants: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("bank-{t}-{i}"))).collect();
                let route: Arc<str> = Arc::from("score");
                for i in 0..per_thread {
                    usage.record(20_000, &tenants[(i % 100) as usize], &route, bureau_guard::usage::Column::CacheHits);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(per_thread);
    println!("Usage::record on the request path: {ns:.0} ns per count (2 threads at once, 100 tenants each)");
}

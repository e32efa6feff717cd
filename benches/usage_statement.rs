//! A usage statement at the scale the store is sized for: 10,000 tenants × 5 routes, a line per
//! (tenant, route) per day (compacted day files), read for 30 days: all tenants, and one tenant
//! (its lines found by substring before any is parsed). 400 days cost about 13 times the 30.
//!
//! Run: `cargo bench --bench usage_statement` (writes ~150 MB under target/usage-statement).

use std::sync::Arc;
use std::time::Instant;

use bureau_guard::config::UsageConfig;
use bureau_guard::ops::metrics::UsageMetrics;
use bureau_guard::usage::{Column, Usage};

fn main() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/usage-statement");
    let _ = std::fs::remove_dir_all(&dir);
    let (tenants, routes, days) = (10_000, 5, 30u32);
    let usage =
        Usage::open(&UsageConfig { dir: Some(dir.clone()), ..Default::default() }, UsageMetrics::unregistered())
            .unwrap();
    let ids: Vec<Arc<str>> = (0..tenants).map(|i| Arc::from(format!("bank-{i:05}"))).collect();
    let names: Vec<Arc<str>> = (0..routes).map(|i| Arc::from(format!("route-{i}"))).collect();
    let started = Instant::now();
    for day in 20_000..20_000 + days {
        for t in &ids {
            for r in &names {
                usage.add(day, t, r, Column::BureauCalls, 40);
                usage.add(day, t, r, Column::CacheHits, 12);
                usage.add(day, t, r, Column::Refused(bureau_guard::respond::ErrorKind::RateLimited), 3);
            }
        }
        usage.flush().unwrap();
    }
    let bytes: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    println!(
        "{days} days x {tenants} tenants x {routes} routes written in {:.1?}: {:.1} MB ({:.1} MB a day)",
        started.elapsed(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / f64::from(days)
    );
    for (what, tenant) in [("all tenants", None), ("one tenant", Some("bank-04321"))] {
        let started = Instant::now();
        let rows = usage.rows(20_000, 20_000 + days - 1, tenant).unwrap();
        let json = bureau_guard::usage::statement::statement(
            20_000,
            20_000 + days - 1,
            chrono::FixedOffset::east_opt(9 * 3600).unwrap(),
            &[],
            &rows,
        );
        let text = serde_json::to_vec(&json).unwrap();
        println!(
            "statement of {days} days, {what:>11}: {} rows, {:.1} MB of JSON, in {:.1?}",
            rows.len(),
            text.len() as f64 / 1e6,
            started.elapsed()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

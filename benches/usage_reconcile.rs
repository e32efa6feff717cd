//! Reconciliation by request id (`usage/reconcile.rs`) on 10 million audit lines: the time to
//! find one request's records by scanning the current file and three rotations (2.5 million
//! lines each, records shaped as `cache/audit.rs` writes them), and with `since` skipping the
//! rotations written before it.
//!
//! Run: `cargo bench --bench usage_reconcile` (writes ~2.7 GB under target/usage-reconcile;
//! USAGE_RECONCILE_DIR elsewhere; USAGE_RECONCILE_LINES for another size). The first scan
//! reads what the writes left in the page cache. For a cold disk, keep the files
//! (USAGE_RECONCILE_KEEP=1: written once, reused, not deleted), evict them from the page cache
//! (`posix_fadvise(DONTNEED)` on each, e.g. with python's `os.posix_fadvise`) and run again.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use bureau_guard::usage::reconcile;

fn main() {
    let dir = std::env::var_os("USAGE_RECONCILE_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/usage-reconcile"),
        std::path::PathBuf::from,
    );
    let lines: u64 = std::env::var("USAGE_RECONCILE_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let keep = std::env::var_os("USAGE_RECONCILE_KEEP").is_some();
    let audit = dir.join("audit.jsonl");
    if !(keep && audit.exists()) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, lines);
    }
    let per_file = lines / 4;
    // In the current file, half-way: a call (a multiple of 3) with a cache hit riding on it.
    let target = (per_file * 3 + per_file / 2) / 3 * 3;
    let id = format!("5eed5eed-{target:016x}");
    for (what, since) in [
        ("every file", None),
        ("every file, again", None),
        ("since yesterday (2 rotations skipped)", Some(now_ms() - 86_400_000 - 60_000)),
    ] {
        let search = reconcile::Search::Request(id.clone());
        let found = reconcile::find(&audit, &search, since, reconcile::DEFAULT_LIMIT).unwrap();
        let read: u64 = found.scanned.iter().map(|s| s.bytes).sum();
        println!(
            "{what:>40}: {} records in {} ms, {:.2} GB read ({:.2} GB/s), {} files skipped",
            found.records.len(),
            found.elapsed_ms,
            read as f64 / 1e9,
            read as f64 / 1e9 / (found.elapsed_ms.max(1) as f64 / 1000.0),
            found.skipped.len()
        );
    }
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Writes `lines` audit lines in four files, the rotations last written 3, 2 and 1 days ago.
fn write(dir: &std::path::Path, lines: u64) {
    let files = ["audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"];
    let per_file = lines / files.len() as u64;
    let started = Instant::now();
    let mut bytes = 0u64;
    for (f, name) in files.iter().enumerate() {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join(name)).unwrap());
        for i in (f as u64 * per_file)..((f as u64 + 1) * per_file) {
            let (outcome, rode) = if i % 3 == 1 { ("cache_hit", Some(i - 1)) } else { ("bureau", None) };
            let rode = rode.map_or(String::new(), |r| format!(",\"rode_on\":\"5eed5eed-{r:016x}\""));
            let line = format!(
                "{{\"time\":\"2026-12-0{}T{:02}:{:02}:{:02}.{:03}Z\",\"tenant\":\"bank-{:04}\",\"route\":\"credit_report\",\"subject\":\"{:064x}\",\"outcome\":\"{outcome}\",\"status\":200,\"request_id\":\"5eed5eed-{i:016x}\",\"client_request_id\":null{rode}}}\n",
                f + 1,
                (i / 3_600_000) % 24,
                (i / 60_000) % 60,
                (i / 1000) % 60,
                i % 1000,
                i % 10_000,
                u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            );
            bytes += line.len() as u64;
            w.write_all(line.as_bytes()).unwrap();
        }
        w.flush().unwrap();
        // Rotations were last written days apart.
        let age = Duration::from_secs(86_400 * (files.len() - 1 - f) as u64);
        let file = std::fs::File::options().write(true).open(dir.join(name)).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }
    println!(
        "{lines} lines, {:.2} GB in {} files, written in {:.1?}",
        bytes as f64 / 1e9,
        files.len(),
        started.elapsed()
    );
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64
}

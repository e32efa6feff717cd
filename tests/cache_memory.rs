//! The cache's memory bound bounds memory (issue 19): filled with distinct look-ups, the process
//! grows by at most 1.5 × `cache.max_bytes`. Alone in its test binary, so that nothing else
//! allocates while the resident set is measured. Fails with the former per-entry overhead of
//! 256 bytes (the process grew by 2.5 × `max_bytes` with small answers).

use std::sync::Arc;
use std::time::Duration;

use bureau_guard::cache::key::CacheKey;
use bureau_guard::cache::store::{Cache, Fetched, RoutePolicy};
use bureau_guard::ops::metrics::Metrics;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

/// Resident set size of this process, from /proc (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_full_of_distinct_look_ups_stays_within_its_memory_bound() {
    const MAX: u64 = 16 * 1024 * 1024;
    let metrics = Metrics::new();
    let policy =
        RoutePolicy { ttl: Duration::from_secs(600), stale_if_error: Duration::ZERO, statuses: vec![StatusCode::OK] };
    let (tenant, route): (Arc<str>, Arc<str>) = (Arc::from("bank-a"), Arc::from("report"));
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    // A score's answer: the smallest look-up, where the per-entry overhead weighs most.
    let body = Bytes::from(vec![b'x'; 60]);
    let before = rss_bytes();
    let cache = Arc::new(Cache::new(MAX, 256 * 1024, metrics.cache_handles()));
    // Every entry a distinct subject, as in a surge of new applicants: far more than fits.
    let n = 6 * MAX / 400;
    let tasks = 8u64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (cache, headers, body, policy, tenant, route) =
            (cache.clone(), headers.clone(), body.clone(), policy.clone(), tenant.clone(), route.clone());
        handles.push(tokio::spawn(async move {
            for i in (t..n).step_by(tasks as usize) {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&i.to_le_bytes());
                k[8] = 1;
                // A body of its own per entry, as a real answer has (not a shared `Bytes`).
                let fetched = Arc::new(Fetched::new(StatusCode::OK, headers.clone(), Bytes::copy_from_slice(&body)));
                cache.store(cache.ticket(), CacheKey::from_bytes(k), &fetched, &policy, &tenant, &route).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    cache.run_pending_tasks().await;
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "max_bytes {} MiB: {} entries, weighed {} MiB, process grew by {:.1} MiB ({:.2}x)",
        MAX >> 20,
        cache.entries(),
        cache.weighted_bytes() >> 20,
        grown as f64 / (1 << 20) as f64,
        grown as f64 / MAX as f64
    );
    assert!(cache.weighted_bytes() <= MAX, "weighed {} over the bound", cache.weighted_bytes());
    assert!(grown <= MAX * 3 / 2, "the process grew by {grown} bytes for a cache bound of {MAX}");
}

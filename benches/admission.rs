//! The admission decision with 10,000 configured tenants: identify the tenant from its key
//! (SHA-256 + constant-time compare), take from its token bucket, enter its in-flight count,
//! reserve a unit of its daily quota. From 1 thread and from 2 threads at once (the machines
//! have 2 cores): the per-decision time should stay flat, showing no shared lock on the path.
//!
//! cargo bench --bench admission

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bureau_guard::admission::quota::{self, Windows};
use bureau_guard::admission::ratelimit::{self, InFlightGuard, RateDecision};
use bureau_guard::admission::tenant::TenantTable;
use bureau_guard::admission::verdict::{Mode, Verdict};
use bureau_guard::config::{DryRun, TenantConfig, TenantLimits};
use bureau_guard::state::StateRegistry;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

const TENANTS: usize = 10_000;

fn table() -> (TenantTable, Vec<HeaderValue>) {
    let keys: Vec<String> = (0..TENANTS).map(|i| format!("bench-key-{i:05}-{}", "x".repeat(24))).collect();
    let configs: Vec<TenantConfig> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| TenantConfig {
            id: format!("t{i}"),
            name: format!("tenant {i}"),
            key_digests: vec![Sha256::digest(k.as_bytes()).into()],
            weight: 1,
            client_cert_names: Vec::new(),
            routes: Vec::new(),
            limits: TenantLimits {
                // High enough that the bench measures admissions, not refusals.
                rate: Some(1e9),
                burst: 1_000_000,
                max_in_flight: Some(1_000),
                daily_quota: Some(u64::MAX >> 30),
                monthly_quota: None,
                max_queue: 0,
                dry_run: DryRun::default(),
            },
        })
        .collect();
    let table = TenantTable::new(&configs, &[], &[], None, &StateRegistry::default());
    // Static header values: cloning one is a plain copy, as the request's own header is already
    // in hand when admission runs; a refcounted clone would add two cache misses the proxy never has.
    let values = keys.into_iter().map(|k| HeaderValue::from_static(Box::leak(k.into_boxed_str()))).collect();
    (table, values)
}

/// One full admission: what `proxy.rs` does between the head and the body. `headers` stands for
/// the request's own header map (it exists before admission; re-inserting the key is a refcount).
fn admit(table: &TenantTable, headers: &mut HeaderMap, key: &HeaderValue, windows: &Windows) -> bool {
    headers.insert("x-api-key", key.clone());
    let tenant = table.identify(headers).expect("known key");
    let rate = tenant.rate.as_ref().expect("rate");
    let rate_ok = matches!(rate.check(&tenant.state.rate_tat, ratelimit::now_ns(), 1), RateDecision::Allowed { .. });
    let Verdict::Allow(guard) = InFlightGuard::admit(&tenant.state, tenant.limits.max_in_flight, Mode::Enforce) else {
        panic!("under cap")
    };
    let Verdict::Allow(reservation) = quota::reserve(&tenant.state, &tenant.limits, windows) else {
        panic!("under quota")
    };
    reservation.commit();
    drop(guard);
    rate_ok
}

fn bench(c: &mut Criterion) {
    let (table, keys) = table();
    let table = Arc::new(table);
    let keys = Arc::new(keys);
    let windows = Windows::at(1_795_445_000_000, chrono::FixedOffset::east_opt(9 * 3600).unwrap());

    let mut g = c.benchmark_group("admission_10k_tenants");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("1_thread", |b| {
        let mut i = 0usize;
        let mut headers = HeaderMap::with_capacity(16);
        b.iter(|| {
            i = (i + 7919) % TENANTS;
            black_box(admit(&table, &mut headers, &keys[i], &windows))
        })
    });
    // Two threads admitting at once; the reported time is per decision per thread.
    g.bench_function("2_threads_per_thread", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (table, keys) = (table.clone(), keys.clone());
                    s.spawn(move || {
                        let mut i = t * 4999;
                        let mut headers = HeaderMap::with_capacity(16);
                        for _ in 0..iters {
                            i = (i + 7919) % TENANTS;
                            black_box(admit(&table, &mut headers, &keys[i], &windows));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    // Two threads hammering the same tenant: the worst case for shared atomics.
    g.bench_function("2_threads_same_tenant_per_thread", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let (table, keys) = (table.clone(), keys.clone());
                    s.spawn(move || {
                        let mut headers = HeaderMap::with_capacity(16);
                        for _ in 0..iters {
                            black_box(admit(&table, &mut headers, &keys[42], &windows));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

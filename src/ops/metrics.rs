//! Prometheus metrics: registered once into a struct of handles, exported on the admin listener.
//!
//! Labels are bounded by the config: `tenant` is a configured tenant id (or `_none` before one is
//! known), `route` a configured route name (or `_none` / `_passthrough`), `outcome` one of the
//! fixed [`Outcome`] labels. Never a subject id, never a key.
//!
//! The request path must not take the registry's lock per request, so handles for each
//! (tenant, route) pair are resolved on first use and kept in a [`RequestCells`] table that lives
//! with the compiled config.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::admission::verdict::Mode;
use crate::respond::{ErrorKind, Outcome};

/// Label for "no tenant identified" / "no route matched".
pub const NONE_LABEL: &str = "_none";
/// Route label of requests forwarded by `server.pass_unmatched`.
pub const PASSTHROUGH_LABEL: &str = "_passthrough";

/// Latency buckets from 0.5 ms (a cache hit) to 10 s (the request timeout).
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric of the process.
pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub requests_in_flight: IntGauge,
    pub limit_rejections_total: IntCounterVec,
    pub quota_used: IntGaugeVec,
    pub quota_limit: IntGaugeVec,
    /// A tenant's use and limit per route (`[tenants.routes.NAME]`), by tenant, route, window.
    pub route_quota_used: IntGaugeVec,
    pub route_quota_limit: IntGaugeVec,
    /// A group's use (all members) and limit (`[[groups]]`), by group, window.
    pub group_quota_used: IntGaugeVec,
    pub group_quota_limit: IntGaugeVec,
    pub state_load_errors_total: IntCounter,
    pub state_save_errors_total: IntCounter,
    pub state_last_save_timestamp_seconds: IntGauge,
    pub queue_wait_seconds: HistogramVec,
    pub sheds_total: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    /// Per priority level (`[[priority]]`; one series per configured level, none without):
    /// calls it holds, requests of it waiting, and its nominal part of the budget.
    pub level_in_flight: IntGaugeVec,
    pub level_queued: IntGaugeVec,
    pub level_nominal: IntGaugeVec,
    pub bureau_in_flight: IntGauge,
    pub bureau_concurrency_limit: IntGauge,
    pub bureau_duration_seconds: Histogram,
    /// Bureau calls whose every requester had gone before the answer arrived, by tenant.
    pub bureau_calls_abandoned_total: IntCounterVec,
    /// Bureau calls charged (the bureau took them), by tenant: the usage statement's column.
    pub bureau_calls_charged_total: IntCounterVec,
    /// Time a bureau call waited for its charge to be on disk (`usage/journal.rs`).
    pub usage_charge_seconds: Histogram,
    /// Usage writes (charges, flushes) that failed: counted in memory and retried.
    pub usage_write_errors_total: IntCounter,
    /// Bureau calls cut after `upstream.max_call_time` (slot freed while the bureau may still work).
    pub bureau_calls_cut_total: IntCounter,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    /// What the adaptive limit sees (0 without `[upstream.adaptive]`): its knee estimate, the
    /// bureau's no-load latency, the last cruise window's latency, the calls queueing inside the
    /// bureau, and its phase (1 for the current one).
    pub adaptive_knee: Gauge,
    pub adaptive_baseline_seconds: Gauge,
    pub adaptive_latency_seconds: Gauge,
    pub adaptive_queueing: Gauge,
    pub adaptive_phase: IntGaugeVec,
    pub breaker_opened_total: IntCounter,
    /// Holds started or lengthened by a bureau 429/503 `Retry-After`.
    pub bureau_holds_total: IntCounter,
    pub reloads_total: IntCounterVec,
    pub reload_last_success_timestamp_seconds: IntGauge,
    /// Bureau answers by status class, indexed 0..=4 for 1xx..5xx (pre-resolved: no lock per call).
    pub bureau_responses: [IntCounter; 5],
    pub cache_lookups_total: IntCounterVec,
    pub cache_stores_total: IntCounterVec,
    pub cache_evictions_total: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub coalesce_in_flight: IntGauge,
    pub audit_records_total: IntCounter,
    pub audit_write_errors_total: IntCounter,
    pub audit_dropped_total: IntCounter,
    pub audit_healthy: IntGauge,
    /// TLS handshakes on the listener, by result (see `tls::Handshake`).
    pub tls_handshakes_total: IntCounterVec,
    /// Expiry of the certificates bureau-guard presents, by `cert` (`server`, `upstream_client`).
    pub tls_certificate_expiry_timestamp_seconds: IntGaugeVec,
    pub tls_crl_next_update_timestamp_seconds: IntGaugeVec,
    /// The proxy listener's connections (`server::conns`).
    pub connections: crate::server::ConnMetrics,
    /// Sources that started an `auth_failure_penalty`.
    pub auth_penalties_total: IntCounter,
    /// How many `server.tls.crl` positions the CRL gauge was last set for.
    crl_positions: std::sync::atomic::AtomicUsize,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new("bureau_guard_requests_total", "Requests answered, by tenant, route and outcome."),
            &["tenant", "route", "outcome"],
        )
        .expect("valid metric");
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "bureau_guard_request_duration_seconds",
                "Time from request head received to response ready, by tenant and route.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["tenant", "route"],
        )
        .expect("valid metric");
        let requests_in_flight = IntGauge::new("bureau_guard_requests_in_flight", "Requests inside bureau-guard now.")
            .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("bureau_guard_build_info", "Always 1; the version label tells which build runs."),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let limit_rejections_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_limit_rejections_total",
                "Requests over a tenant limit, by reason; mode=dry_run ones were let through.",
            ),
            &["tenant", "reason", "mode"],
        )
        .expect("valid metric");
        let quota_used = IntGaugeVec::new(
            Opts::new("bureau_guard_quota_used", "Bureau calls charged in the current window."),
            &["tenant", "window"],
        )
        .expect("valid metric");
        let quota_limit = IntGaugeVec::new(
            Opts::new("bureau_guard_quota_limit", "Bureau calls allowed per window."),
            &["tenant", "window"],
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let route_quota_used = gauge(
            "bureau_guard_route_quota_used",
            "Bureau calls of one route charged to a tenant's route limit in the current window.",
            &["tenant", "route", "window"],
        );
        let route_quota_limit = gauge(
            "bureau_guard_route_quota_limit",
            "A tenant's bureau calls allowed per window on one route.",
            &["tenant", "route", "window"],
        );
        let group_quota_used = gauge(
            "bureau_guard_group_quota_used",
            "Bureau calls of a group's members together charged in the current window.",
            &["group", "window"],
        );
        let group_quota_limit =
            gauge("bureau_guard_group_quota_limit", "A group's bureau calls allowed per window.", &["group", "window"]);
        let state_load_errors_total = IntCounter::new(
            "bureau_guard_state_load_errors_total",
            "Quota state files found unreadable at start-up (moved aside; counters started from zero).",
        )
        .expect("valid metric");
        let state_save_errors_total =
            IntCounter::new("bureau_guard_state_save_errors_total", "Failed writes of the quota state file.")
                .expect("valid metric");
        let state_last_save_timestamp_seconds = IntGauge::new(
            "bureau_guard_state_last_save_timestamp_seconds",
            "Unix time at which the quota state file was last known current (written, or unchanged since the last write).",
        )
        .expect("valid metric");

        let queue_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "bureau_guard_queue_wait_seconds",
                "Time requests waited for a bureau slot (granted ones), by tenant.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["tenant"],
        )
        .expect("valid metric");
        let sheds_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_sheds_total",
                "Requests answered 503 bureau_busy without reaching the bureau, by tenant and reason.",
            ),
            &["tenant", "reason"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new("bureau_guard_queue_depth", "Requests waiting for a bureau slot, by tenant."),
            &["tenant"],
        )
        .expect("valid metric");
        let level_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["level"]).expect("valid metric");
        let level_in_flight =
            level_gauge("bureau_guard_level_in_flight", "Bureau calls in flight, by priority level ([[priority]]).");
        let level_queued =
            level_gauge("bureau_guard_level_queued", "Requests waiting for a bureau slot, by priority level.");
        let level_nominal = level_gauge(
            "bureau_guard_level_nominal",
            "A priority level's nominal part of the current bureau budget (its share; it gets at least this many \
             slots when it has waiters, lends what it leaves idle).",
        );
        let bureau_in_flight =
            IntGauge::new("bureau_guard_bureau_in_flight", "Requests at the bureau now.").expect("valid metric");
        let bureau_concurrency_limit = IntGauge::new(
            "bureau_guard_bureau_concurrency_limit",
            "Current bureau capacity budget (moves with the adaptive limit).",
        )
        .expect("valid metric");
        let bureau_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("bureau_guard_bureau_duration_seconds", "Time the bureau took to answer a call.")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let bureau_calls_abandoned_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_bureau_calls_abandoned_total",
                "Bureau calls whose requesters had all gone (disconnected, timed out) before the answer arrived; \
                 they kept their bureau slot and their quota charge to the end, and their answer was still cached.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        let bureau_calls_charged_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_bureau_calls_charged_total",
                "Bureau calls the bureau took and the tenant was charged for (its refusals and unreachable calls \
                 not): what the bureau bills, the usage statement's bureau_calls.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        let usage_charge_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "bureau_guard_usage_charge_seconds",
                "Time a bureau call waited, before it was sent, for its usage charge to be written and synced \
                 (group commit; with usage.dir only).",
            )
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1]),
        )
        .expect("valid metric");
        let usage_write_errors_total = IntCounter::new(
            "bureau_guard_usage_write_errors_total",
            "Usage writes (a call's charge, a flush) that failed: the counts stay in memory and are written with \
             the next flush; until then a crash would lose them.",
        )
        .expect("valid metric");
        let bureau_calls_cut_total = IntCounter::new(
            "bureau_guard_bureau_calls_cut_total",
            "Bureau calls closed after upstream.max_call_time without an answer: their slot was freed while the \
             bureau may still be working on them (the only way the budget can be exceeded).",
        )
        .expect("valid metric");
        let breaker_state = IntGauge::new(
            "bureau_guard_breaker_state",
            "Circuit breaker in front of the bureau: 0 closed, 1 open (answering at once), 2 half-open (probing).",
        )
        .expect("valid metric");
        let adaptive_knee = Gauge::new(
            "bureau_guard_adaptive_knee",
            "The adaptive limit's estimate of the bureau's knee: how many calls it serves at once without queueing \
             them (0 without [upstream.adaptive]).",
        )
        .expect("valid metric");
        let adaptive_baseline_seconds = Gauge::new(
            "bureau_guard_adaptive_baseline_seconds",
            "The bureau's no-load latency as the adaptive limit last measured it (0 until measured).",
        )
        .expect("valid metric");
        let adaptive_latency_seconds = Gauge::new(
            "bureau_guard_adaptive_latency_seconds",
            "Mean bureau latency in the adaptive limit's last cruise window.",
        )
        .expect("valid metric");
        let adaptive_queueing = Gauge::new(
            "bureau_guard_adaptive_queueing",
            "Calls the adaptive limit estimates are waiting inside the bureau, N*(1 - baseline/latency): about 0 at \
             the knee.",
        )
        .expect("valid metric");
        let adaptive_phase = IntGaugeVec::new(
            Opts::new(
                "bureau_guard_adaptive_phase",
                "The adaptive limit's phase: 1 for the current one (cruise, probe_down, probe_up).",
            ),
            &["phase"],
        )
        .expect("valid metric");
        for phase in ["cruise", "probe_down", "probe_up"] {
            adaptive_phase.with_label_values(&[phase]);
        }
        let breaker_opened_total = IntCounter::new(
            "bureau_guard_breaker_opened_total",
            "Times the circuit breaker opened after bureau failures in a row (or a failed probe).",
        )
        .expect("valid metric");
        let bureau_holds_total = IntCounter::new(
            "bureau_guard_bureau_holds_total",
            "Times a bureau 429/503 started or lengthened a hold on new bureau calls (its Retry-After).",
        )
        .expect("valid metric");

        let reloads_total = IntCounterVec::new(
            Opts::new("bureau_guard_reloads_total", "Config reloads, by result (applied or rejected)."),
            &["result"],
        )
        .expect("valid metric");
        for result in ["applied", "rejected"] {
            reloads_total.with_label_values(&[result]);
        }
        let reload_last_success_timestamp_seconds = IntGauge::new(
            "bureau_guard_reload_last_success_timestamp_seconds",
            "Unix time of the last applied config (start-up counts).",
        )
        .expect("valid metric");

        let bureau_responses_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_bureau_responses_total",
                "Answers from the bureau by status class (its own 5xx are passed through with outcome=bureau).",
            ),
            &["class"],
        )
        .expect("valid metric");
        let bureau_responses =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| bureau_responses_total.with_label_values(&[class]));

        // Process metrics (CPU, memory, open files): process_* names, the convention dashboards expect.
        let process = prometheus::process_collector::ProcessCollector::for_self();

        let cache_lookups_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_cache_lookups_total",
                "Cache look-ups by result: hit, miss, or stale (expired but within stale_if_error: served only \
                 if the bureau fails).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let cache_stores_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_cache_stores_total",
                "Bureau answers offered to the cache, by result: stored, or the reason they were not.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let cache_evictions_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_cache_evictions_total",
                "Entries that left the cache, by cause: size, expired, purged, replaced.",
            ),
            &["cause"],
        )
        .expect("valid metric");
        let cache_entries =
            IntGauge::new("bureau_guard_cache_entries", "Entries in the cache (approximate).").expect("valid metric");
        let cache_bytes = IntGauge::new(
            "bureau_guard_cache_bytes",
            "Weighted size of the cache: bodies, headers and a fixed overhead per entry (bounded by cache.max_bytes).",
        )
        .expect("valid metric");
        let coalesce_in_flight = IntGauge::new(
            "bureau_guard_coalesce_in_flight",
            "Bureau calls in flight that identical look-ups can join.",
        )
        .expect("valid metric");
        let audit_records_total =
            IntCounter::new("bureau_guard_audit_records_total", "Audit lines written.").expect("valid metric");
        let audit_write_errors_total = IntCounter::new(
            "bureau_guard_audit_write_errors_total",
            "Audit lines that could not be written (disk full, file gone): each one is a lost record.",
        )
        .expect("valid metric");
        let audit_dropped_total = IntCounter::new(
            "bureau_guard_audit_dropped_total",
            "Audit records not queued because the writer was behind or stopped: each one is a lost record.",
        )
        .expect("valid metric");
        let audit_healthy = IntGauge::new(
            "bureau_guard_audit_healthy",
            "1 while the audit log is written without loss (or not configured), 0 after a lost record.",
        )
        .expect("valid metric");
        audit_healthy.set(1);
        let tls_handshakes_total = IntCounterVec::new(
            Opts::new(
                "bureau_guard_tls_handshakes_total",
                "TLS handshakes on the listener, by result: ok, untrusted, expired, revoked, no_client_cert, \
                 timeout, failed.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let tls_certificate_expiry_timestamp_seconds = IntGaugeVec::new(
            Opts::new(
                "bureau_guard_tls_certificate_expiry_timestamp_seconds",
                "Unix time at which a certificate bureau-guard presents expires: cert=server (to banks), \
                 upstream_client (to the bureau) or redis_client (to Redis).",
            ),
            &["cert"],
        )
        .expect("valid metric");
        let tls_crl_next_update_timestamp_seconds = IntGaugeVec::new(
            Opts::new(
                "bureau_guard_tls_crl_next_update_timestamp_seconds",
                "Unix time by which a server.tls.crl file is due to be replaced (its nextUpdate), by its \
                 position in the crl list; past it, revocations published since are not known.",
            ),
            &["crl"],
        )
        .expect("valid metric");

        for c in [
            Box::new(process) as Box<dyn prometheus::core::Collector>,
            Box::new(requests_total.clone()),
            Box::new(reloads_total.clone()),
            Box::new(bureau_responses_total),
            Box::new(reload_last_success_timestamp_seconds.clone()),
            Box::new(cache_lookups_total.clone()),
            Box::new(cache_stores_total.clone()),
            Box::new(cache_evictions_total.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(coalesce_in_flight.clone()),
            Box::new(audit_records_total.clone()),
            Box::new(audit_write_errors_total.clone()),
            Box::new(audit_dropped_total.clone()),
            Box::new(audit_healthy.clone()),
            Box::new(tls_handshakes_total.clone()),
            Box::new(tls_certificate_expiry_timestamp_seconds.clone()),
            Box::new(tls_crl_next_update_timestamp_seconds.clone()),
            Box::new(queue_wait_seconds.clone()),
            Box::new(sheds_total.clone()),
            Box::new(queue_depth.clone()),
            Box::new(level_in_flight.clone()),
            Box::new(level_queued.clone()),
            Box::new(level_nominal.clone()),
            Box::new(bureau_in_flight.clone()),
            Box::new(bureau_concurrency_limit.clone()),
            Box::new(bureau_duration_seconds.clone()),
            Box::new(bureau_calls_abandoned_total.clone()),
            Box::new(bureau_calls_charged_total.clone()),
            Box::new(usage_charge_seconds.clone()),
            Box::new(usage_write_errors_total.clone()),
            Box::new(bureau_calls_cut_total.clone()),
            Box::new(breaker_state.clone()),
            Box::new(adaptive_knee.clone()),
            Box::new(adaptive_baseline_seconds.clone()),
            Box::new(adaptive_latency_seconds.clone()),
            Box::new(adaptive_queueing.clone()),
            Box::new(adaptive_phase.clone()),
            Box::new(breaker_opened_total.clone()),
            Box::new(bureau_holds_total.clone()),
            Box::new(request_duration_seconds.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(build_info),
            Box::new(limit_rejections_total.clone()),
            Box::new(quota_used.clone()),
            Box::new(quota_limit.clone()),
            Box::new(route_quota_used.clone()),
            Box::new(route_quota_limit.clone()),
            Box::new(group_quota_used.clone()),
            Box::new(group_quota_limit.clone()),
            Box::new(state_load_errors_total.clone()),
            Box::new(state_save_errors_total.clone()),
            Box::new(state_last_save_timestamp_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let connections = crate::server::ConnMetrics::register(&registry);
        let auth_penalties_total = IntCounter::new(
            "bureau_guard_auth_penalties_total",
            "Source addresses held off (429 too_many_auth_failures) after repeated failed authentications.",
        )
        .expect("valid metric");
        registry.register(Box::new(auth_penalties_total.clone())).expect("metric names are unique");
        Metrics {
            connections,
            auth_penalties_total,
            registry,
            requests_total,
            request_duration_seconds,
            requests_in_flight,
            limit_rejections_total,
            quota_used,
            quota_limit,
            route_quota_used,
            route_quota_limit,
            group_quota_used,
            group_quota_limit,
            state_load_errors_total,
            state_save_errors_total,
            state_last_save_timestamp_seconds,
            queue_wait_seconds,
            sheds_total,
            queue_depth,
            level_in_flight,
            level_queued,
            level_nominal,
            bureau_in_flight,
            bureau_concurrency_limit,
            bureau_duration_seconds,
            bureau_calls_abandoned_total,
            bureau_calls_charged_total,
            usage_charge_seconds,
            usage_write_errors_total,
            bureau_calls_cut_total,
            breaker_state,
            adaptive_knee,
            adaptive_baseline_seconds,
            adaptive_latency_seconds,
            adaptive_queueing,
            adaptive_phase,
            breaker_opened_total,
            bureau_holds_total,
            reloads_total,
            reload_last_success_timestamp_seconds,
            bureau_responses,
            cache_lookups_total,
            cache_stores_total,
            cache_evictions_total,
            cache_entries,
            cache_bytes,
            coalesce_in_flight,
            audit_records_total,
            audit_write_errors_total,
            audit_dropped_total,
            audit_healthy,
            tls_handshakes_total,
            tls_certificate_expiry_timestamp_seconds,
            tls_crl_next_update_timestamp_seconds,
            crl_positions: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Handshake counters, one per result, resolved once (and so exported at zero from the start).
    pub fn handshake_counters(&self) -> crate::tls::HandshakeCounters {
        crate::tls::HandshakeCounters(
            crate::tls::Handshake::ALL.map(|h| self.tls_handshakes_total.with_label_values(&[h.as_str()])),
        )
    }

    /// Sets the certificate expiry and CRL due gauges from a config, at start-up
    /// (`at_start`) and on every reload, following what is *running*: the listener's
    /// certificate and CRLs only while it serves TLS, and kept as they were when a reload
    /// turned `[server.tls]` off (the listener keeps its last ones until a restart); the Redis
    /// client certificate only from the start-up config (`[state.redis]` needs a restart).
    /// Series are overwritten in place, so a scrape never finds one missing mid-update.
    pub fn set_certificate_expiry(&self, config: &crate::config::Config, listener_tls: bool, at_start: bool) {
        let g = &self.tls_certificate_expiry_timestamp_seconds;
        let crl = &self.tls_crl_next_update_timestamp_seconds;
        if let Some(t) = config.server.tls.as_ref().filter(|_| listener_tls) {
            g.with_label_values(&["server"]).set(t.not_after);
            // "server.tls.crl[1]" → "1": bounded by the config. Positions no longer listed, or
            // whose CRL has no nextUpdate, stop being exported.
            let due: std::collections::HashMap<&str, i64> = t
                .crl_next_update
                .iter()
                .map(|(path, next)| (path.trim_start_matches("server.tls.crl[").trim_end_matches(']'), *next))
                .collect();
            let before = self.crl_positions.swap(t.crls.len(), std::sync::atomic::Ordering::Relaxed);
            for i in 0..before.max(t.crls.len()) {
                let index = i.to_string();
                match due.get(index.as_str()) {
                    Some(next) => crl.with_label_values(&[&index]).set(*next),
                    None => {
                        let _ = crl.remove_label_values(&[&index]);
                    }
                }
            }
        }
        match config.upstream.tls.as_ref().and_then(|t| t.client_not_after) {
            Some(at) => g.with_label_values(&["upstream_client"]).set(at),
            None => {
                let _ = g.remove_label_values(&["upstream_client"]);
            }
        }
        if at_start
            && let crate::config::StateBackend::Redis(r) = &config.state.backend
            && let Some(at) = r.tls.as_ref().and_then(|t| t.client_not_after)
        {
            g.with_label_values(&["redis_client"]).set(at);
        }
    }

    /// Handles for the cache, resolved once (see `cache/store.rs`).
    pub fn cache_handles(&self) -> CacheMetrics {
        let lookup = |r: &str| self.cache_lookups_total.with_label_values(&[r]);
        let evicted = |c: &str| self.cache_evictions_total.with_label_values(&[c]);
        CacheMetrics {
            hits: lookup("hit"),
            misses: lookup("miss"),
            stale: lookup("stale"),
            stores: self.cache_stores_total.clone(),
            evicted_size: evicted("size"),
            evicted_expired: evicted("expired"),
            evicted_purged: evicted("purged"),
            evicted_replaced: evicted("replaced"),
            entries: self.cache_entries.clone(),
            bytes: self.cache_bytes.clone(),
        }
    }

    /// Handles for usage (see `usage/`).
    pub fn usage_handles(&self) -> UsageMetrics {
        UsageMetrics {
            charge_seconds: self.usage_charge_seconds.clone(),
            write_errors: self.usage_write_errors_total.clone(),
        }
    }

    /// Handles for the audit log (see `cache/audit.rs`).
    pub fn audit_handles(&self) -> AuditMetrics {
        AuditMetrics {
            records: self.audit_records_total.clone(),
            write_errors: self.audit_write_errors_total.clone(),
            dropped: self.audit_dropped_total.clone(),
            healthy: self.audit_healthy.clone(),
        }
    }

    /// The text exposition format of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("writing to a Vec cannot fail");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The cache's metric handles: look-up results, stores, evictions by cause, size gauges.
#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub stale: IntCounter,
    /// By result: `stored` or the reason an answer was not cached (rare path: one per bureau call).
    pub stores: IntCounterVec,
    pub evicted_size: IntCounter,
    pub evicted_expired: IntCounter,
    pub evicted_purged: IntCounter,
    pub evicted_replaced: IntCounter,
    pub entries: IntGauge,
    pub bytes: IntGauge,
}

/// Usage's metric handles.
#[derive(Clone)]
pub struct UsageMetrics {
    pub charge_seconds: Histogram,
    pub write_errors: IntCounter,
}

impl UsageMetrics {
    /// Handles registered nowhere (unit tests, benchmarks).
    pub fn unregistered() -> UsageMetrics {
        UsageMetrics {
            charge_seconds: Histogram::with_opts(HistogramOpts::new("usage_charge_seconds", "unregistered"))
                .expect("valid metric"),
            write_errors: IntCounter::new("usage_write_errors_total", "unregistered").expect("valid metric"),
        }
    }
}

/// The audit log's metric handles.
#[derive(Clone)]
pub struct AuditMetrics {
    pub records: IntCounter,
    pub write_errors: IntCounter,
    pub dropped: IntCounter,
    pub healthy: IntGauge,
}

/// Handles for one (tenant, route) pair.
pub struct Cell {
    duration: Histogram,
    outcomes: [OnceLock<IntCounter>; Outcome::COUNT],
    tenant: String,
    route: String,
}

/// Lazily resolved metric handles per (tenant, route), so the hot path touches no registry lock.
pub struct RequestCells {
    tenant_labels: Vec<String>,
    route_labels: Vec<String>,
    cells: Box<[OnceLock<Cell>]>,
    /// `limit_rejections_total` handles: tenant × reason × mode.
    limits: Box<[OnceLock<IntCounter>]>,
    /// Scheduler handles per tenant.
    tenants: Box<[OnceLock<TenantCell>]>,
}

/// Scheduler metric handles of one tenant.
pub struct TenantCell {
    pub queue_wait: Histogram,
    pub shed_queue_full: IntCounter,
    pub shed_queue_timeout: IntCounter,
    pub shed_bureau_hold: IntCounter,
    pub shed_overdue: IntCounter,
    pub shed_queue_full_total: IntCounter,
    /// The request's own deadline (`x-request-timeout-ms`) could not be met.
    pub shed_deadline: IntCounter,
    pub abandoned: IntCounter,
    pub charged: IntCounter,
}

/// The limit reasons, in `limits` table order.
const LIMIT_REASONS: [ErrorKind; 12] = [
    ErrorKind::RateLimited,
    ErrorKind::TooManyInFlight,
    ErrorKind::DailyQuotaExhausted,
    ErrorKind::MonthlyQuotaExhausted,
    ErrorKind::RouteRateLimited,
    ErrorKind::RouteTooManyInFlight,
    ErrorKind::RouteDailyQuotaExhausted,
    ErrorKind::RouteMonthlyQuotaExhausted,
    ErrorKind::GroupRateLimited,
    ErrorKind::GroupTooManyInFlight,
    ErrorKind::GroupDailyQuotaExhausted,
    ErrorKind::GroupMonthlyQuotaExhausted,
];

impl RequestCells {
    /// `tenants` and `routes` are the configured ids and names; `_none` (and `_passthrough` for
    /// routes) are added at the end.
    pub fn new(tenants: impl Iterator<Item = String>, routes: impl Iterator<Item = String>) -> RequestCells {
        let mut tenant_labels: Vec<String> = tenants.collect();
        tenant_labels.push(NONE_LABEL.to_string());
        let mut route_labels: Vec<String> = routes.collect();
        route_labels.push(NONE_LABEL.to_string());
        route_labels.push(PASSTHROUGH_LABEL.to_string());
        let n = tenant_labels.len() * route_labels.len();
        let l = tenant_labels.len() * LIMIT_REASONS.len() * 2;
        let t = tenant_labels.len();
        RequestCells {
            tenant_labels,
            route_labels,
            cells: (0..n).map(|_| OnceLock::new()).collect(),
            limits: (0..l).map(|_| OnceLock::new()).collect(),
            tenants: (0..t).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Index of the `_none` route label.
    pub fn route_none(&self) -> usize {
        self.route_labels.len() - 2
    }

    /// Index of the `_passthrough` route label.
    pub fn route_passthrough(&self) -> usize {
        self.route_labels.len() - 1
    }

    /// The label of route index `route`.
    pub fn route_label(&self, route: usize) -> &str {
        &self.route_labels[route]
    }

    /// Counts a request over a tenant limit (`reason` is one of the 429 kinds).
    pub fn record_limit(&self, metrics: &Metrics, tenant: usize, reason: ErrorKind, mode: Mode) {
        let Some(r) = LIMIT_REASONS.iter().position(|k| *k == reason) else { return };
        let i = (tenant * LIMIT_REASONS.len() + r) * 2 + usize::from(mode == Mode::DryRun);
        self.limits[i]
            .get_or_init(|| {
                let mode = match mode {
                    Mode::Enforce => "enforced",
                    Mode::DryRun => "dry_run",
                };
                metrics.limit_rejections_total.with_label_values(&[&self.tenant_labels[tenant], reason.code(), mode])
            })
            .inc();
    }

    /// Scheduler metric handles of tenant index `tenant`.
    pub fn tenant(&self, metrics: &Metrics, tenant: usize) -> &TenantCell {
        self.tenants[tenant].get_or_init(|| {
            let id = self.tenant_labels[tenant].as_str();
            TenantCell {
                queue_wait: metrics.queue_wait_seconds.with_label_values(&[id]),
                shed_queue_full: metrics.sheds_total.with_label_values(&[id, "queue_full"]),
                shed_queue_timeout: metrics.sheds_total.with_label_values(&[id, "queue_timeout"]),
                shed_bureau_hold: metrics.sheds_total.with_label_values(&[id, "bureau_hold"]),
                shed_overdue: metrics.sheds_total.with_label_values(&[id, "overdue"]),
                shed_queue_full_total: metrics.sheds_total.with_label_values(&[id, "queue_full_total"]),
                shed_deadline: metrics.sheds_total.with_label_values(&[id, "deadline"]),
                abandoned: metrics.bureau_calls_abandoned_total.with_label_values(&[id]),
                charged: metrics.bureau_calls_charged_total.with_label_values(&[id]),
            }
        })
    }

    /// Records one finished request. `tenant`/`route` of `None` map to `_none`.
    pub fn record(&self, metrics: &Metrics, tenant: Option<usize>, route: usize, outcome: Outcome, seconds: f64) {
        let t = tenant.unwrap_or(self.tenant_labels.len() - 1);
        let i = t * self.route_labels.len() + route;
        let cell = self.cells[i].get_or_init(|| Cell {
            duration: metrics
                .request_duration_seconds
                .with_label_values(&[&self.tenant_labels[t], &self.route_labels[route]]),
            outcomes: std::array::from_fn(|_| OnceLock::new()),
            tenant: self.tenant_labels[t].clone(),
            route: self.route_labels[route].clone(),
        });
        cell.duration.observe(seconds);
        cell.outcomes[outcome.index()]
            .get_or_init(|| metrics.requests_total.with_label_values(&[&cell.tenant, &cell.route, outcome.as_str()]))
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::ErrorKind;

    #[test]
    fn records_with_bounded_labels() {
        let m = Metrics::new();
        let cells = RequestCells::new(["bank-a".to_string()].into_iter(), ["score".to_string()].into_iter());
        cells.record(&m, Some(0), 0, Outcome::Bureau, 0.002);
        cells.record(&m, Some(0), 0, Outcome::Bureau, 0.002);
        cells.record(&m, None, cells.route_none(), Outcome::Rejected(ErrorKind::MissingApiKey), 0.0001);
        assert_eq!(m.requests_total.with_label_values(&["bank-a", "score", "bureau"]).get(), 2);
        assert_eq!(m.requests_total.with_label_values(&["_none", "_none", "missing_api_key"]).get(), 1);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains("bureau_guard_request_duration_seconds_count{route=\"score\",tenant=\"bank-a\"} 2"),
            "{text}"
        );
        assert!(text.contains("bureau_guard_build_info{version="));
    }
}

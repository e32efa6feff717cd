//! The shared state's metrics: Redis up, replicas, calls and errors per script, fallback
//! decisions per limit.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Metrics of the shared state; `op` is one of a fixed set of names.
pub(super) struct RedisMetrics {
    pub(super) up: IntGauge,
    pub(super) replicas: IntGauge,
    pub(super) calls: IntCounterVec,
    pub(super) errors: IntCounterVec,
    pub(super) call_seconds: Histogram,
    pub(super) hot_path_timeouts: prometheus::IntCounter,
    pub(super) fallback: IntCounterVec,
    /// `fallback` resolved per [`Limit`] (no label lookup per request during an outage).
    pub(super) fallback_by_limit: [prometheus::IntCounter; 4],
    /// Times this replica found Redis without the data it had seen (a new epoch).
    pub(super) data_lost: prometheus::IntCounter,
    /// Times this replica found another live process heartbeating with its replica id.
    pub(super) id_conflicts: prometheus::IntCounter,
}

/// The limits a decision without Redis can be about (index into `fallback_by_limit`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Limit {
    Rate = 0,
    InFlight = 1,
    Daily = 2,
    Monthly = 3,
}

impl RedisMetrics {
    pub(super) fn register(registry: &Registry) -> RedisMetrics {
        let fallback = IntCounterVec::new(
            Opts::new(
                "bureau_guard_state_fallback_decisions_total",
                "Limit decisions made without Redis (on_unavailable), by limit",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let fallback_by_limit = ["rate", "in_flight", "daily", "monthly"].map(|l| fallback.with_label_values(&[l]));
        let m = RedisMetrics {
            up: IntGauge::new(
                "bureau_guard_state_redis_up",
                "1 while Redis answers, 0 while limits are decided by on_unavailable",
            )
            .expect("valid metric"),
            replicas: IntGauge::new("bureau_guard_replicas", "Live replicas sharing limits (from Redis heartbeats)")
                .expect("valid metric"),
            calls: IntCounterVec::new(
                Opts::new(
                    "bureau_guard_state_redis_calls_total",
                    "Redis scripts run, by operation (one round trip each)",
                ),
                &["op"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    "bureau_guard_state_redis_errors_total",
                    "Redis calls that failed or timed out, by operation",
                ),
                &["op"],
            )
            .expect("valid metric"),
            call_seconds: Histogram::with_opts(
                HistogramOpts::new("bureau_guard_state_redis_call_seconds", "Round trip of one Redis script call")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0]),
            )
            .expect("valid metric"),
            hot_path_timeouts: prometheus::IntCounter::new(
                "bureau_guard_state_redis_budget_exceeded_total",
                "Requests that waited state.redis.timeout for Redis and were decided by on_unavailable",
            )
            .expect("valid metric"),
            fallback,
            fallback_by_limit,
            data_lost: prometheus::IntCounter::new(
                "bureau_guard_state_redis_data_lost_total",
                "Times Redis was found without the data this replica had seen (restarted empty, or a failover to a replica that lagged): shared counts were lost",
            )
            .expect("valid metric"),
            id_conflicts: prometheus::IntCounter::new(
                "bureau_guard_state_replica_id_conflicts_total",
                "Times another live process was found heartbeating with this replica's state.redis.replica_id",
            )
            .expect("valid metric"),
        };
        for op in OPS {
            m.calls.with_label_values(&[op]);
            m.errors.with_label_values(&[op]);
        }

        let all: [Box<dyn prometheus::core::Collector>; 9] = [
            Box::new(m.data_lost.clone()),
            Box::new(m.id_conflicts.clone()),
            Box::new(m.up.clone()),
            Box::new(m.replicas.clone()),
            Box::new(m.calls.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.call_seconds.clone()),
            Box::new(m.hot_path_timeouts.clone()),
            Box::new(m.fallback.clone()),
        ];
        for c in all {
            registry.register(c).expect("metric names are unique");
        }
        m
    }
}

pub(super) const OPS: [&str; 8] =
    ["rate_lease", "rate_return", "quota_lease", "quota_return", "quota_sync", "in_flight", "heartbeat", "reset"];

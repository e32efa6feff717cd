//! The running proxy's state: a compiled config snapshot behind an atomic pointer, plus the
//! process-wide parts (metrics, request ids, readiness) that outlive any one config.
//!
//! A request loads the snapshot once and uses it to the end, so a reload (which stores a new
//! snapshot) never changes the rules under a request in flight, and the request path takes no
//! lock to read its config.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::task::TaskTracker;

use crate::admission::quota::Windows;
use crate::admission::tenant::TenantTable;
use crate::bureau::adaptive::{AdaptiveConfig, AdaptiveLimit, Phase};
use crate::bureau::breaker::Breaker;
use crate::bureau::headers::RequestIds;
use crate::bureau::scheduler::Scheduler;
use crate::bureau::upstream::Upstream;
use crate::cache::audit::AuditLog;
use crate::cache::coalesce::Coalescer;
use crate::cache::key::{KeySecret, KeySpec};
use crate::cache::store::{Cache, RoutePolicy};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StateBackend};
use crate::ops::metrics::{Metrics, RequestCells};
use crate::route::RouteTable;
use crate::state::StateRegistry;
use crate::state::redis::RedisState;

/// What the request path needs from `[server]` and `[log]`, copied out of the config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: u64,
    pub max_header_bytes: u64,
    pub request_timeout: Duration,
    pub pass_unmatched: bool,
    pub access_log: bool,
}

/// A route as the request path sees it.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub cost: u32,
    /// Cache and coalescing policy, if the route opts in.
    pub cache: Option<RouteCaching>,
}

/// How a route's look-ups are keyed, cached and coalesced.
#[derive(Debug)]
pub struct RouteCaching {
    pub key: KeySpec,
    /// `None`: not cached (coalescing only).
    pub policy: Option<RoutePolicy>,
    pub coalesce: bool,
}

/// One config, compiled into the tables the request path reads.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub limits: Limits,
    pub tenants: TenantTable,
    pub route_table: RouteTable,
    pub routes: Vec<Route>,
    pub upstream: Upstream,
    pub cells: RequestCells,
    /// Secret of the keyed look-up hashes (config, else random per process).
    pub key_secret: KeySecret,
    /// The scheduler slot of each `[[priority]]` level, by its place in the config: a level
    /// keeps its slot by name across reloads ([`set_levels`]), so its place may differ.
    pub level_slots: Vec<usize>,
}

impl Snapshot {
    /// The name of route index `route` (a configured route, or `_none` / `_passthrough`).
    pub fn route_name(&self, route: usize) -> Arc<str> {
        self.routes.get(route).map_or_else(|| Arc::from(self.cells.route_label(route)), |r| r.name.clone())
    }

    /// The scheduler slot of the config's priority level `level` (slot 0 without levels).
    pub fn level_slot(&self, level: usize) -> usize {
        self.level_slots.get(level).copied().unwrap_or(0)
    }

    /// Compiles a validated config. Cheap enough to run on every reload; never on the request path.
    /// Live tenant state (counters, rate buckets) comes from `states`; the bureau client (and its
    /// pool of open connections) is kept from `previous` when `[upstream]` did not change.
    pub fn compile(
        config: Arc<Config>,
        states: &StateRegistry,
        previous: Option<&Snapshot>,
        random_secret: &KeySecret,
    ) -> Snapshot {
        let route_table = RouteTable::new(&config.routes).expect("validated routes compile");
        Snapshot {
            limits: Limits {
                max_body: config.server.max_body,
                // Needs a restart (hyper's hard cap is fixed at bind): keep the running value.
                max_header_bytes: previous.map_or(config.server.max_header_bytes, |p| p.limits.max_header_bytes),
                request_timeout: config.server.request_timeout,
                pass_unmatched: config.server.pass_unmatched,
                access_log: config.log.access_log,
            },
            tenants: TenantTable::new(&config.tenants, &config.routes, &config.groups, cert_identity(&config), states),
            route_table,
            routes: config
                .routes
                .iter()
                .map(|r| Route {
                    name: Arc::from(r.name.as_str()),
                    cost: r.cost,
                    cache: r.cache.enabled().then(|| RouteCaching {
                        key: KeySpec::new(&r.name, r.cache.scope, r.cache.cache_key.clone()),
                        policy: RoutePolicy::from_config(&r.cache),
                        coalesce: r.cache.coalesce,
                    }),
                })
                .collect(),
            key_secret: config.cache.key_secret.clone().unwrap_or_else(|| random_secret.clone()),
            upstream: match previous {
                Some(p) if same_client(&p.config.upstream, &config.upstream) => p.upstream.clone(),
                // `server.workers` needs a restart: a pool per worker thread running, not per
                // the count a reload asks for (a worker without its own pool would share one).
                Some(p) => Upstream::new(&config.upstream, p.upstream.workers()),
                None => Upstream::new(&config.upstream, config.server.workers.threads()),
            },
            cells: RequestCells::new(
                config.tenants.iter().map(|t| t.id.clone()),
                config.routes.iter().map(|r| r.name.clone()),
            ),
            // Until the scheduler places the levels (`set_levels`), each in the slot of its place.
            level_slots: (0..config.priority.levels.len()).collect(),
            config,
        }
    }
}

/// Whether two `[upstream]` sections build the same client (budget and queue settings aside).
/// TLS compares file contents (digests), not paths: a certificate rotated in place gets a new client.
/// The kind of client certificate name that identifies tenants under `config`; `None` when it
/// verifies no client certificates.
fn cert_identity(config: &Config) -> Option<crate::tls::IdentitySource> {
    let tls = config.server.tls.as_ref()?;
    (tls.client_auth != crate::tls::ClientAuth::Off).then_some(tls.identity)
}

fn same_client(a: &crate::config::UpstreamConfig, b: &crate::config::UpstreamConfig) -> bool {
    a.url == b.url
        && a.tls == b.tls
        && a.connect_timeout == b.connect_timeout
        && a.max_call_time == b.max_call_time
        && a.pool_max_idle == b.pool_max_idle
        && a.pool_idle_timeout == b.pool_idle_timeout
        && a.max_response_body == b.max_response_body
}

/// State shared by every connection of one running proxy.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Per-tenant counters, by id; outlive snapshots.
    pub states: StateRegistry,
    /// Wall clock for quota windows (injectable for tests).
    pub clock: Arc<dyn Clock>,
    /// The bureau capacity budget, shared fairly; outlives snapshots (slots in use carry over).
    pub scheduler: Arc<Scheduler>,
    /// Limits shared with other replicas through Redis (`state.backend = "redis"`); fixed at
    /// start-up.
    pub redis: Option<Arc<RedisState>>,
    /// The adaptive controller sizing the scheduler's budget, if `[upstream.adaptive]` is set.
    pub adaptive: ArcSwapOption<AdaptiveLimit>,
    /// The file `reload` re-reads (None when started from a config in memory).
    pub config_path: Option<std::path::PathBuf>,
    /// Serializes reloads (never taken on the request path).
    pub reload_lock: std::sync::Mutex<()>,
    /// Bureau answers kept for repeated look-ups; outlives snapshots.
    pub cache: Cache,
    /// Identical look-ups in flight share one bureau call.
    pub coalescer: Coalescer,
    /// Bureau calls running on their own (coalesced flights, calls whose client has gone):
    /// shutdown waits for them so that their charges are kept.
    pub calls: TaskTracker,
    /// The bureau's health as this replica sees it: circuit breaker and Retry-After hold.
    pub breaker: Arc<Breaker>,
    /// The look-up key secret when the config gives none (random per process).
    pub random_secret: KeySecret,
    /// Who received which answer, if `[audit] file` is set.
    pub audit: Option<AuditLog>,
    /// Usage by tenant, route and day, for statements (`usage/`); outlives snapshots.
    pub usage: Arc<crate::usage::Usage>,
    pub metrics: Metrics,
    pub ids: RequestIds,
    /// False until the listeners are bound, and again once draining starts.
    pub ready: AtomicBool,
    /// `Keep-Alive: timeout=N` for HTTP/1.1 answers: hyper closes a connection that stays idle
    /// for `server.header_read_timeout`; saying so lets pooling clients retire it first instead
    /// of racing a request against the close.
    pub keep_alive: http::HeaderValue,
    /// The listener's TLS settings if it was started with `[server.tls]`; reload swaps in new
    /// certificates here (turning TLS on or off needs a restart).
    pub tls_listener: Option<Arc<ArcSwap<crate::tls::Listener>>>,
    /// Whose addresses are believed (`server.trusted_proxies`); fixed at start-up.
    pub trusted_proxies: crate::server::TrustedProxies,
    /// Failed authentications per source address, and their penalties.
    pub auth_failures: crate::server::auth_failures::AuthFailures,
    /// `bureau_guard_tls_handshakes_total`, one counter per result.
    pub handshakes: crate::tls::HandshakeCounters,
}

impl Shared {
    /// Shared state for `config` (tests and benches: no audit file may fail to open there).
    pub fn new(config: Config) -> Arc<Shared> {
        Shared::build(config, Arc::new(SystemClock), None).expect("no audit file to open")
    }

    /// Shared state for `config`, read from `config_path` (re-read on reload). Fails if the
    /// audit log cannot be opened, before anything binds.
    pub fn build(
        config: Config,
        clock: Arc<dyn Clock>,
        config_path: Option<std::path::PathBuf>,
    ) -> std::io::Result<Arc<Shared>> {
        let metrics = Metrics::new();
        let audit = match &config.audit.file {
            Some(path) => {
                Some(AuditLog::open(path, config.audit.fail_closed, metrics.audit_handles()).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot open the audit log {}: {e}", path.display()))
                })?)
            }
            None => None,
        };
        let usage = Arc::new(crate::usage::Usage::open(&config.usage, metrics.usage_handles())?);
        let cache = Cache::new(config.cache.max_bytes, config.cache.max_entry_bytes, metrics.cache_handles());
        let random_secret = KeySecret::random();
        let idle_s = config.server.header_read_timeout.as_secs().saturating_sub(1).max(1);
        let keep_alive =
            http::HeaderValue::from_str(&format!("timeout={idle_s}")).expect("digits are a valid header value");
        let states = StateRegistry::default();
        let scheduler = Scheduler::new(config.upstream.max_concurrency);
        scheduler.set_max_waiting(config.upstream.max_queue_total);
        let level_slots = set_levels(&scheduler, &config, &|_| None);
        let adaptive = adaptive_controller(&config);
        scheduler.set_controller(adaptive.clone());
        let redis = match &config.state.backend {
            StateBackend::Local => None,
            StateBackend::Redis(settings) => Some(
                RedisState::new(settings, scheduler.clone(), &metrics.registry)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
        };
        if redis.is_some() {
            // A statement from any replica covers them all (`usage/shared.rs`).
            usage
                .share()
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot share usage through Redis: {e}")))?;
        }
        let tls_listener =
            config.server.tls.as_ref().map(|t| Arc::new(ArcSwap::from_pointee(crate::tls::Listener::new(t))));
        let handshakes = metrics.handshake_counters();
        metrics.set_certificate_expiry(&config, tls_listener.is_some(), true);
        crate::ops::series::declare(&metrics, &config, None);
        let trusted_proxies = config.server.trusted_proxies.clone();
        let auth_failures = crate::server::auth_failures::AuthFailures::new(
            config.server.auth_penalty,
            metrics.auth_penalties_total.clone(),
        );
        let mut snapshot = Snapshot::compile(Arc::new(config), &states, None, &random_secret);
        snapshot.level_slots = level_slots;
        let calls = TaskTracker::new();
        let breaker = Breaker::new(
            metrics.breaker_state.clone(),
            metrics.breaker_opened_total.clone(),
            metrics.bureau_holds_total.clone(),
        );
        Ok(Arc::new(Shared {
            redis,
            snapshot: ArcSwap::from_pointee(snapshot),
            states,
            clock,
            scheduler,
            adaptive: ArcSwapOption::new(adaptive),
            config_path,
            reload_lock: std::sync::Mutex::new(()),
            cache,
            coalescer: Coalescer::with_tracker(calls.clone()),
            calls,
            breaker,
            random_secret,
            audit,
            usage,
            metrics,
            ids: RequestIds::default(),
            ready: AtomicBool::new(false),
            keep_alive,
            tls_listener,
            handshakes,
            trusted_proxies,
            auth_failures,
        }))
    }

    /// Ready for traffic: serving, not draining, and the audit log (if any) writing.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
            && self.audit.as_ref().is_none_or(AuditLog::healthy)
            // Two processes under one replica id: the one that found out stops taking traffic.
            && self.redis.as_ref().is_none_or(|r| !r.id_conflict())
    }
}

/// The adaptive controller `[upstream.adaptive]` asks for, if any; it starts at the full budget.
pub fn adaptive_controller(config: &Config) -> Option<Arc<AdaptiveLimit>> {
    let a = config.upstream.adaptive.as_ref()?;
    // From the bottom up, as TCP slow start: a budget set too high is never offered to the
    // bureau, and up probes find the knee within a second of the limit coming into use.
    let mut cfg = AdaptiveConfig::new(a.min, a.max, a.min);
    cfg.backoff = a.backoff;
    Some(Arc::new(AdaptiveLimit::new(cfg)))
}

impl Shared {
    /// A contract's (a tenant's, a route's, a group's) daily and monthly use: this process's counters, or with Redis the units all
    /// replicas have charged as last seen here.
    pub fn quota_used(&self, t: &crate::admission::contract::Contract, w: &Windows) -> (u64, u64) {
        match &self.redis {
            None => (t.state.daily.get(w.day), t.state.monthly.get(w.month)),
            Some(r) => r.quota_used(t, w),
        }
    }

    /// Sets the gauges that mirror live state (quota use, scheduler); called at each scrape.
    pub fn refresh_gauges(&self) {
        let snap = self.snapshot.load();
        let w = Windows::at(self.clock.now_unix_ms(), snap.config.quota.utc_offset);
        let m = &self.metrics;
        m.bureau_in_flight.set(self.scheduler.in_flight() as i64);
        m.coalesce_in_flight.set(self.coalescer.in_flight() as i64);
        self.cache.update_gauges();
        m.bureau_concurrency_limit.set(self.scheduler.limit() as i64);
        let view = self.adaptive.load().as_ref().map(|a| a.view());
        m.adaptive_knee.set(view.as_ref().map_or(0.0, |v| v.knee));
        m.adaptive_baseline_seconds.set(view.as_ref().and_then(|v| v.baseline).map_or(0.0, |d| d.as_secs_f64()));
        m.adaptive_latency_seconds.set(view.as_ref().and_then(|v| v.latency).map_or(0.0, |d| d.as_secs_f64()));
        m.adaptive_queueing.set(view.as_ref().and_then(|v| v.queueing).unwrap_or(0.0));
        for phase in [Phase::Cruise, Phase::ProbeDown, Phase::ProbeUp] {
            let current = view.as_ref().is_some_and(|v| v.phase == phase);
            m.adaptive_phase.with_label_values(&[phase.as_str()]).set(i64::from(current));
        }
        // Only the levels in force: a reload that removes one removes its series.
        for gauge in [&m.level_in_flight, &m.level_queued, &m.level_nominal] {
            gauge.reset();
        }
        for (i, level) in snap.config.priority.levels.iter().enumerate() {
            let stats = self.scheduler.level_stats(snap.level_slot(i));
            m.level_in_flight.with_label_values(&[&level.name]).set(stats.in_flight as i64);
            m.level_queued.with_label_values(&[&level.name]).set(stats.queued as i64);
            m.level_nominal.with_label_values(&[&level.name]).set(stats.nominal as i64);
        }
        for t in snap.tenants.iter() {
            let id = &*t.id;
            m.queue_depth.with_label_values(&[id]).set(self.scheduler.queued(t.state.index) as i64);
            let (daily, monthly) = self.quota_used(t, &w);
            m.quota_used.with_label_values(&[id, "daily"]).set(daily as i64);
            m.quota_used.with_label_values(&[id, "monthly"]).set(monthly as i64);
            if let Some(q) = t.limits.daily_quota {
                m.quota_limit.with_label_values(&[id, "daily"]).set(q as i64);
            }
            if let Some(q) = t.limits.monthly_quota {
                m.quota_limit.with_label_values(&[id, "monthly"]).set(q as i64);
            }
            for (i, route) in snap.routes.iter().enumerate() {
                let Some(c) = t.route_contract(i).map(|r| &r.contract) else { continue };
                let (used, limit) = (&m.route_quota_used, &m.route_quota_limit);
                self.contract_gauges(
                    c,
                    &w,
                    |window| used.with_label_values(&[id, &route.name, window]),
                    |window| limit.with_label_values(&[id, &route.name, window]),
                );
            }
        }
        // Each group once (its members share one contract).
        let mut seen = std::collections::HashSet::new();
        for g in snap.tenants.iter().filter_map(|t| t.group.as_ref()) {
            let Some(c) = g.contract.as_ref().filter(|_| seen.insert(g.index)) else { continue };
            let (used, limit) = (&m.group_quota_used, &m.group_quota_limit);
            self.contract_gauges(
                c,
                &w,
                |window| used.with_label_values(&[&g.id, window]),
                |window| limit.with_label_values(&[&g.id, window]),
            );
        }
    }

    /// A route's or group's quota use and limits, into the gauges `used` and `limit` name.
    fn contract_gauges(
        &self,
        c: &crate::admission::contract::Contract,
        w: &Windows,
        used: impl Fn(&str) -> prometheus::IntGauge,
        limit: impl Fn(&str) -> prometheus::IntGauge,
    ) {
        let (daily, monthly) = self.quota_used(c, w);
        for (window, quota, n) in [("daily", c.limits.daily_quota, daily), ("monthly", c.limits.monthly_quota, monthly)]
        {
            if let Some(q) = quota {
                used(window).set(n as i64);
                limit(window).set(q as i64);
            }
        }
    }
}

/// Sets `config`'s priority levels in `scheduler`, each keeping its slot by name; returns each
/// level's slot by its place in the config (for [`Snapshot::level_slots`]). The queued requests
/// of a removed level move to their tenant's default level (`default_of(tenant)`, a level's
/// place in the config).
pub fn set_levels(scheduler: &Scheduler, config: &Config, default_of: &dyn Fn(usize) -> Option<usize>) -> Vec<usize> {
    let levels: Vec<_> = config.priority.levels.iter().map(|l| (l.name.as_str(), l.spec)).collect();
    scheduler.set_named_levels(&levels, default_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(workers: usize, connect_timeout: &str) -> Config {
        let text = format!(
            "[server]\nworkers = {workers}\n[upstream]\nurl = \"http://127.0.0.1:8081\"\nconnect_timeout = \"{connect_timeout}\"\n\
             [[routes]]\nname = \"score\"\nmethod = \"GET\"\npath = \"/s\"\n\
             [[tenants]]\nid = \"a\"\napi_key_sha256 = \"{}\"\n[admin]\ninsecure_no_token = true\n",
            "ab".repeat(32)
        );
        Config::from_toml(&text, &|_: &str| None).expect("valid")
    }

    #[test]
    fn a_new_bureau_client_has_a_pool_for_each_running_worker_not_the_reloaded_count() {
        let (states, secret) = (StateRegistry::default(), KeySecret::random());
        let first = Snapshot::compile(Arc::new(config(4, "1s")), &states, None, &secret);
        assert_eq!(first.upstream.workers(), 4);
        // `server.workers` needs a restart: the process still runs 4 workers. A reload that
        // also changes `[upstream]` builds a new client, which must still have a pool per
        // running worker, or workers 3 and 4 would share pools with others (and worker 3 the
        // pool of the threads that are no worker).
        let second = Snapshot::compile(Arc::new(config(2, "2s")), &states, Some(&first), &secret);
        assert_eq!(second.upstream.workers(), 4);
    }
}

//! `state.backend = "redis"`: several replicas, one contract.
//!
//! Every replica behind the load balancer enforces the same tenant contract (rate, daily and
//! monthly look-ups, requests in flight) and the same bureau budget, through the Redis the
//! deployment already runs. Redis holds the authoritative state; each decision is one atomic
//! server-side script, and the request path reaches Redis only when this replica's leased batch
//! runs out (see `state/lease.rs`), never for longer than `state.redis.timeout`.
//!
//! | limit | in Redis (key, hash-tagged by tenant) | leased to a replica as |
//! |---|---|---|
//! | rate, burst | GCRA arrival time, µs, Redis clock (`{p:t}:rate`) | tokens; unused ones go back |
//! | daily / monthly | units leased out in the window (`{p:t}:daily:N`), expiring after it | quota units |
//! | max_in_flight | hash replica → `held:expiry_ms` (`{p:t}:inflight`) | slots, renewed each heartbeat |
//! | bureau budget | sorted set of live replicas by expiry (`{p}:replicas`), its creation time (`{p}:replicas:born`), each id's owning process (`{p}:owners`), the deployment's epoch (`{p}:epoch`) | `max_concurrency / replicas` |
//!
//! A replica that dies stops renewing: its in-flight slots expire after `lease_ttl` and it drops
//! out of the replica count; the quota units it held unspent are lost to the tenant (the safe
//! side: never more than one batch). All keys of one script share a hash tag, so the layout
//! works on Redis Cluster as on a single Redis.
//!
//! When Redis does not answer, or answers with an error: `fail_open` decides locally with this
//! replica's share of each limit (`rate / replicas`, the quota left at the last contact /
//! replicas, `max_in_flight / replicas`) and adds the quota units charged meanwhile to Redis
//! once it is back — each batch once, guarded by a unique token, so a retried sync never counts
//! twice; `fail_closed` answers 503 `state_unavailable`. Transitions are logged once and
//! counted in metrics.
//!
//! A Redis that comes back without its data (no persistence, a failover to a replica that
//! lagged) is noticed by the deployment's epoch key changing, and the bureau budget holds through
//! it: a replica set younger than `lease_ttl` may not list every live replica yet, so no replica
//! takes a larger share than it held until it is that old. Replica ids are owned by one process
//! at a time (`{p}:owners`): a second one under a live id refuses to start.

//! Here: the connection (`conn.rs`), the Lua scripts (`*.lua`, loaded by `scripts.rs`), metrics
//! (`metrics.rs`), the request path's leases (`admission.rs`), heartbeats and the tick
//! (`heartbeat.rs`), what a replica holds and gives back (`holdings.rs`), usage statements
//! across replicas (`usage.rs`); this file holds the
//! calls to Redis, the wait for a refill and the admin operations.

mod admission;
mod conn;
mod heartbeat;
mod holdings;
mod metrics;
mod scripts;
mod usage;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::Registry;
use redis::FromRedisValue;
use tokio::time::Instant;

use crate::admission::contract::Contract;
use crate::admission::quota::Windows;
use crate::admission::ratelimit::now_ns;
use crate::bureau::scheduler::Scheduler;
use crate::config::{FailPolicy, RedisSettings, redact_url};
use crate::respond::{ErrorKind, ProxyError};
use crate::state::TenantState;
use crate::state::lease::Lease;
use conn::Conn;
use metrics::{Limit, RedisMetrics};
pub use scripts::QUOTA_SYNC;
use scripts::Scripts;

/// How long a background call (heartbeat, refill in its own task, give-back) may take.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a quota window's key (and an outage sync token) outlives the window's end. The
/// expiry is computed on this replica's clock and applied on Redis's, and replicas' clocks
/// differ: a replica whose clock lags still charges the window that is over elsewhere, and
/// must find its count there rather than a key that expired and a fresh quota. An outage
/// that spans midnight syncs the old day's units after it ended, and the admin view shows
/// yesterday's count. Two days cover any of these with a wide margin; a key is a few bytes.
const WINDOW_GRACE_S: i64 = 2 * 86_400;
/// Tenants a heartbeat tick or the shutdown release serves at once.
const TICK_CONCURRENCY: usize = 16;
/// The shutdown release's give-backs, all tenants together: a hung Redis must not hold a
/// replica's exit for minutes (the drain is over; what is not given back is lost to the tenant,
/// the safe side).
const RELEASE_DEADLINE: Duration = Duration::from_secs(2);
/// Leaving the replica set at shutdown, after the release.
const LEAVE_TIMEOUT: Duration = Duration::from_millis(500);
/// A refused rate or in-flight request is not re-asked of Redis for this long; a quota
/// refusal holds longer (it lasts until the window ends, unless a reset or reload lifts it).
const DENY_HOLD: Duration = Duration::from_millis(10);
const QUOTA_DENY_HOLD: Duration = Duration::from_secs(1);
/// A limit whose call failed on one tenant's data (Redis up) is decided by on_unavailable for
/// this long before Redis is asked again.
const FAILED_CALL_HOLD: Duration = Duration::from_secs(1);

/// What is left of the time one request may wait for Redis (`state.redis.timeout`), shared by
/// its rate, in-flight and quota decisions.
#[derive(Debug, Clone, Copy)]
pub struct Budget(Duration);

/// How a wait for a lease ended.
enum Got {
    Yes,
    Denied(Duration),
    Unavailable,
}

/// Whether a Redis error is about one tenant's keys (a key of the wrong type, a script that
/// cannot read its value, a reply that does not convert) rather than Redis as a whole.
/// An error inside a script that quotes a server-wide one (older Redis wraps them in `ERR`) is
/// still server-wide.
fn fails_one_tenant(e: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    const SERVER_WIDE: [&str; 10] = [
        "OOM",
        "READONLY",
        "NOAUTH",
        "NOPERM",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "MISCONF",
        "NOREPLICAS",
    ];
    let in_script = || {
        let text = e.to_string();
        text.contains("script") && !SERVER_WIDE.iter().any(|code| text.contains(code))
    };
    // Not `Parse`: the wire protocol failing is the connection's problem, not a tenant's.
    matches!(e.kind(), ErrorKind::UnexpectedReturnType)
        || e.code() == Some("WRONGTYPE")
        || (e.code() == Some("ERR") && in_script())
}

/// The shared-state backend of one replica.
pub struct RedisState {
    conn: Conn,
    scripts: Scripts,
    settings: RedisSettings,
    replica: String,
    up: AtomicBool,
    /// Live replicas at the last heartbeat (at least 1; `expected_replicas` before the first).
    replicas: AtomicUsize,
    /// Where the next heartbeat tick starts in the tenant list.
    tick_start: AtomicUsize,
    /// Makes every outage sync token unique within this process...
    sync_seq: AtomicU64,
    /// ...and this random number across processes: a replica with a fixed `replica_id` that
    /// restarts counts `sync_seq` from 0 again, while the tokens of its previous life are kept
    /// in Redis for days; without it, its next outage's units would be taken as added already.
    sync_nonce: u64,
    /// The password in `settings.url` (as written and percent-decoded), kept out of logs.
    secrets: Vec<String>,
    /// This process in Redis's owner of its replica id (`sync_nonce` in hex).
    instance: String,
    /// The deployment's epoch this replica saw last: Redis holds one key for the deployment's
    /// life, written by the first replica to find none. A different one means Redis lost
    /// everything it held (the key included) since.
    epoch: std::sync::Mutex<Option<String>>,
    /// Another live process heartbeats with this replica's id (see `heartbeat`).
    id_conflict: AtomicBool,
    /// When an error about one tenant's keys was last logged (`now_ns`).
    local_error_logged: AtomicU64,
    /// The last copy of usage failed (logged once per run of failures, `usage.rs`).
    usage_failing: AtomicBool,
    scheduler: Arc<Scheduler>,
    metrics: RedisMetrics,
    /// The runtime that started the proxy, where refills run (see `spawn_refill`); `None` when
    /// built outside a runtime (then the caller's).
    background: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState").field("replica", &self.replica).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

impl RedisState {
    /// Prepares the backend; connects lazily (a Redis that is down at start-up means starting
    /// under `on_unavailable`, not failing to start).
    pub fn new(
        settings: &RedisSettings,
        scheduler: Arc<Scheduler>,
        registry: &Registry,
    ) -> Result<Arc<RedisState>, String> {
        let conn = Conn::new(settings).map_err(|e| format!("invalid Redis URL {}: {e}", redact_url(&settings.url)))?;
        let replica = settings.replica_id.clone().unwrap_or_else(default_replica_id);
        let metrics = RedisMetrics::register(registry);
        metrics.up.set(1);
        // Until Redis answers (the first heartbeat, before any traffic), assume the fleet's
        // size: a replica that starts during an outage must not take the whole bureau budget.
        // The smallest share (the highest rank), so no rank is assumed twice.
        let expected = settings.expected_replicas.max(1);
        metrics.replicas.set(expected as i64);
        scheduler.set_share(expected - 1, expected);
        let sync_nonce = getrandom::u64().map_err(|e| format!("no random source for the outage sync tokens: {e}"))?;
        Ok(Arc::new(RedisState {
            conn,
            scripts: Scripts::new(),
            settings: settings.clone(),
            replica,
            up: AtomicBool::new(true),
            replicas: AtomicUsize::new(expected),
            sync_seq: AtomicU64::new(0),
            tick_start: AtomicUsize::new(0),
            sync_nonce,
            instance: format!("{sync_nonce:016x}"),
            epoch: std::sync::Mutex::new(None),
            id_conflict: AtomicBool::new(false),
            secrets: url_secrets(&settings.url),
            local_error_logged: AtomicU64::new(0),
            usage_failing: AtomicBool::new(false),
            scheduler,
            metrics,
            background: tokio::runtime::Handle::try_current().ok(),
        }))
    }

    /// This replica's name in Redis.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Live replicas at the last heartbeat.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    fn key(&self, tenant: &str, what: std::fmt::Arguments<'_>) -> String {
        format!("{{{}:{tenant}}}:{what}", self.settings.key_prefix)
    }

    fn replicas_key(&self) -> String {
        format!("{{{}}}:replicas", self.settings.key_prefix)
    }

    /// The keys the heartbeat script reads besides the replica set (same hash tag).
    fn deployment_key(&self, what: &str) -> String {
        format!("{{{}}}:{what}", self.settings.key_prefix)
    }

    /// Whether another live process heartbeats with this replica's id (`/readyz` says 503).
    pub fn id_conflict(&self) -> bool {
        self.id_conflict.load(Ordering::Acquire)
    }

    /// What `/readyz` should tell the operator about the shared state, one line each.
    pub fn readiness_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.id_conflict() {
            notes.push(format!(
                "replica id {:?} is in use by another live process: give each replica its own state.redis.replica_id",
                self.replica
            ));
        }
        let lost = self.metrics.data_lost.get();
        if lost > 0 {
            notes.push(format!(
                "Redis lost its data {lost} time(s) since this replica started (restarted empty, or a failover to a replica that lagged): quota counts from before were lost"
            ));
        }
        notes
    }

    /// Runs one script with a background time bound, counting it; any failure marks Redis down.
    async fn call<T: FromRedisValue>(&self, op: &'static str, invocation: redis::ScriptInvocation<'_>) -> Option<T> {
        self.metrics.calls.with_label_values(&[op]).inc();
        let started = std::time::Instant::now();
        let call = self.conn.run(async |conn| invocation.invoke_async::<T>(conn).await);
        let result = tokio::time::timeout(BACKGROUND_TIMEOUT, call).await;
        self.metrics.call_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => Some(v),
            // The heartbeat touches no tenant's keys: any error there is Redis's.
            Ok(Err(e)) if op != "heartbeat" && fails_one_tenant(&e) => {
                // Bad data in one tenant's key (a key of another type, a value a script cannot
                // read): Redis is fine for everyone else, so this is no outage; the caller
                // holds that limit off for a moment (`Lease::fail`). Logged at most once a second.
                self.metrics.errors.with_label_values(&[op]).inc();
                let now = now_ns();
                let last = self.local_error_logged.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= 1_000_000_000
                    && self.local_error_logged.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
                {
                    tracing::error!(op, error = %self.redact(&e.to_string()), "Redis failed a bureau-guard script on one tenant's keys; that limit is decided by state.redis.on_unavailable for a second");
                }
                None
            }
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                // Not only a lost connection: a Redis that answers NOAUTH/WRONGPASS, OOM,
                // READONLY, LOADING, BUSY, CLUSTERDOWN cannot hold the limits either, and
                // answers the next call the same way. Treating it as an outage lets
                // on_unavailable decide at once, instead of every waiting request retrying for
                // its whole budget; the heartbeat's next success brings Redis back.
                self.mark_down(op, &self.redact(&e.to_string()));
                None
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                self.mark_down(op, "no answer within 1s");
                None
            }
        }
    }

    /// Logs the start of an outage once (the heartbeat logs its end).
    fn mark_down(&self, op: &str, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.up.set(0);
            tracing::error!(
                op,
                error = why,
                policy = ?self.settings.on_unavailable,
                "Redis unreachable or refusing our calls: shared limits are decided by state.redis.on_unavailable until a heartbeat succeeds"
            );
        }
    }

    /// An error text without the URL's password (client errors may quote the URL).
    fn redact(&self, text: &str) -> String {
        let mut text = text.replace(&self.settings.url, &redact_url(&self.settings.url));
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    /// The time one request may spend waiting for Redis, over all its limits.
    pub fn budget(&self) -> Budget {
        Budget(self.settings.timeout)
    }

    /// Waits (within what is left of the request's budget) until `ready` holds, starting one
    /// shared refill when the pool is short. Never waits while Redis is known to be down.
    async fn acquire(
        &self,
        budget: &mut Budget,
        lease: &Lease,
        (window, need): (u32, u64),
        ready: impl FnMut() -> bool,
        refill: impl Fn(),
    ) -> Got {
        let started = Instant::now();
        let got = self.acquire_until(started + budget.0, lease, (window, need), ready, refill).await;
        budget.0 = budget.0.saturating_sub(started.elapsed());
        got
    }

    async fn acquire_until(
        &self,
        deadline: Instant,
        lease: &Lease,
        (window, need): (u32, u64),
        mut ready: impl FnMut() -> bool,
        refill: impl Fn(),
    ) -> Got {
        loop {
            if ready() {
                return Got::Yes;
            }
            if let Some(retry) = lease.denied(now_ns(), window, need) {
                return Got::Denied(retry);
            }
            if !self.is_up() || lease.failing(now_ns()) {
                return Got::Unavailable;
            }
            let refilled = lease.refilled();
            tokio::pin!(refilled);
            refilled.as_mut().enable();
            if ready() {
                return Got::Yes;
            }
            if lease.start_refill() {
                refill();
            }
            if tokio::time::timeout_at(deadline, refilled).await.is_err() {
                self.metrics.hot_path_timeouts.inc();
                return Got::Unavailable;
            }
        }
    }

    /// Runs `work` in its own task, so a request that stops waiting cannot drop a grant that
    /// Redis already made; ends the refill when done.
    fn spawn_refill<F>(self: &Arc<Self>, state: &Arc<TenantState>, lease: fn(&TenantState) -> &Lease, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        /// Ends the refill however the task ends (a panic included): a refill flag left set
        /// would stop every later refill of this lease.
        struct Finish(Arc<TenantState>, fn(&TenantState) -> &Lease);
        impl Drop for Finish {
            fn drop(&mut self) {
                (self.1)(&self.0).finish_refill();
            }
        }
        let finish = Finish(state.clone(), lease);
        let task = async move {
            let _finish = finish;
            work.await;
        };
        // On the runtime that started the proxy, never on a worker thread's: the Redis client
        // opens its connection (a task, timers) on the runtime of whoever first needs it, and a
        // worker's runtime stops at shutdown, before the last give-backs to Redis.
        match &self.background {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    fn fallback(&self, limit: Limit) -> Result<(), ProxyError> {
        self.metrics.fallback_by_limit[limit as usize].inc();
        match self.settings.on_unavailable {
            FailPolicy::FailOpen => Ok(()),
            FailPolicy::FailClosed => Err(ProxyError::new(
                ErrorKind::StateUnavailable,
                "the shared limit store is unreachable and this deployment refuses rather than guess",
            )
            .retry_after(1)),
        }
    }

    /// Admin reset: the tenant's daily and monthly counts for the current windows start over
    /// for every replica. Returns the counts that were there, or `None` if Redis did not answer.
    pub async fn reset(&self, t: &Contract, w: &Windows) -> Option<(u64, u64)> {
        let (day, month) =
            (self.key(&t.id, format_args!("daily:{}", w.day)), self.key(&t.id, format_args!("monthly:{}", w.month)));
        let mut inv = self.scripts.reset.key(day);
        inv.key(month);
        match self.call::<(u64, u64)>("reset", inv).await {
            Some((d, m)) => {
                let l = t.state.leases();
                l.daily.avail.take_all();
                l.monthly.avail.take_all();
                l.daily.last_seen.set(w.day, 0);
                l.monthly.last_seen.set(w.month, 0);
                l.daily.clear_denial();
                l.monthly.clear_denial();
                Some((d, m))
            }
            None => None,
        }
    }

    /// Forgets every refusal held from Redis (after a reload: limits may have been raised), of
    /// every contract: tenants', routes' and groups'.
    pub fn forget_denials(&self, tenants: &crate::admission::tenant::TenantTable) {
        for t in tenants.contracts() {
            let l = t.state.leases();
            for lease in [&l.rate, &l.daily, &l.monthly, &l.in_flight] {
                lease.clear_denial();
            }
        }
    }

    /// Quota units leased out in the window across all replicas, as last seen (admin view).
    pub fn quota_used(&self, t: &Contract, w: &Windows) -> (u64, u64) {
        let l = t.state.leases();
        (
            l.daily.last_seen.get(w.day).saturating_sub(l.daily.avail.get(w.day)),
            l.monthly.last_seen.get(w.month).saturating_sub(l.monthly.avail.get(w.month)),
        )
    }
}

/// The password of a Redis URL (user info or `?password=`/`?pass=`), as written and decoded.
fn url_secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    if let (Some(scheme_end), Some(at)) = (base.find("://"), base.rfind('@'))
        && at > scheme_end
        && let Some((_, pw)) = base[scheme_end + 3..at].split_once(':')
    {
        out.push(pw.to_string());
    }
    for pair in query.split('&') {
        if let Some(("password" | "pass", pw)) = pair.split_once('=') {
            out.push(pw.to_string());
        }
    }
    let decoded: Vec<String> =
        out.iter().map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()).collect();
    out.extend(decoded);
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    out
}

/// `host-pid-random`: unique per process, readable in `redis-cli`.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    format!("{}-{}-{:04x}", if host.is_empty() { "replica" } else { &host }, std::process::id(), fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_of_a_redis_url_is_found_to_be_kept_out_of_logs() {
        assert_eq!(url_secrets("redis://:s%40cret@h:6379/0"), ["s%40cret", "s@cret"]);
        assert_eq!(url_secrets("rediss://user:pw@h"), ["pw"]);
        assert_eq!(url_secrets("redis+unix:///run/redis.sock?db=1&pass=pw2"), ["pw2"]);
        assert!(url_secrets("redis://h:6379").is_empty());
        assert!(url_secrets("redis://user@h:6379").is_empty());
    }
}

//! `state.backend = "redis"`: several replicas, one contract.
//!
//! Every replica behind the load balancer enforces the same tenant contract (rate, daily and
//! monthly look-ups, requests in flight) and the same bureau budget, through the Redis the
//! deployment already runs. Redis holds the authoritative state; each decision is one atomic
//! server-side script, and the request path reaches Redis only when this replica's leased batch
//! runs out (see `lease.rs` beside it), never for longer than `state.redis.timeout`.
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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use tokio::time::Instant;

use crate::admission::quota::{Reservation, Source, Windows};
use crate::admission::ratelimit::{InFlightGuard, RateDecision, RatePolicy, in_flight_refusal, now_ns};
use crate::admission::tenant::Tenant;
use crate::admission::verdict::{Mode, Verdict};
use crate::bureau::scheduler::Scheduler;
use crate::config::{FailPolicy, RedisSettings, redact_url};
use crate::respond::{ErrorKind, ProxyError};
use crate::state::TenantState;
use crate::state::lease::{Lease, PendingSync};

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

/// GCRA for a batch: grants up to `want` tokens of `t` µs each within burst tolerance `tau`,
/// and none unless at least `need` (what the waiting request still lacks): fewer would sit
/// unused in the pool while the request is refused. Returns {granted, retry_after_us (until
/// `need` are there), tokens left}.
const RATE_LEASE: &str = r"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local t, tau, want, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local n = math.floor((now + tau - tat) / t)
if n > want then n = want end
if n < need then
  return {0, tat + need * t - now - tau, 0}
end
tat = tat + n * t
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {n, 0, math.floor((now + tau - tat) / t)}
";

/// Gives `n` unused tokens of `t` µs back to the bucket (never before now).
const RATE_RETURN: &str = r"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat == 0 then return 0 end
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local back = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if back <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', math.ceil((back - now) / 1000) + 1000)
end
return 1
";

/// Leases up to `want` quota units within `limit` (-1: none); the key expires at ARGV[3]
/// (unix s). Returns {granted, leased out in the window}.
const QUOTA_LEASE: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local want, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit >= 0 and used + want > limit then want = limit - used end
if want < 1 then return {0, used} end
used = redis.call('INCRBY', KEYS[1], want)
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return {want, used}
";

/// Gives back `n` unspent quota units.
const QUOTA_RETURN: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
if n > used then n = used end
if n < 1 then return used end
return redis.call('DECRBY', KEYS[1], n)
";

/// Adds units charged while Redis was unreachable, once per token (`KEYS[2]`): a resent sync
/// adds nothing. No limit check: those bureau calls were made, and the count must say so even
/// past the limit. Returns {1 if added now (0: added before), units leased out in the window}.
/// Public so its semantics can be tested against a real Redis.
pub const QUOTA_SYNC: &str = r"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  local used = redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
  return {1, used}
end
return {0, tonumber(redis.call('GET', KEYS[1]) or '0')}
";

/// In-flight slots: fields replica → 'held:expiry_ms'. Drops expired fields, then sets ARGV[1]'s
/// slots to ARGV[3] ('set': a renewal, or a release at 0) or adds ARGV[3] to them ('add': a
/// refill; never fewer than held), never beyond what `max` (-1: none) leaves beside the other
/// live replicas, and renews the expiry. Returns {slots granted, held by this replica now,
/// held by all live replicas}.
const IN_FLIGHT: &str = r"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local mode, n, max, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local all = redis.call('HGETALL', KEYS[1])
local others, mine = 0, 0
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, ':', 1, true)
  local held, exp = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
  if exp <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] == ARGV[1] then
    mine = held
  else
    others = others + held
  end
end
local target = n
if mode == 'add' then target = mine + n end
if max >= 0 and others + target > max then target = max - others end
if mode == 'add' and target < mine then target = mine end
if target <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return {0, 0, others}
end
redis.call('HSET', KEYS[1], ARGV[1], target .. ':' .. (now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local granted = target - mine
if granted < 0 then granted = 0 end
return {granted, target, others + target}
";

/// Admin reset of both quota windows; returns what they held.
const RESET: &str = r"
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[1], KEYS[2])
return {d, m}
";

/// Heartbeat: drops replicas whose lease expired, renews ours. KEYS: the replica set, when it
/// was last created (ms, Redis clock), the deployment's epoch, the owners of replica ids (id →
/// `instance:expiry_ms`). ARGV: id, lease ttl ms, an epoch to write if there is none, this
/// process's instance, `join` (start-up: do not enter the set under an id another live process
/// renews) or `beat`.
///
/// Returns {live replicas, our rank among them by name (ranks split the bureau budget's
/// remainder deterministically), age of the replica set ms, epoch, 1 if another live process
/// holds our id}. A set created less than a lease ttl ago may not yet hold every live replica
/// (a Redis that lost its data, or the first replica of a deployment): see `heartbeat`.
const HEARTBEAT: &str = r"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[3], epoch)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], now, 'PX', ttl * 2)
end
local born = tonumber(redis.call('GET', KEYS[2]) or now)
local owners = redis.call('HGETALL', KEYS[4])
local dup = 0
for i = 1, #owners, 2 do
  local v = owners[i + 1]
  local sep = string.find(v, ':', 1, true)
  local exp = tonumber(string.sub(v, sep + 1))
  if exp <= now then
    redis.call('HDEL', KEYS[4], owners[i])
  elseif owners[i] == ARGV[1] and string.sub(v, 1, sep - 1) ~= ARGV[4] then
    dup = 1
  end
end
if dup == 1 and ARGV[5] == 'join' then
  return {0, 0, now - born, epoch, 1}
end
if dup == 0 then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[4] .. ':' .. (now + ttl))
end
redis.call('PEXPIRE', KEYS[4], ttl * 2)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
for i, m in ipairs(members) do
  if m == ARGV[1] then return {#members, i - 1, now - born, epoch, dup} end
end
return {#members, 0, now - born, epoch, dup}
";

/// Leaving at shutdown: out of the replica set, and the id given up if it is still ours.
const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
local v = redis.call('HGET', KEYS[2], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
";

/// A connection to a single Redis (reconnecting by itself) or to a Redis Cluster (connected on
/// first use, and again after a failure).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<ClusterConn>),
}

struct ClusterConn {
    client: redis::cluster::ClusterClient,
    conn: arc_swap::ArcSwapOption<redis::cluster_async::ClusterConnection>,
}

impl Conn {
    fn new(settings: &RedisSettings) -> redis::RedisResult<Conn> {
        let certs = settings.tls.as_ref().map(tls_certificates).transpose()?;
        if settings.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(vec![settings.url.as_str()])
                .connection_timeout(BACKGROUND_TIMEOUT / 2)
                .response_timeout(BACKGROUND_TIMEOUT)
                .retries(1);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            return Ok(Conn::Cluster(Arc::new(ClusterConn { client, conn: arc_swap::ArcSwapOption::empty() })));
        }
        let client = match certs {
            Some(certs) => redis::Client::build_with_tls(settings.url.as_str(), certs)?,
            None => redis::Client::open(settings.url.as_str())?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(BACKGROUND_TIMEOUT / 2))
            .set_response_timeout(Some(BACKGROUND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Ok(Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?))
    }

    /// Runs `f` on a connection; a cluster connection that failed is dropped and made again
    /// on the next call.
    async fn run<T, F>(&self, f: F) -> redis::RedisResult<T>
    where
        F: AsyncFnOnce(&mut AnyConn) -> redis::RedisResult<T>,
    {
        match self {
            Conn::Single(c) => f(&mut AnyConn::Single(c.clone())).await,
            Conn::Cluster(c) => {
                let mut conn = AnyConn::Cluster(match c.conn.load_full() {
                    Some(conn) => (*conn).clone(),
                    None => {
                        let conn = c.client.get_async_connection().await?;
                        c.conn.store(Some(Arc::new(conn.clone())));
                        conn
                    }
                });
                let result = f(&mut conn).await;
                if result.as_ref().is_err_and(|e| e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
                    c.conn.store(None);
                }
                result
            }
        }
    }
}

/// The PEM files of `state.redis.ca` / `client_cert` + `client_key` for the redis crate's
/// rustls (already checked by config validation; read again here, at start-up only).
fn tls_certificates(tls: &crate::config::RedisTls) -> redis::RedisResult<redis::TlsCertificates> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "cannot read a TLS file",
                format!("{}: {e}", path.display()),
            ))
        })
    };
    Ok(redis::TlsCertificates {
        root_cert: tls.ca.as_deref().map(read).transpose()?,
        client_tls: match &tls.client {
            Some((cert, key)) => Some(redis::ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? }),
            None => None,
        },
    })
}

/// One connection of either kind, for the scripts (`Script` needs a sized `ConnectionLike`).
enum AnyConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The scripts, hashed once (`EVALSHA`, with a fallback to `EVAL` after a Redis restart).
struct Scripts {
    rate_lease: Script,
    rate_return: Script,
    quota_lease: Script,
    quota_return: Script,
    quota_sync: Script,
    in_flight: Script,
    heartbeat: Script,
    leave: Script,
    reset: Script,
}

/// Metrics of the shared state; `op` is one of a fixed set of names.
struct RedisMetrics {
    up: IntGauge,
    replicas: IntGauge,
    calls: IntCounterVec,
    errors: IntCounterVec,
    call_seconds: Histogram,
    hot_path_timeouts: prometheus::IntCounter,
    fallback: IntCounterVec,
    /// `fallback` resolved per [`Limit`] (no label lookup per request during an outage).
    fallback_by_limit: [prometheus::IntCounter; 4],
    /// Times this replica found Redis without the data it had seen (a new epoch).
    data_lost: prometheus::IntCounter,
    /// Times this replica found another live process heartbeating with its replica id.
    id_conflicts: prometheus::IntCounter,
}

/// The limits a decision without Redis can be about (index into `fallback_by_limit`).
#[derive(Debug, Clone, Copy)]
enum Limit {
    Rate = 0,
    InFlight = 1,
    Daily = 2,
    Monthly = 3,
}

impl RedisMetrics {
    fn register(registry: &Registry) -> RedisMetrics {
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

const OPS: [&str; 8] =
    ["rate_lease", "rate_return", "quota_lease", "quota_return", "quota_sync", "in_flight", "heartbeat", "reset"];

/// What is left of the time one request may wait for Redis (`state.redis.timeout`), shared by
/// its rate, in-flight and quota decisions.
#[derive(Debug, Clone, Copy)]
pub struct Budget(Duration);

impl Budget {
    /// No waiting at all (the local backend never needs one).
    pub const ZERO: Budget = Budget(Duration::ZERO);
}

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

/// Which quota a lease is for.
#[derive(Debug, Clone, Copy)]
enum Period {
    Day,
    Month,
}

/// One unit of one quota, taken or not.
enum Taken {
    /// Within the limit, from `Source`, charged to window `u32`.
    Within(Source, u32),
    /// Past the limit, which is in dry run: taken all the same.
    Over(Source, u32),
    /// The limit is reached (and enforced).
    Exhausted,
}

/// A heartbeat at start-up, or one of the renewals after it.
#[derive(Clone, Copy)]
enum Beat {
    Join,
    Renew,
}

/// What a heartbeat that Redis answered found.
enum Joined {
    Yes,
    /// (Start-up only.) Another live process renews this replica's id.
    IdTaken,
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
    scheduler: Arc<Scheduler>,
    metrics: RedisMetrics,
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
            scripts: Scripts {
                rate_lease: Script::new(RATE_LEASE),
                rate_return: Script::new(RATE_RETURN),
                quota_lease: Script::new(QUOTA_LEASE),
                quota_return: Script::new(QUOTA_RETURN),
                quota_sync: Script::new(QUOTA_SYNC),
                in_flight: Script::new(IN_FLIGHT),
                heartbeat: Script::new(HEARTBEAT),
                leave: Script::new(LEAVE),
                reset: Script::new(RESET),
            },
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
            scheduler,
            metrics,
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
        tokio::spawn(async move {
            let _finish = finish;
            work.await;
        });
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

    // -----------------------------------------------------------------------------------------
    // Rate

    /// The tenant's rate decision across all replicas.
    pub async fn rate(
        self: &Arc<Self>,
        budget: &mut Budget,
        tenant: &Arc<Tenant>,
        policy: &RatePolicy,
        cost: u32,
    ) -> Result<RateDecision, ProxyError> {
        let lease = &tenant.state.leases().rate;
        let cost = u64::from(cost.max(1));
        let got = self
            .acquire(
                budget,
                lease,
                (0, cost),
                || lease.avail.try_take(0, cost),
                || self.refill_rate(tenant, policy, cost),
            )
            .await;
        match got {
            Got::Yes => {
                let left = lease.last_seen.load().1 + lease.avail.load().1;
                let remaining = left.min(u64::from(policy.burst)) as u32;
                let reset = policy.emission().saturating_mul(policy.burst.saturating_sub(remaining));
                Ok(RateDecision::Allowed { remaining, reset })
            }
            Got::Denied(retry_after) => Ok(RateDecision::Limited { retry_after }),
            Got::Unavailable => {
                self.fallback(Limit::Rate)?;
                let n = self.replicas() as f64;
                // The burst share never below the request's cost, or a costly route could never
                // pass on a share (it would be refused with a Retry-After that never comes true).
                let burst = ((f64::from(policy.burst) / n) as u32).max(cost as u32).max(1);
                let share = RatePolicy::new(policy.rate / n, burst);
                Ok(share.check(&tenant.state.rate_tat, now_ns(), cost as u32))
            }
        }
    }

    fn refill_rate(self: &Arc<Self>, tenant: &Arc<Tenant>, policy: &RatePolicy, cost: u64) {
        let (this, id, state, policy) = (self.clone(), tenant.id.clone(), tenant.state.clone(), *policy);
        let period = self.settings.lease;
        self.spawn_refill(&tenant.state, |s| &s.leases().rate, async move {
            let lease = &state.leases().rate;
            let now = now_ns();
            // The request needs `cost` tokens; what the pool holds counts towards them.
            let need = cost.saturating_sub(lease.avail.load().1).max(1);
            let cap = u64::from(policy.burst / 2).max(1);
            let want = lease.next_batch(need, cap, period, now);
            let t_us = policy.emission().as_micros().max(1) as u64;
            let tau_us = t_us.saturating_mul(u64::from(policy.burst.max(1)));
            let key = this.key(&id, format_args!("rate"));
            let mut inv = this.scripts.rate_lease.key(key);
            inv.arg(t_us).arg(tau_us).arg(want).arg(need);
            if let Some((granted, retry_us, left)) = this.call::<(u64, u64, u64)>("rate_lease", inv).await {
                lease.last_seen.set(0, left);
                if granted > 0 {
                    lease.granted_at.store(now_ns(), Ordering::Relaxed);
                    lease.avail.put(0, granted);
                } else {
                    let retry = Duration::from_micros(retry_us);
                    lease.deny(now_ns(), 0, cost, retry.min(DENY_HOLD), retry);
                }
            } else if this.is_up() {
                lease.fail(now_ns(), FAILED_CALL_HOLD);
            }
        });
    }

    // -----------------------------------------------------------------------------------------
    // In flight

    /// Makes sure this replica holds a slot in Redis for every request of the tenant inside it
    /// now, `guard`'s included: over `max` across all replicas is refused (the guard dropped),
    /// or let through in dry run. `Err`: Redis unreachable and `fail_closed`.
    pub async fn in_flight(
        self: &Arc<Self>,
        budget: &mut Budget,
        tenant: &Arc<Tenant>,
        max: u32,
        guard: InFlightGuard,
    ) -> Result<Verdict<InFlightGuard>, ProxyError> {
        let s = &tenant.state;
        let inside = || s.in_flight.load(Ordering::Acquire);
        let ttl = self.settings.lease_ttl.as_nanos() as u64;
        // Slots Redis has not confirmed within lease_ttl may have expired there.
        let held = || {
            let confirmed = s.leases().held_confirmed_at.load(Ordering::Acquire);
            if now_ns().saturating_sub(confirmed) < ttl { s.leases().held.load(Ordering::Acquire) } else { 0 }
        };
        let got = self
            .acquire(
                budget,
                &s.leases().in_flight,
                (0, 1),
                || inside() <= held(),
                || self.refill_in_flight(tenant, max),
            )
            .await;
        let over = match got {
            Got::Yes => false,
            Got::Denied(_) => true,
            Got::Unavailable => {
                self.fallback(Limit::InFlight)?;
                let share = (max as usize / self.replicas()).max(1) as u32;
                inside() > share
            }
        };
        Ok(match over {
            false => Verdict::Allow(guard),
            true => Verdict::over(guard, in_flight_refusal(), Mode::of(tenant.limits.dry_run.in_flight)),
        })
    }

    fn refill_in_flight(self: &Arc<Self>, tenant: &Arc<Tenant>, max: u32) {
        let (this, id, state) = (self.clone(), tenant.id.clone(), tenant.state.clone());
        let (period, ttl) = (self.settings.lease, self.settings.lease_ttl);
        self.spawn_refill(&tenant.state, |s| &s.leases().in_flight, async move {
            let leases = state.leases();
            let confirmed = leases.held_confirmed_at.load(Ordering::Acquire);
            let fresh = now_ns().saturating_sub(confirmed) < ttl.as_nanos() as u64;
            let held = if fresh { leases.held.load(Ordering::Acquire) } else { 0 };
            let need = u64::from(state.in_flight.load(Ordering::Acquire).saturating_sub(held).max(1));
            let cap = u64::from(max) / (2 * this.replicas() as u64);
            let want = leases.in_flight.next_batch(need, cap.max(1), period, now_ns());
            let key = this.key(&id, format_args!("inflight"));
            let mut inv = this.scripts.in_flight.key(key);
            inv.arg(&this.replica).arg("add").arg(want).arg(max).arg(ttl.as_millis() as u64);
            if let Some((granted, mine, _all)) = this.call::<(u64, u32, u64)>("in_flight", inv).await {
                leases.held.store(mine, Ordering::Release);
                leases.held_confirmed_at.store(now_ns(), Ordering::Release);
                if granted > 0 {
                    leases.in_flight.granted_at.store(now_ns(), Ordering::Relaxed);
                } else {
                    leases.in_flight.deny(now_ns(), 0, 1, DENY_HOLD, Duration::from_secs(1));
                }
            } else if this.is_up() {
                leases.in_flight.fail(now_ns(), FAILED_CALL_HOLD);
            }
        });
    }

    // -----------------------------------------------------------------------------------------
    // Quotas

    /// Reserves one bureau call against the tenant's daily and monthly quotas, shared by all
    /// replicas. `Err`: Redis unreachable and `fail_closed`.
    pub async fn reserve(
        self: &Arc<Self>,
        budget: &mut Budget,
        tenant: &Arc<Tenant>,
        w: &Windows,
        now_unix_s: i64,
    ) -> Result<Verdict<Reservation>, ProxyError> {
        let limits = &tenant.limits;
        let mut dry_run_hit = None;
        let (daily, day) = match limits.daily_quota {
            None => (Source::None, w.day),
            Some(limit) => match self.take_quota(budget, tenant, Period::Day, w, limit, now_unix_s).await? {
                Taken::Within(source, day) => (source, day),
                Taken::Over(source, day) => {
                    dry_run_hit = Some(w.day_refusal());
                    (source, day)
                }
                Taken::Exhausted => return Ok(Verdict::Refuse(w.day_refusal())),
            },
        };
        // Built now, so an early return below gives the daily unit back.
        let mut reservation = Reservation::shared(tenant.state.clone(), day, daily);
        if let Some(limit) = limits.monthly_quota {
            match self.take_quota(budget, tenant, Period::Month, w, limit, now_unix_s).await? {
                Taken::Within(source, month) => reservation.set_monthly(source, month),
                Taken::Over(source, month) => {
                    dry_run_hit = dry_run_hit.or(Some(w.month_refusal()));
                    reservation.set_monthly(source, month);
                }
                Taken::Exhausted => return Ok(Verdict::Refuse(w.month_refusal())),
            }
        }
        Ok(Verdict::admitted(reservation, dry_run_hit))
    }

    /// One unit of one quota: from the leased pool, else a refill, else (Redis down) the
    /// outage allowance.
    async fn take_quota(
        self: &Arc<Self>,
        budget: &mut Budget,
        tenant: &Arc<Tenant>,
        period: Period,
        w: &Windows,
        limit: u64,
        now_unix_s: i64,
    ) -> Result<Taken, ProxyError> {
        let s = &tenant.state;
        let (lease, outage, window, dry_run, resets_in) = match period {
            Period::Day => {
                (&s.leases().daily, &s.leases().outage_daily, w.day, tenant.limits.dry_run.daily, w.day_resets_in_s)
            }
            Period::Month => (
                &s.leases().monthly,
                &s.leases().outage_monthly,
                w.month,
                tenant.limits.dry_run.monthly,
                w.month_resets_in_s,
            ),
        };
        let mode = Mode::of(dry_run);
        // A request that computed its window just before midnight, when the pool has already
        // moved on, is charged to the newer window (as the local counters do): leasing units
        // of a day that is over would strand them.
        let window = window.max(lease.avail.load().0);
        let expire_at = now_unix_s + resets_in as i64 + WINDOW_GRACE_S;
        let got = self
            .acquire(
                budget,
                lease,
                (window, 1),
                || lease.avail.try_take(window, 1),
                || self.refill_quota(tenant, period, window, limit, mode, expire_at),
            )
            .await;
        let taken = |source, over: bool| if over { Taken::Over(source, window) } else { Taken::Within(source, window) };
        match got {
            Got::Yes => Ok(taken(Source::Pool, dry_run && lease.last_seen.get(window) > limit)),
            Got::Denied(_) => Ok(Taken::Exhausted),
            Got::Unavailable => {
                self.fallback(match period {
                    Period::Day => Limit::Daily,
                    Period::Month => Limit::Monthly,
                })?;
                // This replica's share of what was left at the last contact.
                let left = limit.saturating_sub(lease.last_seen.get(window));
                let share = left / self.replicas() as u64;
                match outage.try_add(window, 1, Some(share), mode) {
                    Ok(n) => Ok(taken(Source::Outage, n > share)),
                    Err(_) => Ok(Taken::Exhausted),
                }
            }
        }
    }

    fn refill_quota(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        period: Period,
        window: u32,
        limit: u64,
        mode: Mode,
        expire_at: i64,
    ) {
        let (this, id, state) = (self.clone(), tenant.id.clone(), tenant.state.clone());
        let lease_of: fn(&TenantState) -> &Lease = match period {
            Period::Day => |s| &s.leases().daily,
            Period::Month => |s| &s.leases().monthly,
        };
        let period_name = match period {
            Period::Day => "daily",
            Period::Month => "monthly",
        };
        let lease_period = self.settings.lease;
        self.spawn_refill(&tenant.state, lease_of, async move {
            let lease = lease_of(&state);
            // Never hold more than a quarter of what is left divided among the replicas: a
            // replica that dies loses what it holds.
            // (In dry run too: the limit is not enforced, but it still bounds what is held.)
            let left = limit.saturating_sub(lease.last_seen.get(window));
            let cap = (left / (4 * this.replicas() as u64)).max(1);
            let want = lease.next_batch(1, cap, lease_period, now_ns());
            let key = this.key(&id, format_args!("{period_name}:{window}"));
            let mut inv = this.scripts.quota_lease.key(key);
            inv.arg(want).arg(if mode == Mode::Enforce { limit as i64 } else { -1 }).arg(expire_at);
            if let Some((granted, used)) = this.call::<(u64, u64)>("quota_lease", inv).await {
                lease.last_seen.set(window, used);
                if granted > 0 {
                    lease.granted_at.store(now_ns(), Ordering::Relaxed);
                    lease.avail.put(window, granted);
                } else {
                    lease.deny(now_ns(), window, 1, QUOTA_DENY_HOLD, Duration::from_secs(1));
                }
            } else if this.is_up() {
                lease.fail(now_ns(), FAILED_CALL_HOLD);
            }
        });
    }

    // -----------------------------------------------------------------------------------------
    // Background: heartbeats, renewals, give-backs, recovery

    /// Start-up's first heartbeat. `Err` when another live process renews this replica's id: two
    /// processes under one id count as one replica, and each would take that one's share of
    /// the bureau budget. An id whose holder has died (a crash, then a restart under a fixed id)
    /// is free once its lease runs out, so this waits up to `lease_ttl` for that before
    /// refusing. `Ok(false)`: Redis did not answer (on_unavailable applies until it does).
    pub async fn join(&self) -> Result<bool, String> {
        let deadline = Instant::now() + self.settings.lease_ttl + self.settings.heartbeat_interval;
        loop {
            match self.beat(Beat::Join).await {
                None => return Ok(false),
                Some(Joined::Yes) => return Ok(true),
                Some(Joined::IdTaken) if Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.heartbeat_interval).await;
                }
                Some(Joined::IdTaken) => {
                    self.metrics.id_conflicts.inc();
                    return Err(format!(
                        "state.redis.replica_id {:?} is renewed by another live replica; give each replica its own id (or leave replica_id out)",
                        self.replica
                    ));
                }
            }
        }
    }

    /// Announces this replica, learns how many are live, and takes this replica's share of the
    /// bureau budget. Returns whether Redis answered.
    pub async fn heartbeat(&self) -> bool {
        self.beat(Beat::Renew).await.is_some()
    }

    async fn beat(&self, mode: Beat) -> Option<Joined> {
        let mut inv = self.scripts.heartbeat.key(self.replicas_key());
        inv.key(self.deployment_key("replicas:born"))
            .key(self.deployment_key("epoch"))
            .key(self.deployment_key("owners"));
        inv.arg(&self.replica)
            .arg(self.settings.lease_ttl.as_millis() as u64)
            // A new epoch unique to this write: one this replica wrote before, written again
            // after Redis lost it, must not look like the one it saw.
            .arg(format!("{}-{:016x}", self.instance, fastrand::u64(..)))
            .arg(&self.instance)
            .arg(match mode {
                Beat::Join => "join",
                Beat::Renew => "beat",
            });
        let (count, rank, age_ms, epoch, taken) =
            self.call::<(usize, usize, u64, String, u8)>("heartbeat", inv).await?;
        self.check_epoch(epoch);
        let taken = taken == 1;
        if taken && matches!(mode, Beat::Join) {
            return Some(Joined::IdTaken);
        }
        if taken != self.id_conflict.swap(taken, Ordering::AcqRel) {
            if taken {
                self.metrics.id_conflicts.inc();
                tracing::error!(
                    replica = %self.replica,
                    "another live process heartbeats with this replica's state.redis.replica_id: both count as one replica and the bureau budget can be exceeded; /readyz answers 503 until it is gone"
                );
            } else {
                tracing::info!(replica = %self.replica, "this replica's id is its own again");
            }
        }
        // A set younger than a lease ttl may not list every live replica yet: Redis lost it (a
        // restart without persistence, a failover to a replica that lagged), or this is the
        // first replica of a deployment. Each replica that is missing from it would count
        // itself almost alone and take most of the budget; so until every live replica has had
        // a full lease ttl to heartbeat, none takes a larger share than the one it holds.
        let count = count.max(1);
        let before = self.replicas.load(Ordering::Relaxed);
        let settling = u128::from(age_ms) < self.settings.lease_ttl.as_millis();
        let (count, rank) = if settling && count < before { (before, before - 1) } else { (count, rank) };
        self.replicas.store(count, Ordering::Relaxed);
        self.metrics.replicas.set(count as i64);
        self.scheduler.set_share(rank, count);
        if before != count {
            tracing::info!(
                replicas = count,
                rank,
                limit = self.scheduler.limit(),
                "replica count changed; bureau budget re-split"
            );
        }
        Some(Joined::Yes)
    }

    /// Notices a Redis that lost its data: the epoch it holds is not the one seen before.
    fn check_epoch(&self, epoch: String) {
        let mut seen = self.epoch.lock().expect("epoch lock not poisoned");
        if let Some(before) = seen.as_deref()
            && before != epoch
        {
            self.metrics.data_lost.inc();
            tracing::error!(
                "Redis lost its data (restarted without persistence, or a failover to a replica that lagged): the shared quota counts, rate state and replica set are gone; tenants may get more than their daily and monthly quota this window. Each replica keeps its share of the bureau budget until the replica set is rebuilt"
            );
        }
        *seen = Some(epoch);
    }

    /// One heartbeat tick: heartbeat, then (while Redis answers) for every tenant: the units
    /// charged during an outage, in-flight lease renewal, the return of rate tokens that sat
    /// unused. `retired` are tenants a reload removed: what they hold goes back.
    pub async fn tick(
        &self,
        tenants: &[Arc<Tenant>],
        retired: &[(String, Arc<TenantState>)],
        w: &Windows,
        now_unix_s: i64,
    ) {
        let started = Instant::now();
        let was_up = self.is_up();
        if !self.heartbeat().await {
            return;
        }
        if !was_up && !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.up.set(1);
            tracing::info!("Redis answers again: shared limits resume; units charged meanwhile are being added");
        }
        if !was_up {
            for t in tenants {
                t.state.leases().rate.clear_denial();
                t.state.leases().daily.clear_denial();
                t.state.leases().monthly.clear_denial();
            }
        }
        // Tenants overlap (their calls share the multiplexed connection, so they go out
        // pipelined): a tick costs a few round trips, not three per tenant. Tenants a reload
        // removed go first (few, and what they hold is of use to no one here); the others start
        // where the last tick stopped, so ticks cut short do not keep skipping the same ones.
        let start = self.tick_start.load(Ordering::Relaxed) % tenants.len().max(1);
        let done = AtomicUsize::new(0);
        let work = async {
            futures_util::stream::iter(retired)
                .for_each_concurrent(TICK_CONCURRENCY, |(id, state)| async move {
                    self.release_tenant(id, state, None, w, now_unix_s).await;
                })
                .await;
            futures_util::stream::iter(tenants[start..].iter().chain(&tenants[..start]))
                .for_each_concurrent(TICK_CONCURRENCY, |t| async {
                    // A Redis that stops answering mid-tick ends the tick: the next heartbeat
                    // must not wait behind a timeout per tenant.
                    if !self.is_up() {
                        return;
                    }
                    // Every tick, not only the first after an outage: a failed sync is retried.
                    self.sync_outage(&t.id, &t.state, w, now_unix_s).await;
                    if self.is_up() {
                        self.renew_in_flight(&t.id, &t.state, t.limits.max_in_flight).await;
                    }
                    if self.is_up() {
                        self.return_idle_rate(t).await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
        };
        // The next heartbeat must come within lease_ttl (or this replica is counted out and its
        // slots expire): half of it for the whole tick leaves at least one heartbeat interval
        // (validation: lease_ttl >= 2 x heartbeat_interval). What a cut tick did not reach
        // waits for the next one; a sync cut in flight is resent with its token.
        let bound = self.settings.lease_ttl / 2;
        let cut = tokio::time::timeout(bound.saturating_sub(started.elapsed()), work).await.is_err();
        let done = done.load(Ordering::Relaxed);
        if done < tenants.len() {
            // The next tick starts after the ones this one finished (in rough order: they ran
            // 16 at a time).
            self.tick_start.store(start + done, Ordering::Relaxed);
        }
        if cut {
            tracing::warn!(
                ?bound,
                tenants = tenants.len(),
                done,
                "a heartbeat tick was cut short; the rest waits for the next"
            );
        }
    }

    /// Adds the units charged during an outage. Each batch is sent with a token Redis
    /// remembers, and resent with the same token until acknowledged, so a sync whose answer
    /// was lost is not counted twice. The answer's total becomes the quota's last seen use:
    /// the next outage's share is of what is left after this one (and the other replicas'
    /// outages synced before), not again of what was left before it.
    async fn sync_outage(&self, id: &str, state: &TenantState, w: &Windows, now_unix_s: i64) {
        let l = state.leases();
        for (k, (counter, lease, name, resets_in)) in [
            (&l.outage_daily, &l.daily, "daily", w.day_resets_in_s),
            (&l.outage_monthly, &l.monthly, "monthly", w.month_resets_in_s),
        ]
        .into_iter()
        .enumerate()
        {
            let pending = l.pending_sync.lock().expect("pending sync lock not poisoned")[k];
            let batch = match pending {
                Some(p) => p,
                None => {
                    let (window, units) = counter.load();
                    if units == 0 {
                        continue;
                    }
                    let p = PendingSync { seq: self.sync_seq.fetch_add(1, Ordering::Relaxed), window, units };
                    l.pending_sync.lock().expect("pending sync lock not poisoned")[k] = Some(p);
                    p
                }
            };
            let key = self.key(id, format_args!("{name}:{}", batch.window));
            let token = self.key(id, format_args!("sync:{}:{:016x}:{}", self.replica, self.sync_nonce, batch.seq));
            let keep = resets_in as i64 + WINDOW_GRACE_S;
            let mut inv = self.scripts.quota_sync.key(key);
            inv.key(token).arg(batch.units).arg(now_unix_s + keep).arg(keep);
            // Either answer is an acknowledgement: added now, or added before (a lost answer).
            if let Some((_added, used)) = self.call::<(u64, u64)>("quota_sync", inv).await {
                lease.last_seen.raise(batch.window, used);
                counter.sub(batch.window, batch.units);
                l.pending_sync.lock().expect("pending sync lock not poisoned")[k] = None;
                tracing::info!(
                    tenant = id,
                    quota = name,
                    units = batch.units,
                    "units charged during the Redis outage added"
                );
            }
        }
    }

    /// Renews this replica's in-flight slots, keeping only those in use: an idle replica must
    /// not sit on a slot another replica needs. Skipped while a refill runs (next tick).
    async fn renew_in_flight(&self, id: &str, state: &TenantState, max: Option<u32>) {
        let l = state.leases();
        let held = l.held.load(Ordering::Acquire);
        if held == 0 {
            return;
        }
        let Some(_no_refill_meanwhile) = l.in_flight.refill_guard() else { return };
        let inside = || state.in_flight.load(Ordering::Acquire);
        l.held.store(held.min(inside()), Ordering::Release);
        // A request that entered while we shrank is covered: never below what is inside now.
        let target = held.min(inside());
        l.held.store(target, Ordering::Release);
        let key = self.key(id, format_args!("inflight"));
        let mut inv = self.scripts.in_flight.key(key);
        let max = max.map_or(-1, i64::from);
        inv.arg(&self.replica).arg("set").arg(target).arg(max).arg(self.settings.lease_ttl.as_millis() as u64);
        if let Some((_, now_held, _)) = self.call::<(u64, u32, u64)>("in_flight", inv).await {
            l.held.store(now_held, Ordering::Release);
            l.held_confirmed_at.store(now_ns(), Ordering::Release);
        }
    }

    /// Rate tokens leased more than two lease periods (or a second) ago and still unused go
    /// back to the shared bucket, where other replicas can use them.
    async fn return_idle_rate(&self, t: &Tenant) {
        let Some(policy) = &t.rate else { return };
        let lease = &t.state.leases().rate;
        let age = Duration::from_nanos(now_ns().saturating_sub(lease.granted_at.load(Ordering::Relaxed)));
        if lease.avail.load().1 == 0 || age < (self.settings.lease * 2).max(Duration::from_secs(1)) {
            return;
        }
        let (_, n) = lease.avail.take_all();
        self.give_back_rate(&t.id, policy, n).await;
    }

    async fn give_back_rate(&self, id: &str, policy: &RatePolicy, n: u64) {
        if n == 0 {
            return;
        }
        let key = self.key(id, format_args!("rate"));
        let mut inv = self.scripts.rate_return.key(key);
        inv.arg(n).arg(policy.emission().as_micros().max(1) as u64);
        let _ = self.call::<i64>("rate_return", inv).await;
    }

    /// Gives back everything this replica holds for one tenant: outage units are added,
    /// unspent quota units and rate tokens returned, in-flight slots freed.
    async fn release_tenant(
        &self,
        id: &str,
        state: &TenantState,
        rate: Option<&RatePolicy>,
        w: &Windows,
        now_unix_s: i64,
    ) {
        // Each step only while Redis answers: a hung Redis costs one timeout, not one per step.
        if !self.is_up() {
            return;
        }
        self.sync_outage(id, state, w, now_unix_s).await;
        let l = state.leases();
        if let Some(policy) = rate
            && self.is_up()
        {
            let (_, n) = l.rate.avail.take_all();
            self.give_back_rate(id, policy, n).await;
        }
        for (lease, name) in [(&l.daily, "daily"), (&l.monthly, "monthly")] {
            if !self.is_up() {
                return;
            }
            let (window, n) = lease.avail.take_all();
            if n > 0 {
                let mut inv = self.scripts.quota_return.key(self.key(id, format_args!("{name}:{window}")));
                inv.arg(n);
                let _ = self.call::<i64>("quota_return", inv).await;
            }
        }
        if self.is_up() && l.held.swap(0, Ordering::AcqRel) > 0 {
            let mut inv = self.scripts.in_flight.key(self.key(id, format_args!("inflight")));
            inv.arg(&self.replica).arg("set").arg(0).arg(-1).arg(1);
            let _ = self.call::<(u64, u32, u64)>("in_flight", inv).await;
        }
    }

    /// On shutdown (after the drain): everything this replica holds goes back, within
    /// `RELEASE_DEADLINE` (2 s) in all, and it leaves the replica count. With Redis down (or once
    /// it stops answering) the give-backs are skipped: unsynced outage units are lost (logged),
    /// in-flight slots expire with the lease, unspent units are lost to the tenant (the safe
    /// side). Leaving is tried either way, on its own short bound, so a Redis that answers
    /// again hands this replica's share of the bureau budget to the others at once.
    pub async fn release_all(&self, tenants: &[Arc<Tenant>], w: &Windows, now_unix_s: i64) {
        if self.is_up() {
            let release = futures_util::stream::iter(tenants).for_each_concurrent(TICK_CONCURRENCY, |t| async move {
                if self.is_up() {
                    self.release_tenant(&t.id, &t.state, t.rate.as_ref(), w, now_unix_s).await;
                }
            });
            if tokio::time::timeout(RELEASE_DEADLINE, release).await.is_err() {
                tracing::warn!(deadline = ?RELEASE_DEADLINE, "shutting down: Redis too slow to take back everything this replica held");
            }
        }
        let unsynced: u64 = tenants
            .iter()
            .map(|t| t.state.leases().outage_daily.load().1 + t.state.leases().outage_monthly.load().1)
            .sum();
        if unsynced > 0 {
            tracing::error!(
                units = unsynced,
                "shutting down with Redis unreachable: quota units charged during the outage are not in Redis"
            );
        }
        let leave = async {
            // A connection that died in the outage fails its first command and reconnects.
            for _ in 0..2 {
                let mut inv = self.scripts.leave.key(self.replicas_key());
                inv.key(self.deployment_key("owners")).arg(&self.replica).arg(&self.instance);
                if self.conn.run(async |c| inv.invoke_async::<i64>(c).await).await.is_ok() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LEAVE_TIMEOUT, leave).await;
    }

    /// Admin reset: the tenant's daily and monthly counts for the current windows start over
    /// for every replica. Returns the counts that were there, or `None` if Redis did not answer.
    pub async fn reset(&self, t: &Tenant, w: &Windows) -> Option<(u64, u64)> {
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

    /// Forgets every refusal held from Redis (after a reload: limits may have been raised).
    pub fn forget_denials(&self, tenants: &crate::admission::tenant::TenantTable) {
        for t in tenants.iter() {
            let l = t.state.leases();
            for lease in [&l.rate, &l.daily, &l.monthly, &l.in_flight] {
                lease.clear_denial();
            }
        }
    }

    /// Quota units leased out in the window across all replicas, as last seen (admin view).
    pub fn quota_used(&self, t: &Tenant, w: &Windows) -> (u64, u64) {
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

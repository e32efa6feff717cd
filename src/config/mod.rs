//! Configuration: TOML in, a validated [`Config`] out, or every problem at once.
//!
//! An operator editing a config at 3 a.m. wants to see all of its mistakes in one go, each with
//! the TOML path that holds it (`tenants[2].api_key_sha256: expected 64 hex characters`). So the
//! file is read in two passes: serde checks the *shape* (unknown keys and wrong types are errors,
//! reported with their path), then `validate` turns the raw strings into typed values (durations,
//! sizes, addresses, key digests), collecting every problem instead of stopping at the first.
//!
//! Nothing here is read on the request path: the proxy compiles a [`Config`] into its runtime
//! tables once (see `runtime.rs`).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, StatusCode, Uri};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cache::key::{KeyPart, KeySecret, Scope};
use crate::tls::{ClientAuth, IdentitySource, ServerTls, UpstreamTls};

/// Defaults, each with the reason it is what it is.
pub mod defaults {
    use std::time::Duration;

    /// Where the proxy listens when `server.listen` is not set: loopback, so a first run exposes nothing.
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// The admin listener (metrics, health, reload) stays on loopback by default.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    /// Where `bureau-guard mock-bureau` listens by default, so the example config runs as is.
    pub const MOCK_BUREAU_URL: &str = "http://127.0.0.1:8081";
    /// Credit look-up bodies are a few hundred bytes; 64 KiB leaves room for batch requests.
    pub const MAX_BODY: u64 = 64 * 1024;
    /// Same order as nginx's `large_client_header_buffers` (4 × 8k).
    pub const MAX_HEADER_BYTES: u64 = 16 * 1024;
    /// A client that has not sent its headers in 5 s is a slowloris, not a bank. hyper also closes
    /// a keep-alive connection idle this long; responses say so (`Keep-Alive: timeout=4`).
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
    /// A connection with no request in flight this long is closed (h2 gets a GOAWAY). A bank's
    /// pool keeps connections warm between bursts; a minute is longer than most pools' own idle
    /// timeout, and an idle connection is the first to go when the listener is full anyway.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// h2 PINGs every 20 s: a dead peer (a bank's NAT that dropped the flow) is noticed and its
    /// connection freed, and middleboxes with 30 s+ idle timers keep the flow.
    pub const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
    /// A PING unanswered this long closes the connection (a live peer answers in a round trip).
    pub const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// 401s from one address within the window that start a penalty: a bank rotating keys sends
    /// a few, a key guesser thousands.
    pub const AUTH_FAILURE_LIMIT: u32 = 20;
    pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(10);
    /// Short: long enough to make guessing pointless, short enough that a bank that fixed its
    /// key is back within seconds.
    pub const AUTH_FAILURE_PENALTY: Duration = Duration::from_secs(10);
    /// End-to-end bound on one request, queueing and the bureau included.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time given to in-flight requests on shutdown before connections are closed.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
    /// The bureau is on a private network: a connect that takes a second has failed.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// A credit report normally takes tens of milliseconds; 5 s is a bureau in trouble.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Idle keep-alive connections kept to the bureau; enough for a few thousand req/s.
    pub const POOL_MAX_IDLE: usize = 256;
    /// Korea Standard Time: the bureau's day starts at local midnight there.
    pub const UTC_OFFSET_SECS: i32 = 9 * 3600;
    /// A crash loses at most about one second of quota counts.
    pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
    /// Idle connections older than this are closed (below typical server keep-alive of 60-120 s).
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
    /// Bureau capacity budget when none is configured: generous, so an unset value never
    /// throttles a small deployment, but finite, so the bureau is never offered unbounded load.
    pub const MAX_CONCURRENCY: usize = 64;
    /// A look-up waiting longer than this for a bureau slot is better refused (and retried later).
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
    /// A bureau call holds its slot until the bureau answers, past `response_timeout`: by
    /// default six times `response_timeout` (30 s for the default 5 s), so a slow answer is
    /// waited for but a hung call is not kept forever.
    pub const MAX_CALL_TIME_FACTOR: u32 = 6;
    /// A bureau's `Retry-After` longer than this is read as "down for a while": the circuit
    /// breaker's probes find out sooner than a long hold would.
    pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
    /// Five failures in a row: one or two are chance, five at a few hundred calls per second is
    /// a bureau that is not answering.
    pub const BREAKER_FAILURES: u32 = 5;
    /// Long enough that a restarting bureau is not hit by every queued request at once, short
    /// enough that a blip costs little.
    pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(2);
    /// Three successes in a row before the budget is opened again.
    pub const BREAKER_PROBES: u32 = 3;
    /// Requests waiting for a bureau slot, all tenants together: a few hundred bytes each, so
    /// 16,384 is a few MiB, and more than any bureau drains within a queue timeout (400 calls/s
    /// for 2 s is 800).
    pub const MAX_QUEUE_TOTAL: usize = 16_384;
    /// Requests one tenant may have waiting for a bureau slot.
    pub const MAX_QUEUE: usize = 256;
    /// Bureau responses are buffered; a credit report is a few KiB, 1 MiB is an anomaly.
    pub const MAX_RESPONSE_BODY: u64 = 1024 * 1024;
    /// Cache memory: a credit report is a few KiB, so 256 MiB holds tens of thousands of them,
    /// a small part of a server's memory.
    pub const CACHE_MAX_BYTES: u64 = 256 * 1024 * 1024;
    /// A response this large is a batch or an anomaly, not a repeated look-up; storing it would
    /// crowd out a hundred ordinary reports.
    pub const CACHE_MAX_ENTRY_BYTES: u64 = 256 * 1024;
    /// Only a successful report is worth repeating; an error is not an answer to keep.
    pub const CACHE_STATUSES: [u16; 1] = [200];
    /// Keys of replicas that share limits start with this.
    pub const REDIS_KEY_PREFIX: &str = "bureau-guard";
    /// A request waits at most this for Redis: well under the bureau's own latency, and about
    /// ten local round trips to a healthy Redis.
    pub const REDIS_TIMEOUT: Duration = Duration::from_millis(5);
    /// A batch of leased units should last about this long: at 2,000 req/s that is a round trip
    /// per 200 requests, and what one replica holds unused is a tenth of a second of rate.
    pub const REDIS_LEASE: Duration = Duration::from_millis(100);
    /// Heartbeats every second: the replica count follows a change within a few seconds.
    pub const REDIS_HEARTBEAT: Duration = Duration::from_secs(1);
    /// Five missed heartbeats and a replica is counted out and its in-flight leases freed.
    pub const REDIS_LEASE_TTL: Duration = Duration::from_secs(5);
}

/// One problem in a config, with the TOML path where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// TOML path such as `tenants[2].api_key_sha256`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// The longest duration any setting may have.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Every problem found in a config; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A validated configuration. Every value is typed; every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub quota: QuotaConfig,
    pub state: StateConfig,
    pub cache: CacheConfig,
    pub audit: AuditConfig,
    pub routes: Vec<RouteConfig>,
    pub tenants: Vec<TenantConfig>,
}

/// `[cache]`: the response cache shared by all routes that set `cache_ttl`.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Bound on the cache's weighted size (bodies, headers, a fixed overhead per entry).
    pub max_bytes: u64,
    /// Bodies larger than this are not stored.
    pub max_entry_bytes: u64,
    /// The secret of the keyed hashes that name look-ups; `None`: random per process (a restart
    /// then changes every key, which is fine for the cache but not for audit subject hashes).
    pub key_secret: Option<KeySecret>,
}

/// `[audit]`: the optional append-only log of who received which answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditConfig {
    /// JSON lines are appended here; `None` disables the audit log.
    pub file: Option<std::path::PathBuf>,
    /// Once a record has been lost, refuse (503) answers that would go unaudited, instead of
    /// serving them while readiness reports the failure.
    pub fail_closed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    /// Daily and monthly windows reset at local midnight of this offset from UTC.
    pub utc_offset: chrono::FixedOffset,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// Where quota counters are persisted; `None` keeps them in memory only.
    pub file: Option<std::path::PathBuf>,
    /// How often counters are written (a crash loses at most about this much).
    pub flush_interval: Duration,
    /// Where live limits are kept: this process alone, or Redis shared by every replica.
    pub backend: StateBackend,
}

/// `state.backend`.
#[derive(Debug, Clone, PartialEq)]
pub enum StateBackend {
    /// In memory, persisted to `state.file`: one replica.
    Local,
    /// Shared through Redis by every replica (see `state/redis.rs`).
    Redis(Box<RedisSettings>),
}

/// `[state.redis]`: how replicas share rate, quota and in-flight limits and the bureau budget.
#[derive(Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS). Holds a password: never
    /// printed (see the `Debug` impl).
    pub url: String,
    /// Prefix of every key; replicas that share limits share it.
    pub key_prefix: String,
    /// Longest the request path waits for Redis (the hot-path budget).
    pub timeout: Duration,
    /// What a request gets when Redis does not answer within `timeout`.
    pub on_unavailable: FailPolicy,
    /// How long a batch of leased units should last at the tenant's current pace; zero: lease
    /// one unit per request (one Redis round trip per decision).
    pub lease: Duration,
    /// How often a replica says it is alive (and renews its in-flight leases).
    pub heartbeat_interval: Duration,
    /// A replica silent this long is counted out, and its in-flight leases expire.
    pub lease_ttl: Duration,
    /// This replica's name in Redis; default: host name, process id and a random suffix.
    pub replica_id: Option<String>,
    /// The replicas this one assumes until Redis has answered once: a replica started while
    /// Redis is unreachable knows of no other, and would otherwise take the whole bureau budget,
    /// rate and quota for itself.
    pub expected_replicas: usize,
    /// With a `rediss://` URL: a private CA and/or a client certificate (else the platform's
    /// roots, no client certificate).
    pub tls: Option<RedisTls>,
    /// `url` is a seed node of a Redis Cluster (the client discovers the others and routes each
    /// script to the node of its tenant's hash slot).
    pub cluster: bool,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_unavailable", &self.on_unavailable)
            .field("lease", &self.lease)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("lease_ttl", &self.lease_ttl)
            .field("replica_id", &self.replica_id)
            .field("expected_replicas", &self.expected_replicas)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls)
            .finish()
    }
}

/// `state.redis.ca` / `client_cert` + `client_key`, checked at validation.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisTls {
    pub ca: Option<std::path::PathBuf>,
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The certificates read, for expiry warnings (`state.redis.ca`, `state.redis.client_cert`).
    pub watched: Vec<crate::tls::Watched>,
    /// Unix seconds at which the client certificate expires, if there is one (a metric).
    pub client_not_after: Option<i64>,
}

/// A Redis URL with its password replaced, for logs and diffs (user info, and a query string,
/// which may carry `?password=`).
pub fn redact_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((base, _)) => (base, "?***"),
        None => (url, ""),
    };
    let redacted = match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    };
    redacted + query
}

/// `state.redis.on_unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Decide locally with this replica's share of each limit (`rate / replicas`, ...).
    FailOpen,
    /// Refuse with 503 `state_unavailable`.
    FailClosed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body: u64,
    pub max_header_bytes: u64,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    /// Forward requests that match no route instead of answering 404.
    pub pass_unmatched: bool,
    /// On shutdown, `/readyz` answers 503 this long before the listener stops accepting, so load
    /// balancers stop sending new connections first. Zero: stop at once.
    pub readiness_grace: Duration,
    /// `[server.tls]`: terminate TLS (and optionally verify client certificates); `None`: plain
    /// HTTP (h2c by prior knowledge).
    pub tls: Option<crate::tls::ServerTls>,
    /// A connection with no request in flight this long is closed gracefully.
    pub idle_timeout: Duration,
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    /// Connections open at once; `None`: derived from the descriptor limit at start
    /// (`server::nofile`).
    pub max_connections: Option<usize>,
    /// Connections from one client address; `None`: a quarter of `max_connections`.
    pub max_connections_per_source: Option<usize>,
    pub auth_penalty: crate::server::auth_failures::AuthPenalty,
    /// Connections from these may start with a PROXY header (required with `proxy_protocol`),
    /// and with `forwarded_for` their `X-Forwarded-For` is believed.
    pub trusted_proxies: crate::server::TrustedProxies,
    /// `server.proxy_protocol`: connections from `trusted_proxies` start with a PROXY header.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Who may use `/admin/*`: a token, or (written out by the operator) anyone.
    pub auth: AdminAuth,
    /// `admin.allowed_hosts`: names (`host` or `host:port`, lower case) that `/admin/*` answers
    /// to besides the listen address and localhost, 127.0.0.1 and [::1] at its port.
    pub allowed_hosts: Vec<String>,
}

/// How `/admin/*` requests are authorized.
#[derive(Clone, PartialEq, Eq)]
pub enum AdminAuth {
    /// The SHA-256 of the token every `/admin/*` request must present as `Authorization:
    /// Bearer TOKEN` (`token_sha256`, or the digest of `token_env`'s value).
    Token([u8; 32]),
    /// `admin.insecure_no_token = true`: `/admin/*` is open to whatever reaches the listener.
    InsecureNoToken,
}

impl AdminAuth {
    /// Whether a token is required.
    pub fn has_token(&self) -> bool {
        matches!(self, AdminAuth::Token(_))
    }
}

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The digest is not shown: it would let whoever reads a debug dump test guesses offline.
        f.write_str(match self {
            AdminAuth::Token(_) => "Token(..)",
            AdminAuth::InsecureNoToken => "InsecureNoToken",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `http://host:port[/prefix]`; the prefix (without trailing slash) is put before every path.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
    pub max_response_body: u64,
    /// The bureau capacity budget: most requests in flight to the bureau at once.
    pub max_concurrency: usize,
    /// Longest a request waits for a bureau slot before 503 `bureau_busy`.
    pub queue_timeout: Duration,
    /// Requests waiting for a bureau slot, all tenants together (per-tenant `max_queue`s add
    /// up with many tenants); when full, the longest queue loses its newest request.
    pub max_queue_total: usize,
    /// Move the budget between `min` and `max` from observed bureau latency and errors.
    pub adaptive: Option<AdaptiveSettings>,
    /// The longest a bureau call may hold its slot. `response_timeout` answers the client, but the
    /// bureau is still working on the call, so its slot stays taken until the bureau answers or
    /// this bound passes; then the connection is closed and the slot freed (counted in
    /// `bureau_guard_bureau_calls_cut_total`). The only way the budget can be exceeded.
    pub max_call_time: Duration,
    /// A bureau 429 or 503 holds back new calls for its `Retry-After`, at most this long.
    pub retry_after_cap: Duration,
    /// `[upstream.breaker]`: fail fast while the bureau is down.
    pub breaker: BreakerSettings,
    /// TLS to the bureau: `Some` exactly when the URL is `https://` (`[upstream.tls]` or defaults).
    pub tls: Option<crate::tls::UpstreamTls>,
}

/// `[upstream.breaker]`: see `bureau/breaker.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Bureau failures in a row (connect errors, timeouts, 502/504) that open it.
    pub failures: u32,
    /// How long it stays open (answering at once) before letting probes through.
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close it, one failure reopens it.
    pub probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: defaults::BREAKER_FAILURES,
            open_for: defaults::BREAKER_OPEN_FOR,
            probes: defaults::BREAKER_PROBES,
        }
    }
}

/// `[upstream.adaptive]`: see `bureau/adaptive.rs` for the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveSettings {
    pub min: usize,
    pub max: usize,
    /// Multiplicative decrease on back-pressure or errors (0 < backoff < 1).
    pub backoff: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One line per request (tenant, route, status, outcome, latency, request id).
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Metric label and log field: `[A-Za-z0-9_-]`, unique.
    pub name: String,
    pub method: Method,
    /// Path pattern with `{param}` segments, e.g. `/v1/score/{subject_id}`.
    pub path: String,
    /// Weight of one request of this route in rate and fair-share accounting.
    pub cost: u32,
    /// Caching and coalescing; all off unless the route opts in.
    pub cache: RouteCache,
}

/// How a route's identical look-ups share bureau calls. The default does nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCache {
    /// Identical look-ups in flight at once share one bureau call.
    pub coalesce: bool,
    /// Answers are kept this long at most (the bureau's `Cache-Control` may say less); `None`:
    /// not cached.
    pub cache_ttl: Option<Duration>,
    /// How long after expiry an entry may be served when the bureau fails; zero: never.
    pub stale_if_error: Duration,
    /// Response statuses that are cached.
    pub cache_statuses: Vec<StatusCode>,
    /// What identifies a look-up; required when coalescing or caching (may be empty: every
    /// request of the route is the same look-up).
    pub cache_key: Vec<KeyPart>,
    /// Whose requests may share an answer.
    pub scope: Scope,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            coalesce: false,
            cache_ttl: None,
            stale_if_error: Duration::ZERO,
            cache_statuses: default_cache_statuses(),
            cache_key: Vec::new(),
            scope: Scope::Tenant,
        }
    }
}

fn default_cache_statuses() -> Vec<StatusCode> {
    defaults::CACHE_STATUSES
        .iter()
        .map(|s| StatusCode::from_u16(*s).expect("the defaults are valid statuses"))
        .collect()
}

impl RouteCache {
    /// Whether the route caches or coalesces at all.
    pub fn enabled(&self) -> bool {
        self.coalesce || self.cache_ttl.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    /// Stable identifier: metric label, `x-tenant` header value, log field.
    pub id: String,
    pub name: String,
    /// SHA-256 digests of the tenant's API keys (several during a key rotation).
    pub key_digests: Vec<[u8; 32]>,
    /// Share of the bureau under contention, relative to other tenants.
    pub weight: u32,
    pub limits: TenantLimits,
    /// Client certificate identities (of `server.tls.client_identity`'s kind, normalized) that
    /// name this tenant.
    pub client_cert_names: Vec<String>,
}

/// A tenant's contract. `None` means no limit of that kind.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLimits {
    /// Sustained requests per second, in route cost units.
    pub rate: Option<f64>,
    /// Cost units that may be spent at once after an idle period (defaults to one second of `rate`).
    pub burst: u32,
    /// Requests of this tenant inside bureau-guard at once.
    pub max_in_flight: Option<u32>,
    /// Bureau calls per local day.
    pub daily_quota: Option<u64>,
    /// Bureau calls per local calendar month.
    pub monthly_quota: Option<u64>,
    /// Requests that may wait for a bureau slot; one more gets 503 `bureau_busy` at once.
    pub max_queue: usize,
    /// Limits that are computed, logged and counted but not enforced.
    pub dry_run: DryRun,
}

/// Which limits run in dry-run mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DryRun {
    pub rate: bool,
    pub in_flight: bool,
    pub daily: bool,
    pub monthly: bool,
}

impl Config {
    /// Reads and validates the file at `path`, resolving `api_key_env` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![Problem { path: String::new(), message: format!("cannot read {}: {e}", path.display()) }],
        })?;
        Config::from_toml(&text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates `text`; `env` resolves the variables named by `api_key_env`.
    pub fn from_toml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw = parse_raw(text)?;
        validate(raw, env)
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    let one = |path: String, message: String| ConfigError { problems: vec![Problem { path, message }] };
    let de = toml::Deserializer::parse(text).map_err(|e| one(String::new(), toml_message(text, &e)))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        one(path, toml_message(text, e.inner()))
    })
}

/// The toml error's own message plus its line number, on one line.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{msg} (line {line})")
        }
        None => msg,
    }
}

// ---------------------------------------------------------------------------------------------
// Raw shape: what serde reads. Strings stay strings until `validate` parses them with a path.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    quota: RawQuota,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    utc_offset: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    file: Option<String>,
    flush_interval: Option<String>,
    backend: Option<String>,
    redis: Option<RawRedis>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    url_env: Option<String>,
    key_prefix: Option<String>,
    timeout: Option<String>,
    on_unavailable: Option<String>,
    lease: Option<String>,
    heartbeat_interval: Option<String>,
    lease_ttl: Option<String>,
    replica_id: Option<String>,
    expected_replicas: Option<i64>,
    cluster: Option<bool>,
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_bytes: Option<String>,
    max_entry_bytes: Option<String>,
    key_secret_hex: Option<String>,
    key_secret_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    file: Option<String>,
    fail_closed: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body: Option<String>,
    max_header_bytes: Option<String>,
    header_read_timeout: Option<String>,
    request_timeout: Option<String>,
    drain_timeout: Option<String>,
    pass_unmatched: Option<bool>,
    readiness_grace: Option<String>,
    tls: Option<RawServerTls>,
    idle_timeout: Option<String>,
    http2_keep_alive_interval: Option<String>,
    http2_keep_alive_timeout: Option<String>,
    max_connections: Option<i64>,
    max_connections_per_source: Option<i64>,
    auth_failure_limit: Option<i64>,
    auth_failure_window: Option<String>,
    auth_failure_penalty: Option<String>,
    proxy_protocol: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    forwarded_for: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    cert: Option<String>,
    key: Option<String>,
    client_auth: Option<String>,
    client_ca: Option<String>,
    crl: Option<Vec<String>>,
    client_identity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_sha256: Option<String>,
    token_env: Option<String>,
    insecure_no_token: Option<bool>,
    allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    pool_max_idle: Option<usize>,
    pool_idle_timeout: Option<String>,
    max_response_body: Option<String>,
    max_concurrency: Option<i64>,
    queue_timeout: Option<String>,
    max_queue_total: Option<i64>,
    max_call_time: Option<String>,
    retry_after_cap: Option<String>,
    adaptive: Option<RawAdaptive>,
    breaker: Option<RawBreaker>,
    tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<i64>,
    open_for: Option<String>,
    probes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdaptive {
    min: Option<i64>,
    max: Option<i64>,
    /// Removed (the controller no longer cuts on a latency threshold); read only to say so.
    tolerance: Option<toml::Value>,
    backoff: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    method: Option<String>,
    path: Option<String>,
    cost: Option<i64>,
    coalesce: Option<bool>,
    cache_ttl: Option<String>,
    cache_key: Option<Vec<String>>,
    scope: Option<String>,
    stale_if_error: Option<String>,
    cache_statuses: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: Option<String>,
    name: Option<String>,
    api_key_sha256: Option<OneOrMany>,
    api_key_env: Option<OneOrMany>,
    weight: Option<i64>,
    rate: Option<f64>,
    burst: Option<i64>,
    max_in_flight: Option<i64>,
    daily_quota: Option<i64>,
    monthly_quota: Option<i64>,
    max_queue: Option<i64>,
    dry_run: Option<BoolOrList>,
    client_cert_names: Option<Vec<String>>,
}

/// `dry_run = true` or `dry_run = ["rate", "daily"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BoolOrList {
    Bool(bool),
    List(Vec<String>),
}

/// `key = "x"` or `key = ["x", "y"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// Each value with the path suffix that addresses it (`""` for a lone string, `[i]` in a list).
    fn items(&self) -> Vec<(String, &str)> {
        match self {
            OneOrMany::One(s) => vec![(String::new(), s.as_str())],
            OneOrMany::Many(v) => v.iter().enumerate().map(|(i, s)| (format!("[{i}]"), s.as_str())).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: every raw value becomes a typed one, or a problem with its path.

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { path: path.into(), message: message.into() });
    }

    fn duration(&mut self, path: &str, raw: Option<&str>, default: Duration) -> Duration {
        let d = self.duration_or_zero(path, raw, default);
        if d.is_zero() {
            self.add(path, "must be greater than zero");
            return default;
        }
        d
    }

    /// A duration where zero means "none".
    fn duration_or_zero(&mut self, path: &str, raw: Option<&str>, default: Duration) -> Duration {
        let Some(s) = raw else { return default };
        match humantime::parse_duration(s) {
            // Every duration ends up added to an instant; past this it could overflow (a panic
            // on every request), and no setting here means anything that long.
            Ok(d) if d > MAX_DURATION => {
                self.add(path, format!("{s:?} is longer than the longest duration allowed (10 years)"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.add(path, format!("invalid duration {s:?} ({e}); use e.g. \"250ms\", \"2s\", \"1m\""));
                default
            }
        }
    }

    fn size(&mut self, path: &str, raw: Option<&str>, default: u64) -> u64 {
        let Some(s) = raw else { return default };
        match s.parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() == 0 => {
                self.add(path, "must be greater than zero");
                default
            }
            Ok(b) => b.as_u64(),
            Err(_) => {
                self.add(path, format!("invalid size {s:?}; use e.g. \"64KiB\", \"1MiB\""));
                default
            }
        }
    }

    fn addr(&mut self, path: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let s = raw.unwrap_or(default);
        s.parse().unwrap_or_else(|_| {
            self.add(path, format!("invalid address {s:?}; expected IP:PORT such as \"127.0.0.1:8080\""));
            default.parse().expect("default addresses are valid")
        })
    }
}

/// An optional count that must be at least 1.
fn positive(p: &mut Problems, path: &str, raw: Option<i64>) -> Option<usize> {
    let n = raw?;
    match usize::try_from(n) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            p.add(path, "must be at least 1 (leave it out for the default)");
            None
        }
    }
}

fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());

    let s = &raw.server;
    let max_header_bytes = p.size("server.max_header_bytes", s.max_header_bytes.as_deref(), defaults::MAX_HEADER_BYTES);
    if max_header_bytes < 1024 {
        p.add("server.max_header_bytes", "must be at least 1KiB");
    }
    let server = ServerConfig {
        listen: p.addr("server.listen", s.listen.as_deref(), defaults::LISTEN),
        max_body: p.size("server.max_body", s.max_body.as_deref(), defaults::MAX_BODY),
        max_header_bytes,
        header_read_timeout: p.duration(
            "server.header_read_timeout",
            s.header_read_timeout.as_deref(),
            defaults::HEADER_READ_TIMEOUT,
        ),
        request_timeout: p.duration("server.request_timeout", s.request_timeout.as_deref(), defaults::REQUEST_TIMEOUT),
        drain_timeout: p.duration("server.drain_timeout", s.drain_timeout.as_deref(), defaults::DRAIN_TIMEOUT),
        pass_unmatched: s.pass_unmatched.unwrap_or(false),
        readiness_grace: p.duration_or_zero("server.readiness_grace", s.readiness_grace.as_deref(), Duration::ZERO),
        tls: None,
        idle_timeout: p.duration("server.idle_timeout", s.idle_timeout.as_deref(), defaults::IDLE_TIMEOUT),
        http2_keep_alive_interval: p.duration(
            "server.http2_keep_alive_interval",
            s.http2_keep_alive_interval.as_deref(),
            defaults::HTTP2_KEEP_ALIVE_INTERVAL,
        ),
        http2_keep_alive_timeout: p.duration(
            "server.http2_keep_alive_timeout",
            s.http2_keep_alive_timeout.as_deref(),
            defaults::HTTP2_KEEP_ALIVE_TIMEOUT,
        ),
        max_connections: positive(&mut p, "server.max_connections", s.max_connections),
        max_connections_per_source: positive(&mut p, "server.max_connections_per_source", s.max_connections_per_source),
        auth_penalty: crate::server::auth_failures::AuthPenalty {
            limit: match s.auth_failure_limit {
                None => defaults::AUTH_FAILURE_LIMIT,
                Some(n) => u32::try_from(n).unwrap_or_else(|_| {
                    p.add("server.auth_failure_limit", "must be 0 (off) to 4294967295");
                    defaults::AUTH_FAILURE_LIMIT
                }),
            },
            window: p.duration(
                "server.auth_failure_window",
                s.auth_failure_window.as_deref(),
                defaults::AUTH_FAILURE_WINDOW,
            ),
            penalty: p.duration(
                "server.auth_failure_penalty",
                s.auth_failure_penalty.as_deref(),
                defaults::AUTH_FAILURE_PENALTY,
            ),
        },
        trusted_proxies: crate::server::TrustedProxies {
            blocks: s
                .trusted_proxies
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, c)| {
                    crate::server::client_addr::Cidr::parse(c)
                        .map_err(|e| p.add(format!("server.trusted_proxies[{i}]"), e))
                        .ok()
                })
                .collect(),
            forwarded_for: s.forwarded_for.unwrap_or(false),
        },
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
    };
    if s.trusted_proxies.as_ref().is_none_or(|t| t.is_empty()) {
        if server.proxy_protocol {
            p.add(
                "server.proxy_protocol",
                "needs server.trusted_proxies: the load balancers allowed to send the header",
            );
        }
        if server.trusted_proxies.forwarded_for {
            p.add(
                "server.forwarded_for",
                "needs server.trusted_proxies: the proxies whose X-Forwarded-For is believed",
            );
        }
    }
    if server.http2_keep_alive_timeout >= server.http2_keep_alive_interval {
        p.add("server.http2_keep_alive_timeout", "must be shorter than server.http2_keep_alive_interval");
    }

    let token_digest = match (&raw.admin.token_sha256, &raw.admin.token_env) {
        (Some(_), Some(_)) => {
            p.add("admin.token_env", "give either token_sha256 or token_env, not both");
            None
        }
        (Some(hex_str), None) => {
            let mut d = [0u8; 32];
            if hex_str.len() != 64 || hex::decode_to_slice(hex_str, &mut d).is_err() {
                p.add("admin.token_sha256", "expected 64 hex characters (the SHA-256 of the token)");
                None
            } else {
                Some(d)
            }
        }
        (None, Some(var)) => match env(var) {
            Some(t) if !t.is_empty() => Some(Sha256::digest(t.as_bytes()).into()),
            _ => {
                p.add("admin.token_env", format!("environment variable {var} is not set or empty"));
                None
            }
        },
        (None, None) => None,
    };
    let insecure = raw.admin.insecure_no_token.unwrap_or(false);
    let has_token = raw.admin.token_sha256.is_some() || raw.admin.token_env.is_some();
    let auth = match token_digest {
        Some(d) => AdminAuth::Token(d),
        // A token that is set but invalid was reported above; this is only a placeholder.
        None => AdminAuth::InsecureNoToken,
    };
    if has_token && insecure {
        p.add("admin.insecure_no_token", "a token is set: remove insecure_no_token or the token");
    } else if !has_token && !insecure {
        p.add(
            "admin",
            "no admin token: set admin.token_sha256 (the SHA-256 of a secret) or admin.token_env (the \
             variable that holds it), or write admin.insecure_no_token = true to leave /admin/* open to \
             every local process and to web pages a browser on this host visits",
        );
    }
    let allowed_hosts = raw
        .admin
        .allowed_hosts
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, h)| {
            let ok =
                !h.is_empty() && h.parse::<http::uri::Authority>().is_ok_and(|a| a.as_str() == h && !h.contains('@'));
            if !ok {
                p.add(
                    format!("admin.allowed_hosts[{i}]"),
                    format!("{h:?} is not a host name or host:port (no scheme, path or user)"),
                );
            }
            ok.then(|| h.to_ascii_lowercase())
        })
        .collect();
    let admin = AdminConfig {
        listen: p.addr("admin.listen", raw.admin.listen.as_deref(), defaults::ADMIN_LISTEN),
        auth,
        allowed_hosts,
    };
    if admin.listen == server.listen && server.listen.port() != 0 {
        p.add("admin.listen", format!("must differ from server.listen ({})", server.listen));
    }

    let u = &raw.upstream;
    let upstream = UpstreamConfig {
        url: upstream_url(&mut p, u.url.as_deref()),
        connect_timeout: p.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            defaults::CONNECT_TIMEOUT,
        ),
        response_timeout: p.duration(
            "upstream.response_timeout",
            u.response_timeout.as_deref(),
            defaults::RESPONSE_TIMEOUT,
        ),
        pool_max_idle: u.pool_max_idle.unwrap_or(defaults::POOL_MAX_IDLE),
        pool_idle_timeout: p.duration(
            "upstream.pool_idle_timeout",
            u.pool_idle_timeout.as_deref(),
            defaults::POOL_IDLE_TIMEOUT,
        ),
        max_response_body: p.size(
            "upstream.max_response_body",
            u.max_response_body.as_deref(),
            defaults::MAX_RESPONSE_BODY,
        ),
        max_concurrency: match u.max_concurrency {
            None => defaults::MAX_CONCURRENCY,
            Some(n) if (1..=100_000).contains(&n) => n as usize,
            Some(n) => {
                p.add("upstream.max_concurrency", format!("{n} must be between 1 and 100000"));
                defaults::MAX_CONCURRENCY
            }
        },
        queue_timeout: p.duration("upstream.queue_timeout", u.queue_timeout.as_deref(), defaults::QUEUE_TIMEOUT),
        max_queue_total: match u.max_queue_total {
            None => defaults::MAX_QUEUE_TOTAL,
            Some(n) if (1..=10_000_000).contains(&n) => n as usize,
            Some(n) => {
                p.add("upstream.max_queue_total", format!("{n} must be between 1 and 10000000"));
                defaults::MAX_QUEUE_TOTAL
            }
        },
        max_call_time: Duration::ZERO, // below: its default follows response_timeout
        retry_after_cap: p.duration(
            "upstream.retry_after_cap",
            u.retry_after_cap.as_deref(),
            defaults::RETRY_AFTER_CAP,
        ),
        adaptive: None,
        breaker: u.breaker.as_ref().map_or_else(BreakerSettings::default, |b| validate_breaker(&mut p, b)),
        tls: None,
    };
    let mut upstream = upstream;
    let max_call_time = upstream.response_timeout.saturating_mul(defaults::MAX_CALL_TIME_FACTOR);
    upstream.max_call_time = p.duration("upstream.max_call_time", u.max_call_time.as_deref(), max_call_time);
    if let Some(a) = &u.adaptive {
        upstream.adaptive = validate_adaptive(&mut p, a, upstream.max_concurrency);
    }
    if upstream.max_call_time < upstream.response_timeout {
        p.add(
            "upstream.max_call_time",
            format!(
                "{:?} must be at least upstream.response_timeout ({:?}): a call keeps its bureau slot until \
                 the bureau answers, however long the client waits",
                upstream.max_call_time, upstream.response_timeout
            ),
        );
    }

    let log = LogConfig {
        format: match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add("log.format", format!("unknown format {other:?}; expected \"text\" or \"json\""));
                LogFormat::Text
            }
        },
        access_log: raw.log.access_log.unwrap_or(true),
    };

    let quota = QuotaConfig { utc_offset: utc_offset(&mut p, raw.quota.utc_offset.as_deref()) };
    let state = StateConfig {
        file: raw.state.file.as_deref().map(std::path::PathBuf::from),
        flush_interval: p.duration(
            "state.flush_interval",
            raw.state.flush_interval.as_deref(),
            defaults::FLUSH_INTERVAL,
        ),
        backend: validate_backend(&mut p, &raw.state, env, unix_now()),
    };
    if raw.state.file.as_deref() == Some("") {
        p.add("state.file", "must not be empty; leave it out to keep counters in memory only");
    }

    let cache = validate_cache(&mut p, &raw.cache, env);
    let audit = AuditConfig {
        file: raw.audit.file.as_deref().map(std::path::PathBuf::from),
        fail_closed: raw.audit.fail_closed.unwrap_or(false),
    };
    if raw.audit.file.as_deref() == Some("") {
        p.add("audit.file", "must not be empty; leave it out to disable the audit log");
    }
    if audit.fail_closed && raw.audit.file.is_none() {
        p.add("audit.fail_closed", "only meaningful with audit.file");
    }

    let routes = validate_routes(&mut p, &raw.routes);
    if routes.is_empty() && !server.pass_unmatched && raw.routes.is_empty() {
        p.add("routes", "at least one [[routes]] entry is required (or set server.pass_unmatched = true)");
    }
    let max_cost = routes.iter().map(|r| r.cost).max().unwrap_or(1);
    // TLS reads its files here, so `check`, `serve` and `reload` all refuse a bad one. Tenants'
    // `client_cert_names` need to know which kind of name the listener extracts.
    let now = unix_now();
    let mut server = server;
    server.tls = raw.server.tls.as_ref().and_then(|t| validate_server_tls(&mut p, t, now));
    let mut upstream = upstream;
    upstream.tls = validate_upstream_tls(&mut p, &upstream.url, raw.upstream.tls.as_ref(), now);
    let cert_identity = server.tls.as_ref().filter(|t| t.client_auth != ClientAuth::Off).map(|t| t.identity);
    let tenants = validate_tenants(&mut p, &raw.tenants, env, max_cost);
    let tenants = validate_cert_names(&mut p, &raw.tenants, tenants, cert_identity, raw.server.tls.is_some());

    if p.0.is_empty() {
        Ok(Config { server, admin, upstream, log, quota, state, cache, audit, routes, tenants })
    } else {
        Err(ConfigError { problems: p.0 })
    }
}

/// Seconds since the Unix epoch, for certificate validity.
fn unix_now() -> i64 {
    crate::clock::Clock::now_unix_s(&crate::clock::SystemClock)
}

impl Config {
    /// Things that are not wrong yet but will be: certificates expiring within 30 days, expired
    /// CA certificates skipped in a bundle. `check` prints them; `serve` and `reload` log them.
    pub fn warnings(&self) -> Vec<Problem> {
        self.warnings_at(unix_now())
    }

    /// [`Config::warnings`] at `now` (unix seconds).
    pub fn warnings_at(&self, now: i64) -> Vec<Problem> {
        let server = self.server.tls.iter().flat_map(|t| t.watched.iter());
        let upstream = self.upstream.tls.iter().flat_map(|t| t.watched.iter());
        let redis = match &self.state.backend {
            StateBackend::Redis(r) => r.tls.as_ref().map_or(&[][..], |t| &t.watched[..]),
            StateBackend::Local => &[],
        };
        let watched: Vec<_> = server.chain(upstream).chain(redis).cloned().collect();
        let crls = self.server.tls.as_ref().map_or(&[][..], |t| &t.crl_next_update[..]);
        let mut out = crate::tls::warnings(&watched, now);
        out.extend(crate::tls::stale_crl_warnings(crls, now));
        out.into_iter().map(|(path, message)| Problem { path, message }).collect()
    }
}

/// A path key of the config (`server.tls.cert`, ...). Relative paths are taken from the working
/// directory, as `state.file` and `audit.file` are: one rule for every path in the file.
fn config_path(p: &mut Problems, at: &str, raw: Option<&str>, required: &str) -> Option<PathBuf> {
    match raw {
        None => {
            p.add(at, required);
            None
        }
        Some("") => {
            p.add(at, "must not be empty");
            None
        }
        Some(s) => Some(PathBuf::from(s)),
    }
}

/// `[server.tls]`: settings parsed, then every file read, checked and built into a rustls config.
fn validate_server_tls(p: &mut Problems, t: &RawServerTls, now: i64) -> Option<ServerTls> {
    let before = p.0.len();
    let cert = config_path(p, "server.tls.cert", t.cert.as_deref(), "required: the PEM certificate chain, leaf first");
    let key = config_path(p, "server.tls.key", t.key.as_deref(), "required: the PEM private key of the certificate");
    let client_auth = match t.client_auth.as_deref() {
        None => ClientAuth::Off,
        Some(s) => ClientAuth::parse(s).unwrap_or_else(|| {
            p.add(
                "server.tls.client_auth",
                format!("unknown value {s:?}; expected \"off\", \"optional\" or \"required\""),
            );
            ClientAuth::Off
        }),
    };
    let identity = match t.client_identity.as_deref() {
        None => IdentitySource::SanDns,
        Some(s) => IdentitySource::parse(s).unwrap_or_else(|| {
            p.add(
                "server.tls.client_identity",
                format!("unknown value {s:?}; expected \"san_dns\", \"san_uri\" or \"cn\""),
            );
            IdentitySource::SanDns
        }),
    };
    let mtls = client_auth != ClientAuth::Off;
    let client_ca = match (&t.client_ca, mtls) {
        (None, true) => {
            p.add(
                "server.tls.client_ca",
                "required with client_auth: the PEM bundle of CAs that issue banks' certificates",
            );
            None
        }
        (Some(_), false) => {
            p.add("server.tls.client_ca", "only meaningful with client_auth = \"optional\" or \"required\"");
            None
        }
        (Some(s), true) => config_path(p, "server.tls.client_ca", Some(s), ""),
        (None, false) => None,
    };
    let mut crl = Vec::new();
    if let Some(list) = &t.crl {
        if !mtls {
            p.add("server.tls.crl", "only meaningful with client_auth = \"optional\" or \"required\"");
        }
        for (i, s) in list.iter().enumerate() {
            crl.extend(config_path(p, &format!("server.tls.crl[{i}]"), Some(s), ""));
        }
    }
    if t.client_identity.is_some() && !mtls {
        p.add("server.tls.client_identity", "only meaningful with client_auth = \"optional\" or \"required\"");
    }
    if p.0.len() != before {
        return None;
    }
    let settings = crate::tls::ServerTlsSettings { cert: cert?, key: key?, client_auth, client_ca, crl, identity };
    match crate::tls::load_server(&settings, now) {
        Ok(tls) => Some(tls),
        Err(problems) => {
            for fp in problems {
                p.add(format!("server.tls.{}", fp.key), fp.message);
            }
            None
        }
    }
}

/// `[upstream.tls]` and the URL's scheme: TLS exactly for `https://`.
fn validate_upstream_tls(p: &mut Problems, url: &Uri, t: Option<&RawUpstreamTls>, now: i64) -> Option<UpstreamTls> {
    if url.scheme_str() != Some("https") {
        if t.is_some() {
            p.add("upstream.tls", "only meaningful with an https:// upstream.url");
        }
        return None;
    }
    let before = p.0.len();
    let empty = RawUpstreamTls::default();
    let t = t.unwrap_or(&empty);
    let ca = t.ca.as_deref().and_then(|s| config_path(p, "upstream.tls.ca", Some(s), ""));
    let client_cert = match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => {
            let c = config_path(p, "upstream.tls.client_cert", Some(c), "");
            let k = config_path(p, "upstream.tls.client_key", Some(k), "");
            c.zip(k)
        }
        (Some(_), None) => {
            p.add(
                "upstream.tls.client_key",
                "required with client_cert: the PEM private key of bureau-guard's certificate",
            );
            None
        }
        (None, Some(_)) => {
            p.add("upstream.tls.client_cert", "required with client_key: bureau-guard's PEM certificate chain");
            None
        }
        (None, None) => None,
    };
    if p.0.len() != before {
        return None;
    }
    match crate::tls::load_upstream(&crate::tls::UpstreamTlsSettings { ca, client_cert }, now) {
        Ok(tls) => Some(tls),
        Err(problems) => {
            for fp in problems {
                p.add(format!("upstream.tls.{}", fp.key), fp.message);
            }
            None
        }
    }
}

/// Each tenant's `client_cert_names`: non-empty, normalized, on one tenant only, and only with a
/// listener that asks for certificates. `raw` and `tenants` are matched by id (invalid tenants
/// were dropped from `tenants` and already reported).
fn validate_cert_names(
    p: &mut Problems,
    raw: &[RawTenant],
    mut tenants: Vec<TenantConfig>,
    identity: Option<IdentitySource>,
    tls_configured: bool,
) -> Vec<TenantConfig> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, t) in raw.iter().enumerate() {
        let Some(list) = &t.client_cert_names else { continue };
        let at = format!("tenants[{i}].client_cert_names");
        let Some(identity) = identity else {
            // Without [server.tls] its own problems already explain; say only what is missing.
            let why = if tls_configured {
                "only meaningful with server.tls.client_auth = \"optional\" or \"required\""
            } else {
                "only meaningful with [server.tls] and client_auth = \"optional\" or \"required\""
            };
            p.add(at, why);
            continue;
        };
        let mut names = Vec::with_capacity(list.len());
        for (j, name) in list.iter().enumerate() {
            let item_at = format!("{at}[{j}]");
            let name = identity.normalize(name.trim());
            if name.is_empty() {
                p.add(item_at, "must not be empty");
            } else if let Some(first) = seen.get(&name) {
                p.add(
                    item_at,
                    format!("{name:?} already names tenants[{first}]: a certificate must map to one tenant"),
                );
            } else {
                seen.insert(name.clone(), i);
                names.push(name);
            }
        }
        if names.is_empty() && list.is_empty() && t.api_key_sha256.is_none() && t.api_key_env.is_none() {
            p.add(at, "empty, and the tenant has no api key either: nothing could identify it");
            continue;
        }
        if let Some(tenant) = tenants.iter_mut().find(|c| t.id.as_deref() == Some(c.id.as_str())) {
            tenant.client_cert_names = names;
        }
    }
    tenants
}

fn upstream_url(p: &mut Problems, raw: Option<&str>) -> Uri {
    let fallback = || Uri::from_static(defaults::MOCK_BUREAU_URL);
    let Some(s) = raw else {
        p.add("upstream.url", "required: the bureau's base URL, e.g. \"http://127.0.0.1:8081\"");
        return fallback();
    };
    let uri: Uri = match s.parse() {
        Ok(u) => u,
        Err(e) => {
            p.add("upstream.url", format!("unparsable URL {s:?}: {e}"));
            return fallback();
        }
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {}
        _ => {
            p.add("upstream.url", format!("{s:?} must start with http:// or https://"));
            return fallback();
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        p.add("upstream.url", format!("{s:?} has no host"));
        return fallback();
    }
    if uri.query().is_some() {
        p.add("upstream.url", "must not carry a query string");
    }
    uri
}

fn utc_offset(p: &mut Problems, raw: Option<&str>) -> chrono::FixedOffset {
    let default = chrono::FixedOffset::east_opt(defaults::UTC_OFFSET_SECS).expect("+09:00 is a valid offset");
    let Some(s) = raw else { return default };
    let parsed = (|| {
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1, &s[1..]),
            b'-' => (-1, &s[1..]),
            _ => return None,
        };
        let (h, m) = rest.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
        if h > 14 || m > 59 {
            return None;
        }
        chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60))
    })();
    parsed.unwrap_or_else(|| {
        p.add("quota.utc_offset", format!("invalid offset {s:?}; expected \"+HH:MM\" or \"-HH:MM\", e.g. \"+09:00\""));
        default
    })
}

fn validate_backend(p: &mut Problems, raw: &RawState, env: &dyn Fn(&str) -> Option<String>, now: i64) -> StateBackend {
    match (raw.backend.as_deref(), &raw.redis) {
        (None | Some("local"), None) => return StateBackend::Local,
        (None | Some("local"), Some(_)) => {
            p.add("state.redis", "only used with state.backend = \"redis\"");
            return StateBackend::Local;
        }
        (Some("redis"), _) => {}
        (Some(other), _) => {
            p.add("state.backend", format!("unknown backend {other:?}; expected \"local\" or \"redis\""));
            return StateBackend::Local;
        }
    }
    if raw.file.is_some() {
        p.add("state.file", "counters live in Redis with state.backend = \"redis\"; remove state.file");
    }
    let r = raw.redis.clone().unwrap_or_default();
    let url = match (&r.url, &r.url_env) {
        (Some(_), Some(_)) => {
            p.add("state.redis.url_env", "give either url or url_env, not both");
            None
        }
        (Some(u), None) => Some(u.clone()),
        (None, Some(var)) => match env(var) {
            Some(u) if !u.is_empty() => Some(u),
            _ => {
                p.add("state.redis.url_env", format!("environment variable {var} is not set or empty"));
                None
            }
        },
        (None, None) => {
            p.add("state.redis.url", "required with state.backend = \"redis\", e.g. \"redis://127.0.0.1:6379\"");
            None
        }
    };
    let path = if r.url_env.is_some() { "state.redis.url_env" } else { "state.redis.url" };
    let url = url.and_then(|u| match redis::Client::open(u.as_str()) {
        Ok(_) => Some(u),
        Err(e) => {
            // The message may quote the URL: keep the password out of it.
            let why = e.to_string().replace(&u, &redact_url(&u));
            p.add(path, format!("invalid Redis URL {:?}: {why}", redact_url(&u)));
            None
        }
    });
    let key_prefix = r.key_prefix.clone().unwrap_or_else(|| defaults::REDIS_KEY_PREFIX.to_string());
    if key_prefix.is_empty() || key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_whitespace) {
        p.add("state.redis.key_prefix", "must be non-empty, without braces or spaces (they would break hash tags)");
    }
    let timeout = p.duration("state.redis.timeout", r.timeout.as_deref(), defaults::REDIS_TIMEOUT);
    if timeout.is_zero() || timeout > Duration::from_secs(1) {
        p.add("state.redis.timeout", "must be between 1ms and 1s: it is how long a request may wait for Redis");
    }
    let on_unavailable = match r.on_unavailable.as_deref() {
        None | Some("fail_open") => FailPolicy::FailOpen,
        Some("fail_closed") => FailPolicy::FailClosed,
        Some(other) => {
            p.add(
                "state.redis.on_unavailable",
                format!("unknown policy {other:?}; expected \"fail_open\" or \"fail_closed\""),
            );
            FailPolicy::FailOpen
        }
    };
    // Zero is meaningful here: one unit per request, one Redis round trip per decision.
    let lease = p.duration_or_zero("state.redis.lease", r.lease.as_deref(), defaults::REDIS_LEASE);
    let heartbeat_interval =
        p.duration("state.redis.heartbeat_interval", r.heartbeat_interval.as_deref(), defaults::REDIS_HEARTBEAT);
    let lease_ttl = p.duration("state.redis.lease_ttl", r.lease_ttl.as_deref(), defaults::REDIS_LEASE_TTL);
    if heartbeat_interval.is_zero() {
        p.add("state.redis.heartbeat_interval", "must be above zero");
    } else if lease_ttl < heartbeat_interval * 2 {
        p.add(
            "state.redis.lease_ttl",
            format!("must be at least twice heartbeat_interval ({heartbeat_interval:?}), or a slow heartbeat counts a live replica out"),
        );
    }
    if let Some(id) = &r.replica_id
        && (id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
    {
        p.add("state.redis.replica_id", "1 to 128 characters of [A-Za-z0-9-_.:]");
    }
    let expected_replicas = match r.expected_replicas {
        None => 1,
        Some(n @ 1..=1000) => n as usize,
        Some(n) => {
            p.add("state.redis.expected_replicas", format!("{n} must be between 1 and 1000 (the size of the fleet)"));
            1
        }
    };
    let tls = validate_redis_tls(p, url.as_deref(), &r, now);
    StateBackend::Redis(Box::new(RedisSettings {
        tls,
        url: url.unwrap_or_default(),
        key_prefix,
        timeout,
        on_unavailable,
        lease,
        heartbeat_interval,
        lease_ttl,
        replica_id: r.replica_id.clone(),
        expected_replicas,
        cluster: r.cluster.unwrap_or(false),
    }))
}

/// `state.redis.ca`, `client_cert`, `client_key`: files checked like `[upstream.tls]`'s, only
/// with a `rediss://` URL.
fn validate_redis_tls(p: &mut Problems, url: Option<&str>, r: &RawRedis, now: i64) -> Option<RedisTls> {
    let any = r.ca.is_some() || r.client_cert.is_some() || r.client_key.is_some();
    if !url.is_some_and(|u| u.starts_with("rediss://")) {
        if any && url.is_some() {
            p.add("state.redis.ca", "ca, client_cert and client_key are only meaningful with a rediss:// url");
        }
        return None;
    }
    if !any {
        return None;
    }
    let ca = r.ca.as_deref().and_then(|s| config_path(p, "state.redis.ca", Some(s), ""));
    let client = match (&r.client_cert, &r.client_key) {
        (Some(c), Some(k)) => config_path(p, "state.redis.client_cert", Some(c), "").zip(config_path(
            p,
            "state.redis.client_key",
            Some(k),
            "",
        )),
        (Some(_), None) => {
            p.add("state.redis.client_key", "required with client_cert: the PEM private key");
            None
        }
        (None, Some(_)) => {
            p.add("state.redis.client_cert", "required with client_key: the PEM certificate chain");
            None
        }
        (None, None) => None,
    };
    // The same checks as the bureau's TLS files: readable, parsable, key matching, not expired.
    let settings = crate::tls::UpstreamTlsSettings { ca: ca.clone(), client_cert: client.clone() };
    let loaded = match crate::tls::load_upstream(&settings, now) {
        Ok(loaded) => loaded,
        Err(problems) => {
            for fp in problems {
                p.add(format!("state.redis.{}", fp.key), fp.message);
            }
            return None;
        }
    };
    let client_not_after = loaded.client_not_after;
    let watched = loaded
        .watched
        .into_iter()
        .map(|mut w| {
            w.toml_path = w.toml_path.replacen("upstream.tls.", "state.redis.", 1);
            w
        })
        .collect();
    Some(RedisTls { ca, client, watched, client_not_after })
}

fn validate_adaptive(p: &mut Problems, a: &RawAdaptive, budget: usize) -> Option<AdaptiveSettings> {
    let before = p.0.len();
    let max = match a.max {
        None => budget,
        Some(m) if m >= 1 && m as usize <= budget => m as usize,
        Some(m) => {
            p.add("upstream.adaptive.max", format!("{m} must be between 1 and upstream.max_concurrency ({budget})"));
            budget
        }
    };
    let min = match a.min {
        // A floor only: the controller finds the knee by probing and does not drift down to it.
        None => 1,
        Some(m) if m >= 1 && m as usize <= max => m as usize,
        Some(m) => {
            p.add("upstream.adaptive.min", format!("{m} must be between 1 and upstream.adaptive.max ({max})"));
            1
        }
    };
    if a.tolerance.is_some() {
        p.add(
            "upstream.adaptive.tolerance",
            "is no longer used: the controller tells queueing from a slower bureau by probing, not by a \
             latency threshold (see adaptive.rs); remove the key",
        );
    }
    let backoff = a.backoff.unwrap_or(0.9);
    if !(backoff > 0.0 && backoff < 1.0) {
        p.add("upstream.adaptive.backoff", format!("{backoff} must be between 0 and 1 (e.g. 0.9)"));
    }
    (p.0.len() == before).then_some(AdaptiveSettings { min, max, backoff })
}

fn validate_breaker(p: &mut Problems, b: &RawBreaker) -> BreakerSettings {
    let d = BreakerSettings::default();
    let mut count = |path: &str, raw: Option<i64>, default: u32| match raw {
        None => default,
        Some(n) if (1..=10_000).contains(&n) => n as u32,
        Some(n) => {
            p.add(path, format!("{n} must be between 1 and 10000"));
            default
        }
    };
    let failures = count("upstream.breaker.failures", b.failures, d.failures);
    let probes = count("upstream.breaker.probes", b.probes, d.probes);
    let open_for = p.duration("upstream.breaker.open_for", b.open_for.as_deref(), d.open_for);
    BreakerSettings { failures, open_for, probes }
}

fn is_label_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn validate_routes(p: &mut Problems, raw: &[RawRoute]) -> Vec<RouteConfig> {
    let mut out = Vec::with_capacity(raw.len());
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut patterns: HashMap<(String, &str), usize> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        let name = match r.name.as_deref() {
            None => {
                p.add(at("name"), "required");
                None
            }
            Some(n) if !is_label_safe(n) || n.starts_with('_') => {
                p.add(at("name"), format!("{n:?} must be 1-64 characters of A-Z a-z 0-9 _ - . and not start with _"));
                None
            }
            Some(n) => {
                if let Some(first) = names.insert(n, i) {
                    p.add(at("name"), format!("duplicate route name {n:?} (also routes[{first}])"));
                }
                Some(n)
            }
        };
        let method = match r.method.as_deref() {
            None => {
                p.add(at("method"), "required, e.g. \"GET\" or \"POST\"");
                None
            }
            Some(m) => match Method::from_bytes(m.as_bytes()) {
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => Some(method),
                _ => {
                    p.add(at("method"), format!("invalid HTTP method {m:?}; use upper case, e.g. \"GET\""));
                    None
                }
            },
        };
        let path = match r.path.as_deref() {
            None => {
                p.add(at("path"), "required, e.g. \"/v1/score/{subject_id}\"");
                None
            }
            Some(path) if !path.starts_with('/') => {
                p.add(at("path"), format!("{path:?} must start with /"));
                None
            }
            Some(path) => match crate::route::check_pattern(path) {
                Ok(()) => Some(path),
                Err(e) => {
                    p.add(at("path"), e);
                    None
                }
            },
        };
        if let (Some(m), Some(path)) = (&method, path)
            && let Some(first) = patterns.insert((m.to_string(), path), i)
        {
            p.add(at("path"), format!("{m} {path} is already routes[{first}]"));
        }
        let cost = match r.cost {
            None => 1,
            Some(c) if (1..=1_000_000).contains(&c) => c as u32,
            Some(c) => {
                p.add(at("cost"), format!("{c} must be between 1 and 1000000"));
                1
            }
        };
        let cache = validate_route_cache(p, i, r, method.as_ref(), path);
        if let (Some(name), Some(method), Some(path)) = (name, method, path) {
            out.push(RouteConfig { name: name.to_string(), method, path: path.to_string(), cost, cache });
        }
    }
    if out.len() == raw.len()
        && let Err(e) = crate::route::RouteTable::new(&out)
    {
        p.add("routes", e);
    }
    out
}

fn validate_cache(p: &mut Problems, c: &RawCache, env: &dyn Fn(&str) -> Option<String>) -> CacheConfig {
    let max_bytes = p.size("cache.max_bytes", c.max_bytes.as_deref(), defaults::CACHE_MAX_BYTES);
    let max_entry_bytes =
        p.size("cache.max_entry_bytes", c.max_entry_bytes.as_deref(), defaults::CACHE_MAX_ENTRY_BYTES);
    if max_entry_bytes > max_bytes {
        p.add("cache.max_entry_bytes", format!("{max_entry_bytes} bytes is more than cache.max_bytes ({max_bytes})"));
    } else if max_entry_bytes > u64::from(u32::MAX / 2) {
        p.add("cache.max_entry_bytes", "must be below 2GiB");
    }
    let hint = "64 hex characters, e.g. from `openssl rand -hex 32`";
    let key_secret = match (&c.key_secret_hex, &c.key_secret_env) {
        (Some(_), Some(_)) => {
            p.add("cache.key_secret_env", "give either key_secret_hex or key_secret_env, not both");
            None
        }
        (Some(hex_str), None) => KeySecret::from_hex(hex_str).or_else(|| {
            p.add("cache.key_secret_hex", format!("expected {hint}"));
            None
        }),
        (None, Some(var)) => match env(var) {
            Some(v) if !v.is_empty() => KeySecret::from_hex(v.trim()).or_else(|| {
                p.add("cache.key_secret_env", format!("environment variable {var} must hold {hint}"));
                None
            }),
            _ => {
                p.add("cache.key_secret_env", format!("environment variable {var} is not set or empty"));
                None
            }
        },
        (None, None) => None,
    };
    CacheConfig { max_bytes, max_entry_bytes, key_secret }
}

/// Methods whose requests carry a body a key can read.
fn has_body(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

/// The caching and coalescing settings of `routes[i]`. `method` and `path` are `None` when
/// invalid (already reported); checks that need them are skipped then.
fn validate_route_cache(
    p: &mut Problems,
    i: usize,
    r: &RawRoute,
    method: Option<&Method>,
    path: Option<&str>,
) -> RouteCache {
    let at = |field: &str| format!("routes[{i}].{field}");
    let cache_ttl = r.cache_ttl.as_deref().map(|s| p.duration(&at("cache_ttl"), Some(s), Duration::ZERO));
    let coalesce = r.coalesce.unwrap_or(false);
    let enabled = coalesce || r.cache_ttl.is_some();
    let no_effect = "has no effect without coalesce = true or cache_ttl";
    let needs_ttl = "only meaningful with cache_ttl";

    let stale_if_error = match r.stale_if_error.as_deref() {
        None => Duration::ZERO,
        Some(_) if r.cache_ttl.is_none() => {
            p.add(at("stale_if_error"), if enabled { needs_ttl } else { no_effect });
            Duration::ZERO
        }
        Some(s) => p.duration(&at("stale_if_error"), Some(s), Duration::ZERO),
    };

    let mut cache_statuses: Vec<StatusCode> = Vec::new();
    match &r.cache_statuses {
        None => cache_statuses = default_cache_statuses(),
        Some(_) if r.cache_ttl.is_none() => p.add(at("cache_statuses"), if enabled { needs_ttl } else { no_effect }),
        Some(list) if list.is_empty() => p.add(at("cache_statuses"), "must not be empty; leave it out for [200]"),
        Some(list) => {
            for (j, s) in list.iter().enumerate() {
                let item_at = format!("{}[{j}]", at("cache_statuses"));
                match u16::try_from(*s)
                    .ok()
                    .filter(|s| (200..=499).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                {
                    None => p.add(
                        item_at,
                        format!(
                            "{s} must be a status from 200 to 499 (a cached bureau failure would hide its recovery)"
                        ),
                    ),
                    Some(code) if cache_statuses.contains(&code) => p.add(item_at, format!("{s} is listed twice")),
                    Some(code) => cache_statuses.push(code),
                }
            }
        }
    }

    let scope = match r.scope.as_deref() {
        None => Scope::Tenant,
        Some(_) if !enabled => {
            p.add(at("scope"), no_effect);
            Scope::Tenant
        }
        Some("tenant") => Scope::Tenant,
        Some("shared") => Scope::Shared,
        Some(other) => {
            p.add(
                at("scope"),
                format!(
                    "unknown scope {other:?}; expected \"tenant\" (the default) or \"shared\" (non-personal data only)"
                ),
            );
            Scope::Tenant
        }
    };

    let mut cache_key = Vec::new();
    match &r.cache_key {
        None if enabled => p.add(
            at("cache_key"),
            "required with coalesce or cache_ttl: name what identifies a look-up, e.g. [\"path.subject_id\"] or \
             [\"body.subject_id\", \"body.report_type\"] ([] if every request of the route is the same look-up)",
        ),
        None => {}
        Some(_) if !enabled => p.add(at("cache_key"), no_effect),
        Some(list) => {
            let params = path.map(crate::route::param_names);
            for (j, s) in list.iter().enumerate() {
                let item_at = format!("{}[{j}]", at("cache_key"));
                let part = match KeyPart::parse(s) {
                    Ok(part) => part,
                    Err(e) => {
                        p.add(item_at, e);
                        continue;
                    }
                };
                match (&part, &params, method) {
                    (KeyPart::Path(name), Some(params), _) if !params.contains(&name.as_str()) => {
                        let have = if params.is_empty() {
                            "it has none".to_string()
                        } else {
                            format!("it has {}", params.join(", "))
                        };
                        p.add(item_at, format!("{s:?}: {{{name}}} is not a parameter of the route's path ({have})"));
                    }
                    (KeyPart::Body(_), _, Some(m)) if !has_body(m) => {
                        p.add(
                            item_at,
                            format!("{s:?} needs a method with a body (POST, PUT or PATCH); this route is {m}"),
                        );
                    }
                    _ if cache_key.contains(&part) => p.add(item_at, format!("{s:?} is listed twice")),
                    _ => cache_key.push(part),
                }
            }
        }
    }

    RouteCache {
        coalesce,
        cache_ttl: cache_ttl.filter(|d| !d.is_zero()),
        stale_if_error,
        cache_statuses,
        cache_key,
        scope,
    }
}

fn validate_tenants(
    p: &mut Problems,
    raw: &[RawTenant],
    env: &dyn Fn(&str) -> Option<String>,
    max_cost: u32,
) -> Vec<TenantConfig> {
    if raw.is_empty() {
        p.add("tenants", "at least one [[tenants]] entry is required");
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut keys: HashMap<[u8; 32], String> = HashMap::new();
    for (i, t) in raw.iter().enumerate() {
        let at = |field: &str| format!("tenants[{i}].{field}");
        let id = match t.id.as_deref() {
            None => {
                p.add(at("id"), "required");
                None
            }
            Some(id) if !is_label_safe(id) || id.starts_with('_') => {
                p.add(at("id"), format!("{id:?} must be 1-64 characters of A-Z a-z 0-9 _ - . and not start with _"));
                None
            }
            Some(id) => {
                if let Some(first) = ids.insert(id, i) {
                    p.add(at("id"), format!("duplicate tenant id {id:?} (also tenants[{first}])"));
                }
                Some(id)
            }
        };

        let mut digests = Vec::new();
        let mut add_digest = |p: &mut Problems, path: String, d: [u8; 32]| {
            if let Some(first) = keys.get(&d) {
                p.add(path, format!("duplicate api key (also {first})"));
            } else {
                keys.insert(d, path);
                digests.push(d);
            }
        };
        if let Some(list) = &t.api_key_sha256 {
            for (suffix, hex_str) in list.items() {
                let path = format!("{}{suffix}", at("api_key_sha256"));
                let mut d = [0u8; 32];
                if hex_str.len() != 64 || hex::decode_to_slice(hex_str, &mut d).is_err() {
                    p.add(path, "expected 64 hex characters (the SHA-256 of the key, e.g. from `sha256sum`)");
                } else {
                    add_digest(p, path, d);
                }
            }
        }
        if let Some(list) = &t.api_key_env {
            for (suffix, var) in list.items() {
                let path = format!("{}{suffix}", at("api_key_env"));
                match env(var) {
                    Some(key) if !key.is_empty() => add_digest(p, path, Sha256::digest(key.as_bytes()).into()),
                    _ => p.add(path, format!("environment variable {var} is not set or empty")),
                }
            }
        }
        // A tenant identified by its client certificate alone needs no key (checked with the
        // certificate names in `validate_cert_names`).
        if t.api_key_sha256.is_none() && t.api_key_env.is_none() && t.client_cert_names.is_none() {
            p.add(at("api_key_sha256"), "each tenant needs api_key_sha256, api_key_env or client_cert_names");
        }

        let weight = match t.weight {
            None => 1,
            Some(w) if (1..=1000).contains(&w) => w as u32,
            Some(w) => {
                p.add(at("weight"), format!("{w} must be between 1 and 1000"));
                1
            }
        };
        let limits = validate_limits(p, i, t, max_cost);
        if let Some(id) = id {
            out.push(TenantConfig {
                id: id.to_string(),
                name: t.name.clone().unwrap_or_else(|| id.to_string()),
                key_digests: digests,
                weight,
                limits,
                client_cert_names: Vec::new(),
            });
        }
    }
    out
}

fn validate_limits(p: &mut Problems, i: usize, t: &RawTenant, max_cost: u32) -> TenantLimits {
    let at = |field: &str| format!("tenants[{i}].{field}");
    let positive = |p: &mut Problems, field: &str, v: Option<i64>, max: i64| -> Option<i64> {
        match v {
            None => None,
            Some(n) if (1..=max).contains(&n) => Some(n),
            Some(n) => {
                p.add(at(field), format!("{n} must be between 1 and {max}"));
                None
            }
        }
    };
    let rate = match t.rate {
        None => None,
        Some(r) if r.is_finite() && (1e-6..=1e9).contains(&r) => Some(r),
        Some(r) => {
            p.add(at("rate"), format!("{r} must be a number of requests per second between 0.000001 and 1e9"));
            None
        }
    };
    let burst = positive(p, "burst", t.burst, u32::MAX as i64).map(|b| b as u32);
    if burst.is_some() && rate.is_none() {
        p.add(at("burst"), "only meaningful with `rate`");
    }
    // Default burst: one second's worth of rate, at least the dearest route so it can ever pass.
    let burst = burst.unwrap_or_else(|| rate.map_or(1, |r| r.ceil() as u32).max(max_cost));
    // The bucket's depth in time must fit the limiter's nanosecond arithmetic (and be sane).
    if let Some(r) = rate
        && f64::from(burst) / r > 1e9
    {
        p.add(at("burst"), format!("{burst} at {r}/s takes more than 1e9 s to refill; lower burst or raise rate"));
    }
    if rate.is_some() && burst < max_cost {
        p.add(
            at("burst"),
            format!("{burst} is below the cost of the dearest route ({max_cost}); such requests could never pass"),
        );
    }
    let mut dry_run = DryRun::default();
    match &t.dry_run {
        None | Some(BoolOrList::Bool(false)) => {}
        Some(BoolOrList::Bool(true)) => dry_run = DryRun { rate: true, in_flight: true, daily: true, monthly: true },
        Some(BoolOrList::List(names)) => {
            for (j, name) in names.iter().enumerate() {
                match name.as_str() {
                    "rate" => dry_run.rate = true,
                    "in_flight" => dry_run.in_flight = true,
                    "daily" => dry_run.daily = true,
                    "monthly" => dry_run.monthly = true,
                    other => p.add(
                        format!("{}[{j}]", at("dry_run")),
                        format!("unknown limit {other:?}; expected \"rate\", \"in_flight\", \"daily\" or \"monthly\""),
                    ),
                }
            }
        }
    }
    TenantLimits {
        rate,
        burst,
        max_in_flight: positive(p, "max_in_flight", t.max_in_flight, 1_000_000).map(|n| n as u32),
        // Counters hold 40 bits (state/mod.rs): a larger quota could never be reached.
        daily_quota: positive(p, "daily_quota", t.daily_quota, (1 << 40) - 1).map(|n| n as u64),
        monthly_quota: positive(p, "monthly_quota", t.monthly_quota, (1 << 40) - 1).map(|n| n as u64),
        max_queue: match t.max_queue {
            None => defaults::MAX_QUEUE,
            Some(n) if (0..=1_000_000).contains(&n) => n as usize,
            Some(n) => {
                p.add(at("max_queue"), format!("{n} must be between 0 and 1000000"));
                defaults::MAX_QUEUE
            }
        },
        dry_run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HEX: &str = "5b2cd6b7a9d6b8bb4c6e1a5ec4d1a4a6e3c0f7d0b5e1d4a8c7f2e0b6a9d3c1e4";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn minimal() -> String {
        format!(
            r#"
[admin]
insecure_no_token = true
[upstream]
url = "http://127.0.0.1:8081"
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[tenants]]
id = "bank-a"
api_key_sha256 = "{KEY_HEX}"
"#
        )
    }

    fn problems(text: &str) -> Vec<String> {
        match Config::from_toml(text, &no_env) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_config_without_an_admin_token_is_rejected_with_what_to_set() {
        let without = minimal().replace("[admin]\ninsecure_no_token = true\n", "");
        let found = problems(&without);
        assert_eq!(found.len(), 1, "{found:?}");
        for want in ["admin.token_sha256", "admin.token_env", "insecure_no_token = true"] {
            assert!(found[0].contains(want), "{found:?} should name {want}");
        }
        let token = format!("[admin]\ntoken_sha256 = \"{KEY_HEX}\"\n{without}");
        let c = Config::from_toml(&token, &no_env).expect("a token is enough");
        assert!(c.admin.auth.has_token());
        assert!(!format!("{:?}", c.admin).contains(&KEY_HEX[..8]), "the digest stays out of debug output");
        let both = token.replacen("[admin]\n", "[admin]\ninsecure_no_token = true\n", 1);
        assert_eq!(problems(&both), ["admin.insecure_no_token: a token is set: remove insecure_no_token or the token"]);
        let hosts = token.replacen(
            "[admin]\n",
            "[admin]\nallowed_hosts = [\"Guard-1.internal\", \"ops:8443\", \"http://x\", \"\"]\n",
            1,
        );
        let found = problems(&hosts);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("admin.allowed_hosts[2]") && found[1].starts_with("admin.allowed_hosts[3]"));
        let ok = token.replacen("[admin]\n", "[admin]\nallowed_hosts = [\"Guard-1.internal\", \"ops:8443\"]\n", 1);
        assert_eq!(Config::from_toml(&ok, &no_env).unwrap().admin.allowed_hosts, ["guard-1.internal", "ops:8443"]);
    }

    #[test]
    fn redis_backend_is_validated_with_every_problem_at_its_path() {
        let with = |state: &str| format!("{}\n{state}", minimal());
        let c = Config::from_toml(
            &with("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"redis://:s3cret@127.0.0.1:6379/0\""),
            &no_env,
        )
        .expect("valid");
        let StateBackend::Redis(r) = &c.state.backend else { panic!("redis backend") };
        assert_eq!(
            (r.timeout, r.lease, r.on_unavailable),
            (defaults::REDIS_TIMEOUT, defaults::REDIS_LEASE, FailPolicy::FailOpen)
        );
        assert!(!format!("{r:?}").contains("s3cret"), "the password never reaches Debug output");
        assert_eq!(r.expected_replicas, 1);

        let p = problems(&with(
            "[state]\nbackend = \"redis\"\nfile = \"x.json\"\n[state.redis]\ntimeout = \"5s\"\non_unavailable = \"maybe\"\nheartbeat_interval = \"1s\"\nlease_ttl = \"1s\"\nkey_prefix = \"a{b}\"\nexpected_replicas = 0",
        ));
        for want in [
            "state.file:",
            "state.redis.url: required",
            "state.redis.timeout:",
            "state.redis.on_unavailable: unknown policy \"maybe\"",
            "state.redis.lease_ttl: must be at least twice",
            "state.redis.key_prefix:",
            "state.redis.expected_replicas: 0 must be between 1 and 1000",
        ] {
            assert!(p.iter().any(|x| x.starts_with(want)), "missing {want:?} in {p:?}");
        }
        assert!(problems(&with("[state]\nbackend = \"etcd\"")).iter().any(|x| x.starts_with("state.backend: unknown")));
        assert!(
            problems(&with("[state.redis]\nurl = \"redis://x\""))
                .iter()
                .any(|x| x.starts_with("state.redis: only used"))
        );
        let tls_on_plain =
            problems(&with("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"redis://h\"\nca = \"ca.pem\""));
        assert!(
            tls_on_plain.iter().any(|x| x.starts_with("state.redis.ca: ca, client_cert and client_key are only")),
            "{tls_on_plain:?}"
        );
        let missing = problems(&with(
            "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"rediss://h\"\nca = \"/nonexistent/ca.pem\"\nclient_cert = \"c.pem\"",
        ));
        assert!(missing.iter().any(|x| x.starts_with("state.redis.client_key: required")), "{missing:?}");
        let unreadable = problems(&with(
            "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"rediss://h\"\nca = \"/nonexistent/ca.pem\"",
        ));
        assert!(unreadable.iter().any(|x| x.starts_with("state.redis.ca:")), "{unreadable:?}");
        let bad_url = problems(&with("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"http://u:pw@host\""));
        assert!(
            bad_url.iter().any(|x| x.starts_with("state.redis.url: invalid Redis URL") && !x.contains(":pw@")),
            "{bad_url:?}"
        );
        let from_env = Config::from_toml(
            &with("[state]\nbackend = \"redis\"\n[state.redis]\nurl_env = \"REDIS_URL\"\nlease = \"0s\""),
            &|name| (name == "REDIS_URL").then(|| "redis://127.0.0.1:6380".to_string()),
        )
        .expect("url from the environment");
        let StateBackend::Redis(r) = &from_env.state.backend else { panic!("redis backend") };
        assert_eq!((r.url.as_str(), r.lease), ("redis://127.0.0.1:6380", Duration::ZERO));
    }

    #[test]
    fn redacted_urls_keep_the_user_and_hide_the_password() {
        assert_eq!(redact_url("redis://app:pw@h:6379/1"), "redis://app:***@h:6379/1");
        assert_eq!(redact_url("rediss://:pw@h"), "rediss://:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("redis+unix:///run/redis.sock?db=1&pass=pw"), "redis+unix:///run/redis.sock?***");
    }

    #[test]
    fn bureau_call_bounds_and_breaker_are_validated_with_their_paths() {
        let c = Config::from_toml(&minimal(), &no_env).expect("valid");
        assert_eq!(c.upstream.max_call_time, Duration::from_secs(30), "six times response_timeout");
        let slow = minimal().replacen("[upstream]", "[upstream]\nresponse_timeout = \"60s\"", 1);
        assert_eq!(Config::from_toml(&slow, &no_env).expect("valid").upstream.max_call_time, Duration::from_secs(360));
        assert_eq!(c.upstream.retry_after_cap, defaults::RETRY_AFTER_CAP);
        assert_eq!(c.upstream.breaker, BreakerSettings::default());

        let url = "url = \"http://127.0.0.1:8081\"";
        let bad = format!(
            "{url}\nresponse_timeout = \"10s\"\nmax_call_time = \"5s\"\nretry_after_cap = \"0s\"\n\
             [upstream.breaker]\nfailures = 0\nopen_for = \"soon\"\nprobes = 20000"
        );
        let p = problems(&minimal().replacen(url, &bad, 1));
        for path in [
            "upstream.max_call_time: 5s must be at least upstream.response_timeout (10s)",
            "upstream.retry_after_cap: must be greater than zero",
            "upstream.breaker.failures: 0 must be between 1 and 10000",
            "upstream.breaker.probes: 20000 must be between 1 and 10000",
            "upstream.breaker.open_for: invalid duration \"soon\"",
        ] {
            assert!(p.iter().any(|s| s.starts_with(path)), "{path} missing from {p:?}");
        }
        assert_eq!(p.len(), 5, "{p:?}");
        let absurd = problems(&minimal().replacen(url, &format!("{url}\nresponse_timeout = \"500000000000y\""), 1));
        assert!(absurd[0].starts_with("upstream.response_timeout: \"500000000000y\" is longer than"), "{absurd:?}");
        let unknown = problems(&minimal().replacen(url, &format!("{url}\n[upstream.breaker]\ncooldown = 1"), 1));
        assert!(unknown[0].starts_with("upstream.breaker.cooldown: unknown field"), "{unknown:?}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(&minimal(), &no_env).expect("valid");
        assert_eq!(c.server.listen, defaults::LISTEN.parse().unwrap());
        assert_eq!(c.server.max_body, defaults::MAX_BODY);
        assert_eq!(c.tenants[0].weight, 1);
        assert_eq!(c.tenants[0].name, "bank-a");
        assert_eq!(c.routes[0].cost, 1);
    }

    #[test]
    fn unknown_key_is_reported_with_its_path() {
        let text = minimal().replace("[upstream]", "[upstream]\ncolour = \"blue\"");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("upstream.colour: unknown field `colour`"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let text = format!(
            r#"
[admin]
insecure_no_token = true
[server]
max_body = "lots"
request_timeout = "soon"
[upstream]
url = "ftp://bureau"
[[routes]]
name = "score"
method = "get"
path = "v1/score"
[[tenants]]
id = "a"
api_key_sha256 = "{KEY_HEX}"
[[tenants]]
id = "a"
api_key_sha256 = "{KEY_HEX}"
[[tenants]]
id = "c"
api_key_sha256 = "abc"
weight = 0
"#
        );
        let p = problems(&text);
        let expect = [
            "server.max_body: invalid size \"lots\"",
            "server.request_timeout: invalid duration \"soon\"",
            "upstream.url: \"ftp://bureau\" must start with http://",
            "routes[0].method: invalid HTTP method \"get\"",
            "routes[0].path: \"v1/score\" must start with /",
            "tenants[1].id: duplicate tenant id \"a\" (also tenants[0])",
            "tenants[1].api_key_sha256: duplicate api key (also tenants[0].api_key_sha256)",
            "tenants[2].api_key_sha256: expected 64 hex characters",
            "tenants[2].weight: 0 must be between 1 and 1000",
        ];
        for e in expect {
            assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn api_key_from_env_is_hashed_and_missing_env_is_an_error() {
        let text = minimal().replace(&format!("api_key_sha256 = \"{KEY_HEX}\""), "api_key_env = [\"K1\", \"K2\"]");
        let env = |name: &str| (name == "K1").then(|| "secret".to_string());
        let err = Config::from_toml(&text, &env).unwrap_err();
        assert_eq!(err.to_string(), "tenants[0].api_key_env[1]: environment variable K2 is not set or empty");
        let env = |name: &str| Some(format!("secret-{name}"));
        let c = Config::from_toml(&text, &env).expect("valid");
        let want: [u8; 32] = Sha256::digest(b"secret-K1").into();
        assert_eq!(c.tenants[0].key_digests[0], want);
        assert_eq!(c.tenants[0].key_digests.len(), 2);
    }

    #[test]
    fn conflicting_route_patterns_are_rejected() {
        let text = minimal()
            + r#"
[[routes]]
name = "score2"
method = "GET"
path = "/v1/score/{id}"
"#;
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("routes: "), "{p:?}");
    }

    #[test]
    fn bad_types_and_syntax_are_reported_with_line() {
        let p = problems("[server]\nlisten = 8080\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("server.listen: invalid type: integer `8080`, expected a string"), "{p:?}");
        let p = problems("[server\n");
        assert!(p[0].contains("(line 1)"), "{p:?}");
    }

    #[test]
    fn caching_is_off_by_default_and_cache_defaults_apply() {
        let c = Config::from_toml(&minimal(), &no_env).expect("valid");
        assert_eq!(c.routes[0].cache, RouteCache::default());
        assert!(!c.routes[0].cache.enabled());
        assert_eq!(c.cache.max_bytes, defaults::CACHE_MAX_BYTES);
        assert_eq!(c.cache.max_entry_bytes, defaults::CACHE_MAX_ENTRY_BYTES);
        assert!(c.cache.key_secret.is_none());
        assert!(c.audit.file.is_none());
        assert!(!c.audit.fail_closed);
    }

    #[test]
    fn route_cache_settings_are_parsed() {
        let text = minimal()
            + r#"
[[routes]]
name = "report"
method = "POST"
path = "/v1/credit-report"
coalesce = true
cache_ttl = "10m"
cache_key = ["body.subject_id", "body.report_type", "query.purpose"]
stale_if_error = "1h"
cache_statuses = [200, 404]
[[routes]]
name = "codes"
method = "GET"
path = "/v1/codes/{kind}"
cache_ttl = "1h"
cache_key = ["path.kind"]
scope = "shared"
[[routes]]
name = "batch"
method = "POST"
path = "/v1/batch"
coalesce = true
cache_key = []
[cache]
max_bytes = "64MiB"
max_entry_bytes = "32KiB"
key_secret_hex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
[audit]
file = "/var/log/bureau-guard/audit.jsonl"
fail_closed = true
"#;
        let c = Config::from_toml(&text, &no_env).expect("valid");
        let report = &c.routes[1].cache;
        assert!(report.coalesce);
        assert_eq!(report.cache_ttl, Some(Duration::from_secs(600)));
        assert_eq!(report.stale_if_error, Duration::from_secs(3600));
        assert_eq!(report.cache_statuses, [StatusCode::OK, StatusCode::NOT_FOUND]);
        assert_eq!(
            report.cache_key,
            [
                KeyPart::Body(vec!["subject_id".into()]),
                KeyPart::Body(vec!["report_type".into()]),
                KeyPart::Query("purpose".into())
            ]
        );
        assert_eq!(report.scope, Scope::Tenant);
        let codes = &c.routes[2].cache;
        assert_eq!((codes.coalesce, codes.scope), (false, Scope::Shared));
        assert_eq!(codes.cache_statuses, [StatusCode::OK], "default statuses");
        let batch = &c.routes[3].cache;
        assert!(batch.enabled() && batch.cache_key.is_empty() && batch.cache_ttl.is_none());
        assert_eq!(c.cache.max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.cache.max_entry_bytes, 32 * 1024);
        assert_eq!(c.cache.key_secret, KeySecret::from_hex(&hex::encode((0u8..32).collect::<Vec<u8>>())));
        assert_eq!(c.audit.file.as_deref(), Some(Path::new("/var/log/bureau-guard/audit.jsonl")));
        assert!(c.audit.fail_closed);
    }

    #[test]
    fn cache_problems_are_reported_with_their_paths() {
        let text = minimal()
            + r#"
[[routes]]
name = "a"
method = "GET"
path = "/a/{subject_id}"
coalesce = true
[[routes]]
name = "b"
method = "GET"
path = "/b/{subject_id}"
cache_ttl = "1m"
cache_key = ["path.id", "body.subject_id", "header.x", "path.subject_id", "path.subject_id", "subject_id"]
scope = "everyone"
cache_statuses = [500, 200, 200]
[[routes]]
name = "c"
method = "POST"
path = "/c"
cache_key = ["body.subject_id"]
stale_if_error = "1m"
scope = "shared"
[[routes]]
name = "d"
method = "POST"
path = "/d"
coalesce = true
cache_key = []
stale_if_error = "1m"
cache_statuses = [200]
[[routes]]
name = "e"
method = "POST"
path = "/e"
cache_ttl = "0s"
cache_key = ["body.x"]
cache_statuses = []
[cache]
max_bytes = "1MiB"
max_entry_bytes = "2MiB"
key_secret_hex = "zz"
[audit]
fail_closed = true
"#;
        let p = problems(&text);
        let expect = [
            "routes[1].cache_key: required with coalesce or cache_ttl",
            "routes[2].cache_key[0]: \"path.id\": {id} is not a parameter of the route's path (it has subject_id)",
            "routes[2].cache_key[1]: \"body.subject_id\" needs a method with a body (POST, PUT or PATCH); this route is GET",
            "routes[2].cache_key[2]: \"header.x\": unknown source \"header\"",
            "routes[2].cache_key[4]: \"path.subject_id\" is listed twice",
            "routes[2].cache_key[5]: \"subject_id\": expected \"path.NAME\", \"query.NAME\" or \"body.FIELD\"",
            "routes[2].scope: unknown scope \"everyone\"",
            "routes[2].cache_statuses[0]: 500 must be a status from 200 to 499",
            "routes[2].cache_statuses[2]: 200 is listed twice",
            "routes[3].stale_if_error: has no effect without coalesce = true or cache_ttl",
            "routes[3].scope: has no effect without coalesce = true or cache_ttl",
            "routes[3].cache_key: has no effect without coalesce = true or cache_ttl",
            "routes[4].stale_if_error: only meaningful with cache_ttl",
            "routes[4].cache_statuses: only meaningful with cache_ttl",
            "routes[5].cache_ttl: must be greater than zero",
            "routes[5].cache_statuses: must not be empty",
            "cache.max_entry_bytes: 2097152 bytes is more than cache.max_bytes (1048576)",
            "cache.key_secret_hex: expected 64 hex characters",
            "audit.fail_closed: only meaningful with audit.file",
        ];
        for e in expect {
            assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn tls_sections_are_validated_with_their_files() {
        let dir = crate::tls::test_certs::files("config", 90);
        let f = |name: &str| dir.join(name).display().to_string();
        let server_tls = format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = \"required\"\nclient_ca = \"{}\"\n",
            f("leaf.pem"),
            f("leaf.key"),
            f("ca.pem")
        );
        let text = minimal().replace("[upstream]", &format!("{server_tls}[upstream]"))
            + "client_cert_names = [\"Bank-A.example\"]\n"
            + "[[tenants]]\nid = \"b\"\nclient_cert_names = [\"bank-b.example\"]\n";
        let c = Config::from_toml(&text, &no_env).expect("valid");
        assert!(c.tenants[1].key_digests.is_empty(), "a certificate-only tenant needs no key");
        let tls = c.server.tls.as_ref().expect("tls on");
        assert_eq!((tls.client_auth, tls.identity), (ClientAuth::Required, IdentitySource::SanDns));
        assert_eq!(c.tenants[0].client_cert_names, ["bank-a.example"], "DNS names are lower-cased");
        assert!(c.upstream.tls.is_none());
        assert!(c.warnings().is_empty());

        // https turns upstream TLS on, with the built-in roots when nothing else is said.
        let https = minimal().replace("http://127.0.0.1:8081", "https://bureau.example");
        assert!(Config::from_toml(&https, &no_env).expect("valid").upstream.tls.is_some());
    }

    #[test]
    fn every_certificate_expiring_soon_is_warned_about_redis_ones_included() {
        let dir = crate::tls::test_certs::files("config-soon", 20);
        let f = |name: &str| dir.join(name).display().to_string();
        let text = format!(
            "{}\n[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"rediss://127.0.0.1:1\"\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            minimal(),
            f("ca.pem"),
            f("leaf.pem"),
            f("leaf.key")
        );
        let c = Config::from_toml(&text, &no_env).expect("valid");
        let w: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
        assert!(w.iter().any(|w| w.starts_with("state.redis.client_cert: CN=unit-leaf expires on")), "{w:?}");
        assert_eq!(w.len(), 1, "the CA is valid for longer: {w:?}");
    }

    #[test]
    fn tls_problems_are_reported_with_their_paths() {
        let dir = crate::tls::test_certs::files("config-bad", 90);
        let f = |name: &str| dir.join(name).display().to_string();
        let text = format!(
            r#"
[admin]
insecure_no_token = true
[server.tls]
cert = "{}"
key = "{}"
client_auth = "sometimes"
client_identity = "email"
[upstream]
url = "http://127.0.0.1:8081"
[upstream.tls]
client_cert = "{}"
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[tenants]]
id = "a"
api_key_sha256 = "{KEY_HEX}"
client_cert_names = ["x"]
"#,
            f("leaf.pem"),
            f("missing.key"),
            f("leaf.pem")
        );
        let p = problems(&text);
        let expect = [
            "server.tls.client_auth: unknown value \"sometimes\"",
            "server.tls.client_identity: unknown value \"email\"",
            "server.tls.client_identity: only meaningful with client_auth",
            "upstream.tls: only meaningful with an https:// upstream.url",
            "tenants[0].client_cert_names: only meaningful with server.tls.client_auth",
        ];
        for e in expect {
            assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");

        // Settings fine, files not: the file's own problem at its path; names on two tenants.
        let text = text
            .replace(
                "client_auth = \"sometimes\"",
                &format!("client_auth = \"optional\"\nclient_ca = \"{}\"", f("ca.pem")),
            )
            .replace("client_identity = \"email\"\n", "")
            .replace("http://127.0.0.1:8081", "https://127.0.0.1:8081")
            + &format!(
                "[[tenants]]\nid = \"b\"\napi_key_sha256 = \"{}\"\nclient_cert_names = [\"X\", \"\"]\n",
                "cd".repeat(32)
            );
        let p = problems(&text.replace("missing.key", "leaf.key"));
        let expect = [
            "upstream.tls.client_key: required with client_cert",
            "tenants[1].client_cert_names[0]: \"x\" already names tenants[0]",
            "tenants[1].client_cert_names[1]: must not be empty",
        ];
        for e in expect {
            assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        let p = problems(&text);
        assert!(p.iter().any(|l| l.starts_with("server.tls.key: cannot read ")), "{p:#?}");
    }

    #[test]
    fn the_key_secret_can_come_from_the_environment() {
        let text = minimal() + "[cache]\nkey_secret_env = \"BG_KEY\"\n";
        let good = "ab".repeat(32);
        let c = Config::from_toml(&text, &|_: &str| Some(good.clone())).expect("valid");
        assert_eq!(c.cache.key_secret, KeySecret::from_hex(&good));
        let err = Config::from_toml(&text, &|_: &str| Some("hunter2".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cache.key_secret_env: environment variable BG_KEY must hold 64 hex characters, e.g. from `openssl rand -hex 32`"
        );
        assert!(!err.to_string().contains("hunter2"), "a wrong secret is not echoed");
        let err = Config::from_toml(&text, &no_env).unwrap_err();
        assert_eq!(err.to_string(), "cache.key_secret_env: environment variable BG_KEY is not set or empty");
        let both = text.replace("[cache]\n", &format!("[cache]\nkey_secret_hex = \"{good}\"\n"));
        let err = Config::from_toml(&both, &|_: &str| Some(good.clone())).unwrap_err();
        assert_eq!(err.to_string(), "cache.key_secret_env: give either key_secret_hex or key_secret_env, not both");
        assert!(!format!("{:?}", c.cache).contains(&good), "Debug never shows the secret");
    }
}

/// The parser as properties: no text makes it panic or fail without a reason, and what a valid
/// config says is what the parsed one holds.
#[cfg(test)]
mod property {
    use proptest::prelude::*;

    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "a-key".to_string())
    }

    /// TOML-shaped text from the config's own keys and values, in any order and nesting.
    fn toml_like() -> impl Strategy<Value = String> {
        let line = prop::sample::select(vec![
            "[server]",
            "[admin]",
            "[upstream]",
            "[upstream.adaptive]",
            "[upstream.breaker]",
            "[upstream.tls]",
            "[state]",
            "[state.redis]",
            "[cache]",
            "[audit]",
            "[log]",
            "[quota]",
            "[server.tls]",
            "[[routes]]",
            "[[tenants]]",
            "listen = \"127.0.0.1:0\"",
            "listen = \"[::1]:99999\"",
            "max_body = \"1KiB\"",
            "max_body = \"-1\"",
            "request_timeout = \"0s\"",
            "request_timeout = \"1ms\"",
            "url = \"http://b:1/x\"",
            "url = \"ftp://b\"",
            "url = \"redis://:pw@h\"",
            "backend = \"redis\"",
            "max_concurrency = 0",
            "min = 3",
            "max = 2",
            "backoff = 1.5",
            "name = \"r\"",
            "method = \"GET\"",
            "method = \"get\"",
            "path = \"/v1/{x}\"",
            "path = \"/v1/{x}/{*rest}\"",
            "path = \"v1\"",
            "cost = 0",
            "cache_ttl = \"1m\"",
            "coalesce = true",
            "cache_key = [\"path.x\", \"query.y\", \"body.a.b\"]",
            "cache_key = [\"header.x\"]",
            "scope = \"shared\"",
            "stale_if_error = \"1h\"",
            "cache_statuses = [200, 600]",
            "id = \"t\"",
            "id = \"_t\"",
            "api_key_env = \"SET\"",
            "api_key_env = [\"SET\", \"UNSET\"]",
            "api_key_sha256 = \"00\"",
            "rate = 0.5",
            "rate = -1",
            "burst = 4000000000",
            "daily_quota = 1",
            "dry_run = true",
            "dry_run = [\"rate\", \"x\"]",
            "weight = 0",
            "utc_offset = \"+25:00\"",
            "utc_offset = \"-03:30\"",
            "trusted_proxies = [\"10.0.0.0/33\"]",
            "proxy_protocol = true",
            "client_auth = \"required\"",
            "key_secret_hex = \"zz\"",
            "key_secret_env = \"SET\"",
            "file = \"\"",
            "x = 1",
            "= 1",
            "[",
            "\"\\u0000\" = 1",
            "a.b.c = 1",
        ]);
        prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn any_text_parses_or_says_why(text in prop_oneof![".{0,200}", toml_like()]) {
            if let Err(e) = Config::from_toml(&text, &env) {
                prop_assert!(!e.problems.is_empty());
                prop_assert!(e.problems.iter().all(|p| !p.message.is_empty()), "{:?}", e.problems);
            }
        }

        #[test]
        fn a_valid_config_holds_what_it_says(
            tenants in prop::collection::btree_map("[a-z][a-z0-9-]{0,12}", (1u32..=1000, prop::option::of(1u32..100_000), prop::option::of(1u64..1u64 << 40)), 1..5),
            routes in prop::collection::btree_map("[a-z][a-z0-9_]{0,12}", (prop::sample::select(vec!["GET", "POST", "DELETE"]), 1u32..=1000, any::<bool>()), 1..5),
            request_ms in 1u64..3_600_000,
            port in (1u16..).prop_filter("the admin listener's default port", |p| *p != 9090),
        ) {
            let mut text = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nrequest_timeout = \"{request_ms}ms\"\n[admin]\ninsecure_no_token = true\n[upstream]\nurl = \"http://bureau:8081\"\n"
            );
            for (i, (name, (method, cost, cached))) in routes.iter().enumerate() {
                text += &format!("[[routes]]\nname = \"{name}\"\nmethod = \"{method}\"\npath = \"/r{i}/{{id}}\"\ncost = {cost}\n");
                if *cached {
                    text += "cache_ttl = \"1m\"\ncache_key = [\"path.id\"]\n";
                }
            }
            for (id, (weight, rate, daily)) in &tenants {
                let digest = hex::encode(Sha256::digest(id.as_bytes()));
                text += &format!("[[tenants]]\nid = \"{id}\"\napi_key_sha256 = \"{digest}\"\nweight = {weight}\n");
                if let Some(r) = rate {
                    text += &format!("rate = {r}\n");
                }
                if let Some(d) = daily {
                    text += &format!("daily_quota = {d}\n");
                }
            }
            let c = match Config::from_toml(&text, &env) {
                Ok(c) => c,
                Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))),
            };
            prop_assert_eq!(c.server.listen.port(), port);
            prop_assert_eq!(c.server.request_timeout, Duration::from_millis(request_ms));
            prop_assert_eq!(c.routes.len(), routes.len());
            for (r, (name, (method, cost, cached))) in c.routes.iter().zip(&routes) {
                prop_assert_eq!(&r.name, name);
                prop_assert_eq!(r.method.as_str(), *method);
                prop_assert_eq!(r.cost, *cost);
                prop_assert_eq!(r.cache.cache_ttl.is_some(), *cached);
            }
            prop_assert_eq!(c.tenants.len(), tenants.len());
            for (t, (id, (weight, rate, daily))) in c.tenants.iter().zip(&tenants) {
                prop_assert_eq!(&t.id, id);
                prop_assert_eq!(t.weight, *weight);
                prop_assert_eq!(t.key_digests.clone(), vec![<[u8; 32]>::from(Sha256::digest(id.as_bytes()))]);
                prop_assert_eq!(t.limits.rate, rate.map(f64::from));
                prop_assert_eq!(t.limits.daily_quota, *daily);
            }
            // And the same text parses to the same config again.
            prop_assert_eq!(Config::from_toml(&text, &env).ok(), Some(c));
        }
    }
}

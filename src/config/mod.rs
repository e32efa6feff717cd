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
//!
//! Each section has a file with its raw struct, its typed struct and its validation (`server.rs`
//! for `[server]` and `[server.tls]`, `tenants.rs` for `[[tenants]]`, ...). This file keeps what
//! they share: [`Config`], the entry points, the defaults, the problem collector that parses
//! durations, sizes and ranges with their paths, and `validate`, which calls the sections in a
//! fixed order (problems are reported in it) and checks what spans two of them.

mod admin;
mod audit;
mod cache;
mod groups;
mod log;
mod priority;
mod quota;
mod routes;
mod server;
mod state;
mod tenants;
#[cfg(test)]
mod tests;
mod upstream;
mod usage;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::tls::ClientAuth;

pub use admin::{AdminAuth, AdminConfig};
pub use audit::AuditConfig;
pub use cache::CacheConfig;
pub use groups::GroupConfig;
pub use log::{LogConfig, LogFormat};
pub use priority::{Priorities, PriorityConfig, TenantPriority};
pub use quota::QuotaConfig;
pub use routes::{RouteCache, RouteConfig};
pub use server::{ServerConfig, Workers};
pub use state::{FailPolicy, RedisSettings, RedisTls, StateBackend, StateConfig, redact_url};
pub use tenants::{DryRun, RouteLimits, TenantConfig, TenantLimits};
pub use upstream::{AdaptiveSettings, BreakerSettings, UpstreamConfig};
pub use usage::UsageConfig;

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
    pub usage: UsageConfig,
    pub routes: Vec<RouteConfig>,
    pub tenants: Vec<TenantConfig>,
    /// Affiliated tenants under one contract (`[[groups]]`).
    pub groups: Vec<GroupConfig>,
    /// `[[priority]]` levels and the routes' and tenants' levels.
    pub priority: Priorities,
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
    server: server::RawServer,
    #[serde(default)]
    admin: admin::RawAdmin,
    #[serde(default)]
    upstream: upstream::RawUpstream,
    #[serde(default)]
    log: log::RawLog,
    #[serde(default)]
    quota: quota::RawQuota,
    #[serde(default)]
    state: state::RawState,
    #[serde(default)]
    cache: cache::RawCache,
    #[serde(default)]
    audit: audit::RawAudit,
    #[serde(default)]
    usage: usage::RawUsage,
    #[serde(default)]
    routes: Vec<routes::RawRoute>,
    #[serde(default)]
    tenants: Vec<tenants::RawTenant>,
    #[serde(default)]
    groups: Vec<groups::RawGroup>,
    #[serde(default)]
    priority: Vec<priority::RawPriority>,
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

    /// An optional integer; `None` when it is left out or outside `range` (reported).
    fn in_range(&mut self, path: &str, raw: Option<i64>, range: RangeInclusive<i64>) -> Option<i64> {
        let n = raw?;
        if range.contains(&n) {
            return Some(n);
        }
        self.add(path, format!("{n} must be between {} and {}", range.start(), range.end()));
        None
    }

    /// The value of `var`, named at `path`; `None` when it is unset or empty (reported).
    fn env_var(&mut self, path: &str, env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
        let value = env(var).filter(|v| !v.is_empty());
        if value.is_none() {
            self.add(path, format!("environment variable {var} is not set or empty"));
        }
        value
    }

    fn addr(&mut self, path: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let s = raw.unwrap_or(default);
        s.parse().unwrap_or_else(|_| {
            self.add(path, format!("invalid address {s:?}; expected IP:PORT such as \"127.0.0.1:8080\""));
            default.parse().expect("default addresses are valid")
        })
    }
}

/// Every section, then what spans sections: a listener per port, routes or `pass_unmatched`, TLS
/// files, and tenants (whose burst needs the dearest route, and whose certificate names need the
/// listener's kind of name).
fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());

    let mut server = server::validate(&mut p, &raw.server);
    let admin = admin::validate(&mut p, &raw.admin, env);
    if admin.listen == server.listen && server.listen.port() != 0 {
        p.add("admin.listen", format!("must differ from server.listen ({})", server.listen));
    }

    let mut upstream = upstream::validate(&mut p, &raw.upstream);
    let log = log::validate(&mut p, &raw.log);
    let quota = quota::validate(&mut p, &raw.quota);
    let state = state::validate(&mut p, &raw.state, env);
    let cache = cache::validate(&mut p, &raw.cache, env);
    let audit = audit::validate(&mut p, &raw.audit);
    let usage = usage::validate(&mut p, &raw.usage);

    let routes = routes::validate(&mut p, &raw.routes);
    if routes.is_empty() && !server.pass_unmatched && raw.routes.is_empty() {
        p.add("routes", "at least one [[routes]] entry is required (or set server.pass_unmatched = true)");
    }
    let max_cost = routes.iter().map(|r| r.cost).max().unwrap_or(1);
    // TLS reads its files here, so `check`, `serve` and `reload` all refuse a bad one. Tenants'
    // `client_cert_names` need to know which kind of name the listener extracts.
    let now = unix_now();
    server.tls = raw.server.tls.as_ref().and_then(|t| server::validate_tls(&mut p, t, now));
    upstream.tls = upstream::validate_tls(&mut p, &upstream.url, raw.upstream.tls.as_ref(), now);
    let cert_identity = server.tls.as_ref().filter(|t| t.client_auth != ClientAuth::Off).map(|t| t.identity);
    let tenants = tenants::validate(&mut p, &raw.tenants, env, &routes);
    let tenants = tenants::validate_cert_names(&mut p, &raw.tenants, tenants, cert_identity, raw.server.tls.is_some());
    let groups = groups::validate(&mut p, &raw.groups, &tenants, max_cost);

    let levels = priority::validate(&mut p, &raw.priority);
    let route_levels: Vec<Option<String>> = raw.routes.iter().map(|r| r.priority.clone()).collect();
    let tenant_levels: Vec<_> = raw.tenants.iter().map(|t| (t.priority.clone(), t.priorities.clone())).collect();
    let priority = priority::resolve(&mut p, levels, &route_levels, &tenant_levels);

    if p.0.is_empty() {
        Ok(Config {
            server,
            admin,
            upstream,
            log,
            quota,
            state,
            cache,
            audit,
            usage,
            routes,
            tenants,
            groups,
            priority,
        })
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

/// The names of one list's entries (`routes[i].name`, `tenants[i].id`): each required, usable as
/// a metric label and log field as it is, and given once. One check for both lists, so a route
/// name and a tenant id follow the same rule and say so in the same words.
struct Labels<'a> {
    /// `routes`, `tenants`.
    list: &'static str,
    /// `name`, `id`.
    field: &'static str,
    /// What a repeat is called: `route name`, `tenant id`.
    what: &'static str,
    /// Each name seen, with the index of the entry that gave it first.
    seen: HashMap<&'a str, usize>,
}

impl<'a> Labels<'a> {
    fn new(list: &'static str, field: &'static str, what: &'static str) -> Self {
        Labels { list, field, what, seen: HashMap::new() }
    }

    /// Entry `i`'s name, or `None` when it is missing or not label-safe (reported). A repeat is
    /// reported too, but returned: the entry's other settings are still checked.
    fn check(&mut self, p: &mut Problems, i: usize, raw: Option<&'a str>) -> Option<&'a str> {
        let at = format!("{}[{i}].{}", self.list, self.field);
        let Some(name) = raw else {
            p.add(at, "required");
            return None;
        };
        if !is_label_safe(name) || name.starts_with('_') {
            p.add(at, format!("{name:?} must be 1-64 characters of A-Z a-z 0-9 _ - . and not start with _"));
            return None;
        }
        if let Some(first) = self.seen.insert(name, i) {
            p.add(at, format!("duplicate {} {name:?} (also {}[{first}])", self.what, self.list));
        }
        Some(name)
    }
}

fn is_label_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

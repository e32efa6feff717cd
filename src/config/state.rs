//! `[state]` and `[state.redis]`: where live counters are kept, in this process (and its state
//! file) or in Redis shared by every replica.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::{Problems, config_path, defaults, unix_now};

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
    /// Shared through Redis by every replica (see `state/redis/`).
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    file: Option<String>,
    flush_interval: Option<String>,
    backend: Option<String>,
    redis: Option<RawRedis>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
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

pub(super) fn validate(p: &mut Problems, s: &RawState, env: &dyn Fn(&str) -> Option<String>) -> StateConfig {
    let state = StateConfig {
        file: s.file.as_deref().map(std::path::PathBuf::from),
        flush_interval: p.duration("state.flush_interval", s.flush_interval.as_deref(), defaults::FLUSH_INTERVAL),
        backend: validate_backend(p, s, env, unix_now()),
    };
    if s.file.as_deref() == Some("") {
        p.add("state.file", "must not be empty; leave it out to keep counters in memory only");
    }
    state
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
        (None, Some(var)) => p.env_var("state.redis.url_env", env, var),
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

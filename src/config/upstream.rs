//! `[upstream]`, `[upstream.breaker]`, `[upstream.adaptive]` and `[upstream.tls]`: the bureau,
//! how it is called, and the budget of calls it is given.

use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use super::{Problems, config_path, defaults};
use crate::tls::UpstreamTls;

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
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
    pub(super) tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    failures: Option<i64>,
    open_for: Option<String>,
    probes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdaptive {
    min: Option<i64>,
    max: Option<i64>,
    /// Removed (the controller no longer cuts on a latency threshold); read only to say so.
    tolerance: Option<toml::Value>,
    backoff: Option<f64>,
}

/// `[upstream]` but its `tls`, which is read with the other TLS files once the rest is known.
pub(super) fn validate(p: &mut Problems, u: &RawUpstream) -> UpstreamConfig {
    let mut upstream = UpstreamConfig {
        url: url(p, u.url.as_deref()),
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
        max_concurrency: p
            .in_range("upstream.max_concurrency", u.max_concurrency, 1..=100_000)
            .map_or(defaults::MAX_CONCURRENCY, |n| n as usize),
        queue_timeout: p.duration("upstream.queue_timeout", u.queue_timeout.as_deref(), defaults::QUEUE_TIMEOUT),
        max_queue_total: p
            .in_range("upstream.max_queue_total", u.max_queue_total, 1..=10_000_000)
            .map_or(defaults::MAX_QUEUE_TOTAL, |n| n as usize),
        max_call_time: Duration::ZERO, // below: its default follows response_timeout
        retry_after_cap: p.duration(
            "upstream.retry_after_cap",
            u.retry_after_cap.as_deref(),
            defaults::RETRY_AFTER_CAP,
        ),
        adaptive: None,
        breaker: u.breaker.as_ref().map_or_else(BreakerSettings::default, |b| validate_breaker(p, b)),
        tls: None,
    };
    let max_call_time = upstream.response_timeout.saturating_mul(defaults::MAX_CALL_TIME_FACTOR);
    upstream.max_call_time = p.duration("upstream.max_call_time", u.max_call_time.as_deref(), max_call_time);
    if let Some(a) = &u.adaptive {
        upstream.adaptive = validate_adaptive(p, a, upstream.max_concurrency);
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
    upstream
}

fn url(p: &mut Problems, raw: Option<&str>) -> Uri {
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

/// `[upstream.tls]` and the URL's scheme: TLS exactly for `https://`.
pub(super) fn validate_tls(p: &mut Problems, url: &Uri, t: Option<&RawUpstreamTls>, now: i64) -> Option<UpstreamTls> {
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
    let mut count =
        |path: &str, raw: Option<i64>, default: u32| p.in_range(path, raw, 1..=10_000).map_or(default, |n| n as u32);
    let failures = count("upstream.breaker.failures", b.failures, d.failures);
    let probes = count("upstream.breaker.probes", b.probes, d.probes);
    let open_for = p.duration("upstream.breaker.open_for", b.open_for.as_deref(), d.open_for);
    BreakerSettings { failures, open_for, probes }
}

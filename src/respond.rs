//! The one place where a failed request becomes a status code and a JSON body.
//!
//! Every stage of the request path answers with a [`ProxyError`] when it stops a request; the
//! kind says who is to blame and picks the status and the stable `error` code that clients and
//! dashboards rely on (the README, "Errors"). Nothing else on the proxy listener writes one
//! (hyper answers a head it cannot parse itself; the admin listener has its own).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::admission::contract::Contract;

/// The response body type of the proxy: bodies are buffered (bounded) end to end.
pub type Body = Full<Bytes>;

/// Who caused a request to fail: decides log level and which dashboard row it lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong (auth, path, size).
    Client,
    /// The tenant is over its own contracted limits.
    Tenant,
    /// The bureau failed, was unreachable or too slow.
    Bureau,
    /// The bureau's capacity is spoken for: the request was shed before reaching it.
    Capacity,
    /// bureau-guard itself (shutting down, internal limit).
    Proxy,
}

/// Why a request was answered by bureau-guard instead of the bureau.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    MissingApiKey,
    InvalidApiKey,
    RouteNotFound,
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    BureauUnreachable,
    BureauBadResponse,
    BureauTimeout,
    RequestTimeout,
    RateLimited,
    TooManyInFlight,
    DailyQuotaExhausted,
    MonthlyQuotaExhausted,
    /// The tenant's own limits on the route (`[tenants.routes.NAME]`): rate, in flight, quotas.
    RouteRateLimited,
    RouteTooManyInFlight,
    RouteDailyQuotaExhausted,
    RouteMonthlyQuotaExhausted,
    /// The limits the tenant's group shares (`[[groups]]`).
    GroupRateLimited,
    GroupTooManyInFlight,
    GroupDailyQuotaExhausted,
    GroupMonthlyQuotaExhausted,
    BureauBusy,
    /// The circuit breaker is open: the bureau failed several calls in a row, so requests are
    /// answered at once instead of waiting for connect or response timeouts.
    BureauUnavailable,
    AuditUnavailable,
    StateUnavailable,
    /// A trusted client certificate whose identity no tenant lists in `client_cert_names`.
    UnknownClientCertificate,
    /// The client certificate and the api key name different tenants.
    IdentityMismatch,
    /// The request's source address failed authentication too often recently
    /// (`server.auth_failure_*`): held off before its key is even looked at.
    TooManyAuthFailures,
}

impl ErrorKind {
    /// Every kind, for pre-registering metric label values and tests.
    pub const ALL: [ErrorKind; 29] = [
        ErrorKind::MissingApiKey,
        ErrorKind::InvalidApiKey,
        ErrorKind::RouteNotFound,
        ErrorKind::BadRequest,
        ErrorKind::BodyTooLarge,
        ErrorKind::HeadersTooLarge,
        ErrorKind::BureauUnreachable,
        ErrorKind::BureauBadResponse,
        ErrorKind::BureauTimeout,
        ErrorKind::RequestTimeout,
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
        ErrorKind::BureauBusy,
        ErrorKind::BureauUnavailable,
        ErrorKind::AuditUnavailable,
        ErrorKind::StateUnavailable,
        ErrorKind::UnknownClientCertificate,
        ErrorKind::IdentityMismatch,
        ErrorKind::TooManyAuthFailures,
    ];

    /// The stable `error` code in the JSON body; also the `outcome` metric label.
    pub const fn code(self) -> &'static str {
        match self {
            ErrorKind::MissingApiKey => "missing_api_key",
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::RouteNotFound => "route_not_found",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::BureauUnreachable => "bureau_unreachable",
            ErrorKind::BureauBadResponse => "bureau_bad_response",
            ErrorKind::BureauTimeout => "bureau_timeout",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::TooManyInFlight => "too_many_in_flight",
            ErrorKind::DailyQuotaExhausted => "daily_quota_exhausted",
            ErrorKind::MonthlyQuotaExhausted => "monthly_quota_exhausted",
            ErrorKind::RouteRateLimited => "route_rate_limited",
            ErrorKind::RouteTooManyInFlight => "route_too_many_in_flight",
            ErrorKind::RouteDailyQuotaExhausted => "route_daily_quota_exhausted",
            ErrorKind::RouteMonthlyQuotaExhausted => "route_monthly_quota_exhausted",
            ErrorKind::GroupRateLimited => "group_rate_limited",
            ErrorKind::GroupTooManyInFlight => "group_too_many_in_flight",
            ErrorKind::GroupDailyQuotaExhausted => "group_daily_quota_exhausted",
            ErrorKind::GroupMonthlyQuotaExhausted => "group_monthly_quota_exhausted",
            ErrorKind::BureauBusy => "bureau_busy",
            ErrorKind::BureauUnavailable => "bureau_unavailable",
            ErrorKind::AuditUnavailable => "audit_unavailable",
            ErrorKind::StateUnavailable => "state_unavailable",
            ErrorKind::UnknownClientCertificate => "unknown_client_certificate",
            ErrorKind::IdentityMismatch => "identity_mismatch",
            ErrorKind::TooManyAuthFailures => "too_many_auth_failures",
        }
    }

    pub const fn status(self) -> StatusCode {
        match self {
            ErrorKind::MissingApiKey | ErrorKind::InvalidApiKey | ErrorKind::IdentityMismatch => {
                StatusCode::UNAUTHORIZED
            }
            // Authenticated (the certificate is trusted) but not allowed: no tenant is this institution.
            ErrorKind::UnknownClientCertificate => StatusCode::FORBIDDEN,
            ErrorKind::RouteNotFound => StatusCode::NOT_FOUND,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::BureauUnreachable | ErrorKind::BureauBadResponse => StatusCode::BAD_GATEWAY,
            ErrorKind::BureauTimeout | ErrorKind::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RateLimited
            | ErrorKind::TooManyInFlight
            | ErrorKind::DailyQuotaExhausted
            | ErrorKind::MonthlyQuotaExhausted
            | ErrorKind::RouteRateLimited
            | ErrorKind::RouteTooManyInFlight
            | ErrorKind::RouteDailyQuotaExhausted
            | ErrorKind::RouteMonthlyQuotaExhausted
            | ErrorKind::GroupRateLimited
            | ErrorKind::GroupTooManyInFlight
            | ErrorKind::GroupDailyQuotaExhausted
            | ErrorKind::GroupMonthlyQuotaExhausted
            | ErrorKind::TooManyAuthFailures => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::BureauBusy
            | ErrorKind::BureauUnavailable
            | ErrorKind::AuditUnavailable
            | ErrorKind::StateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub const fn blame(self) -> Blame {
        match self {
            ErrorKind::MissingApiKey
            | ErrorKind::InvalidApiKey
            | ErrorKind::RouteNotFound
            | ErrorKind::BadRequest
            | ErrorKind::BodyTooLarge
            | ErrorKind::HeadersTooLarge
            | ErrorKind::UnknownClientCertificate
            | ErrorKind::IdentityMismatch
            | ErrorKind::TooManyAuthFailures => Blame::Client,
            ErrorKind::BureauUnreachable
            | ErrorKind::BureauBadResponse
            | ErrorKind::BureauTimeout
            | ErrorKind::BureauUnavailable => Blame::Bureau,
            // `audit.fail_closed`: no report leaves without its audit record.
            ErrorKind::RequestTimeout | ErrorKind::AuditUnavailable | ErrorKind::StateUnavailable => Blame::Proxy,
            ErrorKind::RateLimited
            | ErrorKind::TooManyInFlight
            | ErrorKind::DailyQuotaExhausted
            | ErrorKind::MonthlyQuotaExhausted
            | ErrorKind::RouteRateLimited
            | ErrorKind::RouteTooManyInFlight
            | ErrorKind::RouteDailyQuotaExhausted
            | ErrorKind::RouteMonthlyQuotaExhausted
            | ErrorKind::GroupRateLimited
            | ErrorKind::GroupTooManyInFlight
            | ErrorKind::GroupDailyQuotaExhausted
            | ErrorKind::GroupMonthlyQuotaExhausted => Blame::Tenant,
            // The shared bureau budget is used up: nobody's fault in particular, shed early.
            ErrorKind::BureauBusy => Blame::Capacity,
        }
    }
}

/// A request stopped by bureau-guard. Rendered by [`error_response`].
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub kind: ErrorKind,
    /// Human-readable detail; never contains an api key, a subject id or a body.
    pub message: String,
    /// Seconds after which a retry may succeed; sets `Retry-After`.
    pub retry_after_s: Option<u64>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ProxyError {
        ProxyError { kind, message: message.into(), retry_after_s: None }
    }

    /// The same error with a `Retry-After` of `secs` (at least 1).
    pub fn retry_after(mut self, secs: u64) -> ProxyError {
        self.retry_after_s = Some(secs.max(1));
        self
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)
    }
}

/// What happened to a request, as one bounded label for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by the bureau (whatever status it gave), for this request.
    Bureau,
    /// Answered from the cache with a fresh entry: no bureau call.
    CacheHit,
    /// Joined an identical bureau call already in flight and received its answer.
    Coalesced,
    /// The bureau failed (or the request would have been shed) and an expired entry within the
    /// route's `stale_if_error` window was served instead.
    Stale,
    /// Answered by bureau-guard with an error.
    Rejected(ErrorKind),
    /// A bureau call whose every requester had gone (disconnected, timed out) before the answer
    /// arrived: charged and audited, its answer still cached and fanned out. Audit and
    /// `bureau_guard_bureau_calls_abandoned_total` only; the request itself was counted when it
    /// ended.
    Abandoned,
}

impl Outcome {
    /// The outcomes that are not errors, in index order.
    const ANSWERED: usize = 5;

    /// Number of distinct outcomes; sizes per-outcome metric tables.
    pub const COUNT: usize = Outcome::ANSWERED + ErrorKind::ALL.len();

    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Bureau => "bureau",
            Outcome::CacheHit => "cache_hit",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Abandoned => "abandoned",
            Outcome::Rejected(kind) => kind.code(),
        }
    }

    /// Dense index in `0..COUNT`.
    pub fn index(self) -> usize {
        match self {
            Outcome::Bureau => 0,
            Outcome::CacheHit => 1,
            Outcome::Coalesced => 2,
            Outcome::Stale => 3,
            Outcome::Abandoned => 4,
            Outcome::Rejected(kind) => Outcome::ANSWERED + kind as usize,
        }
    }
}

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers) of every contract given, in order
/// (the tenant's `"rate"`, its route's `"route.rate"`, its group's `"group.rate"`, ...), or
/// `None` if none has a limit the field describes. Built once per config.
pub fn ratelimit_policy(contracts: &[Option<&Contract>]) -> Option<HeaderValue> {
    let mut items = Vec::new();
    for c in contracts.iter().flatten() {
        let [rate, daily, monthly] = c.policy_names();
        let l = &c.limits;
        if let Some(r) = l.rate {
            let window = (f64::from(l.burst) / r).ceil().max(1.0) as u64;
            items.push(format!("\"{rate}\";q={};w={window}", l.burst));
        }
        if let Some(q) = l.daily_quota {
            items.push(format!("\"{daily}\";q={q};w=86400"));
        }
        if let Some(q) = l.monthly_quota {
            items.push(format!("\"{monthly}\";q={q}"));
        }
    }
    if items.is_empty() { None } else { HeaderValue::from_str(&items.join(", ")).ok() }
}

/// Live state of each policy of one contract, for the `RateLimit` field: remaining units and
/// seconds to reset.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateLimitState {
    pub rate: Option<(u64, u64)>,
    pub daily: Option<(u64, u64)>,
    pub monthly: Option<(u64, u64)>,
}

impl RateLimitState {
    /// The `RateLimit` field value of the contracts' states, each with its policy names, e.g.
    /// `"rate";r=9;t=1, "daily";r=990;t=3600, "route.daily";r=40;t=3600`.
    pub fn header(states: &[([&'static str; 3], RateLimitState)]) -> Option<HeaderValue> {
        use std::fmt::Write;
        let mut out = String::new();
        for (names, state) in states {
            for (name, item) in names.iter().zip([state.rate, state.daily, state.monthly]) {
                if let Some((r, t)) = item {
                    if !out.is_empty() {
                        out.push_str(", ");
                    }
                    let _ = write!(out, "\"{name}\";r={r};t={t}");
                }
            }
        }
        if out.is_empty() { None } else { HeaderValue::from_str(&out).ok() }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u64>,
}

/// Renders `err` as the JSON error response the README documents, attributed to `tenant` when known.
pub fn error_response(err: &ProxyError, tenant: Option<&Arc<str>>) -> Response<Body> {
    let body = ErrorBody {
        error: err.kind.code(),
        message: &err.message,
        tenant: tenant.map(|t| &**t),
        retry_after_s: err.retry_after_s,
    };
    let json = serde_json::to_vec(&body).expect("serializing a struct of strings and integers cannot fail");
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = err.kind.status();
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(s) = err.retry_after_s {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn outcome_indexes_are_dense_and_labels_unique() {
        let mut seen = std::collections::HashSet::new();
        let answered = [Outcome::Bureau, Outcome::CacheHit, Outcome::Coalesced, Outcome::Stale, Outcome::Abandoned];
        let all = answered.into_iter().chain(ErrorKind::ALL.iter().map(|k| Outcome::Rejected(*k)));
        for (i, o) in all.enumerate() {
            assert_eq!(o.index(), i);
            assert!(seen.insert(o.as_str()));
        }
        assert_eq!(seen.len(), Outcome::COUNT);
    }

    #[tokio::test]
    async fn error_body_follows_the_design() {
        let mut err = ProxyError::new(ErrorKind::BureauTimeout, "no answer in 5s");
        err.retry_after_s = Some(2);
        let resp = error_response(&err, Some(&Arc::from("bank-a")));
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "bureau_timeout", "message": "no answer in 5s", "tenant": "bank-a", "retry_after_s": 2})
        );
    }
}

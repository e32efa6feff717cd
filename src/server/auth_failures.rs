//! A short penalty for sources that keep failing authentication.
//!
//! Every request with a key costs a SHA-256 and a table look-up before it is refused with 401;
//! a client guessing keys, or a bank's broken deployment retrying a revoked one in a tight
//! loop, can spend that at line rate. After `server.auth_failure_limit` 401s from one source
//! address within `auth_failure_window`, that source's requests are answered 429
//! `too_many_auth_failures` (with `Retry-After`) for `auth_failure_penalty`, before any key is
//! hashed. We answer rather than close: the bank's developers see why, and a connection
//! closed would only be reopened at once. The source is the client address as
//! `client_addr.rs` resolves it (PROXY header, trusted `X-Forwarded-For`).
//!
//! The request path pays one atomic load while nobody is penalized; the table's lock is taken
//! only on a 401 and while some penalty runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::Instant;

use crate::respond::{ErrorKind, ProxyError};

/// Sources tracked at most; past it (after dropping stale ones) new sources are not tracked, so
/// a spray of addresses cannot grow the table without bound.
const MAX_SOURCES: usize = 100_000;

/// `server.auth_failure_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthPenalty {
    /// 401s from one source within `window` that start a penalty; 0 disables it.
    pub limit: u32,
    pub window: Duration,
    pub penalty: Duration,
}

/// Failed authentications per source, and the penalties they earned.
pub struct AuthFailures {
    settings: AuthPenalty,
    base: Instant,
    /// Milliseconds after `base` at which the last running penalty ends: the lock-free check.
    penalties_end_ms: AtomicU64,
    sources: Mutex<HashMap<IpAddr, Record>>,
    penalties_total: IntCounter,
}

#[derive(Debug)]
struct Record {
    window_start: Instant,
    failures: u32,
    penalized_until: Option<Instant>,
}

impl AuthFailures {
    pub fn new(settings: AuthPenalty, penalties_total: IntCounter) -> AuthFailures {
        AuthFailures {
            settings,
            base: Instant::now(),
            penalties_end_ms: AtomicU64::new(0),
            sources: Mutex::default(),
            penalties_total,
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_millis().min(u128::from(u64::MAX)) as u64
    }

    /// `Err(429 too_many_auth_failures)` while `source` serves a penalty.
    pub fn admit(&self, source: IpAddr) -> Result<(), ProxyError> {
        let now = Instant::now();
        if self.ms(now) >= self.penalties_end_ms.load(Ordering::Acquire) {
            return Ok(());
        }
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        match sources.get(&source).and_then(|r| r.penalized_until) {
            Some(until) if until > now => Err(ProxyError::new(
                ErrorKind::TooManyAuthFailures,
                format!(
                    "more than {} failed authentications from this address within {:?}",
                    self.settings.limit, self.settings.window
                ),
            )
            .retry_after((until - now).as_secs_f64().ceil() as u64)),
            _ => Ok(()),
        }
    }

    /// Counts `err` against `source` if it is a failed authentication (401).
    pub fn record(&self, source: IpAddr, err: &ProxyError) {
        if self.settings.limit == 0 || err.kind.status() != http::StatusCode::UNAUTHORIZED {
            return;
        }
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            let settings = self.settings;
            sources.retain(|_, r| r.penalized_until.is_some_and(|u| u > now) || now < r.window_start + settings.window);
            if sources.len() >= MAX_SOURCES {
                return;
            }
        }
        let r = sources.entry(source).or_insert(Record { window_start: now, failures: 0, penalized_until: None });
        if now >= r.window_start + self.settings.window {
            *r = Record { window_start: now, failures: 0, penalized_until: r.penalized_until.filter(|u| *u > now) };
        }
        r.failures += 1;
        if r.failures >= self.settings.limit && r.penalized_until.is_none_or(|u| u <= now) {
            let until = now + self.settings.penalty;
            r.penalized_until = Some(until);
            // A new window starts with the penalty: the count does not carry over.
            r.window_start = now;
            r.failures = 0;
            self.penalties_end_ms.fetch_max(self.ms(until), Ordering::AcqRel);
            self.penalties_total.inc();
            tracing::info!(%source, penalty = ?self.settings.penalty, "too many failed authentications: source penalized");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unauthorized() -> ProxyError {
        ProxyError::new(ErrorKind::InvalidApiKey, "no")
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_over_the_limit_waits_out_its_penalty_and_others_are_untouched() {
        let settings = AuthPenalty { limit: 3, window: Duration::from_secs(10), penalty: Duration::from_secs(5) };
        let counter = IntCounter::new("p", "p").unwrap();
        let f = AuthFailures::new(settings, counter.clone());
        let (bad, good): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        f.record(bad, &unauthorized());
        f.record(bad, &unauthorized());
        f.record(bad, &ProxyError::new(ErrorKind::RouteNotFound, "404 is no failed authentication"));
        assert!(f.admit(bad).is_ok());
        f.record(bad, &unauthorized());
        let err = f.admit(bad).expect_err("penalized");
        assert_eq!((err.kind.status().as_u16(), err.retry_after_s), (429, Some(5)));
        assert!(f.admit(good).is_ok());
        assert_eq!(counter.get(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(f.admit(bad).is_ok(), "the penalty is short");

        // Failures spread wider than the window never add up to a penalty.
        for _ in 0..5 {
            f.record(good, &unauthorized());
            f.record(good, &unauthorized());
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert!(f.admit(good).is_ok());
        assert_eq!(counter.get(), 1);
    }
}

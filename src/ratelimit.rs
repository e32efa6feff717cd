//! Stage 3 of the request path: the tenant's request rate and concurrency.
//!
//! Rate and burst shape every request of a tenant, cache hits included: they protect the proxy
//! and keep a tenant to its contracted pace. The limiter is GCRA from `governor` (one atomic
//! compare-and-swap per decision, no lock), weighted by route `cost`. `max_in_flight` bounds the
//! tenant's requests inside bureau-guard at once, held as an [`InFlightGuard`] so no early
//! return or cancelled request can leak a slot.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A direct (one-bucket) GCRA limiter that reports the bucket's state on success.
type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

use crate::state::TenantState;

/// A tenant's token bucket.
#[derive(Debug)]
pub struct RateLimit {
    limiter: Limiter,
    /// Cost units per second.
    pub rate: f64,
    pub burst: u32,
}

/// A rate decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateDecision {
    /// Admitted; `remaining` cost units could be spent right now, the bucket is full again in `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Refused; a request of the same cost would pass after `retry_after`.
    Limited { retry_after: Duration },
}

impl RateLimit {
    /// A full bucket of `burst` units refilling at `rate` units per second.
    pub fn new(rate: f64, burst: u32) -> RateLimit {
        let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
        let burst_nz = NonZeroU32::new(burst.max(1)).expect("max(1) is non-zero");
        let quota = Quota::with_period(period).expect("period is non-zero").allow_burst(burst_nz);
        RateLimit { limiter: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(), rate, burst }
    }

    /// Whether this bucket already enforces `rate`/`burst` (a reload keeps it, and its fill level).
    pub fn same_policy(&self, rate: f64, burst: u32) -> bool {
        self.rate == rate && self.burst == burst
    }

    /// Takes `cost` units if they are there.
    pub fn check(&self, cost: u32) -> RateDecision {
        let n = NonZeroU32::new(cost.max(1)).expect("max(1) is non-zero");
        match self.limiter.check_n(n) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = f64::from(self.burst.saturating_sub(remaining));
                RateDecision::Allowed { remaining, reset: Duration::from_secs_f64(missing / self.rate) }
            }
            Ok(Err(not_until)) => {
                RateDecision::Limited { retry_after: not_until.wait_time_from(DefaultClock::default().now()) }
            }
            // Cost above the burst: config validation prevents it; refuse with a full refill time.
            Err(_) => RateDecision::Limited { retry_after: Duration::from_secs_f64(f64::from(self.burst) / self.rate) },
        }
    }
}

/// Counts one request in its tenant's `in_flight` for as long as it lives.
#[derive(Debug)]
pub struct InFlightGuard(Arc<TenantState>);

impl InFlightGuard {
    /// Enters if fewer than `max` requests are inside (always enters when `enforce` is false or
    /// there is no max). `Err` carries the count found.
    pub fn enter(state: &Arc<TenantState>, max: Option<u32>, enforce: bool) -> Result<(InFlightGuard, bool), u32> {
        let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
        let over = max.is_some_and(|m| before >= m);
        if over && enforce {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(before);
        }
        Ok((InFlightGuard(state.clone()), over))
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_honoured_then_refused_with_a_retry_time() {
        let rl = RateLimit::new(1.0, 3);
        for expect_remaining in [2, 1, 0] {
            match rl.check(1) {
                RateDecision::Allowed { remaining, .. } => assert_eq!(remaining, expect_remaining),
                other => panic!("within burst: {other:?}"),
            }
        }
        match rl.check(1) {
            RateDecision::Limited { retry_after } => {
                assert!(
                    retry_after > Duration::from_millis(900) && retry_after <= Duration::from_secs(1),
                    "{retry_after:?}"
                )
            }
            other => panic!("over burst: {other:?}"),
        }
    }

    #[test]
    fn cost_weighs_the_request() {
        let rl = RateLimit::new(1.0, 5);
        assert!(matches!(rl.check(5), RateDecision::Allowed { remaining: 0, .. }));
        assert!(matches!(rl.check(1), RateDecision::Limited { .. }));
    }

    #[test]
    fn in_flight_guard_caps_and_releases() {
        let s = Arc::new(TenantState::default());
        let (a, _) = InFlightGuard::enter(&s, Some(2), true).unwrap();
        let (b, _) = InFlightGuard::enter(&s, Some(2), true).unwrap();
        assert_eq!(InFlightGuard::enter(&s, Some(2), true).unwrap_err(), 2);
        let (c, over) = InFlightGuard::enter(&s, Some(2), false).unwrap();
        assert!(over, "dry run: admitted but flagged");
        drop((a, b, c));
        assert_eq!(s.in_flight.load(Ordering::Acquire), 0);
    }
}

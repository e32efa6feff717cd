//! Stage 3 of the request path: the tenant's request rate and concurrency.
//!
//! Rate and burst shape every request of a tenant, cache hits included: they protect the proxy
//! and keep a tenant to its contracted pace. The limiter is GCRA (the algorithm of `governor`),
//! weighted by route `cost`: one theoretical arrival time per tenant, advanced by one
//! compare-and-swap per decision, no lock.
//!
//! Why not the `governor` crate, which this started with: measured with 10,000 tenants
//! (`benches/admission.rs`), its limiter behind a per-tenant `Arc` cost one more cache miss per
//! decision than keeping the arrival time in [`TenantState`] next to the in-flight and quota
//! counters (1.19 µs → see benches/README.md), and a reload that changed a tenant's rate had to
//! start a new, full bucket. Here the arrival time belongs to the tenant and simply carries over;
//! the policy (rate, burst) is a plain value in the compiled config.
//!
//! `max_in_flight` bounds the tenant's requests inside bureau-guard at once, held as an
//! [`InFlightGuard`] so no early return or cancelled request can leak a slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::admission::verdict::{Mode, Reason, Refusal, Verdict};
use crate::state::TenantState;

/// A tenant's rate policy: `rate` cost units per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePolicy {
    pub rate: f64,
    pub burst: u32,
    /// Emission interval: nanoseconds per cost unit.
    t_ns: u64,
    /// Burst tolerance: `burst` emission intervals.
    tau_ns: u64,
}

/// A rate decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateDecision {
    /// Admitted; `remaining` cost units could be spent right now, the bucket is full again in `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Refused; a request of the same cost would pass after `retry_after`.
    Limited { retry_after: Duration },
}

/// Nanoseconds on a monotonic clock local to this process (the arrival times' time base).
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // Offset by one emission-sized margin so that 0 means "never used".
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl RatePolicy {
    /// `rate` units per second (> 0), `burst` units at once (≥ 1).
    pub fn new(rate: f64, burst: u32) -> RatePolicy {
        let t_ns = ((1e9 / rate).round() as u64).max(1);
        RatePolicy { rate, burst, t_ns, tau_ns: t_ns.saturating_mul(u64::from(burst.max(1))) }
    }

    /// Time per cost unit (the emission interval).
    pub fn emission(&self) -> Duration {
        Duration::from_nanos(self.t_ns)
    }

    /// Takes `cost` units at time `now` from the bucket whose theoretical arrival time is `tat`.
    pub fn check(&self, tat: &AtomicU64, now: u64, cost: u32) -> RateDecision {
        let inc = self.t_ns.saturating_mul(u64::from(cost.max(1)));
        let mut cur = tat.load(Ordering::Acquire);
        loop {
            let next = cur.max(now).saturating_add(inc);
            let allowed_until = now.saturating_add(self.tau_ns);
            if next > allowed_until {
                return RateDecision::Limited { retry_after: Duration::from_nanos(next - allowed_until) };
            }
            match tat.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let remaining = ((allowed_until - next) / self.t_ns).min(u64::from(u32::MAX)) as u32;
                    return RateDecision::Allowed { remaining, reset: Duration::from_nanos(next - now) };
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

impl RatePolicy {
    /// Gives back `cost` units taken by [`RatePolicy::check`] from the bucket at `tat` for a
    /// request another limit then refused: the refused request must not use up this one.
    pub fn refund(&self, tat: &AtomicU64, cost: u32) {
        let inc = self.t_ns.saturating_mul(u64::from(cost.max(1)));
        let mut cur = tat.load(Ordering::Acquire);
        loop {
            // Never to 0, which means "never used".
            let next = cur.saturating_sub(inc).max(1);
            match tat.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Counts one request in its tenant's `in_flight` for as long as it lives.
#[derive(Debug)]
pub struct InFlightGuard {
    state: Arc<TenantState>,
    /// The tenant's requests inside when this one entered.
    ahead: u32,
}

impl InFlightGuard {
    /// Counts the request in (always: whether it may stay is the caller's decision; dropping
    /// the guard counts it out).
    pub fn enter(state: &Arc<TenantState>) -> InFlightGuard {
        let ahead = state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlightGuard { state: state.clone(), ahead }
    }

    /// The tenant's requests that were inside when this one entered.
    pub fn ahead(&self) -> u32 {
        self.ahead
    }

    /// This process's in-flight verdict: over when `max` or more were inside already.
    pub fn admit(state: &Arc<TenantState>, max: Option<u32>, mode: Mode) -> Verdict<InFlightGuard> {
        let guard = InFlightGuard::enter(state);
        if max.is_some_and(|m| guard.ahead >= m) {
            return Verdict::over(guard, in_flight_refusal(), mode);
        }
        Verdict::Allow(guard)
    }
}

/// One request's places in the in-flight counts of every contract it is charged to (tenant,
/// route, group), held together and released together.
#[derive(Debug, Default)]
pub struct InFlightGuards(pub [Option<InFlightGuard>; 3]);

/// Over `max_in_flight`: retry in a second (a slot frees when a call ends, which is not known).
pub fn in_flight_refusal() -> Refusal {
    Refusal::tenant(Reason::InFlight, Duration::from_secs(1))
}

/// The verdict of a rate decision (local or from Redis) under `mode`; the decision itself is
/// kept for the `RateLimit` response field.
pub fn rate_verdict(decision: RateDecision, mode: Mode) -> Verdict<RateDecision> {
    match decision {
        RateDecision::Allowed { .. } => Verdict::Allow(decision),
        RateDecision::Limited { retry_after } => {
            Verdict::over(decision, Refusal::tenant(Reason::Rate, retry_after), mode)
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_is_honoured_then_refused_with_an_exact_retry_time() {
        let p = RatePolicy::new(1.0, 3);
        let tat = AtomicU64::new(0);
        let now = 10 * SEC;
        for (remaining, reset_s) in [(2, 1), (1, 2), (0, 3)] {
            assert_eq!(
                p.check(&tat, now, 1),
                RateDecision::Allowed { remaining, reset: Duration::from_secs(reset_s) },
                "within burst"
            );
        }
        assert_eq!(p.check(&tat, now, 1), RateDecision::Limited { retry_after: Duration::from_secs(1) });
        assert_eq!(p.check(&tat, now + SEC / 2, 1), RateDecision::Limited { retry_after: Duration::from_millis(500) });
        assert!(matches!(p.check(&tat, now + SEC, 1), RateDecision::Allowed { remaining: 0, .. }), "one unit back");
    }

    #[test]
    fn cost_weighs_the_request_and_idle_time_refills_only_to_the_burst() {
        let p = RatePolicy::new(10.0, 5);
        let tat = AtomicU64::new(0);
        assert!(matches!(p.check(&tat, SEC, 5), RateDecision::Allowed { remaining: 0, .. }));
        assert!(matches!(p.check(&tat, SEC, 1), RateDecision::Limited { .. }));
        // An hour idle: still only a burst of 5.
        let later = 3600 * SEC;
        assert!(matches!(p.check(&tat, later, 5), RateDecision::Allowed { remaining: 0, .. }));
        assert!(matches!(p.check(&tat, later, 1), RateDecision::Limited { .. }));
    }

    #[test]
    fn admitted_rate_matches_the_policy_over_time() {
        let p = RatePolicy::new(40.0, 10);
        let tat = AtomicU64::new(0);
        // Offer 160 req/s for 10 s of simulated time.
        let admitted = (0..1600u64)
            .filter(|i| matches!(p.check(&tat, SEC + i * SEC / 160, 1), RateDecision::Allowed { .. }))
            .count();
        assert!((409..=411).contains(&admitted), "burst 10 + 40/s x 10 s, got {admitted}");
    }

    #[test]
    fn a_new_policy_keeps_the_bucket_level() {
        let tat = AtomicU64::new(0);
        let slow = RatePolicy::new(1.0, 2);
        assert!(matches!(slow.check(&tat, SEC, 2), RateDecision::Allowed { .. }));
        // Reloaded with a faster rate: the spent burst is not handed back.
        let fast = RatePolicy::new(100.0, 2);
        assert!(matches!(fast.check(&tat, SEC, 1), RateDecision::Limited { .. }));
    }

    #[test]
    fn a_refund_gives_the_units_back() {
        let p = RatePolicy::new(1.0, 2);
        let tat = AtomicU64::new(0);
        assert!(matches!(p.check(&tat, SEC, 2), RateDecision::Allowed { remaining: 0, .. }));
        assert!(matches!(p.check(&tat, SEC, 1), RateDecision::Limited { .. }));
        p.refund(&tat, 1);
        assert!(matches!(p.check(&tat, SEC, 1), RateDecision::Allowed { remaining: 0, .. }), "one unit back");
        assert!(matches!(p.check(&tat, SEC, 1), RateDecision::Limited { .. }));
    }

    #[test]
    fn a_limited_rate_is_refused_or_in_dry_run_let_through() {
        let allowed = RateDecision::Allowed { remaining: 1, reset: Duration::from_secs(1) };
        assert!(matches!(rate_verdict(allowed, Mode::Enforce), Verdict::Allow(d) if d == allowed));
        let limited = RateDecision::Limited { retry_after: Duration::from_millis(1500) };
        let refusal = Refusal::tenant(Reason::Rate, Duration::from_millis(1500));
        assert!(matches!(rate_verdict(limited, Mode::Enforce), Verdict::Refuse(r) if r == refusal));
        assert!(matches!(rate_verdict(limited, Mode::DryRun), Verdict::DryRun(d, r) if d == limited && r == refusal));
    }

    #[test]
    fn in_flight_guard_caps_and_releases() {
        let s = Arc::new(TenantState::default());
        let Verdict::Allow(a) = InFlightGuard::admit(&s, Some(2), Mode::Enforce) else { panic!("first enters") };
        let Verdict::Allow(b) = InFlightGuard::admit(&s, Some(2), Mode::Enforce) else { panic!("second enters") };
        assert!(
            matches!(InFlightGuard::admit(&s, Some(2), Mode::Enforce), Verdict::Refuse(r) if r.reason == Reason::InFlight)
        );
        assert_eq!(s.in_flight.load(Ordering::Acquire), 2, "the refused one is counted out");
        let Verdict::DryRun(c, _) = InFlightGuard::admit(&s, Some(2), Mode::DryRun) else {
            panic!("dry run: admitted but flagged")
        };
        assert_eq!(c.ahead(), 2);
        drop((a, b, c));
        assert_eq!(s.in_flight.load(Ordering::Acquire), 0);
    }
}

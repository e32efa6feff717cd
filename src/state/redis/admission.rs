//! The request path's side of the shared state: rate tokens, in-flight slots and quota units
//! taken from this replica's leased pools, refilled from Redis in tasks of their own, and decided
//! by `on_unavailable` when Redis does not answer within the request's [`Budget`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::metrics::Limit;
use super::{Budget, DENY_HOLD, FAILED_CALL_HOLD, Got, QUOTA_DENY_HOLD, RedisState, WINDOW_GRACE_S};
use crate::admission::contract::Contract;
use crate::admission::quota::{Reservation, Source, Windows};
use crate::admission::ratelimit::{InFlightGuard, RateDecision, RatePolicy, in_flight_refusal, now_ns};
use crate::admission::verdict::{Mode, Verdict};
use crate::respond::ProxyError;
use crate::state::TenantState;
use crate::state::lease::Lease;

/// Which quota a lease is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Period {
    Day,
    Month,
}

/// One unit of one quota, taken or not.
pub(super) enum Taken {
    /// Within the limit, from `Source`, charged to window `u32`.
    Within(Source, u32),
    /// Past the limit, which is in dry run: taken all the same.
    Over(Source, u32),
    /// The limit is reached (and enforced).
    Exhausted,
}

impl RedisState {
    // -----------------------------------------------------------------------------------------
    // Rate

    /// The tenant's rate decision across all replicas.
    pub async fn rate(
        self: &Arc<Self>,
        budget: &mut Budget,
        tenant: &Arc<Contract>,
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

    /// Gives back `cost` tokens an allowed rate decision took, for a request another limit
    /// refused: to the leased pool (they are this replica's to spend), or while Redis is down
    /// to the local share's bucket that decided then.
    pub fn refund_rate(&self, tenant: &Contract, policy: &RatePolicy, cost: u32) {
        if self.is_up() {
            tenant.state.leases().rate.avail.put(0, u64::from(cost.max(1)));
        } else {
            let share = RatePolicy::new(policy.rate / self.replicas() as f64, policy.burst);
            share.refund(&tenant.state.rate_tat, cost);
        }
    }

    pub(super) fn refill_rate(self: &Arc<Self>, tenant: &Arc<Contract>, policy: &RatePolicy, cost: u64) {
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
        tenant: &Arc<Contract>,
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

    pub(super) fn refill_in_flight(self: &Arc<Self>, tenant: &Arc<Contract>, max: u32) {
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
        tenant: &Arc<Contract>,
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
    pub(super) async fn take_quota(
        self: &Arc<Self>,
        budget: &mut Budget,
        tenant: &Arc<Contract>,
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

    pub(super) fn refill_quota(
        self: &Arc<Self>,
        tenant: &Arc<Contract>,
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
}

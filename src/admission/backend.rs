//! One admission interface over the two places a contract's limits (a tenant's, its route's,
//! its group's: `contract.rs`) can live: this process's
//! counters (`state.backend = "local"`) or leases from Redis shared by every replica
//! (`state.backend = "redis"`). The request path asks [`Admission`] for the rate, in-flight and
//! quota verdicts and decides once what each [`Verdict`] means; it never asks which back-end
//! answered.
//!
//! Why an enum and not a trait: the back-ends are two, fixed, and known here; a trait object
//! with `async fn`s would box a future per check (three per request), and a generic parameter
//! would spread through `Proxy`, `Shared` and every test that builds them. The enum costs one
//! branch per check, keeps the local path free of allocation and locks, and the Redis arm
//! carries what one request may still wait for Redis ([`Budget`]) across its three checks.

use std::sync::Arc;

use crate::admission::contract::Contract;
use crate::admission::quota::{self, Reservation, Windows};
use crate::admission::ratelimit::{InFlightGuard, RateDecision, RatePolicy, now_ns, rate_verdict};
use crate::admission::verdict::{Mode, Verdict};
use crate::respond::ProxyError;
use crate::state::redis::{Budget, RedisState};

/// Where one request's admission is decided. Made once per request (it holds the request's
/// Redis budget); `Err` from a check means the shared store could not decide and
/// `on_unavailable = "fail_closed"` refuses (503), which is no verdict on the tenant.
pub enum Admission<'a> {
    /// This process's counters in `TenantState`.
    Local,
    /// Leases from Redis, with what is left of the request's wait for it.
    Shared { redis: &'a Arc<RedisState>, budget: Budget },
}

impl<'a> Admission<'a> {
    /// The back-end of this process: Redis when configured, else local.
    pub fn new(redis: Option<&'a Arc<RedisState>>) -> Admission<'a> {
        match redis {
            None => Admission::Local,
            Some(redis) => Admission::Shared { redis, budget: redis.budget() },
        }
    }

    /// The contract's rate and burst for a request of `cost` units. The decision rides along
    /// (for the `RateLimit` response field). Every check answers for the contract's scope.
    pub async fn rate(
        &mut self,
        tenant: &Arc<Contract>,
        policy: &RatePolicy,
        cost: u32,
    ) -> Result<Verdict<RateDecision>, ProxyError> {
        let decision = match self {
            Admission::Local => policy.check(&tenant.state.rate_tat, now_ns(), cost),
            Admission::Shared { redis, budget } => redis.rate(budget, tenant, policy, cost).await?,
        };
        Ok(rate_verdict(decision, Mode::of(tenant.limits.dry_run.rate)).scoped(tenant.scope))
    }

    /// Gives back what an allowed [`Admission::rate`] took, for a request a later limit refused.
    pub fn refund_rate(&self, tenant: &Contract, policy: &RatePolicy, cost: u32) {
        match self {
            Admission::Local => policy.refund(&tenant.state.rate_tat, cost),
            Admission::Shared { redis, .. } => redis.refund_rate(tenant, policy, cost),
        }
    }

    /// The tenant's requests in flight: an admitted request holds its place as a guard.
    pub async fn in_flight(&mut self, tenant: &Arc<Contract>) -> Result<Verdict<InFlightGuard>, ProxyError> {
        let mode = Mode::of(tenant.limits.dry_run.in_flight);
        let verdict = match (self, tenant.limits.max_in_flight) {
            // Shared with other replicas: counted here, held as a slot in Redis.
            (Admission::Shared { redis, budget }, Some(max)) => {
                redis.in_flight(budget, tenant, max, InFlightGuard::enter(&tenant.state)).await?
            }
            _ => InFlightGuard::admit(&tenant.state, tenant.limits.max_in_flight, mode),
        };
        Ok(verdict.scoped(tenant.scope))
    }

    /// One bureau call reserved against the tenant's daily and monthly quotas of windows `w`
    /// (`now_unix_s`: when the Redis keys of those windows may expire from).
    pub async fn reserve(
        &mut self,
        tenant: &Arc<Contract>,
        w: &Windows,
        now_unix_s: i64,
    ) -> Result<Verdict<Reservation>, ProxyError> {
        let verdict = match self {
            Admission::Local => quota::reserve(&tenant.state, &tenant.limits, w),
            Admission::Shared { redis, budget } => redis.reserve(budget, tenant, w, now_unix_s).await?,
        };
        Ok(verdict.scoped(tenant.scope))
    }
}

//! What one set of limits is charged to: a tenant, a tenant's route, or a group of tenants.
//!
//! A bank's contract caps it as a whole, caps each product apart (a full report is dearer than
//! a score), and an affiliate's use adds to its group's. A request passes each [`Contract`] that
//! applies to it — the tenant's, then its route's, then its group's — and is refused by the
//! first it exceeds; what the ones before had reserved for it is given back. Every contract has
//! the same kinds of limit and its own live counters (`TenantState`, by contract id in the
//! [`StateRegistry`], so a reload keeps them), and the Redis backend shares each one across
//! replicas under its id, the same way.
//!
//! All contracts of a request are found at config compile: a tenant holds its route contracts
//! by route index and its group by reference, so the request path does no look-up by name.

use std::sync::Arc;

use http::HeaderValue;

use crate::admission::ratelimit::RatePolicy;
use crate::admission::verdict::Scope;
use crate::config::TenantLimits;
use crate::state::{StateRegistry, TenantState};

/// One set of limits and the live counters it is charged to.
#[derive(Debug)]
pub struct Contract {
    /// The counters' id: the tenant id, `TENANT/ROUTE`, or `group:GROUP` (ids are label-safe,
    /// so neither `/` nor `:` can make two of them meet). Names the Redis keys too.
    pub id: Arc<str>,
    /// Whose limits these are: picks the 429 code.
    pub scope: Scope,
    pub limits: TenantLimits,
    /// The rate policy, if there is a `rate`; the bucket itself is `state.rate_tat`.
    pub rate: Option<RatePolicy>,
    /// Live counters, shared with every snapshot that has this contract.
    pub state: Arc<TenantState>,
}

impl Contract {
    /// The tenant-wide contract of tenant `id` (its counters are the tenant's own).
    pub fn tenant(id: &Arc<str>, limits: &TenantLimits, states: &StateRegistry) -> Contract {
        Contract::with_state(id.clone(), Scope::Tenant, limits, states.get_or_create(id))
    }

    /// A route's or a group's contract, its counters apart from any tenant's.
    pub fn extra(id: String, scope: Scope, limits: &TenantLimits, states: &StateRegistry) -> Contract {
        let state = states.get_or_create_contract(&id);
        Contract::with_state(Arc::from(id), scope, limits, state)
    }

    fn with_state(id: Arc<str>, scope: Scope, limits: &TenantLimits, state: Arc<TenantState>) -> Contract {
        Contract {
            id,
            scope,
            rate: limits.rate.map(|r| RatePolicy::new(r, limits.burst)),
            limits: limits.clone(),
            state,
        }
    }

    /// The `RateLimit` policy names of this contract's limits: `rate`, `route.rate`, `group.rate`...
    pub fn policy_names(&self) -> [&'static str; 3] {
        match self.scope {
            Scope::Tenant => ["rate", "daily", "monthly"],
            Scope::Route => ["route.rate", "route.daily", "route.monthly"],
            Scope::Group => ["group.rate", "group.daily", "group.monthly"],
        }
    }
}

/// A tenant's limits on one route, with the `RateLimit-Policy` field of every contract a request
/// of that route passes (tenant, route, group), built once.
#[derive(Debug)]
pub struct RouteContract {
    pub contract: Arc<Contract>,
    pub policy_header: Option<HeaderValue>,
}

/// The group a tenant belongs to, as the fair scheduler and admission see it.
#[derive(Debug)]
pub struct TenantGroup {
    /// Position in the config's `groups`: a dense index for per-group tables.
    pub index: usize,
    /// Its fair-scheduler queue: a dense index stable for the life of the process, by id
    /// (`StateRegistry::group_queue`), as a tenant's `state.index` is.
    pub queue: usize,
    pub id: Arc<str>,
    /// The group's share of the bureau under contention (`groups[].weight`).
    pub weight: u32,
    /// The members' aggregate limits; `None` when the group sets none.
    pub contract: Option<Arc<Contract>>,
}

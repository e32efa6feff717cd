//! What an admission check answers, whichever back-end made it: one [`Verdict`] for the rate,
//! in-flight and quota checks of the local counters and of Redis alike, so `proxy.rs` turns
//! every one of them into "go on" or a response in one place.

use std::time::Duration;

/// Whether a limit refuses what exceeds it, or only counts and reports it (`dry_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Over the limit is refused.
    Enforce,
    /// Over the limit is counted and logged, and let through.
    DryRun,
}

impl Mode {
    /// The mode of a limit whose `dry_run` setting is `dry_run`.
    pub fn of(dry_run: bool) -> Mode {
        if dry_run { Mode::DryRun } else { Mode::Enforce }
    }
}

/// Whose limit it is (see `contract.rs`): each scope has its own 429 codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The tenant's contract as a whole.
    Tenant,
    /// The tenant's contract for one route (`[tenants.routes.NAME]`).
    Route,
    /// What the tenant's group may use together (`[[groups]]`).
    Group,
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Rate and burst (GCRA).
    Rate,
    /// Requests inside bureau-guard at once.
    InFlight,
    /// Bureau calls today (the bureau's day).
    DailyQuota,
    /// Bureau calls this month.
    MonthlyQuota,
}

/// A limit that refuses (or, in dry run, would refuse) the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub scope: Scope,
    /// When a request of the same kind would pass.
    pub retry_after: Duration,
}

impl Refusal {
    /// A refusal by one of the tenant's own limits (the checks make these for any contract;
    /// [`Verdict::scoped`] then names whose limit it was).
    pub fn tenant(reason: Reason, retry_after: Duration) -> Refusal {
        Refusal { reason, scope: Scope::Tenant, retry_after }
    }
}

/// The answer of one admission check. `T` is what an admitted request holds: the rate decision
/// (for the `RateLimit` field), the in-flight guard, the quota reservation.
#[derive(Debug)]
pub enum Verdict<T> {
    /// Within the limit.
    Allow(T),
    /// Over a limit that is not enforced (`dry_run`): let through, counted and logged.
    DryRun(T, Refusal),
    /// Over the limit: refused. What the request would have held is already released.
    Refuse(Refusal),
}

impl<T> Verdict<T> {
    /// `T` admitted past `refusal` under `mode`: refused (and `T` dropped, releasing it) when
    /// enforced, let through when in dry run.
    pub fn over(held: T, refusal: Refusal, mode: Mode) -> Verdict<T> {
        match mode {
            Mode::Enforce => Verdict::Refuse(refusal),
            Mode::DryRun => Verdict::DryRun(held, refusal),
        }
    }

    /// The same verdict, its refusal (if any) being one of `scope`'s limits: the checks
    /// themselves know a limit, not whose it is.
    pub fn scoped(self, scope: Scope) -> Verdict<T> {
        match self {
            Verdict::Allow(held) => Verdict::Allow(held),
            Verdict::DryRun(held, refusal) => Verdict::DryRun(held, Refusal { scope, ..refusal }),
            Verdict::Refuse(refusal) => Verdict::Refuse(Refusal { scope, ..refusal }),
        }
    }

    /// `T` admitted, past the limit `dry_run_hit` names if any (which is then not enforced).
    pub fn admitted(held: T, dry_run_hit: Option<Refusal>) -> Verdict<T> {
        match dry_run_hit {
            None => Verdict::Allow(held),
            Some(refusal) => Verdict::DryRun(held, refusal),
        }
    }
}

//! What reached the bureau: the counters of `/stats`, per tenant, and the occupancy behind
//! `in_flight` and its window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::MockBureau;

/// What reached the bureau.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Calls to the look-up endpoints (credit-report, score), whatever their answer.
    pub calls_total: u64,
    /// Look-up calls that got a worker and were answered 200 (finished for nobody included).
    pub calls_ok: u64,
    /// Answered 503 because the queue was full or the wait timed out.
    pub calls_overloaded: u64,
    /// Answered 429/503 `bureau_refused` by a [`Refusal`](super::Refusal).
    pub calls_refused: u64,
    pub calls_bad_request: u64,
    /// Look-up calls whose work ended after their client had gone (the answer had no one to go
    /// to): the bureau's capacity spent for nobody.
    pub finished_for_nobody: u64,
    /// Look-up calls by `x-tenant` header (`-` when absent), every call received.
    pub calls_by_tenant: BTreeMap<String, u64>,
    /// Look-up calls by tenant that got a worker and were answered 200 (finished for nobody
    /// included): what a bureau would bill.
    pub served_by_tenant: BTreeMap<String, u64>,
    /// Look-up calls by tenant answered 429/503: refusals and overload.
    pub refused_by_tenant: BTreeMap<String, u64>,
    /// Look-up calls holding a worker now (the rest of `in_flight` queues or is echo).
    pub working: i64,
    /// Requests inside the bureau now (look-ups from arrival until their work ends, whatever
    /// their client did; echo requests while they last).
    pub in_flight: i64,
    /// The most requests ever inside the bureau at once.
    pub max_in_flight: i64,
    /// `in_flight` since the last window reset.
    pub window: Window,
}

/// `in_flight` over the time since the last [`MockBureau::reset_window`] (or the start).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    /// Length of the window so far, in milliseconds.
    pub since_ms: u64,
    /// The most requests inside at once during the window.
    pub max_in_flight: i64,
    /// Time-weighted 95th percentile of `in_flight`: the level at or below which the bureau
    /// spent 95% of the window (the level now when no time has passed).
    pub p95_in_flight: i64,
}

#[derive(Default)]
pub(super) struct TenantCounts {
    pub(super) calls: BTreeMap<String, u64>,
    pub(super) served: BTreeMap<String, u64>,
    pub(super) refused: BTreeMap<String, u64>,
}

pub(super) fn bump(map: &mut BTreeMap<String, u64>, tenant: &str) {
    match map.get_mut(tenant) {
        Some(n) => *n += 1,
        None => {
            map.insert(tenant.to_string(), 1);
        }
    }
}

impl MockBureau {
    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        let (in_flight, max_in_flight, window) = {
            let occupancy = self.occupancy.lock().expect("occupancy lock not poisoned");
            (occupancy.level, occupancy.max_ever, occupancy.window(Instant::now()))
        };
        let tenants = self.tenants.lock().expect("stats lock not poisoned");
        Stats {
            calls_total: self.calls_total.load(Ordering::Relaxed),
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            calls_overloaded: self.calls_overloaded.load(Ordering::Relaxed),
            calls_refused: self.calls_refused.load(Ordering::Relaxed),
            calls_bad_request: self.calls_bad_request.load(Ordering::Relaxed),
            finished_for_nobody: self.finished_for_nobody.load(Ordering::Relaxed),
            calls_by_tenant: tenants.calls.clone(),
            served_by_tenant: tenants.served.clone(),
            refused_by_tenant: tenants.refused.clone(),
            working: self.workers.busy.load(Ordering::Relaxed),
            in_flight,
            max_in_flight,
            window,
        }
    }

    /// Starts a new [`Stats::window`] now, at the current `in_flight`.
    pub fn reset_window(&self) {
        self.occupancy.lock().expect("occupancy lock not poisoned").reset(Instant::now());
    }
}

/// How many requests are inside the bureau, now, ever, and over the current window.
pub(super) struct Occupancy {
    level: i64,
    max_ever: i64,
    /// Start of the window.
    since: Instant,
    /// Last change of `level` (or the window's start, if later).
    changed: Instant,
    window_max: i64,
    /// Nanoseconds the window spent at each level (index = level).
    nanos_at: Vec<u64>,
}

impl Occupancy {
    pub(super) fn new(now: Instant) -> Occupancy {
        Occupancy { level: 0, max_ever: 0, since: now, changed: now, window_max: 0, nanos_at: Vec::new() }
    }

    fn add(&mut self, delta: i64, now: Instant) {
        self.account(now);
        self.level += delta;
        self.max_ever = self.max_ever.max(self.level);
        self.window_max = self.window_max.max(self.level);
    }

    /// Adds the time since the last change to the current level.
    fn account(&mut self, now: Instant) {
        let level = usize::try_from(self.level).unwrap_or(0);
        if self.nanos_at.len() <= level {
            self.nanos_at.resize(level + 1, 0);
        }
        let spent = now.saturating_duration_since(self.changed).as_nanos();
        self.nanos_at[level] = self.nanos_at[level].saturating_add(u64::try_from(spent).unwrap_or(u64::MAX));
        self.changed = now;
    }

    fn reset(&mut self, now: Instant) {
        self.since = now;
        self.changed = now;
        self.window_max = self.level;
        self.nanos_at.clear();
    }

    fn window(&self, now: Instant) -> Window {
        let mut at = self.nanos_at.clone();
        let level = usize::try_from(self.level).unwrap_or(0);
        if at.len() <= level {
            at.resize(level + 1, 0);
        }
        let spent = now.saturating_duration_since(self.changed).as_nanos();
        at[level] = at[level].saturating_add(u64::try_from(spent).unwrap_or(u64::MAX));
        let total: u128 = at.iter().map(|&n| u128::from(n)).sum();
        let p95 = if total == 0 {
            self.level
        } else {
            let mut below = 0u128;
            let mut p95 = self.level;
            for (l, &n) in at.iter().enumerate() {
                below += u128::from(n);
                if below * 100 >= total * 95 {
                    p95 = l as i64;
                    break;
                }
            }
            p95
        };
        Window {
            since_ms: now.saturating_duration_since(self.since).as_millis() as u64,
            max_in_flight: self.window_max,
            p95_in_flight: p95,
        }
    }
}

/// Counts a request in `in_flight` (and the window) for as long as it lives; a look-up's moves
/// into the task doing its work.
pub(super) struct Inside(Arc<MockBureau>);

impl Inside {
    pub(super) fn enter(b: &Arc<MockBureau>) -> Inside {
        b.occupancy.lock().expect("occupancy lock not poisoned").add(1, Instant::now());
        Inside(b.clone())
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        if let Ok(mut occupancy) = self.0.occupancy.lock() {
            occupancy.add(-1, Instant::now());
        }
    }
}

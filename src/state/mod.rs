//! Live per-tenant state that outlives a config: quota counters and in-flight counts.
//!
//! A reload compiles a new config snapshot, but a tenant's daily count must not start over
//! because its rate limit changed, and a restart must not hand every bank a fresh day. So the
//! counters live here, keyed by tenant id, outside any snapshot; snapshots hold `Arc`s to them.
//!
//! - [`mod@file`]: a [`file::CounterStore`] persists them: [`file::FileStore`] writes an atomic,
//!   fsynced JSON file every flush interval and at shutdown
//! - [`redis`]: with `state.backend = "redis"` (several replicas) the shared limits live in
//!   Redis instead, leased through `lease` into the [`TenantState`] here; no file is written
//!   then

pub mod file;
pub(crate) mod lease;
pub mod redis;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use file::{SavedCounters, SavedState};

use crate::admission::verdict::Mode;

/// A counter for one window (a day, a month), packed with the window's id into one atomic so a
/// window change and a count are never seen apart: `window << 40 | count`.
#[derive(Debug, Default)]
pub struct WindowCounter(AtomicU64);

const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

fn pack(window: u32, count: u64) -> u64 {
    (u64::from(window) << COUNT_BITS) | count.min(COUNT_MASK)
}

fn unpack(v: u64) -> (u32, u64) {
    ((v >> COUNT_BITS) as u32, v & COUNT_MASK)
}

impl WindowCounter {
    /// Count in `window`; a counter still holding an older window counts 0.
    pub fn get(&self, window: u32) -> u64 {
        let (w, c) = unpack(self.0.load(Ordering::Acquire));
        if w == window { c } else { 0 }
    }

    /// Adds `n` in `window` if the result stays within `limit` (or `limit` is `None`, or
    /// `mode` is dry run). Returns the new count, or `Err(current)` when it would exceed.
    pub fn try_add(&self, window: u32, n: u64, limit: Option<u64>, mode: Mode) -> Result<u64, u64> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (w, c) = unpack(cur);
            // A request that computed its window just before a rollover must not move the
            // counter back to yesterday: it is charged to the newer window already stored (a
            // later refund for its own window is then void, erring towards charging).
            let (window, c) = if w > window {
                (w, c)
            } else if w == window {
                (window, c)
            } else {
                (window, 0)
            };
            let next = c + n;
            if mode == Mode::Enforce && limit.is_some_and(|l| next > l) {
                return Err(c);
            }
            match self.0.compare_exchange_weak(cur, pack(window, next), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(next),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes back `n` added in `window`; a refund for a window that has since rolled over is void.
    pub fn sub(&self, window: u32, n: u64) {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (w, c) = unpack(cur);
            if w != window {
                return;
            }
            match self.0.compare_exchange_weak(cur, pack(w, c.saturating_sub(n)), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes `n` from the count held for `window` if at least `n` are there (a lease pool).
    pub fn try_take(&self, window: u32, n: u64) -> bool {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (w, c) = unpack(cur);
            if w != window || c < n {
                return false;
            }
            match self.0.compare_exchange_weak(cur, pack(w, c - n), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Adds `n` to `window` (a lease pool): replaces an older window's count, and is void for a
    /// window older than the one held (units of a day that is over are worth nothing).
    pub fn put(&self, window: u32, n: u64) {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (w, c) = unpack(cur);
            let next = match w.cmp(&window) {
                std::cmp::Ordering::Greater => return,
                std::cmp::Ordering::Equal => pack(w, c + n),
                std::cmp::Ordering::Less => pack(window, n),
            };
            match self.0.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Empties the counter, returning what it held.
    pub fn take_all(&self) -> (u32, u64) {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (w, c) = unpack(cur);
            match self.0.compare_exchange_weak(cur, pack(w, 0), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return (w, c),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Raises the count of `window` to at least `count`: replaces an older window's count, and
    /// is void for a window older than the one held (a total reported by Redis).
    pub fn raise(&self, window: u32, count: u64) {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (w, c) = unpack(cur);
            let next = match w.cmp(&window) {
                std::cmp::Ordering::Greater => return,
                std::cmp::Ordering::Equal if c >= count => return,
                _ => pack(window, count),
            };
            match self.0.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Sets the counter (restore from a store, or reset to zero).
    pub fn set(&self, window: u32, count: u64) {
        self.0.store(pack(window, count), Ordering::Release);
    }

    /// The raw window and count, for persistence.
    pub fn load(&self) -> (u32, u64) {
        unpack(self.0.load(Ordering::Acquire))
    }
}

/// One tenant's live state.
#[derive(Debug, Default)]
pub struct TenantState {
    /// Dense, process-stable index of this tenant id (the fair scheduler's queue index).
    pub index: usize,
    /// Requests of this tenant inside bureau-guard now (see `ratelimit::InFlightGuard`).
    pub in_flight: AtomicU32,
    /// GCRA theoretical arrival time of the tenant's rate bucket (`ratelimit::now_ns` base).
    pub rate_tat: AtomicU64,
    /// Bureau calls charged today (window = local day number).
    pub daily: WindowCounter,
    /// Bureau calls charged this month (window = year * 12 + month0).
    pub monthly: WindowCounter,
    /// The bureau answered this tenant 429: no new bureau calls for it before this instant
    /// (nanoseconds on the breaker's clock, see `breaker::Breaker::held`).
    pub bureau_hold: AtomicU64,
    /// The tenant's bureau calls past `upstream.response_timeout` that still hold their slots.
    pub overdue: AtomicU32,
    /// With the Redis backend: the units of each shared limit this replica holds (see
    /// [`TenantState::leases`]).
    leases: std::sync::OnceLock<Box<crate::state::lease::TenantLeases>>,
}

impl TenantState {
    /// The units of each shared limit this replica holds (Redis backend). Made on first use,
    /// out of line: the fields above are what the local backend touches per request, and
    /// keeping them in a small, dense allocation keeps 10,000 tenants' hot state in the CPU
    /// caches (with the leases inline or allocated beside every tenant, a decision was 1.3-1.7x
    /// slower in `benches/admission.rs`).
    pub fn leases(&self) -> &crate::state::lease::TenantLeases {
        self.leases.get_or_init(Default::default)
    }
}

/// The counters of every tenant ever configured in this process, by id, and of every route or
/// group contract (`admission/contract.rs`), by contract id.
///
/// Its mutexes are taken when a config is compiled, when counters are persisted, and by admin
/// resets; never on the request path, which holds `Arc<TenantState>` from its snapshot.
#[derive(Debug, Default)]
pub struct StateRegistry {
    tenants: Mutex<HashMap<String, Arc<TenantState>>>,
    /// Apart from the tenants: a tenant's `index` is its fair-scheduler queue, and these are
    /// no tenants. Their ids hold `/` or `:`, which no tenant id does.
    contracts: Mutex<HashMap<String, Arc<TenantState>>>,
    /// Each group's fair-scheduler queue index, by group id (dense, never reused).
    groups: Mutex<HashMap<String, usize>>,
}

/// Whether a saved or registered id is a route's or group's contract, not a tenant's.
fn is_contract_id(id: &str) -> bool {
    id.contains(['/', ':'])
}

impl StateRegistry {
    /// The state of tenant `id`, created empty on first use.
    pub fn get_or_create(&self, id: &str) -> Arc<TenantState> {
        let mut map = self.tenants.lock().expect("state registry lock not poisoned");
        let next = map.len();
        map.entry(id.to_string())
            .or_insert_with(|| Arc::new(TenantState { index: next, ..TenantState::default() }))
            .clone()
    }

    /// The state of the route or group contract `id` (`TENANT/ROUTE`, `group:GROUP`), created
    /// empty on first use.
    pub fn get_or_create_contract(&self, id: &str) -> Arc<TenantState> {
        debug_assert!(is_contract_id(id), "contract ids hold '/' or ':'");
        let mut map = self.contracts.lock().expect("state registry lock not poisoned");
        map.entry(id.to_string()).or_default().clone()
    }

    /// Group `id`'s fair-scheduler queue index: dense, and the same for the life of the
    /// process, so that a reload that reorders `[[groups]]` keeps each group's place in the
    /// queues.
    pub fn group_queue(&self, id: &str) -> usize {
        let mut map = self.groups.lock().expect("state registry lock not poisoned");
        let next = map.len();
        *map.entry(id.to_string()).or_insert(next)
    }

    /// Every tenant's state, by id (for background work; takes the registry lock once).
    pub fn all(&self) -> Vec<(String, Arc<TenantState>)> {
        let map = self.tenants.lock().expect("state registry lock not poisoned");
        map.iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    /// Every route and group contract's state, by contract id.
    pub fn all_contracts(&self) -> Vec<(String, Arc<TenantState>)> {
        let map = self.contracts.lock().expect("state registry lock not poisoned");
        map.iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    /// A copy of all counters, for persistence (route and group contracts under their ids).
    pub fn snapshot(&self) -> SavedState {
        let tenants = self
            .all()
            .into_iter()
            .chain(self.all_contracts())
            .map(|(id, s)| {
                let (day, daily) = s.daily.load();
                let (month, monthly) = s.monthly.load();
                (id, SavedCounters { day, daily, month, monthly })
            })
            .collect();
        SavedState { version: 1, tenants }
    }

    /// Loads counters saved earlier (before any traffic).
    pub fn restore(&self, saved: &SavedState) {
        for (id, c) in &saved.tenants {
            let s = if is_contract_id(id) { self.get_or_create_contract(id) } else { self.get_or_create(id) };
            s.daily.set(c.day, c.daily);
            s.monthly.set(c.month, c.monthly);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counter_limits_rolls_over_and_ignores_stale_refunds() {
        let c = WindowCounter::default();
        assert_eq!(c.try_add(7, 1, Some(2), Mode::Enforce), Ok(1));
        assert_eq!(c.try_add(7, 1, Some(2), Mode::Enforce), Ok(2));
        assert_eq!(c.try_add(7, 1, Some(2), Mode::Enforce), Err(2));
        assert_eq!(c.try_add(7, 1, Some(2), Mode::DryRun), Ok(3), "dry run counts past the limit");
        c.sub(7, 1);
        assert_eq!(c.get(7), 2);
        assert_eq!(c.get(8), 0, "a new window starts at zero");
        assert_eq!(c.try_add(8, 1, Some(2), Mode::Enforce), Ok(1));
        c.sub(7, 1);
        assert_eq!(c.get(8), 1, "a refund from yesterday does not touch today");
        assert_eq!(c.try_add(7, 1, Some(5), Mode::Enforce), Ok(2), "a late request from yesterday is charged to today");
        assert_eq!(c.get(8), 2, "and never moves the counter back");
    }

    #[test]
    fn route_and_group_counters_are_saved_and_restored_apart_from_the_tenants() {
        let reg = StateRegistry::default();
        reg.get_or_create("bank-a").daily.set(7, 3);
        reg.get_or_create_contract("bank-a/score").daily.set(7, 2);
        reg.get_or_create_contract("group:kb").monthly.set(9, 5);
        let saved = reg.snapshot();
        assert_eq!(saved.tenants.len(), 3);
        let back = StateRegistry::default();
        back.restore(&saved);
        assert_eq!(back.all().len(), 1, "only bank-a is a tenant (a scheduler queue)");
        assert_eq!(back.get_or_create_contract("bank-a/score").daily.get(7), 2);
        assert_eq!(back.get_or_create_contract("group:kb").monthly.get(9), 5);
        assert_eq!(back.get_or_create("bank-a").daily.get(7), 3);
    }

    #[test]
    fn window_counter_raise_only_moves_up_within_a_window_and_ignores_older_ones() {
        let c = WindowCounter::default();
        c.set(7, 10);
        c.raise(7, 8);
        assert_eq!(c.get(7), 10, "never lowered");
        c.raise(7, 12);
        assert_eq!(c.get(7), 12);
        c.raise(6, 50);
        assert_eq!(c.get(7), 12, "yesterday's total does not touch today");
        c.raise(8, 3);
        assert_eq!(c.load(), (8, 3), "a newer window replaces");
    }
}

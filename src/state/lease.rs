//! Units of a shared limit held by this replica: the local half of the Redis backend.
//!
//! Asking Redis for every decision would put a network round trip on every request and make
//! Redis the ceiling. Instead each replica *leases* a batch of units (rate tokens, quota units,
//! in-flight slots) from Redis, spends them locally with one atomic operation per request, and
//! asks for the next batch only when the batch runs out. Redis stays the authority — a unit
//! exists in exactly one place, in Redis or in one replica's pool — so replicas together never
//! exceed a limit; what a replica holds unused is at most one batch, which is the accuracy cost.
//!
//! A batch is sized to last about `state.redis.lease` at the tenant's current pace on this
//! replica (doubling when a batch went by quickly, halving when it lingered), so Redis round
//! trips per request fall as traffic rises: at 2,000 req/s and 100 ms, one per ~200 requests.
//! With `lease = 0` every rate and quota decision is one round trip. In-flight slots are not
//! spent but held: a replica keeps the slots its requests hold until the heartbeat shrinks them
//! to what is in use, so a request that finds a slot already held makes no round trip, even
//! with `lease = 0`.
//!
//! A [`Lease`] also lets requests that find the pool empty share one refill: the first starts
//! it (in its own task, so a request that gives up cannot lose a grant in flight), the others
//! wait on the same [`Notify`] up to the hot-path budget.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::state::WindowCounter;

/// One shared limit's units held by this replica, and the machinery to refill them.
#[derive(Debug, Default)]
pub struct Lease {
    /// Units held here and not yet spent, packed with the window they belong to (0 for limits
    /// without windows, like rate tokens and in-flight slots).
    pub avail: WindowCounter,
    /// What Redis reported with the last grant: for quotas, the units leased out in the window
    /// (all replicas); for rate, the tokens left in the shared bucket.
    pub last_seen: WindowCounter,
    /// A refill is in flight.
    refilling: AtomicBool,
    /// Wakes the requests waiting for the refill in flight.
    refilled: Notify,
    /// Redis refused more until this instant (`ratelimit::now_ns`); 0 when it did not.
    denied_until: AtomicU64,
    /// How long the refusal said to wait, in nanoseconds (the `Retry-After`).
    denied_retry_ns: AtomicU64,
    /// The window the refusal was about: a quota refused yesterday is not refused today.
    denied_window: AtomicU32,
    /// The units the refused request needed: a cheaper request is asked of Redis again (the
    /// bucket may hold fewer tokens than a costly route's cost, but enough for it).
    denied_need: AtomicU64,
    /// Redis failed a call about this limit's keys without being down (bad data in one
    /// tenant's key) until this instant: requests are decided by the policy meanwhile, instead
    /// of retrying a call that fails the same way for their whole budget.
    failed_until: AtomicU64,
    /// Size of the next batch; adapts to demand. 0 until the first refill.
    batch: AtomicU64,
    /// When the last grant arrived (`ratelimit::now_ns`): sizes the next batch, and lets the
    /// heartbeat give back rate tokens that have sat unused.
    pub granted_at: AtomicU64,
}

impl Lease {
    /// Starts a refill unless one is in flight; `true` means the caller must run it and call
    /// [`Lease::finish_refill`] when done.
    pub fn start_refill(&self) -> bool {
        !self.refilling.swap(true, Ordering::AcqRel)
    }

    /// Starts a refill, returning a guard that ends it when dropped (panics included), or
    /// `None` if one is in flight.
    pub fn refill_guard(&self) -> Option<RefillGuard<'_>> {
        self.start_refill().then_some(RefillGuard(self))
    }

    /// Ends the refill in flight and wakes everyone waiting for it.
    pub fn finish_refill(&self) {
        self.refilling.store(false, Ordering::Release);
        self.refilled.notify_waiters();
    }

    /// A future that completes at the next [`Lease::finish_refill`]; enable it before checking
    /// the pool so a refill finishing in between is not missed.
    pub fn refilled(&self) -> tokio::sync::futures::Notified<'_> {
        self.refilled.notified()
    }

    /// Records a refusal from Redis of a request needing `need` units: nothing more for
    /// requests needing as many for `hold` (no round trip per refused request while a tenant
    /// surges), `retry` to tell the client, for `window` (0 for limits without windows).
    pub fn deny(&self, now_ns: u64, window: u32, need: u64, hold: Duration, retry: Duration) {
        self.denied_retry_ns.store(retry.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        self.denied_window.store(window, Ordering::Relaxed);
        self.denied_need.store(need, Ordering::Relaxed);
        self.denied_until.store(now_ns.saturating_add(hold.as_nanos() as u64), Ordering::Release);
    }

    /// The `Retry-After` of a refusal for `window` still in force at `now_ns` for a request
    /// needing `need` units.
    pub fn denied(&self, now_ns: u64, window: u32, need: u64) -> Option<Duration> {
        let until = self.denied_until.load(Ordering::Acquire);
        (until > now_ns
            && self.denied_window.load(Ordering::Relaxed) == window
            && need >= self.denied_need.load(Ordering::Relaxed))
        .then(|| Duration::from_nanos(self.denied_retry_ns.load(Ordering::Relaxed)))
    }

    /// Records that a call about this limit failed while Redis is up: see `failed_until`.
    pub fn fail(&self, now_ns: u64, hold: Duration) {
        self.failed_until.store(now_ns.saturating_add(hold.as_nanos() as u64), Ordering::Release);
    }

    /// Whether a failure recorded by [`Lease::fail`] still holds at `now_ns`.
    pub fn failing(&self, now_ns: u64) -> bool {
        self.failed_until.load(Ordering::Acquire) > now_ns
    }

    /// Forgets a refusal (a reload or reset may have changed the limit).
    pub fn clear_denial(&self) {
        self.denied_until.store(0, Ordering::Release);
    }

    /// The size of the next batch: at least `need`, at most `cap` (but never below `need`),
    /// about `period` of the demand seen since the last grant. `period` zero: exactly `need`.
    pub fn next_batch(&self, need: u64, cap: u64, period: Duration, now_ns: u64) -> u64 {
        if period.is_zero() {
            return need;
        }
        let prev = self.batch.load(Ordering::Relaxed).max(1);
        let since = Duration::from_nanos(now_ns.saturating_sub(self.granted_at.load(Ordering::Relaxed)));
        let next = if since < period / 2 {
            prev.saturating_mul(2)
        } else if since > period * 2 {
            prev / 2
        } else {
            prev
        };
        let next = next.min(cap).max(need);
        self.batch.store(next, Ordering::Relaxed);
        next
    }
}

/// Ends a refill when dropped.
#[derive(Debug)]
pub struct RefillGuard<'a>(&'a Lease);

impl Drop for RefillGuard<'_> {
    fn drop(&mut self) {
        self.0.finish_refill();
    }
}

/// Everything one tenant holds of its shared limits.
#[derive(Debug, Default)]
pub struct TenantLeases {
    /// Rate tokens (cost units) taken from the tenant's shared GCRA bucket.
    pub rate: Lease,
    /// Daily quota units (window = local day).
    pub daily: Lease,
    /// Monthly quota units (window = month).
    pub monthly: Lease,
    /// In-flight slots: `avail` is unused; [`TenantLeases::held`] is what Redis counts for us.
    pub in_flight: Lease,
    /// In-flight slots this replica holds in Redis (its field in the tenant's hash).
    pub held: AtomicU32,
    /// When Redis last confirmed `held` (`ratelimit::now_ns`): past `lease_ttl` the slots may
    /// have expired there and been taken by other replicas, so they are not trusted.
    pub held_confirmed_at: AtomicU64,
    /// Bureau calls charged here while Redis was unreachable (fail-open), added to Redis once
    /// it is back.
    pub outage_daily: WindowCounter,
    pub outage_monthly: WindowCounter,
    /// An outage sync sent but not acknowledged, per quota (daily, monthly): retried with the
    /// same token, so a sync whose answer was lost is not counted twice. Touched only by the
    /// heartbeat task.
    pub pending_sync: std::sync::Mutex<[Option<PendingSync>; 2]>,
}

/// Outage units on their way to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingSync {
    /// Makes the token unique per replica process (with its random nonce).
    pub seq: u64,
    pub window: u32,
    pub units: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn batches_grow_when_spent_quickly_and_shrink_when_they_linger() {
        let l = Lease::default();
        let period = Duration::from_millis(100);
        l.granted_at.store(1_000 * MS, Ordering::Relaxed);
        // Spent within 10 ms: double each time, up to the cap.
        assert_eq!(l.next_batch(1, 64, period, 1_010 * MS), 2);
        assert_eq!(l.next_batch(1, 64, period, 1_010 * MS), 4);
        for _ in 0..10 {
            l.next_batch(1, 64, period, 1_010 * MS);
        }
        assert_eq!(l.next_batch(1, 64, period, 1_010 * MS), 64, "capped");
        // A second since the last grant: halve.
        assert_eq!(l.next_batch(1, 64, period, 2_000 * MS), 32);
        // Never below what the request needs, even above the cap.
        assert_eq!(l.next_batch(100, 64, period, 2_000 * MS), 100);
        // No lease period: one decision, one unit.
        assert_eq!(l.next_batch(3, 64, Duration::ZERO, 1_010 * MS), 3);
    }

    #[test]
    fn a_denial_holds_until_its_time() {
        let l = Lease::default();
        assert_eq!(l.denied(5, 0, 1), None);
        l.deny(1_000 * MS, 7, 1, Duration::from_millis(100), Duration::from_secs(3));
        assert_eq!(l.denied(1_050 * MS, 7, 1), Some(Duration::from_secs(3)));
        assert_eq!(l.denied(1_050 * MS, 8, 1), None, "a new window is not refused");
        assert_eq!(l.denied(1_100 * MS, 7, 1), None);
        l.deny(1_000 * MS, 7, 1, Duration::from_millis(100), Duration::from_secs(3));
        l.clear_denial();
        assert_eq!(l.denied(1_050 * MS, 7, 1), None);
    }

    #[test]
    fn a_refusal_of_a_costly_request_does_not_refuse_a_cheaper_one() {
        let l = Lease::default();
        l.deny(1_000 * MS, 0, 5, Duration::from_millis(10), Duration::from_secs(2));
        assert_eq!(l.denied(1_005 * MS, 0, 5), Some(Duration::from_secs(2)));
        assert_eq!(l.denied(1_005 * MS, 0, 8), Some(Duration::from_secs(2)));
        assert_eq!(l.denied(1_005 * MS, 0, 1), None, "a cost-1 request may still pass: ask Redis");
    }

    #[test]
    fn a_failure_holds_for_its_time() {
        let l = Lease::default();
        assert!(!l.failing(0));
        l.fail(1_000 * MS, Duration::from_secs(1));
        assert!(l.failing(1_999 * MS));
        assert!(!l.failing(2_000 * MS));
    }

    #[tokio::test]
    async fn one_refill_at_a_time_and_waiters_wake_when_it_ends() {
        let l = std::sync::Arc::new(Lease::default());
        assert!(l.start_refill());
        assert!(!l.start_refill(), "a second caller joins the refill in flight");
        let (registered, is_registered) = tokio::sync::oneshot::channel();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                let notified = l.refilled();
                tokio::pin!(notified);
                notified.as_mut().enable();
                assert!(!l.avail.try_take(0, 1), "nothing before the refill");
                registered.send(()).unwrap();
                notified.await;
                l.avail.try_take(0, 1)
            })
        };
        is_registered.await.unwrap();
        l.avail.put(0, 1);
        l.finish_refill();
        assert!(waiter.await.unwrap(), "the waiter got the unit the refill brought");
        assert!(l.start_refill(), "the next refill may start");
    }
}

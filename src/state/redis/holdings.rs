//! What this replica holds per tenant outside the request path: units charged during an outage
//! added to Redis once, in-flight slots renewed, idle rate tokens returned, and everything given
//! back when a tenant is removed or the replica shuts down.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;

use super::{LEAVE_TIMEOUT, RELEASE_DEADLINE, RedisState, TICK_CONCURRENCY, WINDOW_GRACE_S};
use crate::admission::contract::Contract;
use crate::admission::quota::Windows;
use crate::admission::ratelimit::{RatePolicy, now_ns};
use crate::state::TenantState;
use crate::state::lease::PendingSync;

impl RedisState {
    /// Adds the units charged during an outage. Each batch is sent with a token Redis
    /// remembers, and resent with the same token until acknowledged, so a sync whose answer
    /// was lost is not counted twice. The answer's total becomes the quota's last seen use:
    /// the next outage's share is of what is left after this one (and the other replicas'
    /// outages synced before), not again of what was left before it.
    pub(super) async fn sync_outage(&self, id: &str, state: &TenantState, w: &Windows, now_unix_s: i64) {
        let l = state.leases();
        for (k, (counter, lease, name, resets_in)) in [
            (&l.outage_daily, &l.daily, "daily", w.day_resets_in_s),
            (&l.outage_monthly, &l.monthly, "monthly", w.month_resets_in_s),
        ]
        .into_iter()
        .enumerate()
        {
            let pending = l.pending_sync.lock().expect("pending sync lock not poisoned")[k];
            let batch = match pending {
                Some(p) => p,
                None => {
                    let (window, units) = counter.load();
                    if units == 0 {
                        continue;
                    }
                    let p = PendingSync { seq: self.sync_seq.fetch_add(1, Ordering::Relaxed), window, units };
                    l.pending_sync.lock().expect("pending sync lock not poisoned")[k] = Some(p);
                    p
                }
            };
            let key = self.key(id, format_args!("{name}:{}", batch.window));
            let token = self.key(id, format_args!("sync:{}:{:016x}:{}", self.replica, self.sync_nonce, batch.seq));
            let keep = resets_in as i64 + WINDOW_GRACE_S;
            let mut inv = self.scripts.quota_sync.key(key);
            inv.key(token).arg(batch.units).arg(now_unix_s + keep).arg(keep);
            // Either answer is an acknowledgement: added now, or added before (a lost answer).
            if let Some((_added, used)) = self.call::<(u64, u64)>("quota_sync", inv).await {
                lease.last_seen.raise(batch.window, used);
                counter.sub(batch.window, batch.units);
                l.pending_sync.lock().expect("pending sync lock not poisoned")[k] = None;
                tracing::info!(
                    tenant = id,
                    quota = name,
                    units = batch.units,
                    "units charged during the Redis outage added"
                );
            }
        }
    }

    /// Renews this replica's in-flight slots, keeping only those in use: an idle replica must
    /// not sit on a slot another replica needs. Skipped while a refill runs (next tick).
    pub(super) async fn renew_in_flight(&self, id: &str, state: &TenantState, max: Option<u32>) {
        let l = state.leases();
        let held = l.held.load(Ordering::Acquire);
        if held == 0 {
            return;
        }
        let Some(_no_refill_meanwhile) = l.in_flight.refill_guard() else { return };
        let inside = || state.in_flight.load(Ordering::Acquire);
        l.held.store(held.min(inside()), Ordering::Release);
        // A request that entered while we shrank is covered: never below what is inside now.
        let target = held.min(inside());
        l.held.store(target, Ordering::Release);
        let key = self.key(id, format_args!("inflight"));
        let mut inv = self.scripts.in_flight.key(key);
        let max = max.map_or(-1, i64::from);
        inv.arg(&self.replica).arg("set").arg(target).arg(max).arg(self.settings.lease_ttl.as_millis() as u64);
        if let Some((_, now_held, _)) = self.call::<(u64, u32, u64)>("in_flight", inv).await {
            l.held.store(now_held, Ordering::Release);
            l.held_confirmed_at.store(now_ns(), Ordering::Release);
        }
    }

    /// Rate tokens leased more than two lease periods (or a second) ago and still unused go
    /// back to the shared bucket, where other replicas can use them.
    pub(super) async fn return_idle_rate(&self, t: &Contract) {
        let Some(policy) = &t.rate else { return };
        let lease = &t.state.leases().rate;
        let age = Duration::from_nanos(now_ns().saturating_sub(lease.granted_at.load(Ordering::Relaxed)));
        if lease.avail.load().1 == 0 || age < (self.settings.lease * 2).max(Duration::from_secs(1)) {
            return;
        }
        let (_, n) = lease.avail.take_all();
        self.give_back_rate(&t.id, policy, n).await;
    }

    pub(super) async fn give_back_rate(&self, id: &str, policy: &RatePolicy, n: u64) {
        if n == 0 {
            return;
        }
        let key = self.key(id, format_args!("rate"));
        let mut inv = self.scripts.rate_return.key(key);
        inv.arg(n).arg(policy.emission().as_micros().max(1) as u64);
        let _ = self.call::<i64>("rate_return", inv).await;
    }

    /// Gives back everything this replica holds for one tenant: outage units are added,
    /// unspent quota units and rate tokens returned, in-flight slots freed.
    pub(super) async fn release_tenant(
        &self,
        id: &str,
        state: &TenantState,
        rate: Option<&RatePolicy>,
        w: &Windows,
        now_unix_s: i64,
    ) {
        // Each step only while Redis answers: a hung Redis costs one timeout, not one per step.
        if !self.is_up() {
            return;
        }
        self.sync_outage(id, state, w, now_unix_s).await;
        let l = state.leases();
        if let Some(policy) = rate
            && self.is_up()
        {
            let (_, n) = l.rate.avail.take_all();
            self.give_back_rate(id, policy, n).await;
        }
        for (lease, name) in [(&l.daily, "daily"), (&l.monthly, "monthly")] {
            if !self.is_up() {
                return;
            }
            let (window, n) = lease.avail.take_all();
            if n > 0 {
                let mut inv = self.scripts.quota_return.key(self.key(id, format_args!("{name}:{window}")));
                inv.arg(n);
                let _ = self.call::<i64>("quota_return", inv).await;
            }
        }
        if self.is_up() && l.held.swap(0, Ordering::AcqRel) > 0 {
            let mut inv = self.scripts.in_flight.key(self.key(id, format_args!("inflight")));
            inv.arg(&self.replica).arg("set").arg(0).arg(-1).arg(1);
            let _ = self.call::<(u64, u32, u64)>("in_flight", inv).await;
        }
    }

    /// On shutdown (after the drain): everything this replica holds goes back, within
    /// `RELEASE_DEADLINE` (2 s) in all, and it leaves the replica count. With Redis down (or once
    /// it stops answering) the give-backs are skipped: unsynced outage units are lost (logged),
    /// in-flight slots expire with the lease, unspent units are lost to the tenant (the safe
    /// side). Leaving is tried either way, on its own short bound, so a Redis that answers
    /// again hands this replica's share of the bureau budget to the others at once.
    pub async fn release_all(&self, tenants: &[Arc<Contract>], w: &Windows, now_unix_s: i64) {
        if self.is_up() {
            let release = futures_util::stream::iter(tenants).for_each_concurrent(TICK_CONCURRENCY, |t| async move {
                if self.is_up() {
                    self.release_tenant(&t.id, &t.state, t.rate.as_ref(), w, now_unix_s).await;
                }
            });
            if tokio::time::timeout(RELEASE_DEADLINE, release).await.is_err() {
                tracing::warn!(deadline = ?RELEASE_DEADLINE, "shutting down: Redis too slow to take back everything this replica held");
            }
        }
        let unsynced: u64 = tenants
            .iter()
            .map(|t| t.state.leases().outage_daily.load().1 + t.state.leases().outage_monthly.load().1)
            .sum();
        if unsynced > 0 {
            tracing::error!(
                units = unsynced,
                "shutting down with Redis unreachable: quota units charged during the outage are not in Redis"
            );
        }
        let leave = async {
            // A connection that died in the outage fails its first command and reconnects.
            for _ in 0..2 {
                let mut inv = self.scripts.leave.key(self.replicas_key());
                inv.key(self.deployment_key("owners")).arg(&self.replica).arg(&self.instance);
                if self.conn.run(async |c| inv.invoke_async::<i64>(c).await).await.is_ok() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LEAVE_TIMEOUT, leave).await;
    }
}

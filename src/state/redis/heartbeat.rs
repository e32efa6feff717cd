//! Heartbeats: this replica in the replica set (and the bureau budget split by it), its id owned
//! by one process, a Redis that lost its data noticed; each tick then renews and gives back what
//! the replica holds per tenant (`holdings.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use tokio::time::Instant;

use super::{RedisState, TICK_CONCURRENCY};
use crate::admission::contract::Contract;
use crate::admission::quota::Windows;
use crate::state::TenantState;

/// A heartbeat at start-up, or one of the renewals after it.
#[derive(Clone, Copy)]
pub(super) enum Beat {
    Join,
    Renew,
}

/// What a heartbeat that Redis answered found.
pub(super) enum Joined {
    Yes,
    /// (Start-up only.) Another live process renews this replica's id.
    IdTaken,
}

impl RedisState {
    /// Start-up's first heartbeat. `Err` when another live process renews this replica's id: two
    /// processes under one id count as one replica, and each would take that one's share of
    /// the bureau budget. An id whose holder has died (a crash, then a restart under a fixed id)
    /// is free once its lease runs out, so this waits up to `lease_ttl` for that before
    /// refusing. `Ok(false)`: Redis did not answer (on_unavailable applies until it does).
    pub async fn join(&self) -> Result<bool, String> {
        let deadline = Instant::now() + self.settings.lease_ttl + self.settings.heartbeat_interval;
        loop {
            match self.beat(Beat::Join).await {
                None => return Ok(false),
                Some(Joined::Yes) => return Ok(true),
                Some(Joined::IdTaken) if Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.heartbeat_interval).await;
                }
                Some(Joined::IdTaken) => {
                    self.metrics.id_conflicts.inc();
                    return Err(format!(
                        "state.redis.replica_id {:?} is renewed by another live replica; give each replica its own id (or leave replica_id out)",
                        self.replica
                    ));
                }
            }
        }
    }

    /// Announces this replica, learns how many are live, and takes this replica's share of the
    /// bureau budget. Returns whether Redis answered.
    pub async fn heartbeat(&self) -> bool {
        self.beat(Beat::Renew).await.is_some()
    }

    pub(super) async fn beat(&self, mode: Beat) -> Option<Joined> {
        let mut inv = self.scripts.heartbeat.key(self.replicas_key());
        inv.key(self.deployment_key("replicas:born"))
            .key(self.deployment_key("epoch"))
            .key(self.deployment_key("owners"));
        inv.arg(&self.replica)
            .arg(self.settings.lease_ttl.as_millis() as u64)
            // A new epoch unique to this write: one this replica wrote before, written again
            // after Redis lost it, must not look like the one it saw.
            .arg(format!("{}-{:016x}", self.instance, fastrand::u64(..)))
            .arg(&self.instance)
            .arg(match mode {
                Beat::Join => "join",
                Beat::Renew => "beat",
            });
        let (count, rank, age_ms, epoch, taken) =
            self.call::<(usize, usize, u64, String, u8)>("heartbeat", inv).await?;
        self.check_epoch(epoch);
        let taken = taken == 1;
        if taken && matches!(mode, Beat::Join) {
            return Some(Joined::IdTaken);
        }
        if taken != self.id_conflict.swap(taken, Ordering::AcqRel) {
            if taken {
                self.metrics.id_conflicts.inc();
                tracing::error!(
                    replica = %self.replica,
                    "another live process heartbeats with this replica's state.redis.replica_id: both count as one replica and the bureau budget can be exceeded; /readyz answers 503 until it is gone"
                );
            } else {
                tracing::info!(replica = %self.replica, "this replica's id is its own again");
            }
        }
        // A set younger than a lease ttl may not list every live replica yet: Redis lost it (a
        // restart without persistence, a failover to a replica that lagged), or this is the
        // first replica of a deployment. Each replica that is missing from it would count
        // itself almost alone and take most of the budget; so until every live replica has had
        // a full lease ttl to heartbeat, none takes a larger share than the one it holds.
        let count = count.max(1);
        let before = self.replicas.load(Ordering::Relaxed);
        let settling = u128::from(age_ms) < self.settings.lease_ttl.as_millis();
        let (count, rank) = if settling && count < before { (before, before - 1) } else { (count, rank) };
        self.replicas.store(count, Ordering::Relaxed);
        self.metrics.replicas.set(count as i64);
        self.scheduler.set_share(rank, count);
        if before != count {
            tracing::info!(
                replicas = count,
                rank,
                limit = self.scheduler.limit(),
                "replica count changed; bureau budget re-split"
            );
        }
        Some(Joined::Yes)
    }

    /// Notices a Redis that lost its data: the epoch it holds is not the one seen before.
    pub(super) fn check_epoch(&self, epoch: String) {
        let mut seen = self.epoch.lock().expect("epoch lock not poisoned");
        if let Some(before) = seen.as_deref()
            && before != epoch
        {
            self.metrics.data_lost.inc();
            tracing::error!(
                "Redis lost its data (restarted without persistence, or a failover to a replica that lagged): the shared quota counts, rate state and replica set are gone; tenants may get more than their daily and monthly quota this window. Each replica keeps its share of the bureau budget until the replica set is rebuilt"
            );
        }
        *seen = Some(epoch);
    }

    /// One heartbeat tick: heartbeat, then (while Redis answers) for every contract (tenants',
    /// routes', groups'; `tenants` for short below): the units
    /// charged during an outage, in-flight lease renewal, the return of rate tokens that sat
    /// unused. `retired` are contracts a reload removed: what they hold goes back.
    pub async fn tick(
        &self,
        tenants: &[Arc<Contract>],
        retired: &[(String, Arc<TenantState>)],
        w: &Windows,
        now_unix_s: i64,
    ) {
        let started = Instant::now();
        let was_up = self.is_up();
        if !self.heartbeat().await {
            return;
        }
        if !was_up && !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.up.set(1);
            tracing::info!("Redis answers again: shared limits resume; units charged meanwhile are being added");
        }
        if !was_up {
            for t in tenants {
                t.state.leases().rate.clear_denial();
                t.state.leases().daily.clear_denial();
                t.state.leases().monthly.clear_denial();
            }
        }
        // Tenants overlap (their calls share the multiplexed connection, so they go out
        // pipelined): a tick costs a few round trips, not three per tenant. Tenants a reload
        // removed go first (few, and what they hold is of use to no one here); the others start
        // where the last tick stopped, so ticks cut short do not keep skipping the same ones.
        let start = self.tick_start.load(Ordering::Relaxed) % tenants.len().max(1);
        let done = AtomicUsize::new(0);
        let work = async {
            futures_util::stream::iter(retired)
                .for_each_concurrent(TICK_CONCURRENCY, |(id, state)| async move {
                    self.release_tenant(id, state, None, w, now_unix_s).await;
                })
                .await;
            futures_util::stream::iter(tenants[start..].iter().chain(&tenants[..start]))
                .for_each_concurrent(TICK_CONCURRENCY, |t| async {
                    // A Redis that stops answering mid-tick ends the tick: the next heartbeat
                    // must not wait behind a timeout per tenant.
                    if !self.is_up() {
                        return;
                    }
                    // Every tick, not only the first after an outage: a failed sync is retried.
                    self.sync_outage(&t.id, &t.state, w, now_unix_s).await;
                    if self.is_up() {
                        self.renew_in_flight(&t.id, &t.state, t.limits.max_in_flight).await;
                    }
                    if self.is_up() {
                        self.return_idle_rate(t).await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
        };
        // The next heartbeat must come within lease_ttl (or this replica is counted out and its
        // slots expire): half of it for the whole tick leaves at least one heartbeat interval
        // (validation: lease_ttl >= 2 x heartbeat_interval). What a cut tick did not reach
        // waits for the next one; a sync cut in flight is resent with its token.
        let bound = self.settings.lease_ttl / 2;
        let cut = tokio::time::timeout(bound.saturating_sub(started.elapsed()), work).await.is_err();
        let done = done.load(Ordering::Relaxed);
        if done < tenants.len() {
            // The next tick starts after the ones this one finished (in rough order: they ran
            // 16 at a time).
            self.tick_start.store(start + done, Ordering::Relaxed);
        }
        if cut {
            tracing::warn!(
                ?bound,
                tenants = tenants.len(),
                done,
                "a heartbeat tick was cut short; the rest waits for the next"
            );
        }
    }
}

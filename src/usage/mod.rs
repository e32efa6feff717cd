//! Usage statements: what each tenant was charged for, by route and local day, kept so that
//! they reconcile with the bureau's invoice.
//!
//! The bureau bills per look-up it served; bureau-guard is the one place that sees every
//! look-up and knows which were real bureau calls and which were answered from the cache,
//! merged into another tenant's identical call, served stale, or refused. So every answered
//! request adds one to a [`Column`] of its (day, tenant, route): `bureau_calls` when the bureau
//! took the call (where the quota is charged, `bureau/call.rs`), the others when the request
//! ends (`proxy.rs`). The day is the quota's local day (`quota.utc_offset`), taken when the
//! call is sent, so a statement's day is the bureau's day.
//!
//! The request path takes no global lock for it: counts go to one of [`SHARDS`] small maps,
//! chosen per thread (a tokio worker always uses the same one, so shards are uncontended), each
//! held for one hash-map update. A flusher (`app.rs`, every `usage.flush_interval`) drains the
//! shards and appends the deltas to the day's file (`store.rs`); a statement flushes first, so it
//! includes every request answered before it was asked for.
//!
//! - `counts.rs`: the columns and their stable names
//! - `store.rs`: one append-only file per day, compacted, retention
//! - `statement.rs`: the statement as JSON or CSV, savings stated
//! - `shared.rs`: with Redis, each replica's totals copied there at each flush, so that a
//!   statement from any replica covers all of them

pub mod counts;
pub mod journal;
pub mod query;
pub mod reconcile;
pub mod shared;
pub mod statement;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use counts::{Column, Counts};
use store::{Day, DayFiles, Store};

use crate::config::UsageConfig;
use crate::ops::metrics::UsageMetrics;

/// Number of pending-count shards: more than the worker threads of any machine this runs on is
/// pointless (one shard per thread is uncontended); a few spare for blocking threads.
pub const SHARDS: usize = 16;

type Pending = HashMap<(u32, Arc<str>, Arc<str>), Counts>;

/// One row of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub day: u32,
    pub tenant: Arc<str>,
    pub route: Arc<str>,
    pub counts: Counts,
}

/// The process's usage counts: pending ones in shards, kept ones in the [`Store`].
pub struct Usage {
    shards: Box<[Mutex<Pending>]>,
    /// Only the flusher, the charge committer and statements take it, never the request path.
    store: Arc<Mutex<Kept>>,
    /// One copy to Redis at a time (the periodic flush's, or a statement's).
    shipping: tokio::sync::Mutex<()>,
    retention_days: u32,
    /// With `usage.dir`: the charge committer's queue (`journal.rs`).
    charges: Option<journal::Committer>,
    metrics: UsageMetrics,
    /// One reconciliation scan at a time (`reconcile.rs`).
    scans: reconcile::ScanGate,
    /// `usage.dir`, where the Redis copy keeps its writer id and mark (`shared.rs`).
    dir: Option<std::path::PathBuf>,
}

/// The usage kept, and (with Redis) what of it is still to be copied there.
pub(crate) struct Kept {
    pub(crate) store: Store,
    pub(crate) outbox: Option<shared::Outbox>,
}

impl Kept {
    /// Adds `rows` to `day` in the store; with Redis, marks them to be copied there.
    pub fn append(&mut self, day: u32, rows: Day) -> std::io::Result<()> {
        let copy = self.outbox.is_some().then(|| rows.clone());
        self.store.append(day, rows)?;
        if let (Some(outbox), Some(rows)) = (&mut self.outbox, copy) {
            outbox.record(day, &rows, &self.store);
        }
        Ok(())
    }
}

/// A copy taken from the outbox and not yet answered: if its future is dropped (a statement
/// whose client left, a flush cut by shutdown), its pairs are marked to go again.
struct Unanswered {
    usage: Arc<Usage>,
    shipment: Option<shared::Shipment>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(shipment) = self.shipment.take() {
            self.usage.shipped(shipment, shared::Copied::No);
        }
    }
}

/// The local day number (since 1970-01-01) of `unix_ms` at `offset`: the quota's day.
pub fn day_at(unix_ms: i64, offset: chrono::FixedOffset) -> u32 {
    let local_s = unix_ms.div_euclid(1000) + i64::from(offset.local_minus_utc());
    local_s.div_euclid(86_400).max(0) as u32
}

thread_local! {
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl Usage {
    /// Usage as `config` keeps it: in `usage.dir` (created if missing), or in memory.
    pub fn open(config: &UsageConfig, metrics: UsageMetrics) -> std::io::Result<Usage> {
        let store = match &config.dir {
            Some(dir) => Store::Files(DayFiles::open(dir).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot open the usage directory {}: {e}", dir.display()))
            })?),
            None => Store::Memory(Default::default()),
        };
        let durable = matches!(store, Store::Files(_));
        let store = Arc::new(Mutex::new(Kept { store, outbox: None }));
        let charges =
            durable.then(|| journal::Committer::start(store.clone(), metrics.write_errors.clone())).transpose()?;
        Ok(Usage {
            shards: (0..SHARDS).map(|_| Mutex::new(Pending::new())).collect(),
            store,
            retention_days: config.retention_days(),
            charges,
            metrics,
            scans: reconcile::ScanGate::default(),
            shipping: tokio::sync::Mutex::new(()),
            dir: config.dir.clone(),
        })
    }

    /// From now on, what reaches the store is also copied to Redis by [`Usage::ship`] (see
    /// `shared.rs`); with `usage.dir`, the days written since the last copy are copied again.
    pub fn share(&self) -> std::io::Result<()> {
        let outbox = shared::Outbox::open(self.dir.as_deref())?;
        self.store.lock().unwrap_or_else(|p| p.into_inner()).outbox = Some(outbox);
        Ok(())
    }

    /// Flushes, then copies to Redis this replica's totals that changed since the last copy
    /// (one pipeline); what Redis does not take is copied with the next call. Returns whether
    /// Redis took it (`true` too when there was nothing to copy, or no sharing). Cancel-safe:
    /// a copy dropped before Redis answered is marked to go again.
    pub async fn ship(self: &Arc<Self>, redis: &crate::state::redis::RedisState) -> bool {
        let _one = self.shipping.lock().await;
        let usage = self.clone();
        // Flush and take under the store's lock: file appends, and whole days read at start.
        let taken = tokio::task::spawn_blocking(move || {
            let flushed = usage.flush();
            let mut kept = usage.store.lock().unwrap_or_else(|p| p.into_inner());
            let Kept { store, outbox } = &mut *kept;
            let shipment = outbox.as_mut().map(|o| o.take(store));
            drop(kept);
            (flushed, shipment.map(|s| Unanswered { usage: usage.clone(), shipment: Some(s) }))
        })
        .await;
        let Ok((flushed, shipment)) = taken else { return false };
        let Some(mut pending) = shipment else { return flushed.is_ok() };
        let shipment = pending.shipment.as_ref().expect("taken above");
        let copied = if shipment.rows.is_empty() {
            shared::Copied::Yes
        } else {
            redis.write_usage(shipment, self.retention_days).await
        };
        let shipment = pending.shipment.take().expect("taken above");
        let usage = self.clone();
        // `done` writes the copy's mark in `usage.dir`.
        let _ = tokio::task::spawn_blocking(move || usage.shipped(shipment, copied)).await;
        flushed.is_ok() && copied == shared::Copied::Yes
    }

    fn shipped(&self, shipment: shared::Shipment, copied: shared::Copied) {
        let mut kept = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outbox) = &mut kept.outbox {
            outbox.done(shipment, copied);
        }
    }

    /// Counts one `column` for (`day`, `tenant`, `route`). The request path: one uncontended
    /// shard lock for one hash-map update.
    pub fn record(&self, day: u32, tenant: &Arc<str>, route: &Arc<str>, column: Column) {
        self.add(day, tenant, route, column, 1);
    }

    /// Adds `n` (which may be negative) to one column.
    pub fn add(&self, day: u32, tenant: &Arc<str>, route: &Arc<str>, column: Column, n: i64) {
        let shard = SHARD.with(|s| *s);
        let mut pending = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        // The key is built only for a pair's first count of a flush interval.
        match pending.get_mut(&(day, tenant.clone(), route.clone())) {
            Some(c) => c.add(column, n),
            None => {
                let mut c = Counts::default();
                c.add(column, n);
                pending.insert((day, tenant.clone(), route.clone()), c);
            }
        }
    }

    /// Charges one bureau call to (`day`, `tenant`, `route`) before it is sent. With `usage.dir`
    /// the charge is on disk when this returns (group commit: the calls arriving together share
    /// one `fdatasync`, `journal.rs`); if it cannot be written it is counted in memory like the
    /// other columns (flushed later) and the call goes on: the bureau call matters more than
    /// the statement, and the error is logged.
    pub async fn charge(&self, day: u32, tenant: &Arc<str>, route: &Arc<str>) {
        let durable = match &self.charges {
            Some(c) => {
                let started = std::time::Instant::now();
                let durable = c.commit(day, tenant, route).await;
                self.metrics.charge_seconds.observe(started.elapsed().as_secs_f64());
                durable
            }
            None => false,
        };
        if !durable {
            self.record(day, tenant, route, Column::BureauCalls);
        }
    }

    /// Takes back a [`Usage::charge`] whose call the bureau did not take: refused by it
    /// (`reached`: counted in `bureau_refused`), or never delivered.
    pub fn refund(&self, day: u32, tenant: &Arc<str>, route: &Arc<str>, reached: bool) {
        self.add(day, tenant, route, Column::BureauCalls, -1);
        if reached {
            self.record(day, tenant, route, Column::BureauRefused);
        }
    }

    /// Moves the pending counts to the store (a file append and `fdatasync` per day touched).
    /// Blocking: call it off the async workers. On error the counts stay pending.
    pub fn flush(&self) -> std::io::Result<()> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(&mut store)
    }

    fn flush_locked(&self, store: &mut Kept) -> std::io::Result<()> {
        let mut by_day: HashMap<u32, Day> = HashMap::new();
        for shard in self.shards.iter() {
            let drained = std::mem::take(&mut *shard.lock().unwrap_or_else(|p| p.into_inner()));
            for ((day, tenant, route), c) in drained {
                by_day.entry(day).or_default().entry((tenant, route)).or_default().merge(&c);
            }
        }
        let mut days: Vec<_> = by_day.into_iter().collect();
        days.sort_by_key(|(d, _)| *d);
        let mut failed = None;
        let mut unsaved = Vec::new();
        for (day, rows) in days {
            if failed.is_some() {
                unsaved.push((day, rows));
                continue;
            }
            if let Err(e) = store.append(day, rows.clone()) {
                failed = Some(e);
                unsaved.push((day, rows));
            }
        }
        let Some(err) = failed else { return Ok(()) };
        self.metrics.write_errors.inc();
        // Not lost: back to a shard, for the next flush.
        let mut pending = self.shards[0].lock().unwrap_or_else(|p| p.into_inner());
        for (day, rows) in unsaved {
            for ((tenant, route), c) in rows {
                pending.entry((day, tenant, route)).or_default().merge(&c);
            }
        }
        Err(err)
    }

    /// Deletes the days that fall out of `usage.retention` as of `today`; returns how many.
    pub fn prune(&self, today: u32) -> usize {
        let first_kept = today.saturating_sub(self.retention_days - 1);
        self.store.lock().unwrap_or_else(|p| p.into_inner()).store.prune(first_kept)
    }

    /// Every row from day `from` to day `to` (inclusive), of `tenant` if given, sorted by
    /// tenant, day and route. Flushes first: a statement includes every request answered before
    /// it. Blocking (file reads).
    pub fn rows(&self, from: u32, to: u32, tenant: Option<&str>) -> std::io::Result<Vec<Row>> {
        let reader = {
            let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            self.flush_locked(&mut store)?;
            store.store.reader(from, to)
        };
        // The files are read without the store's lock: charges go on meanwhile.
        let mut out = Vec::new();
        for day in from..=to {
            for ((t, route), counts) in reader.read(day, tenant)? {
                if tenant.is_none_or(|want| *t == *want) && !counts.is_zero() {
                    out.push(Row { day, tenant: t, route, counts });
                }
            }
        }
        out.sort_by(|a, b| (&a.tenant, a.day, &a.route).cmp(&(&b.tenant, b.day, &b.route)));
        Ok(out)
    }

    /// Charge batches written (group commits) so far; 0 without `usage.dir`.
    pub fn charge_batches(&self) -> u64 {
        self.charges.as_ref().map_or(0, journal::Committer::batches)
    }

    /// Days kept, counting today.
    pub fn retention_days(&self) -> u32 {
        self.retention_days
    }

    /// The process's one reconciliation scan at a time.
    pub fn scans(&self) -> &reconcile::ScanGate {
        &self.scans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_turns_at_local_midnight() {
        let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
        // 2026-12-04T14:59:59Z is 23:59:59 in Seoul; a second later it is the 5th there.
        let before = 1_796_396_399_000;
        assert_eq!(store::date_of(day_at(before, kst)).to_string(), "2026-12-04");
        assert_eq!(store::date_of(day_at(before + 1000, kst)).to_string(), "2026-12-05");
        let w = crate::admission::quota::Windows::at(before, kst);
        assert_eq!(day_at(before, kst), w.day, "the quota's day");
    }

    #[test]
    fn counts_from_many_threads_all_reach_the_statement() {
        let usage = Arc::new(Usage::open(&UsageConfig::default(), UsageMetrics::unregistered()).unwrap());
        let (a, r): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("score"));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (usage, a, r) = (usage.clone(), a.clone(), r.clone());
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        usage.record(10 + i % 2, &a, &r, Column::BureauCalls);
                        if i % 100 == 0 {
                            usage.flush().unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let rows = usage.rows(10, 11, None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.iter().map(|r| r.counts.get(Column::BureauCalls)).sum::<i64>(), 8000);
        assert!(usage.rows(10, 11, Some("b")).unwrap().is_empty());
    }

    #[test]
    fn retention_keeps_today_and_the_days_before_it() {
        let cfg = UsageConfig { retention: std::time::Duration::from_secs(2 * 86_400), ..Default::default() };
        let usage = Usage::open(&cfg, UsageMetrics::unregistered()).unwrap();
        let (a, r): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("score"));
        for day in 100..=103 {
            usage.record(day, &a, &r, Column::CacheHits);
        }
        usage.flush().unwrap();
        assert_eq!(usage.prune(103), 2);
        let days: Vec<u32> = usage.rows(0, 200, None).unwrap().iter().map(|r| r.day).collect();
        assert_eq!(days, [102, 103]);
    }
}

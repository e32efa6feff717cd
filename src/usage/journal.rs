//! Charges made durable before their bureau call is sent, with group commit.
//!
//! A statement must match the bureau's invoice after a `kill -9` too, so a call's charge is on
//! disk before the call leaves: [`Committer::commit`] queues it for one writer thread, which
//! takes every charge queued meanwhile as one batch, appends the batch to the day files (one
//! `write` and one `fdatasync` per day touched, nearly always one) and then answers every call
//! of the batch. Calls arriving while an `fdatasync` runs share the next one, so the disk sees
//! one sync per batch however many calls there are, and a call waits at most about two syncs.
//! The day files are the journal: there is nothing to replay at start beyond reading them.
//!
//! What a crash can still put between the statement and the invoice, always on the side of
//! the statement (no call the bureau billed is ever missing from it): a call whose charge was
//! written but that the crash stopped before it left. After `kill -9` the written bytes survive
//! in the page cache even when their sync had not finished, so these are the calls between
//! their `write` and their send, at most the calls in flight at the crash
//! (`tests/crash.rs` sees 0 to 4 with 4 clients per tenant). After a power loss only synced
//! charges survive, and every call that left had its charge synced first: the same bound.
//! And a charge the bureau refused (429/503) whose refund (`Usage::refund`, in the periodic
//! flush) had not reached the disk: at most one `usage.flush_interval` of refusals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::Kept;
use super::counts::{Column, Counts};
use super::store::Day;

/// The most charges written as one batch (bounds the writer's memory under a flood).
const MAX_BATCH: usize = 8192;

struct Charge {
    day: u32,
    tenant: Arc<str>,
    route: Arc<str>,
    /// Whether the charge is on disk.
    done: tokio::sync::oneshot::Sender<bool>,
}

/// The queue of the charge writer thread; the thread ends when this is dropped.
pub struct Committer {
    queue: mpsc::Sender<Charge>,
    /// Batches written (each one `fdatasync` per day touched): charges / batches is the group
    /// commit's sharing.
    batches: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the writer thread over `store`.
    pub(crate) fn start(store: Arc<Mutex<Kept>>, write_errors: prometheus::IntCounter) -> std::io::Result<Committer> {
        let (queue, rx) = mpsc::channel();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        std::thread::Builder::new()
            .name("usage-charges".into())
            .spawn(move || run(&store, &rx, &counted, &write_errors))?;
        Ok(Committer { queue, batches })
    }

    /// Batches written so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Resolves once the charge is on disk (`true`), or could not be written (`false`).
    pub async fn commit(&self, day: u32, tenant: &Arc<str>, route: &Arc<str>) -> bool {
        let (done, written) = tokio::sync::oneshot::channel();
        let charge = Charge { day, tenant: tenant.clone(), route: route.clone(), done };
        if self.queue.send(charge).is_err() {
            return false;
        }
        written.await.unwrap_or(false)
    }
}

fn run(store: &Mutex<Kept>, rx: &mpsc::Receiver<Charge>, batches: &AtomicU64, write_errors: &prometheus::IntCounter) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut by_day: HashMap<u32, Day> = HashMap::new();
        for c in &batch {
            let counts: &mut Counts =
                by_day.entry(c.day).or_default().entry((c.tenant.clone(), c.route.clone())).or_default();
            counts.add(Column::BureauCalls, 1);
        }
        let mut written: HashMap<u32, bool> = HashMap::new();
        {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            for (day, rows) in by_day {
                let ok = match store.append(day, rows) {
                    Ok(()) => true,
                    Err(e) => {
                        write_errors.inc();
                        tracing::error!(error = %e, "cannot write usage charges; counted in memory until the next flush");
                        false
                    }
                };
                written.insert(day, ok);
            }
        }
        batches.fetch_add(1, Ordering::Relaxed);
        for c in batch {
            let _ = c.done.send(written.get(&c.day).copied().unwrap_or(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UsageConfig;
    use crate::usage::Usage;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_charge_is_on_disk_when_it_returns() {
        let dir = std::env::temp_dir().join(format!("bg-journal-{}-{}", std::process::id(), fastrand::u64(..)));
        let usage = Arc::new(
            Usage::open(
                &UsageConfig { dir: Some(dir.clone()), ..Default::default() },
                crate::ops::metrics::UsageMetrics::unregistered(),
            )
            .unwrap(),
        );
        let (a, r): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("score"));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (usage, a, r) = (usage.clone(), a.clone(), r.clone());
                tokio::spawn(async move { usage.charge(9, &a, &r).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // Read straight from the file, no flush: every charge is there.
        let day = crate::usage::store::DayFiles::open(&dir).unwrap().read(9).unwrap();
        assert_eq!(day[&(a.clone(), r.clone())].get(Column::BureauCalls), 200);
        let lines = std::fs::read_to_string(dir.join("1970-01-10.jsonl")).unwrap().lines().count();
        assert!(lines < 200, "charges arriving together shared a write: {lines} writes for 200");
        // A refund (the bureau refused) reaches the file with the next flush.
        usage.refund(9, &a, &r, true);
        let rows = usage.rows(9, 9, None).unwrap();
        assert_eq!(rows[0].counts.get(Column::BureauCalls), 199);
        assert_eq!(rows[0].counts.get(Column::BureauRefused), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

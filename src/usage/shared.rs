//! Usage shared through Redis (`state.backend = "redis"`): a statement from any replica covers
//! the calls of every replica.
//!
//! Each replica keeps its own durable usage (the day files and the charge journal: the crash
//! guarantee is local and unchanged) and, at each periodic flush, copies to Redis its *totals*
//! of the (day, tenant, route) that changed since the last copy: one pipeline per flush (HSET),
//! however many requests, never a round trip per request. In Redis each replica's totals sit
//! under a writer id of its own (`{prefix:TENANT}:usage:YYYY-MM-DD`, a hash of
//! `ROUTE|WRITER` → counts; `{prefix}:usage:YYYY-MM-DD:tenants` lists the day's tenants; both
//! expire with `usage.retention`), and a statement sums the writers.
//!
//! Why totals and not increments (HINCRBY): writing a total twice is writing it once, so a
//! flush that Redis did not answer — or answered after the timeout — is simply sent again with
//! the newer totals, and nothing is ever counted twice or lost:
//!
//! - **Redis down at flush time**: the changed (day, tenant, route) stay marked, the totals keep
//!   growing in memory (one entry per pair, not per request), and the next flush that Redis
//!   answers writes them. Meanwhile statements answer 503 (the shared total cannot be read);
//!   the replica's own files are complete.
//! - **A crash** (`kill -9`): the totals are the day files' sums, so nothing is owed in memory.
//!   After each copy Redis answered, `redis-shipped` in `usage.dir` records when it was taken;
//!   at start the days whose file was written since then are copied again whole. Without
//!   `usage.dir` the counts were in memory only, so a crash loses at most what was not yet
//!   copied: one `usage.flush_interval`, plus the length of a Redis outage running at the time.
//!   The first start on a `usage.dir` that has never been copied copies every kept day, two
//!   per flush: a statement right after it may not have the oldest days yet.
//! - **Writer ids**: with `usage.dir`, the id is kept in `usage.dir/usage-writer` (one id per
//!   directory: a restart continues its own totals); without it, a new id per process (its
//!   totals start at zero, and the previous process's stay in Redis beside them).
//! - **Redis losing its data** (no persistence, a failover that lagged): each replica writes
//!   again only what changes after, so the days before are short in Redis; delete
//!   `redis-shipped` in each replica's `usage.dir` and restart it to copy every kept day again.
//!
//! Cost: the first change to a day after start reads that day's file under the store's lock
//! (once; today and yesterday stay in memory, about 17 MB a day at 10k tenants × 5 routes, a 280-byte row per pair),
//! which holds the charges of that moment for as long.
//!
//! Freshness: a statement flushes and copies this replica's counts first, so it includes every
//! look-up this replica answered before it; other replicas' are as of their last flush (one
//! `usage.flush_interval`, 1 s by default).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::counts::Counts;
use super::store::{Day, Pair, Store, day_of_date};

/// The file in `usage.dir` holding this directory's writer id.
const WRITER_FILE: &str = "usage-writer";
/// The file in `usage.dir` holding when the last copy Redis answered was taken (Unix ms).
const SHIPPED_FILE: &str = "redis-shipped";
/// A file's modification time is the kernel's coarse clock: days written this close before the
/// last copy was taken are copied again at start.
const MTIME_SLACK: Duration = Duration::from_secs(2);
/// Whole days (copied again at start) loaded per flush: each is a day file read into memory.
const WHOLE_DAYS_PER_FLUSH: usize = 2;

/// One replica's totals to write to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shipment {
    /// The writer the totals are of.
    pub writer: String,
    /// (day, tenant, route) → this writer's totals for it.
    pub rows: Vec<(u32, Pair, Counts)>,
    /// When it was taken: every count that reached the store before is in it or was copied...
    taken_at: SystemTime,
    /// ...unless another copy was still unanswered then (one cut by a stop, whose pairs are
    /// marked again only when it is dropped): then this one's mark is not written.
    alone: bool,
}

/// What changed since it was last copied to Redis, and this writer's totals for it. Lives
/// beside the store, under its lock: everything the store takes is recorded here too.
pub struct Outbox {
    writer: String,
    /// Where `redis-shipped` is kept (with `usage.dir`).
    dir: Option<PathBuf>,
    /// (day, pair) whose total changed since it was last copied.
    dirty: HashSet<(u32, Pair)>,
    /// This writer's totals of the days changed lately (loaded from the store on first change).
    totals: BTreeMap<u32, Day>,
    /// Days to copy whole: written since the last copy Redis answered before a restart, or
    /// whose totals could not be read.
    whole: BTreeSet<u32>,
    /// Redis did not take the last copy: no whole day is loaded until it does (an outage at
    /// start must not load every kept day into memory).
    failing: bool,
    /// Copies taken and not yet given back to [`Outbox::done`].
    outstanding: usize,
}

impl Outbox {
    /// The outbox of the usage kept in `dir` (its writer id read or made; the days written
    /// since the last copy marked for copying again), or in memory (a new writer id).
    pub fn open(dir: Option<&Path>) -> std::io::Result<Outbox> {
        let random = || getrandom::u64().map(|n| format!("{n:016x}")).map_err(std::io::Error::other);
        let Some(dir) = dir else {
            return Ok(Outbox {
                writer: random()?,
                dir: None,
                dirty: HashSet::new(),
                totals: BTreeMap::new(),
                whole: BTreeSet::new(),
                failing: false,
                outstanding: 0,
            });
        };
        let id_file = dir.join(WRITER_FILE);
        let writer = match std::fs::read_to_string(&id_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            Ok(_) => random()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = random()?;
                write_synced(&id_file, id.as_bytes())?;
                id
            }
            Err(e) => return Err(e),
        };
        Ok(Outbox {
            writer,
            dir: Some(dir.to_path_buf()),
            dirty: HashSet::new(),
            totals: BTreeMap::new(),
            whole: written_since_last_copy(dir)?,
            failing: false,
            outstanding: 0,
        })
    }

    /// This replica's writer id in Redis.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// `rows` were added to `day` in `store`: their totals changed.
    pub fn record(&mut self, day: u32, rows: &Day, store: &Store) {
        match self.totals.entry(day) {
            std::collections::btree_map::Entry::Occupied(mut totals) => {
                for (pair, c) in rows {
                    totals.get_mut().entry(pair.clone()).or_default().merge(c);
                }
            }
            // The store's sum already has `rows`: it is the total.
            std::collections::btree_map::Entry::Vacant(slot) => match store.read_all(day) {
                Ok(sum) => {
                    slot.insert(sum);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a usage day to share it; copied whole at the next flush");
                    self.whole.insert(day);
                    return;
                }
            },
        }
        self.dirty.extend(rows.keys().map(|pair| (day, pair.clone())));
    }

    /// The totals to copy now (the marks are cleared: give the shipment back to
    /// [`Outbox::done`]). Whole days are read from `store` here, a few per call.
    pub fn take(&mut self, store: &Store) -> Shipment {
        let loading = if self.failing { 0 } else { WHOLE_DAYS_PER_FLUSH };
        let whole: Vec<u32> = self.whole.iter().take(loading).copied().collect();
        for day in whole {
            self.whole.remove(&day);
            match store.read_all(day) {
                Ok(sum) => {
                    self.dirty.extend(sum.keys().map(|pair| (day, pair.clone())));
                    self.totals.insert(day, sum);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a usage day to share it; retried at the next flush");
                    self.whole.insert(day);
                }
            }
        }
        let rows = self
            .dirty
            .drain()
            .filter_map(|(day, pair)| {
                let c = *self.totals.get(&day)?.get(&pair)?;
                Some((day, pair, c))
            })
            .collect();
        let alone = self.outstanding == 0;
        self.outstanding += 1;
        Shipment { writer: self.writer.clone(), rows, taken_at: SystemTime::now(), alone }
    }

    /// Whether anything waits to be copied.
    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty() && self.whole.is_empty()
    }

    /// After Redis answered `shipment` (`copied`) or did not: on failure its pairs are marked
    /// again (their totals, by then maybe higher, go with the next copy); on success the mark
    /// of the copy is written, and days no longer changing are dropped from memory.
    pub fn done(&mut self, shipment: Shipment, copied: Copied) {
        self.outstanding = self.outstanding.saturating_sub(1);
        match copied {
            Copied::No => {
                self.failing = true;
                self.dirty.extend(shipment.rows.into_iter().map(|(day, pair, _)| (day, pair)));
            }
            Copied::Yes => {
                self.failing = false;
                if let Some(dir) = &self.dir
                    && self.whole.is_empty()
                    && shipment.alone
                {
                    let ms = shipment.taken_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
                    // Without the mark a restart copies more days again, never fewer: no sync.
                    if let Err(e) = std::fs::write(dir.join(SHIPPED_FILE), ms.to_string()) {
                        tracing::warn!(error = %e, "cannot write usage.dir/redis-shipped; a restart copies more days again");
                    }
                }
                // Today and yesterday stay (late refunds); older days without marks leave.
                let latest = self.totals.keys().next_back().copied().unwrap_or(0);
                let dirty_days: HashSet<u32> = self.dirty.iter().map(|(d, _)| *d).collect();
                self.totals.retain(|day, _| *day + 1 >= latest || dirty_days.contains(day));
            }
        }
    }
}

/// Whether Redis took a [`Shipment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    Yes,
    No,
}

/// The days in `dir` whose file was written since the last copy Redis answered (all of them if
/// none is recorded).
fn written_since_last_copy(dir: &Path) -> std::io::Result<BTreeSet<u32>> {
    let since = std::fs::read_to_string(dir.join(SHIPPED_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms).saturating_sub(MTIME_SLACK));
    let mut days = BTreeSet::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else { continue };
        let Ok(date) = chrono::NaiveDate::parse_from_str(stem, "%Y-%m-%d") else { continue };
        let modified = e.metadata().and_then(|m| m.modified()).ok();
        if since.is_none_or(|since| modified.is_none_or(|m| m >= since)) {
            days.insert(day_of_date(date));
        }
    }
    Ok(days)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::usage::Column;
    use crate::usage::store::DayFiles;

    fn calls(tenant: &str, n: i64) -> Day {
        let mut c = Counts::default();
        c.add(Column::BureauCalls, n);
        Day::from([((Arc::from(tenant), Arc::from("score")), c)])
    }

    fn totals(s: &Shipment) -> Vec<(u32, String, i64)> {
        let mut v: Vec<_> =
            s.rows.iter().map(|(d, (t, _), c)| (*d, t.to_string(), c.get(Column::BureauCalls))).collect();
        v.sort();
        v
    }

    #[test]
    fn a_copy_redis_did_not_take_goes_again_with_the_newer_totals() {
        let mut store = Store::Memory(Default::default());
        let mut out = Outbox::open(None).unwrap();
        let mut add = |out: &mut Outbox, day: u32, rows: Day| {
            store.append(day, rows.clone()).unwrap();
            out.record(day, &rows, &store);
        };
        add(&mut out, 10, calls("a", 2));
        add(&mut out, 10, calls("b", 1));
        let first = out.take(&Store::Memory(Default::default()));
        assert_eq!(totals(&first), [(10, "a".into(), 2), (10, "b".into(), 1)]);
        assert!(out.is_empty());
        // Redis is down: a's count grows meanwhile; the next copy has a's total, once.
        add(&mut out, 10, calls("a", 3));
        out.done(first, Copied::No);
        let second = out.take(&Store::Memory(Default::default()));
        assert_eq!(totals(&second), [(10, "a".into(), 5), (10, "b".into(), 1)], "totals, not increments");
        out.done(second, Copied::Yes);
        assert!(out.take(&Store::Memory(Default::default())).rows.is_empty(), "nothing changed since");
    }

    #[test]
    fn a_restart_copies_again_the_days_written_since_the_last_copy() {
        let dir = std::env::temp_dir().join(format!("bg-shared-{}-{}", std::process::id(), fastrand::u64(..)));
        let mut files = DayFiles::open(&dir).unwrap();
        files.append(10, &calls("a", 4)).unwrap();
        let mut out = Outbox::open(Some(&dir)).unwrap();
        let writer = out.writer().to_string();
        let store = Store::Files(DayFiles::open(&dir).unwrap());
        let first = out.take(&store);
        assert_eq!(totals(&first), [(10, "a".into(), 4)], "no copy recorded yet: every day");
        out.done(first, Copied::Yes);
        // Day 11 written after the copy, and the process killed before the next one.
        files.append(11, &calls("b", 1)).unwrap();
        let mut again = Outbox::open(Some(&dir)).unwrap();
        assert_eq!(again.writer(), writer, "one writer per directory");
        let store = Store::Files(DayFiles::open(&dir).unwrap());
        let shipment = again.take(&store);
        // Day 10 may come again (its file is within the mtime slack): harmless, a total.
        assert!(totals(&shipment).contains(&(11, "b".into(), 1)), "{:?}", totals(&shipment));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_mark_is_written_while_a_cut_copy_is_unanswered() {
        let dir = std::env::temp_dir().join(format!("bg-shared-cut-{}-{}", std::process::id(), fastrand::u64(..)));
        let mut files = DayFiles::open(&dir).unwrap();
        files.append(10, &calls("a", 1)).unwrap();
        let store = Store::Files(DayFiles::open(&dir).unwrap());
        let mut out = Outbox::open(Some(&dir)).unwrap();
        // A copy cut by a stop is still held (its pairs not yet marked again) when the last
        // copy is taken: that one's mark would claim a's count is in Redis.
        let cut = out.take(&store);
        let last = out.take(&store);
        assert!(last.rows.is_empty());
        out.done(last, Copied::Yes);
        assert!(!dir.join(SHIPPED_FILE).exists(), "no mark while another copy is unanswered");
        out.done(cut, Copied::No);
        let again = out.take(&store);
        assert_eq!(totals(&again), [(10, "a".into(), 1)]);
        out.done(again, Copied::Yes);
        assert!(dir.join(SHIPPED_FILE).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

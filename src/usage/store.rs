//! Where usage is kept: one append-only file per local day, `YYYY-MM-DD.jsonl` in `usage.dir`.
//!
//! Why files and not the quota state file or a database: the state file is rewritten whole at
//! every flush (fine for one counter per tenant, not for 10k tenants × routes × 400 days); an
//! embedded database (redb, SQLite) is a new dependency for what is, per day, a small table
//! written by one thread and read by an operator. A day's file is a list of deltas, one JSON
//! line per (tenant, route) that changed in a flush; the day's counts are their sum. Appending
//! then `fdatasync` makes a flush durable; a line torn by a crash is the last one, and is
//! skipped (its flush had not returned). So the file does not grow without bound, a day whose
//! file has grown past four times its compact size (plus 1 MiB) is rewritten with one line per
//! (tenant, route), to a temporary file renamed over it: the sum is the same at every instant.
//! Retention deletes whole days.
//!
//! Sizes: a line is about 60 bytes plus 20 per non-zero column; 10k tenants × 5 routes is
//! 50k lines, about 5 MB a day compacted, 2 GB for 400 days.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;

use super::counts::{Column, Counts};

/// A (tenant, route) pair.
pub type Pair = (Arc<str>, Arc<str>);

/// One day's counts by (tenant, route).
pub type Day = HashMap<Pair, Counts>;

/// The files of one `usage.dir`.
pub struct DayFiles {
    dir: PathBuf,
    /// Size of each day's file after its last compaction (or when first seen).
    compact_len: HashMap<u32, u64>,
    /// How much a file may grow past four times its compact size before it is rewritten.
    slack: u64,
    /// Open files of the days being appended to, and their lengths (today and yesterday,
    /// nearly always): an append is one `write` and one `fdatasync`, no `open`.
    open: HashMap<u32, Appending>,
}

/// A day file open for appends.
struct Appending {
    file: std::fs::File,
    len: u64,
    /// It did not end with a newline when opened: the torn end of a crashed process's write.
    torn: bool,
}

/// Local day number since 1970-01-01 → its date.
pub fn date_of(day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date") + chrono::Days::new(u64::from(day))
}

/// A date → its local day number (dates before 1970 are day 0).
pub fn day_of_date(date: NaiveDate) -> u32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
    (date - epoch).num_days().max(0) as u32
}

/// How much a file may grow past its compact size before it is rewritten.
const SLACK: u64 = 1 << 20;

impl DayFiles {
    /// The usage files in `dir`, created if missing.
    pub fn open(dir: &Path) -> std::io::Result<DayFiles> {
        std::fs::create_dir_all(dir)?;
        Ok(DayFiles { dir: dir.to_path_buf(), compact_len: HashMap::new(), slack: SLACK, open: HashMap::new() })
    }

    fn path(&self, day: u32) -> PathBuf {
        self.dir.join(format!("{}.jsonl", date_of(day).format("%Y-%m-%d")))
    }

    /// The directory, for reads that take no lock ([`read_day`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `rows` to `day`'s file and makes them durable; compacts the file if it has grown
    /// past four times its compact size.
    pub fn append(&mut self, day: u32, rows: &Day) -> std::io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if !self.open.contains_key(&day) {
            // Days stop being appended to: keep the two latest open.
            if self.open.len() >= 2
                && let Some(oldest) = self.open.keys().min().copied()
            {
                self.open.remove(&oldest);
            }
            let opened = self.open_for_append(day)?;
            self.open.insert(day, opened);
        }
        let Appending { file, len, torn } = self.open.get_mut(&day).expect("opened above");
        let mut buf = Vec::with_capacity(rows.len() * 96);
        // A crash may have torn the last line: start on a line of our own.
        if *torn {
            buf.push(b'\n');
        }
        for ((tenant, route), counts) in rows {
            line(&mut buf, tenant, route, counts);
        }
        let result = file.write_all(&buf).and_then(|()| file.sync_data());
        if let Err(e) = result {
            // Reopened (and its end checked) at the next append.
            self.open.remove(&day);
            return Err(e);
        }
        *torn = false;
        let was = *len;
        *len += buf.len() as u64;
        let now = *len;
        if was == 0 {
            sync_dir(&self.dir);
        }
        let compact = *self.compact_len.entry(day).or_insert(was);
        if now > compact * 4 + self.slack {
            self.compact(day)?;
        }
        Ok(())
    }

    fn open_for_append(&self, day: u32) -> std::io::Result<Appending> {
        let mut file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(self.path(day))?;
        let len = file.metadata()?.len();
        let torn = len > 0 && !ends_line(&mut file, len)?;
        Ok(Appending { file, len, torn })
    }

    /// Rewrites `day`'s file with one line per (tenant, route), atomically.
    pub fn compact(&mut self, day: u32) -> std::io::Result<()> {
        let counts = self.read(day)?;
        let path = self.path(day);
        let tmp = path.with_extension("jsonl.tmp");
        let mut buf = Vec::with_capacity(counts.len() * 96);
        let mut sorted: Vec<_> = counts.iter().filter(|(_, c)| !c.is_zero()).collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        for ((tenant, route), c) in sorted {
            line(&mut buf, tenant, route, c);
        }
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&buf)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir);
        // The open handle is the old file's: appends go to the new one.
        self.open.remove(&day);
        self.compact_len.insert(day, buf.len() as u64);
        Ok(())
    }

    /// `day`'s counts (see [`read_day`]).
    pub fn read(&self, day: u32) -> std::io::Result<Day> {
        read_day(&self.dir, day, None)
    }

    /// Deletes the files of days before `first_kept`; returns how many.
    pub fn prune(&mut self, first_kept: u32) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else { continue };
            let Ok(date) = NaiveDate::parse_from_str(stem, "%Y-%m-%d") else { continue };
            let day = day_of_date(date);
            if day < first_kept && std::fs::remove_file(e.path()).is_ok() {
                self.compact_len.remove(&day);
                self.open.remove(&day);
                removed += 1;
            }
        }
        removed
    }
}

/// Whether the file of length `len` ends with a newline (asked when it is opened).
fn ends_line(file: &mut std::fs::File, len: u64) -> std::io::Result<bool> {
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// `day`'s counts in the usage directory `dir`: the sum of its file's lines (nothing if it has
/// no file). A line that does not parse (the torn end of a flush a crash cut, or one being
/// appended as this reads) is skipped. Reads take no lock: appends and the rename of a
/// compaction leave every complete line's sum as it was.
pub fn read_day(dir: &Path, day: u32, tenant: Option<&str>) -> std::io::Result<Day> {
    let text = match std::fs::read(dir.join(format!("{}.jsonl", date_of(day).format("%Y-%m-%d")))) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Day::new()),
        Err(e) => return Err(e),
    };
    // One tenant's statement: only its lines are parsed (a line names it as `"t":"ID"`, the
    // way `line` writes it; the parsed id is still compared below).
    let needle = tenant.map(|t| serde_json::json!({ "t": t }).to_string());
    let finder = needle.as_deref().map(|n| memchr::memmem::Finder::new(&n.as_bytes()[1..n.len() - 1]));
    let mut out = Day::new();
    for raw in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        if finder.as_ref().is_some_and(|f| f.find(raw).is_none()) {
            continue;
        }
        let Ok(parsed) = serde_json::from_slice::<Line>(raw) else { continue };
        if tenant.is_some_and(|t| t != parsed.t) {
            continue;
        }
        let entry = out.entry((Arc::from(parsed.t.as_str()), Arc::from(parsed.r.as_str()))).or_default();
        for (name, n) in parsed.n {
            if let Some(c) = Column::named(&name) {
                entry.add(c, n);
            }
        }
    }
    Ok(out)
}

/// Makes a file's creation or rename in `dir` durable (best effort: not every filesystem can).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[derive(serde::Deserialize)]
struct Line {
    t: String,
    r: String,
    n: BTreeMap<String, i64>,
}

fn line(buf: &mut Vec<u8>, tenant: &str, route: &str, counts: &Counts) {
    let n: BTreeMap<String, i64> = counts.named().collect();
    let v = serde_json::json!({"t": tenant, "r": route, "n": n});
    serde_json::to_writer(&mut *buf, &v).expect("writing JSON to a Vec cannot fail");
    buf.push(b'\n');
}

/// Reads days without holding the store (a statement over 400 days must not stall charges).
pub enum Reader {
    Files(PathBuf),
    Memory(BTreeMap<u32, Day>),
}

impl Reader {
    /// `day`'s counts, of `tenant` only if given.
    pub fn read(&self, day: u32, tenant: Option<&str>) -> std::io::Result<Day> {
        match self {
            Reader::Files(dir) => read_day(dir, day, tenant),
            Reader::Memory(m) => Ok(m
                .get(&day)
                .map(|d| d.iter().filter(|((t, _), _)| tenant.is_none_or(|want| **t == *want)))
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), *v))
                .collect()),
        }
    }
}

/// The kept usage: the day files, or (without `usage.dir`) memory.
pub enum Store {
    Files(DayFiles),
    Memory(BTreeMap<u32, Day>),
}

impl Store {
    pub fn append(&mut self, day: u32, rows: Day) -> std::io::Result<()> {
        match self {
            Store::Files(f) => f.append(day, &rows),
            Store::Memory(m) => {
                let d = m.entry(day).or_default();
                for (k, c) in rows {
                    d.entry(k).or_default().merge(&c);
                }
                Ok(())
            }
        }
    }

    /// All of `day`'s counts.
    pub fn read_all(&self, day: u32) -> std::io::Result<Day> {
        match self {
            Store::Files(f) => f.read(day),
            Store::Memory(m) => Ok(m.get(&day).cloned().unwrap_or_default()),
        }
    }

    /// What reads days `from..=to` once the store's lock is released: the directory, or a copy
    /// of those days in memory.
    pub fn reader(&self, from: u32, to: u32) -> Reader {
        match self {
            Store::Files(f) => Reader::Files(f.dir().to_path_buf()),
            Store::Memory(m) => Reader::Memory(m.range(from..=to).map(|(d, v)| (*d, v.clone())).collect()),
        }
    }

    pub fn prune(&mut self, first_kept: u32) -> usize {
        match self {
            Store::Files(f) => f.prune(first_kept),
            Store::Memory(m) => {
                let before = m.len();
                m.retain(|d, _| *d >= first_kept);
                before - m.len()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::ErrorKind;

    fn row(tenant: &str, route: &str, c: Column, n: i64) -> Day {
        let mut counts = Counts::default();
        counts.add(c, n);
        Day::from([((Arc::from(tenant), Arc::from(route)), counts)])
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bg-usage-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn appended_deltas_sum_and_survive_a_torn_line_and_compaction() {
        let dir = tmpdir("sum");
        let mut f = DayFiles::open(&dir).unwrap();
        f.append(20_000, &row("a", "score", Column::BureauCalls, 3)).unwrap();
        f.append(20_000, &row("a", "score", Column::BureauCalls, 2)).unwrap();
        f.append(20_000, &row("a", "score", Column::Refused(ErrorKind::RateLimited), 1)).unwrap();
        // A crash mid-write leaves half a line; the next flush starts on a line of its own.
        let path = f.path(20_000);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"t\":\"a\",\"r\":\"sc").unwrap();
        let mut f = DayFiles::open(&dir).unwrap(); // the restart after the crash
        f.append(20_000, &row("b", "score", Column::CacheHits, 7)).unwrap();
        let day = f.read(20_000).unwrap();
        let a = day[&(Arc::from("a"), Arc::from("score"))];
        assert_eq!(a.get(Column::BureauCalls), 5);
        assert_eq!(a.get(Column::Refused(ErrorKind::RateLimited)), 1);
        assert_eq!(day[&(Arc::from("b"), Arc::from("score"))].get(Column::CacheHits), 7);

        f.compact(20_000).unwrap();
        assert_eq!(f.read(20_000).unwrap(), day, "compaction keeps the sums");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "one line per pair: {text}");
        assert_eq!(date_of(20_000).to_string(), "2024-10-04");
        assert!(path.ends_with("2024-10-04.jsonl"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retention_deletes_whole_days_before_the_first_kept() {
        let dir = tmpdir("prune");
        let mut f = DayFiles::open(&dir).unwrap();
        for day in [100, 101, 102] {
            f.append(day, &row("a", "r", Column::BureauCalls, 1)).unwrap();
        }
        std::fs::write(dir.join("notes.txt"), "kept").unwrap();
        assert_eq!(f.prune(102), 2);
        assert!(f.read(101).unwrap().is_empty());
        assert_eq!(f.read(102).unwrap().len(), 1);
        assert!(dir.join("notes.txt").exists(), "only usage files are deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_growing_day_is_compacted_by_itself() {
        let dir = tmpdir("grow");
        let mut f = DayFiles::open(&dir).unwrap();
        f.slack = 4096;
        // ~70 bytes a line: 200 appends pass 4 KiB of slack.
        for _ in 0..200 {
            f.append(7, &row("tenant-with-a-long-id", "score", Column::BureauCalls, 1))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let len = std::fs::metadata(f.path(7)).unwrap().len();
        assert!(len < 4096 + 200, "compacted along the way: {len} bytes");
        assert_eq!(
            f.read(7).unwrap()[&(Arc::from("tenant-with-a-long-id"), Arc::from("score"))].get(Column::BureauCalls),
            200
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

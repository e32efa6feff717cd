//! Reconciliation by request id: the audit records of one request, found across the audit log
//! and its rotated files, for the dispute "was this look-up a billed call?".
//!
//! A search is one of two kinds ([`Search`]). By bureau-guard's own id (`x-request-id`, the one
//! the bureau received): a record matches when it is that request's (`request_id`) or an answer
//! that rode on that request's bureau call (`rode_on`: cache hits, coalesced followers, stale
//! answers). By the bank's own id (`client_request_id`), only within one tenant: the bank sets
//! `x-client-request-id` itself, so bank A could send bank B's ids and, were the search not
//! scoped, appear in B's disputes; a search for a client id names the tenant whose id it is.
//!
//! Bounded: a search returns at most `limit` records ([`MAX_LIMIT`] at most; the oldest first,
//! with `truncated` when more matched, and the scan stops there), and one scan runs at a time
//! per process ([`ScanGate`]: the admin endpoint answers a second one 429), on a blocking
//! thread, so that an operator's query cannot take the disk or the memory from the bank traffic.
//!
//! A time-bounded scan, not an index: an index would be written on the request path (or
//! rebuilt after every rotation) for a question asked a few times a month, while a scan costs
//! nothing until asked. It reads each file in 8 MiB blocks and looks for the quoted id with
//! `memchr`'s substring search, parsing only the lines that contain it; files last written
//! before `since` are skipped whole (everything in them is older). Compressed rotations
//! (`.gz`, `.zst`, `.xz`, `.bz2`) are listed as skipped, not read: `logrotate`'s
//! `delaycompress` keeps the latest rotation plain. Measured on 10 million lines (2.6 GB): see
//! `benches/usage_reconcile.rs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, UNIX_EPOCH};

use serde::Serialize;

/// Records a search returns when the query names no `limit`: a dispute is about one look-up
/// and what rode on it, a few records; a hundred covers a popular cached answer.
pub const DEFAULT_LIMIT: usize = 100;
/// The most records one search may return: they are held in memory and sent as one JSON body.
pub const MAX_LIMIT: usize = 1000;

/// What a search looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Search {
    /// bureau-guard's request id: the request's record (`request_id`) and the answers that
    /// rode on its bureau call (`rode_on`).
    Request(String),
    /// The id the bank sent (`client_request_id`), in the records of `tenant` only.
    Client { id: String, tenant: String },
}

impl Search {
    /// The id searched for.
    pub fn id(&self) -> &str {
        match self {
            Search::Request(id) | Search::Client { id, .. } => id,
        }
    }
}

/// What a search found and what it read.
#[derive(Debug, Serialize)]
pub struct Found {
    pub id: String,
    /// With a search by client request id: the tenant it was scoped to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The matching records, oldest first (at most the search's limit), each with `matched`:
    /// `request_id`, `rode_on` or `client_request_id`.
    pub records: Vec<serde_json::Value>,
    /// More records matched than the limit: the scan stopped at the first one past it.
    pub truncated: bool,
    pub scanned: Vec<Scanned>,
    /// Files not read: compressed, or last written before `since`.
    pub skipped: Vec<String>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Scanned {
    pub file: String,
    pub bytes: u64,
}

/// Whether `id` can be a request id (ours, or a client's valid one): 1-128 of `A-Za-z0-9-_.:`.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

const COMPRESSED: [&str; 4] = [".gz", ".zst", ".xz", ".bz2"];
const BLOCK: usize = 8 << 20;

/// The audit file at `audit` and its rotations beside it (`audit.jsonl.1`,
/// `audit.jsonl-20261204`, ...), whatever the rotation's naming, oldest first.
fn audit_files(audit: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match audit.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = audit.file_name().and_then(|n| n.to_str()) else { return Ok(vec![audit.to_path_buf()]) };
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)?.flatten() {
        let file = e.file_name();
        let Some(f) = file.to_str() else { continue };
        let rotated = f.len() > name.len() && f.starts_with(name) && matches!(f.as_bytes()[name.len()], b'.' | b'-');
        if (f == name || rotated) && e.file_type().is_ok_and(|t| t.is_file()) {
            out.push(e.path());
        }
    }
    // Oldest first (rotations before the current file): records of one millisecond keep the
    // order they were written in.
    out.sort_by_key(|p| (std::fs::metadata(p).and_then(|m| m.modified()).ok(), p.clone()));
    Ok(out)
}

/// Finds the records `search` asks for in the audit log at `audit` and its rotations, reading
/// only files written at or after `since_unix_ms` (all, if `None`), and at most `limit` of them
/// (the scan stops at the first record past it). The id must be [`valid_id`]. Blocking.
pub fn find(audit: &Path, search: &Search, since_unix_ms: Option<i64>, limit: usize) -> std::io::Result<Found> {
    let started = Instant::now();
    let needle = format!("\"{}\"", search.id());
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let tenant = match search {
        Search::Request(_) => None,
        Search::Client { tenant, .. } => Some(tenant.clone()),
    };
    let mut found = Found {
        id: search.id().to_string(),
        tenant,
        records: Vec::new(),
        truncated: false,
        scanned: Vec::new(),
        skipped: Vec::new(),
        elapsed_ms: 0,
    };
    // One past the limit: whether more matched.
    let keep = limit.saturating_add(1);
    for path in audit_files(audit)? {
        let shown = path.display().to_string();
        if found.records.len() >= keep {
            found.skipped.push(shown);
            continue;
        }
        if COMPRESSED.iter().any(|ext| shown.ends_with(ext)) {
            found.skipped.push(shown);
            continue;
        }
        let meta = std::fs::metadata(&path)?;
        let modified_ms =
            meta.modified().ok().and_then(|m| m.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as i64);
        if let (Some(since), Some(m)) = (since_unix_ms, modified_ms)
            && m < since
        {
            found.skipped.push(shown);
            continue;
        }
        let bytes = scan(&path, &finder, search, keep, &mut found.records)?;
        found.scanned.push(Scanned { file: shown, bytes });
    }
    found.records.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    found.truncated = found.records.len() > limit;
    found.records.truncate(limit);
    found.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(found)
}

/// Scans one file until `out` holds `keep` records; returns the bytes read.
fn scan(
    path: &Path,
    finder: &memchr::memmem::Finder<'_>,
    search: &Search,
    keep: usize,
    out: &mut Vec<serde_json::Value>,
) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; BLOCK];
    // Bytes at the start of `buf` carried over from the last block: a line not yet ended.
    let mut carried = 0;
    let mut total = 0u64;
    loop {
        if carried == buf.len() {
            // One line longer than a block: not a record (they are a few hundred bytes).
            carried = 0;
        }
        let n = file.read(&mut buf[carried..])?;
        total += n as u64;
        let filled = carried + n;
        // Complete lines only, unless the file ended (a last line without its newline).
        let end = if n == 0 { filled } else { memchr::memrchr(b'\n', &buf[..filled]).map_or(0, |i| i + 1) };
        let region = &buf[..end];
        let mut next_line_after = 0;
        for at in finder.find_iter(region) {
            if at < next_line_after {
                continue;
            }
            let start = memchr::memrchr(b'\n', &region[..at]).map_or(0, |i| i + 1);
            let stop = memchr::memchr(b'\n', &region[at..]).map_or(region.len(), |i| at + i);
            next_line_after = stop;
            if let Some(record) = matching(&region[start..stop], search) {
                out.push(record);
                if out.len() >= keep {
                    return Ok(total);
                }
            }
        }
        if n == 0 {
            return Ok(total);
        }
        buf.copy_within(end..filled, 0);
        carried = filled - end;
    }
}

/// The record on `line` if `search` matches it, with `matched` naming the field that did.
fn matching(line: &[u8], search: &Search) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let matched = match search {
        Search::Request(id) => ["request_id", "rode_on"].into_iter().find(|k| v[*k].as_str() == Some(id))?,
        Search::Client { id, tenant } => (v["client_request_id"].as_str() == Some(id)
            && v["tenant"].as_str() == Some(tenant))
        .then_some("client_request_id")?,
    };
    v["matched"] = serde_json::Value::from(matched);
    Some(v)
}

/// One reconciliation scan at a time per process: a scan reads gigabytes, and two at once would
/// only share the disk between them (and with the audit writer).
#[derive(Debug, Clone)]
pub struct ScanGate {
    running: Arc<tokio::sync::Semaphore>,
    /// How long the last scan took (ms): a refused one is told to retry after about that.
    last_ms: Arc<AtomicU64>,
}

/// The right to scan; the next scan may start when it is dropped (however the scan ended).
#[derive(Debug)]
pub struct ScanPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    started: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Drop for ScanPermit {
    fn drop(&mut self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Default for ScanGate {
    fn default() -> Self {
        ScanGate { running: Arc::new(tokio::sync::Semaphore::new(1)), last_ms: Arc::default() }
    }
}

impl ScanGate {
    /// The permit to scan, or `Err(retry_after_s)` while another scan runs.
    pub fn try_start(&self) -> Result<ScanPermit, u64> {
        match self.running.clone().try_acquire_owned() {
            Ok(permit) => Ok(ScanPermit { _permit: permit, started: Instant::now(), last_ms: self.last_ms.clone() }),
            Err(_) => Err(self.last_ms.load(Ordering::Relaxed).div_ceil(1000).clamp(1, 60)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_call_and_what_rode_on_it_across_rotated_files() {
        let dir = std::env::temp_dir().join(format!("bg-reconcile-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let audit = dir.join("audit.jsonl");
        let line = |t: &str, id: &str, rode: Option<&str>, outcome: &str| {
            let mut v = serde_json::json!({"time": t, "tenant": "a", "route": "score", "subject": null,
                "outcome": outcome, "status": 200, "request_id": id, "client_request_id": null});
            if let Some(r) = rode {
                v["rode_on"] = serde_json::Value::from(r);
            }
            format!("{v}\n")
        };
        // The call in the rotated file, a hit riding on it in the current one, noise around.
        let mut old = String::new();
        for i in 0..1000 {
            old.push_str(&line("2026-12-03T10:00:00.000Z", &format!("0a0b0c0d-{i:016x}"), None, "bureau"));
        }
        old.push_str(&line("2026-12-03T10:00:01.000Z", "feedbeef-0000000000000007", None, "bureau"));
        std::fs::write(dir.join("audit.jsonl.1"), &old).unwrap();
        let current = line(
            "2026-12-04T09:00:00.000Z",
            "feedbeef-0000000000000099",
            Some("feedbeef-0000000000000007"),
            "cache_hit",
        ) + &line("2026-12-04T09:00:01.000Z", "feedbeef-00000000000000aa", None, "bureau");
        // The last line has no newline yet (the writer is mid-line): still read.
        std::fs::write(&audit, current.trim_end()).unwrap();
        std::fs::write(dir.join("audit.jsonl.2.gz"), b"\x1f\x8b").unwrap();
        std::fs::write(
            dir.join("audit.jsonl.bak-other"),
            line("2026-12-03T11:00:00.000Z", "feedbeef-0000000000000007", None, "bureau"),
        )
        .unwrap();
        std::fs::write(dir.join("other.jsonl"), line("t", "feedbeef-0000000000000007", None, "bureau")).unwrap();

        let ours = |id: &str| Search::Request(id.to_string());
        let found = find(&audit, &ours("feedbeef-0000000000000007"), None, DEFAULT_LIMIT).unwrap();
        let got: Vec<(&str, &str)> =
            found.records.iter().map(|r| (r["outcome"].as_str().unwrap(), r["matched"].as_str().unwrap())).collect();
        // audit.jsonl.bak-other is a rotation by its name: its record is found too.
        assert_eq!(got, [("bureau", "request_id"), ("bureau", "request_id"), ("cache_hit", "rode_on")]);
        assert!(found.skipped.iter().any(|f| f.ends_with("audit.jsonl.2.gz")));
        assert!(!found.scanned.iter().any(|s| s.file.ends_with("other.jsonl") && !s.file.contains("audit")));
        let last = find(&audit, &ours("feedbeef-00000000000000aa"), None, DEFAULT_LIMIT).unwrap();
        assert_eq!(last.records.len(), 1, "the unterminated last line");
        // Files last written before `since` are not read.
        let later = find(&audit, &ours("feedbeef-0000000000000007"), Some(i64::MAX), DEFAULT_LIMIT).unwrap();
        assert!(later.records.is_empty() && later.scanned.is_empty());
        assert!(!valid_id("a b") && !valid_id("") && valid_id("feedbeef-0000000000000007"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn audit_dir(name: &str, lines: &[serde_json::Value]) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("bg-reconcile-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let audit = dir.join("audit.jsonl");
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&audit, text).unwrap();
        (dir, audit)
    }

    fn record(time: &str, tenant: &str, id: &str, client: Option<&str>) -> serde_json::Value {
        serde_json::json!({"time": time, "tenant": tenant, "route": "score", "outcome": "bureau",
            "status": 200, "request_id": id, "client_request_id": client})
    }

    #[test]
    fn a_bank_cannot_put_itself_in_another_banks_dispute_with_a_client_id() {
        // Bank b's request carries the client id b-42; bank a sends the same client id, and
        // also bank b's request id as its own client id.
        let (dir, audit) = audit_dir(
            "scoped",
            &[
                record("2026-12-04T09:00:00.000Z", "b", "feedbeef-0000000000000001", Some("b-42")),
                record("2026-12-04T09:00:01.000Z", "a", "feedbeef-0000000000000002", Some("b-42")),
                record("2026-12-04T09:00:02.000Z", "a", "feedbeef-0000000000000003", Some("feedbeef-0000000000000001")),
            ],
        );
        let ids = |f: &Found| -> Vec<String> {
            f.records.iter().map(|r| format!("{}:{}", r["tenant"].as_str().unwrap(), r["matched"])).collect()
        };
        // Our request id finds b's call only, not a's record that names it as its client id.
        let ours = find(&audit, &Search::Request("feedbeef-0000000000000001".into()), None, DEFAULT_LIMIT).unwrap();
        assert_eq!(ids(&ours), ["b:\"request_id\""]);
        // A client id is searched within the tenant named, and only there.
        let client = |tenant: &str| Search::Client { id: "b-42".into(), tenant: tenant.into() };
        let b = find(&audit, &client("b"), None, DEFAULT_LIMIT).unwrap();
        assert_eq!(ids(&b), ["b:\"client_request_id\""]);
        assert_eq!(b.tenant.as_deref(), Some("b"));
        let a = find(&audit, &client("a"), None, DEFAULT_LIMIT).unwrap();
        assert_eq!(ids(&a), ["a:\"client_request_id\""]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_search_returns_at_most_its_limit_oldest_first_and_says_it_was_cut() {
        // A popular cached answer: one call, 50 hits riding on it.
        let call = "feedbeef-0000000000000001";
        let mut lines = vec![record("2026-12-04T09:00:00.000Z", "a", call, None)];
        for i in 0..50 {
            let mut hit = record(&format!("2026-12-04T09:01:{i:02}.000Z"), "a", &format!("feedbeef-1{i:015x}"), None);
            hit["rode_on"] = serde_json::Value::from(call);
            lines.push(hit);
        }
        let (dir, audit) = audit_dir("limit", &lines);
        let search = Search::Request(call.into());
        let cut = find(&audit, &search, None, 10).unwrap();
        assert_eq!(cut.records.len(), 10);
        assert!(cut.truncated);
        assert_eq!(cut.records[0]["matched"], "request_id", "oldest first: the call itself");
        let all = find(&audit, &search, None, 51).unwrap();
        assert_eq!((all.records.len(), all.truncated), (51, false), "exactly the limit is not cut");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_scan_at_a_time_and_the_next_once_it_ends() {
        let gate = ScanGate::default();
        let first = gate.try_start().expect("nothing runs yet");
        assert_eq!(gate.try_start().map(|_| ()), Err(1), "a second scan waits; retry after a second at least");
        drop(first);
        assert!(gate.try_start().is_ok(), "the permit's drop lets the next scan start");
    }
}

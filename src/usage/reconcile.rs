//! Reconciliation by request id: the audit records of one request, found across the audit log
//! and its rotated files, for the dispute "was this look-up a billed call?".
//!
//! The id is bureau-guard's own (`x-request-id`, the one the bureau received). A record matches
//! when it is that request's (`request_id`), when it is an answer that rode on that request's
//! bureau call (`rode_on`: cache hits, coalesced followers, stale answers), or when the bank
//! sent that id (`client_request_id`).
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
use std::time::{Instant, UNIX_EPOCH};

use serde::Serialize;

/// What a search found and what it read.
#[derive(Debug, Serialize)]
pub struct Found {
    pub id: String,
    /// The matching records, oldest first, each with `matched`: `request_id`, `rode_on` or
    /// `client_request_id`.
    pub records: Vec<serde_json::Value>,
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

/// Finds the records of request `id` in the audit log at `audit` and its rotations, reading
/// only files written at or after `since_unix_ms` (all, if `None`). `id` must be [`valid_id`].
pub fn find(audit: &Path, id: &str, since_unix_ms: Option<i64>) -> std::io::Result<Found> {
    let started = Instant::now();
    let needle = format!("\"{id}\"");
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let mut found =
        Found { id: id.to_string(), records: Vec::new(), scanned: Vec::new(), skipped: Vec::new(), elapsed_ms: 0 };
    for path in audit_files(audit)? {
        let shown = path.display().to_string();
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
        let bytes = scan(&path, &finder, id, &mut found.records)?;
        found.scanned.push(Scanned { file: shown, bytes });
    }
    found.records.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    found.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(found)
}

/// Scans one file; returns the bytes read.
fn scan(
    path: &Path,
    finder: &memchr::memmem::Finder<'_>,
    id: &str,
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
            if let Some(record) = matching(&region[start..stop], id) {
                out.push(record);
            }
        }
        if n == 0 {
            return Ok(total);
        }
        buf.copy_within(end..filled, 0);
        carried = filled - end;
    }
}

/// The record on `line` if one of its id fields is `id`, with `matched` naming which.
fn matching(line: &[u8], id: &str) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let matched = ["request_id", "rode_on", "client_request_id"].into_iter().find(|k| v[*k].as_str() == Some(id))?;
    v["matched"] = serde_json::Value::from(matched);
    Some(v)
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

        let found = find(&audit, "feedbeef-0000000000000007", None).unwrap();
        let got: Vec<(&str, &str)> =
            found.records.iter().map(|r| (r["outcome"].as_str().unwrap(), r["matched"].as_str().unwrap())).collect();
        // audit.jsonl.bak-other is a rotation by its name: its record is found too.
        assert_eq!(got, [("bureau", "request_id"), ("bureau", "request_id"), ("cache_hit", "rode_on")]);
        assert!(found.skipped.iter().any(|f| f.ends_with("audit.jsonl.2.gz")));
        assert!(!found.scanned.iter().any(|s| s.file.ends_with("other.jsonl") && !s.file.contains("audit")));
        let last = find(&audit, "feedbeef-00000000000000aa", None).unwrap();
        assert_eq!(last.records.len(), 1, "the unterminated last line");
        // Files last written before `since` are not read.
        let later = find(&audit, "feedbeef-0000000000000007", Some(i64::MAX)).unwrap();
        assert!(later.records.is_empty() && later.scanned.is_empty());
        assert!(!valid_id("a b") && !valid_id("") && valid_id("feedbeef-0000000000000007"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

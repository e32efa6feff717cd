//! The audit log: who received which answer, so an institution can reconcile its look-ups.
//!
//! With caching and coalescing, one bureau call can reach several requests; the bureau's own
//! records then no longer say who received a report. This optional log does: one JSON line per
//! answer carrying bureau data, whether it came from the bureau, the cache, a shared call or a
//! stale entry:
//!
//! ```text
//! {"time":"2017-07-27T09:00:00.123Z","tenant":"bank-a","route":"report","subject":"3f9c…",
//!  "outcome":"cache_hit","status":200,"request_id":"5e0c91aa-000000000000002a",
//!  "client_request_id":"bank-a:42"}
//! ```
//!
//! `request_id` is always bureau-guard's own id (the bureau's `x-request-id`);
//! `client_request_id` is the id the bank sent, if any (`null` otherwise), never trusted as ours.
//!
//! `subject` is the look-up's keyed hash (the cache key, see `key.rs`; `null` on routes
//! without a `cache_key`), never a raw subject id. It is stable across restarts only with a
//! configured `cache.key_secret_*`.
//!
//! Writing never blocks a request: records go through a bounded queue to a writer thread, which
//! appends them in batches and syncs the file about once a second. A record that cannot be
//! written is never dropped silently: it is counted (`bureau_guard_audit_write_errors_total`,
//! `bureau_guard_audit_dropped_total`), logged as an error, and the log turns unhealthy (the
//! `bureau_guard_audit_healthy` gauge and `/readyz`), until a write succeeds again; the file then
//! gets a `{"event":"gap","lost":N}` line so a reader knows records are missing.
//!
//! Log rotation. The writer notices when the path no longer names the file it has open (another
//! device and inode at the path, or nothing there: `logrotate`'s default `create` mode, `mv`),
//! and opens the path afresh; it looks before a batch, at most once per [`ROTATION_CHECK`], so
//! the check (one `stat`) stays in the writer thread, off the request path. A reload (SIGHUP,
//! `POST /admin/reload`, accepted or not) asks for a reopen at once ([`AuditLog::reopen`]). No
//! record is lost or written twice across a rotation: each batch is written whole to one file,
//! so records written between the rename and the reopen are in the old (renamed) file, which
//! `logrotate` keeps, and every later one is in the new file. The old file is synced before it
//! is closed. If the path cannot be opened, the writer keeps appending to the file it has (the
//! records are not lost while that file exists), logs the error and tries again a second later.
//!
//! What requests do meanwhile is `audit.fail_closed`:
//! - `false` (default, *fail open*): answers keep flowing; the failure is loud but does not
//!   turn a disk problem into a bureau outage for every bank.
//! - `true` (*fail closed*): while the log is unhealthy (or its queue is full), answers are
//!   refused with 503 `audit_unavailable`, for institutions that must not release a report
//!   without a record. Records are written after the answer is sent, so the records already
//!   queued when the disk fails (at most the queue) are lost with their answers delivered; every
//!   later answer is refused until the log recovers.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::cache::key::CacheKey;
use crate::ops::metrics::AuditMetrics;
use crate::respond::{ErrorKind, Outcome, ProxyError};

/// Records that may wait for the writer: seconds of a surge at thousands of answers per second.
/// A disk that far behind is failing, and the records beyond are counted as dropped.
const QUEUE: usize = 16 * 1024;
/// Records written per batch at most (one `write` and one flush per batch).
const BATCH: usize = 1024;
/// After writing a batch that emptied the queue, the writer waits this long before it looks
/// again, so that under load records gather while it sleeps on a timer: a request that queues a
/// record then finds the writer not parked on the queue and wakes no thread (a futex call and
/// often a context switch per record otherwise: +8.5 µs per request at 30k req/s, see
/// benches/README.md). A record waits at most this much more to be written; its sync is
/// `SYNC_INTERVAL` away anyway.
const GATHER: Duration = Duration::from_millis(1);
/// How often the file is synced to disk while records arrive: at most this much is lost in a
/// power failure, for one `fsync` per second instead of one per record.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// While failing, how often the writer tries again when no record arrives to try with.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often, at most, the writer checks that the path still names its open file (a rotation):
/// records written in between go to the old file, which a rotation keeps; one `stat` a second
/// costs nothing.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// One answer given to a tenant.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the answer was given, Unix milliseconds.
    pub unix_ms: i64,
    pub tenant: Arc<str>,
    pub route: Arc<str>,
    /// The look-up's cache key: the keyed subject hash. `None` on routes without a `cache_key`.
    pub subject: Option<CacheKey>,
    /// `Bureau`, `CacheHit`, `Coalesced` or `Stale`: an answer carrying bureau data.
    pub outcome: Outcome,
    pub status: u16,
    /// bureau-guard's own id for the request (`x-request-id`).
    pub request_id: HeaderValue,
    /// The id the client sent (`x-client-request-id`), if valid: the bank's, not ours.
    pub client_request_id: Option<HeaderValue>,
    /// A cache hit's, stale or coalesced answer's: the request id of the bureau call that
    /// fetched it (reconciliation: which billed call this answer rode on).
    pub rode_on: Option<HeaderValue>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    tenant: &'a str,
    route: &'a str,
    subject: Option<String>,
    outcome: &'static str,
    status: u16,
    request_id: &'a str,
    client_request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rode_on: Option<&'a str>,
}

#[derive(Serialize)]
struct GapLine {
    time: String,
    event: &'static str,
    /// Records that could not be written since the last successful write.
    lost: u64,
}

enum Msg {
    Record(Record),
    /// Answered once everything queued before it is written (or failed): with the health then.
    Flush(oneshot::Sender<bool>),
}

/// Where the writer puts its bytes; a file in production, stand-ins in tests.
trait Sink: Send + 'static {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    /// Whether the destination's name now names something else (the file was rotated away).
    fn moved(&self) -> bool {
        false
    }
    /// Opens the destination's name afresh. On an error, the old destination stays in use.
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An append-only file, reopened after a failure (it may have been moved or its disk remounted)
/// and when its path names another file (rotation).
struct FileSink {
    path: PathBuf,
    file: Option<OpenFile>,
}

/// The open file and the device and inode it had when opened, to tell whether the path still
/// names it.
struct OpenFile {
    file: File,
    id: (u64, u64),
}

impl OpenFile {
    fn open(path: &Path) -> io::Result<OpenFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let meta = file.metadata()?;
        Ok(OpenFile { file, id: (meta.dev(), meta.ino()) })
    }
}

impl Sink for FileSink {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let open = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(OpenFile::open(&self.path)?),
        };
        let result = open.file.write_all(bytes);
        if result.is_err() {
            self.file = None;
        }
        result
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.file.sync_data())
    }

    fn moved(&self) -> bool {
        let Some(open) = &self.file else { return false }; // opened by the next write anyway
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != open.id,
            // Nothing there (renamed without `create`, deleted) or not reachable: open it again.
            Err(_) => true,
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.file = Some(OpenFile::open(&self.path)?);
        Ok(())
    }
}

/// State the request path reads and the writer sets.
struct Health {
    healthy: AtomicBool,
    /// Records dropped at the queue since the writer last looked: it reports them in its gap line.
    dropped: AtomicU64,
    /// Set by [`AuditLog::reopen`]; the writer opens the path afresh before its next write.
    reopen: AtomicBool,
    metrics: AuditMetrics,
}

impl Health {
    fn set(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Release);
        self.metrics.healthy.set(i64::from(healthy));
    }
}

/// The audit log: a queue to a writer thread. Dropping every handle stops the writer once it
/// has written what was queued.
pub struct AuditLog {
    tx: SyncSender<Msg>,
    health: Arc<Health>,
    fail_closed: bool,
}

impl AuditLog {
    /// Opens `path` for appending (created if missing) and starts the writer. Fails if the file
    /// cannot be opened, so a misconfigured log stops start-up instead of losing records.
    pub fn open(path: &Path, fail_closed: bool, metrics: AuditMetrics) -> io::Result<AuditLog> {
        let sink = FileSink { path: path.to_path_buf(), file: Some(OpenFile::open(path)?) };
        AuditLog::start(sink, fail_closed, metrics, QUEUE)
    }

    fn start(sink: impl Sink, fail_closed: bool, metrics: AuditMetrics, queue: usize) -> io::Result<AuditLog> {
        let (tx, rx) = sync_channel(queue);
        let health = Arc::new(Health {
            healthy: AtomicBool::new(true),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            metrics,
        });
        health.set(true);
        let now = Instant::now();
        let writer = Writer {
            sink,
            health: health.clone(),
            lost: 0,
            last_sync: now,
            unsynced: false,
            last_rotation_check: now,
            reopen_failing: false,
        };
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || writer.run(rx))?;
        Ok(AuditLog { tx, health, fail_closed })
    }

    /// False from the first lost record until a write succeeds again. For `/readyz`.
    pub fn healthy(&self) -> bool {
        self.health.healthy.load(Ordering::Acquire)
    }

    /// Asks the writer to open the path afresh before its next write (a reload: `logrotate`'s
    /// `postrotate` sends SIGHUP). Without it the writer notices a rotation within
    /// [`ROTATION_CHECK`] anyway. Never blocks.
    pub fn reopen(&self) {
        self.health.reopen.store(true, Ordering::Release);
    }

    /// Whether an answer may be given now: with `fail_closed`, not while records are being lost.
    /// Check before answering, then [`AuditLog::record`] the answer.
    pub fn admit(&self) -> Result<(), ProxyError> {
        if self.fail_closed && !self.healthy() {
            return Err(unavailable());
        }
        Ok(())
    }

    /// Queues `record` without waiting. If it cannot be queued (the writer is that far behind, or
    /// stopped), the log turns unhealthy until the writer catches up, and: with `fail_closed`,
    /// the error says to withhold the answer (so nothing goes unaudited); otherwise the record is
    /// counted as lost.
    pub fn record(&self, record: Record) -> Result<(), ProxyError> {
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                if self.healthy() {
                    tracing::error!(target: "bureau_guard::audit", "audit queue full or writer stopped");
                }
                self.health.set(false);
                if self.fail_closed {
                    return Err(unavailable());
                }
                self.health.dropped.fetch_add(1, Ordering::AcqRel);
                self.health.metrics.dropped.inc();
                Ok(())
            }
        }
    }

    /// Waits until every record queued before this call is written (or failed), and returns
    /// whether the log is healthy then. For shutdown and tests; blocks a thread of the blocking
    /// pool while the queue is full.
    pub async fn flush(&self) -> bool {
        let (ack, done) = oneshot::channel();
        let tx = self.tx.clone();
        let queued = tokio::task::spawn_blocking(move || tx.send(Msg::Flush(ack)).is_ok()).await.unwrap_or(false);
        queued && done.await.unwrap_or(false)
    }
}

fn unavailable() -> ProxyError {
    ProxyError::new(ErrorKind::AuditUnavailable, "the audit log cannot be written; answers are withheld until it can")
        .retry_after(5)
}

struct Writer<S> {
    sink: S,
    health: Arc<Health>,
    /// Records lost since the last successful write.
    lost: u64,
    last_sync: Instant,
    unsynced: bool,
    last_rotation_check: Instant,
    /// The path could not be reopened at the last attempt (logged once per episode).
    reopen_failing: bool,
}

impl<S: Sink> Writer<S> {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut acks = Vec::new();
        loop {
            // While failing, wake up now and then to try again even if nothing arrives; with
            // unsynced lines, wake up to sync them.
            let wait = if self.lost > 0 || !self.health.healthy.load(Ordering::Acquire) {
                Some(RETRY_INTERVAL)
            } else if self.unsynced {
                Some(SYNC_INTERVAL.saturating_sub(self.last_sync.elapsed()))
            } else {
                None
            };
            let first = match wait {
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
                Some(timeout) => match rx.recv_timeout(timeout) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            buf.clear();
            let mut records = 0u64;
            for msg in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH)) {
                match msg {
                    Msg::Record(r) => {
                        write_line(&mut buf, &r);
                        records += 1;
                    }
                    Msg::Flush(ack) => acks.push(ack),
                }
            }
            self.lost += self.health.dropped.swap(0, Ordering::AcqRel);
            if records > 0 || self.lost > 0 || !self.health.healthy.load(Ordering::Acquire) {
                self.follow_rotation();
                self.write(&buf, records);
            }
            if self.unsynced && (!acks.is_empty() || self.last_sync.elapsed() >= SYNC_INTERVAL) {
                self.sync();
            }
            for ack in acks.drain(..) {
                let _ = ack.send(self.health.healthy.load(Ordering::Acquire));
            }
            if records > 0 && records < BATCH as u64 {
                std::thread::sleep(GATHER);
            }
        }
        if self.unsynced {
            self.sync();
        }
    }

    /// Before a batch: if a reload asked for it, or (at most once per [`ROTATION_CHECK`]) the
    /// path names another file, syncs the old file and opens the path. The whole batch then goes
    /// to one file or the other, so no record is lost or doubled.
    fn follow_rotation(&mut self) {
        let asked = self.health.reopen.swap(false, Ordering::AcqRel);
        let due = self.last_rotation_check.elapsed() >= ROTATION_CHECK;
        if !asked && !due {
            return;
        }
        self.last_rotation_check = Instant::now();
        if !asked && !self.sink.moved() {
            return;
        }
        if self.unsynced {
            // What went to the old file is on disk before the writer lets go of it.
            self.sync();
        }
        match self.sink.reopen() {
            Ok(()) => {
                if std::mem::take(&mut self.reopen_failing) {
                    tracing::warn!(target: "bureau_guard::audit", "audit log path opened again after rotation");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.reopen_failing, true) {
                    tracing::error!(target: "bureau_guard::audit", error = %e, "cannot open the audit log path after rotation; still appending to the old file");
                }
            }
        }
    }

    /// Writes `records` lines (`buf`), preceded by a gap line if records were lost before.
    fn write(&mut self, buf: &[u8], records: u64) {
        let result = if self.lost > 0 {
            // The newline ends a line a failed write may have cut off.
            let mut gap = b"\n".to_vec();
            let line = GapLine { time: now_rfc3339(), event: "gap", lost: self.lost };
            serde_json::to_writer(&mut gap, &line).expect("serializing a gap line cannot fail");
            gap.push(b'\n');
            gap.extend_from_slice(buf);
            self.sink.write_all(&gap)
        } else {
            self.sink.write_all(buf)
        };
        match result {
            Ok(()) => {
                if self.lost > 0 {
                    tracing::warn!(target: "bureau_guard::audit", lost = self.lost, "audit log writable again");
                    self.lost = 0;
                }
                self.health.metrics.records.inc_by(records);
                // Healthy again unless records were dropped at the queue meanwhile.
                self.health.set(self.health.dropped.load(Ordering::Acquire) == 0);
                self.unsynced = true;
            }
            Err(e) => {
                if self.lost == 0 {
                    tracing::error!(target: "bureau_guard::audit", error = %e, "audit log write failed: records are being lost");
                }
                self.lost += records;
                self.health.metrics.write_errors.inc_by(records);
                self.health.set(false);
            }
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.sink.sync() {
            tracing::error!(target: "bureau_guard::audit", error = %e, "audit log sync failed");
            self.health.set(false);
            // The records are written but maybe not on disk: try again with the next write.
            self.lost = self.lost.max(1);
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
    }
}

fn write_line(buf: &mut Vec<u8>, r: &Record) {
    let line = Line {
        time: rfc3339(r.unix_ms),
        tenant: &r.tenant,
        route: &r.route,
        subject: r.subject.map(|k| k.to_hex()),
        outcome: r.outcome.as_str(),
        status: r.status,
        request_id: r.request_id.to_str().unwrap_or(""),
        client_request_id: r.client_request_id.as_ref().and_then(|v| v.to_str().ok()),
        rode_on: r.rode_on.as_ref().and_then(|v| v.to_str().ok()),
    };
    serde_json::to_writer(&mut *buf, &line).expect("serializing strings and integers cannot fail");
    buf.push(b'\n');
}

fn rfc3339(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .map_or_else(|| unix_ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn now_rfc3339() -> String {
    rfc3339(crate::clock::Clock::now_unix_ms(&crate::clock::SystemClock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::{KeyPart, KeySecret, KeySpec, Scope};
    use crate::ops::metrics::Metrics;
    use std::sync::Mutex;

    fn record(n: u32, outcome: Outcome, subject: Option<CacheKey>) -> Record {
        Record {
            unix_ms: 1_501_113_600_123 + i64::from(n),
            tenant: Arc::from("bank-a"),
            route: Arc::from("report"),
            subject,
            outcome,
            status: 200,
            request_id: HeaderValue::from_str(&format!("req-{n}")).unwrap(),
            client_request_id: None,
            rode_on: None,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bureau-guard-audit-{}-{name}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[tokio::test]
    async fn lines_are_complete_parseable_and_free_of_subject_ids() {
        let m = Metrics::new();
        let path = temp_path("lines");
        let log = AuditLog::open(&path, false, m.audit_handles()).unwrap();
        let spec = KeySpec::new("report", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap()]);
        let key = spec
            .key(
                &KeySecret::from_bytes([1; 32]),
                "bank-a",
                &matchit::Params::new(),
                None,
                br#"{"subject_id":"9001011234567"}"#,
            )
            .unwrap();
        let outcomes = [Outcome::Bureau, Outcome::CacheHit, Outcome::Coalesced, Outcome::Stale];
        for (i, o) in outcomes.iter().enumerate() {
            log.record(record(i as u32, *o, Some(key))).unwrap();
        }
        log.record(record(9, Outcome::Bureau, None)).unwrap();
        assert!(log.flush().await);

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("9001011234567"), "no raw subject id: {text}");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(
            lines[1],
            serde_json::json!({
                "time": "2017-07-27T00:00:00.124Z", "tenant": "bank-a", "route": "report",
                "subject": key.to_hex(), "outcome": "cache_hit", "status": 200, "request_id": "req-1",
                "client_request_id": null,
            })
        );
        let got: Vec<&str> = lines.iter().map(|l| l["outcome"].as_str().unwrap()).collect();
        assert_eq!(got, ["bureau", "cache_hit", "coalesced", "stale", "bureau"]);
        assert!(lines[4]["subject"].is_null());
        assert_eq!(m.audit_records_total.get(), 5);
        assert!(log.healthy());
        assert_eq!(m.audit_healthy.get(), 1);

        // Appends, never truncates: a second process start keeps earlier lines.
        drop(log);
        let log = AuditLog::open(&path, false, m.audit_handles()).unwrap();
        log.record(record(10, Outcome::Bureau, None)).unwrap();
        assert!(log.flush().await);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);
        let _ = std::fs::remove_file(&path);
    }

    /// The `request_id` numbers of the records in `path`, in file order (none if it is missing).
    fn ids(path: &Path) -> Vec<u32> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["request_id"].as_str().unwrap().trim_start_matches("req-").parse().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_log_renamed_during_traffic_is_followed_and_no_record_is_lost() {
        let path = temp_path("rotate");
        let rotated = path.with_extension("jsonl.1");
        let _ = std::fs::remove_file(&rotated);
        let log = AuditLog::open(&path, false, Metrics::new().audit_handles()).unwrap();
        let mut next = 0;
        let send = |log: &AuditLog, next: &mut u32, n: u32| {
            for _ in 0..n {
                log.record(record(*next, Outcome::Bureau, None)).unwrap();
                *next += 1;
            }
        };
        send(&log, &mut next, 100);
        assert!(log.flush().await);
        // As logrotate does (create mode): rename while records keep arriving.
        std::fs::rename(&path, &rotated).unwrap();
        send(&log, &mut next, 100);
        // Traffic goes on until the writer has noticed (within its one-second check).
        let deadline = Instant::now() + Duration::from_secs(10);
        while ids(&path).is_empty() {
            assert!(Instant::now() < deadline, "the writer never reopened the rotated path");
            send(&log, &mut next, 10);
            assert!(log.flush().await);
        }
        send(&log, &mut next, 100);
        assert!(log.flush().await);
        assert!(log.healthy());

        let (old, new) = (ids(&rotated), ids(&path));
        let mut all: Vec<u32> = old.iter().chain(&new).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..next).collect::<Vec<_>>(), "every record exactly once, in one file or the other");
        assert!(old.len() >= 100, "records before the rename (and until the check) stay in the old file");
        assert!(new.contains(&(next - 1)) && new.len() >= 100, "later records go to the new file: {new:?}");
        assert!(old.iter().max() < new.iter().min(), "one switch: the old file ends where the new one starts");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
    }

    #[tokio::test]
    async fn a_reopen_request_switches_files_at_the_next_write() {
        let path = temp_path("reopen");
        let rotated = path.with_extension("jsonl.1");
        let log = AuditLog::open(&path, false, Metrics::new().audit_handles()).unwrap();
        log.record(record(0, Outcome::Bureau, None)).unwrap();
        assert!(log.flush().await);
        std::fs::rename(&path, &rotated).unwrap();
        // A reload (SIGHUP from logrotate's postrotate): no waiting for the periodic check.
        log.reopen();
        log.record(record(1, Outcome::Bureau, None)).unwrap();
        assert!(log.flush().await);
        assert_eq!((ids(&rotated), ids(&path)), (vec![0], vec![1]));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
    }

    #[tokio::test]
    async fn a_failing_disk_is_loud_and_fail_open_keeps_answering() {
        let m = Metrics::new();
        // Every write to /dev/full fails with "no space left on device".
        let log = AuditLog::open(Path::new("/dev/full"), false, m.audit_handles()).unwrap();
        log.record(record(1, Outcome::Bureau, None)).unwrap();
        assert!(!log.flush().await, "unhealthy after a lost record");
        assert!(!log.healthy());
        assert_eq!(m.audit_write_errors_total.get(), 1);
        assert_eq!(m.audit_healthy.get(), 0);
        assert!(log.admit().is_ok(), "fail open: answers continue");
        assert!(log.record(record(2, Outcome::Bureau, None)).is_ok());
    }

    #[tokio::test]
    async fn fail_closed_refuses_answers_while_records_are_lost() {
        let log = AuditLog::open(Path::new("/dev/full"), true, Metrics::new().audit_handles()).unwrap();
        assert!(log.admit().is_ok(), "healthy until a write fails");
        log.record(record(1, Outcome::Bureau, None)).unwrap();
        log.flush().await;
        let err = log.admit().unwrap_err();
        assert_eq!(err.kind, ErrorKind::AuditUnavailable);
        assert_eq!(err.kind.status(), 503);
    }

    /// A sink that fails while `failing` is set, and keeps what it is given otherwise.
    #[derive(Clone, Default)]
    struct Flaky {
        failing: Arc<AtomicBool>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Sink for Flaky {
        fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(io::Error::other("disk full"));
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn after_a_failure_the_log_recovers_and_marks_the_gap() {
        let m = Metrics::new();
        let sink = Flaky::default();
        let log = AuditLog::start(sink.clone(), true, m.audit_handles(), 16).unwrap();
        log.record(record(0, Outcome::Bureau, None)).unwrap();
        assert!(log.flush().await);
        sink.failing.store(true, Ordering::SeqCst);
        log.record(record(1, Outcome::Bureau, None)).unwrap();
        assert!(!log.flush().await);
        assert!(log.admit().is_err(), "fail closed: answers withheld");
        // The disk is back. Nothing is recorded while refusing: a flush (or the retry timer)
        // probes with the gap line.
        sink.failing.store(false, Ordering::SeqCst);
        assert!(log.flush().await, "the gap line went through");
        assert!(log.admit().is_ok());
        log.record(record(2, Outcome::CacheHit, None)).unwrap();
        assert!(log.flush().await);
        let text = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
        let got: Vec<String> = lines.iter().map(|l| format!("{}{}", l["request_id"], l["event"])).collect();
        assert_eq!(got, ["\"req-0\"null", "null\"gap\"", "\"req-2\"null"]);
        assert_eq!(lines[1]["lost"], 1);
        assert_eq!(m.audit_write_errors_total.get(), 1);
        assert_eq!(m.audit_records_total.get(), 2);
    }

    /// A sink whose first write says it has started and then waits until told to go on.
    struct Gate {
        entered: std::sync::mpsc::SyncSender<()>,
        go: Option<std::sync::mpsc::Receiver<()>>,
    }

    impl Sink for Gate {
        fn write_all(&mut self, _: &[u8]) -> io::Result<()> {
            if let Some(go) = self.go.take() {
                let _ = self.entered.send(());
                let _ = go.recv();
            }
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_queue_never_blocks_and_every_loss_is_counted() {
        let m = Metrics::new();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::channel();
        let log = AuditLog::start(Gate { entered: entered_tx, go: Some(go_rx) }, false, m.audit_handles(), 2).unwrap();
        log.record(record(0, Outcome::Bureau, None)).unwrap();
        entered.recv().unwrap();
        // The writer is stuck in a write: two records fit in the queue, the rest are lost.
        for i in 1..=100 {
            assert!(log.record(record(i, Outcome::Bureau, None)).is_ok(), "fail open: the answer goes out");
        }
        assert_eq!(m.audit_dropped_total.get(), 98);
        assert!(!log.healthy());
        go.send(()).unwrap();
        assert!(log.flush().await, "caught up: the loss is reported in a gap line and health returns");
        assert_eq!(m.audit_records_total.get(), 3);
    }

    #[tokio::test]
    async fn a_full_queue_with_fail_closed_withholds_the_answer() {
        let m = Metrics::new();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::channel();
        let log = AuditLog::start(Gate { entered: entered_tx, go: Some(go_rx) }, true, m.audit_handles(), 1).unwrap();
        log.record(record(0, Outcome::Bureau, None)).unwrap();
        entered.recv().unwrap();
        log.record(record(1, Outcome::Bureau, None)).unwrap();
        assert_eq!(log.record(record(2, Outcome::Bureau, None)).unwrap_err().kind, ErrorKind::AuditUnavailable);
        assert!(log.admit().is_err());
        assert_eq!(m.audit_dropped_total.get(), 0, "withheld, not lost");
        go.send(()).unwrap();
        assert!(log.flush().await);
        assert!(log.admit().is_ok());
    }
}

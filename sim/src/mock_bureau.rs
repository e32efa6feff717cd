//! A credit bureau stand-in that fails the way a real one does, for demos, tests and benchmarks.
//!
//! A real bureau does not know that a client has given up: a call it has accepted runs to its end
//! and holds a worker all the way. Its capacity is unknown to its clients and changes under them
//! (a deploy, a failover, a batch job), its service time drifts, and when it is full it answers
//! 429 or 503 with `Retry-After`. A back-end that drops abandoned work, never slows and never
//! pushes back hides exactly the failures a proxy in front of it must survive (the 2017 outage
//! came from them). This mock has the real shape:
//!
//! - `workers` concurrent slots (FIFO) and a queue, bounded or [`UNBOUNDED`], with a timeout; a
//!   full queue or a timed-out wait is answered 503 `bureau_overloaded` with `Retry-After: 1`.
//! - Each look-up's work (queue wait, service time with jitter, building the answer) runs in a
//!   task of its own: a client that leaves does not stop it, it still counts in `in_flight`, and
//!   it is counted in `finished_for_nobody` when it ends.
//! - Back-pressure on demand ([`Refusal`]): 429 or 503 with `Retry-After` to a share of look-up
//!   calls, for a while or until cleared, answered at once, before the queue.
//! - Live changes ([`MockBureau::set_workers`], [`MockBureau::set_service_time`],
//!   [`MockBureau::set_refusal`], or `POST /control`): fewer workers never interrupts a call,
//!   more lets queued calls in at once.
//!
//! `GET /stats` ([`Stats`]) tells what actually reached it: calls in total and per `x-tenant`,
//! which of them were served and which refused, the most requests ever inside at once, and a
//! window of `in_flight` since the last reset (max and time-weighted p95), so tests and
//! benchmarks assert on the bureau's view rather than the proxy's ("every quota unit charged is a
//! call the bureau served", "the proxy converged below the bureau's capacity").
//!
//! Endpoints:
//! - `POST /v1/credit-report` (`{"subject_id", "report_type"}` → ~1.5 KB deterministic JSON;
//!   malformed → 400) and `GET /v1/score/{subject_id}`: the look-ups, inside the capacity model.
//! - any method on `/echo/...`: returns the request it received, outside the capacity model
//!   (counted in `in_flight` only).
//! - `GET /stats`; `POST /stats/reset` starts a new `window` and answers the stats.
//! - `POST /control`: a JSON object of optional fields, all validated before any applies (bad
//!   input → 400, nothing changes); answers the settings now in force:
//!
//! ```text
//! {"service_ms": 50}                                   service time of calls that start from now
//! {"workers": 2}                                       workers, live
//! {"refuse": {"status": 429, "share": 1.0, "retry_after_s": 2, "for_ms": 3000}}
//!                                                      refuse (share default 1.0; no for_ms: until cleared)
//! {"refuse": null}                                     stop refusing
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use capacity::Workers;
use control::ActiveRefusal;
use stats::{Occupancy, TenantCounts};

mod capacity;
mod control;
mod handler;
mod serve;
mod stats;
#[cfg(test)]
mod tests;

pub use control::{InvalidRefusal, Refusal};
pub use handler::credit_report;
pub use stats::{Stats, Window};

/// Answers are built whole, as a bureau's are.
type Body = Full<Bytes>;

/// Default listen address; `config.example.toml`'s upstream points here.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// [`MockConfig::queue`] without a bound: a call waits up to `queue_timeout` for a worker,
/// however many wait.
pub const UNBOUNDED: usize = usize::MAX;

/// The most workers [`MockBureau::set_workers`] and `/control` accept: far above any bureau we
/// model, and it catches a typo before it becomes a semaphore of millions of permits.
pub const MAX_WORKERS: usize = 100_000;

/// The longest service time `/control` accepts (an hour): longer is a typo, not a slow bureau.
pub const MAX_SERVICE_MS: u64 = 3_600_000;

/// The bureau's capacity model.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Requests served at once (changeable live with [`MockBureau::set_workers`]).
    pub workers: usize,
    /// Time one request occupies a worker.
    pub service_time: Duration,
    /// Each service time is drawn uniformly from `service_time ± jitter`.
    pub jitter: Duration,
    /// Requests that may wait for a worker; one more is answered 503 at once. [`UNBOUNDED`]: no
    /// bound, every call waits (up to `queue_timeout`).
    pub queue: usize,
    /// A request waiting longer than this for a worker is answered 503.
    pub queue_timeout: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            workers: 8,
            service_time: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            queue: 64,
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// The mock bureau's state; serve it with [`start`].
pub struct MockBureau {
    cfg: MockConfig,
    workers: Workers,
    waiting: AtomicUsize,
    service_us: AtomicU64,
    calls_total: AtomicU64,
    calls_ok: AtomicU64,
    calls_overloaded: AtomicU64,
    calls_refused: AtomicU64,
    calls_bad_request: AtomicU64,
    finished_for_nobody: AtomicU64,
    tenants: Mutex<TenantCounts>,
    occupancy: Mutex<Occupancy>,
    refusal: arc_swap::ArcSwapOption<ActiveRefusal>,
    /// `Cache-Control` sent with look-up answers (none by default), changeable live.
    cache_control: arc_swap::ArcSwapOption<HeaderValue>,
}

impl MockBureau {
    pub fn new(cfg: MockConfig) -> Arc<MockBureau> {
        Arc::new(MockBureau {
            workers: Workers::new(cfg.workers.min(MAX_WORKERS)),
            waiting: AtomicUsize::new(0),
            service_us: AtomicU64::new(cfg.service_time.as_micros() as u64),
            calls_total: AtomicU64::new(0),
            calls_ok: AtomicU64::new(0),
            calls_overloaded: AtomicU64::new(0),
            calls_refused: AtomicU64::new(0),
            calls_bad_request: AtomicU64::new(0),
            finished_for_nobody: AtomicU64::new(0),
            tenants: Mutex::new(TenantCounts::default()),
            occupancy: Mutex::new(Occupancy::new(Instant::now())),
            refusal: arc_swap::ArcSwapOption::empty(),
            cache_control: arc_swap::ArcSwapOption::empty(),
            cfg,
        })
    }

    /// Sends `Cache-Control: value` with look-up answers from now on (`None`: no header), as a
    /// bureau marking its answers private or uncacheable would.
    pub fn set_cache_control(&self, value: Option<&'static str>) {
        self.cache_control.store(value.map(|v| std::sync::Arc::new(HeaderValue::from_static(v))));
    }

    /// Changes the service time of requests that start from now on.
    pub fn set_service_time(&self, d: Duration) {
        self.service_us.store(d.as_micros().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The service time calls start with now.
    pub fn service_time(&self) -> Duration {
        Duration::from_micros(self.service_us.load(Ordering::Relaxed))
    }

    /// Sets the number of workers to `n` (at most [`MAX_WORKERS`]; 0 stalls the bureau: calls
    /// queue and time out). More workers let queued calls in at once; fewer take effect as busy
    /// workers finish, never interrupting a call.
    pub fn set_workers(&self, n: usize) {
        self.workers.resize(n.min(MAX_WORKERS));
    }

    /// The number of workers the bureau is converging to (busy ones above it finish first).
    pub fn workers(&self) -> usize {
        self.workers.target()
    }
}

/// A mock bureau serving in the background.
pub struct MockHandle {
    pub addr: SocketAddr,
    /// `http`, or `https` for [`start_tls`].
    scheme: &'static str,
    pub bureau: Arc<MockBureau>,
    stop: watch::Sender<bool>,
    task: JoinHandle<bool>,
}

impl MockHandle {
    /// `http://ADDR` (`https://` with TLS), for an upstream URL.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stops accepting and waits (up to 5 s) for requests in flight.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Serves a mock bureau on `listener` in the background.
pub fn start(cfg: MockConfig, listener: TcpListener) -> MockHandle {
    start_on(cfg, listener, None)
}

/// Like [`start`] over TLS with `tls` (which may require a client certificate): a bureau
/// reached by `https://`, for upstream TLS tests and benchmarks.
pub fn start_tls(cfg: MockConfig, listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> MockHandle {
    start_on(cfg, listener, Some(tls))
}

fn start_on(cfg: MockConfig, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> MockHandle {
    let addr = listener.local_addr().expect("a bound listener has an address");
    let bureau = MockBureau::new(cfg);
    let (stop, stopped) = watch::channel(false);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let task = tokio::spawn(serve::serve(listener, tls, bureau.clone(), stopped));
    MockHandle { addr, scheme, bureau, stop, task }
}

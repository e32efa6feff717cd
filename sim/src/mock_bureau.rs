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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, SemaphorePermit, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod serve;
#[cfg(test)]
mod tests;

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

/// `Retry-After` on overload 503s (queue full, queue timeout): a full bureau asks for a short
/// pause, not for silence.
const OVERLOAD_RETRY_AFTER_S: u32 = 1;

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

/// Back-pressure on demand: the bureau answers `status` with `Retry-After` to a share of the
/// look-up calls, at once and before they queue for a worker, as a bureau shedding load does.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// 429 or 503.
    pub status: StatusCode,
    /// The share of look-up calls refused, 0..=1 (1: every call).
    pub share: f64,
    /// `Retry-After` in seconds; `None`: no header.
    pub retry_after_s: Option<u32>,
    /// How long the refusal lasts from [`MockBureau::set_refusal`]; `None`: until cleared.
    pub duration: Option<Duration>,
}

impl Refusal {
    /// Every problem with this refusal (empty: it is valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.status != StatusCode::TOO_MANY_REQUESTS && self.status != StatusCode::SERVICE_UNAVAILABLE {
            problems.push(format!("status {} must be 429 or 503", self.status.as_u16()));
        }
        if !(0.0..=1.0).contains(&self.share) {
            problems.push(format!("share {} must be between 0 and 1", self.share));
        }
        problems
    }
}

/// A [`Refusal`] that cannot be applied, with every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRefusal(pub Vec<String>);

impl fmt::Display for InvalidRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid refusal: {}", self.0.join("; "))
    }
}

impl std::error::Error for InvalidRefusal {}

/// What reached the bureau.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Calls to the look-up endpoints (credit-report, score), whatever their answer.
    pub calls_total: u64,
    /// Look-up calls that got a worker and were answered 200 (finished for nobody included).
    pub calls_ok: u64,
    /// Answered 503 because the queue was full or the wait timed out.
    pub calls_overloaded: u64,
    /// Answered 429/503 `bureau_refused` by a [`Refusal`].
    pub calls_refused: u64,
    pub calls_bad_request: u64,
    /// Look-up calls whose work ended after their client had gone (the answer had no one to go
    /// to): the bureau's capacity spent for nobody.
    pub finished_for_nobody: u64,
    /// Look-up calls by `x-tenant` header (`-` when absent), every call received.
    pub calls_by_tenant: BTreeMap<String, u64>,
    /// Look-up calls by tenant that got a worker and were answered 200 (finished for nobody
    /// included): what a bureau would bill.
    pub served_by_tenant: BTreeMap<String, u64>,
    /// Look-up calls by tenant answered 429/503: refusals and overload.
    pub refused_by_tenant: BTreeMap<String, u64>,
    /// Look-up calls holding a worker now (the rest of `in_flight` queues or is echo).
    pub working: i64,
    /// Requests inside the bureau now (look-ups from arrival until their work ends, whatever
    /// their client did; echo requests while they last).
    pub in_flight: i64,
    /// The most requests ever inside the bureau at once.
    pub max_in_flight: i64,
    /// `in_flight` since the last window reset.
    pub window: Window,
}

/// `in_flight` over the time since the last [`MockBureau::reset_window`] (or the start).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    /// Length of the window so far, in milliseconds.
    pub since_ms: u64,
    /// The most requests inside at once during the window.
    pub max_in_flight: i64,
    /// Time-weighted 95th percentile of `in_flight`: the level at or below which the bureau
    /// spent 95% of the window (the level now when no time has passed).
    pub p95_in_flight: i64,
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

#[derive(Default)]
struct TenantCounts {
    calls: BTreeMap<String, u64>,
    served: BTreeMap<String, u64>,
    refused: BTreeMap<String, u64>,
}

fn bump(map: &mut BTreeMap<String, u64>, tenant: &str) {
    match map.get_mut(tenant) {
        Some(n) => *n += 1,
        None => {
            map.insert(tenant.to_string(), 1);
        }
    }
}

/// A refusal in force, with its end.
#[derive(Debug)]
struct ActiveRefusal {
    refusal: Refusal,
    until: Option<Instant>,
}

/// What a look-up asks for; its answer is built by the worker, as the bureau's work.
enum LookUp {
    Report { subject_id: String, report_type: String },
    Score { subject_id: String },
}

impl LookUp {
    fn answer(&self) -> Vec<u8> {
        match self {
            LookUp::Report { subject_id, report_type } => credit_report(subject_id, report_type),
            LookUp::Score { subject_id } => {
                let h = fnv(subject_id.as_bytes());
                format!(r#"{{"score":{},"grade":{},"model":"mock-v1"}}"#, 300 + h % 600, 1 + h % 10).into_bytes()
            }
        }
    }
}

/// Why a call got no worker.
#[derive(Debug, Clone, Copy)]
enum Overload {
    QueueFull,
    QueueTimeout,
}

impl Overload {
    fn as_str(self) -> &'static str {
        match self {
            Overload::QueueFull => "queue full",
            Overload::QueueTimeout => "queue timeout",
        }
    }
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

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        let (in_flight, max_in_flight, window) = {
            let occupancy = self.occupancy.lock().expect("occupancy lock not poisoned");
            (occupancy.level, occupancy.max_ever, occupancy.window(Instant::now()))
        };
        let tenants = self.tenants.lock().expect("stats lock not poisoned");
        Stats {
            calls_total: self.calls_total.load(Ordering::Relaxed),
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            calls_overloaded: self.calls_overloaded.load(Ordering::Relaxed),
            calls_refused: self.calls_refused.load(Ordering::Relaxed),
            calls_bad_request: self.calls_bad_request.load(Ordering::Relaxed),
            finished_for_nobody: self.finished_for_nobody.load(Ordering::Relaxed),
            calls_by_tenant: tenants.calls.clone(),
            served_by_tenant: tenants.served.clone(),
            refused_by_tenant: tenants.refused.clone(),
            working: self.workers.busy.load(Ordering::Relaxed),
            in_flight,
            max_in_flight,
            window,
        }
    }

    /// Starts a new [`Stats::window`] now, at the current `in_flight`.
    pub fn reset_window(&self) {
        self.occupancy.lock().expect("occupancy lock not poisoned").reset(Instant::now());
    }

    /// Sends `Cache-Control: value` with look-up answers from now on (`None`: no header), as a
    /// bureau marking its answers private or uncacheable would.
    pub fn set_cache_control(&self, value: Option<&'static str>) {
        self.cache_control.store(value.map(|v| std::sync::Arc::new(HeaderValue::from_static(v))));
    }

    fn look_up_headers(&self, resp: &mut Response<Body>) {
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(cc) = self.cache_control.load_full() {
            resp.headers_mut().insert(http::header::CACHE_CONTROL, (*cc).clone());
        }
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

    /// Refuses look-up calls as `refusal` says from now on (its `duration` counts from now);
    /// `None` stops refusing. An invalid refusal changes nothing.
    pub fn set_refusal(&self, refusal: Option<Refusal>) -> Result<(), InvalidRefusal> {
        let Some(refusal) = refusal else {
            self.refusal.store(None);
            return Ok(());
        };
        let problems = refusal.problems();
        if !problems.is_empty() {
            return Err(InvalidRefusal(problems));
        }
        let until = refusal.duration.map(|d| Instant::now() + d);
        self.refusal.store(Some(Arc::new(ActiveRefusal { refusal, until })));
        Ok(())
    }

    /// The refusal in force now, if any (an expired one is cleared).
    pub fn refusal(&self) -> Option<Refusal> {
        self.active_refusal().map(|active| active.refusal.clone())
    }

    fn active_refusal(&self) -> Option<Arc<ActiveRefusal>> {
        let active = self.refusal.load_full()?;
        if active.until.is_some_and(|until| until <= Instant::now()) {
            // Only this refusal: one set meanwhile stays.
            self.refusal.compare_and_swap(&Some(active), None);
            return None;
        }
        Some(active)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/stats") => json(StatusCode::OK, &self.stats()),
            (Method::POST, "/stats/reset") => {
                self.reset_window();
                json(StatusCode::OK, &self.stats())
            }
            (Method::POST, "/control") => self.control(req).await,
            (_, p) if p == "/echo" || p.starts_with("/echo/") => {
                let _inside = Inside::enter(&self);
                echo(req).await
            }
            (Method::POST, "/v1/credit-report") => {
                let inside = Inside::enter(&self);
                let tenant = self.count_call(&req);
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let Ok(ask) = serde_json::from_slice::<ReportRequest>(&body) else {
                    self.calls_bad_request.fetch_add(1, Ordering::Relaxed);
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "expected JSON {\"subject_id\": string, \"report_type\": string}",
                    );
                };
                let ask = LookUp::Report { subject_id: ask.subject_id, report_type: ask.report_type };
                self.look_up(inside, tenant, ask).await
            }
            (Method::GET, p) if p.starts_with("/v1/score/") && p.len() > "/v1/score/".len() => {
                let inside = Inside::enter(&self);
                let tenant = self.count_call(&req);
                let ask = LookUp::Score { subject_id: p["/v1/score/".len()..].to_string() };
                self.look_up(inside, tenant, ask).await
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "unknown bureau endpoint"),
        }
    }

    /// Counts a look-up call; returns its tenant.
    fn count_call(&self, req: &Request<Incoming>) -> String {
        self.calls_total.fetch_add(1, Ordering::Relaxed);
        let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("-");
        bump(&mut self.tenants.lock().expect("stats lock not poisoned").calls, tenant);
        tenant.to_string()
    }

    /// Refuses the call at once, or runs its work in a task of its own and waits for the answer.
    /// The task, not this future, holds `inside`: a client that leaves drops this future, never
    /// the bureau's work.
    async fn look_up(self: &Arc<Self>, inside: Inside, tenant: String, ask: LookUp) -> Response<Body> {
        if let Some(refused) = self.refuse(&tenant) {
            return refused;
        }
        let (answer_tx, answer_rx) = oneshot::channel();
        let bureau = self.clone();
        tokio::spawn(async move {
            let answer = match bureau.work().await {
                Ok(()) => {
                    bureau.calls_ok.fetch_add(1, Ordering::Relaxed);
                    bump(&mut bureau.tenants.lock().expect("stats lock not poisoned").served, &tenant);
                    let mut resp = Response::new(Full::new(Bytes::from(ask.answer())));
                    bureau.look_up_headers(&mut resp);
                    Ok(resp)
                }
                Err(overload) => Err(bureau.overloaded(&tenant, overload)),
            };
            let served = answer.is_ok();
            if answer_tx.send(answer.unwrap_or_else(|overloaded| overloaded)).is_err() && served {
                bureau.finished_for_nobody.fetch_add(1, Ordering::Relaxed);
            }
            // The call leaves the bureau only now, whatever its client did.
            drop(inside);
        });
        match answer_rx.await {
            Ok(answer) => answer,
            Err(_) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the look-up's task ended without an answer")
            }
        }
    }

    /// The answer to a call the refusal in force picks, if any.
    fn refuse(&self, tenant: &str) -> Option<Response<Body>> {
        let refusal = self.refusal()?;
        // `fastrand::f64()` is in [0, 1): a share of 1 refuses every call, 0 none.
        if fastrand::f64() >= refusal.share {
            return None;
        }
        self.calls_refused.fetch_add(1, Ordering::Relaxed);
        bump(&mut self.tenants.lock().expect("stats lock not poisoned").refused, tenant);
        let mut resp = json(
            refusal.status,
            &serde_json::json!({
                "error": "bureau_refused",
                "message": "the bureau refuses calls for now",
                "retry_after_s": refusal.retry_after_s,
            }),
        );
        if let Some(s) = refusal.retry_after_s {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        Some(resp)
    }

    /// Waits for a worker (queue bounded unless [`UNBOUNDED`], wait bounded by
    /// `queue_timeout`), then holds it for one service time.
    async fn work(&self) -> Result<(), Overload> {
        let worker = match self.workers.try_acquire() {
            Some(w) => w,
            None => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.cfg.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(Overload::QueueFull);
                }
                let waited = tokio::time::timeout(self.cfg.queue_timeout, self.workers.acquire()).await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match waited {
                    Ok(Some(w)) => w,
                    _ => return Err(Overload::QueueTimeout),
                }
            }
        };
        let base = self.service_us.load(Ordering::Relaxed);
        let jitter = self.cfg.jitter.as_micros() as u64;
        let us = if jitter == 0 { base } else { (base + fastrand::u64(0..=2 * jitter)).saturating_sub(jitter) };
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        drop(worker);
        Ok(())
    }

    fn overloaded(&self, tenant: &str, why: Overload) -> Response<Body> {
        self.calls_overloaded.fetch_add(1, Ordering::Relaxed);
        bump(&mut self.tenants.lock().expect("stats lock not poisoned").refused, tenant);
        let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "bureau_overloaded", why.as_str());
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(OVERLOAD_RETRY_AFTER_S));
        resp
    }

    /// `POST /control`: every field is checked before any applies.
    async fn control(&self, req: Request<Incoming>) -> Response<Body> {
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let change = match Control::parse(&body) {
            Ok(c) => c,
            Err(problems) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({
                        "error": "bad_request",
                        "message": format!("nothing changed: {}", problems.join("; ")),
                        "problems": problems,
                    }),
                );
            }
        };
        if let Some(d) = change.service_time {
            self.set_service_time(d);
        }
        if let Some(n) = change.workers {
            self.set_workers(n);
        }
        if let Some(refusal) = change.refusal {
            // Checked in `Control::parse`.
            if let Err(e) = self.set_refusal(refusal) {
                return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string());
            }
        }
        json(StatusCode::OK, &self.settings())
    }

    /// The live settings, as `/control` answers them.
    fn settings(&self) -> serde_json::Value {
        let refuse = self.active_refusal().map(|a| {
            serde_json::json!({
                "status": a.refusal.status.as_u16(),
                "share": a.refusal.share,
                "retry_after_s": a.refusal.retry_after_s,
                "for_ms": a.until.map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64),
            })
        });
        serde_json::json!({
            "service_ms": self.service_time().as_millis() as u64,
            "workers": self.workers(),
            "refuse": refuse,
        })
    }
}

/// A `/control` body, checked: each field present is a change to apply.
#[derive(Debug, Default, PartialEq)]
struct Control {
    service_time: Option<Duration>,
    workers: Option<usize>,
    /// `Some(None)`: stop refusing.
    refusal: Option<Option<Refusal>>,
}

impl Control {
    /// Every problem, or the change.
    fn parse(body: &[u8]) -> Result<Control, Vec<String>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            service_ms: Option<u64>,
            workers: Option<usize>,
            #[serde(default, deserialize_with = "present")]
            refuse: Option<Option<RawRefuse>>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawRefuse {
            status: u16,
            #[serde(default = "every_call")]
            share: f64,
            retry_after_s: Option<u32>,
            for_ms: Option<u64>,
        }
        fn every_call() -> f64 {
            1.0
        }
        /// A field present, even as `null` (`Some(None)`), apart from an absent one (`None`).
        fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
            T::deserialize(d).map(Some)
        }

        let raw: Raw = serde_json::from_slice(body).map_err(|e| {
            vec![format!(
                "{e}; expected a JSON object of optional fields service_ms, workers, refuse \
                 ({{\"status\": 429|503, \"share\": 0..1, \"retry_after_s\": S, \"for_ms\": MS}} or null)"
            )]
        })?;
        let mut problems = Vec::new();
        if raw.service_ms.is_some_and(|ms| ms > MAX_SERVICE_MS) {
            problems.push(format!("service_ms must be at most {MAX_SERVICE_MS}"));
        }
        if raw.workers.is_some_and(|n| n > MAX_WORKERS) {
            problems.push(format!("workers must be at most {MAX_WORKERS}"));
        }
        let refusal = match raw.refuse {
            None => None,
            Some(None) => Some(None),
            Some(Some(r)) => match StatusCode::from_u16(r.status) {
                Ok(status) => {
                    let refusal = Refusal {
                        status,
                        share: r.share,
                        retry_after_s: r.retry_after_s,
                        duration: r.for_ms.map(Duration::from_millis),
                    };
                    problems.extend(refusal.problems().into_iter().map(|p| format!("refuse: {p}")));
                    Some(Some(refusal))
                }
                Err(_) => {
                    problems.push(format!("refuse: status {} must be 429 or 503", r.status));
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Control { service_time: raw.service_ms.map(Duration::from_millis), workers: raw.workers, refusal })
    }
}

/// Worker slots whose number changes live without interrupting a call: more adds permits at
/// once; fewer forgets the free ones now and the rest as busy workers finish (`debt`).
struct Workers {
    slots: Semaphore,
    /// The number of workers asked for; the lock also keeps two resizes from interleaving.
    target: Mutex<usize>,
    /// Permits still to forget as workers finish.
    debt: AtomicUsize,
    /// Workers busy now.
    busy: AtomicI64,
}

impl Workers {
    fn new(n: usize) -> Workers {
        Workers { slots: Semaphore::new(n), target: Mutex::new(n), debt: AtomicUsize::new(0), busy: AtomicI64::new(0) }
    }

    fn target(&self) -> usize {
        *self.target.lock().expect("workers lock not poisoned")
    }

    fn resize(&self, n: usize) {
        let mut target = self.target.lock().expect("workers lock not poisoned");
        if n >= *target {
            let mut add = n - *target;
            // Workers not yet retired first: they are still busy, so they count as new ones.
            let owed = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| Some(d - d.min(add)))
                .expect("the update always returns Some");
            add -= owed.min(add);
            self.slots.add_permits(add);
        } else {
            let cut = *target - n;
            let forgotten = self.slots.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        }
        *target = n;
    }

    fn try_acquire(&self) -> Option<Worker<'_>> {
        self.slots.try_acquire().ok().map(|permit| Worker::busy(self, permit))
    }

    /// `None` only if the semaphore were closed, which it never is.
    async fn acquire(&self) -> Option<Worker<'_>> {
        self.slots.acquire().await.ok().map(|permit| Worker::busy(self, permit))
    }
}

/// One busy worker; dropping it frees the worker, or retires it if the bureau has shrunk.
struct Worker<'a> {
    permit: Option<SemaphorePermit<'a>>,
    workers: &'a Workers,
}

impl<'a> Worker<'a> {
    fn busy(workers: &'a Workers, permit: SemaphorePermit<'a>) -> Worker<'a> {
        workers.busy.fetch_add(1, Ordering::AcqRel);
        Worker { permit: Some(permit), workers }
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        self.workers.busy.fetch_sub(1, Ordering::AcqRel);
        let retire = self.workers.debt.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1)).is_ok();
        if retire {
            permit.forget();
        }
    }
}

/// How many requests are inside the bureau, now, ever, and over the current window.
struct Occupancy {
    level: i64,
    max_ever: i64,
    /// Start of the window.
    since: Instant,
    /// Last change of `level` (or the window's start, if later).
    changed: Instant,
    window_max: i64,
    /// Nanoseconds the window spent at each level (index = level).
    nanos_at: Vec<u64>,
}

impl Occupancy {
    fn new(now: Instant) -> Occupancy {
        Occupancy { level: 0, max_ever: 0, since: now, changed: now, window_max: 0, nanos_at: Vec::new() }
    }

    fn add(&mut self, delta: i64, now: Instant) {
        self.account(now);
        self.level += delta;
        self.max_ever = self.max_ever.max(self.level);
        self.window_max = self.window_max.max(self.level);
    }

    /// Adds the time since the last change to the current level.
    fn account(&mut self, now: Instant) {
        let level = usize::try_from(self.level).unwrap_or(0);
        if self.nanos_at.len() <= level {
            self.nanos_at.resize(level + 1, 0);
        }
        let spent = now.saturating_duration_since(self.changed).as_nanos();
        self.nanos_at[level] = self.nanos_at[level].saturating_add(u64::try_from(spent).unwrap_or(u64::MAX));
        self.changed = now;
    }

    fn reset(&mut self, now: Instant) {
        self.since = now;
        self.changed = now;
        self.window_max = self.level;
        self.nanos_at.clear();
    }

    fn window(&self, now: Instant) -> Window {
        let mut at = self.nanos_at.clone();
        let level = usize::try_from(self.level).unwrap_or(0);
        if at.len() <= level {
            at.resize(level + 1, 0);
        }
        let spent = now.saturating_duration_since(self.changed).as_nanos();
        at[level] = at[level].saturating_add(u64::try_from(spent).unwrap_or(u64::MAX));
        let total: u128 = at.iter().map(|&n| u128::from(n)).sum();
        let p95 = if total == 0 {
            self.level
        } else {
            let mut below = 0u128;
            let mut p95 = self.level;
            for (l, &n) in at.iter().enumerate() {
                below += u128::from(n);
                if below * 100 >= total * 95 {
                    p95 = l as i64;
                    break;
                }
            }
            p95
        };
        Window {
            since_ms: now.saturating_duration_since(self.since).as_millis() as u64,
            max_in_flight: self.window_max,
            p95_in_flight: p95,
        }
    }
}

/// Counts a request in `in_flight` (and the window) for as long as it lives; a look-up's moves
/// into the task doing its work.
struct Inside(Arc<MockBureau>);

impl Inside {
    fn enter(b: &Arc<MockBureau>) -> Inside {
        b.occupancy.lock().expect("occupancy lock not poisoned").add(1, Instant::now());
        Inside(b.clone())
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        if let Ok(mut occupancy) = self.0.occupancy.lock() {
            occupancy.add(-1, Instant::now());
        }
    }
}

#[derive(Deserialize)]
struct ReportRequest {
    subject_id: String,
    report_type: String,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A deterministic report of about 1.5 KB: same subject and type, same bytes.
pub fn credit_report(subject_id: &str, report_type: &str) -> Vec<u8> {
    const KINDS: [&str; 6] = ["card", "mortgage", "auto", "personal", "student", "overdraft"];
    const BANDS: [&str; 5] = ["A", "B", "C", "D", "E"];
    let h = fnv(subject_id.as_bytes());
    let accounts: Vec<serde_json::Value> = (0..9u64)
        .map(|i| {
            let x = h.rotate_left((i * 7) as u32);
            serde_json::json!({
                "account_id": format!("ACC-{:012}", x % 1_000_000_000_000),
                "kind": KINDS[(x % 6) as usize],
                "opened": format!("20{:02}-{:02}-01", 5 + x % 19, 1 + x % 12),
                "limit": 1_000 * (1 + x % 500),
                "balance": 100 * (x % 4_000),
                "status": if x % 17 == 0 { "delinquent" } else { "current" },
                "payments_late_24m": x % 3,
            })
        })
        .collect();
    let report = serde_json::json!({
        "bureau": "mock-bureau",
        "report_type": report_type,
        "subject_hash": format!("{h:016x}"),
        "score": 300 + h % 600,
        "risk_band": BANDS[(h % 5) as usize],
        "inquiries_12m": h % 9,
        "accounts": accounts,
        "public_records": [],
        "generated_by": "bureau-guard mock-bureau; deterministic synthetic data, no real person",
    });
    serde_json::to_vec(&report).expect("serializing JSON values cannot fail")
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.entry(name.as_str().to_string()).and_modify(|e| *e = format!("{e}, {v}")).or_insert(v);
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }),
    )
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(value).expect("serializable"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({"error": code, "message": message}))
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

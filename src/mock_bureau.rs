//! A credit bureau stand-in with a real capacity model, for demos, tests and benchmarks.
//!
//! The 2017 outage happened because the bureau has a fixed number of workers: past that, requests
//! queue, and past the queue they fail. This mock has exactly that shape: `workers` concurrent
//! slots (FIFO), a bounded queue with a timeout (both answered 503 `bureau_overloaded`), and a
//! service time with jitter. `GET /stats` tells what actually reached it (calls in total and per
//! `x-tenant`, the most requests ever inside at once), so tests and benchmarks assert on the
//! bureau's view rather than the proxy's.
//!
//! Endpoints: `POST /v1/credit-report` (`{"subject_id", "report_type"}` → ~1.5 KB deterministic
//! JSON; malformed → 400), `GET /v1/score/{subject_id}`, any method on `/echo/...` (returns the
//! request it received, outside the capacity model), `GET /stats`, `POST /control`
//! (`{"service_ms": N}` changes the service time live).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::respond::Body;
use crate::server::{self, ConnLimits};

/// Default listen address; `config.example.toml`'s upstream points here.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// The bureau's capacity model.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Requests served at once.
    pub workers: usize,
    /// Time one request occupies a worker.
    pub service_time: Duration,
    /// Each service time is drawn uniformly from `service_time ± jitter`.
    pub jitter: Duration,
    /// Requests that may wait for a worker; one more is answered 503 at once.
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

/// What reached the bureau.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Calls to the look-up endpoints (credit-report, score), whatever their answer.
    pub calls_total: u64,
    pub calls_ok: u64,
    /// Answered 503 because the queue was full or the wait timed out.
    pub calls_overloaded: u64,
    pub calls_bad_request: u64,
    /// Look-up calls by `x-tenant` header (`-` when absent).
    pub calls_by_tenant: BTreeMap<String, u64>,
    /// Requests inside the bureau now (queued or being served), echo included.
    pub in_flight: i64,
    /// The most requests ever inside the bureau at once.
    pub max_in_flight: i64,
}

/// The mock bureau's state; serve it with [`start`].
pub struct MockBureau {
    cfg: MockConfig,
    workers: Semaphore,
    waiting: AtomicUsize,
    service_us: AtomicU64,
    calls_total: AtomicU64,
    calls_ok: AtomicU64,
    calls_overloaded: AtomicU64,
    calls_bad_request: AtomicU64,
    in_flight: AtomicI64,
    max_in_flight: AtomicI64,
    by_tenant: Mutex<BTreeMap<String, u64>>,
    /// `Cache-Control` sent with look-up answers (none by default), changeable live.
    cache_control: arc_swap::ArcSwapOption<HeaderValue>,
}

impl MockBureau {
    pub fn new(cfg: MockConfig) -> Arc<MockBureau> {
        Arc::new(MockBureau {
            workers: Semaphore::new(cfg.workers),
            waiting: AtomicUsize::new(0),
            service_us: AtomicU64::new(cfg.service_time.as_micros() as u64),
            calls_total: AtomicU64::new(0),
            calls_ok: AtomicU64::new(0),
            calls_overloaded: AtomicU64::new(0),
            calls_bad_request: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            max_in_flight: AtomicI64::new(0),
            by_tenant: Mutex::new(BTreeMap::new()),
            cache_control: arc_swap::ArcSwapOption::empty(),
            cfg,
        })
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        Stats {
            calls_total: self.calls_total.load(Ordering::Relaxed),
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            calls_overloaded: self.calls_overloaded.load(Ordering::Relaxed),
            calls_bad_request: self.calls_bad_request.load(Ordering::Relaxed),
            calls_by_tenant: self.by_tenant.lock().expect("stats lock not poisoned").clone(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
        }
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
        self.service_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let _inside = Inside::enter(&self);
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/stats") => json(StatusCode::OK, &self.stats()),
            (Method::POST, "/control") => self.control(req).await,
            (_, p) if p == "/echo" || p.starts_with("/echo/") => echo(req).await,
            (Method::POST, "/v1/credit-report") => {
                self.count_call(&req);
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let Ok(ask) = serde_json::from_slice::<ReportRequest>(&body) else {
                    self.calls_bad_request.fetch_add(1, Ordering::Relaxed);
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "expected JSON {\"subject_id\": string, \"report_type\": string}",
                    );
                };
                if let Err(resp) = self.work().await {
                    return resp;
                }
                self.calls_ok.fetch_add(1, Ordering::Relaxed);
                let mut resp = Response::new(Full::new(Bytes::from(credit_report(&ask.subject_id, &ask.report_type))));
                self.look_up_headers(&mut resp);
                resp
            }
            (Method::GET, p) if p.starts_with("/v1/score/") && p.len() > "/v1/score/".len() => {
                self.count_call(&req);
                if let Err(resp) = self.work().await {
                    return resp;
                }
                self.calls_ok.fetch_add(1, Ordering::Relaxed);
                let subject = &p["/v1/score/".len()..];
                let h = fnv(subject.as_bytes());
                let body = format!(r#"{{"score":{},"grade":{},"model":"mock-v1"}}"#, 300 + h % 600, 1 + h % 10);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                self.look_up_headers(&mut resp);
                resp
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "unknown bureau endpoint"),
        }
    }

    fn count_call(&self, req: &Request<Incoming>) {
        self.calls_total.fetch_add(1, Ordering::Relaxed);
        let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("-");
        let mut map = self.by_tenant.lock().expect("stats lock not poisoned");
        match map.get_mut(tenant) {
            Some(n) => *n += 1,
            None => {
                map.insert(tenant.to_string(), 1);
            }
        }
    }

    /// Waits for a worker (bounded queue, bounded wait), then holds it for one service time.
    async fn work(&self) -> Result<(), Response<Body>> {
        let permit = match self.workers.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.cfg.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(self.overloaded("queue full"));
                }
                let waited = tokio::time::timeout(self.cfg.queue_timeout, self.workers.acquire()).await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match waited {
                    Ok(Ok(p)) => p,
                    _ => return Err(self.overloaded("queue timeout")),
                }
            }
        };
        let base = self.service_us.load(Ordering::Relaxed);
        let jitter = self.cfg.jitter.as_micros() as u64;
        let us = if jitter == 0 { base } else { (base + fastrand::u64(0..=2 * jitter)).saturating_sub(jitter) };
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        drop(permit);
        Ok(())
    }

    fn overloaded(&self, why: &str) -> Response<Body> {
        self.calls_overloaded.fetch_add(1, Ordering::Relaxed);
        error(StatusCode::SERVICE_UNAVAILABLE, "bureau_overloaded", why)
    }

    async fn control(&self, req: Request<Incoming>) -> Response<Body> {
        #[derive(Deserialize)]
        struct Control {
            service_ms: u64,
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        match serde_json::from_slice::<Control>(&body) {
            Ok(c) => {
                self.set_service_time(Duration::from_millis(c.service_ms));
                json(StatusCode::OK, &serde_json::json!({"service_ms": c.service_ms}))
            }
            Err(_) => error(StatusCode::BAD_REQUEST, "bad_request", "expected JSON {\"service_ms\": N}"),
        }
    }
}

/// Counts a request in `in_flight` / `max_in_flight` for as long as it lives.
struct Inside<'a>(&'a MockBureau);

impl<'a> Inside<'a> {
    fn enter(b: &'a MockBureau) -> Inside<'a> {
        let now = b.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        b.max_in_flight.fetch_max(now, Ordering::AcqRel);
        Inside(b)
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
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

#[derive(Clone)]
struct Service(Arc<MockBureau>);

impl tower::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let bureau = self.0.clone();
        Box::pin(async move { Ok(bureau.handle(req).await) })
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
    let addr = listener.local_addr().expect("a bound listener has an address");
    let bureau = MockBureau::new(cfg);
    let (stop, mut stopped) = watch::channel(false);
    let limits = ConnLimits { header_read_timeout: Duration::from_secs(10), max_head_bytes: 64 * 1024 };
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let task = tokio::spawn(server::serve(listener, Service(bureau.clone()), limits, shutdown, Duration::from_secs(5)));
    MockHandle { addr, scheme: "http", bureau, stop, task }
}

/// Like [`start`] over TLS with `tls` (which may require a client certificate): a bureau
/// reached by `https://`, for upstream TLS tests and benchmarks.
pub fn start_tls(cfg: MockConfig, listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> MockHandle {
    let addr = listener.local_addr().expect("a bound listener has an address");
    let bureau = MockBureau::new(cfg);
    let (stop, mut stopped) = watch::channel(false);
    let limits = ConnLimits { header_read_timeout: Duration::from_secs(10), max_head_bytes: 64 * 1024 };
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let current = Arc::new(arc_swap::ArcSwap::from_pointee(crate::tls::Listener::fixed(tls)));
    let tls = server::TlsListener { current, counters: crate::tls::HandshakeCounters::unregistered() };
    let service = Service(bureau.clone());
    let make = move |_, _| service.clone();
    let task = tokio::spawn(server::serve_tls(listener, tls, make, limits, shutdown, Duration::from_secs(5)));
    MockHandle { addr, scheme: "https", bureau, stop, task }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_deterministic_and_about_1_5_kb() {
        let a = credit_report("S-1", "full");
        assert_eq!(a, credit_report("S-1", "full"));
        assert_ne!(a, credit_report("S-2", "full"));
        assert!((1200..2000).contains(&a.len()), "{} bytes", a.len());
    }
}

//! Open-loop HTTP load generation for benchmarks and demos.
//!
//! # The problem
//!
//! A closed-loop client (send, wait for the answer, send the next) slows down
//! exactly when the server does, so the requests that *would* have waited
//! behind a stall are never sent and never measured ("coordinated omission").
//! The percentiles it reports then describe a much kinder world than the one
//! real clients, who do not wait for each other, live in.
//!
//! This module issues requests at fixed *scheduled* times, `t0 + i / rate`,
//! each in its own task, whatever happened to the earlier ones, and measures
//! every latency from the scheduled time, not from when the request finally
//! left. A stall in the server (or in the generator itself) therefore shows up
//! in the latency of every request scheduled during it.
//!
//! # Shape of a run
//!
//! * A [`LoadGenerator`] owns one HTTP/1.1 client (hyper-util legacy client,
//!   keep-alive pool, no cap on connections, so a slow server gets more
//!   connections rather than fewer requests). Reuse it across runs to keep
//!   its connections warm.
//! * A run has one or more [`StreamSpec`]s, each with a name, a rate schedule
//!   (a list of [`Phase`]s) and a [`RequestFactory`] that builds the request
//!   for each sequence number, so look-ups can differ.
//! * [`LoadGenerator::start`] returns a [`RunHandle`]: read live counters with
//!   [`RunHandle::snapshot`] while it runs, end it early with
//!   [`RunHandle::stop`], or await [`RunHandle::wait`] for the final figures.
//!
//! Send times are kept by a dedicated dispatcher thread that sleeps with the
//! OS timer (tens of microseconds of slack) rather than tokio's 1 ms timer
//! wheel, and spawns each request as a task on the caller's tokio runtime.
//! How late each request actually started is recorded too
//! ([`StreamSnapshot::send_lag_us`]): if that grows, the generator, not the
//! target, is the bottleneck.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use bureau_sim::loadgen::{LoadGenerator, LoadgenOptions, RequestTemplate, StreamSpec};
//!
//! # async fn demo() -> Result<(), bureau_sim::loadgen::LoadgenError> {
//! let template = RequestTemplate::get("http://127.0.0.1:8080/v1/score/S0")?
//!     .header("x-api-key", "bench-key")?;
//! let stream = StreamSpec::new(
//!     "tenant-a",
//!     template.vary_path(|seq| format!("/v1/score/S{:06}", seq % 1000)),
//! )
//! .phase(Duration::from_secs(5), 1_000.0)
//! .phase(Duration::from_secs(5), 4_000.0);
//!
//! let generator = LoadGenerator::new(LoadgenOptions::default());
//! let run = generator.start(vec![stream])?;
//! while !run.is_finished() {
//!     tokio::time::sleep(Duration::from_secs(1)).await;
//!     println!("{}", run.snapshot());
//! }
//! let report = run.wait().await;
//! println!("{report}");
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::runtime::Handle;
use tokio::sync::Notify;

/// Body type of generated requests: the whole body is in memory.
pub type RequestBody = Full<Bytes>;

/// Significant figures kept by the latency histograms: 0.1% resolution at
/// every magnitude, the usual choice for latency percentiles.
const HISTOGRAM_SIGFIG: u8 = 3;

/// Histograms track at least this much (in microseconds) so that a short
/// request timeout still leaves room for the send lag of an overloaded run.
const MIN_HISTOGRAM_HIGH_US: u64 = 10_000_000;

/// Status codes the `http` crate can represent are 100..=999; one counter
/// each keeps recording a single atomic increment with no map look-up.
const STATUS_SLOTS: usize = 1000;

/// Products `duration * rate` this close to an integer are taken as that
/// integer, so that 0.3 s at 10 req/s is 3 requests, not 4.
const REQUEST_COUNT_EPSILON: f64 = 1e-9;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a run could not be set up, or a request could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadgenError {
    /// [`LoadGenerator::start`] was called outside a tokio runtime.
    NoRuntime,
    /// The run has no streams.
    NoStreams,
    /// A phase has a rate that is negative, infinite or NaN.
    InvalidPhase {
        /// Name of the stream.
        stream: String,
        /// Index of the phase in the stream's schedule.
        phase: usize,
        /// The offending rate.
        rate: f64,
    },
    /// A URL (or a varied path) is not an absolute `http://` URL.
    InvalidUrl {
        /// The URL or path as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header name or value is not valid HTTP.
    InvalidHeader {
        /// The header name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The dispatcher thread could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for LoadgenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRuntime => write!(f, "load generator started outside a tokio runtime"),
            Self::NoStreams => write!(f, "load run has no streams"),
            Self::InvalidPhase { stream, phase, rate } => {
                write!(f, "stream {stream:?} phase {phase}: rate {rate} is not a finite number >= 0")
            }
            Self::InvalidUrl { url, reason } => write!(f, "invalid URL {url:?}: {reason}"),
            Self::InvalidHeader { name, reason } => {
                write!(f, "invalid header {name:?}: {reason}")
            }
            Self::Spawn(e) => write!(f, "cannot start the dispatcher thread: {e}"),
        }
    }
}

impl std::error::Error for LoadgenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// What to send
// ---------------------------------------------------------------------------

/// A request to send over and over: method, absolute `http://` URL, headers
/// and an optional body.
///
/// Every request built from it is identical unless it is turned into a
/// factory with [`RequestTemplate::vary_path`].
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    method: Method,
    scheme: Scheme,
    authority: Authority,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestTemplate {
    /// A template for `method url`.
    ///
    /// `url` must be absolute with scheme `http` or `https` and a host (for
    /// example `http://127.0.0.1:8080/v1/score/S1`); anything else is
    /// [`LoadgenError::InvalidUrl`]. `https` needs [`LoadgenOptions::tls`].
    pub fn new(method: Method, url: &str) -> Result<Self, LoadgenError> {
        let invalid = |reason: String| LoadgenError::InvalidUrl { url: url.to_owned(), reason };
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme".to_owned()))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid(format!("scheme {scheme} is not http or https")));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host".to_owned()))?;
        Ok(Self { method, scheme, authority, uri, headers: HeaderMap::new(), body: Bytes::new() })
    }

    /// A `GET` template; see [`RequestTemplate::new`].
    pub fn get(url: &str) -> Result<Self, LoadgenError> {
        Self::new(Method::GET, url)
    }

    /// Adds a header (appended, so a name may repeat). Fails with
    /// [`LoadgenError::InvalidHeader`] if the name or value is not valid HTTP.
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, LoadgenError> {
        let invalid = |reason: String| LoadgenError::InvalidHeader { name: name.to_owned(), reason };
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        let header_value = HeaderValue::from_str(value).map_err(|e| invalid(e.to_string()))?;
        self.headers.append(header_name, header_value);
        Ok(self)
    }

    /// Sets the body sent with every request (empty by default). The
    /// `content-length` header is set by the client.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Builds one request exactly as templated.
    pub fn build(&self) -> Request<RequestBody> {
        self.build_with_uri(self.uri.clone())
    }

    /// Builds one request with the template's scheme and host but
    /// `path_and_query` (for example `/v1/score/S42?fresh=1`) instead of the
    /// templated path. Fails with [`LoadgenError::InvalidUrl`] if it is not a
    /// valid path.
    pub fn build_with_path(&self, path_and_query: &str) -> Result<Request<RequestBody>, LoadgenError> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| LoadgenError::InvalidUrl { url: path_and_query.to_owned(), reason: e.to_string() })?;
        Ok(self.build_with_uri(uri))
    }

    /// Turns the template into a factory whose request number `seq` (0-based,
    /// counted per stream) has path-and-query `path(seq)`; everything else is
    /// as templated. A path that does not parse makes that one request count
    /// as a [`StreamSnapshot::request_errors`].
    pub fn vary_path<F>(self, path: F) -> RequestFactory
    where
        F: Fn(u64) -> String + Send + Sync + 'static,
    {
        RequestFactory(Arc::new(move |seq| self.build_with_path(&path(seq))))
    }

    fn build_with_uri(&self, uri: Uri) -> Request<RequestBody> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

type MakeRequest = dyn Fn(u64) -> Result<Request<RequestBody>, LoadgenError> + Send + Sync;

/// Builds the request for each sequence number of a stream.
///
/// Called once per request, inside that request's task (not on the
/// dispatcher thread, so it cannot delay the schedule), with the stream's
/// 0-based sequence number. It should be cheap: its time counts in the
/// request's latency. The request's URI must be absolute (`http://host/...`).
/// It must not panic: a request whose factory panicked stays counted as sent
/// and in flight, and is recorded nowhere else.
#[derive(Clone)]
pub struct RequestFactory(Arc<MakeRequest>);

impl RequestFactory {
    /// A factory from any closure, for variations beyond the path (headers
    /// per tenant, bodies, methods).
    pub fn from_fn<F>(make: F) -> Self
    where
        F: Fn(u64) -> Request<RequestBody> + Send + Sync + 'static,
    {
        Self(Arc::new(move |seq| Ok(make(seq))))
    }

    /// Builds request number `seq`.
    pub fn make(&self, seq: u64) -> Result<Request<RequestBody>, LoadgenError> {
        (self.0)(seq)
    }
}

impl From<RequestTemplate> for RequestFactory {
    /// Every request is `template.build()`.
    fn from(template: RequestTemplate) -> Self {
        Self(Arc::new(move |_| Ok(template.build())))
    }
}

impl fmt::Debug for RequestFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestFactory(..)")
    }
}

// ---------------------------------------------------------------------------
// When to send it
// ---------------------------------------------------------------------------

/// A stretch of a stream's schedule at a constant arrival rate.
///
/// A phase of duration `d` at rate `r` (requests per second) issues
/// [`Phase::requests`] = ⌈d·r⌉ requests, the `i`-th at `phase start + i / r`.
/// A rate of 0 is a pause.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phase {
    /// How long the phase lasts.
    pub duration: Duration,
    /// Arrival rate in requests per second; finite and >= 0.
    pub rate: f64,
}

impl Phase {
    /// A phase of `duration` at `rate` requests per second.
    pub fn new(duration: Duration, rate: f64) -> Self {
        Self { duration, rate }
    }

    /// Number of requests the phase issues: ⌈duration·rate⌉, where a product
    /// within 1e-9 of an integer counts as that integer. 0 for an invalid
    /// (negative or non-finite) rate, which [`LoadGenerator::start`] rejects.
    pub fn requests(&self) -> u64 {
        if !self.rate.is_finite() || self.rate <= 0.0 {
            return 0;
        }
        let exact = self.duration.as_secs_f64() * self.rate;
        let nearest = exact.round();
        let count = if (exact - nearest).abs() < REQUEST_COUNT_EPSILON { nearest } else { exact.ceil() };
        // Float to int casts saturate; a phase of 2^64 requests is not a
        // schedule anyone can run anyway.
        count as u64
    }

    /// Offset of request `index` from the start of the phase.
    fn offset(&self, index: u64) -> Duration {
        Duration::from_secs_f64(index as f64 / self.rate)
    }
}

/// One named stream of requests: a schedule and what to send.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    /// Name used in snapshots and reports.
    pub name: String,
    /// The schedule, phases back to back from the start of the run.
    pub phases: Vec<Phase>,
    /// Builds each request.
    pub request: RequestFactory,
}

impl StreamSpec {
    /// A stream with an empty schedule; add phases with [`StreamSpec::phase`].
    pub fn new(name: impl Into<String>, request: impl Into<RequestFactory>) -> Self {
        Self { name: name.into(), phases: Vec::new(), request: request.into() }
    }

    /// Appends a phase of `duration` at `rate` requests per second.
    pub fn phase(mut self, duration: Duration, rate: f64) -> Self {
        self.phases.push(Phase::new(duration, rate));
        self
    }

    /// Total number of requests the schedule issues.
    pub fn planned_requests(&self) -> u64 {
        self.phases.iter().map(Phase::requests).sum()
    }

    /// Total length of the schedule.
    pub fn schedule_duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }
}

// ---------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------

/// Settings of the client and of every request.
#[derive(Clone, Debug)]
pub struct LoadgenOptions {
    /// A request that has no complete response (status and whole body) this
    /// long after its *scheduled* send time is abandoned and counted as a
    /// timeout; its connection is closed, so the server sees the client leave. Measured from the scheduled time, like latency; a request
    /// whose task starts after that is counted as a timeout without being
    /// sent.
    pub request_timeout: Duration,
    /// Limit on establishing one TCP connection; a failure counts as a
    /// transport error.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// The TLS client for `https` URLs (`None`: `http` only). Its settings
    /// (roots, resumption, ALPN left empty for HTTP/1.1) are the caller's.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Open a new connection for every request and close it after the
    /// response, instead of keeping connections alive: measures connection
    /// (and TLS handshake) cost rather than request cost.
    pub new_connection_per_request: bool,
}

impl Default for LoadgenOptions {
    fn default() -> Self {
        Self {
            // Long enough that a merely slow target shows up as latency,
            // short enough that a dead one does not hold a run for long.
            request_timeout: Duration::from_secs(5),
            // Loopback connects take microseconds; a second means a backlog.
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(30),
            tls: None,
            new_connection_per_request: false,
        }
    }
}

/// The generator's client: plain HTTP, or `https`-or-`http` over rustls.
#[derive(Clone, Debug)]
enum HttpClient {
    Plain(Client<HttpConnector, RequestBody>),
    Tls(Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody>),
}

impl HttpClient {
    fn request(&self, request: Request<RequestBody>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            HttpClient::Plain(c) => c.request(request),
            HttpClient::Tls(c) => c.request(request),
        }
    }
}

/// An open-loop load generator: one HTTP/1.1 client, any number of runs.
///
/// The client keeps idle connections alive between requests and runs, opens
/// a new connection whenever no idle one is free (there is no upper bound,
/// so a slow target never slows the arrival rate down), and sets
/// `TCP_NODELAY`.
#[derive(Clone, Debug)]
pub struct LoadGenerator {
    client: HttpClient,
    options: LoadgenOptions,
}

impl LoadGenerator {
    /// A generator with its own connection pool. Does not need a runtime;
    /// runs do.
    pub fn new(options: LoadgenOptions) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.connect_timeout));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            // Without a pool timer idle connections are never reaped.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(options.pool_idle_timeout)
            // Keep every connection a burst opened: reopening them on the
            // next burst would add connect time to its latencies. Or keep
            // none, when every request is to pay for its own connection.
            .pool_max_idle_per_host(if options.new_connection_per_request { 0 } else { usize::MAX });
        let client = match &options.tls {
            None => HttpClient::Plain(builder.build(connector)),
            Some(tls) => {
                connector.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((**tls).clone())
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(connector);
                HttpClient::Tls(builder.build(https))
            }
        };
        Self { client, options }
    }

    /// The options this generator was built with.
    pub fn options(&self) -> &LoadgenOptions {
        &self.options
    }

    /// Starts a run of `streams`, all scheduled from the same instant (now),
    /// and returns at once.
    ///
    /// Must be called from within a tokio runtime; request tasks are spawned
    /// on it, and the runtime must keep running until the run is over.
    /// Fails if there are no streams, a rate is invalid, or the dispatcher
    /// thread cannot be started.
    pub fn start(&self, streams: Vec<StreamSpec>) -> Result<RunHandle, LoadgenError> {
        let runtime = Handle::try_current().map_err(|_| LoadgenError::NoRuntime)?;
        if streams.is_empty() {
            return Err(LoadgenError::NoStreams);
        }
        for stream in &streams {
            for (index, phase) in stream.phases.iter().enumerate() {
                if !phase.rate.is_finite() || phase.rate < 0.0 {
                    return Err(LoadgenError::InvalidPhase {
                        stream: stream.name.clone(),
                        phase: index,
                        rate: phase.rate,
                    });
                }
            }
        }
        let histogram_high_us = micros(self.options.request_timeout.saturating_mul(2)).max(MIN_HISTOGRAM_HIGH_US);
        let streams = streams.into_iter().map(|spec| StreamState::new(spec, histogram_high_us)).collect();
        let shared = Arc::new(RunShared {
            client: self.client.clone(),
            timeout: self.options.request_timeout,
            start: Instant::now(),
            streams,
            stop: AtomicBool::new(false),
            // The dispatcher holds the first count until it has issued the
            // whole schedule, so the run cannot look finished before that.
            pending: AtomicU64::new(1),
            drained: Notify::new(),
            finished_at: Mutex::new(None),
        });
        let dispatcher_guard = PendingGuard { shared: Arc::clone(&shared) };
        let dispatcher = std::thread::Builder::new()
            .name("loadgen-dispatch".to_owned())
            .spawn(move || dispatch(dispatcher_guard, runtime))
            .map_err(LoadgenError::Spawn)?;
        Ok(RunHandle { shared, dispatcher: dispatcher.thread().clone() })
    }

    /// Runs `streams` to completion and returns the final figures;
    /// [`LoadGenerator::start`] followed by [`RunHandle::wait`].
    pub async fn run(&self, streams: Vec<StreamSpec>) -> Result<RunSnapshot, LoadgenError> {
        Ok(self.start(streams)?.wait().await)
    }
}

/// A run in progress.
///
/// Dropping the handle stops issuing new requests (as [`RunHandle::stop`]);
/// requests already in flight finish or time out on their own.
#[derive(Debug)]
pub struct RunHandle {
    shared: Arc<RunShared>,
    dispatcher: Thread,
}

impl RunHandle {
    /// Current per-stream figures, cumulative since the start of the run.
    ///
    /// Cheap enough to call every second: atomic loads plus a copy of each
    /// histogram under a lock that request tasks hold only to record one
    /// value. Fields are read one after another while the run goes on, so
    /// they can disagree by the few requests completing meanwhile; the
    /// snapshot returned by [`RunHandle::wait`] is exact.
    pub fn snapshot(&self) -> RunSnapshot {
        self.shared.snapshot()
    }

    /// Stops issuing requests (requests not yet sent never will be); those in
    /// flight finish or time out. [`RunHandle::wait`] still waits for them.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.dispatcher.unpark();
    }

    /// Whether the schedule is over (or stopped) and every request issued has
    /// completed, failed or timed out.
    pub fn is_finished(&self) -> bool {
        self.shared.pending.load(Ordering::Acquire) == 0
    }

    /// Waits until the run is finished (see [`RunHandle::is_finished`]) and
    /// returns the final figures. Bounded by the schedule plus the request
    /// timeout.
    pub async fn wait(self) -> RunSnapshot {
        loop {
            let notified = self.shared.drained.notified();
            let mut notified = std::pin::pin!(notified);
            // Register before checking, so a notification between the check
            // and the await is not lost.
            notified.as_mut().enable();
            if self.is_finished() {
                break;
            }
            notified.await;
        }
        self.shared.snapshot()
    }
}

impl Drop for RunHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Shared run state
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct RunShared {
    client: HttpClient,
    timeout: Duration,
    start: Instant,
    streams: Vec<StreamState>,
    stop: AtomicBool,
    /// The dispatcher (until it has issued everything) plus requests in
    /// flight. Zero means the run is over.
    pending: AtomicU64,
    drained: Notify,
    finished_at: Mutex<Option<Instant>>,
}

impl RunShared {
    fn snapshot(&self) -> RunSnapshot {
        let finished_at = *lock(&self.finished_at);
        let end = finished_at.unwrap_or_else(Instant::now);
        RunSnapshot {
            elapsed: end.saturating_duration_since(self.start),
            finished: finished_at.is_some(),
            streams: self.streams.iter().map(StreamState::snapshot).collect(),
        }
    }
}

/// One count in [`RunShared::pending`]; releasing it on drop means neither a
/// panic nor a cancelled task can leave a run waiting forever.
struct PendingGuard {
    shared: Arc<RunShared>,
}

impl PendingGuard {
    fn acquire(shared: &Arc<RunShared>) -> Self {
        shared.pending.fetch_add(1, Ordering::AcqRel);
        Self { shared: Arc::clone(shared) }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.shared.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.shared.finished_at) = Some(Instant::now());
            self.shared.drained.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct StreamState {
    name: String,
    phases: Vec<Phase>,
    phase_requests: Vec<u64>,
    factory: RequestFactory,
    planned: u64,
    schedule: Duration,
    counters: StreamCounters,
    histograms: Mutex<StreamHistograms>,
    last_error: Mutex<Option<String>>,
}

#[derive(Debug)]
struct StreamCounters {
    sent: AtomicU64,
    responses: AtomicU64,
    responses_in_schedule: AtomicU64,
    transport_errors: AtomicU64,
    timeouts: AtomicU64,
    request_errors: AtomicU64,
    by_status: Box<[AtomicU64]>,
}

#[derive(Clone, Debug)]
struct StreamHistograms {
    success: Histogram<u64>,
    rejected: Histogram<u64>,
    send_lag: Histogram<u64>,
}

impl StreamState {
    fn new(spec: StreamSpec, histogram_high_us: u64) -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, histogram_high_us, HISTOGRAM_SIGFIG)
                .expect("bounds are 1..=high with high >= 10 s and 3 significant figures")
        };
        let phase_requests = spec.phases.iter().map(Phase::requests).collect();
        Self {
            planned: spec.planned_requests(),
            schedule: spec.schedule_duration(),
            name: spec.name,
            phases: spec.phases,
            phase_requests,
            factory: spec.request,
            counters: StreamCounters {
                sent: AtomicU64::new(0),
                responses: AtomicU64::new(0),
                responses_in_schedule: AtomicU64::new(0),
                transport_errors: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                request_errors: AtomicU64::new(0),
                by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            },
            histograms: Mutex::new(StreamHistograms {
                success: histogram(),
                rejected: histogram(),
                send_lag: histogram(),
            }),
            last_error: Mutex::new(None),
        }
    }

    fn record(&self, outcome: RequestEnd, timing: Timing) {
        {
            // Held for three array increments; never across an await.
            let mut histograms = lock(&self.histograms);
            histograms.send_lag.saturating_record(timing.send_lag_us);
            if let RequestEnd::Response(status) = &outcome {
                if status.is_success() {
                    histograms.success.saturating_record(timing.latency_us);
                } else if is_rejection(*status) {
                    histograms.rejected.saturating_record(timing.latency_us);
                }
            }
        }
        let counters = &self.counters;
        match outcome {
            RequestEnd::Response(status) => {
                if let Some(slot) = counters.by_status.get(usize::from(status.as_u16())) {
                    slot.fetch_add(1, Ordering::Relaxed);
                }
                if timing.in_schedule {
                    counters.responses_in_schedule.fetch_add(1, Ordering::Relaxed);
                }
                counters.responses.fetch_add(1, Ordering::Relaxed);
            }
            RequestEnd::Timeout => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            RequestEnd::Transport(message) => {
                *lock(&self.last_error) = Some(message);
                counters.transport_errors.fetch_add(1, Ordering::Relaxed);
            }
            RequestEnd::RequestError(message) => {
                *lock(&self.last_error) = Some(message);
                counters.request_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> StreamSnapshot {
        let counters = &self.counters;
        // Completions before `sent`, so that in-flight never reads negative.
        let responses = counters.responses.load(Ordering::Relaxed);
        let responses_in_schedule = counters.responses_in_schedule.load(Ordering::Relaxed);
        let transport_errors = counters.transport_errors.load(Ordering::Relaxed);
        let timeouts = counters.timeouts.load(Ordering::Relaxed);
        let request_errors = counters.request_errors.load(Ordering::Relaxed);
        let status_counts = counters
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(code, count)| {
                let count = count.load(Ordering::Relaxed);
                let code = u16::try_from(code).ok()?;
                (count > 0).then_some((code, count))
            })
            .collect();
        let sent = counters.sent.load(Ordering::Relaxed);
        let histograms = lock(&self.histograms).clone();
        StreamSnapshot {
            name: self.name.clone(),
            planned: self.planned,
            schedule: self.schedule,
            sent,
            responses,
            responses_in_schedule,
            status_counts,
            transport_errors,
            timeouts,
            request_errors,
            last_error: lock(&self.last_error).clone(),
            success_latency_us: histograms.success,
            rejected_latency_us: histograms.rejected,
            send_lag_us: histograms.send_lag,
        }
    }
}

/// 429 (tenant over quota) and 503 (shed) are the proxy saying "not now";
/// their latency tells how fast it refuses, so it is kept apart.
fn is_rejection(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks (histograms, a message, an instant) stays
    // consistent even if a holder panicked, so poisoning is ignored.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Dispatching and executing requests
// ---------------------------------------------------------------------------

/// Position of one stream in its schedule.
struct Cursor {
    phase: usize,
    index: u64,
    phase_start: Duration,
    seq: u64,
}

impl Cursor {
    /// Scheduled send time of the next request, or `None` when the stream's
    /// schedule is exhausted.
    fn next_due(&mut self, start: Instant, stream: &StreamState) -> Option<Instant> {
        loop {
            let phase = stream.phases.get(self.phase)?;
            let requests = stream.phase_requests.get(self.phase).copied().unwrap_or(0);
            if self.index < requests {
                // An instant past the platform's range ends the stream
                // rather than panicking.
                return start.checked_add(self.phase_start)?.checked_add(phase.offset(self.index));
            }
            self.phase_start += phase.duration;
            self.phase += 1;
            self.index = 0;
        }
    }

    fn advance(&mut self) {
        self.index += 1;
        self.seq += 1;
    }
}

/// The dispatcher thread: issues every stream's requests at their scheduled
/// times until the schedules end or the run is stopped.
///
/// It runs on its own OS thread so that its sleeps have the OS timer's
/// precision and never queue behind request tasks on a busy runtime. When it
/// wakes late, it issues everything that has become due at once: late
/// requests are still sent, and their lateness shows in their latency.
fn dispatch(guard: PendingGuard, runtime: Handle) {
    let shared = &guard.shared;
    let mut cursors: Vec<Cursor> =
        shared.streams.iter().map(|_| Cursor { phase: 0, index: 0, phase_start: Duration::ZERO, seq: 0 }).collect();
    while !shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let mut next_due: Option<Instant> = None;
        for (stream_index, (cursor, stream)) in cursors.iter_mut().zip(&shared.streams).enumerate() {
            while let Some(due) = cursor.next_due(shared.start, stream) {
                if due > now {
                    next_due = Some(next_due.map_or(due, |next| next.min(due)));
                    break;
                }
                stream.counters.sent.fetch_add(1, Ordering::Relaxed);
                let request = PendingGuard::acquire(shared);
                runtime.spawn(execute(request, stream_index, cursor.seq, due));
                cursor.advance();
            }
        }
        let Some(next_due) = next_due else {
            break;
        };
        let wait = next_due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            // Woken early by `stop` (unpark) or spuriously: the loop re-checks.
            std::thread::park_timeout(wait);
        }
    }
}

/// How one generated request ended, as the load generator saw it.
enum RequestEnd {
    Response(StatusCode),
    Timeout,
    Transport(String),
    RequestError(String),
}

struct Timing {
    send_lag_us: u64,
    latency_us: u64,
    /// Completed before the end of the stream's schedule.
    in_schedule: bool,
}

/// One request, from its scheduled time to its recorded outcome.
///
/// `scheduled` may lie in the past (the dispatcher or the runtime was late);
/// latency and the timeout both count from it.
async fn execute(guard: PendingGuard, stream_index: usize, seq: u64, scheduled: Instant) {
    let shared = &guard.shared;
    let Some(stream) = shared.streams.get(stream_index) else {
        return;
    };
    let started = Instant::now();
    let deadline = scheduled.checked_add(shared.timeout);
    let outcome = if deadline.is_some_and(|deadline| started >= deadline) {
        // Already out of time before it could start (the generator or the
        // machine is far behind): sending it would only add load to a run
        // that is collapsing, so it is a timeout without touching the wire.
        RequestEnd::Timeout
    } else {
        match stream.factory.make(seq) {
            Err(e) => RequestEnd::RequestError(e.to_string()),
            Ok(request) => {
                let exchange = exchange(&shared.client, request);
                let result = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline.into(), exchange).await,
                    // A timeout too long to represent is no timeout.
                    None => Ok(exchange.await),
                };
                match result {
                    Err(_elapsed) => RequestEnd::Timeout,
                    Ok(Err(message)) => RequestEnd::Transport(message),
                    Ok(Ok(status)) => RequestEnd::Response(status),
                }
            }
        }
    };
    let done = Instant::now();
    stream.record(
        outcome,
        Timing {
            send_lag_us: micros(started.saturating_duration_since(scheduled)),
            latency_us: micros(done.saturating_duration_since(scheduled)),
            in_schedule: shared.start.checked_add(stream.schedule).is_none_or(|end| done <= end),
        },
    );
    // `guard` drops here, after the outcome is recorded: a finished run has
    // every outcome in its counters.
}

/// Sends `request` and reads the whole response body, discarding it.
async fn exchange(client: &HttpClient, request: Request<RequestBody>) -> Result<StatusCode, String> {
    let response = client.request(request).await.map_err(|e| error_chain(&e))?;
    let status = response.status();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| error_chain(&e))?;
    }
    Ok(status)
}

/// "client error (Connect): tcp connect error: Connection refused (os error 111)"
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

// ---------------------------------------------------------------------------
// Snapshots and reports
// ---------------------------------------------------------------------------

/// Figures of a whole run at one moment, one entry per stream in the order
/// the streams were given.
#[derive(Clone, Debug)]
pub struct RunSnapshot {
    /// Time since the run started; for a finished run, until the last
    /// request completed.
    pub elapsed: Duration,
    /// Whether every request has completed, failed or timed out and none is
    /// left to send.
    pub finished: bool,
    /// Per-stream figures.
    pub streams: Vec<StreamSnapshot>,
}

impl RunSnapshot {
    /// The stream called `name`, if any (the first one, if names repeat).
    pub fn stream(&self, name: &str) -> Option<&StreamSnapshot> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// What happened between `earlier` and `self` (both from the same run):
    /// `elapsed` is the interval, and each stream is
    /// [`StreamSnapshot::since`] its namesake in `earlier` (or itself whole
    /// if `earlier` has none).
    pub fn since(&self, earlier: &RunSnapshot) -> RunSnapshot {
        RunSnapshot {
            elapsed: self.elapsed.saturating_sub(earlier.elapsed),
            finished: self.finished,
            streams: self
                .streams
                .iter()
                .enumerate()
                .map(|(index, stream)| {
                    let before = earlier
                        .streams
                        .get(index)
                        .filter(|s| s.name == stream.name)
                        .or_else(|| earlier.stream(&stream.name));
                    match before {
                        Some(before) => stream.since(before),
                        None => stream.clone(),
                    }
                })
                .collect(),
        }
    }
}

impl fmt::Display for RunSnapshot {
    /// A plain-text table, one row per stream, for logs and live displays.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<16} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "stream",
            "sent",
            "2xx",
            "429",
            "503",
            "other",
            "errors",
            "timeout",
            "flight",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        )?;
        for s in &self.streams {
            let latency = s.success_summary();
            let other = s.responses.saturating_sub(s.class_count(2) + s.status_count(429) + s.status_count(503));
            writeln!(
                f,
                "{:<16} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                s.name,
                s.sent,
                s.class_count(2),
                s.status_count(429),
                s.status_count(503),
                other,
                s.transport_errors + s.request_errors,
                s.timeouts,
                s.in_flight(),
                as_ms(latency.p50),
                as_ms(latency.p99),
                as_ms(latency.p999),
                as_ms(latency.max),
            )?;
        }
        write!(f, "elapsed {:.1} s{}", self.elapsed.as_secs_f64(), if self.finished { ", finished" } else { "" })
    }
}

fn as_ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Figures of one stream at one moment.
///
/// Every request issued ends in exactly one of: a response (counted in
/// `responses` and by status), a transport error, a timeout, or a request
/// error; until then it is in flight.
#[derive(Clone, Debug)]
pub struct StreamSnapshot {
    /// Stream name.
    pub name: String,
    /// Requests the whole schedule issues.
    pub planned: u64,
    /// Length of the whole schedule.
    pub schedule: Duration,
    /// Requests issued so far (their scheduled time has come).
    pub sent: u64,
    /// Complete responses (status and whole body), any status.
    pub responses: u64,
    /// Responses completed before the end of the schedule; the basis of
    /// [`StreamSnapshot::achieved_rate`].
    pub responses_in_schedule: u64,
    /// Responses by exact status code; codes never seen are absent.
    pub status_counts: BTreeMap<u16, u64>,
    /// Requests that failed to connect, send or read their response.
    pub transport_errors: u64,
    /// Requests with no complete response within the request timeout of
    /// their scheduled time (including those not even started by then,
    /// which are never sent on the wire).
    pub timeouts: u64,
    /// Requests the factory could not build (never sent on the wire).
    pub request_errors: u64,
    /// The most recent transport or request error message, for diagnosis.
    pub last_error: Option<String>,
    /// Latency (µs from scheduled send time to the end of the response body)
    /// of 2xx responses.
    pub success_latency_us: Histogram<u64>,
    /// Latency (µs, as above) of 429 and 503 responses.
    pub rejected_latency_us: Histogram<u64>,
    /// How late (µs) each request's task started relative to its scheduled
    /// time: the generator's own lag. Large values mean the generator (or the
    /// machine) could not keep up, and latencies include that delay.
    pub send_lag_us: Histogram<u64>,
}

impl StreamSnapshot {
    /// Responses with status `code`.
    pub fn status_count(&self, code: u16) -> u64 {
        self.status_counts.get(&code).copied().unwrap_or(0)
    }

    /// Responses in status class `class` (2 for 2xx, 4 for 4xx, ...).
    pub fn class_count(&self, class: u16) -> u64 {
        self.status_counts.iter().filter(|(code, _)| **code / 100 == class).map(|(_, count)| count).sum()
    }

    /// Transport errors, timeouts and request errors: requests that got no
    /// HTTP response at all.
    pub fn failures(&self) -> u64 {
        self.transport_errors + self.timeouts + self.request_errors
    }

    /// Requests issued and not yet completed, failed or timed out.
    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.responses + self.failures())
    }

    /// Offered rate: planned requests per second of schedule (0 for an empty
    /// schedule).
    pub fn offered_rate(&self) -> f64 {
        per_second(self.planned, self.schedule)
    }

    /// Achieved rate: responses completed within the schedule per second of
    /// schedule. Equals the offered rate, less the few requests still in
    /// flight at the end, when the target keeps up; falls below it when
    /// responses lag behind or requests fail.
    pub fn achieved_rate(&self) -> f64 {
        per_second(self.responses_in_schedule, self.schedule)
    }

    /// Percentiles of 2xx latency.
    pub fn success_summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.success_latency_us)
    }

    /// Percentiles of 429/503 latency.
    pub fn rejected_summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.rejected_latency_us)
    }

    /// Percentiles of the generator's send lag.
    pub fn send_lag_summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.send_lag_us)
    }

    /// What happened between `earlier` and `self` (snapshots of the same
    /// stream): counters, status counts and histograms are differences;
    /// `name`, `planned`, `schedule` and `last_error` are `self`'s.
    pub fn since(&self, earlier: &StreamSnapshot) -> StreamSnapshot {
        let status_counts = self
            .status_counts
            .iter()
            .filter_map(|(code, count)| {
                let delta = count.saturating_sub(earlier.status_count(*code));
                (delta > 0).then_some((*code, delta))
            })
            .collect();
        StreamSnapshot {
            name: self.name.clone(),
            planned: self.planned,
            schedule: self.schedule,
            sent: self.sent.saturating_sub(earlier.sent),
            responses: self.responses.saturating_sub(earlier.responses),
            responses_in_schedule: self.responses_in_schedule.saturating_sub(earlier.responses_in_schedule),
            status_counts,
            transport_errors: self.transport_errors.saturating_sub(earlier.transport_errors),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            request_errors: self.request_errors.saturating_sub(earlier.request_errors),
            last_error: self.last_error.clone(),
            success_latency_us: histogram_since(&self.success_latency_us, &earlier.success_latency_us),
            rejected_latency_us: histogram_since(&self.rejected_latency_us, &earlier.rejected_latency_us),
            send_lag_us: histogram_since(&self.send_lag_us, &earlier.send_lag_us),
        }
    }
}

fn per_second(count: u64, over: Duration) -> f64 {
    let seconds = over.as_secs_f64();
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// `later - earlier`; if they do not subtract (not from the same stream),
/// `later` whole.
fn histogram_since(later: &Histogram<u64>, earlier: &Histogram<u64>) -> Histogram<u64> {
    let mut delta = later.clone();
    match delta.subtract(earlier) {
        Ok(()) => delta,
        Err(_) => later.clone(),
    }
}

/// Percentiles of one latency histogram (all zero when it is empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of values recorded.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest value (to the histogram's 0.1% resolution).
    pub max: Duration,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let at = |quantile: f64| Duration::from_micros(histogram.value_at_quantile(quantile));
        Self {
            count: histogram.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
            self.count,
            as_ms(self.p50),
            as_ms(self.p90),
            as_ms(self.p99),
            as_ms(self.p999),
            as_ms(self.max),
        )
    }
}

#[cfg(test)]
mod tests;

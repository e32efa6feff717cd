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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::runtime::Handle;
use tokio::sync::Notify;

mod report;
mod spec;

pub use report::{LatencySummary, RunSnapshot, StreamSnapshot};
pub use spec::{LoadgenError, LoadgenOptions, Phase, RequestBody, RequestFactory, RequestTemplate, StreamSpec};

/// Significant figures kept by the latency histograms: 0.1% resolution at
/// every magnitude, the usual choice for latency percentiles.
const HISTOGRAM_SIGFIG: u8 = 3;

/// Histograms track at least this much (in microseconds) so that a short
/// request timeout still leaves room for the send lag of an overloaded run.
const MIN_HISTOGRAM_HIGH_US: u64 = 10_000_000;

/// Status codes the `http` crate can represent are 100..=999; one counter
/// each keeps recording a single atomic increment with no map look-up.
const STATUS_SLOTS: usize = 1000;

// ---------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------

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

#[cfg(test)]
mod tests;

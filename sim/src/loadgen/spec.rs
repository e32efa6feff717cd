//! What a run sends and when: request templates and factories, the phases of a stream's
//! schedule, the generator's options, and the errors of setting a run up.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri};
use http_body_util::Full;

/// Body type of generated requests: the whole body is in memory.
pub type RequestBody = Full<Bytes>;

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
    /// [`LoadGenerator::start`](super::LoadGenerator::start) was called outside a tokio runtime.
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
    /// as a [`StreamSnapshot::request_errors`](super::StreamSnapshot::request_errors).
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
    /// (negative or non-finite) rate, which
    /// [`LoadGenerator::start`](super::LoadGenerator::start) rejects.
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
    pub(super) fn offset(&self, index: u64) -> Duration {
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

//! The last stage: one call to the bureau over a pooled keep-alive client.
//!
//! The bureau is the resource everything else protects, so this stage is deliberately plain: it
//! knows nothing about tenants beyond the `x-tenant` header already set, rewrites the target to
//! the configured base URL, bounds the call in time (connect, and `max_call_time`) and in size (the
//! response is buffered up to `max_response_body`, so it can be cached and fanned out later), and
//! turns every failure into a [`ProxyError`] that says the bureau is to blame.
//!
//! An `https://` bureau gets a hyper-rustls connector around the same TCP connector (same
//! connect timeout, `TCP_NODELAY`): the server's certificate is verified against `upstream.tls.ca`
//! (or the built-in roots) and its name against the URL's host, SNI included; there is no switch
//! to turn verification off. bureau-guard's own client certificate, if configured, goes with it.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Response, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::bureau::headers::strip_hop_by_hop;
use crate::config::UpstreamConfig;
use crate::respond::{Body, ErrorKind, ProxyError};
use crate::server::workers;

/// The pooled client: plain TCP, or TLS over it.
#[derive(Debug, Clone)]
enum Pool {
    Http(Client<HttpConnector, Body>),
    Https(Client<HttpsConnector<HttpConnector>, Body>),
}

impl Pool {
    fn request(&self, req: http::Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            Pool::Http(c) => c.request(req),
            Pool::Https(c) => c.request(req),
        }
    }
}

/// A pooled client bound to the bureau's base URL.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// One pool per worker thread (index [`workers::current`]), and one (index 0) for any other
    /// thread: a pooled connection is a task on the runtime that opened it, so a worker uses only
    /// connections its own runtime drives.
    pools: std::sync::Arc<[Pool]>,
    scheme: Scheme,
    authority: Authority,
    /// Path prefix of the base URL without its trailing slash; usually empty.
    prefix: String,
    /// The hard bound on one call (`upstream.max_call_time`); `response_timeout`, the bound on
    /// the client's wait, is the caller's: the call goes on past it, holding its slot.
    max_call_time: Duration,
    max_response_body: usize,
}

impl Upstream {
    /// A client for `cfg` with a pool for each of `workers` worker threads (0: the shared
    /// runtime, one pool) and one for other threads; `upstream.pool_max_idle` is divided among
    /// the workers' pools.
    pub fn new(cfg: &UpstreamConfig, workers: usize) -> Upstream {
        let max_idle = cfg.pool_max_idle.div_ceil(workers.max(1)).max(1);
        let pools = (0..=workers).map(|_| Upstream::pool(cfg, max_idle)).collect();
        let parts = cfg.url.clone().into_parts();
        Upstream {
            pools,
            scheme: parts.scheme.unwrap_or(Scheme::HTTP),
            authority: parts.authority.expect("validated upstream url has a host"),
            prefix: cfg.url.path().trim_end_matches('/').to_string(),
            max_call_time: cfg.max_call_time,
            max_response_body: usize::try_from(cfg.max_response_body).unwrap_or(usize::MAX),
        }
    }

    fn pool(cfg: &UpstreamConfig, max_idle: usize) -> Pool {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(max_idle);
        match &cfg.tls {
            None => Pool::Http(builder.build(connector)),
            Some(tls) => {
                // The TCP connector must accept https URIs; the TLS layer above it handles them.
                connector.enforce_http(false);
                let https = HttpsConnectorBuilder::new()
                    .with_tls_config((*tls.rustls).clone())
                    .https_only()
                    .enable_http1()
                    .wrap_connector(connector);
                Pool::Https(builder.build(https))
            }
        }
    }

    /// This thread's pool.
    fn client(&self) -> &Pool {
        &self.pools[workers::current() % self.pools.len()]
    }

    /// Sends the request (headers already prepared by the proxy) and buffers the response. A call
    /// with no complete answer after `upstream.max_call_time` is cut: its connection is closed
    /// (dropping hyper's future does that) and `BureauTimeout` returned.
    pub async fn send(&self, mut parts: Parts, body: Bytes) -> Result<Response<Body>, ProxyError> {
        parts.uri = self.target(&parts.uri)?;
        // The bureau hop is HTTP/1.1 whatever the client spoke; Host comes from the new URI.
        parts.version = Version::HTTP_11;
        parts.headers.remove(http::header::HOST);
        let req = http::Request::from_parts(parts, Full::new(body));

        let call = async {
            let resp = self.client().request(req).await.map_err(|e| {
                if let Some(tls) = tls_error(&e) {
                    ProxyError::new(
                        ErrorKind::BureauUnreachable,
                        format!("TLS handshake with the bureau failed: {tls}"),
                    )
                } else if e.is_connect() {
                    ProxyError::new(ErrorKind::BureauUnreachable, "cannot connect to the bureau")
                } else {
                    ProxyError::new(
                        ErrorKind::BureauBadResponse,
                        "the bureau closed the connection or sent an invalid response",
                    )
                }
            })?;
            let (mut head, body) = resp.into_parts();
            let bytes = Limited::new(body, self.max_response_body).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::new(
                        ErrorKind::BureauBadResponse,
                        "the bureau's response exceeds upstream.max_response_body",
                    )
                } else {
                    ProxyError::new(ErrorKind::BureauBadResponse, "the bureau's response body was cut off")
                }
            })?;
            strip_hop_by_hop(&mut head.headers);
            Ok(Response::from_parts(head, Full::new(bytes.to_bytes())))
        };
        match tokio::time::timeout(self.max_call_time, call).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::new(
                ErrorKind::BureauTimeout,
                format!("the bureau did not answer within upstream.max_call_time ({:?})", self.max_call_time),
            )),
        }
    }

    /// How many worker threads it has a pool for (0: the shared runtime).
    pub fn workers(&self) -> usize {
        self.pools.len() - 1
    }

    /// Whether this client speaks TLS to the bureau.
    pub fn is_tls(&self) -> bool {
        matches!(self.pools[0], Pool::Https(_))
    }

    fn target(&self, original: &Uri) -> Result<Uri, ProxyError> {
        let pq = original.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let pq = if self.prefix.is_empty() {
            pq
        } else {
            PathAndQuery::try_from(format!("{}{}", self.prefix, pq.as_str()))
                .map_err(|_| ProxyError::new(ErrorKind::BadRequest, "invalid request target"))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::new(ErrorKind::BadRequest, "invalid request target"))
    }
}

/// The rustls error behind a failed bureau call, if TLS is what failed (untrusted certificate,
/// wrong name, client certificate refused): worth saying, as it is a config problem, not an outage.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = e.source();
    while let Some(s) = next {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps (hyper-rustls wraps rustls' in one): step in.
        next = match s.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => s.source(),
        };
    }
    None
}

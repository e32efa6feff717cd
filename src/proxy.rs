//! The request path, assembled in order. Each stage either passes the request on or stops it
//! with a [`ProxyError`]; the order is deliberate: cheap rejections first, the bureau last.
//!
//! ```text
//! limits ─▶ tenant ─▶ route ─▶ body ─▶ forward headers ─▶ upstream ─▶ respond (+ metrics, log)
//! ```
//!
//! Later stages (rate limit, cache, quota, coalesce, fair scheduler) slot in between `route` and
//! `upstream`, each in its own file, in the order of DESIGN.md.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::headers::{X_REQUEST_ID, X_TENANT, strip_hop_by_hop};
use crate::limits;
use crate::respond::{Body, ErrorKind, Outcome, ProxyError, error_response};
use crate::runtime::{Shared, Snapshot};
use crate::tenant::Tenant;

/// The proxy as a tower `Service`: cheap to clone (one `Arc`), one clone per connection.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

/// What the stages learned about a request, kept outside the timed future so that a request cut
/// off by the timeout is still attributed to its tenant and route.
struct Ctx {
    tenant: Option<Arc<Tenant>>,
    /// Index into the metric cells' route labels.
    route: usize,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy { shared }
    }

    /// Answers one request; never fails (errors become JSON responses).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.shared.metrics.requests_in_flight);
        // One load per request: a reload during this request does not change its rules.
        let snap = self.shared.snapshot.load_full();
        let request_id = self.shared.ids.for_request(req.headers());
        let mut ctx = Ctx { tenant: None, route: snap.cells.route_none() };

        let timeout = snap.limits.request_timeout;
        let result = match tokio::time::timeout(timeout, self.stages(&snap, &mut ctx, req, &request_id)).await {
            Ok(result) => result,
            Err(_) => {
                Err(ProxyError::new(ErrorKind::RequestTimeout, format!("request not completed within {timeout:?}")))
            }
        };
        let (mut resp, outcome) = match result {
            Ok(resp) => (resp, Outcome::Bureau),
            Err(err) => (error_response(&err, ctx.tenant.as_ref().map(|t| &t.id)), Outcome::Rejected(err.kind)),
        };
        resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());

        let elapsed = started.elapsed();
        let tenant_index = ctx.tenant.as_ref().map(|t| t.index);
        snap.cells.record(&self.shared.metrics, tenant_index, ctx.route, outcome, elapsed.as_secs_f64());
        if snap.limits.access_log {
            // Never the key, the path (it may hold a subject id) or a body.
            tracing::info!(
                target: "bureau_guard::access",
                tenant = ctx.tenant.as_ref().map_or(crate::metrics::NONE_LABEL, |t| &*t.id),
                route = snap.cells.route_label(ctx.route),
                status = resp.status().as_u16(),
                outcome = outcome.as_str(),
                latency_us = elapsed.as_micros() as u64,
                request_id = request_id.to_str().unwrap_or(""),
            );
        }
        resp
    }

    async fn stages(
        &self,
        snap: &Snapshot,
        ctx: &mut Ctx,
        req: Request<Incoming>,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = req.into_parts();

        // Limits first: refusing an oversized head costs nothing and needs no identity.
        limits::check_head(&parts, snap.limits.max_header_bytes, snap.limits.max_body)?;

        // Tenant before route: an unidentified caller learns nothing about which paths exist.
        let tenant = snap.tenants.identify(&mut parts.headers)?.clone();
        ctx.tenant = Some(tenant.clone());

        // Route: names the request for metrics and (later) picks its cost and cache policy.
        match snap.route_table.find(&parts.method, parts.uri.path()) {
            Some(m) => ctx.route = m.index,
            None if snap.limits.pass_unmatched => ctx.route = snap.cells.route_passthrough(),
            None => {
                return Err(ProxyError::new(
                    ErrorKind::RouteNotFound,
                    format!("no route for {} {}", parts.method, parts.uri.path()),
                ));
            }
        }

        // Body: read only for identified, routed requests, and bounded.
        let body = limits::read_body(body, snap.limits.max_body).await?;

        // Forward headers: the bureau sees who asked and which request this is, never the key.
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(&X_TENANT, tenant.header_value.clone());
        parts.headers.insert(&X_REQUEST_ID, request_id.clone());

        // Upstream: the bureau is touched last.
        snap.upstream.send(parts, body).await
    }
}

impl tower::Service<Request<Incoming>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move { Ok(proxy.handle(req).await) })
    }
}

/// Counts a request in `bureau_guard_requests_in_flight` for as long as it lives.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> InFlight<'a> {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

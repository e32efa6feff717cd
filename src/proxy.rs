//! The request path, assembled in order. Each stage either passes the request on or stops it
//! with a [`ProxyError`]; the order is deliberate: cheap rejections first, the bureau last.
//!
//! ```text
//! limits ─▶ tenant ─▶ route ─▶ ratelimit (rate, in-flight) ─▶ body ─▶ cache_key ─▶ cache ──hit──▶ respond
//!        ─▶ quota (reserve) ─▶ coalesce (join or lead) ─▶ scheduler (a fair share of the bureau)
//!        ─▶ forward headers ─▶ upstream (quota committed) ─▶ fill cache, fan out
//!        ─▶ respond (+ stale-if-error, audit, RateLimit fields, metrics, log)
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::audit::Record;
use crate::cache::{self, CacheStatus, Entry, Fetched, Lookup};
use crate::cache_key::{CacheKey, KeyError};
use crate::coalesce::Role;
use crate::headers::{X_REQUEST_ID, X_TENANT, strip_hop_by_hop};
use crate::limits;
use crate::quota::{self, Exhausted, Windows, retry_after_secs};
use crate::ratelimit::{InFlightGuard, RateDecision};
use crate::redis_state::Budget;
use crate::respond::{Body, ErrorKind, Outcome, ProxyError, RateLimitState, error_response};
use crate::runtime::{Shared, Snapshot};
use crate::scheduler::{Ask, ShedReason};
use crate::tenant::Tenant;
use crate::tls::ClientCert;

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The proxy as a tower `Service`: cheap to clone (two `Arc`s), one clone per connection.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    /// The connection's verified client certificate (mTLS), if it presented one.
    client_cert: Option<Arc<ClientCert>>,
}

/// What the stages learned about a request, kept outside the timed future so that a request cut
/// off by the timeout is still attributed to its tenant and route.
struct Ctx {
    tenant: Option<Arc<Tenant>>,
    /// Index into the metric cells' route labels.
    route: usize,
    /// The rate decision, for the `RateLimit` response field.
    rate: Option<RateDecision>,
    /// The quota windows the request was counted in.
    windows: Option<Windows>,
    /// The look-up's keyed hash (routes with a `cache_key`): the audit's subject.
    subject: Option<CacheKey>,
    /// An expired entry within `stale_if_error`, to answer with if the bureau fails.
    stale: Option<Arc<Entry>>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy { shared, client_cert: None }
    }

    /// The service for one TLS connection whose client presented `client_cert` (verified).
    pub fn for_connection(shared: Arc<Shared>, client_cert: Option<Arc<ClientCert>>) -> Proxy {
        Proxy { shared, client_cert }
    }

    /// Answers one request; never fails (errors become JSON responses).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.shared.metrics.requests_in_flight);
        // One load per request: a reload during this request does not change its rules.
        let snap = self.shared.snapshot.load_full();
        let request_id = self.shared.ids.for_request(req.headers());
        let http1 = req.version() == http::Version::HTTP_11;
        let mut ctx =
            Ctx { tenant: None, route: snap.cells.route_none(), rate: None, windows: None, subject: None, stale: None };

        let timeout = snap.limits.request_timeout;
        let result = match tokio::time::timeout(timeout, self.stages(&snap, &mut ctx, req, &request_id)).await {
            Ok(result) => result,
            Err(_) => {
                Err(ProxyError::new(ErrorKind::RequestTimeout, format!("request not completed within {timeout:?}")))
            }
        };
        let (mut resp, mut outcome) = match result {
            // Stale-if-error: the bureau failed (or was too slow, or out of capacity) and an
            // expired answer within the route's window is better than an error.
            Ok((resp, _)) if cache::stale_may_replace(resp.status()) && ctx.stale.is_some() => self.stale(&ctx),
            Err(err) if cache::stale_may_answer(err.kind) && ctx.stale.is_some() => self.stale(&ctx),
            Ok(answer) => answer,
            Err(err) => (error_response(&err, ctx.tenant.as_ref().map(|t| &t.id)), Outcome::Rejected(err.kind)),
        };
        // Audit: every answer carrying bureau data, attributed to the tenant that received it.
        if let (Some(audit), Some(tenant)) = (&self.shared.audit, &ctx.tenant)
            && matches!(outcome, Outcome::Bureau | Outcome::CacheHit | Outcome::Coalesced | Outcome::Stale)
        {
            let record = Record {
                unix_ms: self.shared.clock.now_unix_ms(),
                tenant: tenant.id.clone(),
                route: snap
                    .routes
                    .get(ctx.route)
                    .map_or_else(|| Arc::from(snap.cells.route_label(ctx.route)), |r| r.name.clone()),
                subject: ctx.subject,
                outcome,
                status: resp.status().as_u16(),
                request_id: request_id.clone(),
            };
            if let Err(err) = audit.admit().and_then(|()| audit.record(record)) {
                resp = error_response(&err, Some(&tenant.id));
                outcome = Outcome::Rejected(err.kind);
            }
        }
        resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());
        if http1 {
            resp.headers_mut().insert(&KEEP_ALIVE, self.shared.keep_alive.clone());
        }
        if let Some(tenant) = &ctx.tenant {
            self.ratelimit_fields(&snap, tenant, &ctx, resp.headers_mut());
        }

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

    fn stale(&self, ctx: &Ctx) -> (Response<Body>, Outcome) {
        let entry = ctx.stale.as_ref().expect("checked by the caller");
        (entry.response(tokio::time::Instant::now(), CacheStatus::Stale), Outcome::Stale)
    }

    async fn stages(
        &self,
        snap: &Arc<Snapshot>,
        ctx: &mut Ctx,
        req: Request<Incoming>,
        request_id: &HeaderValue,
    ) -> Result<(Response<Body>, Outcome), ProxyError> {
        let (mut parts, body) = req.into_parts();

        // Limits first: refusing an oversized head costs nothing and needs no identity.
        limits::check_head(&parts, snap.limits.max_header_bytes, snap.limits.max_body)?;

        // Tenant before route: an unidentified caller learns nothing about which paths exist.
        // A client certificate names the tenant itself; a key on top of it must agree.
        let tenant = match &self.client_cert {
            Some(cert) => snap.tenants.identify_with_cert(cert, &mut parts.headers)?,
            None => snap.tenants.identify(&mut parts.headers)?,
        }
        .clone();
        ctx.tenant = Some(tenant.clone());

        // Route: names the request for metrics, gives its cost and its cache policy.
        let matched = snap.route_table.find(&parts.method, parts.uri.path());
        let (cost, caching, params) = match matched {
            Some(m) => {
                ctx.route = m.index;
                let route = &snap.routes[m.index];
                (route.cost, route.cache.as_ref(), Some(m.params))
            }
            None if snap.limits.pass_unmatched => {
                ctx.route = snap.cells.route_passthrough();
                (1, None, None)
            }
            None => {
                return Err(ProxyError::new(
                    ErrorKind::RouteNotFound,
                    format!("no route for {} {}", parts.method, parts.uri.path()),
                ));
            }
        };

        // With Redis: what this request may still wait for it, over all its limits.
        let mut redis_budget = self.shared.redis.as_ref().map_or(Budget::ZERO, |r| r.budget());

        // Rate: every request of the tenant pays, cache hits included; it shapes the tenant's pace.
        if let Some(rate) = &tenant.rate {
            let decision = match &self.shared.redis {
                None => rate.check(&tenant.state.rate_tat, crate::ratelimit::now_ns(), cost),
                Some(redis) => redis.rate(&mut redis_budget, &tenant, rate, cost).await?,
            };
            ctx.rate = Some(decision);
            if let RateDecision::Limited { retry_after } = decision {
                let err = ProxyError::new(
                    ErrorKind::RateLimited,
                    format!("over {} requests/s (burst {})", rate.rate, rate.burst),
                )
                .retry_after(retry_after_secs(retry_after));
                self.over_limit(snap, &tenant, err, tenant.limits.dry_run.rate)?;
            }
        }

        // In flight: the tenant's share of bureau-guard itself; a guard, so every exit releases it.
        let _in_flight = match (&self.shared.redis, tenant.limits.max_in_flight) {
            // Shared with other replicas: counted here, held as a slot in Redis.
            (Some(redis), Some(max)) => {
                let (guard, _) = InFlightGuard::enter(&tenant.state, None, false).expect("no max: always enters");
                if redis.in_flight(&mut redis_budget, &tenant, max).await? {
                    self.over_limit(snap, &tenant, self.in_flight_error(&tenant), tenant.limits.dry_run.in_flight)?;
                }
                guard
            }
            _ => {
                match InFlightGuard::enter(&tenant.state, tenant.limits.max_in_flight, !tenant.limits.dry_run.in_flight)
                {
                    Ok((guard, over)) => {
                        if over {
                            self.over_limit(snap, &tenant, self.in_flight_error(&tenant), true)?;
                        }
                        guard
                    }
                    Err(_) => {
                        return Err(self.over_limit(snap, &tenant, self.in_flight_error(&tenant), false).unwrap_err());
                    }
                }
            }
        };

        // Body: read only for identified, admitted requests, and bounded.
        let body = limits::read_body(body, snap.limits.max_body).await?;

        // Cache key: a keyed hash of what identifies the look-up, scoped to the tenant unless the
        // route is shared; a body that should be JSON and is not never reaches the bureau.
        let key = match (caching, &params) {
            (Some(c), Some(params)) => {
                match c.key.key(&snap.key_secret, &tenant.id, params, parts.uri.query(), &body) {
                    Ok(key) => Some(key),
                    Err(KeyError::InvalidJson(why)) => {
                        return Err(ProxyError::new(ErrorKind::BadRequest, format!("the body must be JSON: {why}")));
                    }
                    // A look-up that cannot be named exactly is neither cached nor coalesced.
                    Err(_) => None,
                }
            }
            _ => None,
        };
        drop(params);
        ctx.subject = key;

        // Cache: a fresh answer costs the bureau nothing (and the tenant no quota); an expired
        // one within `stale_if_error` is kept aside in case the bureau fails below.
        let policy = caching.and_then(|c| c.policy.clone());
        if let (Some(key), Some(_)) = (&key, &policy) {
            match self.shared.cache.lookup(key).await {
                Lookup::Fresh(entry) => {
                    return Ok((entry.response(tokio::time::Instant::now(), CacheStatus::Hit), Outcome::CacheHit));
                }
                Lookup::Stale(entry) => ctx.stale = Some(entry),
                Lookup::Miss => {}
            }
        }

        // Audit (fail-closed only): an answer that could not be audited must not cost the bureau
        // a call or the tenant a unit of quota; refuse before either.
        if let Some(audit) = &self.shared.audit {
            audit.admit()?;
        }

        // Quota: reserve a bureau call now, charge it only when the call is made (below).
        let windows = Windows::at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset);
        ctx.windows = Some(windows);
        let reserved = match &self.shared.redis {
            None => quota::reserve(&tenant.state, &tenant.limits, &windows),
            Some(redis) => {
                redis.reserve(&mut redis_budget, &tenant, &windows, self.shared.clock.now_unix_ms() / 1000).await?
            }
        };
        let reservation = match reserved {
            Ok(reserved) => {
                if let Some(hit) = reserved.dry_run_hit {
                    self.over_limit(snap, &tenant, quota_error(hit), true)?;
                }
                reserved.reservation
            }
            Err(exhausted) => {
                let err = quota_error(exhausted);
                return Err(self.over_limit(snap, &tenant, err, false).unwrap_err());
            }
        };

        let ctx_tenant = tenant.id.clone();
        let call = BureauCall { shared: self.shared.clone(), snap: snap.clone(), tenant, cost, reservation };
        let Some(key) = key.filter(|_| policy.is_some() || caching.is_some_and(|c| c.coalesce)) else {
            // Neither cached nor coalesced: the call belongs to this request (a client that goes
            // away while queued leaves the queue without taking a slot).
            let resp = call.run(parts, body, request_id.clone()).await?;
            return Ok((resp, Outcome::Bureau));
        };

        // The call is detached from this request: it fills the cache, and when coalescing, every
        // identical request that arrives meanwhile joins it instead of calling the bureau again.
        let route = snap.routes[ctx.route].name.clone();
        let ticket = self.shared.cache.ticket();
        let (id, shared) = (request_id.clone(), self.shared.clone());
        let fetch = async move {
            let tenant_id = call.tenant.id.clone();
            let resp = call.run(parts, body, id).await?;
            let mut fetched = Fetched::from_response(resp).await;
            fetched.fetched_for = Some(tenant_id.clone());
            let fetched = Arc::new(fetched);
            if let Some(policy) = &policy {
                shared.cache.store(ticket, key, &fetched, policy, &tenant_id, &route).await;
            }
            Ok(fetched)
        };
        if caching.is_some_and(|c| c.coalesce) {
            let deadline = tokio::time::Instant::now() + snap.limits.request_timeout;
            let (fetched, role) = self.shared.coalescer.run(key, deadline, move || fetch).await?;
            Ok(match role {
                Role::Leader => (fetched.response(CacheStatus::Miss), Outcome::Bureau),
                // On a shared route an answer the bureau marked private (or that sets a cookie)
                // still belongs to the tenant that fetched it: another tenant retries for its own.
                Role::Follower
                    if fetched.private_to_requester() && fetched.fetched_for.as_deref() != Some(&*ctx_tenant) =>
                {
                    return Err(ProxyError::new(
                        ErrorKind::BureauBusy,
                        "the identical look-up in flight was answered privately for another institution; retry",
                    )
                    .retry_after(1));
                }
                Role::Follower => (fetched.response(CacheStatus::Coalesced), Outcome::Coalesced),
            })
        } else {
            let fetched = fetch.await?;
            Ok((fetched.response(CacheStatus::Miss), Outcome::Bureau))
        }
    }

    fn in_flight_error(&self, tenant: &Tenant) -> ProxyError {
        let max = tenant.limits.max_in_flight.unwrap_or(0);
        ProxyError::new(ErrorKind::TooManyInFlight, format!("more than {max} requests in flight")).retry_after(1)
    }

    /// A request over one of its tenant's limits: counted, and refused unless `dry_run`, in
    /// which case it is logged and let through.
    fn over_limit(&self, snap: &Snapshot, tenant: &Tenant, err: ProxyError, dry_run: bool) -> Result<(), ProxyError> {
        snap.cells.record_limit(&self.shared.metrics, tenant.index, err.kind, dry_run);
        if dry_run {
            tracing::info!(target: "bureau_guard::dry_run", tenant = &*tenant.id, reason = err.kind.code(), "limit exceeded (dry run: not enforced)");
            Ok(())
        } else {
            Err(err)
        }
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for the tenant.
    fn ratelimit_fields(&self, snap: &Snapshot, tenant: &Tenant, ctx: &Ctx, headers: &mut http::HeaderMap) {
        let Some(policy) = &tenant.policy_header else { return };
        let w =
            ctx.windows.unwrap_or_else(|| Windows::at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset));
        let l = &tenant.limits;
        let state = RateLimitState {
            rate: ctx.rate.map(|d| match d {
                RateDecision::Allowed { remaining, reset } => (u64::from(remaining), reset.as_secs_f64().ceil() as u64),
                RateDecision::Limited { retry_after } => (0, retry_after_secs(retry_after)),
            }),
            daily: l.daily_quota.map(|q| (q.saturating_sub(tenant.state.daily.get(w.day)), w.day_resets_in_s)),
            monthly: l
                .monthly_quota
                .map(|q| (q.saturating_sub(tenant.state.monthly.get(w.month)), w.month_resets_in_s)),
        };
        headers.insert(&RATELIMIT_POLICY, policy.clone());
        if let Some(v) = state.header() {
            headers.insert(&RATELIMIT, v);
        }
    }
}

/// One bureau call with everything it needs, owned, so it can run detached from the request
/// that started it (coalescing) as well as inline.
struct BureauCall {
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    tenant: Arc<Tenant>,
    cost: u32,
    reservation: quota::Reservation,
}

impl BureauCall {
    /// Fair share, then the bureau. Slots go to tenants by weighted fair queuing, so a surge
    /// lengthens only the surging tenant's queue; a request that cannot get a slot in time is
    /// shed here, before it can add to the bureau's load. The quota is charged only once the
    /// call is really made; the permit is held for the call and released on every exit.
    async fn run(
        self,
        mut parts: http::request::Parts,
        body: bytes::Bytes,
        request_id: HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let BureauCall { shared, snap, tenant, cost, reservation } = self;
        let queued_at = tokio::time::Instant::now();
        let ask = Ask {
            tenant: tenant.state.index,
            weight: tenant.weight,
            cost,
            max_queue: tenant.limits.max_queue,
            deadline: queued_at + snap.config.upstream.queue_timeout,
        };
        let cells = snap.cells.tenant(&shared.metrics, tenant.index);
        let permit = match shared.scheduler.acquire(ask).await {
            Ok(permit) => permit,
            Err(shed) => {
                let message = match shed.reason {
                    ShedReason::QueueFull => {
                        cells.shed_queue_full.inc();
                        format!(
                            "the bureau is at capacity and {} of your requests are already waiting",
                            tenant.limits.max_queue
                        )
                    }
                    ShedReason::QueueTimeout => {
                        cells.shed_queue_timeout.inc();
                        format!("no bureau slot within {:?}", snap.config.upstream.queue_timeout)
                    }
                };
                return Err(
                    ProxyError::new(ErrorKind::BureauBusy, message).retry_after(retry_after_secs(shed.retry_after))
                );
            }
        };
        let called_at = tokio::time::Instant::now();
        cells.queue_wait.observe((called_at - queued_at).as_secs_f64());

        // Forward headers: the bureau sees who asked and which request this is, never the key.
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(&X_TENANT, tenant.header_value.clone());
        parts.headers.insert(&X_REQUEST_ID, request_id);

        // Upstream: the bureau is touched last. The call counts against the quota unless it
        // never reached the bureau (no connection, or a target that could not be built).
        let result = snap.upstream.send(parts, body).await;
        match &result {
            Err(e) if matches!(e.kind, ErrorKind::BureauUnreachable | ErrorKind::BadRequest) => drop(reservation),
            _ => reservation.commit(),
        }
        let latency = called_at.elapsed();
        shared.metrics.bureau_duration_seconds.observe(latency.as_secs_f64());
        if let Ok(resp) = &result {
            let class = usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1;
            shared.metrics.bureau_responses[class].inc();
        }
        // The latency and outcome feed the adaptive limit.
        use crate::adaptive::Signal;
        let signal = result.as_ref().map_or(Signal::Error, |r| Signal::of_response(r.status(), r.headers()));
        permit.complete(latency, signal);
        result
    }
}

fn quota_error(e: Exhausted) -> ProxyError {
    match e {
        Exhausted::Daily { limit, retry_after_s } => {
            ProxyError::new(ErrorKind::DailyQuotaExhausted, format!("daily quota of {limit} bureau calls used up"))
                .retry_after(retry_after_s)
        }
        Exhausted::Monthly { limit, retry_after_s } => {
            ProxyError::new(ErrorKind::MonthlyQuotaExhausted, format!("monthly quota of {limit} bureau calls used up"))
                .retry_after(retry_after_s)
        }
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

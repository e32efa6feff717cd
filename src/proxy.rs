//! The request path, assembled in order. Each stage either passes the request on or stops it
//! with a [`ProxyError`]; the order is deliberate: cheap rejections first, the bureau last.
//!
//! ```text
//! limits ─▶ tenant ─▶ route ─▶ ratelimit (rate, in-flight) ─▶ body ─▶ cache_key ─▶ cache ──hit──▶ respond
//!        ─▶ quota (reserve) ─▶ coalesce (join or lead) ─▶ scheduler (a fair share of the bureau)
//!        ─▶ forward headers ─▶ usage charge on disk ─▶ upstream (quota committed) ─▶ fill cache, fan out
//!        ─▶ respond (+ stale-if-error, audit, usage, RateLimit fields, metrics, log)
//! ```
//!
//! The bureau call itself (breaker, scheduler, headers, upstream, charge) is a stage of its own:
//! `bureau/call.rs`.

use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderName;
use http::{Request, Response};

use crate::admission::backend::Admission;
use crate::admission::contract::Contract;
use crate::admission::limits;
use crate::admission::quota::{Reservations, Windows, retry_after_secs};
use crate::admission::ratelimit::{InFlightGuards, RateDecision};
use crate::admission::tenant::Tenant;
use crate::admission::verdict::{self, Mode, Reason, Refusal, Scope};
use crate::bureau::call::{Answer, Attribution, BureauCall, Keep, Store};
use crate::bureau::headers::{RequestId, SourceFields, X_CLIENT_REQUEST_ID, X_REQUEST_ID};
use crate::cache::audit::Record;
use crate::cache::coalesce::{CoalesceError, Interest, Role};
use crate::cache::key::{CacheKey, KeyError};
use crate::cache::store::{self, CacheStatus, Entry, Lookup};
use crate::respond::{Body, ErrorKind, Outcome, ProxyError, RateLimitState, error_response};
use crate::runtime::{Shared, Snapshot};
use crate::server::{ClientAddr, Peer};
use crate::tls::ClientCert;
use crate::usage::Column;

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The proxy, one per connection (served through `tower::service_fn` in `app.rs`): cheap to
/// clone (two `Arc`s), one clone per request.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    /// The connection's verified client certificate (mTLS), if it presented one.
    client_cert: Option<Arc<ClientCert>>,
    /// The connection's addresses (`None` when not served from a listener, e.g. `oneshot`).
    client: Option<ClientAddr>,
    /// The peer's address as the bureau is told it, formatted once for the connection.
    peer_fields: Option<Arc<SourceFields>>,
}

/// What the stages learned about a request, kept outside the timed future so that a request cut
/// off by the timeout is still attributed to its tenant and route.
struct Ctx {
    tenant: Option<Arc<Tenant>>,
    /// Index into the metric cells' route labels.
    route: usize,
    /// The rate decision of each contract (tenant, route, group), for the `RateLimit` field.
    rate: [Option<RateDecision>; 3],
    /// The quota windows the request was counted in.
    windows: Option<Windows>,
    /// The look-up's keyed hash (routes with a `cache_key`): the audit's subject.
    subject: Option<CacheKey>,
    /// An expired entry within `stale_if_error`, to answer with if the bureau fails.
    stale: Option<Arc<Entry>>,
    /// The request id of the bureau call whose answer this request received without a call of
    /// its own (cache hit, coalesced; stale from `stale`): the audit's `rode_on`.
    rode_on: Option<http::HeaderValue>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy { shared, client_cert: None, client: None, peer_fields: None }
    }

    /// The service for one connection: its addresses, and the client certificate it presented
    /// (verified), if any.
    pub fn for_connection(shared: Arc<Shared>, peer: &Peer) -> Proxy {
        let peer_fields = Some(Arc::new(SourceFields::new(peer.addr.client.ip())));
        Proxy { shared, client_cert: peer.client_cert.clone(), client: Some(peer.addr), peer_fields }
    }

    /// Answers one request; never fails (errors become JSON responses). Generic over the body
    /// (monomorphised, nothing boxed): hyper's `Incoming` when served from a listener, a
    /// `http_body_util::Full` when a test drives it in-process with `ServiceExt::oneshot`.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.shared.metrics.requests_in_flight);
        // One load per request: a reload during this request does not change its rules.
        let snap = self.shared.snapshot.load_full();
        let request_id = self.shared.ids.for_request(req.headers());
        let http1 = req.version() == http::Version::HTTP_11;
        let mut ctx = Ctx {
            tenant: None,
            route: snap.cells.route_none(),
            rate: [None; 3],
            windows: None,
            subject: None,
            stale: None,
            rode_on: None,
        };

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
            Ok((resp, _)) if store::stale_may_replace(resp.status()) && ctx.stale.is_some() => self.stale(&ctx),
            Err(err) if store::stale_may_answer(err.kind) && ctx.stale.is_some() => self.stale(&ctx),
            Ok(answer) => answer,
            Err(err) => (error_response(&err, ctx.tenant.as_ref().map(|t| &t.id)), Outcome::Rejected(err.kind)),
        };
        if outcome == Outcome::Stale {
            ctx.rode_on = ctx.stale.as_ref().and_then(|e| e.response.fetched_by.clone());
        }
        // Audit: every answer carrying bureau data, attributed to the tenant that received it.
        if let (Some(audit), Some(tenant)) = (&self.shared.audit, &ctx.tenant)
            && matches!(outcome, Outcome::Bureau | Outcome::CacheHit | Outcome::Coalesced | Outcome::Stale)
        {
            let record = Record {
                unix_ms: self.shared.clock.now_unix_ms(),
                tenant: tenant.id.clone(),
                route: snap.route_name(ctx.route),
                subject: ctx.subject,
                outcome,
                status: resp.status().as_u16(),
                request_id: request_id.id.clone(),
                client_request_id: request_id.client.clone(),
                rode_on: ctx.rode_on.take().filter(|_| outcome != Outcome::Bureau),
            };
            if let Err(err) = audit.admit().and_then(|()| audit.record(record)) {
                resp = error_response(&err, Some(&tenant.id));
                outcome = Outcome::Rejected(err.kind);
            }
        }
        // Usage: what the tenant received without a bureau call of its own, or was refused
        // (the bureau calls themselves are counted where they are charged, `bureau/call.rs`).
        if let Some(tenant) = &ctx.tenant {
            let column = match outcome {
                Outcome::CacheHit => Some(Column::CacheHits),
                Outcome::Coalesced => Some(Column::Coalesced),
                Outcome::Stale => Some(Column::Stale),
                Outcome::Rejected(kind) => Some(Column::Refused(kind)),
                Outcome::Bureau | Outcome::Abandoned => None,
            };
            if let Some(column) = column {
                let day = ctx.windows.map_or_else(
                    || crate::usage::day_at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset),
                    |w| w.day,
                );
                self.shared.usage.record(day, &tenant.id, &snap.route_name(ctx.route), column);
            }
        }
        resp.headers_mut().insert(&X_REQUEST_ID, request_id.id.clone());
        if let Some(client) = &request_id.client {
            resp.headers_mut().insert(&X_CLIENT_REQUEST_ID, client.clone());
        }
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
                tenant = ctx.tenant.as_ref().map_or(crate::ops::metrics::NONE_LABEL, |t| &*t.id),
                route = snap.cells.route_label(ctx.route),
                status = resp.status().as_u16(),
                outcome = outcome.as_str(),
                latency_us = elapsed.as_micros() as u64,
                request_id = request_id.id.to_str().unwrap_or(""),
            );
        }
        resp
    }

    fn stale(&self, ctx: &Ctx) -> (Response<Body>, Outcome) {
        let entry = ctx.stale.as_ref().expect("checked by the caller");
        (entry.response(tokio::time::Instant::now(), CacheStatus::Stale), Outcome::Stale)
    }

    async fn stages<B>(
        &self,
        snap: &Arc<Snapshot>,
        ctx: &mut Ctx,
        req: Request<B>,
        request_id: &RequestId,
    ) -> Result<(Response<Body>, Outcome), ProxyError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut parts, body) = req.into_parts();

        // Limits first: refusing an oversized head costs nothing and needs no identity.
        limits::check_head(&parts, snap.limits.max_header_bytes, snap.limits.max_body)?;

        // Tenant before route: an unidentified caller learns nothing about which paths exist.
        // A client certificate names the tenant itself; a key on top of it must agree.
        let source = self.client.map(|c| self.shared.trusted_proxies.source(c.client.ip(), &parts.headers));
        let identified = match &self.client_cert {
            Some(cert) => snap.tenants.identify_with_cert(cert, &mut parts.headers),
            None => snap.tenants.identify(&mut parts.headers),
        };
        // A source that keeps failing authentication is held off: its failures are answered 429
        // for a while. Only its failures: a bank identified from the same address (behind the
        // same NAT or load balancer) is never locked out by someone else's bad keys.
        if let (Err(err), Some(source)) = (&identified, source) {
            self.shared.auth_failures.admit(source)?;
            self.shared.auth_failures.record(source, err);
        }
        let tenant = identified?.clone();
        ctx.tenant = Some(tenant.clone());

        // Path: normalised once, here, and ambiguity refused; route, cost, cache key, audit and
        // the bureau all see this one target (nearly always already normal: nothing is copied).
        match crate::route::path::normalize(&parts.uri) {
            Ok(None) => {}
            Ok(Some(normal)) => {
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                uri.path_and_query = Some(normal);
                parts.uri = http::Uri::from_parts(uri)
                    .map_err(|_| ProxyError::new(ErrorKind::BadRequest, "invalid request target"))?;
            }
            Err(why) => return Err(ProxyError::new(ErrorKind::BadRequest, why.message())),
        }

        // Route: names the request for metrics, gives its cost and its cache policy.
        let matched = snap.route_table.find(&parts.method, parts.uri.path());
        let (cost, caching, params, route_level) = match matched {
            Some(m) => {
                ctx.route = m.index;
                let route = &snap.routes[m.index];
                (route.cost, route.cache.as_ref(), Some(m.params), snap.config.priority.routes[m.index])
            }
            None if snap.limits.pass_unmatched => {
                ctx.route = snap.cells.route_passthrough();
                (1, None, None, None)
            }
            None => {
                return Err(ProxyError::new(
                    ErrorKind::RouteNotFound,
                    format!("no route for {} {}", parts.method, parts.uri.path()),
                ));
            }
        };

        // Priority: the level the call queues in for a bureau slot. Consumed here, never sent on.
        let level = snap.level_slot(crate::route::priority::level(
            &snap.config.priority,
            tenant.index,
            route_level,
            &mut parts.headers,
        )?);
        // Deadline: how long the client will wait, if it says (consumed; the bureau is told
        // what is left of it).
        let deadline = crate::route::deadline::take(&mut parts.headers, tokio::time::Instant::now())?;

        // Admission: local counters, or (with Redis) leases shared with the other replicas,
        // and what this request may still wait for Redis over all its limits.
        let mut admission = Admission::new(self.shared.redis.as_ref());

        // Contracts: the tenant's, its route's (`[tenants.routes.NAME]`), its group's; a request
        // must pass each, and what one refuses costs the others nothing.
        let contracts = tenant.contracts(ctx.route);

        // Rate: every request of the tenant pays, cache hits included; it shapes the tenant's pace.
        self.admit_rate(snap, &tenant, &contracts, cost, &mut admission, ctx).await?;

        // In flight: the tenant's share of bureau-guard itself; guards, so every exit releases
        // them (a bureau call takes them along: released when the bureau has answered).
        let mut in_flight = InFlightGuards::default();
        for (k, c) in contracts.iter().enumerate() {
            // The tenant's own count is kept even without a limit (the admin view shows it).
            let Some(c) = c.filter(|c| k == 0 || c.limits.max_in_flight.is_some()) else { continue };
            in_flight.0[k] = Some(self.admit(snap, &tenant, c, admission.in_flight(c).await?)?);
        }

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
                    ctx.rode_on = entry.response.fetched_by.clone();
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
        let now_unix_ms = self.shared.clock.now_unix_ms();
        let windows = Windows::at(now_unix_ms, snap.config.quota.utc_offset);
        ctx.windows = Some(windows);
        let mut reservation = Reservations::default();
        for (k, c) in contracts.iter().enumerate() {
            // A refusal here drops the reservations before it: given back.
            let Some(c) = c.filter(|c| k == 0 || c.limits.daily_quota.is_some() || c.limits.monthly_quota.is_some())
            else {
                continue;
            };
            let held = admission.reserve(c, &windows, now_unix_ms / 1000).await?;
            reservation.0[k] = Some(self.admit(snap, &tenant, c, held)?);
        }

        let ctx_tenant = tenant.id.clone();
        let route = snap.routes.get(ctx.route).map(|r| r.name.clone());
        let response_timeout = snap.config.upstream.response_timeout;
        let call = BureauCall {
            who: Attribution {
                shared: self.shared.clone(),
                snap: snap.clone(),
                tenant,
                route: ctx.route,
                subject: key,
                request_id: request_id.clone(),
            },
            source: source.map(|ip| SourceFields::of(self.peer_fields.as_ref(), ip)),
            cost,
            level,
            flight: None,
            deadline,
            reservation,
            in_flight,
        };
        // What the answer is kept as: a cached route stores it (taking the purge ticket before
        // the call), a coalesced one shares it; both need it buffered.
        let store = match (key, policy, route) {
            (Some(key), Some(policy), Some(route)) => {
                Some(Store { ticket: self.shared.cache.ticket(), key, policy, route })
            }
            _ => None,
        };
        let Some(key) = key.filter(|_| caching.is_some_and(|c| c.coalesce)) else {
            // Not coalesced: the call is this request's until it has a bureau slot (a client
            // that goes away while queued leaves the queue and costs nothing); from then on it
            // runs to its end with or without its client.
            let keep = match store {
                Some(store) => Keep::Fetched(Some(store)),
                None => Keep::Plain,
            };
            let granted = call.queue().await?;
            let respond_by = tokio::time::Instant::now() + response_timeout;
            let answer = match tokio::time::timeout_at(respond_by, granted.send(parts, body, keep)).await {
                Ok(done) => done.answer?,
                // Dropping the call's future detached it: it keeps its slot until the bureau answers.
                Err(_) => return Err(bureau_timeout(response_timeout)),
            };
            return Ok(match answer {
                Answer::Plain(resp) => (resp, Outcome::Bureau),
                Answer::Fetched(fetched) => (fetched.response(CacheStatus::Miss), Outcome::Bureau),
            });
        };

        // A flight serves whoever joins it, so it runs to the queue's own deadline, not the
        // leader's: one client's short deadline must not shed the others (their deadlines are
        // not enforced on a shared look-up either; README, "Work nobody waits for").
        let mut call = call;
        call.deadline = None;

        // Coalesced: the call runs in a flight of its own that every identical request arriving
        // meanwhile joins instead of calling the bureau again. While it is queued for a slot it
        // stops as soon as nobody waits for it; once at the bureau it runs to its end, and stays
        // joinable until then: a client that retries after its 504 joins the same call instead
        // of sending (and paying for) the look-up twice.
        let fetch = move |interest: Interest| async move {
            // Queued at the most important level among the flight's waiters, as they come and go.
            call.flight = Some(interest.levels());
            let granted = tokio::select! {
                granted = call.queue() => granted?,
                () = interest.gone() => {
                    return Err(ProxyError::new(ErrorKind::RequestTimeout, "every request for this look-up has gone"));
                }
            };
            interest.sent();
            let done = granted.send(parts, body, Keep::Fetched(store)).await;
            if !interest.waiting() {
                done.record_abandoned();
            }
            match done.answer? {
                Answer::Fetched(fetched) => Ok(fetched),
                Answer::Plain(_) => unreachable!("Keep::Fetched answers with a Fetched"),
            }
        };
        // Each request waits as it would for a call of its own: response_timeout from the call's
        // grant, never past request_timeout.
        let deadline = tokio::time::Instant::now() + snap.limits.request_timeout;
        let (fetched, role) = match self.shared.coalescer.run(key, level, deadline, response_timeout, fetch).await {
            Ok(answer) => answer,
            Err(CoalesceError::Timeout) => return Err(bureau_timeout(response_timeout)),
            Err(e) => return Err(e.into()),
        };
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
            Role::Follower => {
                ctx.rode_on = fetched.fetched_by.clone();
                (fetched.response(CacheStatus::Coalesced), Outcome::Coalesced)
            }
        })
    }

    /// The rate of each contract in turn; one that refuses gives back what the ones before it
    /// took, so a request the route's rate refuses does not use up the tenant's.
    async fn admit_rate(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        contracts: &[Option<&Arc<Contract>>; 3],
        cost: u32,
        admission: &mut Admission<'_>,
        ctx: &mut Ctx,
    ) -> Result<(), ProxyError> {
        for (k, c) in contracts.iter().enumerate() {
            let Some((c, rate)) = c.and_then(|c| Some((c, c.rate.as_ref()?))) else { continue };
            let decided = admission.rate(c, rate, cost).await;
            if let Ok(decided) = &decided {
                ctx.rate[k] = Some(match decided {
                    verdict::Verdict::Allow(decision) | verdict::Verdict::DryRun(decision, _) => *decision,
                    verdict::Verdict::Refuse(refusal) => RateDecision::Limited { retry_after: refusal.retry_after },
                });
            }
            if let Err(err) = decided.and_then(|decided| self.admit(snap, tenant, c, decided)) {
                for (j, before) in contracts[..k].iter().enumerate() {
                    if let (Some(before), Some(RateDecision::Allowed { .. })) = (before, ctx.rate[j])
                        && let Some(rate) = &before.rate
                    {
                        admission.refund_rate(before, rate, cost);
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// What a limit's verdict means for the request, decided here once for every limit and
    /// back-end: within it, go on; over one in dry run, counted and logged and let through;
    /// refused, counted and answered 429.
    /// `contract`: whose limit it was (the tenant's, its route's, its group's).
    fn admit<T>(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        contract: &Contract,
        decided: verdict::Verdict<T>,
    ) -> Result<T, ProxyError> {
        match decided {
            verdict::Verdict::Allow(held) => Ok(held),
            verdict::Verdict::DryRun(held, refusal) => {
                let kind = refusal_kind(refusal.reason, refusal.scope);
                snap.cells.record_limit(&self.shared.metrics, tenant.index, kind, Mode::DryRun);
                tracing::info!(target: "bureau_guard::dry_run", tenant = &*tenant.id, reason = kind.code(), "limit exceeded (dry run: not enforced)");
                Ok(held)
            }
            verdict::Verdict::Refuse(refusal) => {
                let err = refusal_error(&refusal, contract);
                snap.cells.record_limit(&self.shared.metrics, tenant.index, err.kind, Mode::Enforce);
                Err(err)
            }
        }
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for the
    /// tenant, and the route and group limits the request passed.
    fn ratelimit_fields(&self, snap: &Snapshot, tenant: &Tenant, ctx: &Ctx, headers: &mut http::HeaderMap) {
        let route = tenant.route_contract(ctx.route);
        let Some(policy) = route.map_or(&tenant.policy_header, |r| &r.policy_header) else { return };
        let w =
            ctx.windows.unwrap_or_else(|| Windows::at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset));
        let mut states: [([&'static str; 3], RateLimitState); 3] = Default::default();
        for (k, c) in tenant.contracts(ctx.route).into_iter().enumerate() {
            let Some(c) = c else { continue };
            let l = &c.limits;
            let state = RateLimitState {
                rate: ctx.rate[k].map(|d| match d {
                    RateDecision::Allowed { remaining, reset } => {
                        (u64::from(remaining), reset.as_secs_f64().ceil() as u64)
                    }
                    RateDecision::Limited { retry_after } => (0, retry_after_secs(retry_after)),
                }),
                daily: l.daily_quota.map(|q| (q.saturating_sub(c.state.daily.get(w.day)), w.day_resets_in_s)),
                monthly: l.monthly_quota.map(|q| (q.saturating_sub(c.state.monthly.get(w.month)), w.month_resets_in_s)),
            };
            states[k] = (c.policy_names(), state);
        }
        headers.insert(&RATELIMIT_POLICY, policy.clone());
        if let Some(v) = RateLimitState::header(&states) {
            headers.insert(&RATELIMIT, v);
        }
    }
}

fn bureau_timeout(response_timeout: std::time::Duration) -> ProxyError {
    ProxyError::new(
        ErrorKind::BureauTimeout,
        format!("the bureau did not answer within {response_timeout:?} (the call goes on and keeps its bureau slot)"),
    )
}

fn refusal_kind(reason: Reason, scope: Scope) -> ErrorKind {
    match (scope, reason) {
        (Scope::Tenant, Reason::Rate) => ErrorKind::RateLimited,
        (Scope::Tenant, Reason::InFlight) => ErrorKind::TooManyInFlight,
        (Scope::Tenant, Reason::DailyQuota) => ErrorKind::DailyQuotaExhausted,
        (Scope::Tenant, Reason::MonthlyQuota) => ErrorKind::MonthlyQuotaExhausted,
        (Scope::Route, Reason::Rate) => ErrorKind::RouteRateLimited,
        (Scope::Route, Reason::InFlight) => ErrorKind::RouteTooManyInFlight,
        (Scope::Route, Reason::DailyQuota) => ErrorKind::RouteDailyQuotaExhausted,
        (Scope::Route, Reason::MonthlyQuota) => ErrorKind::RouteMonthlyQuotaExhausted,
        (Scope::Group, Reason::Rate) => ErrorKind::GroupRateLimited,
        (Scope::Group, Reason::InFlight) => ErrorKind::GroupTooManyInFlight,
        (Scope::Group, Reason::DailyQuota) => ErrorKind::GroupDailyQuotaExhausted,
        (Scope::Group, Reason::MonthlyQuota) => ErrorKind::GroupMonthlyQuotaExhausted,
    }
}

/// The 429 of a refusal by one of `contract`'s limits, naming the limit (and for a route or a
/// group, whose: the contract id is a tenant, route and group id, never a key or subject).
fn refusal_error(refusal: &Refusal, contract: &Contract) -> ProxyError {
    let l = &contract.limits;
    let message = match refusal.reason {
        Reason::Rate => match &contract.rate {
            Some(rate) => format!("over {} requests/s (burst {})", rate.rate, rate.burst),
            None => "over the request rate".to_string(),
        },
        Reason::InFlight => format!("more than {} requests in flight", l.max_in_flight.unwrap_or(0)),
        Reason::DailyQuota => format!("daily quota of {} bureau calls used up", l.daily_quota.unwrap_or(0)),
        Reason::MonthlyQuota => format!("monthly quota of {} bureau calls used up", l.monthly_quota.unwrap_or(0)),
    };
    let message = match contract.scope {
        Scope::Tenant => message,
        Scope::Route => {
            let route = contract.id.split_once('/').map_or(&*contract.id, |(_, r)| r);
            format!("route {route}: {message}")
        }
        Scope::Group => {
            let group = contract.id.strip_prefix("group:").unwrap_or(&contract.id);
            format!("group {group}: {message}")
        }
    };
    ProxyError::new(refusal_kind(refusal.reason, refusal.scope), message)
        .retry_after(retry_after_secs(refusal.retry_after))
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

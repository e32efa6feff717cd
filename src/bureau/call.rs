//! A bureau call, split at its grant. Until the scheduler grants it a slot the call belongs to
//! the request ([`BureauCall::queue`]: the breaker, then a fair share of the bureau): a client
//! that leaves while queued costs nothing. From the grant on it belongs to the bureau
//! ([`Granted::send`]: forward headers, upstream, charge, cache fill): if the request's future is
//! dropped the call moves to a task of its own ([`Detachable`], tracked in `Shared::calls`) and
//! runs to its end, holding its slot, its tenant's in-flight place and its charge.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http::Response;
use http::header::RETRY_AFTER;

use crate::admission::quota::{self, retry_after_secs};
use crate::admission::ratelimit::InFlightGuards;
use crate::admission::tenant::{Tenant, WEIGHT_SCALE};
use crate::bureau::breaker::{self, Cause, Verdict};
use crate::bureau::headers::{self, RequestId};
use crate::bureau::scheduler::{Ask, AskGroup, Permit, Queued, Shed, ShedReason};
use crate::cache::audit::Record;
use crate::cache::coalesce::FlightLevels;
use crate::cache::key::CacheKey;
use crate::cache::store::{self, Fetched};
use crate::respond::{Body, ErrorKind, Outcome, ProxyError};
use crate::runtime::{Shared, Snapshot};
use crate::usage::Column;

/// Who a bureau call is for and where it is recorded: what both the call and its end
/// ([`Done`]) carry, for metrics and the audit record of an abandoned call.
pub(crate) struct Attribution {
    pub(crate) shared: Arc<Shared>,
    pub(crate) snap: Arc<Snapshot>,
    pub(crate) tenant: Arc<Tenant>,
    /// Route index, for the audit record of an abandoned call.
    pub(crate) route: usize,
    /// The look-up's keyed hash (routes with a `cache_key`): the audit's subject.
    pub(crate) subject: Option<CacheKey>,
    pub(crate) request_id: RequestId,
}

/// One bureau call with everything it holds, owned, so that it can outlive the request that
/// started it: the quota reservation and the tenant's in-flight place go with the call, not
/// with the client's request.
pub(crate) struct BureauCall {
    pub(crate) who: Attribution,
    /// The client's address (the connection's, or the one trusted proxies vouch for).
    pub(crate) source: Option<Arc<headers::SourceFields>>,
    pub(crate) cost: u32,
    /// The priority level slot it queues in ([`crate::route::priority`]).
    pub(crate) level: usize,
    /// A coalesced flight's waiters' levels: while queued, the call queues at the most
    /// important of them, re-queued as they join and leave. `None`: the call is one request's.
    pub(crate) flight: Option<FlightLevels>,
    /// The client's own deadline ([`crate::route::deadline`]), if it gave one.
    pub(crate) deadline: Option<tokio::time::Instant>,
    /// The call's quota reservation in each contract it is charged to (tenant, route, group).
    pub(crate) reservation: quota::Reservations,
    /// The `max_in_flight` places (tenant, route, group): held until the bureau has answered.
    pub(crate) in_flight: InFlightGuards,
}

/// A call that has its bureau slot: from here on the bureau is working on it.
pub(crate) struct Granted {
    call: BureauCall,
    permit: Permit,
    ticket: breaker::Ticket,
    queued_at: tokio::time::Instant,
}

/// What a call's answer is kept as.
pub(crate) enum Keep {
    /// Handed to the one request as it came.
    Plain,
    /// Buffered as a [`Fetched`] (shared with coalesced followers), and stored in the cache if
    /// the route caches.
    Fetched(Option<Store>),
}

/// Where a cached route's answer goes.
pub(crate) struct Store {
    pub(crate) ticket: store::Ticket,
    pub(crate) key: CacheKey,
    pub(crate) policy: store::RoutePolicy,
    pub(crate) route: Arc<str>,
}

pub(crate) enum Answer {
    Plain(Response<Body>),
    Fetched(Arc<Fetched>),
}

/// A finished bureau call: its answer, and who it was for.
pub(crate) struct Done {
    pub(crate) answer: Result<Answer, ProxyError>,
    /// The tenant's quota was charged for it (the bureau took the call).
    charged: bool,
    /// The local day the call was sent on (its usage day).
    day: u32,
    who: Attribution,
}

impl BureauCall {
    /// The bureau's own signals, then a fair share of it. An open breaker answers at once; a
    /// hold the bureau asked for is waited out if it ends before the request's queue deadline.
    /// Slots go to tenants by weighted fair queuing, so a surge lengthens only the surging
    /// tenant's queue; a request that cannot get a slot in time is shed here, before it can add
    /// to the bureau's load. Dropping this future (the client went away) leaves the queue and
    /// costs nothing: the reservation is refunded, no slot is taken.
    pub(crate) async fn queue(self) -> Result<Granted, ProxyError> {
        let queued_at = tokio::time::Instant::now();
        let who = &self.who;
        let upstream = &who.snap.config.upstream;
        // The client's own deadline, when sooner, bounds the wait too.
        let queue_deadline = queued_at + upstream.queue_timeout;
        let client_binds = self.deadline.is_some_and(|d| d < queue_deadline);
        let deadline = self.deadline.map_or(queue_deadline, |d| d.min(queue_deadline));
        let tenant = &who.tenant;
        let tenants = who.snap.tenants.len();
        let ticket = match who.shared.breaker.admit(&upstream.breaker, queued_at, tenant.state.index, tenants) {
            Ok(ticket) => ticket,
            Err(retry_after) => {
                return Err(ProxyError::new(
                    ErrorKind::BureauUnavailable,
                    "the bureau failed several calls in a row: answering without it until it recovers",
                )
                .retry_after(retry_after_secs(retry_after)));
            }
        };
        let cells = who.snap.cells.tenant(&who.shared.metrics, tenant.index);
        // Calls the bureau has not answered within response_timeout keep their slots (the bureau
        // is still working on them): one tenant must not pin the whole budget with look-ups the
        // bureau hangs on. Past half of it, its new calls wait for those to end.
        let overdue = tenant.state.overdue.load(Ordering::Acquire) as usize;
        if overdue >= (who.shared.scheduler.limit() / 2).max(1) {
            cells.shed_overdue.inc();
            return Err(ProxyError::new(
                ErrorKind::BureauBusy,
                format!("{overdue} of your calls the bureau has not answered in time still hold bureau slots"),
            )
            .retry_after(1));
        }
        let mut ask = Ask {
            tenant: tenant.state.index,
            weight: tenant.weight.saturating_mul(WEIGHT_SCALE),
            cost: self.cost,
            max_queue: tenant.limits.max_queue,
            deadline,
            level: self.level,
            group: tenant
                .group
                .as_ref()
                .map(|g| AskGroup { index: g.queue, weight: g.weight.saturating_mul(WEIGHT_SCALE) }),
        };
        // A request the queue cannot serve before its own deadline is refused now rather than
        // when the deadline passes: it never takes a place, nor a slot.
        if let Some(client) = self.deadline
            && let Some(wait) = who.shared.scheduler.estimated_wait(&ask)
            && queued_at + wait >= client
        {
            cells.shed_deadline.inc();
            return Err(ProxyError::new(
                ErrorKind::BureauBusy,
                format!(
                    "a bureau slot is about {} ms away; your x-request-timeout-ms leaves {} ms",
                    wait.as_millis(),
                    client.saturating_duration_since(queued_at).as_millis()
                ),
            )
            .retry_after(retry_after_secs(wait)));
        }
        let permit = loop {
            self.wait_out_holds(deadline).await?;
            let permit = match self.acquire(&mut ask).await {
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
                        ShedReason::QueueTimeout if client_binds => {
                            cells.shed_deadline.inc();
                            "no bureau slot before your x-request-timeout-ms passed".to_string()
                        }
                        ShedReason::QueueTimeout => {
                            cells.shed_queue_timeout.inc();
                            format!("no bureau slot within {:?}", upstream.queue_timeout)
                        }
                        ShedReason::QueueFullTotal => {
                            cells.shed_queue_full_total.inc();
                            "the bureau is at capacity and the queues of all institutions are full".to_string()
                        }
                    };
                    return Err(
                        ProxyError::new(ErrorKind::BureauBusy, message).retry_after(retry_after_secs(shed.retry_after))
                    );
                }
            };
            // A hold that began while this request was queued: give the slot back to whoever
            // may use it now rather than sleep on it, and wait for the hold's end.
            if who.shared.breaker.held(&tenant.state.bureau_hold, tokio::time::Instant::now()).is_none() {
                break permit;
            }
        };
        // Granted as the client's own deadline passed: nobody waits for the answer, so the call
        // is not sent (nor charged); the slot goes to the next waiter.
        if self.deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            drop(permit);
            cells.shed_deadline.inc();
            return Err(ProxyError::new(
                ErrorKind::BureauBusy,
                "no bureau slot before your x-request-timeout-ms passed",
            )
            .retry_after(1));
        }
        Ok(Granted { call: self, permit, ticket, queued_at })
    }

    /// A bureau slot for `ask`. A coalesced flight's call queues at the most important level
    /// among its waiters and, when that changes while it is queued, moves to the new level's
    /// queue keeping its place in time and its deadline. A move the new level's queue has no
    /// room for is not made: the call stays where it is rather than fail its waiters.
    async fn acquire(&self, ask: &mut Ask) -> Result<Permit, Shed> {
        let scheduler = &self.who.shared.scheduler;
        let Some(flight) = &self.flight else { return scheduler.acquire(*ask).await };
        let mut changes = flight.watch();
        changes.borrow_and_update();
        ask.level = flight.best(scheduler.levels().order()).unwrap_or(ask.level);
        let mut waiting = match scheduler.queue(*ask) {
            Queued::Settled(res) => return res,
            Queued::Waiting(waiting) => waiting,
        };
        loop {
            let level = waiting.level();
            let moved = async {
                loop {
                    if changes.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                    match flight.best(scheduler.levels().order()) {
                        Some(best) if best != level => return best,
                        _ => {}
                    }
                }
            };
            tokio::select! {
                // A grant that arrives together with a change is used.
                biased;
                granted = waiting.granted() => return granted,
                best = moved => {
                    if waiting.move_to(best) {
                        ask.level = waiting.level();
                    }
                }
            }
        }
    }

    /// Waits out the bureau's holds on this tenant's calls if they end before `deadline`;
    /// otherwise refuses at once (the bureau asked for longer than the request can wait).
    async fn wait_out_holds(&self, deadline: tokio::time::Instant) -> Result<(), ProxyError> {
        let who = &self.who;
        let hold = &who.tenant.state.bureau_hold;
        while let Some(until) = who.shared.breaker.held(hold, tokio::time::Instant::now()) {
            if until >= deadline {
                who.snap.cells.tenant(&who.shared.metrics, who.tenant.index).shed_bureau_hold.inc();
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                return Err(ProxyError::new(ErrorKind::BureauBusy, "the bureau asked for a pause in calls")
                    .retry_after(retry_after_secs(left)));
            }
            tokio::time::sleep_until(until).await;
        }
        Ok(())
    }
}

impl Granted {
    /// Sends the call. If the returned future is dropped before it ends (the client went away,
    /// or `response_timeout` answered it 504), the call moves to a task of its own and runs to
    /// its end: the bureau is still working on it, so it keeps its slot, its tenant's
    /// in-flight place and its charge until the bureau answers (or `max_call_time` cuts it),
    /// still fills the cache, and is counted and audited as abandoned.
    pub(crate) fn send(self, parts: http::request::Parts, body: bytes::Bytes, keep: Keep) -> Detachable {
        let tracker = self.call.who.shared.calls.clone();
        Detachable { call: Some(Box::pin(self.call(parts, body, keep))), tracker }
    }

    async fn call(self, mut parts: http::request::Parts, body: bytes::Bytes, keep: Keep) -> Done {
        let Granted { call, permit, ticket, queued_at } = self;
        // The in-flight place is held (unused) until the bureau has answered.
        let BureauCall { who, source, cost: _, level: _, flight: _, deadline, reservation, in_flight: _in_flight } =
            call;
        let Attribution { shared, snap, tenant, request_id, .. } = &who;
        let upstream = &snap.config.upstream;
        let granted_at = tokio::time::Instant::now();
        snap.cells.tenant(&shared.metrics, tenant.index).queue_wait.observe((granted_at - queued_at).as_secs_f64());

        // Forward headers: the bureau learns who asked and which request this is from us alone:
        // no credential, and no identity or forwarding field the bank sent, in any spelling.
        headers::forward(&mut parts.headers, &tenant.header_value, request_id, source.as_deref());

        // The charge is durable before the call leaves (`usage/journal.rs`): a crash from here
        // on cannot lose a call the bureau bills. The day is the bureau's day for this call.
        // Before `called_at`: the bureau's latency (the adaptive limit's signal) and the
        // response timeout count the bureau's time, not the disk's.
        let day = crate::usage::day_at(shared.clock.now_unix_ms(), snap.config.quota.utc_offset);
        let route = snap.route_name(who.route);
        shared.usage.charge(day, &tenant.id, &route).await;
        let called_at = tokio::time::Instant::now();
        // What is left of the client's own deadline as the call leaves.
        if let Some(deadline) = deadline {
            crate::route::deadline::tell_the_bureau(&mut parts.headers, deadline, called_at);
        }

        // Upstream: the bureau is touched last, and the call runs until it answers (or
        // max_call_time cuts it). Not answering within response_timeout is a failure for the
        // breaker at once, though the call goes on, and counts as overdue for its tenant.
        let mut ticket = Some(ticket);
        let mut _overdue = None;
        let result = {
            let send = snap.upstream.send(parts, body);
            tokio::pin!(send);
            match tokio::time::timeout_at(called_at + upstream.response_timeout, &mut send).await {
                Ok(result) => result,
                Err(_) => {
                    if let Some(t) = ticket.take() {
                        t.record(Verdict::Failed(Cause::Request), tokio::time::Instant::now());
                    }
                    _overdue = Some(Overdue::enter(tenant.state.clone()));
                    send.await
                }
            }
        };
        let now = tokio::time::Instant::now();
        let latency = now - called_at;
        let verdict = match &result {
            Ok(resp) => breaker::verdict(resp.status(), resp.headers().get(RETRY_AFTER)),
            // Nothing in the request can make the bureau refuse a connection.
            Err(e) if e.kind == ErrorKind::BureauUnreachable => Verdict::Failed(Cause::Bureau),
            Err(_) => Verdict::Failed(Cause::Request),
        };
        // Charged only if the bureau took the call: not when it could not be reached or built,
        // and not when the bureau refused it (429/503).
        let reached =
            !matches!(&result, Err(e) if matches!(e.kind, ErrorKind::BureauUnreachable | ErrorKind::BadRequest));
        let charged = reached && !matches!(verdict, Verdict::Refused { .. });
        if charged {
            reservation.commit();
            snap.cells.tenant(&shared.metrics, tenant.index).charged.inc();
        } else {
            drop(reservation);
        }
        // Usage: a call the bureau did not take gives its charge back (and one it refused is
        // counted as such).
        if !charged {
            shared.usage.refund(day, &tenant.id, &route, reached);
        }
        match (ticket, &result) {
            // Never left this process: nothing learned about the bureau.
            (Some(_), Err(e)) if e.kind == ErrorKind::BadRequest => {}
            (Some(t), _) => t.record(verdict, now),
            (None, _) => {}
        }
        if matches!(&result, Err(e) if e.kind == ErrorKind::BureauTimeout) {
            shared.metrics.bureau_calls_cut_total.inc();
        }
        shared.metrics.bureau_duration_seconds.observe(latency.as_secs_f64());
        if let Ok(resp) = &result {
            let class = usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1;
            shared.metrics.bureau_responses[class].inc();
        }

        // The bureau's back-pressure holds new calls for the time it asked. A 429 (too many
        // from this tenant) holds this tenant; a 503 (the bureau is full) holds everyone once a
        // second tenant gets one (one bank's 503 alone might be its own doing), and with an
        // adaptive limit shrinks the limit instead.
        let mut full_for_everyone = false;
        let mut wait = RETRY_AFTER_DEFAULT;
        if let (Ok(resp), Verdict::Refused { retry_after }) = (&result, verdict) {
            wait = retry_after.unwrap_or(RETRY_AFTER_DEFAULT).min(upstream.retry_after_cap);
            full_for_everyone = resp.status() == http::StatusCode::SERVICE_UNAVAILABLE
                && shared.breaker.full_for_everyone(tenant.state.index, snap.tenants.len(), now, wait);
            let adaptive = shared.adaptive.load().is_some();
            let everyone = full_for_everyone && !adaptive;
            let held = (!everyone).then_some(&tenant.state.bureau_hold);
            if !(full_for_everyone && adaptive) {
                shared.breaker.hold(held, now, wait, upstream.retry_after_cap);
            }
        }
        // The latency and outcome feed the adaptive limit; the slot is freed here, once the
        // bureau has answered (body included).
        match (&result, verdict) {
            // Never left this process: nothing learned about the bureau.
            (Err(e), _) if e.kind == ErrorKind::BadRequest => drop(permit),
            // A refusal that may be about one tenant says nothing of everyone's capacity.
            (Ok(_), Verdict::Refused { .. }) if !full_for_everyone => drop(permit),
            _ => permit.complete(latency, verdict.signal()),
        }

        let answer = match (result, verdict) {
            (Ok(_), Verdict::Refused { .. }) => {
                // Passed on as a retryable 503, not charged.
                Err(ProxyError::new(ErrorKind::BureauBusy, "the bureau is at capacity and asked for a pause")
                    .retry_after(retry_after_secs(wait)))
            }
            (Err(e), _) => Err(e),
            (Ok(resp), _) => match keep {
                Keep::Plain => Ok(Answer::Plain(resp)),
                Keep::Fetched(store) => {
                    let mut fetched = Fetched::from_response(resp).await;
                    fetched.fetched_for = Some(tenant.id.clone());
                    fetched.fetched_by = Some(request_id.id.clone());
                    let fetched = Arc::new(fetched);
                    if let Some(s) = store {
                        shared.cache.store(s.ticket, s.key, &fetched, &s.policy, &tenant.id, &s.route).await;
                    }
                    Ok(Answer::Fetched(fetched))
                }
            },
        };
        Done { answer, charged, day, who }
    }
}

/// Counts a call past `response_timeout` in its tenant's `overdue` for as long as it runs.
struct Overdue(Arc<crate::state::TenantState>);

impl Overdue {
    fn enter(state: Arc<crate::state::TenantState>) -> Overdue {
        state.overdue.fetch_add(1, Ordering::AcqRel);
        Overdue(state)
    }
}

impl Drop for Overdue {
    fn drop(&mut self) {
        self.0.overdue.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bureau `Retry-After` of nothing: wait a second, the shortest a client can be told.
const RETRY_AFTER_DEFAULT: std::time::Duration = std::time::Duration::from_secs(1);

impl Done {
    /// Nobody received this answer: counted per tenant and audited as `abandoned` (the bureau
    /// did the work and the tenant was charged). A call the bureau never took is neither.
    pub(crate) fn record_abandoned(&self) {
        if !self.charged {
            return;
        }
        let who = &self.who;
        let cells = who.snap.cells.tenant(&who.shared.metrics, who.tenant.index);
        cells.abandoned.inc();
        let route = who.snap.route_name(who.route);
        who.shared.usage.record(self.day, &who.tenant.id, &route, Column::Abandoned);
        let Some(audit) = &who.shared.audit else { return };
        let status = match &self.answer {
            Ok(Answer::Plain(resp)) => resp.status(),
            Ok(Answer::Fetched(fetched)) => fetched.status,
            Err(e) => e.kind.status(),
        };
        let record = Record {
            unix_ms: who.shared.clock.now_unix_ms(),
            tenant: who.tenant.id.clone(),
            route,
            subject: who.subject,
            outcome: Outcome::Abandoned,
            status: status.as_u16(),
            request_id: who.request_id.id.clone(),
            client_request_id: who.request_id.client.clone(),
            rode_on: None,
        };
        // Nobody to refuse if it cannot be written: the audit log counts its own failures.
        let _ = audit.record(record);
    }
}

/// A bureau call's future that, dropped before it ends, moves to a task of its own and runs to
/// its end (see [`Granted::send`]). Not polled again after it returned.
pub(crate) struct Detachable {
    call: Option<Pin<Box<dyn Future<Output = Done> + Send>>>,
    tracker: tokio_util::task::TaskTracker,
}

impl Future for Detachable {
    type Output = Done;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let call = self.call.as_mut().expect("a Detachable is not polled after it returned");
        let done = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(done)
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        // Outside a runtime nothing could run the call anyway (the process is ending).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tracker.spawn_on(async move { call.await.record_abandoned() }, &runtime);
        }
    }
}

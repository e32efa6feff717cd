//! Stage: listen to the bureau. A circuit breaker for a bureau that is down, and a hold for a
//! bureau that says it is full.
//!
//! Two failures of a launch day that the fair scheduler alone does not stop:
//! - **The bureau is down.** Every request would wait out `connect_timeout` or
//!   `response_timeout` holding a bureau slot; the queues fill behind them and every bank sees
//!   slow errors. After `failures` bureau failures in a row (connect errors, broken or invalid
//!   answers, response timeouts, 502/504) the breaker **opens**: requests are
//!   answered at once (stale-if-error where the route allows it, else 503 `bureau_unavailable`
//!   with `Retry-After`) for `open_for`. Then it is **half-open**: `probes` calls go through,
//!   one per tenant at a time; when `probes` have succeeded it **closes**, when failures
//!   implicate the bureau again it reopens. Per replica: each replica sees its own connections
//!   fail.
//! - **One bank must not open it for everyone.** A tenant can make its own calls fail (input
//!   the bureau chokes on, answers over `max_response_body`, look-ups the bureau hangs on). So a
//!   failure is blamed on the bureau only when no request could have caused it (the connection
//!   was refused) or when failures in the run come from two different tenants (one, when only
//!   one tenant is configured). Likewise a 503 holds everyone only when a second tenant gets
//!   one while the first's hold is on; a lone tenant's 503 holds that tenant.
//! - **The bureau says it is full.** A 429, or a 503, is the bureau's own back-pressure: sending
//!   the next queued call anyway is how 2017 happened. Such an answer **holds** new calls for
//!   its `Retry-After` (1 s if it gave none, at most `upstream.retry_after_cap`): requests whose
//!   queue deadline falls inside the hold are answered 503 `bureau_busy` at once, the others
//!   wait for the hold to end. With `[upstream.adaptive]` on, the adaptive limit shrinks instead
//!   (the caller decides; see `bureau/call.rs`). A refused call is not charged to the tenant.
//!
//! The request path reads one atomic when the breaker is closed and no failure run is open, and
//! one more per hold check. Everything else (failures, probes, transitions) happens under one
//! small mutex: failures and state changes are rare by nature, and a single lock makes the state
//! machine race-free (an earlier lock-free version could leak half-open probe places across
//! rounds and stay half-open for good). Settings come from the request's config snapshot, so a
//! reload changes them without losing the state.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

use crate::config::BreakerSettings;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The breaker's state, as the `bureau_guard_breaker_state` gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go to the bureau.
    Closed = 0,
    /// Calls are answered at once without the bureau.
    Open = 1,
    /// A few probe calls go through to see whether the bureau is back.
    HalfOpen = 2,
}

/// Who could have caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nothing in the request: the bureau refused the connection, or its TLS handshake failed.
    Bureau,
    /// Possibly the request itself: no answer in time, a broken, invalid or oversized answer,
    /// a 502 or 504.
    Request,
}

/// How a bureau call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The bureau answered (any status but 429, 502, 503, 504).
    Answered,
    /// The bureau failed: no connection, a broken or invalid answer, no answer in time, 502 or
    /// 504.
    Failed(Cause),
    /// The bureau refused the call (429, or 503) and asked to wait `retry_after` (`None`: it
    /// did not say). It is alive, so this is no failure for the breaker.
    Refused { retry_after: Option<Duration> },
}

impl Verdict {
    /// The same judgement for the adaptive limit: a refusal is the bureau's back-pressure, a
    /// failure an error; an answer (a 500 included, as for the breaker) is a latency sample.
    pub fn signal(self) -> crate::bureau::adaptive::Signal {
        match self {
            Verdict::Answered => crate::bureau::adaptive::Signal::Ok,
            Verdict::Failed(_) => crate::bureau::adaptive::Signal::Error,
            Verdict::Refused { .. } => crate::bureau::adaptive::Signal::BackPressure,
        }
    }
}

/// The bureau's health as this replica sees it. One per process (`Shared`), outliving reloads.
#[derive(Debug)]
pub struct Breaker {
    epoch: Instant,
    /// Read without the lock by every request; written under it.
    state: AtomicU8,
    /// True while a failure run is open: lets an answer skip the lock when there is nothing to
    /// reset (the common case).
    failing: AtomicBool,
    inner: Mutex<Inner>,
    /// The hold on everyone's calls (503s from two tenants), in nanoseconds since `epoch`;
    /// tenant holds are on the same clock.
    hold_until: AtomicU64,
    state_gauge: IntGauge,
    opened_total: IntCounter,
    holds_total: IntCounter,
}

#[derive(Debug)]
struct Inner {
    /// Bumped each time the breaker opens: a probe of an earlier round counts in no later one.
    generation: u32,
    /// Failures in a row while closed; during half-open, the probes' failures.
    run: Run,
    /// Tenants with a probe in flight in this half-open round (one each).
    probing: Vec<usize>,
    probes_ok: u32,
    open_until: Instant,
    /// The last tenant the bureau answered 503, and until when a second tenant's 503 makes
    /// the hold everyone's.
    last_503: Option<(usize, Instant)>,
}

/// Failures in a row and whom they implicate.
#[derive(Debug, Default)]
struct Run {
    failures: u32,
    first: Option<usize>,
    /// Failures from two tenants, or one nobody could have caused.
    implicates_bureau: bool,
}

impl Run {
    fn add(&mut self, tenant: usize, cause: Cause, alone: bool) {
        self.failures += 1;
        let other = self.first.is_some_and(|t| t != tenant);
        self.first.get_or_insert(tenant);
        self.implicates_bureau |= other || alone || cause == Cause::Bureau;
    }
}

/// Leave to call the bureau, from [`Breaker::admit`]. Record how the call went with
/// [`Ticket::record`]; a ticket dropped unrecorded (the request left the queue) counts as
/// nothing, and gives back its probe place.
#[derive(Debug)]
#[must_use = "record the call's verdict, or drop the ticket if no call was made"]
pub struct Ticket {
    breaker: Arc<Breaker>,
    settings: BreakerSettings,
    tenant: usize,
    /// Only one tenant is configured: its failures alone implicate the bureau.
    alone: bool,
    /// `Some(generation)` for a half-open probe.
    probe: Option<u32>,
}

impl Breaker {
    /// A closed breaker reporting to `state_gauge`, `opened_total` and `holds_total`.
    pub fn new(state_gauge: IntGauge, opened_total: IntCounter, holds_total: IntCounter) -> Arc<Breaker> {
        state_gauge.set(State::Closed as i64);
        let epoch = Instant::now();
        Arc::new(Breaker {
            epoch,
            state: AtomicU8::new(CLOSED),
            failing: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                generation: 0,
                run: Run::default(),
                probing: Vec::new(),
                probes_ok: 0,
                open_until: epoch,
                last_503: None,
            }),
            hold_until: AtomicU64::new(0),
            state_gauge,
            opened_total,
            holds_total,
        })
    }

    /// A breaker whose metrics are registered nowhere (tests, tools).
    pub fn unregistered() -> Arc<Breaker> {
        let gauge = IntGauge::new("breaker_state", "unregistered").expect("valid metric");
        let opened = IntCounter::new("breaker_opened", "unregistered").expect("valid metric");
        let holds = IntCounter::new("breaker_holds", "unregistered").expect("valid metric");
        Breaker::new(gauge, opened, holds)
    }

    /// The state now.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            CLOSED => State::Closed,
            OPEN => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent at each step.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.state_gauge.set(i64::from(state));
    }

    /// May `tenant`'s call go to the bureau now? Closed: yes. Open: no (answer with the
    /// returned `Retry-After`) until `open_for` has passed; then half-open: yes for up to
    /// `settings.probes` callers, one per tenant. `tenants` is how many tenants are configured.
    /// Holds are checked apart ([`Breaker::held`]).
    pub fn admit(
        self: &Arc<Self>,
        settings: &BreakerSettings,
        now: Instant,
        tenant: usize,
        tenants: usize,
    ) -> Result<Ticket, Duration> {
        let ticket = |probe| Ticket { breaker: self.clone(), settings: *settings, tenant, alone: tenants <= 1, probe };
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(ticket(None));
        }
        let mut inner = self.lock();
        match self.state.load(Ordering::Acquire) {
            CLOSED => return Ok(ticket(None)),
            OPEN if now < inner.open_until => return Err(inner.open_until - now),
            OPEN => self.set_state(HALF_OPEN),
            _ => {}
        }
        if inner.probing.len() as u32 >= settings.probes || inner.probing.contains(&tenant) {
            // Probes are out: their answers decide; until then, answer fast.
            return Err(Duration::from_secs(1));
        }
        inner.probing.push(tenant);
        Ok(ticket(Some(inner.generation)))
    }

    /// The end of the hold on a tenant's new calls at `now`, if one is on: the bureau's hold on
    /// everyone, or the one on this tenant (`tenant_hold`, a [`TenantState::bureau_hold`]),
    /// whichever ends later.
    ///
    /// [`TenantState::bureau_hold`]: crate::state::TenantState::bureau_hold
    pub fn held(&self, tenant_hold: &AtomicU64, now: Instant) -> Option<Instant> {
        let until = self.hold_until.load(Ordering::Acquire).max(tenant_hold.load(Ordering::Acquire));
        (self.nanos(now) < until).then(|| self.epoch + Duration::from_nanos(until))
    }

    /// Holds new calls until `now + retry_after` (capped by `cap`), for everyone (`None`) or
    /// for one tenant (`Some(its bureau_hold)`). A longer hold already on stays.
    pub fn hold(&self, tenant_hold: Option<&AtomicU64>, now: Instant, retry_after: Duration, cap: Duration) {
        let until = self.nanos(now + retry_after.min(cap));
        let cell = tenant_hold.unwrap_or(&self.hold_until);
        if cell.fetch_max(until, Ordering::AcqRel) < until {
            self.holds_total.inc();
        }
    }

    /// The bureau answered `tenant` 503 and asked it to wait `wait`: is the bureau full for
    /// everyone? Yes when another tenant got a 503 within that tenant's wait, or when `tenant`
    /// is the only one configured; otherwise only `tenant` should be held.
    pub fn full_for_everyone(&self, tenant: usize, tenants: usize, now: Instant, wait: Duration) -> bool {
        let mut inner = self.lock();
        let other = inner.last_503.is_some_and(|(t, until)| t != tenant && now < until);
        inner.last_503 = Some((tenant, now + wait.max(Duration::from_secs(1))));
        other || tenants <= 1
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Opens the breaker (called with the lock held).
    fn open(&self, inner: &mut Inner, settings: &BreakerSettings, now: Instant) {
        inner.generation = inner.generation.wrapping_add(1);
        inner.run = Run::default();
        inner.probing.clear();
        inner.probes_ok = 0;
        inner.open_until = now + settings.open_for;
        self.failing.store(false, Ordering::Release);
        self.set_state(OPEN);
        self.opened_total.inc();
        tracing::warn!(
            target: "bureau_guard::breaker",
            open_for_ms = settings.open_for.as_millis() as u64,
            "bureau failing: circuit breaker open, answering at once"
        );
    }
}

impl Ticket {
    /// Records how the call went. Closed: failures in a row that implicate the bureau open the
    /// breaker. Half-open: `probes` successes close it; a failure that implicates the bureau
    /// reopens it, one that may be its request's own frees the probe place for another tenant.
    /// A refusal is the bureau alive and full: like an answer, it ends a failure run (the hold
    /// is the caller's to set).
    pub fn record(mut self, verdict: Verdict, now: Instant) {
        let probe = self.probe.take();
        let b = self.breaker.clone();
        let answered = !matches!(verdict, Verdict::Failed(_));
        if answered && probe.is_none() && !b.failing.load(Ordering::Acquire) {
            return; // the common case: nothing to reset, no lock
        }
        let mut inner = b.lock();
        let probe = probe.filter(|g| *g == inner.generation);
        if probe.is_some() {
            inner.probing.retain(|t| *t != self.tenant);
        }
        match verdict {
            Verdict::Answered | Verdict::Refused { .. } => {
                if probe.is_none() {
                    inner.run = Run::default();
                    b.failing.store(false, Ordering::Release);
                    return;
                }
                inner.probes_ok += 1;
                if inner.probes_ok >= self.settings.probes && b.state.load(Ordering::Acquire) == HALF_OPEN {
                    inner.run = Run::default();
                    b.set_state(CLOSED);
                    tracing::info!(target: "bureau_guard::breaker", "bureau answering again: circuit breaker closed");
                }
            }
            Verdict::Failed(cause) => {
                let state = b.state.load(Ordering::Acquire);
                if probe.is_none() && state != CLOSED {
                    return; // a call of an earlier round
                }
                inner.run.add(self.tenant, cause, self.alone);
                b.failing.store(true, Ordering::Release);
                let enough = if probe.is_some() { 1 } else { self.settings.failures };
                if inner.run.failures >= enough && inner.run.implicates_bureau {
                    b.open(&mut inner, &self.settings, now);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // An unrecorded probe (its request left the queue) gives its place to another caller.
        if let Some(generation) = self.probe {
            let mut inner = self.breaker.lock();
            if inner.generation == generation {
                inner.probing.retain(|t| *t != self.tenant);
            }
        }
    }
}

/// The breaker's verdict on a bureau answer with `status` and `Retry-After` header `retry_after`.
///
/// Only 502 and 504 (the bureau's own gateways cannot reach it) are failures: a 500 or 501 is
/// the bureau answering about one request, which a client can provoke with odd input; it is
/// also fast, so it holds no slot long.
pub fn verdict(status: http::StatusCode, retry_after: Option<&http::HeaderValue>) -> Verdict {
    match status.as_u16() {
        429 | 503 => Verdict::Refused { retry_after: retry_after.and_then(parse_retry_after) },
        502 | 504 => Verdict::Failed(Cause::Request),
        _ => Verdict::Answered,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3); `None` if neither.
fn parse_retry_after(v: &http::HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests;

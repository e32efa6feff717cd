//! Stage: listen to the bureau. A circuit breaker for a bureau that is down, and a hold for a
//! bureau that says it is full.
//!
//! Two failures of a launch day that the fair scheduler alone does not stop:
//! - **The bureau is down.** Every request would wait out `connect_timeout` or
//!   `response_timeout` holding a bureau slot; the queues fill behind them and every bank sees
//!   slow errors. After `failures` bureau failures in a row (connect errors, broken or invalid
//!   answers, response timeouts, 502/504) the breaker **opens**: requests are
//!   answered at once (stale-if-error where the route allows it, else 503 `bureau_unavailable`
//!   with `Retry-After`) for `open_for`. Then it is **half-open**: `probes` calls go through;
//!   if all succeed it **closes**, if one fails it opens again. Per replica: each replica sees
//!   its own connections fail.
//! - **The bureau says it is full.** A 429, or a 503, is the bureau's own back-pressure: sending
//!   the next queued call anyway is how 2017 happened. Such an answer **holds** new calls for
//!   its `Retry-After` (1 s if it gave none, at most `upstream.retry_after_cap`): requests whose
//!   queue deadline falls inside the hold are answered 503 `bureau_busy` at once, the others
//!   wait for the hold to end. With `[upstream.adaptive]` on, the adaptive limit shrinks instead
//!   (the caller decides; see `proxy.rs`). A refused call is not charged to the tenant.
//!
//! The request path reads one atomic when the breaker is closed and no hold is on; the
//! transitions are compare-and-swaps, rare by nature. Settings come from the request's config
//! snapshot, so a reload changes them without losing the state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
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

/// How a bureau call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The bureau answered (any status but 429, 502, 503, 504).
    Answered,
    /// The bureau failed: no connection, a broken or invalid answer, no answer in time, 502 or
    /// 504.
    Failed,
    /// The bureau refused the call (429, or 503) and asked to wait `retry_after` (`None`: it
    /// did not say). It is alive, so this is no failure for the breaker.
    Refused { retry_after: Option<Duration> },
}

impl Verdict {
    /// The same judgement for the adaptive limit: a refusal is the bureau's back-pressure, a
    /// failure an error; an answer (a 500 included, as for the breaker) is a latency sample.
    pub fn signal(self) -> crate::adaptive::Signal {
        match self {
            Verdict::Answered => crate::adaptive::Signal::Ok,
            Verdict::Failed => crate::adaptive::Signal::Error,
            Verdict::Refused { .. } => crate::adaptive::Signal::BackPressure,
        }
    }
}

/// The bureau's health as this replica sees it. One per process (`Shared`), outliving reloads.
#[derive(Debug)]
pub struct Breaker {
    epoch: Instant,
    state: AtomicU8,
    /// Failures in a row while closed.
    failures: AtomicU32,
    /// Bumped each time the breaker opens, so a probe of an earlier half-open round cannot count
    /// in a later one.
    generation: AtomicU32,
    /// Probes let through in the current half-open round, and how many succeeded.
    probes: AtomicU32,
    probes_ok: AtomicU32,
    /// Nanoseconds since `epoch`.
    open_until: AtomicU64,
    hold_until: AtomicU64,
    state_gauge: IntGauge,
    opened_total: IntCounter,
    holds_total: IntCounter,
}

/// Leave to call the bureau, from [`Breaker::admit`]. Record how the call went with
/// [`Ticket::record`]; a ticket dropped unrecorded (the request left the queue) counts as
/// nothing, and gives back its probe place.
#[derive(Debug)]
#[must_use = "record the call's verdict, or drop the ticket if no call was made"]
pub struct Ticket {
    breaker: Arc<Breaker>,
    settings: BreakerSettings,
    /// `Some(generation)` for a half-open probe.
    probe: Option<u32>,
}

impl Breaker {
    /// A closed breaker reporting to `state_gauge`, `opened_total` and `holds_total`.
    pub fn new(state_gauge: IntGauge, opened_total: IntCounter, holds_total: IntCounter) -> Arc<Breaker> {
        state_gauge.set(State::Closed as i64);
        Arc::new(Breaker {
            epoch: Instant::now(),
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            probes_ok: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
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

    /// May a call go to the bureau now? Closed: yes. Open: no (answer with the returned
    /// `Retry-After`), until `open_for` has passed; then half-open: yes for the first
    /// `settings.probes` callers. Holds are checked apart ([`Breaker::held`]).
    pub fn admit(self: &Arc<Self>, settings: &BreakerSettings, now: Instant) -> Result<Ticket, Duration> {
        let mut state = self.state.load(Ordering::Acquire);
        if state == OPEN {
            let until = self.open_until.load(Ordering::Acquire);
            let at = self.nanos(now);
            if at < until {
                return Err(Duration::from_nanos(until - at));
            }
            // Whoever wins moves it on; the losers see half-open too.
            let _ = self.state.compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire);
            self.state_gauge.set(State::HalfOpen as i64);
            state = self.state.load(Ordering::Acquire);
        }
        let probe = match state {
            CLOSED => None,
            HALF_OPEN => {
                let generation = self.generation.load(Ordering::Acquire);
                let claimed = self
                    .probes
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < settings.probes).then_some(n + 1));
                if claimed.is_err() {
                    // Probes are out: their answers decide; until then, answer fast.
                    return Err(Duration::from_secs(1));
                }
                Some(generation)
            }
            // Opened again between the two loads.
            _ => return Err(settings.open_for),
        };
        Ok(Ticket { breaker: self.clone(), settings: *settings, probe })
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

    /// Holds new calls until `now + retry_after` (capped by `cap`), for everyone (`None`: the
    /// bureau answered 503, it is full) or for one tenant (`Some(its bureau_hold)`: it answered
    /// that tenant 429, too many requests from it). A longer hold already on stays.
    pub fn hold(&self, tenant_hold: Option<&AtomicU64>, now: Instant, retry_after: Duration, cap: Duration) {
        let until = self.nanos(now + retry_after.min(cap));
        let cell = tenant_hold.unwrap_or(&self.hold_until);
        if cell.fetch_max(until, Ordering::AcqRel) < until {
            self.holds_total.inc();
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn open(&self, from: u8, settings: &BreakerSettings, now: Instant) {
        if self.state.compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return; // someone else moved it
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.probes.store(0, Ordering::Release);
        self.probes_ok.store(0, Ordering::Release);
        self.failures.store(0, Ordering::Release);
        self.open_until.store(self.nanos(now + settings.open_for), Ordering::Release);
        self.state_gauge.set(State::Open as i64);
        self.opened_total.inc();
        tracing::warn!(
            target: "bureau_guard::breaker",
            open_for_ms = settings.open_for.as_millis() as u64,
            "bureau failing: circuit breaker open, answering at once"
        );
    }
}

impl Ticket {
    /// Records how the call went: failures in a row open the breaker; a probe's success counts
    /// toward closing it, its failure reopens it. A refusal is the bureau alive and full: it
    /// resets the failure run like an answer (the hold is the caller's to set).
    pub fn record(mut self, verdict: Verdict, now: Instant) {
        let b = &self.breaker;
        let probe = self.probe.take().filter(|g| *g == b.generation.load(Ordering::Acquire));
        match verdict {
            Verdict::Answered | Verdict::Refused { .. } => {
                if b.failures.load(Ordering::Relaxed) != 0 {
                    b.failures.store(0, Ordering::Release);
                }
                let enough = probe.is_some() && b.probes_ok.fetch_add(1, Ordering::AcqRel) + 1 >= self.settings.probes;
                if enough && b.state.compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    b.state_gauge.set(State::Closed as i64);
                    tracing::info!(target: "bureau_guard::breaker", "bureau answering again: circuit breaker closed");
                }
            }
            Verdict::Failed => {
                if probe.is_some() {
                    b.open(HALF_OPEN, &self.settings, now);
                } else if b.failures.fetch_add(1, Ordering::AcqRel) + 1 >= self.settings.failures {
                    b.open(CLOSED, &self.settings, now);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // An unrecorded probe (its request left the queue) gives its place to another caller.
        if let Some(generation) = self.probe
            && generation == self.breaker.generation.load(Ordering::Acquire)
        {
            let _ = self.breaker.probes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }
}

/// The breaker's verdict on a bureau answer with `status` and `Retry-After` header `retry_after`.
///
/// Only 502 and 504 (the bureau's own gateways cannot reach it) are failures: a 500 or 501 is
/// the bureau answering about one request, which a client can provoke with odd input, and must
/// not let one tenant open the breaker for everyone; it is also fast, so it holds no slot long.
pub fn verdict(status: http::StatusCode, retry_after: Option<&http::HeaderValue>) -> Verdict {
    match status.as_u16() {
        429 | 503 => Verdict::Refused { retry_after: retry_after.and_then(parse_retry_after) },
        502 | 504 => Verdict::Failed,
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
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};

    fn settings() -> BreakerSettings {
        BreakerSettings { failures: 3, open_for: Duration::from_secs(2), probes: 2 }
    }

    fn go(b: &Arc<Breaker>, now: Instant) -> Ticket {
        b.admit(&settings(), now).expect("admitted")
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_answers_fast_half_opens_and_closes() {
        let b = Breaker::unregistered();
        let s = settings();
        let t0 = Instant::now();
        // Two failures, then an answer: the run is broken, no opening.
        go(&b, t0).record(Verdict::Failed, t0);
        go(&b, t0).record(Verdict::Failed, t0);
        go(&b, t0).record(Verdict::Answered, t0);
        go(&b, t0).record(Verdict::Failed, t0);
        go(&b, t0).record(Verdict::Failed, t0);
        assert_eq!(b.state(), State::Closed);
        go(&b, t0).record(Verdict::Failed, t0);
        assert_eq!(b.state(), State::Open, "three failures in a row open it");
        assert_eq!(b.opened_total.get(), 1);

        // Open: refused at once with the time left.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.admit(&s, t1).unwrap_err(), Duration::from_millis(1500));

        // After open_for: half-open, two probes and no more.
        let t2 = t0 + Duration::from_secs(2);
        let p1 = go(&b, t2);
        let p2 = go(&b, t2);
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.admit(&s, t2).is_err(), "a third caller waits for the probes");
        p1.record(Verdict::Answered, t2);
        assert_eq!(b.state(), State::HalfOpen, "one probe of two is not enough");
        p2.record(Verdict::Answered, t2);
        assert_eq!(b.state(), State::Closed);
        assert!(b.admit(&s, t2).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_a_dropped_probe_frees_its_place() {
        let b = Breaker::unregistered();
        let s = settings();
        let t0 = Instant::now();
        for _ in 0..3 {
            go(&b, t0).record(Verdict::Failed, t0);
        }
        let t1 = t0 + Duration::from_secs(2);
        let p1 = go(&b, t1);
        let p2 = go(&b, t1);
        drop(p2); // its request left the queue: another caller may probe
        let p3 = go(&b, t1);
        p1.record(Verdict::Failed, t1);
        assert_eq!(b.state(), State::Open, "a failed probe reopens at once");
        assert!(b.admit(&s, t1 + Duration::from_secs(1)).is_err());
        // A probe of the earlier round answering late does not count in the next one.
        p3.record(Verdict::Answered, t1);
        assert_eq!(b.state(), State::Open);
        let t2 = t1 + Duration::from_secs(2);
        go(&b, t2).record(Verdict::Answered, t2);
        assert_eq!(b.state(), State::HalfOpen);
        go(&b, t2).record(Verdict::Answered, t2);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_lasts_its_retry_after_capped_for_everyone_or_one_tenant() {
        let b = Breaker::unregistered();
        let (quiet, noisy) = (AtomicU64::new(0), AtomicU64::new(0));
        let t0 = Instant::now();
        let cap = Duration::from_secs(5);
        // A 429 for one tenant holds that tenant only.
        b.hold(Some(&noisy), t0, Duration::from_secs(2), cap);
        assert_eq!(b.held(&noisy, t0), Some(t0 + Duration::from_secs(2)));
        assert_eq!(b.held(&quiet, t0), None);
        // A 503 holds everyone, capped; a shorter hold does not shorten it.
        b.hold(None, t0, Duration::from_secs(30), cap);
        b.hold(None, t0, Duration::from_secs(1), cap);
        assert_eq!(b.held(&quiet, t0 + Duration::from_secs(2)), Some(t0 + Duration::from_secs(5)));
        assert_eq!(b.held(&noisy, t0), Some(t0 + Duration::from_secs(5)), "the later end wins");
        assert_eq!(b.holds_total.get(), 2);
        assert_eq!(b.held(&quiet, t0 + Duration::from_secs(5)), None);
        assert!(b.admit(&settings(), t0).is_ok(), "a hold is not the breaker");
    }

    #[test]
    fn the_bureau_s_answers_are_judged_by_status() {
        let secs = HeaderValue::from_static("7");
        assert_eq!(
            verdict(StatusCode::TOO_MANY_REQUESTS, Some(&secs)),
            Verdict::Refused { retry_after: Some(Duration::from_secs(7)) }
        );
        assert_eq!(verdict(StatusCode::SERVICE_UNAVAILABLE, None), Verdict::Refused { retry_after: None });
        let date = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(
            verdict(StatusCode::SERVICE_UNAVAILABLE, Some(&date)),
            Verdict::Refused { retry_after: Some(Duration::ZERO) },
            "a date in the past: no wait"
        );
        assert_eq!(verdict(StatusCode::BAD_GATEWAY, None), Verdict::Failed);
        assert_eq!(verdict(StatusCode::GATEWAY_TIMEOUT, None), Verdict::Failed);
        assert_eq!(verdict(StatusCode::INTERNAL_SERVER_ERROR, None), Verdict::Answered, "about one request");
        assert_eq!(verdict(StatusCode::NOT_FOUND, None), Verdict::Answered);
        assert_eq!(verdict(StatusCode::OK, Some(&HeaderValue::from_static("soon"))), Verdict::Answered);
    }
}

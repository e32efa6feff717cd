//! Adaptive limit: finds how many concurrent calls the bureau serves without queueing (its
//! *knee*: how many workers it has for us) and keeps the fair scheduler's budget there.
//!
//! # The problem
//! The scheduler shares a budget of `limit` bureau slots among the banks. Above the bureau's
//! knee the extra calls only wait in the bureau's own FIFO queue, where fair queuing cannot
//! reach them: every bank's latency grows with the surge (quiet banks' p99 6× calm with a budget
//! of 64 against 8 workers). Below the knee the bureau idles while banks queue. The knee is
//! unknown and moves (other clients, the bureau's batch jobs), and the bureau can also get
//! *slower* without getting fuller. From outside, at one concurrency `L`, the two look alike:
//! 8 workers at 3× the service time and 8/3 workers at the same service time both answer in 3×
//! the time at `L = 8`. Only varying `L` tells them apart: above the knee latency is
//! proportional to `L` (`R = L·S/W`), at or below it latency does not move (`R = S`). The old
//! AIMD controller cut on a latency rise alone, so a slower bureau drove it to `min` (quiet
//! banks lost 16% of their calls), and it never came down from a budget 8× too high.
//!
//! # Control law
//! The controller keeps a *level* (its estimate of the knee, where it cruises) and a *baseline*
//! `R0` (the bureau's no-load latency), and measures in phases. Every permit carries the phase
//! it was granted in and the calls in flight at that moment ([`Grant`]); a phase only counts
//! the calls it granted, so each measurement is the latency at one known concurrency, never a
//! mix of old and new limits. A phase lasts at least 100 ms and 24 samples. A latency
//! difference within twice its standard error counts as none.
//! - **Cruise** at the level in windows of 150 ms. A window whose mean latency exceeds
//!   1.2 × `R0`, or an unknown or 10 s old `R0`, triggers a *down probe* once two windows in a
//!   row agree within 10% (a probe compared against a bureau in mid-change misreads it);
//!   otherwise an *up probe* follows every `probe_interval` (1 s) while the limit is in use.
//! - **Down probe** to ¾ of the concurrency in use. The latency's elasticity to concurrency,
//!   `e = ln(Rc/Rd) / ln(Nc/Nd)`, says where the knee is. No difference beyond twice its
//!   standard error: flat, the bureau is not queueing our calls, so a higher latency is the
//!   bureau's own: `R0 := Rd` (re-baseline), no cut, and the next up probe waits at least 4 s
//!   (its knee most likely stayed). `e ≥ 0.7`: the latency fell with the concurrency, the knee
//!   is below even the probe: cut to `Nc·R0/Rc` (the knee if `R0` is right; Vegas' estimate),
//!   never below half (a stale `R0` cannot collapse the budget) nor above `Nc·Rd/Rc`. Any
//!   smaller fall that is not noise: the probe ran at no-load latency and the knee lies
//!   between, at `Nc·Rd/Rc`. (A level one slot above a knee of 8 raises latency by only 1/8,
//!   `e ≈ 0.3` for the probe; reading that as "flat" once left the limit a slot above the knee
//!   for seconds, every call paying the queueing.) The probe costs the quiet banks nothing:
//!   while it is on, the scheduler serves sparse tenants, and backlogged ones with a short
//!   queue, up to the cruise limit without charging them for the withheld slots
//!   ([`AdaptiveLimit::down_from`]); only tenants with a standing queue are held to the probe's
//!   limit, and the probe measures the concurrency its calls actually saw. A probe whose
//!   concurrency did not fall (demand fell, or the tenants served up to the cruise limit
//!   filled it) measured nothing; the next one is strict, holding every tenant to its limit.
//! - **Up probe** one slot above the level (each flat probe in a row grows the next: a quarter,
//!   then a half; until the first probe that finds the knee, a half: slow start). Flat latency:
//!   the knee is higher, the level becomes the probe's concurrency and the next up probe
//!   follows at once. Probes that find the knee where it was are spaced out (1, 2, 4, 8 s).
//!   Rising latency (beyond the noise and nearer the rise queueing would cause than none): the
//!   knee is between, at `Nu·R0/Ru`. An up probe lowers the level only when the level stands
//!   on flat probes nobody has confirmed (a step of slow start read flat by noise), and then no
//!   further than where the last of them began.
//! - **Back-pressure** (a 503: the bureau says it is full; a 429 concerns one tenant, whom
//!   `bureau/call.rs` holds, and gives no sample) on a call granted since the last cut multiplies the
//!   level by `backoff` at once (once per round trip, as TCP does); during an up probe,
//!   back-pressure on a call above the level only ends the probe. **Errors** (502/504,
//!   timeouts, connection failures; see `breaker::verdict`) above `max_error_rate` of a phase cut
//!   by `backoff` at the phase's end and never count as latency (fast failures are not fast
//!   service).
//!
//! # The three cases
//! - **Budget 8× too high** (64 against 8 workers): latency is 8 × `R0`, each down probe shows
//!   `e ≈ 1`, and the level halves (64, 32, 16, 8) until a probe is flat; in the simulated
//!   bureau below the limit is at the knee in about 2 s. Cost: a quarter of the budget for one
//!   phase per halving, while the budget is too high anyway.
//! - **Bureau 3× slower** (same workers): the window's latency is 3 × `R0`, so the controller
//!   probes down, sees latency stay (`e ≈ 0`) and re-baselines instead of cutting; the level
//!   stays at the workers, and up probes (one slot) wait 4 s and more. Cost: one down probe
//!   when the slow-down happens (¾ of the budget for the surging tenant, for about 300 ms at
//!   60 ms a call; the quiet banks keep theirs), and the spaced up probes, during which a call
//!   waits for one more completion in the bureau (measured end to end in `benches/surge.rs`,
//!   scenario `slower`: the quiet banks' p99 0.87–0.99× the right fixed budget's).
//! - **Workers cut to a third**: latency rises to `L/W'·S`, the down probe shows `e ≈ 1` and the
//!   cut goes straight to `Nc·R0/Rc` = the new workers (within a second in the simulation).
//!
//! In steady state the cost is an up probe of one slot every 1 to 8 s (the interval doubles
//! while the knee stays put; the bureau holds one call more than its workers for 100–300 ms,
//! which idles nothing but makes the calls of that moment wait for one more completion), and a
//! down probe every 10 s (¾ of the budget for the backlogged tenants for 100–300 ms: about 1%
//! of their capacity). It starts
//! at `min` and grows by half until a probe finds the knee (slow start, from the first cruise
//! window that uses the limit): a budget set too high is never offered to the bureau, at the
//! cost of a few hundred milliseconds below capacity when traffic first arrives (from 4 to a
//! knee of 8 at 20 ms a call: 260 ms in the simulation).
//!
//! # Why not the alternatives
//! - **AIMD on a latency threshold** (the previous controller) cannot tell a slower bureau from
//!   a fuller one, and only cuts when latency passes the threshold, so it sits anywhere between
//!   the knee and `tolerance` × the knee.
//! - **Netflix's gradient2** compares long and short latency averages: under sustained overload
//!   the long average drifts up and the overload becomes the new normal.
//! - **Envoy's adaptive concurrency** drops to a fixed minimum to re-measure `minRTT` on a
//!   schedule, idling most of the budget (and delaying quiet banks) every time, and still reads
//!   a slower bureau as queueing between measurements.
//! - **BBR** is closest (windowed `minRTT`, gain cycling, PROBE_RTT). Its bandwidth estimate
//!   needs the delivery rate at several concurrencies; we probe the latency's response to
//!   concurrency directly, which needs a shorter probe and gives the knee in one step.
//!
//! Recording a sample touches a handful of atomics; the lock is taken once per phase (by the
//! sample that closes it) and by back-pressure samples granted since the last cut.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// A phase measures nothing before this: shorter phases measure the bureau's jitter.
const MIN_PHASE: Duration = Duration::from_millis(100);
/// Nor before this many samples: the mean latency of 24 calls with ±25% jitter is within ±3%.
const MIN_SAMPLES: u64 = 24;
/// Cruise is measured in windows this long; each may trigger a probe.
const CRUISE_WINDOW: Duration = Duration::from_millis(150);
/// A cruise window this much slower than the baseline triggers a down probe (the bureau is
/// either queueing our calls or slower; only the probe tells which).
const RISE: f64 = 1.2;
/// A baseline not confirmed by a down probe for this long is re-measured: it catches a level
/// that crept a little above the knee (BBR re-measures its minRTT every 10 s).
const BASELINE_MAX_AGE: Duration = Duration::from_secs(10);
/// Down probes go to this fraction of the concurrency in use.
const DOWN: f64 = 0.75;
/// Elasticity below this: latency does not follow concurrency, the knee is above. Below its
/// negative, latency rose while concurrency fell: the bureau changed during the probe.
const FLAT: f64 = 0.3;
/// Up probes that keep finding the knee where it was are spaced out to at most this many
/// `probe_interval`s (8 s by default): each one holds the bureau a quarter above its knee.
const UP_BACKOFF_MAX: u32 = 8;
/// Two cruise windows whose latencies differ by more than this share are a bureau in change:
/// a probe compared against either would misread it, so probes wait for a steady window.
const STEADY: f64 = 0.1;
/// Elasticity at or above this: latency is proportional to concurrency, the knee is below.
const PROPORTIONAL: f64 = 0.7;
/// A cruise whose calls saw fewer than this share of the limit in flight does not use it.
const USED: f64 = 0.9;

/// Phase tags come from one process-wide counter, so a grant made under one controller never
/// matches a phase of the controller that replaces it. 0 means "no controller".
static PHASE_IDS: AtomicU64 = AtomicU64::new(1);

/// How a bureau call ended, as the controller reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The bureau answered (including 4xx the client caused). See `breaker::verdict`, which
    /// judges every answer for both the breaker and this controller.
    Ok,
    /// The bureau failed: 502/504, a timeout, a connection failure.
    Error,
    /// The bureau said it is full: 503.
    BackPressure,
}

impl Signal {
    /// Label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Signal::Ok => "ok",
            Signal::Error => "error",
            Signal::BackPressure => "back_pressure",
        }
    }
}

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At the level: the knee estimate.
    Cruise,
    /// Below the level, to see whether latency falls with concurrency.
    ProbeDown,
    /// Above the level, to see whether latency rises with concurrency.
    ProbeUp,
}

impl Phase {
    /// Label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Cruise => "cruise",
            Phase::ProbeDown => "probe_down",
            Phase::ProbeUp => "probe_up",
        }
    }
}

/// What the controller sees, for metrics and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerView {
    /// The limit in force (during a probe, the probe's).
    pub limit: usize,
    /// The current phase.
    pub phase: Phase,
    /// Where the controller cruises: its estimate of the bureau's knee (workers), in calls.
    pub knee: f64,
    /// The bureau's no-load latency `R0`, once a down probe (or a phase at or below it) has
    /// measured it.
    pub baseline: Option<Duration>,
    /// Mean latency of the last cruise window.
    pub latency: Option<Duration>,
    /// Calls waiting inside the bureau in the last cruise window, `N·(1 − R0/R)` (Vegas):
    /// about 0 at the knee.
    pub queueing: Option<f64>,
}

/// Tuning of the adaptive limit. [`AdaptiveConfig::new`] fills in the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// The limit never goes below this (at least 1).
    pub min: usize,
    /// The limit never goes above this (at least `min`).
    pub max: usize,
    /// The limit to start from (clamped into `min..=max`).
    pub initial: usize,
    /// Factor applied to the limit on back-pressure or errors, in (0, 1). Default 0.9.
    pub backoff: f64,
    /// A phase with a larger share of failed calls cuts the limit, in [0, 1). Default 0.05.
    pub max_error_rate: f64,
    /// Cruise time between up probes (at least 100 ms). Default 1 s.
    pub probe_interval: Duration,
}

impl AdaptiveConfig {
    /// Bounds and start, with default tuning.
    pub fn new(min: usize, max: usize, initial: usize) -> AdaptiveConfig {
        AdaptiveConfig { min, max, initial, backoff: 0.9, max_error_rate: 0.05, probe_interval: Duration::from_secs(1) }
    }

    /// The config with every field moved into its documented range, so that no value can
    /// stop the controller (config validation reports bad values; this only makes them safe).
    fn sanitized(self) -> AdaptiveConfig {
        let min = self.min.max(1);
        let max = self.max.max(min);
        let defaults = AdaptiveConfig::new(min, max, min);
        AdaptiveConfig {
            min,
            max,
            initial: self.initial.clamp(min, max),
            backoff: if self.backoff > 0.0 && self.backoff < 1.0 { self.backoff } else { defaults.backoff },
            max_error_rate: if (0.0..1.0).contains(&self.max_error_rate) {
                self.max_error_rate
            } else {
                defaults.max_error_rate
            },
            probe_interval: self.probe_interval.max(MIN_PHASE),
        }
    }
}

/// What a permit remembers of its grant: the phase it was granted in and the calls in flight
/// then (itself included, for all replicas). [`AdaptiveLimit::grant`] makes one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    phase: u64,
    in_flight: usize,
}

/// The controller: fed one sample per completed bureau call, answers with a new limit when it
/// changes. Shared by every request (`Arc`); install it with
/// [`crate::bureau::scheduler::Scheduler::set_controller`].
#[derive(Debug)]
pub struct AdaptiveLimit {
    cfg: AdaptiveConfig,
    /// Time zero of `ends_at`.
    origin: Instant,
    limit: AtomicUsize,
    /// Tag of the current phase; 0 while a sample is deciding (grants then are not counted).
    phase_id: AtomicU64,
    /// While a down probe is on, the cruise limit it stepped down from; 0 otherwise (see
    /// [`AdaptiveLimit::down_from`]).
    down_from: AtomicUsize,
    /// First phase after the last cut: back-pressure on calls granted before it is old news.
    cut_id: AtomicU64,
    /// Nanoseconds after `origin` from which the phase may close; `u64::MAX` while closing.
    ends_at: AtomicU64,
    tally: Tally,
    state: Mutex<State>,
}

/// The current phase's samples (those it granted).
#[derive(Debug, Default)]
struct Tally {
    samples: AtomicU64,
    ok: AtomicU64,
    ok_nanos: AtomicU64,
    /// Sum of squared latencies in µs² (ns² would overflow after a few calls of a second).
    ok_micros_sq: AtomicU64,
    in_flight: AtomicU64,
    errors: AtomicU64,
    back_pressure: AtomicU64,
}

impl Tally {
    fn add(&self, grant: Grant, latency: Duration, signal: Signal) -> u64 {
        self.in_flight.fetch_add(grant.in_flight as u64, Ordering::Relaxed);
        match signal {
            Signal::Ok => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                self.ok_nanos.fetch_add(nanos, Ordering::Relaxed);
                let micros = nanos / 1000;
                self.ok_micros_sq.fetch_add(micros.saturating_mul(micros), Ordering::Relaxed);
            }
            Signal::Error => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Signal::BackPressure => {
                self.back_pressure.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.samples.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Empties the tally into a measurement. Samples racing the swap may land in either phase
    /// (a few among dozens); the means are estimates either way, and recording stays lock-free.
    fn take(&self) -> Measure {
        let n = self.samples.swap(0, Ordering::AcqRel).max(1) as f64;
        let ok = self.ok.swap(0, Ordering::Relaxed);
        let ok_nanos = self.ok_nanos.swap(0, Ordering::Relaxed);
        let ok_micros_sq = self.ok_micros_sq.swap(0, Ordering::Relaxed);
        let mean = ok_nanos as f64 / ok.max(1) as f64 / 1e9;
        let variance = (ok_micros_sq as f64 / ok.max(1) as f64 / 1e12 - mean * mean).max(0.0);
        Measure {
            in_flight: self.in_flight.swap(0, Ordering::Relaxed) as f64 / n,
            latency: (ok > 0).then_some(mean),
            latency_se: (variance / ok.max(1) as f64).sqrt(),
            error_rate: self.errors.swap(0, Ordering::Relaxed) as f64 / n,
            back_pressure: self.back_pressure.swap(0, Ordering::Relaxed),
        }
    }
}

/// One phase's measurement.
#[derive(Debug, Clone, Copy)]
struct Measure {
    /// Mean calls in flight when its calls were granted: the concurrency the bureau saw.
    in_flight: f64,
    /// Mean latency of its successful calls, seconds.
    latency: Option<f64>,
    /// Standard error of that mean.
    latency_se: f64,
    error_rate: f64,
    back_pressure: u64,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The cruise level, fractional so that estimates are not rounded twice.
    level: f64,
    /// When the current cruise began (up probes follow `up_interval` after).
    cruise_since: Instant,
    /// Up probes in a row that found latency flat (the knee is higher still); starts at 2, so
    /// that the first probes grow the level by half (slow start) until one finds the knee.
    flat_ups: u32,
    /// While the level stands on flat up probes no probe has confirmed yet: the level before
    /// the last of them, and the lowest latency their run measured (the bureau's no-load
    /// latency, as far as the run knows). A probe above that sees queueing may take the level
    /// back down to the knee it reads, never below where the run's last step began.
    growth: Option<Growth>,
    /// The last down probe could not lower concurrency: the next one is strict (no tenant is
    /// served above its limit; [`AdaptiveLimit::down_from`] is 0 during it).
    strict_down: bool,
    /// Time between up probes: `probe_interval`, doubled (up to `UP_BACKOFF_MAX` times) after
    /// each probe that found the knee where it was, reset when the knee moves. A knee that
    /// stays put is probed rarely, so the bureau is rarely held above it.
    up_interval: Duration,
    baseline: Option<f64>,
    /// When a down probe last confirmed the baseline.
    baseline_at: Option<Instant>,
    /// The last cruise window (or flat up probe): what a probe compares against.
    reference: Option<Measure>,
    /// The latency of the cruise window before it at the same limit, if any.
    previous: Option<f64>,
}

/// See [`State::growth`].
#[derive(Debug, Clone, Copy)]
struct Growth {
    from: f64,
    floor: f64,
}

/// What a decision asks for next.
enum Next {
    Cruise,
    Down(usize),
    Up(usize),
}

impl AdaptiveLimit {
    /// A controller starting at `cfg.initial`. Out-of-range fields are replaced (see
    /// [`AdaptiveConfig`] for each field's range and default).
    pub fn new(cfg: AdaptiveConfig) -> AdaptiveLimit {
        let cfg = cfg.sanitized();
        let now = Instant::now();
        let first = PHASE_IDS.fetch_add(1, Ordering::Relaxed);
        AdaptiveLimit {
            cfg,
            origin: now,
            limit: AtomicUsize::new(cfg.initial),
            phase_id: AtomicU64::new(first),
            down_from: AtomicUsize::new(0),
            cut_id: AtomicU64::new(first),
            ends_at: AtomicU64::new(CRUISE_WINDOW.as_nanos() as u64),
            tally: Tally::default(),
            state: Mutex::new(State {
                phase: Phase::Cruise,
                level: cfg.initial as f64,
                cruise_since: now,
                // Slow start: the first up probe follows the first window that uses the limit.
                up_interval: Duration::ZERO,
                flat_ups: 2,
                growth: None,
                strict_down: false,
                baseline: None,
                baseline_at: None,
                reference: None,
                previous: None,
            }),
        }
    }

    /// The config in force, after sanitizing.
    pub fn config(&self) -> AdaptiveConfig {
        self.cfg
    }

    /// The current limit, always within `min..=max`.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// What the controller sees now.
    pub fn view(&self) -> ControllerView {
        let st = self.lock();
        let reference = st.reference;
        let latency = reference.and_then(|m| m.latency);
        ControllerView {
            limit: self.limit(),
            phase: st.phase,
            knee: st.level,
            baseline: st.baseline.map(Duration::from_secs_f64),
            latency: latency.map(Duration::from_secs_f64),
            queueing: match (reference, latency, st.baseline) {
                (Some(m), Some(r), Some(r0)) => Some((m.in_flight * (1.0 - r0 / r)).max(0.0)),
                _ => None,
            },
        }
    }

    /// While a down probe is on, the cruise limit it stepped down from (0 otherwise). A down
    /// probe withholds a quarter of the budget for a moment to measure the bureau, not because
    /// the bureau has less: the scheduler lets sparse tenants' requests through up to this
    /// limit and does not charge them for the shortfall, so the experiment costs the quiet
    /// banks nothing and falls on the backlogged tenants (`scheduler.rs`, "Sparse tenants
    /// first"). The probe measures the concurrency its calls actually saw, sparse ones
    /// included.
    pub fn down_from(&self) -> usize {
        self.down_from.load(Ordering::Relaxed)
    }

    /// Notes a grant: `in_flight` is the calls in flight with this one, for all replicas.
    /// The permit keeps the result and hands it back to [`AdaptiveLimit::observe`].
    pub fn grant(&self, in_flight: usize) -> Grant {
        Grant { phase: self.phase_id.load(Ordering::Acquire), in_flight }
    }

    /// Records one completed bureau call: its grant, `latency` and outcome. Returns the new
    /// limit when it changed.
    pub fn observe(&self, grant: Grant, latency: Duration, signal: Signal) -> Option<usize> {
        self.observe_at(Instant::now(), grant, latency, signal)
    }

    fn observe_at(&self, now: Instant, grant: Grant, latency: Duration, signal: Signal) -> Option<usize> {
        if grant.phase == 0 {
            return None;
        }
        if signal == Signal::BackPressure && grant.phase >= self.cut_id.load(Ordering::Acquire) {
            return self.back_pressure(now, grant);
        }
        let phase = self.phase_id.load(Ordering::Acquire);
        // A call granted in another phase saw another limit: it would blur this measurement.
        if grant.phase != phase || self.tally.add(grant, latency, signal) < MIN_SAMPLES {
            return None;
        }
        let ends_at = self.ends_at.load(Ordering::Acquire);
        if self.nanos(now) < ends_at {
            return None;
        }
        // Exactly one sample wins the right to close the phase.
        if self.ends_at.compare_exchange(ends_at, u64::MAX, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return None;
        }
        let mut st = self.lock();
        if self.phase_id.load(Ordering::Acquire) != phase {
            return None; // a back-pressure cut started a new phase meanwhile
        }
        self.phase_id.store(0, Ordering::Release);
        let m = self.tally.take();
        let (phase, level) = (st.phase, st.level);
        let next = self.decide(&mut st, now, m);
        // Each decision, for whoever asks why the limit moved (`RUST_LOG=bureau_guard::adaptive=debug`).
        tracing::debug!(
            target: "bureau_guard::adaptive",
            phase = phase.as_str(),
            limit = self.limit(),
            level_before = level,
            level = st.level,
            in_flight = m.in_flight,
            latency_ms = m.latency.map(|r| r * 1e3),
            latency_se_ms = m.latency_se * 1e3,
            baseline_ms = st.baseline.map(|r| r * 1e3),
            "adaptive limit: phase measured"
        );
        self.start(&mut st, now, next, false)
    }

    /// The bureau said it is full on a call granted since the last cut.
    fn back_pressure(&self, now: Instant, grant: Grant) -> Option<usize> {
        let mut st = self.lock();
        if grant.phase < self.cut_id.load(Ordering::Acquire) {
            return None; // another sample cut for this round already
        }
        if st.phase == Phase::ProbeUp && grant.in_flight as f64 > st.level + 0.5 {
            // Only the probe's extra calls were too many: the level stands.
            return self.start(&mut st, now, Next::Cruise, true);
        }
        st.level = (st.level * self.cfg.backoff).max(self.cfg.min as f64);
        st.growth = None;
        self.start(&mut st, now, Next::Cruise, true)
    }

    /// The control law: what follows the phase that measured `m`.
    fn decide(&self, st: &mut State, now: Instant, m: Measure) -> Next {
        let failing = m.error_rate > self.cfg.max_error_rate;
        if let (Some(r0), Some(r)) = (st.baseline, m.latency) {
            // A faster bureau shows at once; a slower one only through a down probe.
            st.baseline = Some(r0.min(r));
        }
        match st.phase {
            Phase::Cruise => {
                if failing {
                    return self.cut(st);
                }
                st.previous = st.reference.and_then(|c| c.latency);
                st.reference = Some(m);
                self.after_cruise(st, now, m)
            }
            Phase::ProbeDown => {
                if failing {
                    return self.cut(st);
                }
                let Some(c) = st.reference else { return Next::Cruise };
                let (Some(rc), Some(rd)) = (c.latency, m.latency) else { return Next::Cruise };
                if m.in_flight > 0.95 * c.in_flight {
                    // The probe did not lower concurrency: demand fell, or the tenants the
                    // scheduler serves up to the cruise limit during a probe filled it. Either
                    // way it measured nothing, and the same probe again would measure nothing
                    // again (it once looped for a whole surge, holding the level at 5 with no
                    // baseline and no up probe): the next one holds everyone to its limit.
                    st.strict_down = true;
                    return Next::Cruise;
                }
                // Whatever it finds, a down probe settles the level: no longer a growth run's.
                st.growth = None;
                let e = (rc / rd).ln() / (c.in_flight / m.in_flight).ln();
                let upper = c.in_flight * rd / rc;
                let noise = (rc - rd).abs() <= 2.0 * c.latency_se.hypot(m.latency_se);
                if e <= -FLAT && !noise {
                    return Next::Cruise; // slower during the probe: measure again
                }
                if noise {
                    // Latency did not follow concurrency: whatever slowness there is, it is
                    // the bureau's own. Re-baseline; never cut on it.
                    // A bureau that got slower, not fuller, most likely kept its knee: the next
                    // up probe waits at least 4 probe intervals (each holds the now slower
                    // bureau a call above its knee, and every call of that moment waits longer).
                    // (The first baseline is no slow-down: growth from a start at `min` goes on.)
                    if st.baseline.is_some() {
                        st.up_interval = st.up_interval.max(self.cfg.probe_interval * 4);
                    }
                    st.baseline = Some(rd);
                    st.baseline_at = Some(now);
                } else if e < PROPORTIONAL {
                    // Latency fell, less than in proportion: the probe ran at the bureau's
                    // no-load latency and the cruise a little above the knee, which lies
                    // between, at `Nc·Rd/Rc`. A level one slot above a knee of 8 raises latency
                    // by only 1/8 (e ≈ 0.3 for a probe to ¾): small, but queueing all the same,
                    // and every call pays it, so any rise beyond the noise counts. The cut is
                    // as small as the rise, so noise that passes the test costs little.
                    st.up_interval = self.cfg.probe_interval;
                    st.flat_ups = 0;
                    st.level = st.level.min(upper);
                    if e < FLAT || st.baseline.is_none() {
                        // Mostly flat: the probe's latency is the no-load latency. (On the
                        // weaker evidence of a steeper fall the baseline stays: one too high
                        // would hide queueing until it ages; one too low only costs a probe.)
                        st.baseline = Some(rd);
                        st.baseline_at = Some(now);
                    }
                } else {
                    // Queueing even at the probe: cut to the knee the baseline implies, by at
                    // most half (a stale baseline must not collapse the budget).
                    st.up_interval = self.cfg.probe_interval;
                    st.flat_ups = 0;
                    let half = c.in_flight / 2.0;
                    let knee = st.baseline.map_or(half, |r0| c.in_flight * r0 / rc);
                    st.level = st.level.min(knee.max(half).min(upper.max(half)));
                }
                Next::Cruise
            }
            Phase::ProbeUp => {
                let Some(c) = st.reference else { return Next::Cruise };
                let (Some(rc), Some(ru)) = (c.latency, m.latency) else { return Next::Cruise };
                // Errors or back-pressure during the probe, or no extra slot used at all: no
                // growth. Demand just above the level, with requests queued for it, uses part
                // of a probe: that must grow the level, and to the probe's limit, not to the
                // mean concurrency used (a limit equal to the mean demand keeps a queue: with
                // 40 banks needing 4.5 slots on average, a level of 4.5 gave them a p99 of
                // 250 ms in benches/surge.rs). Latency stayed flat up to the probe's limit.
                if failing || m.back_pressure > 0 || m.in_flight <= c.in_flight + 0.25 {
                    return Next::Cruise;
                }
                // Flat: within the noise, and nearer no rise than the rise queueing would
                // cause (`rc·(Nu/Nc − 1)` if the knee were at the level). One slot above a knee
                // of 8 adds 1/8, about twice a phase's noise: "within the noise" alone called
                // 17% of such probes flat and left the level a slot above the knee. (Nor is a
                // small elasticity flat: slow start's step from 6 to 9 past a knee of 8 has
                // e = 0.29, and reading it flat once kept the limit at 9 for 20 s.)
                let queueing_rise = rc * (m.in_flight / c.in_flight - 1.0);
                let noise = 2.0 * c.latency_se.hypot(m.latency_se);
                if ru - rc <= noise.min(0.5 * queueing_rise) {
                    let floor = st.growth.map_or(rc, |g| g.floor).min(rc).min(ru);
                    st.growth = Some(Growth { from: st.level, floor });
                    st.up_interval = self.cfg.probe_interval;
                    st.flat_ups = st.flat_ups.saturating_add(1);
                    st.level = st.level.max(self.limit() as f64);
                    st.reference = Some(m);
                    return self.up_level(st).map_or(Next::Cruise, Next::Up);
                }
                // The knee is between the level and the probe: where the probe's latency says
                // the bureau would answer at no-load latency (taking the lowest of the cruise's,
                // the baseline and the growth run's, so that noise does not push the level past
                // the knee). An up probe lowers the level only when it stands on unconfirmed
                // flat probes, and then no further than where the last one began (slow start
                // from 6 to 9 past a knee of 8, read flat by noise: the probe to 13 sees the
                // knee at 8).
                let growth = st.growth.take();
                let r0 = st.baseline.map_or(rc, |r0| r0.min(rc)).min(growth.map_or(rc, |g| g.floor));
                let before = st.level;
                st.flat_ups = 0;
                let knee = (m.in_flight * r0 / ru).min(m.in_flight);
                st.level = match growth {
                    Some(g) => knee.max(g.from).min(st.level.max(knee)),
                    None => st.level.max(knee),
                };
                st.up_interval = if st.level - before < 0.5 {
                    (st.up_interval.max(self.cfg.probe_interval) * 2).min(self.cfg.probe_interval * UP_BACKOFF_MAX)
                } else {
                    self.cfg.probe_interval
                };
                Next::Cruise
            }
        }
    }

    fn after_cruise(&self, st: &mut State, now: Instant, m: Measure) -> Next {
        let applied = self.applied(st.level) as f64;
        let Some(r) = m.latency else { return Next::Cruise };
        let rose = st.baseline.is_none_or(|r0| r > RISE * r0);
        let stale = st.baseline_at.is_none_or(|at| now - at >= BASELINE_MAX_AGE);
        let steady = st.previous.is_some_and(|p| (r / p - 1.0).abs() <= STEADY);
        if (rose || stale) && steady {
            if let Some(down) = self.down_level(m.in_flight) {
                return Next::Down(down);
            }
        }
        if m.in_flight >= USED * applied && now - st.cruise_since >= st.up_interval {
            if let Some(up) = self.up_level(st) {
                return Next::Up(up);
            }
        }
        Next::Cruise
    }

    fn cut(&self, st: &mut State) -> Next {
        st.up_interval = self.cfg.probe_interval;
        st.flat_ups = 0;
        st.growth = None;
        st.level = (st.level * self.cfg.backoff).max(self.cfg.min as f64);
        Next::Cruise
    }

    /// ¾ of the concurrency in use, if that is a real step down.
    fn down_level(&self, in_flight: f64) -> Option<usize> {
        let down = ((in_flight * DOWN).floor() as usize).max(self.cfg.min);
        (down as f64 <= 0.9 * in_flight).then_some(down)
    }

    /// 1.25 × the level, at least one more, if `max` allows.
    fn up_level(&self, st: &State) -> Option<usize> {
        let applied = self.applied(st.level);
        // A bureau at its knee pays for a probe above it with queueing (quiet banks' look-ups
        // wait behind the extra calls), so a probe starts one slot up; each flat probe in a row
        // grows the next (a quarter, then a half), and until the first probe that finds the
        // knee the controller grows by half, as TCP's slow start does (by half, not double: a
        // probe never offers the bureau more than 1.5 times the knee).
        let step = match st.flat_ups {
            0 => 1,
            1 => (applied / 4).max(1),
            _ => (applied / 2).max(1),
        };
        let up = (applied + step).min(self.cfg.max);
        (up > applied).then_some(up)
    }

    fn applied(&self, level: f64) -> usize {
        (level.round() as usize).clamp(self.cfg.min, self.cfg.max)
    }

    /// Starts the next phase; returns the new limit if it changed.
    fn start(&self, st: &mut State, now: Instant, next: Next, cut: bool) -> Option<usize> {
        let (phase, limit, length) = match next {
            Next::Cruise => (Phase::Cruise, self.applied(st.level), CRUISE_WINDOW),
            Next::Down(limit) => (Phase::ProbeDown, limit, MIN_PHASE),
            Next::Up(limit) => (Phase::ProbeUp, limit, MIN_PHASE),
        };
        if (phase == Phase::Cruise && st.phase != Phase::Cruise) || cut {
            st.cruise_since = now;
        }
        if phase != Phase::Cruise || limit != self.limit() {
            // The next window is the first at its limit: no window to compare it with.
            st.reference = if phase == Phase::Cruise { None } else { st.reference };
            st.previous = None;
        }
        st.phase = phase;
        let strict = phase == Phase::ProbeDown && std::mem::take(&mut st.strict_down);
        let down_from = if phase == Phase::ProbeDown && !strict { self.applied(st.level) } else { 0 };
        self.down_from.store(down_from, Ordering::Relaxed);
        let id = PHASE_IDS.fetch_add(1, Ordering::Relaxed);
        self.phase_id.store(0, Ordering::Release);
        self.tally.take();
        if cut {
            self.cut_id.store(id, Ordering::Release);
        }
        self.phase_id.store(id, Ordering::Release);
        let changed = self.limit.swap(limit, Ordering::Relaxed) != limit;
        self.ends_at.store(self.nanos(now).saturating_add(length.as_nanos() as u64), Ordering::Release);
        changed.then_some(limit)
    }

    /// Starts a down probe to `limit` now (as a cruise window that saw a rise would), or with
    /// `None` a cruise at the level: lets the scheduler's tests put the controller in a phase
    /// without timing a bureau. Returns the new limit if it changed.
    #[cfg(test)]
    pub(crate) fn force_phase(&self, down_to: Option<usize>) -> Option<usize> {
        let mut st = self.lock();
        let next = down_to.map_or(Next::Cruise, Next::Down);
        self.start(&mut st, Instant::now(), next, false)
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;

//! Adaptive limit: finds how many concurrent calls the bureau can take from how it answers.
//!
//! The fair scheduler shares a budget of `limit` bureau slots, but a fixed limit is either too
//! low (capacity wasted on a good day) or too high (the bureau queues internally, its latency
//! climbs, then it times out for everyone, as in 2017). The bureau's real capacity also moves:
//! other clients, its own batch jobs. This controller watches the latency and outcome of every
//! completed bureau call ([`crate::scheduler::Permit::complete`]) and moves the scheduler's
//! limit between `min` and `max`.
//!
//! # Algorithm: AIMD on delay and loss
//! Samples are taken in windows of `window` completions. At the end of each window:
//! - The **baseline** is the lowest mean latency of any healthy window: the bureau's no-load
//!   latency (windows with errors are left out, since fast failures are not fast service).
//! - The window is **overloaded** if its mean latency exceeds `tolerance` × baseline (the bureau
//!   is queueing) or its error rate exceeds `max_error_rate` (it is failing or timing out).
//!   Then the limit is multiplied by `backoff`, but only once in-flight calls have come down to
//!   the current limit: right after a cut the samples still come from calls granted under the
//!   old limit, and cutting on them again would overshoot.
//! - Otherwise, if the limit was in use (peak in-flight at least half of it), it grows by
//!   √limit: about 1 s from half to full capacity at a few hundred calls per second, while each
//!   step stays small relative to the limit.
//! - If the limit sits at `min` and latency stays high for `REBASELINE_WINDOWS` windows, the
//!   slowness is not of our making (the bureau itself got slower), so the baseline is reset to
//!   the current latency; otherwise the limit would stay pinned at `min` forever.
//!
//! Why this and not a crate: `tower-acc`, `congestion-limiter` and `rate_limiter_aimd` (all
//! 0.1, young, single-maintainer) each come with their own semaphore and permit types wrapped
//! around a tower/reqwest service; ours must drive the fair scheduler's budget instead, and
//! the control law is the small part. Why AIMD and not Netflix's gradient2: gradient2 uses a
//! long-term latency average as its baseline, which drifts upward under sustained overload and
//! then tolerates it; a minimum with an explicit re-baseline rule does not drift, and AIMD's
//! behaviour is easy to state and test.
//!
//! Recording a sample touches four atomics; the lock is taken once per window, by the one
//! sample that closes it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Latencies below this are treated as equal: sub-millisecond differences are scheduling noise,
/// not bureau queueing, and a near-zero baseline would make every window look overloaded.
const BASELINE_FLOOR_SECS: f64 = 0.001;
/// Windows of high latency at `min` after which the baseline is reset to the current latency.
pub const REBASELINE_WINDOWS: u32 = 10;

/// Tuning of the adaptive limit. [`AdaptiveConfig::new`] fills in the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// The limit never goes below this (at least 1).
    pub min: usize,
    /// The limit never goes above this (at least `min`).
    pub max: usize,
    /// The limit to start from (clamped into `min..=max`).
    pub initial: usize,
    /// A window whose mean latency exceeds `tolerance` × baseline is overloaded. Default 2.0.
    pub tolerance: f64,
    /// Factor applied to the limit on overload, in (0, 1). Default 0.9.
    pub backoff: f64,
    /// A window with a larger share of failed calls is overloaded. Default 0.05.
    pub max_error_rate: f64,
    /// Completions per decision (at least 1). Default 32.
    pub window: usize,
}

impl AdaptiveConfig {
    /// Bounds and start, with default tuning.
    pub fn new(min: usize, max: usize, initial: usize) -> AdaptiveConfig {
        AdaptiveConfig { min, max, initial, tolerance: 2.0, backoff: 0.9, max_error_rate: 0.05, window: 32 }
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
            tolerance: if self.tolerance.is_finite() && self.tolerance > 1.0 {
                self.tolerance
            } else {
                defaults.tolerance
            },
            backoff: if self.backoff > 0.0 && self.backoff < 1.0 { self.backoff } else { defaults.backoff },
            max_error_rate: if (0.0..1.0).contains(&self.max_error_rate) {
                self.max_error_rate
            } else {
                defaults.max_error_rate
            },
            window: self.window.max(1),
        }
    }
}

/// The controller: fed one sample per completed bureau call, answers with a new limit when it
/// changes. Shared by every request (`Arc`); install it with
/// [`crate::scheduler::Scheduler::set_controller`].
#[derive(Debug)]
pub struct AdaptiveLimit {
    cfg: AdaptiveConfig,
    samples: AtomicUsize,
    sum_nanos: AtomicU64,
    errors: AtomicUsize,
    peak_in_flight: AtomicUsize,
    limit: AtomicUsize,
    decision: Mutex<Decision>,
}

#[derive(Debug)]
struct Decision {
    /// Kept fractional so that repeated small steps add up.
    limit: f64,
    baseline_secs: Option<f64>,
    slow_at_min: u32,
}

impl AdaptiveLimit {
    /// A controller starting at `cfg.initial`. Out-of-range fields are replaced (see
    /// [`AdaptiveConfig`] for each field's range and default).
    pub fn new(cfg: AdaptiveConfig) -> AdaptiveLimit {
        let cfg = cfg.sanitized();
        AdaptiveLimit {
            cfg,
            samples: AtomicUsize::new(0),
            sum_nanos: AtomicU64::new(0),
            errors: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(cfg.initial),
            decision: Mutex::new(Decision { limit: cfg.initial as f64, baseline_secs: None, slow_at_min: 0 }),
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

    /// The no-load latency estimate, once a healthy window has been seen.
    pub fn baseline(&self) -> Option<Duration> {
        let d = self.decision.lock().unwrap_or_else(PoisonError::into_inner);
        d.baseline_secs.map(Duration::from_secs_f64)
    }

    /// Records one completed bureau call: its `latency`, whether it succeeded (`ok` = false for
    /// 5xx, timeouts, connection errors), and the calls in flight when it completed (itself
    /// included). Returns the new limit when this sample closed a window and the limit changed.
    pub fn observe(&self, latency: Duration, ok: bool, in_flight: usize) -> Option<usize> {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.peak_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        // Exactly one sample sees the count reach the window size; it closes the window.
        if self.samples.fetch_add(1, Ordering::AcqRel) + 1 != self.cfg.window {
            return None;
        }
        // Samples racing past the boundary may land in this window or the next: the means are
        // estimates either way, and this keeps recording lock-free.
        let n = self.samples.swap(0, Ordering::AcqRel).max(1);
        let window = Window {
            mean_secs: self.sum_nanos.swap(0, Ordering::Relaxed) as f64 / n as f64 / 1e9,
            error_rate: self.errors.swap(0, Ordering::Relaxed) as f64 / n as f64,
            peak_in_flight: self.peak_in_flight.swap(0, Ordering::Relaxed),
        };
        let mut d = self.decision.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = self.decide(&mut d, &window);
        (self.limit.swap(limit, Ordering::Relaxed) != limit).then_some(limit)
    }

    fn decide(&self, d: &mut Decision, w: &Window) -> usize {
        let cfg = &self.cfg;
        let current = d.limit as usize;
        let failing = w.error_rate > cfg.max_error_rate;
        if !failing {
            d.baseline_secs = Some(d.baseline_secs.map_or(w.mean_secs, |b| b.min(w.mean_secs)));
        }
        let slow = d.baseline_secs.is_some_and(|b| w.mean_secs > b.max(BASELINE_FLOOR_SECS) * cfg.tolerance);
        if slow || failing {
            if w.peak_in_flight <= current {
                d.limit = (d.limit * cfg.backoff).max(cfg.min as f64);
            }
            if slow && !failing && current == cfg.min {
                d.slow_at_min += 1;
                if d.slow_at_min >= REBASELINE_WINDOWS {
                    d.baseline_secs = Some(w.mean_secs);
                    d.slow_at_min = 0;
                }
            }
        } else {
            d.slow_at_min = 0;
            if w.peak_in_flight * 2 >= current {
                d.limit = (d.limit + d.limit.sqrt()).min(cfg.max as f64);
            }
        }
        (d.limit as usize).clamp(cfg.min, cfg.max)
    }
}

struct Window {
    mean_secs: f64,
    error_rate: f64,
    peak_in_flight: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(20);
    const SLOW: Duration = Duration::from_millis(90);

    fn controller(min: usize, max: usize, initial: usize) -> AdaptiveLimit {
        AdaptiveLimit::new(AdaptiveConfig { window: 10, ..AdaptiveConfig::new(min, max, initial) })
    }

    /// Feeds one full window of samples with `errors` failures, the bureau loaded to
    /// `in_flight` (None: loaded to the current limit). Returns the limit afterwards.
    fn window(c: &AdaptiveLimit, latency: Duration, errors: usize, in_flight: Option<usize>) -> usize {
        let load = in_flight.unwrap_or_else(|| c.limit());
        for i in 0..c.config().window {
            c.observe(latency, i >= errors, load);
        }
        c.limit()
    }

    #[test]
    fn grows_to_max_while_latency_stays_at_baseline() {
        let c = controller(4, 100, 20);
        let mut last = c.limit();
        for _ in 0..30 {
            let now = window(&c, FAST, 0, None);
            assert!(now >= last, "limit fell from {last} to {now} at baseline latency");
            last = now;
        }
        assert_eq!(last, 100, "capped at max");
        assert_eq!(c.baseline(), Some(FAST));
    }

    #[test]
    fn shrinks_when_latency_rises_and_grows_back_when_it_recovers() {
        let c = controller(4, 400, 200);
        window(&c, FAST, 0, None); // baseline
        let high = c.limit();
        let mut last = high;
        for _ in 0..10 {
            let now = window(&c, SLOW, 0, None);
            assert!(now < last, "limit {now} did not shrink from {last} with latency 4.5x baseline");
            last = now;
        }
        let low = last;
        assert!(low < high / 2, "10 overloaded windows only took {high} to {low}");
        for _ in 0..20 {
            window(&c, FAST, 0, None);
        }
        assert!(c.limit() > high, "limit {} did not recover past {high} at baseline latency", c.limit());
        assert_eq!(c.baseline(), Some(FAST), "the slow windows did not move the baseline");
    }

    #[test]
    fn latency_within_tolerance_is_not_overload() {
        let c = controller(4, 400, 100);
        window(&c, FAST, 0, None);
        let before = c.limit();
        window(&c, FAST * 19 / 10, 0, None);
        assert!(c.limit() > before);
    }

    #[test]
    fn errors_shrink_the_limit_at_baseline_latency() {
        let c = controller(4, 400, 100);
        window(&c, FAST, 0, None);
        let before = c.limit();
        let after = window(&c, FAST, 2, None); // 20% failed
        assert!(after < before, "limit {after} not cut from {before} by errors");
    }

    #[test]
    fn fast_failures_do_not_lower_the_baseline() {
        let c = controller(4, 400, 100);
        window(&c, FAST, 0, None);
        window(&c, Duration::from_micros(100), 10, None); // the bureau answers 503 at once
        assert_eq!(c.baseline(), Some(FAST));
    }

    #[test]
    fn unused_limit_does_not_grow() {
        let c = controller(4, 400, 100);
        for _ in 0..10 {
            window(&c, FAST, 0, Some(20));
        }
        assert_eq!(c.limit(), 100, "grew while only 20 of 100 slots were used");
    }

    #[test]
    fn no_second_cut_until_in_flight_is_down_to_the_last_cut() {
        let c = controller(4, 400, 100);
        window(&c, FAST, 0, None);
        let before = c.limit();
        let cut = window(&c, SLOW, 0, Some(before));
        assert!(cut < before);
        // Calls granted under the old limit are still completing, slowly: no further cut.
        assert_eq!(window(&c, SLOW, 0, Some(before)), cut);
        // In flight is down to the new limit and latency is still high: cut again.
        assert!(window(&c, SLOW, 0, Some(cut)) < cut);
    }

    #[test]
    fn rebaselines_when_the_bureau_is_slow_even_at_the_minimum() {
        let c = controller(4, 400, 8);
        window(&c, FAST, 0, None);
        while c.limit() > 4 {
            window(&c, SLOW, 0, None);
        }
        for _ in 0..REBASELINE_WINDOWS {
            window(&c, SLOW, 0, None);
        }
        assert_eq!(c.baseline(), Some(SLOW));
        assert!(window(&c, SLOW, 0, None) > 4, "still pinned at min after re-baselining");
    }

    #[test]
    fn out_of_range_config_is_made_safe() {
        let c = AdaptiveLimit::new(AdaptiveConfig {
            tolerance: f64::NAN,
            backoff: 1.5,
            max_error_rate: -1.0,
            window: 0,
            ..AdaptiveConfig::new(0, 0, 50)
        });
        let cfg = c.config();
        assert_eq!((cfg.min, cfg.max, cfg.initial, cfg.window), (1, 1, 1, 1));
        assert_eq!((cfg.tolerance, cfg.backoff, cfg.max_error_rate), (2.0, 0.9, 0.05));
        assert_eq!(c.limit(), 1);
    }

    #[test]
    fn a_window_change_is_reported_once() {
        let c = controller(4, 400, 100);
        let reports: Vec<Option<usize>> = (0..10).map(|_| c.observe(FAST, true, 100)).collect();
        assert!(reports[..9].iter().all(Option::is_none));
        assert_eq!(reports[9], Some(110), "100 + sqrt(100)");
    }
}

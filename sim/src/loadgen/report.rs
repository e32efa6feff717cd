//! What a run reports: snapshots of the whole run and of each stream, and latency summaries of
//! their histograms.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Figures of a whole run at one moment, one entry per stream in the order
/// the streams were given.
#[derive(Clone, Debug)]
pub struct RunSnapshot {
    /// Time since the run started; for a finished run, until the last
    /// request completed.
    pub elapsed: Duration,
    /// Whether every request has completed, failed or timed out and none is
    /// left to send.
    pub finished: bool,
    /// Per-stream figures.
    pub streams: Vec<StreamSnapshot>,
}

impl RunSnapshot {
    /// The stream called `name`, if any (the first one, if names repeat).
    pub fn stream(&self, name: &str) -> Option<&StreamSnapshot> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// What happened between `earlier` and `self` (both from the same run):
    /// `elapsed` is the interval, and each stream is
    /// [`StreamSnapshot::since`] its namesake in `earlier` (or itself whole
    /// if `earlier` has none).
    pub fn since(&self, earlier: &RunSnapshot) -> RunSnapshot {
        RunSnapshot {
            elapsed: self.elapsed.saturating_sub(earlier.elapsed),
            finished: self.finished,
            streams: self
                .streams
                .iter()
                .enumerate()
                .map(|(index, stream)| {
                    let before = earlier
                        .streams
                        .get(index)
                        .filter(|s| s.name == stream.name)
                        .or_else(|| earlier.stream(&stream.name));
                    match before {
                        Some(before) => stream.since(before),
                        None => stream.clone(),
                    }
                })
                .collect(),
        }
    }
}

impl fmt::Display for RunSnapshot {
    /// A plain-text table, one row per stream, for logs and live displays.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<16} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "stream",
            "sent",
            "2xx",
            "429",
            "503",
            "other",
            "errors",
            "timeout",
            "flight",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        )?;
        for s in &self.streams {
            let latency = s.success_summary();
            let other = s.responses.saturating_sub(s.class_count(2) + s.status_count(429) + s.status_count(503));
            writeln!(
                f,
                "{:<16} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                s.name,
                s.sent,
                s.class_count(2),
                s.status_count(429),
                s.status_count(503),
                other,
                s.transport_errors + s.request_errors,
                s.timeouts,
                s.in_flight(),
                as_ms(latency.p50),
                as_ms(latency.p99),
                as_ms(latency.p999),
                as_ms(latency.max),
            )?;
        }
        write!(f, "elapsed {:.1} s{}", self.elapsed.as_secs_f64(), if self.finished { ", finished" } else { "" })
    }
}

fn as_ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Figures of one stream at one moment.
///
/// Every request issued ends in exactly one of: a response (counted in
/// `responses` and by status), a transport error, a timeout, or a request
/// error; until then it is in flight.
#[derive(Clone, Debug)]
pub struct StreamSnapshot {
    /// Stream name.
    pub name: String,
    /// Requests the whole schedule issues.
    pub planned: u64,
    /// Length of the whole schedule.
    pub schedule: Duration,
    /// Requests issued so far (their scheduled time has come).
    pub sent: u64,
    /// Complete responses (status and whole body), any status.
    pub responses: u64,
    /// Responses completed before the end of the schedule; the basis of
    /// [`StreamSnapshot::achieved_rate`].
    pub responses_in_schedule: u64,
    /// Responses by exact status code; codes never seen are absent.
    pub status_counts: BTreeMap<u16, u64>,
    /// Requests that failed to connect, send or read their response.
    pub transport_errors: u64,
    /// Requests with no complete response within the request timeout of
    /// their scheduled time (including those not even started by then,
    /// which are never sent on the wire).
    pub timeouts: u64,
    /// Requests the factory could not build (never sent on the wire).
    pub request_errors: u64,
    /// The most recent transport or request error message, for diagnosis.
    pub last_error: Option<String>,
    /// Latency (µs from scheduled send time to the end of the response body)
    /// of 2xx responses.
    pub success_latency_us: Histogram<u64>,
    /// Latency (µs, as above) of 429 and 503 responses.
    pub rejected_latency_us: Histogram<u64>,
    /// How late (µs) each request's task started relative to its scheduled
    /// time: the generator's own lag. Large values mean the generator (or the
    /// machine) could not keep up, and latencies include that delay.
    pub send_lag_us: Histogram<u64>,
}

impl StreamSnapshot {
    /// Responses with status `code`.
    pub fn status_count(&self, code: u16) -> u64 {
        self.status_counts.get(&code).copied().unwrap_or(0)
    }

    /// Responses in status class `class` (2 for 2xx, 4 for 4xx, ...).
    pub fn class_count(&self, class: u16) -> u64 {
        self.status_counts.iter().filter(|(code, _)| **code / 100 == class).map(|(_, count)| count).sum()
    }

    /// Transport errors, timeouts and request errors: requests that got no
    /// HTTP response at all.
    pub fn failures(&self) -> u64 {
        self.transport_errors + self.timeouts + self.request_errors
    }

    /// Requests issued and not yet completed, failed or timed out.
    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.responses + self.failures())
    }

    /// Offered rate: planned requests per second of schedule (0 for an empty
    /// schedule).
    pub fn offered_rate(&self) -> f64 {
        per_second(self.planned, self.schedule)
    }

    /// Achieved rate: responses completed within the schedule per second of
    /// schedule. Equals the offered rate, less the few requests still in
    /// flight at the end, when the target keeps up; falls below it when
    /// responses lag behind or requests fail.
    pub fn achieved_rate(&self) -> f64 {
        per_second(self.responses_in_schedule, self.schedule)
    }

    /// Percentiles of 2xx latency.
    pub fn success_summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.success_latency_us)
    }

    /// Percentiles of 429/503 latency.
    pub fn rejected_summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.rejected_latency_us)
    }

    /// Percentiles of the generator's send lag.
    pub fn send_lag_summary(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.send_lag_us)
    }

    /// What happened between `earlier` and `self` (snapshots of the same
    /// stream): counters, status counts and histograms are differences;
    /// `name`, `planned`, `schedule` and `last_error` are `self`'s.
    pub fn since(&self, earlier: &StreamSnapshot) -> StreamSnapshot {
        let status_counts = self
            .status_counts
            .iter()
            .filter_map(|(code, count)| {
                let delta = count.saturating_sub(earlier.status_count(*code));
                (delta > 0).then_some((*code, delta))
            })
            .collect();
        StreamSnapshot {
            name: self.name.clone(),
            planned: self.planned,
            schedule: self.schedule,
            sent: self.sent.saturating_sub(earlier.sent),
            responses: self.responses.saturating_sub(earlier.responses),
            responses_in_schedule: self.responses_in_schedule.saturating_sub(earlier.responses_in_schedule),
            status_counts,
            transport_errors: self.transport_errors.saturating_sub(earlier.transport_errors),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            request_errors: self.request_errors.saturating_sub(earlier.request_errors),
            last_error: self.last_error.clone(),
            success_latency_us: histogram_since(&self.success_latency_us, &earlier.success_latency_us),
            rejected_latency_us: histogram_since(&self.rejected_latency_us, &earlier.rejected_latency_us),
            send_lag_us: histogram_since(&self.send_lag_us, &earlier.send_lag_us),
        }
    }
}

fn per_second(count: u64, over: Duration) -> f64 {
    let seconds = over.as_secs_f64();
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// `later - earlier`; if they do not subtract (not from the same stream),
/// `later` whole.
fn histogram_since(later: &Histogram<u64>, earlier: &Histogram<u64>) -> Histogram<u64> {
    let mut delta = later.clone();
    match delta.subtract(earlier) {
        Ok(()) => delta,
        Err(_) => later.clone(),
    }
}

/// Percentiles of one latency histogram (all zero when it is empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of values recorded.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest value (to the histogram's 0.1% resolution).
    pub max: Duration,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let at = |quantile: f64| Duration::from_micros(histogram.value_at_quantile(quantile));
        Self {
            count: histogram.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
            self.count,
            as_ms(self.p50),
            as_ms(self.p90),
            as_ms(self.p99),
            as_ms(self.p999),
            as_ms(self.max),
        )
    }
}

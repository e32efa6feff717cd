//! Wall-clock time, from one source.
//!
//! Quota windows turn at the bureau's midnight, counters are saved with a timestamp,
//! certificates expire at a `notAfter`, audit records carry the time of the answer: all of it
//! reads the wall clock, and tests must be able to move it (cross midnight without waiting for
//! it). So the time comes from a [`Clock`]: `Shared::clock` on the request path (a
//! [`ManualClock`] in tests), and [`SystemClock`] where no clock is injected (config
//! validation, the listener's certificate-expiry watch, the audit writer, the state file).

use std::sync::atomic::{AtomicI64, Ordering};

/// Wall-clock time, injectable so tests can cross midnight without waiting for it.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> i64;

    /// Whole seconds since the Unix epoch.
    fn now_unix_s(&self) -> i64 {
        self.now_unix_ms().div_euclid(1000)
    }
}

/// The system clock; 0 if the system's time is before 1970.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(unix_ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(unix_ms))
    }

    pub fn set(&self, unix_ms: i64) {
        self.0.store(unix_ms, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_the_milliseconds_rounded_down() {
        let c = ManualClock::new(1_700_000_000_999);
        assert_eq!(c.now_unix_s(), 1_700_000_000);
        c.set(-1);
        assert_eq!(c.now_unix_s(), -1, "before the epoch, down is towards the past");
    }
}

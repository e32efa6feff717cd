//! Stage 5 of the request path: the tenant's daily and monthly look-up quota.
//!
//! A contract counts bureau calls, so only a request that is actually sent to the bureau is
//! charged. The quota is *reserved* here (so concurrent requests cannot overshoot it) and the
//! [`Reservation`] is committed when the bureau call starts; a request that ends before that
//! (answered from cache, joined an identical in-flight call, shed by the scheduler) drops its
//! reservation and the count is given back. Windows reset at local midnight of the configured
//! UTC offset (the bureau's day), monthly on the first of the month.

use std::sync::Arc;
use std::time::Duration;

use chrono::{Datelike, FixedOffset, NaiveDate, TimeZone};

use crate::admission::verdict::{Mode, Reason, Refusal, Verdict};
use crate::config::TenantLimits;
use crate::state::TenantState;

/// The daily and monthly windows at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Local day number since 1970-01-01.
    pub day: u32,
    /// `year * 12 + month0` of the local date.
    pub month: u32,
    /// Seconds until the next local midnight (at least 1).
    pub day_resets_in_s: u64,
    /// Seconds until the first of next month, local midnight (at least 1).
    pub month_resets_in_s: u64,
}

impl Windows {
    /// The windows at `unix_ms` for a bureau whose day is that of `offset`.
    pub fn at(unix_ms: i64, offset: FixedOffset) -> Windows {
        let secs = unix_ms.div_euclid(1000);
        let local = offset.timestamp_opt(secs, 0).single().expect("fixed offsets are unambiguous");
        let date = local.date_naive();
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
        let day = (date - epoch).num_days().max(0) as u32;
        let month = (date.year().max(0) as u32) * 12 + date.month0();
        let midnight_after = |d: NaiveDate| -> i64 {
            let naive = d.and_hms_opt(0, 0, 0).expect("midnight exists");
            offset.from_local_datetime(&naive).single().expect("fixed offsets are unambiguous").timestamp()
        };
        let next_day = date.succ_opt().expect("dates before year 262143");
        let (y, m) = if date.month() == 12 { (date.year() + 1, 1) } else { (date.year(), date.month() + 1) };
        let next_month = NaiveDate::from_ymd_opt(y, m, 1).expect("the first of a month exists");
        let until = |t: i64| ((t * 1000 - unix_ms).max(0) as u64).div_ceil(1000).max(1);
        Windows {
            day,
            month,
            day_resets_in_s: until(midnight_after(next_day)),
            month_resets_in_s: until(midnight_after(next_month)),
        }
    }

    /// The daily quota is used up: it comes back at the next local midnight.
    pub fn day_refusal(&self) -> Refusal {
        Refusal::tenant(Reason::DailyQuota, Duration::from_secs(self.day_resets_in_s))
    }

    /// The monthly quota is used up: it comes back on the first of next month.
    pub fn month_refusal(&self) -> Refusal {
        Refusal::tenant(Reason::MonthlyQuota, Duration::from_secs(self.month_resets_in_s))
    }
}

/// Where a reserved unit of one quota came from, so an unused one goes back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No such quota.
    None,
    /// This process's counter (`state.backend = "local"`).
    Counter,
    /// The units leased from Redis (`state/lease.rs`).
    Pool,
    /// Counted here while Redis was unreachable (fail-open), added to Redis later.
    Outage,
}

/// A reserved unit of quota: given back on drop unless [`Reservation::commit`] was called.
#[derive(Debug)]
pub struct Reservation {
    state: Arc<TenantState>,
    day: u32,
    month: u32,
    daily: Source,
    monthly: Source,
    committed: bool,
}

impl Reservation {
    /// A reservation of the shared (Redis) backend holding the daily unit of window `day`; the
    /// monthly unit is added once taken.
    pub fn shared(state: Arc<TenantState>, day: u32, daily: Source) -> Reservation {
        Reservation { state, day, month: 0, daily, monthly: Source::None, committed: false }
    }

    /// Records the monthly unit: where it came from, and its window.
    pub fn set_monthly(&mut self, source: Source, month: u32) {
        self.monthly = source;
        self.month = month;
    }

    /// The bureau call is happening: the charge stays.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let s = &self.state;
        match self.daily {
            Source::None => {}
            Source::Counter => s.daily.sub(self.day, 1),
            Source::Pool => s.leases().daily.avail.put(self.day, 1),
            Source::Outage => s.leases().outage_daily.sub(self.day, 1),
        }
        match self.monthly {
            Source::None => {}
            Source::Counter => s.monthly.sub(self.month, 1),
            Source::Pool => s.leases().monthly.avail.put(self.month, 1),
            Source::Outage => s.leases().outage_monthly.sub(self.month, 1),
        }
    }
}

/// One bureau call's reservations in every contract it is charged to (the tenant's, its
/// route's, its group's: `contract.rs`), committed together; dropped, each is given back.
#[derive(Debug, Default)]
pub struct Reservations(pub [Option<Reservation>; 3]);

impl Reservations {
    /// The bureau call is happening: every charge stays.
    pub fn commit(self) {
        for r in self.0.into_iter().flatten() {
            r.commit();
        }
    }
}

/// Reserves one bureau call against the tenant's daily and monthly quotas (this process's
/// counters).
pub fn reserve(state: &Arc<TenantState>, limits: &TenantLimits, w: &Windows) -> Verdict<Reservation> {
    let mut dry_run_hit = None;
    let daily = state.daily.try_add(w.day, 1, limits.daily_quota, Mode::of(limits.dry_run.daily));
    match (daily, limits.daily_quota) {
        (Err(_), Some(_)) => return Verdict::Refuse(w.day_refusal()),
        (Ok(n), Some(limit)) if n > limit => dry_run_hit = Some(w.day_refusal()),
        _ => {}
    }
    let monthly = state.monthly.try_add(w.month, 1, limits.monthly_quota, Mode::of(limits.dry_run.monthly));
    match (monthly, limits.monthly_quota) {
        (Err(_), Some(_)) => {
            state.daily.sub(w.day, 1);
            return Verdict::Refuse(w.month_refusal());
        }
        (Ok(n), Some(limit)) if n > limit && dry_run_hit.is_none() => dry_run_hit = Some(w.month_refusal()),
        _ => {}
    }
    let reservation = Reservation {
        state: state.clone(),
        day: w.day,
        month: w.month,
        daily: Source::Counter,
        monthly: Source::Counter,
        committed: false,
    };
    Verdict::admitted(reservation, dry_run_hit)
}

/// Seconds as a `Retry-After` value for a duration (rounded up, at least 1).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DryRun;

    fn kst() -> FixedOffset {
        FixedOffset::east_opt(9 * 3600).unwrap()
    }

    fn limits(daily: Option<u64>, monthly: Option<u64>) -> TenantLimits {
        TenantLimits {
            rate: None,
            burst: 1,
            max_in_flight: None,
            daily_quota: daily,
            monthly_quota: monthly,
            max_queue: 0,
            dry_run: DryRun::default(),
        }
    }

    fn allowed(v: Verdict<Reservation>) -> Reservation {
        match v {
            Verdict::Allow(r) => r,
            other => panic!("expected to be allowed, got {other:?}"),
        }
    }

    // 2026-11-23T14:59:59Z is 23:59:59 in Seoul.
    const BEFORE_KST_MIDNIGHT_MS: i64 = 1_795_445_999_000;

    #[test]
    fn windows_follow_the_local_day_of_the_offset() {
        let w = Windows::at(BEFORE_KST_MIDNIGHT_MS, kst());
        assert_eq!(w.day_resets_in_s, 1);
        let next = Windows::at(BEFORE_KST_MIDNIGHT_MS + 1000, kst());
        assert_eq!(next.day, w.day + 1);
        assert_eq!(next.day_resets_in_s, 86_400);
        assert_eq!(next.month, w.month, "still November");
        // The same instant in UTC is mid-afternoon: no reset for an offset of zero.
        let utc = FixedOffset::east_opt(0).unwrap();
        assert_eq!(Windows::at(BEFORE_KST_MIDNIGHT_MS + 1000, utc).day, Windows::at(BEFORE_KST_MIDNIGHT_MS, utc).day);
        // 2026-11-30T15:00:00Z is 2026-12-01 00:00 in Seoul: a new month.
        let dec = Windows::at(1_796_050_800_000, kst());
        assert_eq!(dec.month, w.month + 1);
        assert_eq!(Windows::at(1_796_050_799_000, kst()).month_resets_in_s, 1);
    }

    #[test]
    fn daily_quota_is_reserved_refunded_and_resets_at_midnight() {
        let state = Arc::new(TenantState::default());
        let l = limits(Some(2), None);
        let w = Windows::at(BEFORE_KST_MIDNIGHT_MS, kst());
        allowed(reserve(&state, &l, &w)).commit();
        let second = allowed(reserve(&state, &l, &w));
        assert!(matches!(
            reserve(&state, &l, &w),
            Verdict::Refuse(r) if r == Refusal::tenant(Reason::DailyQuota, Duration::from_secs(1))
        ));
        drop(second); // never sent to the bureau: given back
        allowed(reserve(&state, &l, &w)).commit();
        assert!(matches!(reserve(&state, &l, &w), Verdict::Refuse(_)));
        let tomorrow = Windows::at(BEFORE_KST_MIDNIGHT_MS + 1000, kst());
        allowed(reserve(&state, &l, &tomorrow)).commit(); // a new day, a new quota
        assert_eq!(state.daily.get(tomorrow.day), 1);
    }

    #[test]
    fn monthly_quota_refuses_and_returns_the_daily_unit() {
        let state = Arc::new(TenantState::default());
        let l = limits(Some(10), Some(1));
        let w = Windows::at(BEFORE_KST_MIDNIGHT_MS, kst());
        allowed(reserve(&state, &l, &w)).commit();
        assert!(matches!(reserve(&state, &l, &w), Verdict::Refuse(r) if r.reason == Reason::MonthlyQuota));
        assert_eq!(state.daily.get(w.day), 1, "the refused request is not charged to the day");
    }

    #[test]
    fn dry_run_counts_but_does_not_refuse() {
        let state = Arc::new(TenantState::default());
        let mut l = limits(Some(1), None);
        l.dry_run.daily = true;
        let w = Windows::at(BEFORE_KST_MIDNIGHT_MS, kst());
        let first = reserve(&state, &l, &w);
        assert!(matches!(first, Verdict::Allow(_)));
        let r = reserve(&state, &l, &w);
        assert!(matches!(r, Verdict::DryRun(_, hit) if hit.reason == Reason::DailyQuota));
    }
}

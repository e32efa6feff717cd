//! A request's own deadline (issue 17): work nobody waits for must not take a bureau slot.
//!
//! A bank's gateway or an intermediary may keep the connection open after the real client has
//! given up; bureau-guard cannot see that cancellation, but the client knows its deadline and
//! can say it: `x-request-timeout-ms: 1500`, the time it will wait from when bureau-guard reads
//! the request. Relative rather than absolute (as gRPC's `grpc-timeout` and Envoy's
//! `x-envoy-upstream-rq-timeout-ms` are): no clock agreement between the bank and bureau-guard is
//! needed, and the network time before it is the client's own to subtract. bureau-guard refuses
//! at once a request its queue cannot serve in time, drops a queued one whose deadline passes
//! (503 `bureau_busy` with `Retry-After` either way; it never reaches the bureau), and tells the
//! bureau the time left in `x-expected-timeout-ms`. Both fields are consumed: the bureau only
//! ever sees the one bureau-guard computed.

use http::HeaderMap;
use http::header::{Entry, HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::respond::{ErrorKind, ProxyError};

/// The client's deadline: milliseconds it will wait, from when bureau-guard reads the request.
pub static REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout-ms");
/// The time left of that deadline when the call leaves for the bureau, in milliseconds.
pub static EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-expected-timeout-ms");
/// Longest deadline accepted: an hour.
pub const MAX_MS: u64 = 3_600_000;

/// The request's deadline from `x-request-timeout-ms` (removed from `headers`), counted from
/// `now`; `None` without the field. A value that is not a whole number of milliseconds from 1
/// to [`MAX_MS`], or the field given twice, is a 400.
pub fn take(headers: &mut HeaderMap, now: Instant) -> Result<Option<Instant>, ProxyError> {
    let mut values = match headers.entry(&REQUEST_TIMEOUT) {
        Entry::Occupied(e) => e.remove_entry_mult().1,
        Entry::Vacant(_) => return Ok(None),
    };
    let first = values.next();
    if values.next().is_some() {
        return Err(ProxyError::new(ErrorKind::BadRequest, "x-request-timeout-ms given more than once"));
    }
    let ms = first.as_ref().and_then(parse_ms).ok_or_else(|| {
        ProxyError::new(
            ErrorKind::BadRequest,
            format!("x-request-timeout-ms must be a whole number of milliseconds from 1 to {MAX_MS}"),
        )
    })?;
    Ok(Some(now + std::time::Duration::from_millis(ms)))
}

fn parse_ms(v: &HeaderValue) -> Option<u64> {
    let b = v.as_bytes();
    // Digits only (no sign, space or exponent), at most 7 of them: no overflow, no surprises.
    if b.is_empty() || b.len() > 7 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms: u64 = std::str::from_utf8(b).ok()?.parse().ok()?;
    (1..=MAX_MS).contains(&ms).then_some(ms)
}

/// Sets `x-expected-timeout-ms` to what is left of `deadline` at `now` (at least 1 ms).
pub fn tell_the_bureau(headers: &mut HeaderMap, deadline: Instant, now: Instant) {
    let left = deadline.saturating_duration_since(now).as_millis().max(1);
    headers.insert(&EXPECTED_TIMEOUT, HeaderValue::from(left as u64));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&REQUEST_TIMEOUT, v.parse().expect("a header value"));
        }
        h
    }

    #[test]
    fn a_deadline_is_read_from_now_and_the_field_consumed() {
        let now = Instant::now();
        let mut h = with(&["1500"]);
        assert_eq!(take(&mut h, now).expect("valid"), Some(now + std::time::Duration::from_millis(1500)));
        assert!(h.is_empty());
        assert_eq!(take(&mut HeaderMap::new(), now).expect("absent"), None);
    }

    #[test]
    fn anything_but_1_to_3600000_whole_milliseconds_once_is_refused() {
        for bad in
            [vec!["0"], vec!["-5"], vec!["1.5"], vec!["3600001"], vec![" 10"], vec!["1e3"], vec![""], vec!["10", "20"]]
        {
            let mut h = with(&bad);
            let err = take(&mut h, Instant::now()).expect_err("refused");
            assert_eq!(err.kind, ErrorKind::BadRequest, "{bad:?}");
            assert!(h.is_empty(), "consumed even when refused");
        }
        assert!(take(&mut with(&["3600000"]), Instant::now()).is_ok());
    }

    #[test]
    fn the_bureau_is_told_what_is_left() {
        let now = Instant::now();
        let mut h = HeaderMap::new();
        tell_the_bureau(&mut h, now + std::time::Duration::from_millis(250), now);
        assert_eq!(h[&EXPECTED_TIMEOUT], "250");
        tell_the_bureau(&mut h, now, now + std::time::Duration::from_millis(5));
        assert_eq!(h[&EXPECTED_TIMEOUT], "1", "never 0: the field means time left");
    }
}

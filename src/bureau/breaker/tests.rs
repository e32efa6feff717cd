use super::*;
use http::{HeaderValue, StatusCode};

const A: usize = 0;
const B: usize = 1;
const TENANTS: usize = 2;

fn settings() -> BreakerSettings {
    BreakerSettings { failures: 3, open_for: Duration::from_secs(2), probes: 2 }
}

fn go(b: &Arc<Breaker>, tenant: usize, now: Instant) -> Ticket {
    b.admit(&settings(), now, tenant, TENANTS).expect("admitted")
}

const DOWN: Verdict = Verdict::Failed(Cause::Bureau);
const SLOW: Verdict = Verdict::Failed(Cause::Request);

#[tokio::test(start_paused = true)]
async fn opens_after_failures_in_a_row_answers_fast_half_opens_and_closes() {
    let b = Breaker::unregistered();
    let s = settings();
    let t0 = Instant::now();
    // Two failures, then an answer: the run is broken, no opening.
    go(&b, A, t0).record(DOWN, t0);
    go(&b, B, t0).record(DOWN, t0);
    go(&b, A, t0).record(Verdict::Answered, t0);
    go(&b, A, t0).record(DOWN, t0);
    go(&b, B, t0).record(DOWN, t0);
    assert_eq!(b.state(), State::Closed);
    go(&b, A, t0).record(DOWN, t0);
    assert_eq!(b.state(), State::Open, "three failures in a row open it");
    assert_eq!(b.opened_total.get(), 1);

    // Open: refused at once with the time left.
    let t1 = t0 + Duration::from_millis(500);
    assert_eq!(b.admit(&s, t1, A, TENANTS).unwrap_err(), Duration::from_millis(1500));

    // After open_for: half-open, two probes (one per tenant) and no more.
    let t2 = t0 + Duration::from_secs(2);
    let p1 = go(&b, A, t2);
    assert_eq!(b.state(), State::HalfOpen);
    assert!(b.admit(&s, t2, A, TENANTS).is_err(), "one probe per tenant at a time");
    let p2 = go(&b, B, t2);
    assert!(b.admit(&s, t2, 2, 3).is_err(), "a third caller waits for the probes");
    p1.record(Verdict::Answered, t2);
    assert_eq!(b.state(), State::HalfOpen, "one probe of two is not enough");
    p2.record(Verdict::Answered, t2);
    assert_eq!(b.state(), State::Closed);
    assert!(b.admit(&s, t2, A, TENANTS).is_ok());
}

#[tokio::test(start_paused = true)]
async fn one_tenant_s_failures_do_not_open_it_for_everyone() {
    let b = Breaker::unregistered();
    let t0 = Instant::now();
    // A's look-ups time out or come back too large: possibly A's own doing.
    for _ in 0..10 {
        go(&b, A, t0).record(SLOW, t0);
    }
    assert_eq!(b.state(), State::Closed, "one tenant's failures alone");
    // A second tenant failing too implicates the bureau.
    go(&b, B, t0).record(SLOW, t0);
    assert_eq!(b.state(), State::Open);
    // With one tenant configured, its failures are the only evidence there is.
    let alone = Breaker::unregistered();
    for _ in 0..3 {
        alone.admit(&settings(), t0, A, 1).unwrap().record(SLOW, t0);
    }
    assert_eq!(alone.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_only_when_it_implicates_the_bureau() {
    let b = Breaker::unregistered();
    let s = settings();
    let t0 = Instant::now();
    for _ in 0..3 {
        go(&b, A, t0).record(DOWN, t0);
    }
    let t1 = t0 + Duration::from_secs(2);
    // A's probe fails in a way A could cause: not enough to reopen, and B may probe.
    go(&b, A, t1).record(SLOW, t1);
    assert_eq!(b.state(), State::HalfOpen);
    let pb = go(&b, B, t1);
    let pa = go(&b, A, t1);
    pb.record(SLOW, t1);
    assert_eq!(b.state(), State::Open, "two tenants' probes failed");
    // A probe of the earlier round answering late counts in no later one.
    pa.record(Verdict::Answered, t1);
    assert!(b.admit(&s, t1 + Duration::from_secs(1), A, TENANTS).is_err());
    let t2 = t1 + Duration::from_secs(2);
    let p = go(&b, A, t2);
    p.record(DOWN, t2);
    assert_eq!(b.state(), State::Open, "a refused connection reopens at once");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_place() {
    let b = Breaker::unregistered();
    let t0 = Instant::now();
    for _ in 0..3 {
        go(&b, A, t0).record(DOWN, t0);
    }
    let t1 = t0 + Duration::from_secs(2);
    let p = go(&b, A, t1);
    drop(p); // its request left the queue
    go(&b, A, t1).record(Verdict::Answered, t1);
    go(&b, B, t1).record(Verdict::Answered, t1);
    assert_eq!(b.state(), State::Closed);
}

/// The race an earlier lock-free version lost: a probe place claimed while another probe's
/// failure reopened the breaker leaked into the next round, until every caller was refused for
/// good. Four threads admit, record and drop at random; the breaker must always recover.
#[test]
fn probe_places_never_leak_across_rounds_under_concurrency() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let _guard = rt.enter();
    let b = Breaker::unregistered();
    let s = BreakerSettings { failures: 1, open_for: Duration::ZERO, probes: 3 };
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..4usize {
            let b = &b;
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(thread as u64);
                for _ in 0..20_000 {
                    let tenant = rng.usize(0..6);
                    if let Ok(t) = b.admit(&s, start, tenant, 6) {
                        match rng.u8(0..3) {
                            0 => t.record(DOWN, start),
                            1 => t.record(Verdict::Answered, start),
                            _ => drop(t),
                        }
                    }
                }
            });
        }
    });
    // Whatever state it was left in, it is not stuck: probes get through and close it.
    for tenant in 0..3 {
        if let Ok(t) = b.admit(&s, start, tenant, 6) {
            t.record(Verdict::Answered, start);
        }
    }
    assert_eq!(b.state(), State::Closed, "probe places leaked: {:?}", b.lock().probing);
    assert!(b.lock().probing.is_empty());
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
    // A hold on everyone, capped; a shorter hold does not shorten it.
    b.hold(None, t0, Duration::from_secs(30), cap);
    b.hold(None, t0, Duration::from_secs(1), cap);
    assert_eq!(b.held(&quiet, t0 + Duration::from_secs(2)), Some(t0 + Duration::from_secs(5)));
    assert_eq!(b.held(&noisy, t0), Some(t0 + Duration::from_secs(5)), "the later end wins");
    assert_eq!(b.holds_total.get(), 2);
    assert_eq!(b.held(&quiet, t0 + Duration::from_secs(5)), None);
    assert!(b.admit(&settings(), t0, A, TENANTS).is_ok(), "a hold is not the breaker");
}

#[tokio::test(start_paused = true)]
async fn a_503_is_everyone_s_only_when_a_second_tenant_gets_one() {
    let b = Breaker::unregistered();
    let t0 = Instant::now();
    let wait = Duration::from_secs(2);
    assert!(!b.full_for_everyone(A, TENANTS, t0, wait), "one tenant's 503 holds that tenant");
    assert!(!b.full_for_everyone(A, TENANTS, t0, wait), "again the same tenant");
    assert!(b.full_for_everyone(B, TENANTS, t0 + Duration::from_secs(1), wait), "a second tenant within the wait");
    assert!(!b.full_for_everyone(A, TENANTS, t0 + Duration::from_secs(10), wait), "long after: one tenant again");
    assert!(b.full_for_everyone(A, 1, t0, wait), "the only tenant");
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
    let huge = HeaderValue::from_static("99999999999999999999999");
    assert_eq!(verdict(StatusCode::TOO_MANY_REQUESTS, Some(&huge)), Verdict::Refused { retry_after: None });
    assert_eq!(verdict(StatusCode::BAD_GATEWAY, None), SLOW);
    assert_eq!(verdict(StatusCode::GATEWAY_TIMEOUT, None), SLOW);
    assert_eq!(verdict(StatusCode::INTERNAL_SERVER_ERROR, None), Verdict::Answered, "about one request");
    assert_eq!(verdict(StatusCode::NOT_FOUND, None), Verdict::Answered);
    assert_eq!(verdict(StatusCode::OK, Some(&HeaderValue::from_static("soon"))), Verdict::Answered);
}

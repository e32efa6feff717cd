use super::*;
use crate::ops::metrics::Metrics;

#[test]
fn private_answers_and_cookies_belong_to_their_requester() {
    let mut h = HeaderMap::new();
    assert!(!Fetched::new(StatusCode::OK, h.clone(), Bytes::new()).private_to_requester());
    h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=60, private"));
    assert!(Fetched::new(StatusCode::OK, h, Bytes::new()).private_to_requester());
    let mut h = HeaderMap::new();
    h.insert(SET_COOKIE, HeaderValue::from_static("s=1"));
    assert!(Fetched::new(StatusCode::OK, h, Bytes::new()).private_to_requester());
}

const TTL: Duration = Duration::from_secs(60);

fn policy() -> RoutePolicy {
    RoutePolicy { ttl: TTL, stale_if_error: Duration::ZERO, statuses: vec![StatusCode::OK] }
}

fn cache(metrics: &Metrics) -> Cache {
    Cache::new(1024 * 1024, 64 * 1024, metrics.cache_handles())
}

fn key(n: u8) -> CacheKey {
    CacheKey::from_bytes([n; 32])
}

fn answer(status: u16, headers: &[(&'static str, &'static str)], body: &'static str) -> Arc<Fetched> {
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.append(*n, HeaderValue::from_static(v));
    }
    Arc::new(Fetched::new(StatusCode::from_u16(status).unwrap(), h, Bytes::from_static(body.as_bytes())))
}

fn ids(t: &str, r: &str) -> (Arc<str>, Arc<str>) {
    (Arc::from(t), Arc::from(r))
}

async fn store(c: &Cache, k: CacheKey, a: &Arc<Fetched>, p: &RoutePolicy) -> Admission {
    let (t, r) = ids("bank-a", "report");
    c.store(c.ticket(), k, a, p, &t, &r).await
}

fn is_fresh(l: &Lookup) -> bool {
    matches!(l, Lookup::Fresh(_))
}

#[tokio::test(start_paused = true)]
async fn fresh_until_the_ttl_then_stale_within_the_window_then_gone() {
    let m = Metrics::new();
    let c = cache(&m);
    let p = RoutePolicy { stale_if_error: Duration::from_secs(30), ..policy() };
    assert_eq!(store(&c, key(1), &answer(200, &[], "report"), &p).await, Admission::Stored);

    tokio::time::advance(Duration::from_secs(59)).await;
    let Lookup::Fresh(e) = c.lookup(&key(1)).await else { panic!("fresh before the ttl") };
    let resp = e.response(Instant::now(), CacheStatus::Hit);
    assert_eq!(resp.headers()[&X_CACHE], "HIT");
    assert_eq!(resp.headers()[AGE], "59");
    assert!(resp.headers().get(WARNING).is_none());
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "report");

    tokio::time::advance(Duration::from_secs(1)).await;
    let Lookup::Stale(e) = c.lookup(&key(1)).await else { panic!("stale after the ttl") };
    let resp = e.response(Instant::now(), CacheStatus::Stale);
    assert_eq!(resp.headers()[&X_CACHE], "STALE");
    assert_eq!(resp.headers()[WARNING], "110 - \"Response is Stale\"");

    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(matches!(c.lookup(&key(1)).await, Lookup::Miss), "past the stale window");
    assert_eq!(m.cache_lookups_total.with_label_values(&["hit"]).get(), 1);
    assert_eq!(m.cache_lookups_total.with_label_values(&["stale"]).get(), 1);
    assert_eq!(m.cache_lookups_total.with_label_values(&["miss"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_stale_if_error_an_expired_entry_is_a_miss() {
    let c = cache(&Metrics::new());
    store(&c, key(1), &answer(200, &[], "r"), &policy()).await;
    tokio::time::advance(TTL).await;
    assert!(matches!(c.lookup(&key(1)).await, Lookup::Miss));
}

#[tokio::test(start_paused = true)]
async fn cache_control_can_forbid_or_shorten_but_never_lengthen() {
    let c = cache(&Metrics::new());
    for (cc, skip) in [
        ("no-store", Skip::NoStore),
        ("No-Cache", Skip::NoStore),
        ("private", Skip::Private),
        ("public, private=\"x-a\"", Skip::Private),
        ("max-age=0", Skip::Expired),
        ("max-age=soon", Skip::Expired),
    ] {
        let a = Arc::new(Fetched::new(
            StatusCode::OK,
            HeaderMap::from_iter([(CACHE_CONTROL, HeaderValue::from_str(cc).unwrap())]),
            Bytes::new(),
        ));
        assert_eq!(store(&c, key(1), &a, &policy()).await, Admission::Skipped(skip), "{cc}");
        assert!(matches!(c.lookup(&key(1)).await, Lookup::Miss), "{cc}");
    }

    let ttl_of = |cc: &'static str, age: &'static str, n: u8| {
        let c = &c;
        async move {
            let a = answer(200, &[("cache-control", cc), ("age", age)], "r");
            assert_eq!(store(c, key(n), &a, &policy()).await, Admission::Stored, "{cc}");
            let Lookup::Fresh(e) = c.lookup(&key(n)).await else { panic!("{cc}") };
            e.fresh_until - a.received_at
        }
    };
    assert_eq!(ttl_of("max-age=10", "0", 2).await, Duration::from_secs(10), "max-age lowers the ttl");
    assert_eq!(ttl_of("public, max-age=3600", "0", 3).await, TTL, "but cannot raise it");
    assert_eq!(ttl_of("max-age=10, s-maxage=20", "0", 4).await, Duration::from_secs(20), "s-maxage wins");
    assert_eq!(ttl_of("max-age=10", "4", 5).await, Duration::from_secs(6), "the age it arrived with counts");

    let Lookup::Fresh(e) = c.lookup(&key(5)).await else { panic!() };
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(e.response(Instant::now(), CacheStatus::Hit).headers()[AGE], "6", "4 s upstream + 2 s here");
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(matches!(c.lookup(&key(5)).await, Lookup::Miss));
}

#[tokio::test]
async fn only_configured_statuses_and_plain_answers_are_stored() {
    let c = cache(&Metrics::new());
    assert_eq!(store(&c, key(1), &answer(500, &[], "down"), &policy()).await, Admission::Skipped(Skip::Status));
    assert_eq!(store(&c, key(1), &answer(404, &[], "none"), &policy()).await, Admission::Skipped(Skip::Status));
    let p = RoutePolicy { statuses: vec![StatusCode::OK, StatusCode::NOT_FOUND], ..policy() };
    assert_eq!(store(&c, key(1), &answer(404, &[], "none"), &p).await, Admission::Stored);
    assert!(is_fresh(&c.lookup(&key(1)).await));
    let vary = answer(200, &[("vary", "accept-language")], "r");
    assert_eq!(store(&c, key(2), &vary, &policy()).await, Admission::Skipped(Skip::Vary));
    let cookie = answer(200, &[("set-cookie", "s=1")], "r");
    assert_eq!(store(&c, key(2), &cookie, &policy()).await, Admission::Skipped(Skip::SetCookie));
}

#[tokio::test]
async fn bodies_over_max_entry_bytes_are_not_stored() {
    let m = Metrics::new();
    let c = Cache::new(1024 * 1024, 4, m.cache_handles());
    assert_eq!(store(&c, key(1), &answer(200, &[], "12345"), &policy()).await, Admission::Skipped(Skip::TooLarge));
    assert_eq!(store(&c, key(2), &answer(200, &[], "1234"), &policy()).await, Admission::Stored);
    assert_eq!(m.cache_stores_total.with_label_values(&["too_large"]).get(), 1);
    assert_eq!(m.cache_stores_total.with_label_values(&["stored"]).get(), 1);
}

#[tokio::test]
async fn answers_do_not_carry_another_requests_ids() {
    let a = answer(200, &[("x-request-id", "leader-1"), ("x-tenant", "bank-a"), ("content-type", "json")], "r");
    let resp = a.response(CacheStatus::Coalesced);
    assert!(resp.headers().get("x-request-id").is_none());
    assert!(resp.headers().get("x-tenant").is_none());
    assert_eq!(resp.headers()["content-type"], "json");
    assert_eq!(resp.headers()[&X_CACHE], "COALESCED");
}

#[tokio::test]
async fn purge_by_tenant_by_route_and_all() {
    let m = Metrics::new();
    let c = cache(&m);
    let a = answer(200, &[], "r");
    for (n, t, r) in [(1, "bank-a", "report"), (2, "bank-a", "score"), (3, "bank-b", "report"), (4, "bank-b", "score")]
    {
        let (t, r) = ids(t, r);
        assert_eq!(c.store(c.ticket(), key(n), &a, &policy(), &t, &r).await, Admission::Stored);
    }
    assert_eq!(c.purge(Purge::Tenant("bank-a")).await, 2);
    assert!(matches!(c.lookup(&key(1)).await, Lookup::Miss));
    assert!(matches!(c.lookup(&key(2)).await, Lookup::Miss));
    assert!(is_fresh(&c.lookup(&key(3)).await));
    assert_eq!(c.purge(Purge::Route("score")).await, 1);
    assert!(matches!(c.lookup(&key(4)).await, Lookup::Miss));
    assert!(is_fresh(&c.lookup(&key(3)).await));
    assert_eq!(c.purge(Purge::Tenant("bank-z")).await, 0);
    assert_eq!(c.purge(Purge::All).await, 1);
    assert!(matches!(c.lookup(&key(3)).await, Lookup::Miss));
    c.run_pending_tasks().await;
    assert_eq!(c.entries(), 0);
    assert_eq!(m.cache_evictions_total.with_label_values(&["purged"]).get(), 4);
}

#[tokio::test]
async fn a_purge_voids_answers_fetched_across_it() {
    let c = cache(&Metrics::new());
    let (t, r) = ids("bank-a", "report");
    let before = c.ticket();
    c.purge(Purge::Tenant("bank-a")).await;
    let a = answer(200, &[], "uncorrected");
    assert_eq!(c.store(before, key(1), &a, &policy(), &t, &r).await, Admission::Skipped(Skip::Purged));
    assert!(matches!(c.lookup(&key(1)).await, Lookup::Miss));
    assert_eq!(c.store(c.ticket(), key(1), &a, &policy(), &t, &r).await, Admission::Stored);
}

#[tokio::test(start_paused = true)]
async fn a_replacement_gets_its_own_lifetime() {
    let c = cache(&Metrics::new());
    store(&c, key(1), &answer(200, &[("cache-control", "max-age=1")], "old"), &policy()).await;
    store(&c, key(1), &answer(200, &[], "new"), &policy()).await;
    let Lookup::Fresh(e) = c.lookup(&key(1)).await else { panic!() };
    assert_eq!(e.response.body, "new");
    assert_eq!(e.live_for, TTL);
}

#[tokio::test]
async fn the_byte_bound_holds_with_many_entries() {
    let m = Metrics::new();
    let max = 64 * 1024;
    let c = Cache::new(max, 4096, m.cache_handles());
    let body: &'static str = Box::leak("x".repeat(1000).into_boxed_str());
    for i in 0..1000u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        store(&c, CacheKey::from_bytes(k), &answer(200, &[("content-type", "application/json")], body), &policy())
            .await;
    }
    c.run_pending_tasks().await;
    assert!(c.weighted_bytes() <= max, "{} > {max}", c.weighted_bytes());
    assert!(c.entries() > 10, "the cache is used: {}", c.entries());
    assert!(m.cache_evictions_total.with_label_values(&["size"]).get() > 0);
    c.update_gauges();
    assert_eq!(m.cache_bytes.get() as u64, c.weighted_bytes());
}

#[test]
fn stale_answers_stand_in_only_for_the_bureau_and_capacity() {
    let may: Vec<&str> = ErrorKind::ALL.iter().filter(|k| stale_may_answer(**k)).map(|k| k.code()).collect();
    assert_eq!(
        may,
        [
            "bureau_unreachable",
            "bureau_bad_response",
            "bureau_timeout",
            "request_timeout",
            "bureau_busy",
            "bureau_unavailable"
        ]
    );
    assert!(stale_may_replace(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!stale_may_replace(StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn a_buffered_upstream_response_becomes_an_answer() {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"report")));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert("x-request-id", HeaderValue::from_static("leader"));
    let f = Fetched::from_response(resp).await;
    assert_eq!((f.status, f.body.clone()), (StatusCode::NOT_FOUND, Bytes::from_static(b"report")));
    assert!(f.headers.is_empty());
}

#[test]
fn entries_weigh_their_body_headers_and_overhead() {
    let a = answer(200, &[("content-type", "json")], "12345");
    assert_eq!(weight(&a, "t", "r"), 5 + (12 + 4 + 32) + 2 + ENTRY_OVERHEAD);
}

#[test]
fn a_cached_answer_owns_its_bytes_not_the_connections_read_buffer() {
    // hyper's body and header values are slices of the connection's read buffer.
    let buffer = Bytes::from(vec![b'x'; 8192]);
    let mut headers = HeaderMap::new();
    headers.insert("x-model", HeaderValue::from_maybe_shared(buffer.slice(0..5)).unwrap());
    let fetched = Fetched::new(StatusCode::OK, headers, buffer.slice(100..140));
    let copy = fetched.compact();
    let pinned = buffer.as_ptr_range();
    assert!(!pinned.contains(&copy.body.as_ptr()), "the body is a copy");
    assert!(!pinned.contains(&copy.headers["x-model"].as_bytes().as_ptr()), "so are the header values");
    assert_eq!((copy.status, &copy.headers, &copy.body), (fetched.status, &fetched.headers, &fetched.body));
}

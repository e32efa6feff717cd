//! The request path in-process: `Proxy::handle` driven with `tower::ServiceExt::oneshot` and a
//! `Full` body, no socket on the client side; the bureau is a mock on an ephemeral port, so the
//! assertions are on what it actually received.

mod common;

use std::convert::Infallible;

use bureau_guard::proxy::Proxy;
use bureau_sim::mock_bureau::MockHandle;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

/// The common test config, with the `score` route cached by subject and tenant `b` limited
/// to `rate = 0.5`, `burst = 1`.
fn config(mock_url: &str) -> String {
    config_with(
        mock_url,
        &Extras {
            score: "cache_ttl = \"10m\"\ncache_key = [\"path.subject_id\"]",
            tenant_b: "rate = 0.5\nburst = 1",
            ..Extras::default()
        },
    )
}

/// A mock bureau and the proxy's shared state (the proxy's own listeners are not used).
struct Path {
    mock: MockHandle,
    proxy: bureau_guard::Running,
}

impl Path {
    async fn new() -> Path {
        let mock = start_mock(fast_mock()).await;
        let proxy = start_proxy(&config(&mock.url())).await;
        Path { mock, proxy }
    }

    /// One `GET` through `Proxy::handle`, as the server wraps it (`service_fn`), in-process.
    async fn get(&self, path: &str, key: Option<&str>) -> Resp {
        let mut req = Request::get(path);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        let req = req.body(Full::new(Bytes::new())).expect("a valid request");
        let proxy = Proxy::new(self.proxy.shared.clone());
        let service = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        let resp = service.oneshot(req).await.expect("the proxy never fails");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("a buffered body").to_bytes();
        Resp { status: parts.status, headers: parts.headers, body }
    }

    fn bureau_calls(&self) -> u64 {
        self.mock.bureau.stats().calls_total
    }
}

#[tokio::test]
async fn unknown_key_is_401_with_the_json_error_and_never_reaches_the_bureau() {
    let path = Path::new().await;
    let r = path.get("/v1/score/S-1", Some("not-a-key")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["content-type"], "application/json");
    let j = r.json();
    assert_eq!(j["error"], "invalid_api_key");
    assert!(j.get("tenant").is_none(), "an unidentified caller is named nowhere: {j}");
    assert_eq!(path.bureau_calls(), 0);
}

#[tokio::test]
async fn unknown_route_is_404_for_a_known_tenant() {
    let path = Path::new().await;
    let r = path.get("/v1/nothing-here", Some(KEY_A)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let j = r.json();
    assert_eq!(j["error"], "route_not_found");
    assert_eq!(j["tenant"], "a");
    assert_eq!(path.bureau_calls(), 0);
}

#[tokio::test]
async fn look_up_reaches_the_bureau_with_x_tenant_and_without_the_api_key() {
    let path = Path::new().await;
    let r = path.get("/echo/lookup/1?x=1", Some(KEY_A)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let seen = r.json();
    assert_eq!(seen["path"], "/echo/lookup/1");
    assert_eq!(seen["query"], "x=1");
    let h = &seen["headers"];
    assert_eq!(h["x-tenant"], "a");
    assert_eq!(h["x-request-id"], r.headers["x-request-id"].to_str().unwrap(), "our request id, both ways");
    assert!(h.get("x-api-key").is_none(), "the key must never reach the bureau: {h}");
}

#[tokio::test]
async fn second_identical_look_up_is_a_cache_hit_and_the_bureau_sees_one_call() {
    let path = Path::new().await;
    let first = path.get("/v1/score/S-1", Some(KEY_A)).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.headers["x-cache"], "MISS");
    // The first answer is stored before its request returns: no wait between the two.
    let second = path.get("/v1/score/S-1", Some(KEY_A)).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.headers["x-cache"], "HIT");
    assert_eq!(second.body, first.body);
    assert_eq!(path.bureau_calls(), 1);
    assert_eq!(path.mock.bureau.stats().calls_by_tenant.get("a"), Some(&1));
}

#[tokio::test]
async fn request_over_the_tenants_rate_is_429_with_retry_after() {
    let path = Path::new().await;
    // b's burst is one request; the next unit comes back in 2 s, long after the second request.
    assert_eq!(path.get("/v1/score/S-1", Some(KEY_B)).await.status, StatusCode::OK);
    let r = path.get("/v1/score/S-2", Some(KEY_B)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["retry-after"], "2");
    let j = r.json();
    assert_eq!(j["error"], "rate_limited");
    assert_eq!(j["tenant"], "b");
    assert_eq!(path.bureau_calls(), 1, "the refused request never reached the bureau");
    // Another tenant is untouched by b's rate.
    assert_eq!(path.get("/v1/score/S-3", Some(KEY_A)).await.status, StatusCode::OK);
}

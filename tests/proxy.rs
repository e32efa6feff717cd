//! The request path end to end: real sockets, a mock bureau, the proxy in-process.

mod common;

use std::time::Duration;

use bureau_sim::mock_bureau::MockConfig;
use common::*;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn forwards_method_path_query_body_and_headers_with_tenant_and_without_key() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = send(
        &client(),
        Method::POST,
        &env.url("/echo/lookup/1?x=1&y=two"),
        &[
            ("x-api-key", KEY_A),
            ("x-bank-trace", "t-77"),
            ("content-type", "application/json"),
            ("connection", "x-hop-secret"),
            ("x-hop-secret", "must-not-pass"),
            ("x-request-id", "bank-a:req-42"),
            ("authorization", &format!("Bearer {KEY_A}")),
        ],
        br#"{"subject_id":"S-1"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-client-request-id"], "bank-a:req-42", "the client's request id comes back, apart");
    let ours = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(ours, "bank-a:req-42", "x-request-id is always bureau-guard's own");
    // Idle connections close after the header read timeout (5 s): clients are told, so their pools
    // retire a connection before a request can race the close.
    assert_eq!(r.headers["keep-alive"], "timeout=4");
    let seen = r.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/echo/lookup/1");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body"], r#"{"subject_id":"S-1"}"#);
    assert_eq!(seen["version"], "HTTP/1.1");
    let h = &seen["headers"];
    assert_eq!(h["x-bank-trace"], "t-77");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["x-tenant"], "a");
    assert_eq!(h["x-request-id"], ours.as_str());
    assert_eq!(h["x-client-request-id"], "bank-a:req-42");
    assert_eq!(h["host"], env.mock.addr.to_string());
    assert!(h.get("x-api-key").is_none(), "the key must never reach the bureau: {h}");
    assert!(h.get("authorization").is_none(), "nor its second copy: {h}");
    assert!(h.get("x-hop-secret").is_none(), "fields named by Connection are hop-by-hop: {h}");
    assert!(h.get("connection").is_none(), "{h}");
}

#[tokio::test]
async fn bearer_key_identifies_and_is_stripped_and_request_id_is_made_when_absent() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = get(&env.url("/echo/x"), &[("authorization", &format!("Bearer {KEY_B}"))]).await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["x-tenant"], "b");
    assert!(h.get("authorization").is_none(), "{h}");
    let made = h["x-request-id"].as_str().unwrap().to_string();
    assert_eq!(r.headers["x-request-id"], made.as_str(), "the same id goes to the bureau and back to the client");
}

#[tokio::test]
async fn missing_or_unknown_key_is_401_and_never_reaches_the_bureau() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = get(&env.url("/v1/score/S-1"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "missing_api_key");
    let r = get(&env.url("/v1/score/S-1"), &[("x-api-key", "not-a-key")]).await;
    assert_eq!(r.status, 401);
    let j = r.json();
    assert_eq!(j["error"], "invalid_api_key");
    assert!(j.get("tenant").is_none());
    assert!(!String::from_utf8_lossy(&r.body).contains("not-a-key"), "the key is not echoed");
    assert_eq!(env.mock.bureau.stats().calls_total, 0);
}

#[tokio::test]
async fn look_ups_reach_the_bureau_attributed_to_their_tenant() {
    let env = Env::new(fast_mock(), "", "").await;
    let c = client();
    let r = send(
        &c,
        Method::POST,
        &env.url("/v1/credit-report"),
        &[("x-api-key", KEY_A)],
        br#"{"subject_id":"S-9","report_type":"full"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bureau_sim::mock_bureau::credit_report("S-9", "full"));
    for _ in 0..3 {
        assert_eq!(send(&c, Method::GET, &env.url("/v1/score/S-9"), &[("x-api-key", KEY_B)], b"").await.status, 200);
    }
    let stats = env.mock.bureau.stats();
    assert_eq!(stats.calls_by_tenant.get("a"), Some(&1));
    assert_eq!(stats.calls_by_tenant.get("b"), Some(&3));

    let metrics = get(&format!("http://{}/metrics", env.proxy.admin_addr), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains(r#"bureau_guard_requests_total{outcome="bureau",route="score",tenant="b"} 3"#), "{text}");
    assert!(text.contains(r#"bureau_guard_request_duration_seconds_count{route="report",tenant="a"} 1"#), "{text}");
}

#[tokio::test]
async fn bureau_errors_pass_through_as_the_bureaus_answer() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = send(&client(), Method::POST, &env.url("/v1/credit-report"), &[("x-api-key", KEY_A)], b"not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request", "the mock bureau's own 400");
}

#[tokio::test]
async fn unmatched_route_is_404_unless_pass_unmatched() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = get(&env.url("/v2/unknown"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 404);
    let j = r.json();
    assert_eq!(j["error"], "route_not_found");
    assert_eq!(j["tenant"], "a");
    let r = send(&client(), Method::DELETE, &env.url("/v1/score/S-1"), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.status, 404, "method is part of the route");
    assert_eq!(env.mock.bureau.stats().calls_total, 0);

    let env = Env::new(fast_mock(), "pass_unmatched = true", "").await;
    let r = get(&env.url("/echo-not-a-route"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 404, "forwarded: the mock's own 404");
    assert_eq!(r.json()["error"], "not_found");
}

#[tokio::test]
async fn oversized_body_is_413_whether_announced_or_streamed() {
    let env = Env::new(fast_mock(), r#"max_body = "1KiB""#, "").await;
    let c = client();
    let big = vec![b'x'; 2048];
    let r = send(&c, Method::POST, &env.url("/echo/x"), &[("x-api-key", KEY_A)], &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "body_too_large");

    // Chunked: no Content-Length, so the limit trips while reading.
    let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
    let mut req =
        format!("POST /echo/x HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY_A}\r\ntransfer-encoding: chunked\r\n\r\n")
            .into_bytes();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("body_too_large"), "{head}");

    let ok = send(&c, Method::POST, &env.url("/echo/x"), &[("x-api-key", KEY_A)], &[b'z'; 1000]).await;
    assert_eq!(ok.status, 200, "a body under the limit passes");
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let env = Env::new(fast_mock(), r#"max_header_bytes = "2KiB""#, "").await;
    let filler = "v".repeat(3000);
    let r = get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A), ("x-filler", &filler)]).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.json()["error"], "headers_too_large");
    assert_eq!(env.mock.bureau.stats().calls_total, 0);
}

#[tokio::test]
async fn unreachable_bureau_is_502() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = start_proxy(&config_text(&format!("http://{closed}"), "", "")).await;
    let r = get(&format!("http://{}/v1/score/S-1", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 502);
    let j = r.json();
    assert_eq!(j["error"], "bureau_unreachable");
    assert_eq!(j["tenant"], "a");
    let tenants = get(&format!("http://{}/admin/tenants", proxy.admin_addr), &[]).await.json();
    let a = tenants.as_array().unwrap().iter().find(|t| t["id"] == "a").unwrap().clone();
    assert_eq!(a["usage"]["daily_used"], 0, "a call that never reached the bureau is not charged");
}

#[tokio::test]
async fn slow_bureau_is_504_bureau_timeout() {
    let slow = MockConfig { service_time: Duration::from_secs(3), jitter: Duration::ZERO, ..MockConfig::default() };
    let env = Env::new(slow, "", r#"response_timeout = "200ms""#).await;
    let r = get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "bureau_timeout");
}

#[tokio::test]
async fn request_timeout_bounds_the_whole_request() {
    let slow = MockConfig { service_time: Duration::from_secs(3), jitter: Duration::ZERO, ..MockConfig::default() };
    let env = Env::new(slow, r#"request_timeout = "200ms""#, "").await;
    let r = get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 504);
    let j = r.json();
    assert_eq!(j["error"], "request_timeout");
    assert_eq!(j["tenant"], "a", "attributed even though the stages were cut off");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_on_the_same_port() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = send(&h2_client(), Method::GET, &env.url("/echo/h2"), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["headers"]["x-tenant"], "a");
    assert_eq!(seen["version"], "HTTP/1.1", "the bureau hop stays HTTP/1.1");
    // And HTTP/1.1 on the very same port.
    assert_eq!(get(&env.url("/echo/h1"), &[("x-api-key", KEY_A)]).await.status, 200);
}

#[tokio::test]
async fn slowloris_connection_is_closed_by_the_header_read_timeout() {
    let env = Env::new(fast_mock(), r#"header_read_timeout = "300ms""#, "").await;
    let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
    s.write_all(b"GET /v1/score/S-1 HTTP/1.1\r\nhost: x\r\nx-slow: ").await.unwrap();
    let mut buf = [0u8; 1024];
    // The server must end the connection on its own; the outer bound only keeps a broken build from hanging.
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut total = Vec::new();
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the proxy closed the slow connection");
    let text = String::from_utf8_lossy(&read);
    assert!(read.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(env.mock.bureau.stats().calls_total, 0);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let slow = MockConfig {
        service_time: Duration::from_millis(300),
        jitter: Duration::ZERO,
        workers: 64,
        ..MockConfig::default()
    };
    let env = Env::new(slow, "", "").await;
    let n = 20;
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = env.url(&format!("/v1/score/S-{i}"));
        tasks.push(tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A)]).await.status }));
    }
    let bureau = env.mock.bureau.clone();
    wait_until("all requests at the bureau", || bureau.stats().in_flight == n).await;

    let (addr, admin) = (env.proxy.addr, env.proxy.admin_addr);
    assert_eq!(get(&format!("http://{admin}/readyz"), &[]).await.status, 200);
    let shared = env.proxy.shared.clone();
    let draining = tokio::spawn(env.proxy.shutdown());
    wait_until("readiness false", || !shared.ready.load(std::sync::atomic::Ordering::Acquire)).await;
    // Requests are still at the bureau: the admin listener says "not ready" meanwhile.
    assert!(bureau.stats().in_flight > 0);
    assert_eq!(get(&format!("http://{admin}/readyz"), &[]).await.status, 503, "load balancers see draining");
    let drained = draining.await.unwrap();
    assert!(drained, "drain completed within the drain timeout");
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "no in-flight request is lost");
    }
    assert!(TcpStream::connect(addr).await.is_err(), "no new connections after shutdown");
}

#[tokio::test]
async fn readiness_grace_keeps_accepting_while_readyz_says_draining() {
    let env = Env::new(fast_mock(), r#"readiness_grace = "1s""#, "").await;
    let (url, admin) = (env.url("/v1/score/S-1"), env.proxy.admin_addr);
    let shared = env.proxy.shared.clone();
    let draining = tokio::spawn(env.proxy.shutdown());
    wait_until("readiness false", || !shared.ready.load(std::sync::atomic::Ordering::Acquire)).await;
    assert_eq!(get(&format!("http://{admin}/readyz"), &[]).await.status, 503);
    assert_eq!(get(&url, &[("x-api-key", KEY_A)]).await.status, 200, "new connections are still served in the grace");
    assert!(draining.await.unwrap());
    assert!(TcpStream::connect(url.trim_start_matches("http://").split('/').next().unwrap()).await.is_err());
}

#[tokio::test]
async fn ambiguous_paths_are_refused_with_400_before_the_bureau() {
    let env = Env::new(fast_mock(), "", "").await;
    let c = client();
    for path in [
        "/echo/a/..%2F..%2Fv1%2Fscore%2FS-1",
        "/echo/%2e%2e/v1/score/S-1",
        "/echo/S-1;jsessionid=x",
        "/echo/a%5C..%5Cb",
        "/echo/a%252Fb",
        "/echo/a%00b",
        "/echo/a?report_type=x;subject_id=S-2",
        "/echo/a%G0",
    ] {
        let r = send(&c, Method::GET, &env.url(path), &[("x-api-key", KEY_A)], b"").await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let j = r.json();
        assert_eq!(j["error"], "bad_request", "{path}");
        assert!(!r.text().contains("S-1"), "the path is not echoed: {}", r.text());
    }
}

#[tokio::test]
async fn the_path_forwarded_is_the_normalised_path_that_was_routed() {
    let env = Env::new(fast_mock(), "", "").await;
    let c = client();
    for (path, seen) in [
        ("/echo/a/../b//c/", "/echo/b/c"),
        ("/echo/./x/%7e%2D%41?q=a+b%2b", "/echo/x/~-A"),
        ("//echo///x/", "/echo/x"),
        ("/v1/score/../../echo/y", "/echo/y"),
    ] {
        let r = send(&c, Method::GET, &env.url(path), &[("x-api-key", KEY_A)], b"").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let j = r.json();
        assert_eq!(j["path"], seen, "{path}");
    }
    let r = send(&c, Method::GET, &env.url("/echo/x/%7e?q=a+b%2b"), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.json()["query"], "q=a+b%2b", "the query is forwarded unchanged");

    // Priced as what the bureau serves: `/echo/../v1/score/S-1` is a score look-up, not an echo.
    let r = send(&c, Method::GET, &env.url("/echo/../v1/score/S-1"), &[("x-api-key", KEY_A)], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(env.mock.bureau.stats().calls_by_tenant.get("a"), Some(&1), "the bureau served a score");
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains(r#"bureau_guard_requests_total{outcome="bureau",route="score",tenant="a"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn identity_and_forwarding_fields_come_from_bureau_guard_never_from_the_bank() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = get(
        &env.url("/echo/x"),
        &[
            ("x-api-key", KEY_A),
            ("x_tenant", "b"),
            ("X_Request_Id", "forged-id"),
            ("forwarded", "for=192.0.2.1;by=bureau"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x_forwarded_for", "192.0.2.2"),
            ("x-real-ip", "192.0.2.3"),
            ("x-bank-trace", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["x-tenant"], "a");
    assert_eq!(h["x-bank-trace"], "kept");
    for name in ["x_tenant", "x_request_id", "x_forwarded_for", "x-real-ip"] {
        assert!(h.get(name).is_none(), "{name} reached the bureau: {h}");
    }
    // Where the request came from, as bureau-guard knows it (the connection), not as claimed.
    assert_eq!((h["forwarded"].as_str(), h["x-forwarded-for"].as_str()), (Some("for=127.0.0.1"), Some("127.0.0.1")));
    assert_ne!(h["x-request-id"], "forged-id");
    assert!(h.get("x-client-request-id").is_none(), "the client sent no x-request-id: {h}");
    assert_eq!(r.headers["x-request-id"], h["x-request-id"].as_str().unwrap());
}

#[tokio::test]
async fn credentials_never_reach_the_bureau_in_any_field_or_value() {
    let env = Env::new(fast_mock(), "", "").await;
    let r = get(
        &env.url("/echo/x"),
        &[
            ("x-api-key", KEY_A),
            ("authorization", "Basic YmFuay1hOnNlY3JldA=="),
            ("authorization", &format!("Bearer {KEY_A}")),
            ("x_api_key", KEY_A),
            ("proxy-authorization", "Basic eDp5"),
            ("cookie", "bureau_session=bank-b"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    for name in ["x-api-key", "x_api_key", "authorization", "proxy-authorization", "cookie"] {
        assert!(h.get(name).is_none(), "{name} reached the bureau: {h}");
    }
    assert!(!h.to_string().contains(KEY_A), "{h}");
    assert_eq!(h["x-tenant"], "a");
}

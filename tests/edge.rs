//! The edge (issue 19): what a client can hold before it authenticates. Real sockets on
//! 127.0.0.1:0, the proxy and a mock bureau in-process.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the server takes to close `stream` (EOF or reset), if it does within `bound`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, read_to_end).await.ok().map(|()| started.elapsed())
}

fn refused(env: &Env, reason: &str) -> u64 {
    let text = String::from_utf8(env.proxy.shared.metrics.encode()).unwrap();
    let series = format!("bureau_guard_connections_refused_total{{reason=\"{reason}\"}}");
    metric_value(&text, &series).unwrap_or(0.0) as u64
}

/// Waits until `reason`'s refusals reach `n` (the worker thread counts a refusal as it closes
/// the socket, so the client may see the close first), then checks it is exactly `n`.
async fn refused_reaches(env: &Env, reason: &str, n: u64) {
    wait_until(&format!("{n} refusals for {reason}"), || refused(env, reason) >= n).await;
    assert_eq!(refused(env, reason), n);
}

/// One HTTP/1.1 request on a raw connection (after whatever `preamble` the test sends), read to
/// the server's close; returns the status line.
async fn raw_get(addr: std::net::SocketAddr, preamble: &[u8], key: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = preamble.to_vec();
    req.extend_from_slice(
        format!("GET /v1/score/S1 HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n").as_bytes(),
    );
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_string()
}

#[tokio::test]
async fn silent_and_half_preface_connections_are_closed_at_the_header_deadline() {
    let env = Env::new(fast_mock(), "header_read_timeout = \"300ms\"", "").await;
    // Silent sockets, and sockets stopped inside the h2 preface: hyper-util's version sniffing
    // waits for 24 bytes with no timer of its own.
    let mut socks = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        socks.push(s);
    }
    let mut slowest = Duration::ZERO;
    for (i, s) in socks.iter_mut().enumerate() {
        let took = closed_within(s, Duration::from_secs(5)).await;
        let took = took.unwrap_or_else(|| panic!("connection {i} still open after 5 s"));
        slowest = slowest.max(took);
    }
    assert!(slowest < Duration::from_secs(2), "slowest close {slowest:?}");
    eprintln!(
        "40 silent or half-preface connections, header_read_timeout 300ms: all closed, the last {slowest:?} after the test began waiting"
    );
    // A bank is still served.
    assert_eq!(get(&env.url("/v1/score/S1"), &[("x-api-key", KEY_A)]).await.status, 200);
}

#[tokio::test]
async fn a_tls_client_silent_after_its_handshake_is_closed_at_the_header_deadline() {
    let dir = temp_dir("edge-tls");
    let ca = pki::Ca::new("Edge Test CA");
    let leaf = ca.issue(&pki::LeafSpec { cn: "bureau-guard", dns: &["localhost"], ip: true, ..Default::default() });
    let (cert, key) = leaf.write(&dir, "server");
    let server = format!(
        "header_read_timeout = \"300ms\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let env = Env::with(fast_mock(), &Extras { server: &server, ..Extras::default() }).await;
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let tcp = TcpStream::connect(env.proxy.addr).await.unwrap();
        let config = pki::client_config(&ca, None, &[alpn], &[]);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("handshake");
        // Nothing after the handshake: no preface, no request head.
        let took = closed_within(&mut tls, Duration::from_secs(5)).await;
        assert!(took.is_some(), "a silent TLS connection ({alpn:?}) was still open after 5 s");
    }
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_the_idle_timeout() {
    let env = Env::new(fast_mock(), "idle_timeout = \"300ms\"", "").await;
    let tcp = TcpStream::connect(env.proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    let driver = tokio::spawn(conn);
    let req =
        http::Request::get(env.url("/v1/score/S1")).header("x-api-key", KEY_A).body(Full::new(Bytes::new())).unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the server closed the idle h2 connection (GOAWAY)")
        .unwrap()
        .ok();
    assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    assert_eq!(
        metric_value(
            &String::from_utf8(env.proxy.shared.metrics.encode()).unwrap(),
            "bureau_guard_connections_closed_total{reason=\"idle\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn when_full_silent_sockets_make_room_for_banks_and_a_busy_bank_is_never_closed() {
    let mock = bureau_sim::mock_bureau::MockConfig {
        service_time: Duration::from_millis(600),
        jitter: Duration::ZERO,
        workers: 64,
        ..fast_mock()
    };
    let env =
        Env::new(mock, "max_connections = 10\nmax_connections_per_source = 100\nheader_read_timeout = \"10s\"", "")
            .await;
    // Bank A: a request in flight (the bureau takes 600 ms).
    let busy_url = env.url("/v1/score/S1");
    let busy = tokio::spawn(async move { get(&busy_url, &[("x-api-key", KEY_A)]).await.status });
    let shared = env.proxy.shared.clone();
    wait_until("bank A's request in flight", || shared.metrics.requests_in_flight.get() == 1).await;
    // Thirty silent sockets: far more than the cap.
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(env.proxy.addr).await.unwrap());
    }
    let gauge = &env.proxy.shared.metrics.connections.open;
    let evicted = || {
        let text = String::from_utf8(shared.metrics.encode()).unwrap();
        metric_value(&text, "bureau_guard_connections_closed_total{reason=\"evicted\"}").unwrap_or(0.0)
    };
    wait_until("the listener admitted the silent sockets", || evicted() >= 21.0).await;
    eprintln!("open {}", gauge.get());
    // Bank B, on a new connection, is served: a silent socket made room.
    let started = Instant::now();
    assert_eq!(get(&env.url("/v1/score/S2"), &[("x-api-key", KEY_B)]).await.status, 200);
    let served_in = started.elapsed();
    assert_eq!(busy.await.unwrap(), 200, "bank A's busy connection was not closed");
    assert!(gauge.get() <= 10);
    // The evicted sockets were closed by the server.
    let mut closed = 0;
    for s in &mut silent {
        if closed_within(s, Duration::from_millis(50)).await.is_some() {
            closed += 1;
        }
    }
    assert!(closed >= 21, "only {closed} silent sockets closed");
    eprintln!("bank B served in {served_in:?} with max_connections reached; {closed}/30 silent sockets closed");
}

#[tokio::test]
async fn proxy_protocol_gives_the_client_address_and_per_source_limits_count_it() {
    let server = "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\nmax_connections_per_source = 2";
    let env = Env::new(fast_mock(), server, "").await;
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 8080\r\n").into_bytes();
    // Two silent connections from 192.0.2.1 through the load balancer: its quota.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
        s.write_all(&v1("192.0.2.1")).await.unwrap();
        held.push(s);
    }
    let shared = env.proxy.shared.clone();
    wait_until("two connections open", || shared.metrics.connections.open.get() == 2).await;
    let mut third = TcpStream::connect(env.proxy.addr).await.unwrap();
    third.write_all(&v1("192.0.2.1")).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(2)).await.is_some(), "a third from 192.0.2.1 is refused");
    refused_reaches(&env, "per_source", 1).await;
    // Other clients behind the same load balancer are served, v1 and v2 alike.
    assert!(raw_get(env.proxy.addr, &v1("192.0.2.2"), KEY_A).await.contains(" 200 "));
    let v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        ("192.0.2.3:5000".parse::<std::net::SocketAddr>().unwrap(), env.proxy.addr),
    )
    .build()
    .unwrap();
    assert!(raw_get(env.proxy.addr, &v2, KEY_A).await.contains(" 200 "));
    // The load balancer must send the header: a bare request from it is refused.
    assert_eq!(raw_get(env.proxy.addr, b"", KEY_A).await, "");
    refused_reaches(&env, "proxy_header", 1).await;
}

#[tokio::test]
async fn a_proxy_header_from_an_untrusted_peer_is_refused() {
    let env = Env::new(fast_mock(), "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]", "").await;
    let line = raw_get(env.proxy.addr, b"PROXY TCP4 10.1.1.1 127.0.0.1 1 2\r\n", KEY_A).await;
    assert_eq!(line, "", "refused: no answer");
    refused_reaches(&env, "proxy_header", 1).await;
    // Without a header, the peer is served as itself.
    assert!(raw_get(env.proxy.addr, b"", KEY_A).await.contains(" 200 "));
}

#[tokio::test]
async fn a_source_failing_authentication_is_held_off_briefly_and_others_are_served() {
    let server = "trusted_proxies = [\"127.0.0.1/32\"]\nforwarded_for = true\nauth_failure_limit = 3\nauth_failure_penalty = \"1s\"";
    let env = Env::new(fast_mock(), server, "").await;
    let url = env.url("/v1/score/S1");
    let from = |ip: &'static str, key: &'static str| [("x-forwarded-for", ip), ("x-api-key", key)];
    for _ in 0..3 {
        assert_eq!(get(&url, &from("198.51.100.7", "wrong")).await.status, 401);
    }
    let held = get(&url, &from("198.51.100.7", "wrong-again")).await;
    assert_eq!(held.status, 429);
    assert_eq!(held.json()["error"], "too_many_auth_failures");
    assert!(held.headers.contains_key("retry-after"));
    // A bank identified from the same address is not locked out by someone else's bad keys,
    // nor is a bank from another address.
    assert_eq!(get(&url, &from("198.51.100.7", KEY_A)).await.status, 200);
    assert_eq!(get(&url, &from("198.51.100.8", KEY_B)).await.status, 200);
    assert_eq!(
        metric_value(
            &String::from_utf8(env.proxy.shared.metrics.encode()).unwrap(),
            "bureau_guard_auth_penalties_total"
        ),
        Some(1.0)
    );
    // The penalty is short: after it, a bad key is a plain 401 again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if get(&url, &from("198.51.100.7", "wrong")).await.status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "still held off after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Behind a trusted load balancer that says who the client is, the bureau is told that client,
/// request by request, and the peer's address when the balancer names none (the peer's fields
/// are formatted once per connection; a client the balancer names gets fields of its own).
#[tokio::test]
async fn the_bureau_is_told_the_client_a_trusted_proxy_names_on_each_request() {
    let env = Env::new(fast_mock(), "trusted_proxies = [\"127.0.0.1/32\"]\nforwarded_for = true", "").await;
    let url = env.url("/echo/x");
    let told = |r: &Resp| {
        let h = &r.json()["headers"];
        (h["forwarded"].as_str().map(str::to_owned), h["x-forwarded-for"].as_str().map(str::to_owned))
    };
    for (claimed, seen) in
        [(Some("198.51.100.7"), "198.51.100.7"), (None, "127.0.0.1"), (Some("2001:db8::7"), "2001:db8::7")]
    {
        let mut headers = vec![("x-api-key", KEY_A)];
        headers.extend(claimed.map(|ip| ("x-forwarded-for", ip)));
        let r = get(&url, &headers).await;
        assert_eq!(r.status, 200);
        let forwarded = if seen.contains(':') { format!("for=\"[{seen}]\"") } else { format!("for={seen}") };
        assert_eq!(told(&r), (Some(forwarded), Some(seen.to_owned())), "claimed {claimed:?}");
    }
}

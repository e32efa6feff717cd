//! Test harness: a mock bureau and a proxy in-process on ephemeral ports, and a real HTTP client.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bureau_guard::app::{self, Running};
use bureau_guard::config::Config;
use bureau_guard::mock_bureau::{self, MockConfig, MockHandle};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub const KEY_A: &str = "key-a";
pub const KEY_B: &str = "key-b";

pub fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A config for tests: ephemeral ports, tenants `a` (key-a) and `b` (key-b), routes `score`,
/// `report` and `echo` (any of GET/POST under /echo/). `extra` is appended to `[server]`,
/// `upstream_extra` to `[upstream]`.
pub fn config_text(upstream_url: &str, server_extra: &str, upstream_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server_extra}
[admin]
listen = "127.0.0.1:0"
[upstream]
url = "{upstream_url}"
{upstream_extra}
[log]
access_log = false
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[routes]]
name = "report"
method = "POST"
path = "/v1/credit-report"
[[routes]]
name = "echo"
method = "POST"
path = "/echo/{{*rest}}"
[[routes]]
name = "echo_get"
method = "GET"
path = "/echo/{{*rest}}"
[[tenants]]
id = "a"
api_key_sha256 = "{}"
[[tenants]]
id = "b"
api_key_sha256 = "{}"
"#,
        sha(KEY_A),
        sha(KEY_B)
    )
}

pub async fn start_mock(cfg: MockConfig) -> MockHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock_bureau::start(cfg, listener)
}

pub fn fast_mock() -> MockConfig {
    MockConfig { service_time: Duration::ZERO, jitter: Duration::ZERO, workers: 64, ..MockConfig::default() }
}

pub async fn start_proxy(text: &str) -> Running {
    let config = Config::from_toml(text, &|_| None).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    app::start(config).await.unwrap()
}

/// Mock (fast unless given) + proxy with default test config plus extras.
pub struct Env {
    pub mock: MockHandle,
    pub proxy: Running,
}

impl Env {
    pub async fn new(mock: MockConfig, server_extra: &str, upstream_extra: &str) -> Env {
        let mock = start_mock(mock).await;
        let proxy = start_proxy(&config_text(&mock.url(), server_extra, upstream_extra)).await;
        Env { mock, proxy }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.addr, path)
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn send(client: &TestClient, method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    Resp { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    send(&client(), Method::GET, url, headers, b"").await
}

/// Waits (bounded) until `cond` holds; polls because the condition lives in another component.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

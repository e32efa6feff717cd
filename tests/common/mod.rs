//! Test harness: a mock bureau and a proxy in-process on ephemeral ports, and a real HTTP client.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bureau_guard::app::{self, Running};
use bureau_guard::config::Config;
use bureau_sim::mock_bureau::{self, MockConfig, MockHandle};
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

/// Lines added to sections of the test config.
#[derive(Default, Clone)]
pub struct Extras<'a> {
    pub server: &'a str,
    /// `[admin]` lines; when empty, `insecure_no_token = true` (the tests that are about the
    /// admin token set one here).
    pub admin: &'a str,
    pub upstream: &'a str,
    /// Whole sections (e.g. `[state]`), placed before the routes.
    pub sections: &'a str,
    pub tenant_a: &'a str,
    pub tenant_b: &'a str,
    /// Lines added to the `score` route (e.g. its cache settings).
    pub score: &'a str,
}

/// A config for tests: ephemeral ports, tenants `a` (key-a) and `b` (key-b), routes `score`,
/// `report` and `echo` (any of GET/POST under /echo/). `extra` is appended to `[server]`,
/// `upstream_extra` to `[upstream]`.
pub fn config_text(upstream_url: &str, server_extra: &str, upstream_extra: &str) -> String {
    config_with(upstream_url, &Extras { server: server_extra, upstream: upstream_extra, ..Extras::default() })
}

/// The test config with [`Extras`].
pub fn config_with(upstream_url: &str, x: &Extras) -> String {
    let Extras {
        server: server_extra,
        admin: admin_extra,
        upstream: upstream_extra,
        sections,
        tenant_a,
        tenant_b,
        score,
    } = x;
    let admin_extra = if admin_extra.is_empty() { "insecure_no_token = true" } else { admin_extra };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server_extra}
[admin]
listen = "127.0.0.1:0"
{admin_extra}
[upstream]
url = "{upstream_url}"
{upstream_extra}
[log]
access_log = false
{sections}
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
{score}
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
{tenant_a}
[[tenants]]
id = "b"
api_key_sha256 = "{}"
{tenant_b}
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

pub fn parse(text: &str) -> Config {
    Config::from_toml(text, &|_| None).unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
}

pub async fn start_proxy(text: &str) -> Running {
    app::start(parse(text)).await.unwrap()
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

    pub async fn with(mock: MockConfig, x: &Extras<'_>) -> Env {
        let mock = start_mock(mock).await;
        let proxy = start_proxy(&config_with(&mock.url(), x)).await;
        Env { mock, proxy }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.admin_addr, path)
    }

    /// `GET /admin/tenants`, as `id → entry`.
    pub async fn tenants(&self) -> serde_json::Value {
        let list = get(&self.admin_url("/admin/tenants"), &[]).await.json();
        let mut map = serde_json::Map::new();
        for t in list.as_array().expect("a list of tenants") {
            map.insert(t["id"].as_str().unwrap().to_string(), t.clone());
        }
        serde_json::Value::Object(map)
    }
}

/// A value of a metric line in Prometheus text, e.g. `metric_value(text, "x_total{a=\"b\"}")`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// A unique temporary directory for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bg-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

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

// ---------------------------------------------------------------------------------------------
// Real bureau-guard processes (crash and replica tests).

use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_bureau-guard");

/// Kills the child when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `bureau-guard serve --config CONFIG`; its log goes to CONFIG with the extension `log`.
pub fn spawn(config: &std::path::Path) -> Proc {
    let log = std::fs::File::create(config.with_extension("log")).expect("log file");
    Proc(
        Command::new(BIN)
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start bureau-guard"),
    )
}

pub async fn wait_healthy(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = client();
        let req = http::Request::get(format!("http://{admin}/healthz")).body(Default::default()).unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), c.request(req)).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "bureau-guard did not become healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `bureau-guard serve` on a config that listens on port 0 (the process picks free
/// ports itself, so parallel tests cannot race for them) and returns it with the proxy and
/// admin addresses it logged. Its log goes to CONFIG with the extension `log`.
pub fn spawn_serving(config: &std::path::Path) -> (Proc, String, String) {
    use std::io::{BufRead, Write};
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bureau-guard");
    let stdout = child.stdout.take().unwrap();
    let mut log = std::fs::File::create(config.with_extension("log")).expect("log file");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if line.contains("bureau-guard serving") {
                let field = |name: &str| {
                    line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string).unwrap_or_default()
                };
                if let Some(tx) = tx.take() {
                    let _ = tx.send((field("addr="), field("admin_addr=")));
                }
            }
        }
    });
    let proc = Proc(child);
    let (addr, admin) = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("bureau-guard did not start; see {}", config.with_extension("log").display()));
    (proc, addr, admin)
}

/// `n` clients sending look-ups to the proxy at `addr` back to back, alternating tenants a and
/// b, each 200, until aborted: the traffic a `kill -9` test kills the proxy under.
pub fn clients_back_to_back(addr: &str, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|c| {
            let addr = addr.to_string();
            tokio::spawn(async move {
                let key = if c % 2 == 0 { KEY_A } else { KEY_B };
                let client = client();
                for i in 0.. {
                    let url = format!("http://{addr}/v1/score/S-{c}-{i}");
                    assert_eq!(send(&client, Method::GET, &url, &[("x-api-key", key)], b"").await.status, 200);
                }
            })
        })
        .collect()
}

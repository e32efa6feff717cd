//! Admission with the Redis backend vs local, end to end through one replica (issue 8).
//!
//! One `bureau-guard mock-bureau` (0 ms service), one `redis-server`, and one bureau-guard
//! process per variant, each given the same open-loop load (2,000 req/s by default) of score
//! look-ups by a tenant whose every limit is on but never binding (rate, burst, max_in_flight,
//! daily and monthly quotas), so every request pays each admission step:
//!
//! * `local`         — `state.backend = "local"` (the embedded default);
//! * `redis-leased`  — `state.backend = "redis"`, `lease = "100ms"` (the default);
//! * `redis-per-req` — `state.backend = "redis"`, `lease = "0s"`: one Redis round trip per
//!   decision and limit (the "one script per decision" design, for comparison).
//!
//! Variants run in rotated rounds (noise on a shared machine hits each alike); reported: latency
//! percentiles from the scheduled send time, their difference to `local`, and Redis round trips
//! per request (bureau-guard's own count, checked against Redis's `INFO commandstats`).
//!
//!     bash benches/redis_admission.sh                 # 3 rounds x 10 s per variant at 2,000 req/s
//!     bash benches/redis_admission.sh --quick         # 1 round x 2 s (CI smoke run)
//!     cargo bench --bench redis_admission -- --rate 4000 --seconds 5 --rounds 2

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bureau_sim::loadgen::{LatencySummary, LoadGenerator, LoadgenOptions, RequestTemplate, StreamSpec};

const BIN: &str = env!("CARGO_BIN_EXE_bureau-guard");
const KEY: &str = "bench-redis-key";

struct Args {
    rate: f64,
    seconds: u64,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args { rate: 2000.0, seconds: 10, rounds: 3 };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--quick" => {
                a.seconds = 2;
                a.rounds = 1;
            }
            "--rate" => {
                a.rate = next().parse().expect("--rate N");
                i += 1;
            }
            "--seconds" => {
                a.seconds = next().parse().expect("--seconds N");
                i += 1;
            }
            "--rounds" => {
                a.rounds = next().parse().expect("--rounds N");
                i += 1;
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

/// Stops the child on every exit path.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A bare HTTP/1.1 GET (Connection: close); the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then(|| out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn wait_ready(addr: SocketAddr, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, path).is_none() {
        assert!(Instant::now() < deadline, "{addr} did not answer {path}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Scripts Redis ran (EVALSHA + EVAL), from `INFO commandstats`.
fn redis_script_calls(port: u16) -> u64 {
    redis_cli(port, &["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Local,
    Leased,
    PerRequest,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Local, Variant::Leased, Variant::PerRequest];

    fn name(self) -> &'static str {
        match self {
            Variant::Local => "local",
            Variant::Leased => "redis-leased",
            Variant::PerRequest => "redis-per-req",
        }
    }

    fn state(self, redis_port: u16) -> String {
        let redis = |lease: &str| {
            format!(
                "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\nkey_prefix = \"bench-{}\"\nlease = \"{lease}\"\n",
                fastrand::u32(..)
            )
        };
        match self {
            Variant::Local => String::new(),
            Variant::Leased => redis("100ms"),
            Variant::PerRequest => redis("0s"),
        }
    }
}

fn config(dir: &Path, v: Variant, mock: SocketAddr, redis_port: u16) -> (PathBuf, SocketAddr, SocketAddr) {
    let (port, admin) = (free_port(), free_port());
    let key_sha = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(KEY.as_bytes()))
    };
    let text = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
insecure_no_token = true
[upstream]
url = "http://{mock}"
max_concurrency = 512
[log]
access_log = false
{state}
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[tenants]]
id = "bank-a"
api_key_sha256 = "{key_sha}"
rate = 100000
burst = 100000
max_in_flight = 100000
daily_quota = 1000000000
monthly_quota = 1000000000
"#,
        state = v.state(redis_port)
    );
    let path = dir.join(format!("{}.toml", v.name()));
    std::fs::write(&path, text).unwrap();
    (path, SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 0, 0, 1], admin)))
}

struct Measured {
    variant: Variant,
    ok: u64,
    sent: u64,
    latency: LatencySummary,
    proxy_calls_per_req: f64,
    redis_calls_per_req: f64,
}

fn main() {
    let a = args();
    if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("redis_admission: redis-server not on PATH; run benches/redis_admission.sh (installs it)");
        std::process::exit(1);
    }
    let dir = std::env::temp_dir().join(format!("bg-redis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mock_port, redis_port) = (free_port(), free_port());
    let mock_addr = SocketAddr::from(([127, 0, 0, 1], mock_port));
    let _mock = Proc(
        Command::new(BIN)
            .args(["mock-bureau", "--listen", &mock_addr.to_string(), "--workers", "512", "--service-ms", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mock bureau"),
    );
    let _redis = Proc(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &redis_port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_ready(mock_addr, "/v1/score/S-ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_cli(redis_port, &["PING"]).contains("PONG") {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let generator = rt.block_on(async { LoadGenerator::new(LoadgenOptions::default()) });
    let mut results: Vec<Measured> = Vec::new();
    for round in 0..a.rounds {
        // Rotate the order each round: a noisy moment of the machine does not always hit one variant.
        for k in 0..Variant::ALL.len() {
            let v = Variant::ALL[(k + round) % Variant::ALL.len()];
            let (cfg, addr, admin) = config(&dir, v, mock_addr, redis_port);
            let _proxy = Proc(
                Command::new(BIN)
                    .args(["serve", "--config", cfg.to_str().unwrap()])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("bureau-guard"),
            );
            wait_ready(addr, "/v1/score/S-warm");
            let template = RequestTemplate::get(&format!("http://{addr}/v1/score/S0"))
                .and_then(|t| t.header("x-api-key", KEY))
                .expect("request template");
            let stream = || {
                StreamSpec::new("bank-a", template.clone().vary_path(|seq| format!("/v1/score/S{seq:07}")))
                    .phase(Duration::from_secs(a.seconds), a.rate)
            };
            // Warm-up: connections, leases, JIT-free but caches and pools.
            rt.block_on(
                generator
                    .run(vec![StreamSpec::new("warm", template.clone()).phase(Duration::from_secs(1), a.rate / 4.0)]),
            )
            .expect("warm-up");
            let m0 = http_get(admin, "/metrics").unwrap_or_default();
            let r0 = redis_script_calls(redis_port);
            let run = rt.block_on(generator.run(vec![stream()])).expect("run");
            let m1 = http_get(admin, "/metrics").unwrap_or_default();
            let r1 = redis_script_calls(redis_port);
            let s = run.stream("bank-a").expect("stream");
            let calls = metric_sum(&m1, "bureau_guard_state_redis_calls_total")
                - metric_sum(&m0, "bureau_guard_state_redis_calls_total");
            let sent = s.sent.max(1);
            results.push(Measured {
                variant: v,
                ok: s.class_count(2),
                sent: s.sent,
                latency: s.success_summary(),
                proxy_calls_per_req: calls / sent as f64,
                redis_calls_per_req: (r1 - r0) as f64 / sent as f64,
            });
            let last = results.last().unwrap();
            eprintln!(
                "round {} {:<13} ok {}/{} p50 {:.3} ms p99 {:.3} ms, Redis calls/request {:.4}",
                round + 1,
                v.name(),
                last.ok,
                last.sent,
                ms(last.latency.p50),
                ms(last.latency.p99),
                last.redis_calls_per_req
            );
        }
    }
    println!("{}", table(&a, &results));
    let _ = std::fs::remove_dir_all(&dir);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn table(a: &Args, results: &[Measured]) -> String {
    let of =
        |v: Variant, f: &dyn Fn(&Measured) -> f64| median(results.iter().filter(|m| m.variant == v).map(f).collect());
    let base50 = of(Variant::Local, &|m| ms(m.latency.p50));
    let base99 = of(Variant::Local, &|m| ms(m.latency.p99));
    let mut out = format!(
        "\n{} req/s for {} s per variant, {} rounds (medians over rounds)\n\n| variant | success | p50 ms | p99 ms | p99.9 ms | p50 vs local | p99 vs local | Redis calls / request (ours / Redis INFO) |\n|---|---|---|---|---|---|---|---|\n",
        a.rate, a.seconds, a.rounds
    );
    for v in Variant::ALL {
        let ok = results.iter().filter(|m| m.variant == v).map(|m| m.ok).sum::<u64>();
        let sent = results.iter().filter(|m| m.variant == v).map(|m| m.sent).sum::<u64>().max(1);
        let p50 = of(v, &|m| ms(m.latency.p50));
        let p99 = of(v, &|m| ms(m.latency.p99));
        out.push_str(&format!(
            "| {} | {:.2}% | {:.3} | {:.3} | {:.3} | {:+.3} ms | {:+.3} ms | {:.4} / {:.4} |\n",
            v.name(),
            100.0 * ok as f64 / sent as f64,
            p50,
            p99,
            of(v, &|m| ms(m.latency.p999)),
            p50 - base50,
            p99 - base99,
            of(v, &|m| m.proxy_calls_per_req),
            of(v, &|m| m.redis_calls_per_req),
        ));
    }
    out
}

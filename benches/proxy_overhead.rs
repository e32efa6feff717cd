//! End-to-end proxy overhead: what does putting bureau-guard in front of the
//! bureau cost, compared with no proxy and with nginx?
//!
//! Starts three child processes on ephemeral loopback ports — the mock
//! bureau (`bureau-guard mock-bureau`), bureau-guard itself (`bureau-guard
//! serve`, proxying to the mock) and nginx (proxying to the mock with a
//! keep-alive upstream pool) — then, for each target in turn (direct to the
//! mock, through bureau-guard, through nginx), offers open-loop load at
//! increasing rates with [`bureau_sim::loadgen`] and prints a markdown
//! table, each target's maximum sustainable rate and the latency each proxy
//! adds at a moderate rate.
//!
//! A second scenario, `cache-hit` (issue 5), runs after that one: the same
//! three targets, but every request asks for one hot subject, bureau-guard's
//! route caches it (`cache_ttl`, `cache_key`, `coalesce`) and nginx caches it
//! with `proxy_cache`, each warmed with one request; the mock bureau's
//! `/stats` proves that no measured request reached it.
//!
//! Two TLS scenarios (issue 7) follow: `tls` runs the overhead load (unique
//! subjects, kept-alive connections) against bureau-guard and nginx each
//! twice, plain HTTP and TLS with the same certificate and key (ECDSA P-256,
//! made at bench time with rcgen); `tls-handshake` does the same with a new
//! connection for every request (full handshakes: the generator does not
//! resume sessions), so its rates are connection rates. `--mode` picks one
//! scenario; all run by default.
//!
//! Run it with `benches/proxy_overhead.sh` (installs nginx if missing) or
//! `cargo bench --bench proxy_overhead -- [--quick] [options]`; `--help`
//! lists the options. Everything (generator, proxies, mock) shares this
//! machine's cores, so figures compare targets on one machine; they are not
//! absolute capacities.
//!
//! Built as a test (`cargo test --all-targets`) it does nothing: it needs
//! release builds and nginx, and only `cargo bench` passes `--bench`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bureau_sim::loadgen::{LoadGenerator, LoadgenOptions, RequestTemplate, RunSnapshot, StreamSnapshot, StreamSpec};
use bureau_sim::mock_bureau::Stats;
use sha2::Digest;

#[path = "proxy_overhead/closed.rs"]
mod closed;
#[path = "proxy_overhead/floor.rs"]
mod floor;

/// The API key every request carries; bureau-guard's config holds its hash.
const API_KEY: &str = "bench-key";

/// A rate is sustainable when at least this share of the offered requests
/// got a response within the step, none failed or got a status other than
/// 200, ...
const MIN_ACHIEVED_SHARE: f64 = 0.99;
/// ... and the 99th percentile stays under this (a proxy in front of a
/// credit bureau that adds more than this at p99 is not "sustaining" a rate).
const MAX_P99: Duration = Duration::from_millis(10);

/// Children get this long to answer their readiness probe; a release binary
/// starts in milliseconds, nginx in well under a second.
const READY_DEADLINE: Duration = Duration::from_secs(15);
/// Children get this long to exit after SIGTERM before they are killed.
const STOP_DEADLINE: Duration = Duration::from_secs(3);
/// After this many failing steps in a row, higher rates are not tried: they
/// would only fail too, and fill the machine with connections.
const MAX_CONSECUTIVE_FAILURES: usize = 2;
/// 100 times the criterion's p99 limit, so it never decides a verdict; short,
/// so an overloaded step does not pile up seconds of requests and
/// connections that would spill into the next step.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // The closed loop's hyper floor: this binary, re-executed as a target of its own.
    if let [flag, listen, upstream] = raw.as_slice()
        && flag == "--floor-proxy"
    {
        let addrs = listen.parse().and_then(|l| Ok((l, upstream.parse()?)));
        let result = addrs.map_err(anyhow::Error::from).and_then(|(l, u)| floor::serve(l, u));
        return result.map_or_else(
            |e| {
                eprintln!("proxy_overhead --floor-proxy: {e:#}");
                ExitCode::FAILURE
            },
            |()| ExitCode::SUCCESS,
        );
    }
    if !raw.iter().any(|a| a == "--bench") {
        println!("proxy_overhead: skipped (not run by `cargo bench`; see benches/README.md)");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(&raw) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy_overhead: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy_overhead: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cargo bench --bench proxy_overhead -- [options]
  --quick              short smoke run (1 s steps, a few low rates, every scenario): about a minute
  --mode M             overhead (unique subjects: every request reaches the mock), cache-hit (one hot
                       subject, every measured request a cache hit), tls (overhead load, each proxy plain and
                       over TLS, kept-alive connections), tls-handshake (the same, a new connection and full
                       TLS handshake per request), closed (closed loop with wrk, 32 connections: req/s and
                       CPU per request, bare and cache hits, against nginx) or all (default: all five in
                       that order)
  --rates A,B,...      offered rates in req/s, both scenarios (default 1000,2000,4000,8000,10000,12000,16000,
                       20000,24000,32000; quick 500,1000,2000)
  --hit-rates A,B,...  offered rates of the cache-hit scenario only (default 1000,2000,4000,8000,10000,12000,
                       14000,16000,18000,20000,22000,24000,28000,32000,40000; quick 1000,2000)
  --step-secs S        seconds of load per rate (default 4; quick 1)
  --warmup-secs S      seconds of warm-up per target, not reported (default 2; quick 0.5)
  --pause-secs S       idle seconds between steps (default 1; quick 0.2)
  --handshake-rates A,B,...  connection rates of the tls-handshake scenario (default 250,500,750,1000,1250,1500,
                       2000,2500,3000,4000; quick 250,500)
  --key-rate R         rate for the added-latency figure, added to the rates (default 1000)
  --key-rounds N       cache-hit scenario: after the rate steps, N more rounds of one step per target at the key
                       rate, targets interleaved, for a median added p50 (default 5; quick 1; 0 = none)
  --targets LIST       subset of direct,bureau-guard,nginx (default all)
  --nginx PATH         nginx binary (default: $NGINX, then PATH, then /usr/sbin/nginx)
  --closed-rounds N    closed mode: rounds, targets in rotated order (default 3; quick 1)
  --closed-secs S      closed mode: seconds of wrk per target and round (default 10; quick 1)
  --closed-sets LIST   closed mode: subset of bare,features,hit,memory (default all four)";

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetKind {
    Direct,
    BureauGuard,
    Nginx,
    /// bureau-guard terminating TLS (TLS scenarios only).
    BureauGuardTls,
    /// nginx terminating TLS with the same certificate (TLS scenarios only).
    NginxTls,
}

impl TargetKind {
    /// Every kind, in table order.
    const ALL: [TargetKind; 5] = [Self::Direct, Self::BureauGuard, Self::BureauGuardTls, Self::Nginx, Self::NginxTls];
    /// The kinds `--targets` names; a TLS scenario runs each proxy plain and with TLS.
    const BASE: [TargetKind; 3] = [Self::Direct, Self::BureauGuard, Self::Nginx];

    fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::BureauGuard => "bureau-guard",
            Self::Nginx => "nginx",
            Self::BureauGuardTls => "bureau-guard-tls",
            Self::NginxTls => "nginx-tls",
        }
    }

    fn is_tls(self) -> bool {
        matches!(self, Self::BureauGuardTls | Self::NginxTls)
    }

    /// nginx's CPU time includes its worker processes.
    fn is_nginx(self) -> bool {
        matches!(self, Self::Nginx | Self::NginxTls)
    }
}

/// What is measured: the whole proxy path, or answers from the proxies' caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Every request for a subject never asked before: it goes all the way to the mock.
    Overhead,
    /// Every request for one hot subject, answered from the proxy's cache (direct: the mock).
    CacheHit,
    /// The overhead load on kept-alive connections, each proxy plain and over TLS.
    Tls,
    /// The overhead load with a new connection (a full TLS handshake) per request.
    TlsHandshake,
    /// Closed loop with wrk, 32 connections: throughput and CPU per request ([`closed`]).
    Closed,
}

impl Scenario {
    const ALL: [Scenario; 5] = [Self::Overhead, Self::CacheHit, Self::Tls, Self::TlsHandshake, Self::Closed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Overhead => "overhead",
            Self::CacheHit => "cache-hit",
            Self::Tls => "tls",
            Self::TlsHandshake => "tls-handshake",
            Self::Closed => "closed",
        }
    }

    fn is_tls(self) -> bool {
        matches!(self, Self::Tls | Self::TlsHandshake)
    }
}

/// The one subject every cache-hit request asks for.
const HOT_PATH: &str = "/v1/score/S-HOT";

#[derive(Debug)]
struct Args {
    scenarios: Vec<Scenario>,
    /// Rates of the overhead scenario.
    rates: Vec<f64>,
    /// Rates of the cache-hit scenario.
    hit_rates: Vec<f64>,
    /// Connection rates of the tls-handshake scenario.
    handshake_rates: Vec<f64>,
    step: Duration,
    warmup: Duration,
    pause: Duration,
    key_rate: f64,
    key_rounds: usize,
    targets: Vec<TargetKind>,
    nginx: Option<PathBuf>,
    /// Closed-loop mode: rounds, and seconds of wrk per target and round.
    closed_rounds: usize,
    closed_secs: u32,
    closed_sets: Vec<String>,
}

impl Args {
    /// `Ok(None)` after printing help.
    fn parse(raw: &[String]) -> anyhow::Result<Option<Args>> {
        let quick = raw.iter().any(|a| a == "--quick");
        let mut args = if quick {
            Args {
                scenarios: Scenario::ALL.to_vec(),
                rates: vec![500.0, 1000.0, 2000.0],
                // Two steps and one round: the cache-hit scenario adds well under 20 s to CI.
                hit_rates: vec![1000.0, 2000.0],
                handshake_rates: vec![250.0, 500.0],
                step: Duration::from_secs(1),
                warmup: Duration::from_millis(500),
                pause: Duration::from_millis(200),
                key_rate: 1000.0,
                key_rounds: 1,
                targets: TargetKind::BASE.to_vec(),
                nginx: None,
                closed_rounds: 1,
                closed_secs: 1,
                closed_sets: closed::SETS.map(String::from).to_vec(),
            }
        } else {
            Args {
                scenarios: Scenario::ALL.to_vec(),
                rates: vec![1000.0, 2000.0, 4000.0, 8000.0, 10000.0, 12000.0, 16000.0, 20000.0, 24000.0, 32000.0],
                // Finer steps: the cache-hit figure is a ratio of two maximum rates.
                hit_rates: vec![
                    1000.0, 2000.0, 4000.0, 8000.0, 10000.0, 12000.0, 14000.0, 16000.0, 18000.0, 20000.0, 22000.0,
                    24000.0, 28000.0, 32000.0, 40000.0,
                ],
                handshake_rates: vec![250.0, 500.0, 750.0, 1000.0, 1250.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0],
                step: Duration::from_secs(4),
                warmup: Duration::from_secs(2),
                pause: Duration::from_secs(1),
                key_rate: 1000.0,
                key_rounds: 5,
                targets: TargetKind::BASE.to_vec(),
                nginx: None,
                closed_rounds: 3,
                closed_secs: 10,
                closed_sets: closed::SETS.map(String::from).to_vec(),
            }
        };
        let rate_list = |text: String, flag: &str| -> anyhow::Result<Vec<f64>> {
            text.split(',').map(|r| parse_positive(r.trim(), flag)).collect()
        };
        let mut hit_rates = None;
        let mut iter = raw.iter();
        while let Some(flag) = iter.next() {
            let mut value = || iter.next().with_context(|| format!("{flag} needs a value")).cloned();
            match flag.as_str() {
                "--bench" | "--quick" => {}
                "--help" | "-h" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                "--mode" => {
                    let mode = value()?;
                    args.scenarios = match mode.trim() {
                        "all" => Scenario::ALL.to_vec(),
                        name => vec![Scenario::ALL.into_iter().find(|s| s.as_str() == name).with_context(|| {
                            format!("unknown mode {name:?} (overhead, cache-hit, tls, tls-handshake, closed or all)")
                        })?],
                    };
                }
                "--rates" => {
                    args.rates = rate_list(value()?, flag)?;
                    args.hit_rates = args.rates.clone();
                }
                "--hit-rates" => hit_rates = Some(rate_list(value()?, flag)?),
                "--handshake-rates" => args.handshake_rates = rate_list(value()?, flag)?,
                "--step-secs" => args.step = seconds(&value()?, flag)?,
                "--warmup-secs" => args.warmup = seconds(&value()?, flag)?,
                "--pause-secs" => args.pause = seconds(&value()?, flag)?,
                "--key-rate" => args.key_rate = parse_positive(&value()?, flag)?,
                "--key-rounds" => {
                    let text = value()?;
                    args.key_rounds = text.parse().with_context(|| format!("{flag}: {text:?} is not a count"))?;
                }
                "--targets" => {
                    args.targets = value()?
                        .split(',')
                        .map(|name| {
                            TargetKind::BASE
                                .into_iter()
                                .find(|t| t.as_str() == name.trim())
                                .with_context(|| format!("unknown target {name:?}"))
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                "--nginx" => args.nginx = Some(PathBuf::from(value()?)),
                "--closed-rounds" => {
                    let text = value()?;
                    args.closed_rounds = text
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| format!("{flag}: {text:?} is not a count >= 1"))?;
                }
                "--closed-sets" => {
                    args.closed_sets = value()?.split(',').map(|s| s.trim().to_owned()).collect();
                    if let Some(bad) = args.closed_sets.iter().find(|s| !closed::SETS.contains(&s.as_str())) {
                        bail!("{flag}: unknown set {bad:?} (bare, features, hit, memory)");
                    }
                }
                "--closed-secs" => {
                    let text = value()?;
                    args.closed_secs = text
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| format!("{flag}: {text:?} is not whole seconds >= 1"))?;
                }
                // cargo passes filters and other harnesses' flags to every
                // bench binary; they are not ours to reject.
                other => eprintln!("proxy_overhead: ignoring argument {other:?}"),
            }
        }
        // --hit-rates wins over --rates, whatever their order.
        if let Some(hit_rates) = hit_rates {
            args.hit_rates = hit_rates;
        }
        for rates in [&mut args.rates, &mut args.hit_rates] {
            if !rates.contains(&args.key_rate) {
                rates.push(args.key_rate);
            }
            rates.sort_by(f64::total_cmp);
            rates.dedup();
        }
        args.handshake_rates.sort_by(f64::total_cmp);
        args.handshake_rates.dedup();
        if args.step.is_zero() {
            bail!("--step-secs must be > 0");
        }
        Ok(Some(args))
    }

    fn rates(&self, scenario: Scenario) -> &[f64] {
        match scenario {
            Scenario::Overhead | Scenario::Tls => &self.rates,
            Scenario::CacheHit => &self.hit_rates,
            Scenario::TlsHandshake => &self.handshake_rates,
            Scenario::Closed => &[],
        }
    }
}

fn parse_positive(text: &str, flag: &str) -> anyhow::Result<f64> {
    let value: f64 = text.parse().with_context(|| format!("{flag}: {text:?} is not a number"))?;
    if !(value.is_finite() && value > 0.0) {
        bail!("{flag}: {text} must be a positive number");
    }
    Ok(value)
}

fn seconds(text: &str, flag: &str) -> anyhow::Result<Duration> {
    let value: f64 = text.parse().with_context(|| format!("{flag}: {text:?} is not a number"))?;
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag}: {text} is not >= 0"))
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// One row of the results table.
struct Step {
    target: TargetKind,
    offered: f64,
    achieved: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    errors: u64,
    error_detail: String,
    send_lag_p99: Duration,
    /// CPU time (user + system) the target's processes used per response, in µs.
    target_cpu_us: Option<f64>,
    /// CPU time the bench process (the load generator) used per response, in µs.
    generator_cpu_us: Option<f64>,
}

impl Step {
    fn from_report(target: TargetKind, stream: &StreamSnapshot, cpu: CpuUse) -> Step {
        let latency = stream.success_summary();
        let non_200 = stream.responses.saturating_sub(stream.status_count(200));
        let errors = stream.failures() + non_200;
        let mut error_detail = String::new();
        if errors > 0 {
            let statuses: Vec<String> = stream
                .status_counts
                .iter()
                .filter(|(code, _)| **code != 200)
                .map(|(code, count)| format!("{count} x {code}"))
                .collect();
            let _ = write!(
                error_detail,
                "{} transport errors, {} timeouts, {} request errors, statuses: [{}]",
                stream.transport_errors,
                stream.timeouts,
                stream.request_errors,
                statuses.join(", ")
            );
            if let Some(last) = &stream.last_error {
                let _ = write!(error_detail, "; last error: {last}");
            }
        }
        Step {
            target,
            offered: stream.offered_rate(),
            achieved: stream.achieved_rate(),
            p50: latency.p50,
            p99: latency.p99,
            p999: latency.p999,
            max: latency.max,
            errors,
            error_detail,
            send_lag_p99: stream.send_lag_summary().p99,
            target_cpu_us: cpu.per_response(cpu.target, stream.responses),
            generator_cpu_us: cpu.per_response(cpu.generator, stream.responses),
        }
    }

    /// The sustainability criterion; see the constants.
    fn sustainable(&self) -> bool {
        self.achieved >= MIN_ACHIEVED_SHARE * self.offered && self.errors == 0 && self.p99 < MAX_P99
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let workdir = TempDir::create()?;
    let bin = Path::new(env!("CARGO_BIN_EXE_bureau-guard"));
    let nginx_bin = if args.targets.contains(&TargetKind::Nginx) {
        let found = find_nginx(args.nginx.as_deref());
        if found.is_none() {
            eprintln!(
                "proxy_overhead: nginx not found (install it, or run benches/proxy_overhead.sh); \
                 skipping the nginx target"
            );
        }
        found
    } else {
        None
    };

    let [mock_port] = free_ports::<1>()?;
    let mock_addr = SocketAddr::from(([127, 0, 0, 1], mock_port));

    // Children are declared after `workdir`, so they are stopped before it
    // is removed; their guards stop them on every exit path, panics included.
    // The mock serves every scenario; each scenario starts its own proxies.
    let mut mock = ChildGuard::spawn(
        "mock-bureau",
        Command::new(bin).args([
            "mock-bureau",
            "--listen",
            &mock_addr.to_string(),
            "--workers",
            "512",
            "--service-ms",
            "0",
        ]),
        &workdir.path,
    )?;
    mock.wait_ready(mock_addr, PROBE_PATH)?;

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("building the tokio runtime")?;
    let tls = if args.scenarios.iter().any(|s| s.is_tls()) { Some(BenchTls::create(&workdir.path)?) } else { None };
    let env = Env {
        args,
        bin,
        nginx_bin: nginx_bin.as_deref(),
        mock_addr,
        mock_pid: mock.pid(),
        runtime: &runtime,
        tls: tls.as_ref(),
    };
    for &scenario in &args.scenarios {
        let dir = workdir.path.join(scenario.as_str());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if scenario == Scenario::Closed {
            closed::run(&env, &dir)?;
            mock.check_alive()?;
        } else {
            run_scenario(&env, scenario, &mut mock, &dir)?;
        }
    }
    Ok(())
}

/// The readiness probe's path: a score look-up like any other.
const PROBE_PATH: &str = "/v1/score/S-ready";

/// What every scenario shares.
struct Env<'a> {
    args: &'a Args,
    bin: &'a Path,
    nginx_bin: Option<&'a Path>,
    mock_addr: SocketAddr,
    mock_pid: u32,
    runtime: &'a tokio::runtime::Runtime,
    /// Certificate, key and client settings of the TLS scenarios.
    tls: Option<&'a BenchTls>,
}

/// One server certificate and key (ECDSA P-256, for 127.0.0.1) that bureau-guard and nginx
/// both serve, and the generator's TLS client trusting its CA.
struct BenchTls {
    cert: PathBuf,
    key: PathBuf,
    client: std::sync::Arc<rustls::ClientConfig>,
}

impl BenchTls {
    fn create(dir: &Path) -> anyhow::Result<BenchTls> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "bench CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
        leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        leaf.distinguished_name.push(DnType::CommonName, "bench server");
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
        fs::write(&cert_path, cert.pem()).context("writing the bench certificate")?;
        fs::write(&key_path, key.serialize_pem()).context("writing the bench key")?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).context("adding the bench CA")?;
        let mut client = rustls::ClientConfig::builder_with_provider(bureau_guard::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every new connection pays a full handshake: what a bank's first connection costs, and
        // the same work for both proxies whatever their session caches do.
        client.resumption = rustls::client::Resumption::disabled();
        Ok(BenchTls { cert: cert_path, key: key_path, client: std::sync::Arc::new(client) })
    }
}

/// One target of a scenario.
struct Target {
    kind: TargetKind,
    addr: SocketAddr,
    /// The process that answers (nginx: its master; its workers are found by parent pid).
    pid: u32,
    /// One generator per target: its pool stays warm from the warm-up on.
    generator: LoadGenerator,
    /// What the mock bureau saw of this target's requests (cache-hit scenario).
    check: HitCheck,
}

/// Bureau calls caused by one target's requests in the cache-hit scenario: the mock's
/// `calls_total` read before and after each of its runs (warm-up, steps, rounds).
#[derive(Default)]
struct HitCheck {
    /// Requests issued to the target (warm-up, steps and rounds).
    requests: u64,
    /// Increase of the mock's `calls_total` over those runs.
    bureau_calls: u64,
    /// The mock's `calls_total` before the target's load warm-up (after the one request that
    /// filled its cache) and after its last rate step: equal for a proxy whose every answer
    /// was a hit.
    calls_total_first: Option<u64>,
    calls_total_last: u64,
    /// The cache header of a probe after its last rate step (`x-cache` / `X-Cache-Status`).
    header_after: Option<String>,
}

/// Starts the scenario's proxies (on fresh ports, configured for it), runs every target's
/// steps (and the cache-hit rounds), prints the tables, and stops the proxies.
fn run_scenario(env: &Env<'_>, scenario: Scenario, mock: &mut ChildGuard, dir: &Path) -> anyhow::Result<()> {
    let args = env.args;
    let cached = scenario == Scenario::CacheHit;
    // Reserve every port at once so no two children get the same one.
    let [guard_port, admin_port, nginx_port, guard_tls_port, admin_tls_port, nginx_tls_port] = free_ports::<6>()?;
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (guard_addr, admin_addr, nginx_addr) = (local(guard_port), local(admin_port), local(nginx_port));
    let (guard_tls_addr, admin_tls_addr, nginx_tls_addr) =
        (local(guard_tls_port), local(admin_tls_port), local(nginx_tls_port));
    let tls = if scenario.is_tls() { Some(env.tls.context("TLS material for a TLS scenario")?) } else { None };

    // A TLS scenario runs each proxy plain and over TLS, side by side; direct has no TLS.
    let kinds: Vec<TargetKind> = match scenario {
        Scenario::Overhead | Scenario::CacheHit | Scenario::Closed => args.targets.clone(),
        Scenario::Tls | Scenario::TlsHandshake => args
            .targets
            .iter()
            .flat_map(|k| match k {
                TargetKind::BureauGuard => vec![TargetKind::BureauGuard, TargetKind::BureauGuardTls],
                TargetKind::Nginx => vec![TargetKind::Nginx, TargetKind::NginxTls],
                _ => vec![],
            })
            .collect(),
    };

    let mut children: Vec<ChildGuard> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    let generator = |kind: TargetKind| {
        LoadGenerator::new(LoadgenOptions {
            request_timeout: REQUEST_TIMEOUT,
            tls: tls.filter(|_| kind.is_tls()).map(|t| t.client.clone()),
            new_connection_per_request: scenario == Scenario::TlsHandshake,
            ..LoadgenOptions::default()
        })
    };
    let mut nginx_pid = None;
    for kind in kinds {
        let (addr, pid) = match kind {
            TargetKind::Direct => (env.mock_addr, env.mock_pid),
            TargetKind::BureauGuard | TargetKind::BureauGuardTls => {
                let (listen, admin, name) = match kind {
                    TargetKind::BureauGuard => (guard_addr, admin_addr, "bureau-guard.toml"),
                    _ => (guard_tls_addr, admin_tls_addr, "bureau-guard-tls.toml"),
                };
                let config = dir.join(name);
                let cert = tls.filter(|_| kind.is_tls()).map(|t| (t.cert.as_path(), t.key.as_path()));
                fs::write(&config, guard_config(listen, admin, env.mock_addr, cached, cert))
                    .context("writing the bureau-guard config")?;
                let mut child = ChildGuard::spawn(
                    if kind.is_tls() { "bureau-guard-tls" } else { "bureau-guard" },
                    Command::new(env.bin).arg("serve").arg("--config").arg(&config),
                    dir,
                )?;
                child.wait_ready(admin, "/healthz")?;
                // The TLS listener is probed by the warm-up below (which fails on no 200).
                if !kind.is_tls() {
                    child.wait_ready(listen, PROBE_PATH)?;
                }
                let pid = child.pid();
                children.push(child);
                (listen, pid)
            }
            TargetKind::Nginx => {
                let Some(nginx_bin) = env.nginx_bin else {
                    continue;
                };
                let conf = dir.join("nginx.conf");
                let tls_listen = tls.map(|t| (nginx_tls_addr, t.cert.as_path(), t.key.as_path()));
                fs::write(&conf, nginx_config(dir, nginx_addr, env.mock_addr, cached, tls_listen))
                    .context("writing the nginx config")?;
                let child = spawn_nginx(nginx_bin, dir, &conf, nginx_addr)?;
                let pid = child.pid();
                nginx_pid = Some(pid);
                children.push(child);
                (nginx_addr, pid)
            }
            // The same nginx, on its TLS port.
            TargetKind::NginxTls => match nginx_pid {
                Some(pid) => (nginx_tls_addr, pid),
                None => continue,
            },
        };
        if cached {
            warm_cache(kind, addr)?;
        }
        targets.push(Target { kind, addr, pid, generator: generator(kind), check: HitCheck::default() });
    }

    eprintln!(
        "proxy_overhead: scenario {}: targets {:?}, rates {:?} req/s, {:.1} s per step",
        scenario.as_str(),
        targets.iter().map(|t| t.kind.as_str()).collect::<Vec<_>>(),
        args.rates(scenario),
        args.step.as_secs_f64()
    );
    let bench = Bench { args, scenario, mock: cached.then_some(env.mock_addr) };
    let mut steps = Vec::new();
    let mut next_subject = 0_u64;
    let mut alive = |mock: &mut ChildGuard| -> anyhow::Result<()> {
        // A child that died mid-run would make every later figure a lie.
        mock.check_alive()?;
        children.iter_mut().try_for_each(ChildGuard::check_alive)
    };
    for target in &mut targets {
        env.runtime.block_on(measure_target(&bench, target, &mut next_subject, &mut steps))?;
        if cached {
            let reply = http_get(target.addr, HOT_PATH).context("probing the hot subject after the steps")?;
            target.check.header_after =
                cache_header(target.kind).map(|name| reply.header(name).unwrap_or("(absent)").to_owned());
        }
        alive(mock)?;
    }
    let mut rounds = Vec::new();
    if cached && args.key_rounds > 0 && !targets.is_empty() {
        eprintln!("proxy_overhead: {} rounds at {:.0} req/s, targets interleaved", args.key_rounds, args.key_rate);
        rounds = env.runtime.block_on(key_rounds(&bench, &mut targets))?;
        alive(mock)?;
    }
    print!("{}", render(args, scenario, &steps, &rounds, &targets));

    // A cache-hit figure is only one if the hits never reached the bureau.
    for t in targets.iter().filter(|_| cached) {
        let expected = cache_header(t.kind).map(|name| (name, t.check.header_after.as_deref()));
        if let Some((name, after)) = expected
            && (t.check.bureau_calls > 0 || after != Some("HIT"))
        {
            bail!(
                "{}: not every request was a cache hit: {} bureau calls for {} requests, {name}: {} after the steps",
                t.kind.as_str(),
                t.check.bureau_calls,
                t.check.requests,
                after.unwrap_or("-")
            );
        }
    }
    Ok(())
}

/// What the runs of one scenario share.
struct Bench<'a> {
    args: &'a Args,
    scenario: Scenario,
    /// The mock bureau, when bureau calls are counted (cache-hit scenario).
    mock: Option<SocketAddr>,
}

/// Warm-up, then one step per rate (lowest first) against one target.
async fn measure_target(
    bench: &Bench<'_>,
    target: &mut Target,
    next_subject: &mut u64,
    steps: &mut Vec<Step>,
) -> anyhow::Result<()> {
    let (args, kind, rates) = (bench.args, target.kind, bench.args.rates(bench.scenario));
    if !args.warmup.is_zero() {
        let rate = rates.first().copied().unwrap_or(args.key_rate);
        let spec = stream_spec(bench.scenario, kind, target.addr, rate, args.warmup, next_subject)?;
        let (warmup, cpu) = run_stream(bench, target, spec, true).await?;
        if warmup.status_count(200) == 0 {
            let step = Step::from_report(kind, &warmup, cpu);
            bail!("{}: no 200 during warm-up: {}", kind.as_str(), step.error_detail);
        }
    }
    let mut consecutive_failures = 0;
    for &rate in rates {
        tokio::time::sleep(args.pause).await;
        let spec = stream_spec(bench.scenario, kind, target.addr, rate, args.step, next_subject)?;
        let (stream, cpu) = run_stream(bench, target, spec, true).await?;
        let step = Step::from_report(kind, &stream, cpu);
        eprintln!(
            "  {:<13} offered {:>7.0}  achieved {:>7.0}  p50 {:>7.3} ms  p99 {:>7.3} ms  errors {}{}",
            kind.as_str(),
            step.offered,
            step.achieved,
            ms(step.p50),
            ms(step.p99),
            step.errors,
            if step.sustainable() { "" } else { "  (not sustainable)" }
        );
        consecutive_failures = if step.sustainable() { 0 } else { consecutive_failures + 1 };
        steps.push(step);
        if consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
            eprintln!(
                "  {}: {MAX_CONSECUTIVE_FAILURES} unsustainable steps in a row, not trying higher rates",
                kind.as_str()
            );
            break;
        }
    }
    Ok(())
}

/// After every target's steps, `--key-rounds` rounds of one step per target at the key rate,
/// each round in a rotated order: a p50 measured minutes apart on a shared machine can differ by
/// more than the overhead in question; taken side by side, repeatedly, the difference holds.
async fn key_rounds(bench: &Bench<'_>, targets: &mut [Target]) -> anyhow::Result<Vec<Vec<Step>>> {
    let args = bench.args;
    let mut rounds = Vec::with_capacity(args.key_rounds);
    for round in 0..args.key_rounds {
        let mut steps = Vec::with_capacity(targets.len());
        for offset in 0..targets.len() {
            let target = &mut targets[(round + offset) % targets.len()];
            tokio::time::sleep(args.pause).await;
            let spec = stream_spec(bench.scenario, target.kind, target.addr, args.key_rate, args.step, &mut 0)?;
            let (stream, cpu) = run_stream(bench, target, spec, false).await?;
            let step = Step::from_report(target.kind, &stream, cpu);
            eprintln!(
                "  round {:<2} {:<13} p50 {:>7.3} ms  p99 {:>7.3} ms  errors {}",
                round + 1,
                target.kind.as_str(),
                ms(step.p50),
                ms(step.p99),
                step.errors
            );
            steps.push(step);
        }
        steps.sort_by_key(|s| TargetKind::ALL.iter().position(|k| *k == s.target));
        rounds.push(steps);
    }
    Ok(rounds)
}

/// Runs one stream against `target`; when the bench counts bureau calls, reads the mock's
/// `calls_total` before and after (nothing is in flight then: a run ends when every request has).
/// `span`: the run is one of the target's warm-up and rate steps, which run back to back.
async fn run_stream(
    bench: &Bench<'_>,
    target: &mut Target,
    spec: StreamSpec,
    span: bool,
) -> anyhow::Result<(StreamSnapshot, CpuUse)> {
    let before = bench.mock.map(mock_calls_total).transpose()?;
    let cpu_before = (cpu_time(target.pid, target.kind.is_nginx()), self_cpu_time());
    let report = target.generator.run(vec![spec]).await?;
    let cpu_after = (cpu_time(target.pid, target.kind.is_nginx()), self_cpu_time());
    let cpu = CpuUse {
        target: cpu_before.0.zip(cpu_after.0).map(|(b, a)| a.saturating_sub(b)),
        generator: cpu_before.1.zip(cpu_after.1).map(|(b, a)| a.saturating_sub(b)),
    };
    let stream = first_stream(&report)?.clone();
    if let (Some(mock), Some(before)) = (bench.mock, before) {
        let after = mock_calls_total(mock)?;
        let check = &mut target.check;
        check.requests += stream.sent;
        check.bureau_calls += after.saturating_sub(before);
        if span {
            check.calls_total_first.get_or_insert(before);
            check.calls_total_last = after;
        }
    }
    Ok((stream, cpu))
}

fn first_stream(report: &RunSnapshot) -> anyhow::Result<&StreamSnapshot> {
    report.streams.first().context("run report has no stream")
}

/// A constant-rate stream of score look-ups. Overhead: each for a subject
/// id never asked before in this benchmark, so that no cache along the way
/// can answer and every request goes all the way to the mock bureau.
/// Cache-hit: every one for [`HOT_PATH`].
fn stream_spec(
    scenario: Scenario,
    kind: TargetKind,
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    next_subject: &mut u64,
) -> anyhow::Result<StreamSpec> {
    let scheme = if kind.is_tls() { "https" } else { "http" };
    let template = RequestTemplate::get(&format!("{scheme}://{addr}{HOT_PATH}"))?.header("x-api-key", API_KEY)?;
    match scenario {
        Scenario::Overhead | Scenario::Tls | Scenario::TlsHandshake | Scenario::Closed => {
            let first = *next_subject;
            let spec = StreamSpec::new(
                kind.as_str(),
                template.vary_path(move |seq| format!("/v1/score/S{:012}", first + seq)),
            )
            .phase(duration, rate);
            *next_subject += spec.planned_requests();
            Ok(spec)
        }
        Scenario::CacheHit => Ok(StreamSpec::new(kind.as_str(), template).phase(duration, rate)),
    }
}

/// The response header that tells a target's cache hits (none: no cache).
fn cache_header(kind: TargetKind) -> Option<&'static str> {
    match kind {
        TargetKind::Direct | TargetKind::BureauGuardTls | TargetKind::NginxTls => None,
        TargetKind::BureauGuard => Some("x-cache"),
        TargetKind::Nginx => Some("x-cache-status"),
    }
}

/// Fills a target's cache with one request for the hot subject and checks that the next
/// request is answered from it.
fn warm_cache(kind: TargetKind, addr: SocketAddr) -> anyhow::Result<()> {
    let first = http_get(addr, HOT_PATH).with_context(|| format!("{}: warm-up request", kind.as_str()))?;
    if first.status != 200 {
        bail!("{}: warm-up request answered {}:\n{}", kind.as_str(), first.status, first.head);
    }
    let Some(name) = cache_header(kind) else {
        return Ok(());
    };
    let second = http_get(addr, HOT_PATH).with_context(|| format!("{}: probe after warm-up", kind.as_str()))?;
    let (warm, probe) = (first.header(name).unwrap_or("(absent)"), second.header(name).unwrap_or("(absent)"));
    eprintln!("proxy_overhead: {}: warm-up request {name}: {warm}, next one {name}: {probe}", kind.as_str());
    if second.status != 200 || probe != "HIT" {
        bail!(
            "{}: the request after the warm-up one is not a cache hit (status {}, {name}: {probe}):\n{}",
            kind.as_str(),
            second.status,
            second.head
        );
    }
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A per-request CPU figure for a table cell.
fn micros(us: Option<f64>) -> String {
    us.map_or_else(|| "—".to_owned(), |us| format!("{us:.1}"))
}

/// CPU time used during one run: by the target's processes, and by this process (the load
/// generator). `None` where `/proc` could not be read.
#[derive(Clone, Copy)]
struct CpuUse {
    target: Option<Duration>,
    generator: Option<Duration>,
}

impl CpuUse {
    fn per_response(&self, cpu: Option<Duration>, responses: u64) -> Option<f64> {
        let cpu = cpu?;
        (responses > 0).then(|| cpu.as_secs_f64() * 1e6 / responses as f64)
    }
}

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 per second on Linux.
const USER_HZ: f64 = 100.0;

/// (parent pid, user + system CPU time) of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: &str) -> Option<(u32, Duration)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
    // Fields 4 (ppid), 14 (utime) and 15 (stime) of proc(5), counted from 3 (state) here.
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((ppid, Duration::from_secs_f64(ticks as f64 / USER_HZ)))
}

/// CPU time used so far by process `pid` (all its threads) and, with `children`, by the
/// processes it started (nginx's workers, cache manager and loader).
fn cpu_time(pid: u32, children: bool) -> Option<Duration> {
    let (_, mut total) = proc_stat(&pid.to_string())?;
    if children {
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
                continue;
            };
            if let Some((ppid, cpu)) = proc_stat(name)
                && ppid == pid
            {
                total += cpu;
            }
        }
    }
    Some(total)
}

fn self_cpu_time() -> Option<Duration> {
    cpu_time(std::process::id(), false)
}

/// A target's highest sustainable rate, and whether it is the highest rate tried (a lower bound).
fn max_sustainable(rates: &[f64], steps: &[Step], kind: TargetKind) -> Option<(f64, bool)> {
    let best = steps.iter().filter(|s| s.target == kind && s.sustainable()).map(|s| s.offered).reduce(f64::max)?;
    Some((best, best >= rates.last().copied().unwrap_or(0.0)))
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The goal of issue 5: a cache hit adds less than this p50 over a direct call.
const GOAL_ADDED_P50_MS: f64 = 0.050;
/// ... and bureau-guard sustains at least this many times nginx's cache-hit rate.
const GOAL_RATE_RATIO: f64 = 1.5;

fn render(args: &Args, scenario: Scenario, steps: &[Step], rounds: &[Vec<Step>], targets: &[Target]) -> String {
    let mut out = String::new();
    let step_secs = args.step.as_secs_f64();
    match scenario {
        Scenario::Overhead => {
            let _ = writeln!(out, "\n### Proxy overhead: open-loop load, {step_secs:.1} s per rate\n");
        }
        Scenario::CacheHit => {
            let _ = writeln!(
                out,
                "\n### Cache hits: open-loop load, every request GET {HOT_PATH}, {step_secs:.1} s per rate\n"
            );
        }
        Scenario::Tls => {
            let _ = writeln!(
                out,
                "\n### TLS, kept-alive connections: open-loop load, plain vs TLS, {step_secs:.1} s per rate\n"
            );
        }
        Scenario::TlsHandshake => {
            let _ = writeln!(
                out,
                "\n### TLS handshakes: a new connection per request (full handshake), plain vs TLS, \
                 {step_secs:.1} s per rate (offered = connections/s)\n"
            );
        }
        Scenario::Closed => unreachable!("the closed loop renders its own tables (closed.rs)"),
    }
    let _ = writeln!(
        out,
        "| target | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | generator lag p99 ms | \
         target CPU µs/req | generator CPU µs/req | sustainable |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|");
    for s in steps {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.3} | {} | {} | {} |",
            s.target.as_str(),
            s.offered,
            s.achieved,
            ms(s.p50),
            ms(s.p99),
            ms(s.p999),
            ms(s.max),
            s.errors,
            ms(s.send_lag_p99),
            micros(s.target_cpu_us),
            micros(s.generator_cpu_us),
            if s.sustainable() { "yes" } else { "no" }
        );
    }
    let errors: Vec<&Step> = steps.iter().chain(rounds.iter().flatten()).filter(|s| s.errors > 0).collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nErrors:");
        for s in errors {
            let _ = writeln!(out, "- {} at {:.0} req/s: {}", s.target.as_str(), s.offered, s.error_detail);
        }
    }

    let _ = writeln!(
        out,
        "\nMax sustainable rate = highest offered rate with achieved >= {:.0}% of offered, \
         zero errors (transport errors, timeouts, non-200) and p99 < {} ms:\n",
        MIN_ACHIEVED_SHARE * 100.0,
        MAX_P99.as_millis()
    );
    let rates = args.rates(scenario);
    let capacity = |kind| match max_sustainable(rates, steps, kind) {
        None => "none of the rates tried".to_owned(),
        Some((rate, true)) => format!(">= {rate:.0} (highest tried)"),
        Some((rate, false)) => format!("{rate:.0}"),
    };
    let at_key = |kind: TargetKind| steps.iter().find(|s| s.target == kind && (s.offered - args.key_rate).abs() < 0.5);
    if scenario.is_tls() {
        render_tls(&mut out, rates, steps);
        return out;
    }
    if scenario == Scenario::Overhead {
        let _ = writeln!(out, "| target | max sustainable req/s |");
        let _ = writeln!(out, "|---|---:|");
        for kind in TargetKind::ALL {
            if steps.iter().any(|s| s.target == kind) {
                let _ = writeln!(out, "| {} | {} |", kind.as_str(), capacity(kind));
            }
        }
        if let Some(direct) = at_key(TargetKind::Direct) {
            let mut figures = Vec::new();
            for kind in [TargetKind::BureauGuard, TargetKind::Nginx] {
                if let Some(step) = at_key(kind) {
                    figures.push(format!(
                        "{} {:+.3} ms (p50 {:.3} vs {:.3} ms; p99 {:+.3} ms)",
                        kind.as_str(),
                        ms(step.p50) - ms(direct.p50),
                        ms(step.p50),
                        ms(direct.p50),
                        ms(step.p99) - ms(direct.p99),
                    ));
                }
            }
            if !figures.is_empty() {
                let _ = writeln!(
                    out,
                    "\nAdded latency at {:.0} req/s, p50 over direct: {}",
                    args.key_rate,
                    figures.join("; ")
                );
            }
        }
        return out;
    }

    // Cache-hit summary: capacity, p50 at the key rate (its step, then the rounds' median) and
    // what the proxies add over direct.
    let round_p50 = |kind: TargetKind| -> Vec<f64> {
        rounds.iter().filter_map(|r| r.iter().find(|s| s.target == kind)).map(|s| ms(s.p50)).collect()
    };
    let round_added = |kind: TargetKind| -> Option<f64> {
        median(
            rounds
                .iter()
                .filter_map(|r| {
                    let p50 = |k| r.iter().find(|s| s.target == k).map(|s| ms(s.p50));
                    Some(p50(kind)? - p50(TargetKind::Direct)?)
                })
                .collect(),
        )
    };
    let direct_key = at_key(TargetKind::Direct).map(|s| ms(s.p50));
    let n = rounds.len();
    // CPU per hit, compared at the highest rate both proxies sustained (every target's, without
    // one of them): on a dedicated host (no generator on the same cores) capacity goes as its
    // inverse.
    let present: Vec<TargetKind> =
        TargetKind::ALL.into_iter().filter(|k| steps.iter().any(|s| s.target == *k)).collect();
    let proxies: Vec<TargetKind> = present.iter().copied().filter(|k| *k != TargetKind::Direct).collect();
    let compared = if proxies.is_empty() { present } else { proxies };
    let common_rate = compared
        .iter()
        .map(|k| max_sustainable(rates, steps, *k).map(|(r, _)| r))
        .try_fold(f64::INFINITY, |low, r| r.map(|r| low.min(r)));
    let cpu_at_common = |kind: TargetKind| {
        let rate = common_rate?;
        steps.iter().find(|s| s.target == kind && (s.offered - rate).abs() < 0.5)?.target_cpu_us
    };
    let _ = writeln!(
        out,
        "| target | max sustainable req/s | p50 at {r:.0} req/s | added p50 over direct | \
         p50 at {r:.0} req/s, median of {n} rounds | added p50, median of {n} rounds | target CPU µs/req at {c} req/s |",
        r = args.key_rate,
        c = common_rate.map_or_else(|| "—".to_owned(), |c| format!("{c:.0}"))
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let dash = || "—".to_owned();
    for kind in TargetKind::ALL {
        if !steps.iter().any(|s| s.target == kind) {
            continue;
        }
        let key = at_key(kind).map(|s| ms(s.p50));
        let added = match (kind, key, direct_key) {
            (TargetKind::Direct, ..) => dash(),
            (_, Some(k), Some(d)) => format!("{:+.3} ms", k - d),
            _ => dash(),
        };
        let rounds_p50 = median(round_p50(kind)).map_or_else(dash, |p| format!("{p:.3} ms"));
        let rounds_added = match kind {
            TargetKind::Direct => dash(),
            _ => round_added(kind).map_or_else(dash, |a| format!("{a:+.3} ms")),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {added} | {rounds_p50} | {rounds_added} | {} |",
            kind.as_str(),
            capacity(kind),
            key.map_or_else(dash, |k| format!("{k:.3} ms")),
            micros(cpu_at_common(kind)),
        );
    }

    if !rounds.is_empty() {
        let kinds: Vec<TargetKind> =
            TargetKind::ALL.into_iter().filter(|k| rounds.iter().flatten().any(|s| s.target == *k)).collect();
        let _ = writeln!(
            out,
            "\nRounds at {:.0} req/s, {step_secs:.1} s per target, order rotated each round: \
             p50 ms (p99 ms; generator lag p99 ms)\n",
            args.key_rate
        );
        let _ = writeln!(out, "| round | {} |", kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(kinds.len()));
        for (i, round) in rounds.iter().enumerate() {
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| {
                    round.iter().find(|s| s.target == *k).map_or_else(dash, |s| {
                        let flag = if s.sustainable() { "" } else { " (not sustainable)" };
                        format!("{:.3} ({:.3}; {:.3}){flag}", ms(s.p50), ms(s.p99), ms(s.send_lag_p99))
                    })
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", i + 1, cells.join(" | "));
        }
    }

    let _ = writeln!(out, "\nCache verification (the mock bureau's GET /stats calls_total):\n");
    for t in targets {
        let c = &t.check;
        let span = match c.calls_total_first {
            Some(first) => {
                format!("calls_total {first} before its load warm-up, {} after its last step", c.calls_total_last)
            }
            None => "calls_total not read".to_owned(),
        };
        let verdict = match (&c.header_after, cache_header(t.kind)) {
            (Some(value), Some(name)) => {
                let ok = c.bureau_calls == 0 && value == "HIT";
                format!(
                    "; probe after the steps: {name}: {value}: {}",
                    if ok { "every request a cache hit" } else { "NOT every request a cache hit" }
                )
            }
            _ => " (no cache: every request reaches the mock)".to_owned(),
        };
        let _ = writeln!(
            out,
            "- {}: {} requests, {} bureau calls during them; {span}{verdict}",
            t.kind.as_str(),
            c.requests,
            c.bureau_calls
        );
    }

    let _ = writeln!(out, "\nGoals (issue 5):\n");
    for kind in [TargetKind::BureauGuard, TargetKind::Nginx] {
        let added = if rounds.is_empty() {
            at_key(kind).map(|s| ms(s.p50)).zip(direct_key).map(|(k, d)| (k - d, "of the key-rate step".to_owned()))
        } else {
            round_added(kind).map(|a| (a, format!("median of {n} rounds")))
        };
        if let Some((added, how)) = added {
            let verdict = if added < GOAL_ADDED_P50_MS { "met" } else { "NOT met" };
            let _ = writeln!(
                out,
                "- {} cache hit, added p50 over direct at {:.0} req/s < {:.3} ms: {added:+.3} ms ({how}): {verdict}",
                kind.as_str(),
                args.key_rate,
                GOAL_ADDED_P50_MS
            );
        }
    }
    let guard = max_sustainable(rates, steps, TargetKind::BureauGuard);
    let nginx = max_sustainable(rates, steps, TargetKind::Nginx);
    if let (Some((g, g_top)), Some((x, x_top))) = (guard, nginx) {
        let ratio = g / x;
        let (bound, verdict) = match (g_top, x_top) {
            (false, false) => ("", if ratio >= GOAL_RATE_RATIO { "met" } else { "NOT met" }),
            // bureau-guard's rate is a lower bound: the ratio is at least this.
            (true, false) => (">= ", if ratio >= GOAL_RATE_RATIO { "met" } else { "undetermined (add higher rates)" }),
            (false, true) => {
                ("<= ", if ratio < GOAL_RATE_RATIO { "NOT met" } else { "undetermined (add higher rates)" })
            }
            (true, true) => ("", "undetermined: both sustain the highest rate tried (add higher rates)"),
        };
        let _ = writeln!(
            out,
            "- bureau-guard / nginx max sustainable cache-hit rate >= {GOAL_RATE_RATIO}: {g:.0} / {x:.0} = \
             {bound}{ratio:.2}x: {verdict}"
        );
        if let (Some(g_cpu), Some(x_cpu), Some(rate)) =
            (cpu_at_common(TargetKind::BureauGuard), cpu_at_common(TargetKind::Nginx), common_rate)
        {
            let _ = writeln!(
                out,
                "  (CPU per hit at {rate:.0} req/s: bureau-guard {g_cpu:.1} µs, nginx {x_cpu:.1} µs: on cores of \
                 their own, bureau-guard would serve about {:.2}x nginx's hits)",
                x_cpu / g_cpu
            );
        }
    } else if guard.is_some() || nginx.is_some() {
        let _ =
            writeln!(out, "- bureau-guard / nginx max sustainable cache-hit rate: not comparable (one sustained none)");
    }
    out
}

/// TLS scenarios: each target's capacity, then plain and TLS side by side at the highest rate
/// every target sustained (latency and CPU per request), and the ratios.
fn render_tls(out: &mut String, rates: &[f64], steps: &[Step]) {
    let present: Vec<TargetKind> =
        TargetKind::ALL.into_iter().filter(|k| steps.iter().any(|s| s.target == *k)).collect();
    let capacity = |kind| max_sustainable(rates, steps, kind);
    let show = |c: Option<(f64, bool)>| match c {
        None => "none of the rates tried".to_owned(),
        Some((rate, true)) => format!(">= {rate:.0} (highest tried)"),
        Some((rate, false)) => format!("{rate:.0}"),
    };
    let common =
        present.iter().map(|k| capacity(*k).map(|(r, _)| r)).try_fold(f64::INFINITY, |low, r| r.map(|r| low.min(r)));
    let at = |kind: TargetKind| {
        let rate = common?;
        steps.iter().find(|s| s.target == kind && (s.offered - rate).abs() < 0.5)
    };
    let dash = || "—".to_owned();
    let _ = writeln!(
        out,
        "| target | max sustainable | p50 ms at {c} | p99 ms at {c} | target CPU µs/req at {c} | generator CPU µs/req at {c} |",
        c = common.map_or_else(dash, |c| format!("{c:.0}/s"))
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for &kind in &present {
        let step = at(kind);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            kind.as_str(),
            show(capacity(kind)),
            step.map_or_else(dash, |s| format!("{:.3}", ms(s.p50))),
            step.map_or_else(dash, |s| format!("{:.3}", ms(s.p99))),
            micros(step.and_then(|s| s.target_cpu_us)),
            micros(step.and_then(|s| s.generator_cpu_us)),
        );
    }
    let _ = writeln!(out);
    let ratio = |a: Option<(f64, bool)>, b: Option<(f64, bool)>| match (a, b) {
        (Some((a, a_top)), Some((b, b_top))) => {
            let bound = match (a_top, b_top) {
                (false, false) => "",
                (true, false) => ">= ",
                (false, true) => "<= ",
                (true, true) => "undetermined (both at the highest rate tried) ",
            };
            format!("{a:.0} / {b:.0} = {bound}{:.2}x", a / b)
        }
        _ => "not comparable".to_owned(),
    };
    for (plain, tls) in
        [(TargetKind::BureauGuard, TargetKind::BureauGuardTls), (TargetKind::Nginx, TargetKind::NginxTls)]
    {
        if !present.contains(&plain) || !present.contains(&tls) {
            continue;
        }
        let cpu = match (at(plain).and_then(|s| s.target_cpu_us), at(tls).and_then(|s| s.target_cpu_us)) {
            (Some(p), Some(t)) => format!("; TLS adds {:+.1} µs of {} CPU per request", t - p, plain.as_str()),
            _ => String::new(),
        };
        let p50 = match (at(plain), at(tls)) {
            (Some(p), Some(t)) => format!("; p50 {:+.3} ms", ms(t.p50) - ms(p.p50)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "- {}: TLS / plain max sustainable: {}{p50}{cpu}",
            plain.as_str(),
            ratio(capacity(tls), capacity(plain))
        );
    }
    if present.contains(&TargetKind::BureauGuardTls) && present.contains(&TargetKind::NginxTls) {
        let _ = writeln!(
            out,
            "- bureau-guard-tls / nginx-tls max sustainable: {}",
            ratio(capacity(TargetKind::BureauGuardTls), capacity(TargetKind::NginxTls))
        );
    }
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

fn guard_config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    cached: bool,
    tls: Option<(&Path, &Path)>,
) -> String {
    let key_hash = hex::encode(sha2::Sha256::digest(API_KEY.as_bytes()));
    let tls = tls.map_or_else(String::new, |(cert, key)| {
        format!("\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display())
    });
    // Cache-hit scenario: the route caches score look-ups by subject, per tenant (the default
    // scope), as config.example.toml does.
    let caching = if cached { "coalesce = true\ncache_ttl = \"10m\"\ncache_key = [\"path.subject_id\"]\n" } else { "" };
    format!(
        r#"[server]
listen = "{listen}"
{tls}
[admin]
listen = "{admin}"
insecure_no_token = true

[upstream]
url = "http://{upstream}"

[log]
access_log = false

[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
{caching}
[[tenants]]
id = "bench"
name = "Bench"
api_key_sha256 = "{key_hash}"
"#
    )
}

fn nginx_config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    cached: bool,
    tls: Option<(SocketAddr, &Path, &Path)>,
) -> String {
    let dir = dir.display();
    // TLS scenarios: a second listener with the bench certificate, TLS 1.2 and 1.3 like
    // bureau-guard; session caches off, so every new connection is a full handshake on both.
    let tls = tls.map_or_else(String::new, |(addr, cert, key)| {
        format!(
            "        listen {addr} ssl;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;\n",
            cert.display(),
            key.display()
        )
    });
    // Cache-hit scenario: cache 200s for 10 minutes whatever the upstream says (the mock sends
    // no Cache-Control), keyed by the URI, and tell hits in X-Cache-Status.
    let (cache_zone, cache_use, what) = if cached {
        (
            format!(
                "    proxy_cache_path {dir}/nginx-cache levels=1:2 keys_zone=hits:10m max_size=64m inactive=1h \
                 use_temp_path=off;\n"
            ),
            "            proxy_cache hits;
            proxy_cache_valid 200 10m;
            proxy_cache_key $uri;
            add_header X-Cache-Status $upstream_cache_status always;\n",
            "a caching keep-alive reverse proxy",
        )
    } else {
        (String::new(), "", "a plain keep-alive reverse proxy")
    };
    format!(
        r#"# Generated by benches/proxy_overhead.rs: {what}.
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;

events {{
    worker_connections 16384;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/nginx-client-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
{cache_zone}    # The generator reuses its connections; do not make it reconnect.
    keepalive_requests 1000000;

    upstream bureau {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen};
{tls}        location / {{
            proxy_pass http://bureau;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{cache_use}        }}
    }}
}}
"#
    )
}

/// Starts nginx in the foreground with `conf` (its files under `dir`) and waits until it
/// answers on `addr`.
fn spawn_nginx(bin: &Path, dir: &Path, conf: &Path, addr: SocketAddr) -> anyhow::Result<ChildGuard> {
    let mut child = ChildGuard::spawn(
        "nginx",
        Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-early-error.log"))
            .arg("-c")
            .arg(conf)
            .args(["-g", "daemon off;"]),
        dir,
    )?;
    child.wait_ready(addr, PROBE_PATH)?;
    Ok(child)
}

fn find_nginx(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_owned());
    }
    if let Some(path) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(path));
    }
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    path_dirs
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/nginx/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

// ---------------------------------------------------------------------------
// Processes, ports, files
// ---------------------------------------------------------------------------

/// Binds `N` listeners on 127.0.0.1:0 at once, reads their ports and closes
/// them. Another process could take a port before the child binds it; the
/// readiness probe would then fail, loudly.
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("reserving ephemeral ports")?;
    let mut ports = [0_u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().context("reading a reserved port")?.port();
    }
    Ok(ports)
}

/// A child process that is stopped (SIGTERM, then SIGKILL after
/// [`STOP_DEADLINE`]) and reaped when the guard drops, including on panic.
struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr appended to `<dir>/<name>.log`.
    fn spawn(name: &'static str, command: &mut Command, dir: &Path) -> anyhow::Result<ChildGuard> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        Ok(ChildGuard { name, child, log })
    }

    /// Polls `GET path` on `addr` until it answers 200, the child exits, or
    /// [`READY_DEADLINE`] passes.
    fn wait_ready(&mut self, addr: SocketAddr, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            self.check_alive()?;
            let last = match probe(addr, path) {
                Ok(200) => return Ok(()),
                Ok(status) => format!("status {status}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready on http://{addr}{path} after {:?} (last: {last}); log:\n{}",
                    self.name,
                    READY_DEADLINE,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited ({status}); log:\n{}", self.name, self.log_tail()),
            Err(e) => bail!("cannot check on {}: {e}", self.name),
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGTERM first: nginx's master then stops its workers, which a
        // SIGKILL to the master would leave running.
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if terminated {
            let deadline = Instant::now() + STOP_DEADLINE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `GET path` over a fresh connection; returns the status code.
fn probe(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    http_get(addr, path).map(|reply| reply.status)
}

/// A response read by [`http_get`].
struct Reply {
    status: u16,
    /// Status line and header fields.
    head: String,
    body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// One `GET path` (with the bench's API key) over a fresh connection, read to its end
/// (`Connection: close`; at most 1 MiB, 500 ms per read).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nx-api-key: {API_KEY}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.take(1 << 20).read_to_end(&mut raw)?;
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(invalid(format!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw))));
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("not an HTTP response: {head:?}")))?;
    Ok(Reply { status, head, body: raw[end + 4..].to_vec() })
}

/// The mock bureau's `calls_total`: look-ups that reached it since it started.
fn mock_calls_total(mock: SocketAddr) -> anyhow::Result<u64> {
    let reply = http_get(mock, "/stats").context("reading the mock bureau's /stats")?;
    if reply.status != 200 {
        bail!("the mock bureau's /stats answered {}", reply.status);
    }
    let stats: Stats = serde_json::from_slice(&reply.body).context("parsing the mock bureau's /stats")?;
    Ok(stats.calls_total)
}

/// A scratch directory (configs, logs, nginx's pid and temp files), removed
/// on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("bureau-guard-bench-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

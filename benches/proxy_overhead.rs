//! End-to-end proxy overhead: what does putting bureau-guard in front of the
//! bureau cost, compared with no proxy and with nginx?
//!
//! Starts three child processes on ephemeral loopback ports — the mock
//! bureau (`bureau-guard mock-bureau`), bureau-guard itself (`bureau-guard
//! serve`, proxying to the mock) and nginx (proxying to the mock with a
//! keep-alive upstream pool) — then, for each target in turn (direct to the
//! mock, through bureau-guard, through nginx), offers open-loop load at
//! increasing rates with [`bureau_guard::loadgen`] and prints a markdown
//! table, each target's maximum sustainable rate and the latency each proxy
//! adds at a moderate rate.
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
use bureau_guard::loadgen::{LoadGenerator, LoadgenOptions, RequestTemplate, RunSnapshot, StreamSnapshot, StreamSpec};
use sha2::Digest;

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
  --quick              short smoke run (3 small rates, 1 s steps): well under a minute
  --rates A,B,...      offered rates in req/s (default 1000,2000,4000,8000,10000,12000,16000,20000,24000,32000)
  --step-secs S        seconds of load per rate (default 4; quick 1)
  --warmup-secs S      seconds of warm-up per target, not reported (default 2; quick 0.5)
  --pause-secs S       idle seconds between steps (default 1; quick 0.2)
  --key-rate R         rate for the added-latency figure, added to the rates (default 1000)
  --targets LIST       subset of direct,bureau-guard,nginx (default all)
  --nginx PATH         nginx binary (default: $NGINX, then PATH, then /usr/sbin/nginx)";

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetKind {
    Direct,
    BureauGuard,
    Nginx,
}

impl TargetKind {
    const ALL: [TargetKind; 3] = [Self::Direct, Self::BureauGuard, Self::Nginx];

    fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::BureauGuard => "bureau-guard",
            Self::Nginx => "nginx",
        }
    }
}

#[derive(Debug)]
struct Args {
    rates: Vec<f64>,
    step: Duration,
    warmup: Duration,
    pause: Duration,
    key_rate: f64,
    targets: Vec<TargetKind>,
    nginx: Option<PathBuf>,
}

impl Args {
    /// `Ok(None)` after printing help.
    fn parse(raw: &[String]) -> anyhow::Result<Option<Args>> {
        let quick = raw.iter().any(|a| a == "--quick");
        let mut args = if quick {
            Args {
                rates: vec![500.0, 1000.0, 2000.0],
                step: Duration::from_secs(1),
                warmup: Duration::from_millis(500),
                pause: Duration::from_millis(200),
                key_rate: 1000.0,
                targets: TargetKind::ALL.to_vec(),
                nginx: None,
            }
        } else {
            Args {
                rates: vec![1000.0, 2000.0, 4000.0, 8000.0, 10000.0, 12000.0, 16000.0, 20000.0, 24000.0, 32000.0],
                step: Duration::from_secs(4),
                warmup: Duration::from_secs(2),
                pause: Duration::from_secs(1),
                key_rate: 1000.0,
                targets: TargetKind::ALL.to_vec(),
                nginx: None,
            }
        };
        let mut iter = raw.iter();
        while let Some(flag) = iter.next() {
            let mut value = || iter.next().with_context(|| format!("{flag} needs a value")).cloned();
            match flag.as_str() {
                "--bench" | "--quick" => {}
                "--help" | "-h" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                "--rates" => {
                    args.rates = value()?
                        .split(',')
                        .map(|r| parse_positive(r.trim(), "--rates"))
                        .collect::<anyhow::Result<_>>()?;
                }
                "--step-secs" => args.step = seconds(&value()?, flag)?,
                "--warmup-secs" => args.warmup = seconds(&value()?, flag)?,
                "--pause-secs" => args.pause = seconds(&value()?, flag)?,
                "--key-rate" => args.key_rate = parse_positive(&value()?, flag)?,
                "--targets" => {
                    args.targets = value()?
                        .split(',')
                        .map(|name| {
                            TargetKind::ALL
                                .into_iter()
                                .find(|t| t.as_str() == name.trim())
                                .with_context(|| format!("unknown target {name:?}"))
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                "--nginx" => args.nginx = Some(PathBuf::from(value()?)),
                // cargo passes filters and other harnesses' flags to every
                // bench binary; they are not ours to reject.
                other => eprintln!("proxy_overhead: ignoring argument {other:?}"),
            }
        }
        if !args.rates.contains(&args.key_rate) {
            args.rates.push(args.key_rate);
        }
        args.rates.sort_by(f64::total_cmp);
        args.rates.dedup();
        if args.step.is_zero() {
            bail!("--step-secs must be > 0");
        }
        Ok(Some(args))
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
}

impl Step {
    fn from_report(target: TargetKind, stream: &StreamSnapshot) -> Step {
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

    // Reserve every port at once so no two children get the same one.
    let [mock_port, guard_port, admin_port, nginx_port] = free_ports::<4>()?;
    let mock_addr = SocketAddr::from(([127, 0, 0, 1], mock_port));
    let guard_addr = SocketAddr::from(([127, 0, 0, 1], guard_port));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], nginx_port));
    let probe_path = "/v1/score/S-ready";

    // Children are declared after `workdir`, so they are stopped before it
    // is removed; their guards stop them on every exit path, panics included.
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
    mock.wait_ready(mock_addr, probe_path)?;

    let mut targets: Vec<(TargetKind, SocketAddr)> = Vec::new();
    let mut _guard_child = None;
    let mut _nginx_child = None;
    for &kind in &args.targets {
        match kind {
            TargetKind::Direct => targets.push((kind, mock_addr)),
            TargetKind::BureauGuard => {
                let config = workdir.path.join("bureau-guard.toml");
                fs::write(&config, guard_config(guard_addr, admin_addr, mock_addr))
                    .context("writing the bureau-guard config")?;
                let mut child = ChildGuard::spawn(
                    "bureau-guard",
                    Command::new(bin).arg("serve").arg("--config").arg(&config),
                    &workdir.path,
                )?;
                child.wait_ready(admin_addr, "/healthz")?;
                child.wait_ready(guard_addr, probe_path)?;
                _guard_child = Some(child);
                targets.push((kind, guard_addr));
            }
            TargetKind::Nginx => {
                let Some(nginx_bin) = &nginx_bin else {
                    continue;
                };
                let conf = workdir.path.join("nginx.conf");
                fs::write(&conf, nginx_config(&workdir.path, nginx_addr, mock_addr))
                    .context("writing the nginx config")?;
                let mut child = ChildGuard::spawn(
                    "nginx",
                    Command::new(nginx_bin)
                        .arg("-p")
                        .arg(&workdir.path)
                        .arg("-e")
                        .arg(workdir.path.join("nginx-early-error.log"))
                        .arg("-c")
                        .arg(&conf)
                        .args(["-g", "daemon off;"]),
                    &workdir.path,
                )?;
                child.wait_ready(nginx_addr, probe_path)?;
                _nginx_child = Some(child);
                targets.push((kind, nginx_addr));
            }
        }
    }

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("building the tokio runtime")?;
    eprintln!(
        "proxy_overhead: targets {:?}, rates {:?} req/s, {:.1} s per step",
        targets.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        args.rates,
        args.step.as_secs_f64()
    );
    let mut steps = Vec::new();
    let mut next_subject = 0_u64;
    for &(kind, addr) in &targets {
        runtime.block_on(measure_target(args, kind, addr, &mut next_subject, &mut steps))?;
        // A child that died mid-run would make every later figure a lie.
        mock.check_alive()?;
        for child in [&mut _guard_child, &mut _nginx_child].into_iter().flatten() {
            child.check_alive()?;
        }
    }
    print!("{}", render(args, &steps));
    Ok(())
}

/// Warm-up, then one step per rate (lowest first) against one target.
async fn measure_target(
    args: &Args,
    kind: TargetKind,
    addr: SocketAddr,
    next_subject: &mut u64,
    steps: &mut Vec<Step>,
) -> anyhow::Result<()> {
    // One generator per target: its pool stays warm from the warm-up on.
    let generator =
        LoadGenerator::new(LoadgenOptions { request_timeout: REQUEST_TIMEOUT, ..LoadgenOptions::default() });
    if !args.warmup.is_zero() {
        let rate = args.rates.first().copied().unwrap_or(args.key_rate);
        let spec = stream_spec(kind, addr, rate, args.warmup, next_subject)?;
        let report = generator.run(vec![spec]).await?;
        let warmup = first_stream(&report)?;
        if warmup.status_count(200) == 0 {
            let step = Step::from_report(kind, warmup);
            bail!("{}: no 200 during warm-up: {}", kind.as_str(), step.error_detail);
        }
    }
    let mut consecutive_failures = 0;
    for &rate in &args.rates {
        tokio::time::sleep(args.pause).await;
        let spec = stream_spec(kind, addr, rate, args.step, next_subject)?;
        let report = generator.run(vec![spec]).await?;
        let step = Step::from_report(kind, first_stream(&report)?);
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

fn first_stream(report: &RunSnapshot) -> anyhow::Result<&StreamSnapshot> {
    report.streams.first().context("run report has no stream")
}

/// A constant-rate stream of score look-ups, each for a subject id never
/// asked before in this benchmark, so that no cache along the way can
/// answer: every request goes all the way to the mock bureau.
fn stream_spec(
    kind: TargetKind,
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    next_subject: &mut u64,
) -> anyhow::Result<StreamSpec> {
    let first = *next_subject;
    let spec = StreamSpec::new(
        kind.as_str(),
        RequestTemplate::get(&format!("http://{addr}/v1/score/S0"))?
            .header("x-api-key", API_KEY)?
            .vary_path(move |seq| format!("/v1/score/S{:012}", first + seq)),
    )
    .phase(duration, rate);
    *next_subject += spec.planned_requests();
    Ok(spec)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn render(args: &Args, steps: &[Step]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n### Proxy overhead: open-loop load, {:.1} s per rate\n", args.step.as_secs_f64());
    let _ = writeln!(
        out,
        "| target | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | generator lag p99 ms | sustainable |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|");
    for s in steps {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.3} | {} |",
            s.target.as_str(),
            s.offered,
            s.achieved,
            ms(s.p50),
            ms(s.p99),
            ms(s.p999),
            ms(s.max),
            s.errors,
            ms(s.send_lag_p99),
            if s.sustainable() { "yes" } else { "no" }
        );
    }
    let errors: Vec<&Step> = steps.iter().filter(|s| s.errors > 0).collect();
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
    let _ = writeln!(out, "| target | max sustainable req/s |");
    let _ = writeln!(out, "|---|---:|");
    let highest_rate = args.rates.last().copied().unwrap_or(0.0);
    for kind in TargetKind::ALL {
        let mine: Vec<&Step> = steps.iter().filter(|s| s.target == kind).collect();
        if mine.is_empty() {
            continue;
        }
        let best = mine
            .iter()
            .filter(|s| s.sustainable())
            .map(|s| s.offered)
            .fold(None, |best: Option<f64>, r| Some(best.map_or(r, |b| b.max(r))));
        let cell = match best {
            None => "none of the rates tried".to_owned(),
            Some(rate) if rate >= highest_rate => format!(">= {rate:.0} (highest tried)"),
            Some(rate) => format!("{rate:.0}"),
        };
        let _ = writeln!(out, "| {} | {cell} |", kind.as_str());
    }

    let at_key = |kind: TargetKind| steps.iter().find(|s| s.target == kind && (s.offered - args.key_rate).abs() < 0.5);
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
            let _ =
                writeln!(out, "\nAdded latency at {:.0} req/s, p50 over direct: {}", args.key_rate, figures.join("; "));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

fn guard_config(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr) -> String {
    let key_hash = hex::encode(sha2::Sha256::digest(API_KEY.as_bytes()));
    format!(
        r#"[server]
listen = "{listen}"

[admin]
listen = "{admin}"

[upstream]
url = "http://{upstream}"

[log]
access_log = false

[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"

[[tenants]]
id = "bench"
name = "Bench"
api_key_sha256 = "{key_hash}"
"#
    )
}

fn nginx_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let dir = dir.display();
    format!(
        r#"# Generated by benches/proxy_overhead.rs: a plain keep-alive reverse proxy.
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
    # The generator reuses its connections; do not make it reconnect.
    keepalive_requests 1000000;

    upstream bureau {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen};
        location / {{
            proxy_pass http://bureau;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
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
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nx-api-key: {API_KEY}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0_u8; 32];
    let mut filled = 0;
    // "HTTP/1.1 200 " is 13 bytes.
    while filled < 13 {
        let n = stream.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let head = String::from_utf8_lossy(&head[..filled]);
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {head:?}")))
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

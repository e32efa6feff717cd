//! The `bureau-guard` command line: `serve`, `check`, `reload`, `mock-bureau`, `demo`.
//!
//! `serve` runs in three phases, as linkerd's main does: parse and validate the config (fail
//! before binding anything), bind and run until SIGTERM/SIGINT, then drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::mock_bureau::{self, MockConfig};

#[derive(Parser, Debug)]
#[command(name = "bureau-guard", version, about = "A reverse proxy that protects a credit bureau's API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Config file (TOML); see config.example.toml.
        #[arg(long, short, env = "BUREAU_GUARD_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config: print every problem with its TOML path; exit 1 if any.
    Check {
        #[arg(long, short, env = "BUREAU_GUARD_CONFIG")]
        config: PathBuf,
        /// Also print what the config changes relative to this one (e.g. the running config).
        #[arg(long, value_name = "OLD_CONFIG")]
        diff: Option<PathBuf>,
    },
    /// Ask a running proxy to re-read its config file; print the outcome and every change or
    /// problem; exit 1 if the new config was rejected (the running one is then unchanged).
    Reload {
        /// The proxy's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9090", env = "BUREAU_GUARD_ADMIN")]
        admin: String,
        /// The admin token (`admin.token_sha256` / `token_env` of the running config).
        #[arg(long, env = "BUREAU_GUARD_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run a credit-bureau stand-in that fails like a real one (capacity, overload, refusals).
    ///
    /// A fixed number of workers and a queue with a timeout (503 + Retry-After past them), calls
    /// that run to their end when the client leaves, and 429/503 refusals on demand. Live
    /// changes: POST /control with
    /// {"service_ms": N, "workers": N, "refuse": {"status": 429, "share": 1.0, "retry_after_s": 2,
    /// "for_ms": 3000} | null}; GET /stats tells what reached it, POST /stats/reset starts a new
    /// in-flight window.
    MockBureau {
        #[arg(long, default_value = mock_bureau::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Requests served concurrently.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Service time of one request, in milliseconds.
        #[arg(long, default_value_t = 20)]
        service_ms: u64,
        /// Service time varies uniformly by ± this many milliseconds.
        #[arg(long, default_value_t = 5)]
        jitter_ms: u64,
        /// Requests that may wait for a worker before new ones get 503; `unbounded`: no bound.
        #[arg(long, default_value = "64", value_name = "N|unbounded", value_parser = parse_queue)]
        queue: usize,
        /// Longest wait for a worker before 503, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        queue_timeout_ms: u64,
        /// Refuse look-up calls with this status (429 or 503) until told otherwise on /control.
        #[arg(long, value_name = "429|503", value_parser = parse_refuse_status)]
        refuse_status: Option<http::StatusCode>,
        /// The share of look-up calls refused, 0 to 1.
        #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = parse_share, requires = "refuse_status")]
        refuse_share: f64,
        /// `Retry-After` seconds sent with refusals (none if absent).
        #[arg(long, value_name = "S", requires = "refuse_status")]
        retry_after: Option<u32>,
    },
    /// Replay the 2017 surge on this machine: a mock bureau, bureau-guard, one bank surging to
    /// 4x the bureau's capacity and two normal tenants; then the same traffic straight to the
    /// bureau. Needs no files or services. `--scenario` picks a harder day (see `surge.rs`).
    Demo {
        /// The scenario: patient (the kind case), impatient, too_high, slower, fewer_workers,
        /// many_tenants or all_at_once.
        #[arg(long, default_value = "patient", value_parser = clap::builder::PossibleValuesParser::new(crate::surge::Kind::NAMES))]
        scenario: String,
        /// Seconds of normal traffic before the surge (default: 4 for patient, else the
        /// scenario's short run).
        #[arg(long)]
        calm_s: Option<u64>,
        /// Seconds the surge lasts (default: 8 for patient, else the scenario's short run).
        #[arg(long)]
        surge_s: Option<u64>,
        /// Each surging tenant's requests per second (default: the scenario's).
        #[arg(long)]
        surge_rate: Option<f64>,
        /// Each quiet tenant's requests per second (default: the scenario's).
        #[arg(long)]
        quiet_rate: Option<f64>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, diff } => check(&config, diff.as_deref()),
        Command::Reload { admin, token } => reload(&admin, token.as_deref()),
        Command::Serve { config } => serve(&config),
        Command::MockBureau {
            listen,
            workers,
            service_ms,
            jitter_ms,
            queue,
            queue_timeout_ms,
            refuse_status,
            refuse_share,
            retry_after,
        } => {
            let cfg = MockConfig {
                workers: workers.max(1),
                service_time: Duration::from_millis(service_ms),
                jitter: Duration::from_millis(jitter_ms.min(service_ms)),
                queue,
                queue_timeout: Duration::from_millis(queue_timeout_ms),
            };
            let refusal = refuse_status.map(|status| mock_bureau::Refusal {
                status,
                share: refuse_share,
                retry_after_s: retry_after,
                duration: None,
            });
            mock(listen, cfg, refusal)
        }
        Command::Demo { scenario, calm_s, surge_s, surge_rate, quiet_rate } => {
            use crate::surge::{Kind, Length, Role, Scenario};
            let kind = Kind::parse(&scenario).expect("clap accepts only scenario names");
            let mut s = Scenario::new(kind, Length::Quick);
            if kind == Kind::Patient {
                // The demo's own pace since it was written: 4 s calm, 8 s surge.
                (s.calm, s.surge) = (Duration::from_secs(4), Duration::from_secs(8));
            }
            if let Some(c) = calm_s {
                s.calm = Duration::from_secs(c);
            }
            if let Some(d) = surge_s {
                s.surge = Duration::from_secs(d.max(1));
            }
            for t in &mut s.tenants {
                let rate = match t.role {
                    Role::Quiet => quiet_rate,
                    Role::Surging => surge_rate,
                };
                t.rate = rate.unwrap_or(t.rate);
            }
            demo(s)
        }
    }
}

fn demo(s: crate::surge::Scenario) -> ExitCode {
    use crate::surge::{Kind, replay, summary};
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    println!("bureau-guard demo: {}", s.describe());
    let surging: Vec<&str> = s.with_role(crate::surge::Role::Surging).map(|t| t.id.as_str()).collect();
    let surging = match surging.as_slice() {
        [one] => format!("{one} SURGING"),
        many => format!("{} tenants SURGING", many.len()),
    };
    runtime().block_on(async {
        let mut replays = Vec::new();
        for target in s.targets() {
            let label = target.label();
            let result = replay(&s, target, |snap| {
                let phase = if snap.elapsed < s.calm { "calm" } else { surging.as_str() };
                if tty {
                    print!("\x1b[2J\x1b[H");
                }
                println!("== {label}: {:.0} s, {phase}\n{snap}\n", snap.elapsed.as_secs_f64());
            })
            .await;
            match result {
                Ok(r) => {
                    println!("{}", summary(&s, &r));
                    replays.push(r);
                }
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        println!("== the same traffic, side by side (latency from the scheduled send time)\n");
        for r in &replays {
            println!("{}", summary(&s, r));
        }
        if s.kind == Kind::Patient {
            println!(
                "Through bureau-guard the bureau is never pushed past its {} workers: bank-b and card-c keep\n\
                 their look-ups, bank-a gets the capacity they leave and a fast 503 (with Retry-After) for\n\
                 the rest. Straight to the bureau, everyone's look-ups queue behind bank-a's and fail.",
                s.bureau.workers
            );
        } else {
            println!("{}: {}.", s.kind, s.kind.problem());
            println!("The verdict against the issue's criteria: cargo bench --bench surge -- --scenario {}", s.kind);
        }
        ExitCode::SUCCESS
    })
}

fn check(path: &Path, diff_against: Option<&Path>) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!(
                "{}: OK ({} tenants, {} routes, upstream {})",
                path.display(),
                c.tenants.len(),
                c.routes.len(),
                c.upstream.url
            );
            // Warnings do not fail the check: the config works today, it will not for long.
            for w in c.warnings() {
                println!("  warning: {w}");
            }
            if let Some(old_path) = diff_against {
                let old = match Config::load(old_path) {
                    Ok(old) => old,
                    Err(e) => {
                        println!("{}: cannot diff against it, {} problem(s)", old_path.display(), e.problems.len());
                        for p in &e.problems {
                            println!("  {p}");
                        }
                        return ExitCode::FAILURE;
                    }
                };
                let changes = crate::ops::reload::diff(&old, &c);
                println!("changes relative to {}: {}", old_path.display(), changes.len());
                for ch in &changes {
                    println!("  {ch}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}: {} problem(s)", path.display(), e.problems.len());
            for p in &e.problems {
                println!("  {p}");
            }
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime can be built")
}

fn serve(path: &Path) -> ExitCode {
    // Phase 1: the config is valid or nothing starts.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {} problem(s); not starting", path.display(), e.problems.len());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    let _log_guard = init_logging(config.log.format);
    // Before anything opens a descriptor: the connection cap is derived from this limit.
    crate::server::nofile::raise_to_hard_limit();
    runtime().block_on(async {
        // Phase 2: bind and serve.
        let options = crate::app::Options { config_path: Some(path.to_path_buf()), ..Default::default() };
        let running = match crate::app::start_with(config, options).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        // SIGHUP reloads, as `bureau-guard reload` does; SIGTERM/SIGINT drain and exit.
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGHUP handler");
                return ExitCode::FAILURE;
            }
        };
        let stop = wait_for_signal();
        tokio::pin!(stop);
        let signal = loop {
            tokio::select! {
                s = &mut stop => break s,
                _ = hup.recv() => {
                    let shared = running.shared.clone();
                    let out = tokio::task::spawn_blocking(move || crate::ops::reload::reload_from_file(&shared)).await;
                    if let Ok(out) = out {
                        tracing::info!(result = out.result, "SIGHUP reload");
                    }
                }
            }
        };
        // Phase 3: drain.
        tracing::info!(signal, "shutting down: draining in-flight requests");
        if running.shutdown().await {
            tracing::info!("drained; bye");
        } else {
            tracing::warn!("drain timeout reached; closed remaining connections");
        }
        ExitCode::SUCCESS
    })
}

fn reload(admin: &str, token: Option<&str>) -> ExitCode {
    use http_body_util::{BodyExt, Full};
    let url = format!("{}/admin/reload", admin.trim_end_matches('/'));
    runtime().block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let mut req = http::Request::post(&url);
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match req.body(Full::new(bytes::Bytes::new())) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("invalid admin URL {admin}: {e}");
                return ExitCode::from(2);
            }
        };
        let resp = match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                eprintln!("cannot reach {url}: {e}");
                return ExitCode::from(2);
            }
            Err(_) => {
                eprintln!("no answer from {url} within 30 s");
                return ExitCode::from(2);
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if status == http::StatusCode::UNAUTHORIZED {
            eprintln!("the admin endpoint refused the token: pass --token or set BUREAU_GUARD_ADMIN_TOKEN");
            return ExitCode::FAILURE;
        }
        if status == http::StatusCode::MISDIRECTED_REQUEST || status == http::StatusCode::FORBIDDEN {
            // The admin listener does not know the name in --admin (admin.allowed_hosts).
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            eprintln!("the admin endpoint refused the request ({status}): {message}");
            return ExitCode::FAILURE;
        }
        let Ok(out) = serde_json::from_slice::<serde_json::Value>(&body) else {
            eprintln!("unexpected answer ({status}): {}", String::from_utf8_lossy(&body));
            return ExitCode::FAILURE;
        };
        let list = |key: &str| -> Vec<serde_json::Value> { out[key].as_array().cloned().unwrap_or_default() };
        if out["result"] == "applied" {
            let changes = list("changes");
            println!("reload applied: {} change(s)", changes.len());
            for c in changes {
                let restart = if c["needs_restart"] == true { " (needs a restart)" } else { "" };
                println!("  {}: {}{restart}", c["path"].as_str().unwrap_or(""), c["what"].as_str().unwrap_or(""));
            }
            ExitCode::SUCCESS
        } else {
            let problems = list("problems");
            println!("reload rejected: {} problem(s); the running config is unchanged", problems.len());
            for p in problems {
                println!("  {}", p.as_str().unwrap_or(""));
            }
            ExitCode::FAILURE
        }
    })
}

/// `--queue`: a number, or `unbounded`.
fn parse_queue(s: &str) -> Result<usize, String> {
    match s {
        "unbounded" => Ok(mock_bureau::UNBOUNDED),
        n => n.parse().map_err(|_| format!("expected a number of requests or `unbounded`, not {n:?}")),
    }
}

/// `--refuse-status`: the two statuses a bureau pushes back with.
fn parse_refuse_status(s: &str) -> Result<http::StatusCode, String> {
    match s {
        "429" => Ok(http::StatusCode::TOO_MANY_REQUESTS),
        "503" => Ok(http::StatusCode::SERVICE_UNAVAILABLE),
        other => Err(format!("expected 429 or 503, not {other:?}")),
    }
}

/// `--refuse-share`: a share of calls, 0 to 1.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("expected a share between 0 and 1, not {s:?}")),
    }
}

fn mock(listen: SocketAddr, cfg: MockConfig, refusal: Option<mock_bureau::Refusal>) -> ExitCode {
    // The flags' parsers check each value; this checks the whole before anything binds.
    if let Some(problems) = refusal.as_ref().map(mock_bureau::Refusal::problems).filter(|p| !p.is_empty()) {
        eprintln!("error: invalid refusal: {}", problems.join("; "));
        return ExitCode::from(2);
    }
    let _log_guard = init_logging(LogFormat::Text);
    runtime().block_on(async {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, %listen, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            %listen,
            workers = cfg.workers,
            service_ms = cfg.service_time.as_millis() as u64,
            refusing = ?refusal,
            "mock bureau serving"
        );
        let handle = mock_bureau::start(cfg, listener);
        handle.bureau.set_refusal(refusal).expect("the refusal was checked before binding");
        wait_for_signal().await;
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT; returns the signal's name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Logs go through a background writer so a slow stdout never blocks a request.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mock_bureau_args(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(["bureau-guard", "mock-bureau"].iter().chain(args)).map(|cli| cli.command)
    }

    #[test]
    fn mock_bureau_takes_an_unbounded_queue_and_a_refusal() {
        let Ok(Command::MockBureau { queue, refuse_status, refuse_share, retry_after, .. }) = mock_bureau_args(&[
            "--queue",
            "unbounded",
            "--refuse-status",
            "503",
            "--refuse-share",
            "0.25",
            "--retry-after",
            "3",
        ]) else {
            panic!("mock-bureau flags rejected");
        };
        assert_eq!(queue, mock_bureau::UNBOUNDED);
        assert_eq!(
            (refuse_status, refuse_share, retry_after),
            (Some(http::StatusCode::SERVICE_UNAVAILABLE), 0.25, Some(3))
        );
        let Ok(Command::MockBureau { queue: 10, refuse_status: None, .. }) = mock_bureau_args(&["--queue", "10"])
        else {
            panic!("a numeric queue rejected");
        };
    }

    #[test]
    fn mock_bureau_rejects_bad_refusal_flags_with_exit_2() {
        for bad in [
            &["--queue", "lots"][..],
            &["--refuse-status", "418"],
            &["--refuse-status", "429", "--refuse-share", "1.5"],
            &["--refuse-status", "429", "--retry-after", "-1"],
            &["--refuse-share", "0.5"],
        ] {
            match mock_bureau_args(bad) {
                Ok(_) => panic!("{bad:?} accepted"),
                Err(e) => assert_eq!(e.exit_code(), 2, "{bad:?}: {e}"),
            }
        }
    }
}

//! The `bureau-guard` command line: `serve`, `check`, `mock-bureau`, `demo`.
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
    },
    /// Run a credit-bureau stand-in with a capacity model (workers, queue, overload errors).
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
        /// Requests that may wait for a worker before new ones get 503.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Longest wait for a worker before 503, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        queue_timeout_ms: u64,
    },
    /// Replay the 2017 surge on this machine: a mock bureau, bureau-guard, one bank surging to
    /// 4x the bureau's capacity and two normal tenants; then the same traffic straight to the
    /// bureau. Needs no files or services.
    Demo {
        /// Seconds of normal traffic before the surge.
        #[arg(long, default_value_t = 4)]
        calm_s: u64,
        /// Seconds the surge lasts.
        #[arg(long, default_value_t = 8)]
        surge_s: u64,
        /// The surging bank's requests per second.
        #[arg(long, default_value_t = 1600.0)]
        surge_rate: f64,
        /// Each normal tenant's requests per second.
        #[arg(long, default_value_t = 40.0)]
        quiet_rate: f64,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config } => serve(&config),
        Command::MockBureau { listen, workers, service_ms, jitter_ms, queue, queue_timeout_ms } => {
            let cfg = MockConfig {
                workers: workers.max(1),
                service_time: Duration::from_millis(service_ms),
                jitter: Duration::from_millis(jitter_ms.min(service_ms)),
                queue,
                queue_timeout: Duration::from_millis(queue_timeout_ms),
            };
            mock(listen, cfg)
        }
        Command::Demo { calm_s, surge_s, surge_rate, quiet_rate } => {
            let scenario = crate::surge::Scenario {
                calm: Duration::from_secs(calm_s),
                surge: Duration::from_secs(surge_s.max(1)),
                surge_rate,
                quiet_rate,
                ..Default::default()
            };
            demo(scenario)
        }
    }
}

fn demo(s: crate::surge::Scenario) -> ExitCode {
    use crate::surge::{Target, replay, summary};
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    println!(
        "bureau-guard demo: a mock bureau of {} workers x {} ms (~{:.0} req/s);\n\
         bank-b and card-c send {:.0} req/s each; after {} s bank-a surges to {:.0} req/s for {} s.\n",
        s.bureau.workers,
        s.bureau.service_time.as_millis(),
        s.bureau_capacity(),
        s.quiet_rate,
        s.calm.as_secs(),
        s.surge_rate,
        s.surge.as_secs()
    );
    runtime().block_on(async {
        let mut replays = Vec::new();
        for target in [Target::Guard, Target::Direct] {
            let label = target.label();
            let result = replay(&s, target, |snap| {
                let phase = if snap.elapsed < s.calm { "calm" } else { "bank-a SURGING" };
                if tty {
                    print!("\x1b[2J\x1b[H");
                }
                println!("== {label}: {:.0} s, {phase}\n{snap}\n", snap.elapsed.as_secs_f64());
            })
            .await;
            match result {
                Ok(r) => {
                    println!("{}", summary(&r));
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
            println!("{}", summary(r));
        }
        println!(
            "Through bureau-guard the bureau is never pushed past its {} workers: bank-b and card-c keep\n\
             their look-ups, bank-a gets the capacity they leave and a fast 503 (with Retry-After) for\n\
             the rest. Straight to the bureau, everyone's look-ups queue behind bank-a's and fail.",
            s.bureau.workers
        );
        ExitCode::SUCCESS
    })
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!(
                "{}: OK ({} tenants, {} routes, upstream {})",
                path.display(),
                c.tenants.len(),
                c.routes.len(),
                c.upstream.url
            );
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
    runtime().block_on(async {
        // Phase 2: bind and serve.
        let running = match crate::app::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        let signal = wait_for_signal().await;
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

fn mock(listen: SocketAddr, cfg: MockConfig) -> ExitCode {
    let _log_guard = init_logging(LogFormat::Text);
    runtime().block_on(async {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, %listen, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(%listen, workers = cfg.workers, service_ms = cfg.service_time.as_millis() as u64, "mock bureau serving");
        let handle = mock_bureau::start(cfg, listener);
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

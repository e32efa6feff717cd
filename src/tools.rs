//! The simulation tools in the binary (`tools` feature, on by default): the `mock-bureau` and
//! `demo` commands, and bureau-guard started in process for bureau-sim's surge replay.
//!
//! The tools themselves (mock bureau, load generator, surge replay) are the crate bureau-sim, so
//! that a deployment build (`cargo build --release --no-default-features`) carries none of them
//! and none of their dependencies. This module is where the proxy meets them: bureau-sim cannot
//! depend on bureau-guard (this crate depends on it), so its replay starts the proxy through
//! [`GuardUnderTest`], implemented here by [`InProcessGuard`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bureau_sim::mock_bureau::{self, MockConfig};
use bureau_sim::surge::{self, GuardUnderTest, Kind, Length, Role, RunningGuard, Scenario, replay, summary};
use clap::Subcommand;

use crate::app::{self, Running};
use crate::cli::{init_logging, runtime, wait_for_signal};
use crate::config::{Config, LogFormat};

/// Starts bureau-guard in this process, as `bureau-guard serve` would from the same config, for
/// the surge replay (`demo`, `benches/surge.rs`, the tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct InProcessGuard;

impl GuardUnderTest for InProcessGuard {
    type Running = Running;

    fn start(&self, config: &str) -> impl Future<Output = anyhow::Result<Running>> + Send {
        let config = Config::from_toml(config, &|_| None);
        async move {
            let config = config.map_err(|e| anyhow::anyhow!("the scenario's config is invalid:\n{e}"))?;
            Ok(app::start(config).await?)
        }
    }
}

impl RunningGuard for Running {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn limit(&self) -> usize {
        self.shared.scheduler.limit()
    }

    async fn shutdown(self) -> BTreeMap<String, u64> {
        let shared = self.shared.clone();
        // The inherent `Running::shutdown`: it drains, waiting for the bureau calls in flight.
        Running::shutdown(self).await;
        shared.states.all().into_iter().map(|(id, state)| (id, state.daily.load().1)).collect()
    }
}

/// The tools' commands, flattened into [`crate::cli::Command`].
#[derive(Subcommand, Debug)]
pub enum ToolCommand {
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
    /// bureau. Needs no files or services. `--scenario` picks a harder day (see bureau-sim's `surge`).
    Demo {
        /// The scenario: patient (the kind case), impatient, too_high, slower, fewer_workers,
        /// many_tenants or all_at_once.
        #[arg(long, default_value = "patient", value_parser = clap::builder::PossibleValuesParser::new(surge::Kind::NAMES))]
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

impl ToolCommand {
    /// Runs the command to its end.
    pub fn run(self) -> ExitCode {
        match self {
            ToolCommand::MockBureau {
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
            ToolCommand::Demo { scenario, calm_s, surge_s, surge_rate, quiet_rate } => {
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
}

fn demo(s: Scenario) -> ExitCode {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    println!("bureau-guard demo: {}", s.describe());
    let surging: Vec<&str> = s.with_role(Role::Surging).map(|t| t.id.as_str()).collect();
    let surging = match surging.as_slice() {
        [one] => format!("{one} SURGING"),
        many => format!("{} tenants SURGING", many.len()),
    };
    runtime().block_on(async {
        let mut replays = Vec::new();
        for target in s.targets() {
            let label = target.label();
            let result = replay(&s, target, &InProcessGuard, |snap| {
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

#[cfg(test)]
mod tests {
    use bureau_sim::surge::{Budget, Target, guard_config};
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn mock_bureau_args(args: &[&str]) -> Result<ToolCommand, clap::Error> {
        match Cli::try_parse_from(["bureau-guard", "mock-bureau"].iter().chain(args))?.command {
            Command::Tools(tool) => Ok(tool),
            other => panic!("mock-bureau parsed as {other:?}"),
        }
    }

    #[test]
    fn mock_bureau_takes_an_unbounded_queue_and_a_refusal() {
        let Ok(ToolCommand::MockBureau { queue, refuse_status, refuse_share, retry_after, .. }) = mock_bureau_args(&[
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
        let Ok(ToolCommand::MockBureau { queue: 10, refuse_status: None, .. }) = mock_bureau_args(&["--queue", "10"])
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

    #[test]
    fn every_scenario_has_a_valid_config_and_a_bureau_guard_run() {
        for kind in Kind::ALL {
            for length in [Length::Full, Length::Quick] {
                let s = Scenario::new(kind, length);
                assert_eq!(Kind::parse(kind.name()), Some(kind));
                assert_eq!(s.targets()[0], Target::Guard(s.budget), "{kind}");
                for t in s.targets() {
                    if let Target::Guard(b) = t {
                        let text = guard_config(&s, b, "http://127.0.0.1:1");
                        let c = Config::from_toml(&text, &|_| None).expect("the scenario's config is valid");
                        let expect = match b {
                            Budget::Fixed(n) => n,
                            Budget::Adaptive { max, .. } => max,
                        };
                        assert_eq!(c.upstream.max_concurrency, expect, "{kind}");
                        // One tenant per distinct tenant id (a tenant may send several streams,
                        // one per priority level), each with the levels its streams name.
                        let tenants: std::collections::BTreeSet<&str> =
                            s.tenants.iter().map(|t| t.tenant.as_str()).collect();
                        assert_eq!(c.tenants.len(), tenants.len(), "{kind}");
                        let levelled = s.tenants.iter().any(|t| t.level.is_some());
                        assert_eq!(c.priority.levels.len(), if levelled { 2 } else { 0 }, "{kind}");
                    }
                }
                assert!(s.settle < s.surge, "{kind}: the window opens inside the surge");
                assert!(s.changes.iter().all(|(at, _)| *at < s.settle), "{kind}");
            }
        }
    }
}

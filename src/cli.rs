//! The `bureau-guard` command line: `serve`, `check`, `reload`, `usage`; and `mock-bureau`, `demo` with
//! the `tools` feature (see [`crate::tools`]).
//!
//! `serve` runs in three phases, as linkerd's main does: parse and validate the config (fail
//! before binding anything), bind and run until SIGTERM/SIGINT, then drain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
#[cfg(feature = "tools")]
use crate::tools::ToolCommand;
#[cfg(not(feature = "tools"))]
use without_tools::ToolCommand;

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
    /// Print a usage statement from a running proxy (`GET /admin/usage`): bureau calls charged,
    /// look-ups answered without the bureau, refusals, per tenant, route and local day.
    Usage {
        /// The proxy's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9090", env = "BUREAU_GUARD_ADMIN")]
        admin: String,
        /// The admin token (`admin.token_sha256` / `token_env` of the running config).
        #[arg(long, env = "BUREAU_GUARD_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        query: UsageArgs,
    },
    // `mock-bureau` and `demo`: the simulation tools, with the `tools` feature (see
    // `crate::tools`); a deployment build answers them with an error naming the feature.
    #[command(flatten)]
    Tools(ToolCommand),
}

/// What `bureau-guard usage` asks for: a statement (`--from`, `--to`), or the audit records of
/// one request (`--request-id`) or of one tenant's client request id (`--client-request-id`
/// with `--tenant`).
#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// First day, YYYY-MM-DD (the quota's local day, `quota.utc_offset`). With --request-id or
    /// --client-request-id: audit files last written before it are not read.
    #[arg(long, required_unless_present_any = ["request_id", "client_request_id"])]
    from: Option<String>,
    /// Last day, YYYY-MM-DD, included.
    #[arg(long, required_unless_present_any = ["request_id", "client_request_id"])]
    to: Option<String>,
    /// Only this tenant; with --client-request-id, the tenant whose id it is (required there).
    #[arg(long, conflicts_with = "request_id")]
    tenant: Option<String>,
    /// CSV with a header row (one row per day, tenant and route) instead of JSON.
    #[arg(long, conflicts_with_all = ["request_id", "client_request_id"])]
    csv: bool,
    /// Reconciliation: the audit records of this request (bureau-guard's `x-request-id`, the
    /// id the bureau received) and of the answers that rode on its bureau call, across rotated
    /// audit files.
    #[arg(long, conflicts_with = "to")]
    request_id: Option<String>,
    /// Reconciliation by the id the bank sent (`x-client-request-id`), within --tenant only: a
    /// bank sets it itself, so it is never searched across tenants.
    #[arg(long, conflicts_with_all = ["to", "request_id"], requires = "tenant")]
    client_request_id: Option<String>,
    /// With --request-id or --client-request-id: at most this many records (default 100, at
    /// most 1000); the answer says `truncated` when more matched.
    #[arg(long, conflicts_with = "to")]
    limit: Option<String>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, diff } => check(&config, diff.as_deref()),
        Command::Reload { admin, token } => reload(&admin, token.as_deref()),
        Command::Usage { admin, token, query } => usage(&admin, token.as_deref(), &query),
        Command::Serve { config } => serve(&config),
        Command::Tools(tool) => tool.run(),
    }
}

fn check(path: &Path, diff_against: Option<&Path>) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            let levels: Vec<&str> = c.priority.levels.iter().map(|l| l.name.as_str()).collect();
            let levels =
                if levels.is_empty() { String::new() } else { format!(", priority levels {}", levels.join(" > ")) };
            println!(
                "{}: OK ({} tenants, {} routes{levels}, upstream {})",
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

pub(crate) fn runtime() -> tokio::runtime::Runtime {
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
    let body = match admin_call(http::Method::POST, admin, "/admin/reload", token) {
        Ok((_, body)) => body,
        Err(code) => return code,
    };
    let Ok(out) = serde_json::from_slice::<serde_json::Value>(&body) else {
        eprintln!("unexpected answer: {}", String::from_utf8_lossy(&body));
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
}

/// `usage`: the statement from a running proxy's `GET /admin/usage`, printed as it came (JSON
/// or CSV); a 400 (bad date, unknown tenant) printed as the error it is, exit 1.
fn usage(admin: &str, token: Option<&str>, q: &UsageArgs) -> ExitCode {
    let enc = |v: &str| percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string();
    let search = match (&q.request_id, &q.client_request_id, &q.tenant) {
        (Some(id), _, _) => Some(format!("id={}", enc(id))),
        (None, Some(id), Some(tenant)) => Some(format!("client_request_id={}&tenant={}", enc(id), enc(tenant))),
        _ => None,
    };
    let path = match (search, &q.from, &q.to) {
        (Some(search), since, _) => {
            // Bad values (a limit of 0, a bad date) are the endpoint's to refuse, with its message.
            let mut p = format!("/admin/usage/request?{search}");
            if let Some(s) = since {
                p.push_str(&format!("&since={}", enc(s)));
            }
            if let Some(l) = &q.limit {
                p.push_str(&format!("&limit={}", enc(l)));
            }
            p
        }
        (None, Some(from), Some(to)) => {
            let mut p = format!("/admin/usage?from={}&to={}", enc(from), enc(to));
            if let Some(t) = &q.tenant {
                p.push_str(&format!("&tenant={}", enc(t)));
            }
            if q.csv {
                p.push_str("&format=csv");
            }
            p
        }
        _ => unreachable!("clap requires --from and --to without --request-id or --client-request-id"),
    };
    let (status, body) = match admin_call(http::Method::GET, admin, &path, token) {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    if !status.is_success() {
        eprintln!("usage: {}", error_message(&body));
        return ExitCode::FAILURE;
    }
    print!("{}", String::from_utf8_lossy(&body));
    if q.request_id.is_some() || q.client_request_id.is_some() {
        let found = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        if found["records"].as_array().is_some_and(Vec::is_empty) {
            eprintln!("\nno audit record of that request in the files read (see scanned, skipped)");
            return ExitCode::FAILURE;
        }
        if found["truncated"] == true {
            eprintln!("\nmore records matched than --limit; the oldest are shown (truncated)");
        }
    }
    ExitCode::SUCCESS
}

/// The `message` of an admin error body, or the body itself.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// One request to the admin listener at `admin` (`path` with its query): its status and body,
/// or the exit code after saying what went wrong (unreachable 2; token or name refused 1).
fn admin_call(
    method: http::Method,
    admin: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(http::StatusCode, bytes::Bytes), ExitCode> {
    use http_body_util::{BodyExt, Full};
    let url = format!("{}{path}", admin.trim_end_matches('/'));
    runtime().block_on(async {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let mut req = http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(bytes::Bytes::new())).map_err(|e| {
            eprintln!("invalid admin URL {admin}: {e}");
            ExitCode::from(2)
        })?;
        let resp = match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                eprintln!("cannot reach {url}: {e}");
                return Err(ExitCode::from(2));
            }
            Err(_) => {
                eprintln!("no answer from {url} within 30 s");
                return Err(ExitCode::from(2));
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if status == http::StatusCode::UNAUTHORIZED {
            eprintln!("the admin endpoint refused the token: pass --token or set BUREAU_GUARD_ADMIN_TOKEN");
            return Err(ExitCode::FAILURE);
        }
        if status == http::StatusCode::MISDIRECTED_REQUEST || status == http::StatusCode::FORBIDDEN {
            // The admin listener does not know the name in --admin (admin.allowed_hosts).
            eprintln!("the admin endpoint refused the request ({status}): {}", error_message(&body));
            return Err(ExitCode::FAILURE);
        }
        Ok((status, body))
    })
}

/// Resolves on SIGTERM or SIGINT; returns the signal's name.
pub(crate) async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Logs go through a background writer so a slow stdout never blocks a request. The writer
/// thread buffers what it finds queued and writes it at once, flushing whenever the queue is
/// empty (tracing-appender's worker does): one `write` per burst of lines rather than one per
/// line, which with the access log on was a system call per request (benches/README.md).
pub(crate) fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) =
        tracing_appender::non_blocking(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()));
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

/// A deployment build (`--no-default-features`) carries no simulation tools. Their commands are
/// still recognised, hidden, so that asking for one says what is missing and how to get it,
/// rather than that the command does not exist.
#[cfg(not(feature = "tools"))]
mod without_tools {
    use std::process::ExitCode;

    #[derive(clap::Subcommand, Debug)]
    pub enum ToolCommand {
        #[command(hide = true, disable_help_flag = true)]
        MockBureau {
            #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
            args: Vec<String>,
        },
        #[command(hide = true, disable_help_flag = true)]
        Demo {
            #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
            args: Vec<String>,
        },
    }

    impl ToolCommand {
        /// Says that the command is not in this build; exits 2, as for a bad command line.
        pub fn run(self) -> ExitCode {
            let name = match self {
                ToolCommand::MockBureau { .. } => "mock-bureau",
                ToolCommand::Demo { .. } => "demo",
            };
            eprintln!(
                "error: `bureau-guard {name}` is not in this binary: it was built without the `tools` feature \
                 (a deployment build, --no-default-features). The simulation tools come with the default \
                 features: cargo run --release -- {name}"
            );
            ExitCode::from(2)
        }
    }
}

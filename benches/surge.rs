//! The 2017 surge, measured in the conditions of a real launch day: the acceptance benchmark of
//! fair sharing (issues 13 and 14).
//!
//! Every scenario of `bureau_sim::surge` (patient, impatient, too_high, slower, fewer_workers,
//! many_tenants, all_at_once, priorities): open-loop load, latency from the scheduled send time, the same
//! traffic through bureau-guard (and a reference budget where the scenario has one) and straight
//! to the bureau. Prints each replay's per-tenant table and each scenario's verdict table.
//!
//!     cargo bench --bench surge                          # every scenario, full length (~8 min)
//!     cargo bench --bench surge -- --quick               # every scenario, short (CI, ~75 s)
//!     cargo bench --bench surge -- --scenario slower     # one (with --quick: short)
//!     RUST_LOG=bureau_guard::adaptive=debug cargo bench --bench surge -- --scenario slower
//!                                                        # with each adaptive limit decision
//!
//! A criterion that fails is reported FAIL; the exit status is non-zero only when the harness
//! itself breaks (a replay cannot run).

use std::process::ExitCode;
use std::time::Instant;

use bureau_guard::tools::InProcessGuard;
use bureau_sim::surge::{Kind, Length, Mark, Replay, Scenario, checks, replay, summary, table};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let length = if args.iter().any(|a| a == "--quick") { Length::Quick } else { Length::Full };
    let kinds = match args.iter().position(|a| a == "--scenario").map(|i| args.get(i + 1)) {
        None => Kind::ALL.to_vec(),
        Some(Some(name)) => match Kind::parse(name) {
            Some(kind) => vec![kind],
            None => {
                eprintln!("unknown scenario {name:?}; one of {}", Kind::NAMES.join(", "));
                return ExitCode::FAILURE;
            }
        },
        Some(None) => {
            eprintln!("--scenario needs a name: one of {}", Kind::NAMES.join(", "));
            return ExitCode::FAILURE;
        }
    };
    // `RUST_LOG=bureau_guard::adaptive=debug` shows each adaptive limit decision on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let started = Instant::now();
    let mut patient: Option<Replay> = None;
    let mut totals = Vec::new();
    for kind in kinds {
        // impatient's and priorities' latency criteria compare with patient's, from the same run.
        if matches!(kind, Kind::Impatient | Kind::Priorities) && patient.is_none() {
            let s = Scenario::new(Kind::Patient, length);
            println!("== patient (reference for impatient)\n");
            match rt.block_on(replay(&s, s.targets()[0], &InProcessGuard, |_| {})) {
                Ok(r) => {
                    println!("{}", summary(&s, &r));
                    patient = Some(r);
                }
                Err(e) => return broken(&s, e),
            }
        }
        let s = Scenario::new(kind, length);
        println!("== {kind}: {}\n{}", kind.problem(), s.describe());
        let mut runs = Vec::new();
        for target in s.targets() {
            match rt.block_on(replay(&s, target, &InProcessGuard, |_| {})) {
                Ok(r) => {
                    println!("{}", summary(&s, &r));
                    runs.push(r);
                }
                Err(e) => return broken(&s, e),
            }
        }
        let verdict = checks(&s, &runs, patient.as_ref());
        println!("{}", table(&verdict));
        let count = |m: Mark| verdict.iter().filter(|c| c.mark == m).count();
        totals.push((kind, count(Mark::Pass), count(Mark::Fail)));
        if kind == Kind::Patient {
            patient = runs.into_iter().next();
        }
    }
    println!("== all scenarios ({:?} run, {:.0} s)\n", length, started.elapsed().as_secs_f64());
    println!("| scenario | criteria passed | failed |\n|---|---:|---:|");
    for (kind, pass, fail) in totals {
        println!("| {kind} | {pass} | {fail} |");
    }
    ExitCode::SUCCESS
}

fn broken(s: &Scenario, e: anyhow::Error) -> ExitCode {
    eprintln!("{}: the replay could not run: {e:#}", s.kind);
    ExitCode::FAILURE
}

//! The 2017 surge, measured: the acceptance benchmark of fair sharing.
//!
//! Bureau of 8 workers x 20 ms (~400 req/s); bank-b and card-c at 40 req/s throughout; bank-a
//! jumps from 0 to 1600 req/s. Open-loop load, latency from the scheduled send time. The same
//! traffic runs through bureau-guard, then straight to the bureau.
//!
//!     cargo bench --bench surge                 # 5 s calm + 20 s surge, each way
//!     cargo bench --bench surge -- --quick      # 2 s + 4 s (CI smoke run)

use std::time::Duration;

use bureau_guard::surge::{Replay, Scenario, Target, replay, summary};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = Scenario {
        calm: Duration::from_secs(if quick { 2 } else { 5 }),
        surge: Duration::from_secs(if quick { 4 } else { 20 }),
        ..Scenario::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (guard, direct) = rt.block_on(async {
        let guard = replay(&s, Target::Guard, |_| {}).await.expect("guarded replay");
        let direct = replay(&s, Target::Direct, |_| {}).await.expect("direct replay");
        (guard, direct)
    });
    println!("{}", summary(&guard));
    println!("{}", summary(&direct));
    println!("{}", verdict(&s, &guard, &direct));
}

fn verdict(s: &Scenario, g: &Replay, d: &Replay) -> String {
    let mut out = String::from("| criterion | target | measured |\n|---|---|---|\n");
    for quiet in ["bank-b", "card-c"] {
        let t = g.total.stream(quiet).expect("stream");
        let ok = 100.0 * t.class_count(2) as f64 / t.sent.max(1) as f64;
        let calm = g.calm.stream(quiet).expect("stream").success_summary().p99;
        let surge = g.surge.stream(quiet).expect("stream").success_summary().p99;
        out.push_str(&format!(
            "| {quiet} success through bureau-guard | >= 99.99% | {ok:.2}% ({} of {}) |\n",
            t.class_count(2),
            t.sent
        ));
        out.push_str(&format!(
            "| {quiet} p99 surge / no-surge | <= 1.2x | {:.2}x ({:.1} ms / {:.1} ms) |\n",
            surge.as_secs_f64() / calm.as_secs_f64().max(1e-9),
            surge.as_secs_f64() * 1e3,
            calm.as_secs_f64() * 1e3
        ));
    }
    out.push_str(&format!(
        "| bureau max in-flight | <= budget ({}) | {} |\n",
        g.budget.unwrap_or(0),
        g.bureau.max_in_flight
    ));
    let a = g.surge.stream("bank-a").expect("stream");
    let leftover = s.bureau_capacity() - 2.0 * s.quiet_rate;
    let goodput = a.class_count(2) as f64 / s.surge.as_secs_f64();
    out.push_str(&format!(
        "| bank-a goodput / capacity left by b and c | >= 95% | {:.1}% ({goodput:.0} of {leftover:.0} req/s) |\n",
        100.0 * goodput / leftover
    ));
    out.push_str(&format!(
        "| bank-a 429/503 p99 | < 50 ms | {:.1} ms |\n",
        a.rejected_summary().p99.as_secs_f64() * 1e3
    ));
    for quiet in ["bank-b", "card-c"] {
        let t = d.total.stream(quiet).expect("stream");
        out.push_str(&format!(
            "| {quiet} success straight to the bureau | (shows the outage) | {:.2}% |\n",
            100.0 * t.class_count(2) as f64 / t.sent.max(1) as f64
        ));
    }
    out
}

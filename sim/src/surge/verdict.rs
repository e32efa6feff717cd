//! The verdict: each scenario's criteria, measured on its replays, as `pass`, `FAIL` or `info`.
//!
//! A criterion that fails is a finding, not an error: the benchmark prints it and carries on.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::{Change, Kind, Replay, Role, Scenario, Target};

/// The strict-priority bound on a quiet look-up's p99 in many_tenants: forty quiet tenants at
/// 5 req/s each served first on a bureau of 8 × U(18, 22) ms kept full wait 12.3 ms at p99, plus
/// up to 22 ms of service ≈ 34 ms. The model (and its Monte Carlo) is in bureau-guard's
/// `src/bureau/scheduler.rs` module doc, "The bound".
pub const MANY_TENANTS_QUIET_P99_BOUND: Duration = Duration::from_millis(34);

/// How a criterion came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Pass,
    Fail,
    /// A figure shown for comparison, not judged (straight to the bureau, reference runs).
    Info,
}

impl Mark {
    fn of(pass: bool) -> Mark {
        if pass { Mark::Pass } else { Mark::Fail }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Pass => "pass",
            Mark::Fail => "FAIL",
            Mark::Info => "info",
        }
    }
}

/// One row of the verdict table.
#[derive(Debug, Clone)]
pub struct Check {
    pub criterion: String,
    pub target: String,
    pub measured: String,
    pub mark: Mark,
}

fn check(criterion: impl Into<String>, target: impl Into<String>, measured: impl Into<String>, mark: Mark) -> Check {
    Check { criterion: criterion.into(), target: target.into(), measured: measured.into(), mark }
}

/// The verdict as a markdown table.
pub fn table(checks: &[Check]) -> String {
    let mut out = String::from("| criterion | target | measured | pass |\n|---|---|---|---|\n");
    for c in checks {
        let _ = writeln!(out, "| {} | {} | {} | {} |", c.criterion, c.target, c.measured, c.mark.as_str());
    }
    out
}

/// Jain's fairness index of `xs`: 1 when all are equal, 1/n when one has everything.
pub fn jain_index(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 { 1.0 } else { sum * sum / (xs.len() as f64 * squares) }
}

/// Some tenants' figures in one replay, pooled.
pub(super) struct Group {
    pub sent: u64,
    pub ok: u64,
    /// 2xx answers to requests sent in the surge window.
    pub surge_ok: u64,
    pub timeouts: u64,
    calm: Option<Histogram<u64>>,
    surge: Option<Histogram<u64>>,
    after_change: Option<Histogram<u64>>,
    rejected: Option<Histogram<u64>>,
}

fn pool(into: &mut Option<Histogram<u64>>, h: &Histogram<u64>) {
    match into {
        None => *into = Some(h.clone()),
        Some(sum) => sum.add(h).expect("every stream's histograms have the same bounds"),
    }
}

fn p99_ms(h: &Option<Histogram<u64>>) -> f64 {
    h.as_ref().filter(|h| !h.is_empty()).map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0)
}

impl Group {
    pub fn of<'a>(r: &Replay, ids: impl IntoIterator<Item = &'a str>) -> Group {
        let mut g = Group {
            sent: 0,
            ok: 0,
            surge_ok: 0,
            timeouts: 0,
            calm: None,
            surge: None,
            after_change: None,
            rejected: None,
        };
        for id in ids {
            if let Some(t) = r.total.stream(id) {
                g.sent += t.sent;
                g.ok += t.class_count(2);
                g.timeouts += t.timeouts;
                pool(&mut g.rejected, &t.rejected_latency_us);
            }
            if let Some(t) = r.calm.stream(id) {
                pool(&mut g.calm, &t.success_latency_us);
            }
            if let Some(t) = r.surge.stream(id) {
                g.surge_ok += t.class_count(2);
                pool(&mut g.surge, &t.success_latency_us);
            }
            if let Some(t) = r.after_change.as_ref().and_then(|a| a.stream(id)) {
                pool(&mut g.after_change, &t.success_latency_us);
            }
        }
        g
    }

    pub fn ok_pct(&self) -> f64 {
        if self.sent == 0 { 100.0 } else { 100.0 * self.ok as f64 / self.sent as f64 }
    }

    /// At least `permille`/1000 of the look-ups sent were answered 2xx in time.
    fn kept(&self, permille: u64) -> bool {
        self.ok * 1000 >= self.sent * permille
    }

    pub fn calm_p99_ms(&self) -> f64 {
        p99_ms(&self.calm)
    }

    pub fn surge_p99_ms(&self) -> f64 {
        p99_ms(&self.surge)
    }

    pub fn after_change_p99_ms(&self) -> f64 {
        p99_ms(&self.after_change)
    }

    pub fn reject_p99_ms(&self) -> f64 {
        p99_ms(&self.rejected)
    }

    /// Surge p99 over calm p99.
    fn ratio(&self) -> f64 {
        self.surge_p99_ms() / self.calm_p99_ms().max(1e-9)
    }

    fn kept_text(&self) -> String {
        format!("{:.2}% ({} of {}; {} gave up)", self.ok_pct(), self.ok, self.sent, self.timeouts)
    }
}

fn ids(s: &Scenario, role: Role) -> Vec<&str> {
    s.with_role(role).map(|t| t.id.as_str()).collect()
}

/// The quiet tenant with the highest surge p99, and its figures.
pub(super) fn worst_quiet(s: &Scenario, r: &Replay) -> Option<(String, Group)> {
    s.with_role(Role::Quiet)
        .map(|t| (t.id.clone(), Group::of(r, [t.id.as_str()])))
        .max_by(|a, b| a.1.surge_p99_ms().total_cmp(&b.1.surge_p99_ms()))
}

/// Surging tenants' goodput (2xx per second of surge), each.
fn goodputs(s: &Scenario, r: &Replay) -> Vec<f64> {
    s.with_role(Role::Surging).map(|t| Group::of(r, [t.id.as_str()]).surge_ok as f64 / s.surge.as_secs_f64()).collect()
}

/// The first time (after `from`, since the surge's start) the limit was at most `at_most`.
fn limit_reached(r: &Replay, from: Duration, at_most: usize) -> Option<Duration> {
    r.limits.iter().find(|(t, l)| *t >= from && *l <= at_most).map(|(t, _)| *t - from)
}

fn run_name(r: &Replay) -> String {
    match r.target {
        Target::Guard(b) => b.to_string(),
        Target::Direct => "direct".to_string(),
    }
}

/// The criteria of scenario `s` on its replays (`runs`, as [`Scenario::targets`] lists them);
/// `patient` is the patient scenario's main replay from the same run, which impatient compares
/// against.
pub fn checks(s: &Scenario, runs: &[Replay], patient: Option<&Replay>) -> Vec<Check> {
    let main = runs.iter().find(|r| r.target == Target::Guard(s.budget));
    let reference = s.compare.first().and_then(|b| runs.iter().find(|r| r.target == Target::Guard(*b)));
    let direct = runs.iter().find(|r| r.target == Target::Direct);
    let Some(g) = main else {
        return vec![check("bureau-guard replay", "ran", "missing", Mark::Fail)];
    };
    let quiet = ids(s, Role::Quiet);
    let q = Group::of(g, quiet.iter().copied());
    let workers = s.bureau.workers;
    let leftover = s.bureau_capacity() - s.quiet_load();
    let kept_999 = |label: &str, q: &Group| {
        check(format!("quiet look-ups kept{label}"), ">= 99.9%", q.kept_text(), Mark::of(q.kept(999)))
    };
    let mut out = Vec::new();
    match s.kind {
        Kind::Patient => {
            for id in &quiet {
                let t = Group::of(g, [*id]);
                out.push(check(
                    format!("{id} success through bureau-guard"),
                    ">= 99.99%",
                    format!("{:.2}% ({} of {})", t.ok_pct(), t.ok, t.sent),
                    Mark::of(t.ok * 10_000 >= t.sent * 9_999),
                ));
                out.push(check(
                    format!("{id} p99 surge / no-surge"),
                    "<= 1.2x",
                    format!("{:.2}x ({:.1} ms / {:.1} ms)", t.ratio(), t.surge_p99_ms(), t.calm_p99_ms()),
                    Mark::of(t.ratio() <= 1.2),
                ));
            }
            out.push(max_in_flight(g));
            let a = Group::of(g, ids(s, Role::Surging));
            let goodput = a.surge_ok as f64 / s.surge.as_secs_f64();
            out.push(check(
                "surging goodput / capacity the quiet leave",
                ">= 95%",
                format!("{:.1}% ({goodput:.0} of {leftover:.0} req/s)", 100.0 * goodput / leftover),
                Mark::of(goodput >= 0.95 * leftover),
            ));
            out.push(check(
                "surging 429/503 p99",
                "< 50 ms",
                format!("{:.1} ms", a.reject_p99_ms()),
                Mark::of(a.reject_p99_ms() < 50.0),
            ));
        }
        Kind::Impatient | Kind::Priorities => {
            out.push(max_in_flight(g));
            out.push(kept_999("", &q));
            match patient {
                Some(p) => {
                    let pq = Group::of(p, quiet.iter().copied());
                    out.push(check(
                        "quiet p99 surge / calm, against patient's",
                        format!("<= {:.2}x (patient's + 0.05)", pq.ratio() + 0.05),
                        format!(
                            "{:.2}x ({:.1} / {:.1} ms; patient {:.2}x)",
                            q.ratio(),
                            q.surge_p99_ms(),
                            q.calm_p99_ms(),
                            pq.ratio()
                        ),
                        Mark::of(q.ratio() <= pq.ratio() + 0.05),
                    ));
                }
                None => {
                    out.push(check("quiet p99 surge / calm, against patient's", "patient run", "missing", Mark::Fail))
                }
            }
            if s.kind == Kind::Impatient {
                out.push(charges_match_service(s, g));
            } else {
                let goodput = goodputs(s, g).iter().sum::<f64>();
                out.push(check(
                    "batch goodput / capacity the interactive look-ups leave",
                    format!(">= 90% of {leftover:.0} req/s"),
                    format!("{:.1}% ({goodput:.0} req/s)", 100.0 * goodput / leftover),
                    Mark::of(goodput >= 0.9 * leftover),
                ));
            }
        }
        Kind::TooHigh => {
            let cap = workers * 5 / 4;
            let both = |f: &dyn Fn(&Replay) -> String| match reference {
                Some(r) => format!("{} ({}: {})", f(g), run_name(r), f(r)),
                None => f(g),
            };
            out.push(check(
                format!("bureau in flight p95 from surge +{:.0} s", s.settle.as_secs_f64()),
                format!("<= 1.25 x {workers} = {cap}"),
                both(&|r| format!("{} (max {})", r.settled.p95_in_flight, r.settled.max_in_flight)),
                Mark::of(g.settled.p95_in_flight <= cap as i64),
            ));
            out.push(check(
                "quiet look-ups kept",
                ">= 99.9%",
                both(&|r| Group::of(r, quiet.iter().copied()).kept_text()),
                Mark::of(q.kept(999)),
            ));
            out.push(check(
                "quiet p99 surge / calm",
                "<= 1.6x",
                both(&|r| {
                    let q = Group::of(r, quiet.iter().copied());
                    format!("{:.2}x ({:.1} / {:.1} ms)", q.ratio(), q.surge_p99_ms(), q.calm_p99_ms())
                }),
                Mark::of(q.ratio() <= 1.6),
            ));
            let goodput = |r: &Replay| goodputs(s, r).iter().sum::<f64>();
            out.push(check(
                "surging goodput / capacity the quiet leave",
                format!(">= 90% of {leftover:.0} req/s"),
                both(&|r| format!("{:.1}% ({:.0} req/s)", 100.0 * goodput(r) / leftover, goodput(r))),
                Mark::of(goodput(g) >= 0.9 * leftover),
            ));
        }
        Kind::Slower => {
            out.push(kept_999("", &q));
            match reference {
                Some(r) => {
                    let rq = Group::of(r, quiet.iter().copied());
                    out.push(check(
                        "quiet p99 after the slow-down, against the fixed budget",
                        format!(
                            "<= 1.1 x {:.1} ms = {:.1} ms",
                            rq.after_change_p99_ms(),
                            1.1 * rq.after_change_p99_ms()
                        ),
                        format!(
                            "{:.1} ms ({}: {:.1} ms)",
                            q.after_change_p99_ms(),
                            run_name(r),
                            rq.after_change_p99_ms()
                        ),
                        Mark::of(q.after_change_p99_ms() <= 1.1 * rq.after_change_p99_ms()),
                    ));
                    out.push(check(
                        format!("{}: quiet look-ups kept", run_name(r)),
                        "(reference)",
                        rq.kept_text(),
                        Mark::Info,
                    ));
                }
                None => out.push(check("fixed-budget reference", "ran", "missing", Mark::Fail)),
            }
            out.push(settled_info(s, g));
        }
        Kind::FewerWorkers | Kind::PrioritiesFewer => {
            let (at, fewer) = s
                .changes
                .iter()
                .find_map(|(at, c)| match c {
                    Change::Workers(n) => Some((*at, *n)),
                    Change::ServiceTime(_) => None,
                })
                .unwrap_or((Duration::ZERO, workers));
            let cap = (fewer * 5).div_ceil(4);
            let reached = match limit_reached(g, at, cap) {
                Some(t) => format!("limit <= {cap} at change +{:.1} s", t.as_secs_f64()),
                None => format!("limit never <= {cap} (lowest {})", g.limits.iter().map(|l| l.1).min().unwrap_or(0)),
            };
            out.push(check(
                format!("bureau in flight p95 from change +{:.0} s", (s.settle - at).as_secs_f64()),
                format!("<= 1.25 x {fewer}, rounded up = {cap}"),
                format!("{} (max {}); {reached}", g.settled.p95_in_flight, g.settled.max_in_flight),
                Mark::of(g.settled.p95_in_flight <= cap as i64),
            ));
            out.push(kept_999("", &q));
            if s.kind == Kind::PrioritiesFewer {
                let goodput = goodputs(s, g).iter().sum::<f64>();
                out.push(check(
                    "batch goodput through the cut",
                    "(absorbs the cut)",
                    format!("{goodput:.0} req/s"),
                    Mark::Info,
                ));
            }
        }
        Kind::ManyTenants => {
            out.extend(many_tenants(s, g, ""));
            if let Some(r) = reference {
                out.extend(many_tenants(s, r, &format!(" [{}]", run_name(r))));
            }
        }
        Kind::AllAtOnce => {
            out.push(kept_999("", &q));
            out.push(settled_info(s, g));
        }
    }
    if let Some(d) = direct {
        let dq = Group::of(d, quiet.iter().copied());
        out.push(check("quiet look-ups kept straight to the bureau", "(shows the outage)", dq.kept_text(), Mark::Info));
    }
    out
}

fn max_in_flight(g: &Replay) -> Check {
    let budget = g.budget.unwrap_or(0);
    check(
        "bureau max in flight",
        format!("<= budget ({budget})"),
        g.bureau.max_in_flight.to_string(),
        Mark::of(g.bureau.max_in_flight <= budget as i64),
    )
}

fn settled_info(s: &Scenario, g: &Replay) -> Check {
    let end = g.limits.last().map_or(0, |l| l.1);
    check(
        format!("bureau in flight p95 from surge +{:.0} s; limit at the end", s.settle.as_secs_f64()),
        "",
        format!("{} (max {}); limit {end}", g.settled.p95_in_flight, g.settled.max_in_flight),
        Mark::Info,
    )
}

/// Every quota unit charged is a call the bureau served for that tenant (abandoned included,
/// refused not).
fn charges_match_service(s: &Scenario, g: &Replay) -> Check {
    let mut mismatched = Vec::new();
    let (mut charged_sum, mut served_sum) = (0, 0);
    for t in &s.tenants {
        let charged = g.charged.get(&t.id).copied().unwrap_or(0);
        let served = g.bureau.served_by_tenant.get(&t.id).copied().unwrap_or(0);
        charged_sum += charged;
        served_sum += served;
        if charged != served {
            mismatched.push(format!("{} charged {charged}, served {served}", t.id));
        }
    }
    let detail = format!(
        "charged {charged_sum}, served {served_sum} ({} finished for nobody, {} refused)",
        g.bureau.finished_for_nobody,
        g.bureau.refused_by_tenant.values().sum::<u64>()
    );
    let measured = if mismatched.is_empty() {
        format!("equal for all {} tenants: {detail}", s.tenants.len())
    } else {
        format!("{}; {detail}", mismatched.join("; "))
    };
    check(
        "daily quota units charged = calls the bureau served, per tenant",
        "equal",
        measured,
        Mark::of(mismatched.is_empty()),
    )
}

fn many_tenants(s: &Scenario, g: &Replay, label: &str) -> Vec<Check> {
    let quiet = ids(s, Role::Quiet);
    let q = Group::of(g, quiet.iter().copied());
    let mut out = vec![check(
        format!("quiet look-ups kept (all {}){label}", quiet.len()),
        "100%",
        q.kept_text(),
        Mark::of(q.ok == q.sent),
    )];
    if let Some((id, w)) = worst_quiet(s, g) {
        let calm = q.calm_p99_ms();
        out.push(check(
            format!("worst quiet p99 / quiet calm p99{label}"),
            "<= 1.6x",
            format!("{:.2}x ({id}: {:.1} ms / {calm:.1} ms)", w.surge_p99_ms() / calm.max(1e-9), w.surge_p99_ms()),
            Mark::of(w.surge_p99_ms() <= 1.6 * calm),
        ));
        let bound = MANY_TENANTS_QUIET_P99_BOUND.as_secs_f64() * 1000.0;
        out.push(check(
            format!("worst quiet p99 / strict-priority bound{label}"),
            format!("<= 1.1 x {bound:.0} ms = {:.1} ms", 1.1 * bound),
            format!("{:.1} ms ({id})", w.surge_p99_ms()),
            Mark::of(w.surge_p99_ms() <= 1.1 * bound),
        ));
    }
    let goodputs = goodputs(s, g);
    let jain = jain_index(&goodputs);
    let (lo, hi) = goodputs.iter().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    out.push(check(
        format!("Jain's index over the surging tenants' goodputs{label}"),
        ">= 0.95",
        format!("{jain:.3} ({lo:.0}..{hi:.0} req/s each, {:.0} in all)", goodputs.iter().sum::<f64>()),
        Mark::of(jain >= 0.95),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_is_one_when_equal_and_one_over_n_when_one_takes_all() {
        assert!((jain_index(&[5.0, 5.0, 5.0, 5.0]) - 1.0).abs() < 1e-12);
        assert!((jain_index(&[8.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    }
}

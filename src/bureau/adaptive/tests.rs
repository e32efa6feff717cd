use super::*;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use crate::bureau::scheduler::{Ask, Permit, Scheduler};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
/// Limit, bureau and throughput are sampled this often.
const TICK: Duration = Duration::from_millis(10);

/// The simulated bureau: `workers` serve calls in FIFO order, each in `service` ± 25%.
struct Bureau {
    workers: usize,
    service: Duration,
    /// A call arriving with this many calls already inside is answered 429 at once.
    full_at: Option<usize>,
    /// Share of calls answered 500 (after their service time).
    error_rate: f64,
}

impl Bureau {
    fn new(workers: usize, service: Duration) -> Bureau {
        Bureau { workers, service, full_at: None, error_rate: 0.0 }
    }
}

struct Tick {
    at: Duration,
    limit: usize,
    /// Calls inside the bureau (in service or in its queue).
    inside: usize,
}

/// A discrete-event run: the real scheduler and controller on tokio's paused clock, a demand
/// that always has a request waiting for a slot (or at most `clients` outstanding), and the
/// bureau above. Deterministic: one seeded generator.
struct Sim {
    sched: Arc<Scheduler>,
    ctl: Arc<AdaptiveLimit>,
    bureau: Bureau,
    clients: Option<usize>,
    rng: fastrand::Rng,
    start: Instant,
    busy: usize,
    queue: VecDeque<(u64, Permit, Instant)>,
    calls: HashMap<u64, (Permit, Instant, Signal)>,
    events: BinaryHeap<Reverse<(Duration, u64)>>,
    next_id: u64,
    ticks: Vec<Tick>,
    /// Completion time of every call the bureau served (not the 429s or 500s).
    served: Vec<Duration>,
    back_pressure: usize,
}

impl Sim {
    fn new(bureau: Bureau, cfg: AdaptiveConfig) -> Sim {
        let ctl = Arc::new(AdaptiveLimit::new(cfg));
        let sched = Scheduler::new(cfg.initial);
        sched.set_controller(Some(Arc::clone(&ctl)));
        Sim {
            sched,
            ctl,
            bureau,
            clients: None,
            // `SIM_SEED=n` runs other seeds, to see how far a result depends on this one.
            rng: fastrand::Rng::with_seed(std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7)),
            start: Instant::now(),
            busy: 0,
            queue: VecDeque::new(),
            calls: HashMap::new(),
            events: BinaryHeap::new(),
            next_id: 0,
            ticks: Vec::new(),
            served: Vec::new(),
            back_pressure: 0,
        }
    }

    async fn run_until(&mut self, end: Duration) {
        loop {
            self.top_up().await;
            let tick = TICK * self.ticks.len() as u32;
            let event = self.events.peek().map_or(Duration::MAX, |Reverse((at, _))| *at);
            let at = tick.min(event);
            if at > end {
                break;
            }
            tokio::time::advance((self.start + at).saturating_duration_since(Instant::now())).await;
            if at == tick {
                let inside = self.busy + self.queue.len();
                self.ticks.push(Tick { at, limit: self.sched.limit(), inside });
            } else {
                let Reverse((_, id)) = self.events.pop().expect("peeked");
                self.finish(id);
            }
        }
    }

    async fn top_up(&mut self) {
        while self.sched.in_flight() < self.sched.limit() && self.clients.is_none_or(|c| self.sched.in_flight() < c) {
            let ask = Ask {
                tenant: 0,
                weight: 1,
                cost: 1,
                max_queue: 1,
                deadline: Instant::now() + SEC,
                level: 0,
                group: None,
            };
            let permit = self.sched.acquire(ask).await.expect("a free slot is granted at once");
            self.arrive(permit);
        }
    }

    fn arrive(&mut self, permit: Permit) {
        let id = self.next_id;
        self.next_id += 1;
        let now = Instant::now();
        if self.bureau.full_at.is_some_and(|full| self.busy + self.queue.len() >= full) {
            self.calls.insert(id, (permit, now, Signal::BackPressure));
            self.events.push(Reverse((now - self.start + MS, id)));
        } else {
            self.queue.push_back((id, permit, now));
            self.serve_queue();
        }
    }

    fn serve_queue(&mut self) {
        while self.busy < self.bureau.workers {
            let Some((id, permit, arrived)) = self.queue.pop_front() else { break };
            self.busy += 1;
            let service = self.bureau.service.mul_f64(0.75 + 0.5 * self.rng.f64());
            let signal = if self.rng.f64() < self.bureau.error_rate { Signal::Error } else { Signal::Ok };
            self.calls.insert(id, (permit, arrived, signal));
            self.events.push(Reverse((Instant::now() - self.start + service, id)));
        }
    }

    fn finish(&mut self, id: u64) {
        let (permit, arrived, signal) = self.calls.remove(&id).expect("a call per event");
        let now = Instant::now();
        match signal {
            Signal::BackPressure => self.back_pressure += 1,
            Signal::Ok => self.served.push(now - self.start),
            Signal::Error => {}
        }
        if signal != Signal::BackPressure {
            self.busy -= 1;
        }
        permit.complete(now - arrived, signal);
        self.serve_queue();
    }

    /// Calls served per second in `[from, to)`.
    fn throughput(&self, from: Duration, to: Duration) -> f64 {
        self.served.iter().filter(|t| **t >= from && **t < to).count() as f64 / (to - from).as_secs_f64()
    }

    fn ticks(&self, from: Duration, to: Duration) -> impl Iterator<Item = &Tick> {
        self.ticks.iter().filter(move |t| t.at >= from && t.at < to)
    }

    /// 95th percentile of the calls inside the bureau in `[from, to)`.
    fn p95_inside(&self, from: Duration, to: Duration) -> usize {
        let mut inside: Vec<usize> = self.ticks(from, to).map(|t| t.inside).collect();
        inside.sort_unstable();
        inside[inside.len() * 95 / 100]
    }

    /// Share of `[from, to)` with the limit below `limit`.
    fn time_below(&self, limit: usize, from: Duration, to: Duration) -> f64 {
        let all = self.ticks(from, to).count() as f64;
        self.ticks(from, to).filter(|t| t.limit < limit).count() as f64 / all
    }

    fn time_above(&self, limit: usize, from: Duration, to: Duration) -> f64 {
        let all = self.ticks(from, to).count() as f64;
        self.ticks(from, to).filter(|t| t.limit > limit).count() as f64 / all
    }

    /// First instant from which the limit stays within `range` until `to`, probes excepted
    /// (a tick outside lasting under 300 ms does not count).
    fn settled_at(&self, range: std::ops::RangeInclusive<usize>, to: Duration) -> Option<Duration> {
        let mut since = None;
        let mut out_since: Option<Duration> = None;
        for t in self.ticks(Duration::ZERO, to) {
            if range.contains(&t.limit) {
                since = since.or(Some(t.at));
                out_since = None;
            } else {
                let out = *out_since.get_or_insert(t.at);
                if t.at - out >= 300 * MS {
                    since = None;
                }
            }
        }
        since
    }

    /// One line per second: limit range, mean calls inside, throughput.
    fn print_trace(&self, name: &str, to: Duration) {
        println!("{name}: t(s) limit(min..max) inside(mean) served/s");
        for s in 0..to.as_secs() as u32 {
            let (from, until) = (SEC * s, SEC * (s + 1));
            let ticks: Vec<&Tick> = self.ticks(from, until).collect();
            let (lo, hi) = ticks.iter().fold((usize::MAX, 0), |(lo, hi), t| (lo.min(t.limit), hi.max(t.limit)));
            let inside = ticks.iter().map(|t| t.inside).sum::<usize>() as f64 / ticks.len() as f64;
            println!("{name}: {s:>3} {lo:>3}..{hi:<3} {inside:>6.1} {:>6.0}", self.throughput(from, until));
        }
        println!("{name}: view at the end {:?}", self.ctl.view());
    }
}

fn cfg(min: usize, max: usize, initial: usize) -> AdaptiveConfig {
    AdaptiveConfig::new(min, max, initial)
}

#[tokio::test(start_paused = true)]
async fn comes_down_from_a_budget_eight_times_too_high_to_the_knee() {
    // 8 workers x 20 ms: 400 calls/s. Budget 64.
    let mut sim = Sim::new(Bureau::new(8, 20 * MS), cfg(4, 64, 64));
    sim.run_until(20 * SEC).await;
    sim.print_trace("too_high", 20 * SEC);
    let settled = sim.settled_at(7..=10, 20 * SEC).expect("the limit settled near 8");
    println!("too_high: settled at {settled:?}");
    assert!(settled <= 5 * SEC, "settled near the knee only at {settled:?}");
    let p95 = sim.p95_inside(5 * SEC, 20 * SEC);
    assert!(p95 <= 10, "p95 in the bureau {p95} > 1.25 x 8 workers");
    let served = sim.throughput(5 * SEC, 20 * SEC);
    println!("too_high: p95 inside {p95}, served {served:.0}/s of 400");
    assert!(served >= 0.9 * 400.0, "served {served:.0}/s, under 90% of 400");
}

#[tokio::test(start_paused = true)]
async fn grows_from_too_low_to_the_knee() {
    let mut sim = Sim::new(Bureau::new(8, 20 * MS), cfg(1, 64, 4));
    sim.run_until(10 * SEC).await;
    sim.print_trace("too_low", 10 * SEC);
    let settled = sim.settled_at(7..=10, 10 * SEC).expect("the limit settled near 8");
    println!("too_low: settled at {settled:?}");
    // Slow start from the first window: the first baseline is not a slow-down (that rule once
    // held growth back 4 s, and forty quiet banks at a fresh start queued for it).
    assert!(settled <= 3 * SEC, "reached the knee only at {settled:?}");
    let served = sim.throughput(5 * SEC, 10 * SEC);
    assert!(served >= 0.9 * 400.0, "served {served:.0}/s, under 90% of 400");
}

/// Slow start can overshoot the knee by a slot (its last probe reads the knee from a ramp).
/// One slot above a knee of 8 raises latency by only 1/8, under the cruise's 20% alarm, so
/// only the down probe can see it; it must cut to the knee, not read the small rise as a
/// slower bureau (which left the limit at 9 for five seconds in benches/surge.rs).
#[tokio::test(start_paused = true)]
async fn cruises_at_the_knee_not_a_slot_above_it() {
    let mut worst = 0.0f64;
    let mut sum = 0.0;
    for seed in 0..8 {
        let mut sim = Sim::new(Bureau::new(8, 20 * MS), cfg(4, 64, 4));
        sim.rng = fastrand::Rng::with_seed(seed);
        sim.run_until(20 * SEC).await;
        sim.print_trace(&format!("knee seed {seed}"), 20 * SEC);
        let above = sim.time_above(8, 3 * SEC, 20 * SEC);
        println!("seed {seed}: limit above 8 for {:.1}% of the time after 3 s", above * 100.0);
        worst = worst.max(above);
        sum += above;
    }
    // Up probes hold it above for about 1% of the time. (Before: 22% on average, 99% in
    // one run, the down probe reading a rise of 1/8 as flat; then 18% in one run, an up
    // probe calling a rise within twice the noise flat.)
    assert!(sum / 8.0 <= 0.03, "limit above the knee for {:.1}% of the time on average", sum / 8.0 * 100.0);
    assert!(worst <= 0.05, "limit above the knee for {:.1}% of the time in one run", worst * 100.0);
}

#[tokio::test(start_paused = true)]
async fn a_three_times_slower_bureau_keeps_the_limit_at_its_workers() {
    let mut sim = Sim::new(Bureau::new(8, 20 * MS), cfg(4, 64, 8));
    sim.run_until(10 * SEC).await;
    sim.bureau.service = 60 * MS; // same 8 workers: 133 calls/s
    sim.run_until(30 * SEC).await;
    sim.print_trace("slower", 30 * SEC);
    let below = sim.time_below(7, 10 * SEC, 30 * SEC);
    println!("slower: limit below 7 for {:.1}% of the time after the slow-down", below * 100.0);
    assert!(below <= 0.05, "limit below 7 for {:.1}% of the time", below * 100.0);
    let served = sim.throughput(11 * SEC, 30 * SEC);
    println!("slower: served {served:.0}/s of 133");
    assert!(served >= 0.9 * 8.0 / 0.060, "served {served:.0}/s, under 90% of 133");
    assert!((7..=10).contains(&sim.sched.limit()), "limit {} at the end", sim.sched.limit());
}

#[tokio::test(start_paused = true)]
async fn follows_the_workers_cut_to_a_third_within_5s() {
    let mut sim = Sim::new(Bureau::new(8, 20 * MS), cfg(1, 64, 8));
    sim.run_until(10 * SEC).await;
    sim.bureau.workers = 3; // same service time: 150 calls/s
    sim.run_until(25 * SEC).await;
    sim.print_trace("fewer", 25 * SEC);
    let settled = sim.settled_at(3..=4, 25 * SEC).expect("the limit followed to 3");
    println!("fewer: settled at {settled:?}");
    assert!(settled <= 15 * SEC, "followed only at {settled:?}");
    let p95 = sim.p95_inside(15 * SEC, 25 * SEC);
    let served = sim.throughput(15 * SEC, 25 * SEC);
    println!("fewer: p95 inside {p95}, served {served:.0}/s of 150");
    assert!(p95 <= 4, "p95 in the bureau {p95} for 3 workers");
    assert!(served >= 0.9 * 150.0, "served {served:.0}/s, under 90% of 150");
}

#[tokio::test(start_paused = true)]
async fn back_pressure_cuts_to_what_the_bureau_accepts() {
    // 16 workers and no queue: one more call is answered 429 at once. Latency never rises,
    // so only the 429s can say the budget is too high.
    let mut sim = Sim::new(Bureau { full_at: Some(16), ..Bureau::new(16, 20 * MS) }, cfg(1, 64, 64));
    sim.run_until(10 * SEC).await;
    sim.print_trace("429", 10 * SEC);
    let limit = sim.sched.limit();
    let rejected = sim.back_pressure;
    println!("429: limit {limit}, {rejected} calls answered 429");
    assert!(limit <= 16, "limit {limit} above the 16 calls the bureau accepts");
    assert!(sim.p95_inside(2 * SEC, 10 * SEC) <= 16);
    let served = sim.throughput(2 * SEC, 10 * SEC);
    assert!(served >= 0.8 * 800.0, "served {served:.0}/s of 800");
}

#[tokio::test(start_paused = true)]
async fn errors_cut_the_limit() {
    let mut sim = Sim::new(Bureau::new(64, 20 * MS), cfg(4, 64, 32));
    sim.run_until(3 * SEC).await;
    let before = sim.sched.limit();
    sim.bureau.error_rate = 0.2;
    sim.run_until(6 * SEC).await;
    sim.print_trace("errors", 6 * SEC);
    assert!(sim.sched.limit() < before / 2, "limit {} from {before} with 20% errors", sim.sched.limit());
}

#[tokio::test(start_paused = true)]
async fn an_unused_limit_does_not_grow() {
    // Only 4 calls at a time to a bureau with 16 workers: nothing says 8 is too few.
    let mut sim = Sim::new(Bureau::new(16, 20 * MS), cfg(1, 64, 8));
    sim.clients = Some(4);
    sim.run_until(10 * SEC).await;
    sim.print_trace("unused", 10 * SEC);
    assert!(sim.ticks(Duration::ZERO, 10 * SEC).all(|t| t.limit <= 8), "grew while half unused");
}

#[test]
fn out_of_range_config_is_made_safe() {
    let c = AdaptiveLimit::new(AdaptiveConfig {
        backoff: 1.5,
        max_error_rate: -1.0,
        probe_interval: Duration::ZERO,
        ..AdaptiveConfig::new(0, 0, 50)
    });
    let cfg = c.config();
    assert_eq!((cfg.min, cfg.max, cfg.initial), (1, 1, 1));
    assert_eq!((cfg.backoff, cfg.max_error_rate, cfg.probe_interval), (0.9, 0.05, MIN_PHASE));
    assert_eq!(c.limit(), 1);
}

/// Feeds `n` samples, granted now at `in_flight` with `latency`, one every `gap`.
async fn feed(ctl: &AdaptiveLimit, n: usize, in_flight: usize, latency: Duration, gap: Duration) {
    for _ in 0..n {
        let grant = ctl.grant(in_flight);
        tokio::time::advance(gap).await;
        ctl.observe(grant, latency, Signal::Ok);
    }
}

/// A down probe whose concurrency did not fall (the quiet tenants it serves up to the cruise
/// limit fill it) measures nothing. Repeating it in the same way looped for a whole surge in
/// benches/surge.rs (many_tenants: a level of 5, forty quiet banks using 4.8, a probe to 4 that
/// never got below 4.8, no baseline, no up probe for 15 s). The next probe is strict: the
/// scheduler holds everyone to its limit.
#[tokio::test(start_paused = true)]
async fn a_down_probe_that_could_not_lower_concurrency_is_followed_by_a_strict_one() {
    let ctl = AdaptiveLimit::new(cfg(4, 64, 6));
    let ms = |n: u64| Duration::from_millis(n);
    // Cruise windows at 4.8 of 6 (unused: no up probe), no baseline yet: a down probe follows
    // two steady windows.
    let mut probes = Vec::new();
    for _ in 0..40 {
        let phase = ctl.lock().phase;
        if phase == Phase::ProbeDown {
            probes.push(ctl.down_from());
            // Its calls saw the same concurrency as the cruise: the band was filled.
            let in_flight = if ctl.down_from() > 0 { 5 } else { 4 };
            feed(&ctl, 30, in_flight, ms(21), ms(5)).await;
        } else {
            feed(&ctl, 30, 5, ms(21), ms(5)).await;
        }
        if probes.len() >= 2 {
            break;
        }
    }
    assert_eq!(probes.len(), 2, "expected two down probes");
    assert_eq!(probes[0], 6, "the first probe serves sparse tenants up to the cruise limit");
    assert_eq!(probes[1], 0, "the probe after one that measured nothing is strict");
}

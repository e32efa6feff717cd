//! The fair scheduler: which tenant gets the next bureau slot.
//!
//! The bureau serves only so many requests at once. In the 2017 outage one bank's surge (four
//! times the bureau's capacity) filled every slot and every other bank waited behind it. This
//! stage holds the bureau's capacity budget (`limit` concurrent requests) and, when it is used
//! up, queues requests per tenant and hands each freed slot to the tenant that weighted fair
//! queuing picks. A tenant's surge then only lengthens its own queue; the others keep their
//! share, and whatever share they leave unused goes to the surging tenant (work-conserving: a
//! lone tenant can use the whole budget).
//!
//! # How
//! - **Budget.** `in_flight` counts granted [`Permit`]s. When a slot is free and nobody is
//!   queued, [`Scheduler::acquire`] grants at once with two atomics and no lock. A permit's
//!   `Drop` frees its slot, so no early return or cancelled future can leak one.
//! - **Queues.** Otherwise the request waits in its tenant's FIFO queue (bounded per tenant:
//!   [`ShedReason::QueueFull`]) until it is granted or its deadline passes
//!   ([`ShedReason::QueueTimeout`]). One `std` mutex guards the queues; it is held for the few
//!   instructions of an enqueue, a dispatch or a removal and never across an `.await`.
//! - **Fairness across tenants: start-time fair queuing** (SFQ, Goyal, Vin and Cheng 1996; told
//!   here for tenants, and applied to groups, then their members: see *Groups* below). A
//!   request's virtual service is `cost / weight`. Each tenant with a backlog sits in a min-heap
//!   keyed by the virtual start tag of its head request; a freed slot goes to the smallest tag,
//!   the system virtual time moves to that tag, and the tenant's next tag is that tag plus the
//!   granted request's virtual service. A tenant that becomes active starts at
//!   `max(system virtual time, its last finish tag)`, so idling banks no credit. A decision is
//!   O(log active tenants): the 10,000 configured tenants that are idle cost nothing. SFQ over
//!   deficit round robin because its tags are exact per request (no quantum to tune against
//!   route costs) and a newly active tenant is served after at most one request per active
//!   tenant; the sparse list below shortens that to the next free slot.
//!   Tags are charged when a request is *granted*, so a request that is cancelled or times out
//!   in the queue costs its tenant nothing.
//! - **Sparse tenants first** (issue 14). In plain SFQ a quiet bank still waits behind one
//!   request of every backlogged tenant: ten surging banks cost it ten slots. So a tenant that
//!   arrives with an empty queue and a finish tag at most one request ahead of the system
//!   virtual time (it has not used more than its share lately) is *sparse*: it goes on a FIFO
//!   list served before the heap, and waits only for the bureau's next free slot, however many
//!   tenants are backlogged. Its grant is charged from the start tag SFQ would have given it,
//!   so weighted shares over time are unchanged; what is left of its queue after that grant
//!   competes in the heap. A tenant sending above its share cannot look "new": its finish tag
//!   runs ahead of the virtual time and it queues by tag like everyone else. When the limit
//!   shrinks the virtual time slows with it, so the tenants whose demand still fits their
//!   weighted share of what is left stay sparse, and the others share the rest by weight.
//!   Like FQ-CoDel's new-flow list, but eligibility is read from the virtual clock (as
//!   WF²Q+'s is) rather than from "had no queue", which a tenant that asks again the moment
//!   it is granted would game. The one request of slack keeps a quiet bank's random bunching
//!   (two look-ups close together) from dropping it into the heap.
//! - **A down probe is not a smaller bureau.** The adaptive limit measures the bureau at ¾ of
//!   the budget for a moment ([`super::adaptive`]); the capacity it withholds must come from
//!   the tenants with a standing queue, not from the quiet ones (a quiet bank at 90% of its
//!   share, squeezed to ¾, queued for 50–80 ms). While a probe is on, sparse tenants and
//!   backlogged ones with at most [`LIGHT_QUEUE`] waiters are served up to the cruise limit,
//!   and a sparse grant is charged no further than one request past the virtual time (the
//!   withheld slots slow the virtual time; the quiet tenant must not lose its standing for
//!   them). Both only while the tenant holds fewer slots than its weighted share of the cruise
//!   limit (counted per tenant for grants from the queue): a tenant whose calls are all in
//!   flight and which asks again as each returns has no queue either, and would otherwise
//!   take every slot the probe withholds. Finding a light backlogged tenant, or a sparse one
//!   within its share, scans the lists, only during a probe.
//! - **The bound.** With the bureau kept full, a sparse request waits for the next completion
//!   among the `limit` busy slots (their residual time), plus the sparse requests ahead of it.
//!   With `n` slots of service `S` at independent phases the residual exceeds `x` with
//!   probability `(1 - x/S)^n`: for 8 workers × 20 ms a mean of `S/(n+1)` = 2.2 ms and a p99 of
//!   `S (1 - 0.01^(1/n))` = 8.8 ms. With the sparse load on top (Monte Carlo of that model:
//!   8 slots × U(18, 22) ms always busy, Poisson sparse arrivals served first, 2000 s each):
//!   two quiet tenants at 40 req/s each (80 req/s) wait 2.6 ms mean, 9.8 ms p99; forty at
//!   5 req/s each (200 req/s, half the bureau) 3.7 ms mean, 12.3 ms p99. A quiet look-up's
//!   p99 latency is then at most about 32 ms and 34 ms (wait + 22 ms service), against 20 ms
//!   calm, whatever the number of surging tenants.
//! - **Priority levels above the tenants** (issue 17, [`levels`]). `State` is one fair-queuing
//!   level (sparse lists + SFQ heaps, groups then tenants); there is one per priority level
//!   slot, all under the one lock. A freed slot first picks the level (the one furthest below its
//!   nominal part of the limit, then the borrower furthest below it; Kubernetes APF's shares,
//!   lending and borrowing), then the tenant inside it as above. Each permit counts in its
//!   level (`level_held`), so a level below its nominal part still takes a free slot on the
//!   lock-free fast path.
//! - **Groups, then tenants** (issue 17's `[[groups]]`). Within a level the fair queuing is
//!   hierarchical SFQ: the sparse list and the heap above hold *groups* (a tenant in no group
//!   is a group of one), tagged by the group's weight; each group holds its own sparse list,
//!   heap and virtual time over its members, tagged by their weights. A grant picks the group
//!   (sparse first, then the smallest tag), then the member inside it the same way, and charges
//!   both. So affiliates surging together share the group's weight by theirs, and one surging
//!   alone gets all of it (its idle affiliates bank nothing, as idle tenants do not); a quiet
//!   member of a surging group waits for its group's next turn, not behind its affiliates'
//!   backlog. A group's members' virtual time moves to the largest finish tag when the group's
//!   last waiter leaves (SFQ's end of a busy period), so a group of one behaves as the flat
//!   queue did. The probe's scans and `within_share` read a tenant's share as its group's share
//!   of the groups that queue times its own within the group.
//! - **Hand-off.** A queued request receives its `Permit` through a oneshot channel. If the
//!   waiter is dropped (client gone) after the permit was sent, dropping the unreceived permit
//!   frees the slot again; if it was dropped before, the send fails and the slot goes to the
//!   next waiter.
//! - **Retry-After.** A shed carries a `retry_after` estimated from the tenant's queue length
//!   and the observed drain rate (slots freed per second, an EWMA sampled on the slow path),
//!   scaled by the tenant's weighted share of the active tenants; at least 1 s, at most 60 s.
//! - **Adaptive limit.** [`Permit::complete`] reports the bureau call's latency and outcome to
//!   an optional [`AdaptiveLimit`], which moves the limit with [`Scheduler::set_limit`].
//!
//! Within a tenant and a level, requests are FIFO.
//!
//! One file of about 1500 lines (its tests are in `scheduler/tests.rs`): the fast path, the
//! hand-off, the sparse lists and the heaps share one set of invariants (a slot is claimed
//! once, handed on or given back; a group and a tenant each have one current entry), and each
//! function's comment leans on the others. Split into files, those invariants would be stated
//! nowhere whole.
//!
//! # Example
//! ```
//! # use std::time::Duration;
//! # use tokio::time::Instant;
//! # use bureau_guard::bureau::adaptive::Signal;
//! # use bureau_guard::bureau::scheduler::{Ask, Scheduler};
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime").block_on(async {
//! let sched = Scheduler::new(400);
//! let ask = Ask { tenant: 0, weight: 2, cost: 1, max_queue: 100, deadline: Instant::now() + Duration::from_secs(2), level: 0, group: None };
//! let permit = sched.acquire(ask).await.expect("a free slot is granted at once");
//! // ... call the bureau ...
//! permit.complete(Duration::from_millis(40), Signal::Ok);
//! assert_eq!(sched.in_flight(), 0);
//! # });
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::bureau::adaptive::{AdaptiveLimit, Grant, Signal};

pub mod levels;

pub use levels::{LevelSpec, LevelTable, MAX_LEVELS};

/// Shortest `Retry-After`: the header has whole seconds, and 0 would invite an instant retry.
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
/// Longest `Retry-After`: past a minute the estimate says "the bureau is stuck", not "when".
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);

/// Fixed-point scale of virtual time: `cost / weight` in units of 2^-32, exact to a few parts
/// per million for the weights the request path uses (tenant weights up to 1000, in thousandths:
/// `admission::tenant::WEIGHT_SCALE`) and, in a `u128`, impossible to overflow in the life of a
/// process.
const VTIME_SCALE: u128 = 1 << 32;
/// The drain rate is re-sampled no more often than this: shorter intervals measure jitter.
const DRAIN_SAMPLE_MIN: Duration = Duration::from_millis(100);
/// Time constant of the drain-rate EWMA: long enough to ride out bursts of completions, short
/// enough that a bureau slow-down shows in the next shed's `Retry-After`.
const DRAIN_TAU_SECS: f64 = 2.0;

/// One request's claim on a bureau slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// Dense tenant index, stable for the life of the process (the caller maps tenant ids to
    /// indexes). Queues are stored per index, so indexes must be small and dense.
    pub tenant: usize,
    /// The tenant's share under contention, relative to other tenants' weights (>= 1; 0 is
    /// treated as 1).
    pub weight: u32,
    /// The route's cost: how much bureau capacity one request uses (>= 1; 0 is treated as 1).
    pub cost: u32,
    /// At most this many of the tenant's requests wait; one more is shed with `QueueFull`.
    pub max_queue: usize,
    /// A request still queued at this instant is shed with `QueueTimeout`.
    pub deadline: Instant,
    /// Its priority level's slot ([`levels`]); 0 without levels. A slot not in use is served as
    /// the least important level.
    pub level: usize,
    /// The group of affiliates the tenant is in, if any: within a level, slots go to groups by
    /// their weight first, then to members by theirs (`weight` is then the tenant's weight
    /// within its group). `None`: the tenant is a group of its own, at `weight`.
    pub group: Option<AskGroup>,
}

/// A tenant group as the scheduler sees it: see [`Ask::group`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AskGroup {
    /// Dense group index, stable for the life of the process (as tenant indexes are).
    pub index: usize,
    /// The group's share under contention, relative to other groups' and ungrouped tenants'
    /// weights (>= 1).
    pub weight: u32,
}

impl Ask {
    /// Its group's flow at the top of its level: ungrouped tenants and groups in one index
    /// space (even: tenant `2t`; odd: group `2g + 1`).
    fn group_flow(&self) -> usize {
        self.group.map_or(2 * self.tenant, |g| 2 * g.index + 1)
    }

    /// Its group's weight at the top of its level: the group's, else its own.
    fn group_weight(&self) -> u32 {
        self.group.map_or(self.weight, |g| g.weight).max(1)
    }
}

/// Why the scheduler refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The tenant's queue already held `max_queue` waiters.
    QueueFull,
    /// The request's deadline passed before a slot was granted.
    QueueTimeout,
    /// Requests of all tenants together filled `max_waiting`: the newest request of the tenant
    /// with the longest queue was dropped (this one, or another tenant's that made room for it).
    QueueFullTotal,
}

impl ShedReason {
    /// Stable label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::QueueTimeout => "queue_timeout",
            ShedReason::QueueFullTotal => "queue_full_total",
        }
    }
}

/// A refused request: why, and when the tenant should try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    /// Why the request was refused.
    pub reason: ShedReason,
    /// Whole seconds in `[RETRY_AFTER_MIN, RETRY_AFTER_MAX]`, estimated from the tenant's
    /// queue length and the observed drain rate.
    pub retry_after: Duration,
}

impl fmt::Display for Shed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            ShedReason::QueueFull => write!(f, "bureau capacity exhausted and the tenant's queue is full")?,
            ShedReason::QueueTimeout => write!(f, "no bureau slot became free before the request's deadline")?,
            ShedReason::QueueFullTotal => {
                write!(f, "bureau capacity exhausted and every tenant's queues together full")?
            }
        }
        write!(f, "; retry after {} s", self.retry_after.as_secs())
    }
}

impl std::error::Error for Shed {}

/// Counters of one tenant, for the admin API and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// Requests waiting now.
    pub queued: usize,
    /// Requests granted after waiting in the queue (fast-path grants are not counted here; the
    /// request path counts every outcome per tenant).
    pub granted_after_wait: u64,
    /// Requests shed because the queue was full.
    pub shed_queue_full: u64,
    /// Requests shed because their deadline passed in the queue.
    pub shed_queue_timeout: u64,
    /// Requests shed because all tenants' queues together were full.
    pub shed_queue_full_total: u64,
}

/// One priority level's figures: see [`Scheduler::level_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LevelStats {
    /// Permits it holds.
    pub in_flight: usize,
    /// Requests of it waiting.
    pub queued: usize,
    /// Its nominal part of the current limit.
    pub nominal: usize,
}

/// The bureau's capacity budget and the per-tenant queues in front of it. Shared via `Arc`.
pub struct Scheduler {
    /// Lets `&self` methods (`set_limit`, a permit's release) mint permits, which own an `Arc`.
    me: Weak<Scheduler>,
    /// The limit in force: this replica's share of `base`.
    limit: AtomicUsize,
    /// The budget as configured (or as the adaptive controller sets it), for all replicas.
    base: AtomicUsize,
    /// This replica's `(rank, replicas)` among those sharing the budget, packed `rank << 32 |
    /// replicas`; `(0, 1)` alone.
    share: AtomicU64,
    in_flight: AtomicUsize,
    /// Waiters in all queues. Written only under `state`; read without it by the fast path,
    /// which must not overtake anyone queued.
    waiting: AtomicUsize,
    /// At most this many waiters in all queues together (`upstream.max_queue_total`).
    max_waiting: AtomicUsize,
    /// Slots freed since start: the numerator of the drain rate.
    released: AtomicU64,
    /// The priority levels in force ([`levels`]): one level, the whole budget, unless set.
    levels: ArcSwap<LevelTable>,
    /// Permits held per level slot.
    level_held: [AtomicUsize; MAX_LEVELS],
    state: Mutex<Queues>,
    controller: ArcSwapOption<AdaptiveLimit>,
    /// Runs inside `enqueue` right after the re-check found no free slot, where a release on
    /// another thread can land: lets a test replay that race deterministically.
    #[cfg(test)]
    race_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .field("queued", &self.queued_total())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler that grants at most `limit` permits at once. A limit of 0 grants nothing
    /// (every request queues until its deadline) until [`Scheduler::set_limit`] raises it.
    pub fn new(limit: usize) -> Arc<Scheduler> {
        Arc::new_cyclic(|me| Scheduler {
            me: me.clone(),
            limit: AtomicUsize::new(limit),
            base: AtomicUsize::new(limit),
            share: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            max_waiting: AtomicUsize::new(usize::MAX),
            released: AtomicU64::new(0),
            levels: ArcSwap::from_pointee(LevelTable::default()),
            level_held: std::array::from_fn(|_| AtomicUsize::new(0)),
            state: Mutex::new(Queues::new(Instant::now())),
            controller: ArcSwapOption::empty(),
            #[cfg(test)]
            race_hook: Mutex::new(None),
        })
    }

    /// Changes the limit. Raising it grants queued requests at once; lowering it revokes
    /// nothing: no new permit is granted until `in_flight` is below the new limit. With an
    /// adaptive controller installed the controller also sets the limit, so a config reload
    /// should install a new controller rather than call this.
    pub fn set_limit(&self, limit: usize) {
        self.base.store(limit, Ordering::SeqCst);
        self.apply_limit();
    }

    /// Sets this replica's place among `replicas` sharing the budget (state.backend = "redis"):
    /// the limit becomes `base / replicas`, the remainder going to the lowest ranks, so the
    /// replicas together never offer the bureau more than the configured budget (but each at
    /// least one slot, or a replica could serve nothing).
    pub fn set_share(&self, rank: usize, replicas: usize) {
        let replicas = replicas.max(1) as u64;
        self.share.store(((rank as u64).min(replicas - 1) << 32) | replicas, Ordering::SeqCst);
        self.apply_limit();
    }

    fn apply_limit(&self) {
        // A set_limit racing a set_share may compute from a stale pair and store last: store,
        // then recompute until the inputs did not move under us.
        loop {
            let (base, share) = (self.base.load(Ordering::SeqCst), self.share.load(Ordering::SeqCst));
            let limit = share_of(base, (share >> 32) as usize, (share & 0xffff_ffff) as usize);
            // SeqCst store then load, against enqueue's SeqCst increment then load: at least one
            // of the two sides sees the other, so a raised limit never leaves a waiter stranded.
            self.limit.store(limit, Ordering::SeqCst);
            if self.base.load(Ordering::SeqCst) == base && self.share.load(Ordering::SeqCst) == share {
                break;
            }
        }
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let mut q = self.lock();
            self.dispatch_locked(&mut q);
        }
    }

    /// Caps the waiters of all tenants together (per-tenant `max_queue`s add up with many
    /// tenants). When full, the newest request of the tenant with the longest queue is dropped
    /// to make room (longest-queue drop, as FQ-CoDel does), so a surge cannot shed a quiet
    /// tenant's one request; an arrival whose own queue is the longest is refused instead.
    pub fn set_max_waiting(&self, max: usize) {
        self.max_waiting.store(max.max(1), Ordering::Relaxed);
    }

    /// Installs (or with `None` removes) the adaptive controller fed by [`Permit::complete`].
    /// Installing one sets the limit to the controller's current limit.
    pub fn set_controller(&self, controller: Option<Arc<AdaptiveLimit>>) {
        let limit = controller.as_ref().map(|c| c.limit());
        self.controller.store(controller);
        if let Some(limit) = limit {
            self.set_limit(limit);
        }
    }

    /// The current limit on concurrent permits.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Permits granted and not yet dropped. May exceed [`Scheduler::limit`] for a while after
    /// the limit was lowered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting in all tenants' queues.
    pub fn queued_total(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests waiting in `tenant`'s queue (0 for a tenant never seen).
    pub fn queued(&self, tenant: usize) -> usize {
        self.lock().levels.iter().filter_map(|l| l.tenants.get(tenant)).map(|t| t.waiters.len()).sum()
    }

    /// `tenant`'s counters (all zero for a tenant never seen).
    pub fn tenant_stats(&self, tenant: usize) -> TenantStats {
        let q = self.lock();
        let mut stats = TenantStats::default();
        for t in q.levels.iter().filter_map(|l| l.tenants.get(tenant)) {
            stats.queued += t.waiters.len();
            stats.granted_after_wait += t.granted_after_wait;
            stats.shed_queue_full += t.shed_queue_full;
            stats.shed_queue_timeout += t.shed_queue_timeout;
            stats.shed_queue_full_total += t.shed_queue_full_total;
        }
        stats
    }

    /// Sets the priority levels ([`levels`]). The queued requests of a level no longer in the
    /// table (or whose slot a level of another name now holds) move, in order and keeping their
    /// place in time, to their tenant's default level (`default_of(tenant)`, a slot, if in the
    /// table), else to the least important level.
    pub fn set_levels(&self, table: LevelTable, default_of: &dyn Fn(usize) -> Option<usize>) {
        let mut q = self.lock();
        self.set_levels_locked(&mut q, table, default_of);
    }

    /// Sets the named priority levels `levels` (most important first), each keeping the slot
    /// it had by name ([`LevelTable::place`]), and returns each one's slot in `levels`' order
    /// (none without levels: the whole budget is then one unnamed level, slot 0). Queued
    /// requests of a removed level move to their tenant's default level (`default_of(tenant)`,
    /// an index into `levels`), as in [`Scheduler::set_levels`].
    pub fn set_named_levels(
        &self,
        levels: &[(&str, LevelSpec)],
        default_of: &dyn Fn(usize) -> Option<usize>,
    ) -> Vec<usize> {
        let mut q = self.lock();
        if levels.is_empty() {
            self.set_levels_locked(&mut q, LevelTable::default(), &|_| None);
            return Vec::new();
        }
        let busy = |s: usize| self.level_held[s].load(Ordering::SeqCst) > 0 || q.levels[s].queued > 0;
        let (table, slots) = LevelTable::place(&self.levels.load(), levels, &busy)
            .expect("config validation caps the levels at MAX_LEVELS");
        self.set_levels_locked(&mut q, table, &|t| default_of(t).and_then(|i| slots.get(i).copied()));
        slots
    }

    fn set_levels_locked(&self, q: &mut Queues, table: LevelTable, default_of: &dyn Fn(usize) -> Option<usize>) {
        let old = self.levels.load();
        let last = *table.order().last().expect("a level table is never empty");
        for from in 0..MAX_LEVELS {
            let same = table.contains(from) && table.name(from) == old.name(from);
            if same || q.levels[from].queued == 0 {
                continue;
            }
            for (tenant, waiter) in q.levels[from].take_all() {
                let to = default_of(tenant).filter(|&l| table.contains(l)).unwrap_or(last);
                q.levels[to].insert(tenant, waiter);
            }
        }
        self.levels.store(Arc::new(table));
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch_locked(q);
        }
    }

    /// The priority levels in force.
    pub fn levels(&self) -> Arc<LevelTable> {
        self.levels.load_full()
    }

    /// Level `slot`'s calls in flight, its waiters and its nominal part of the current limit.
    pub fn level_stats(&self, slot: usize) -> LevelStats {
        let table = self.levels.load();
        let nominal = if table.contains(slot) { table.seats(self.limit())[slot].nominal } else { 0 };
        LevelStats {
            in_flight: self.level_held.get(slot).map_or(0, |h| h.load(Ordering::Relaxed)),
            queued: self.lock().levels.get(slot).map_or(0, |l| l.queued),
            nominal,
        }
    }

    /// How long `ask` would wait for a slot if it were queued now: zero if one is free for it;
    /// if its tenant would be sparse, the next completions (one per sparse request ahead of it);
    /// else its place in its tenant's queue at the tenant's weighted share of its level's part
    /// of the drain rate. An estimate from the measured drain rate (`None` before one is
    /// measured), for refusing at once a request whose own deadline the queue cannot meet.
    pub fn estimated_wait(&self, ask: &Ask) -> Option<Duration> {
        let table = self.levels.load();
        let level = Scheduler::level_of(&table, ask.level);
        let limit = self.limit.load(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0
            && self.level_allows(&table, level, limit)
            && self.in_flight() < limit
        {
            return Some(Duration::ZERO);
        }
        let part = self.level_part(&table, level);
        let mut q = self.lock();
        let drain = q.drain.sample(Instant::now(), self.released.load(Ordering::Relaxed))?;
        let st = &q.levels[level];
        let secs = if st.would_be_sparse(ask) {
            (st.top.sparse.len() + 1) as f64 / drain
        } else {
            st.drain_secs(drain * part, ask)
        };
        secs.is_finite().then(|| Duration::from_secs_f64(secs.min(3600.0)))
    }

    /// The slot `level` is served as: itself if in use, else the least important level.
    fn level_of(table: &LevelTable, level: usize) -> usize {
        if table.contains(level) { level } else { *table.order().last().expect("a level table is never empty") }
    }

    /// Whether `level` may take one more slot now (always, with one level: the total decides).
    /// Reads the other levels' counts without a lock: two grants racing may borrow one slot
    /// more than the rule allows; the total budget is claimed exactly either way.
    fn level_allows(&self, table: &LevelTable, level: usize, limit: usize) -> bool {
        if !table.is_split() {
            return true;
        }
        let held = self.held_by_level();
        let total = self.in_flight.load(Ordering::SeqCst) + 1;
        levels::may_take(&table.seats(limit), &held, level, total, limit)
    }

    fn held_by_level(&self) -> [usize; MAX_LEVELS] {
        std::array::from_fn(|i| self.level_held[i].load(Ordering::SeqCst))
    }

    /// Waits for a bureau slot for `ask`.
    ///
    /// Grants at once if a slot is free and nobody is queued. Otherwise queues the request in
    /// its tenant's FIFO queue and grants it when weighted fair queuing picks it. Fails at once
    /// with `QueueFull` if the tenant already has `max_queue` waiters, and with `QueueTimeout`
    /// if `ask.deadline` passes first (a permit granted at that very instant is returned).
    /// Dropping the returned future leaves the queue and takes no slot.
    pub async fn acquire(self: &Arc<Self>, ask: Ask) -> Result<Permit, Shed> {
        match self.queue(ask) {
            Queued::Settled(res) => res,
            Queued::Waiting(mut waiting) => waiting.granted().await,
        }
    }

    /// [`Scheduler::acquire`] in two steps: grants, refuses or queues `ask` now; a queued
    /// request is then awaited with [`Waiting::granted`] and may change level while it waits
    /// ([`Waiting::move_to`]). Dropping the [`Waiting`] leaves the queue and takes no slot.
    pub fn queue(self: &Arc<Self>, mut ask: Ask) -> Queued<'_> {
        ask.level = Scheduler::level_of(&self.levels.load(), ask.level);
        if self.waiting.load(Ordering::SeqCst) == 0 && self.try_claim(ask.level) {
            return Queued::Settled(Ok(Permit::new(Arc::clone(self), ask.level)));
        }
        match self.enqueue(&mut ask) {
            Enqueued::Granted(permit) => Queued::Settled(Ok(permit)),
            Enqueued::Shed(shed) => Queued::Settled(Err(shed)),
            Enqueued::Waiting(rx, id) => {
                let wait = Wait { sched: self, level: ask.level, tenant: ask.tenant, id, rx, settled: false };
                Queued::Waiting(Waiting { wait, ask })
            }
        }
    }

    /// Claims a slot for `level` if one is free under the current limit and the level may
    /// take it; counts it in the level's permits.
    fn try_claim(&self, level: usize) -> bool {
        let limit = self.limit.load(Ordering::SeqCst);
        if !self.level_allows(&self.levels.load(), level, limit) || !self.try_claim_under(limit) {
            return false;
        }
        self.level_held[level].fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Claims a slot if fewer than `limit` are in flight.
    fn try_claim_under(&self, limit: usize) -> bool {
        self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)).is_ok()
    }

    fn enqueue(&self, ask: &mut Ask) -> Enqueued {
        let mut q = self.lock();
        // Resolved again under the lock a reload holds while it removes levels and moves their
        // queues: a level removed since `queue` looked is not queued in (its queue is served
        // only when no level in force has a waiter).
        ask.level = Scheduler::level_of(&self.levels.load(), ask.level);
        // Nobody queued and a slot freed since the fast path looked: it is ours.
        if self.waiting.load(Ordering::SeqCst) == 0 && self.try_claim(ask.level) {
            drop(q);
            return match self.me.upgrade() {
                Some(me) => Enqueued::Granted(Permit::new(me, ask.level)),
                // Unreachable: `acquire` holds an `Arc`. Give the slot back rather than panic.
                None => {
                    self.level_held[ask.level].fetch_sub(1, Ordering::SeqCst);
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                    Enqueued::Shed(Shed { reason: ShedReason::QueueFull, retry_after: RETRY_AFTER_MIN })
                }
            };
        }
        #[cfg(test)]
        if let Some(hook) = self.race_hook.lock().unwrap_or_else(PoisonError::into_inner).take() {
            hook();
        }
        let now = Instant::now();
        let released = self.released.load(Ordering::Relaxed);
        // Sampled here too (not only at sheds) so that the rate reflects the contended bureau.
        let drain = q.drain.sample(now, released);
        let table = self.levels.load();
        let part = self.level_part(&table, ask.level);
        let st = &mut q.levels[ask.level];
        if st.tenant(ask.tenant).waiters.len() >= ask.max_queue {
            st.tenants[ask.tenant].shed_queue_full += 1;
            let retry_after = st.retry_after(drain, part, ask);
            return Enqueued::Shed(Shed { reason: ShedReason::QueueFull, retry_after });
        }
        if self.waiting.load(Ordering::SeqCst) >= self.max_waiting.load(Ordering::Relaxed) {
            match q.make_room(&table, ask) {
                // Room made at a queue's tail: its newest waiter learns it was shed (its
                // sender is dropped unsent).
                Some((level, victim)) => {
                    if q.levels[level].drop_newest(victim) {
                        q.levels[level].tenants[victim].shed_queue_full_total += 1;
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                None => {
                    let st = &mut q.levels[ask.level];
                    st.tenants[ask.tenant].shed_queue_full_total += 1;
                    let retry_after = st.retry_after(drain, part, ask);
                    return Enqueued::Shed(Shed { reason: ShedReason::QueueFullTotal, retry_after });
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = q.next_id;
        q.next_id += 1;
        q.levels[ask.level].push(id, ask, tx);
        // SeqCst increment then (in dispatch) SeqCst load of in_flight, against release's
        // decrement then load of `waiting`: a slot freed meanwhile is seen by one side.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.dispatch_locked(&mut q);
        Enqueued::Waiting(rx, id)
    }

    /// Level `slot`'s nominal part of the limit, as a fraction (1 without levels): what its
    /// queues drain at under contention, for `Retry-After`.
    fn level_part(&self, table: &LevelTable, slot: usize) -> f64 {
        if !table.is_split() || !table.contains(slot) {
            return 1.0;
        }
        let limit = self.limit().max(1);
        (table.seats(limit)[slot].nominal.max(1) as f64 / limit as f64).min(1.0)
    }

    /// Hands free slots to queued waiters in weighted-fair order. Called with the queue lock.
    fn dispatch_locked(&self, q: &mut Queues) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        // Fails only while the scheduler is being dropped, when no waiter can exist.
        let Some(me) = self.me.upgrade() else { return };
        // A slot claimed for a waiter whose receiver was gone is kept for the next waiter.
        let mut held = None;
        // During the adaptive limit's down probe, sparse requests may use the cruise limit the
        // probe stepped down from (and are not charged for the withheld slots): the probe's
        // cost falls on the backlogged tenants, whose calls alone it holds back.
        let down_from = self.controller.load().as_ref().map_or(0, |c| c.down_from());
        let sparse_limit = (down_from > 0).then(|| {
            let share = self.share.load(Ordering::Relaxed);
            share_of(down_from, (share >> 32) as usize, (share & 0xffff_ffff) as usize)
        });
        let table = self.levels.load();
        while self.waiting.load(Ordering::SeqCst) > 0 {
            let limit = self.limit.load(Ordering::SeqCst);
            if held.is_none() {
                held = if self.try_claim_under(limit) {
                    Some(Claim::Any)
                } else if sparse_limit.is_some_and(|limit| self.try_claim_under(limit)) {
                    Some(Claim::Light)
                } else {
                    break;
                };
            }
            let next = match held {
                // A probe's extra slots go to quiet tenants, most important level first, within
                // each level's rules under the cruise limit (its borrowing cap, what the others
                // keep back): the probe withholds slots, it does not lift the levels' caps.
                Some(Claim::Light) => {
                    let cruise = sparse_limit.unwrap_or(limit);
                    let (seats, held_now) = (table.seats(cruise), self.held_by_level());
                    let total = self.in_flight.load(Ordering::SeqCst);
                    let may = |l: usize| {
                        !table.is_split() || !table.contains(l) || levels::may_take(&seats, &held_now, l, total, cruise)
                    };
                    let removed = (0..MAX_LEVELS).filter(|&l| !table.contains(l));
                    table.order().iter().copied().chain(removed).filter(|&l| may(l)).find_map(|l| {
                        let st = &mut q.levels[l];
                        let next = st.pop_sparse(sparse_limit, true).or_else(|| st.pop_light(sparse_limit));
                        next.map(|(tenant, waiter)| (l, tenant, waiter))
                    })
                }
                _ => q
                    .level_for(&table, &self.held_by_level(), self.in_flight.load(Ordering::SeqCst), limit)
                    .and_then(|l| q.levels[l].pop_next(sparse_limit).map(|(tenant, waiter)| (l, tenant, waiter))),
            };
            let Some((level, tenant, waiter)) = next else { break };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.level_held[level].fetch_add(1, Ordering::SeqCst);
            let mut permit = Permit::new(Arc::clone(&me), level);
            permit.holder = Some(tenant);
            match waiter.tx.send(permit) {
                Ok(()) => {
                    held = None;
                    let t = &mut q.levels[level].tenants[tenant];
                    t.granted_after_wait += 1;
                    // Under the lock the permit's release needs: its drop cannot count down first.
                    t.held += 1;
                }
                // The waiter was dropped: disarm the bounced permit (its drop must not release,
                // and must not take this lock again) and keep the slot for the next waiter.
                Err(mut bounced) => {
                    bounced.armed = false;
                    self.level_held[level].fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        if held.is_some() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Frees one slot (one of `holder`'s, for a permit granted from the queue) and, if anyone
    /// waits, hands it on.
    fn release(&self, level: usize, holder: Option<usize>) {
        self.level_held[level].fetch_sub(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.released.fetch_add(1, Ordering::Relaxed);
        if holder.is_some() || self.waiting.load(Ordering::SeqCst) > 0 {
            let mut q = self.lock();
            if let Some(t) = holder.and_then(|t| q.levels[level].tenants.get_mut(t)) {
                t.held = t.held.saturating_sub(1);
            }
            self.dispatch_locked(&mut q);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // Nothing inside the critical sections panics short of allocation failure, and each
        // leaves the queues consistent at every step, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A backlogged tenant with at most this many waiters is light: a down probe does not hold
/// its requests back (a surging tenant keeps a standing queue, up to its `max_queue`).
const LIGHT_QUEUE: usize = 2;

/// What a slot claimed in `dispatch_locked` may be granted to.
#[derive(Clone, Copy)]
enum Claim {
    /// Claimed under the limit: the next waiter, sparse or backlogged.
    Any,
    /// Claimed above a down probe's limit, under the cruise limit: sparse waiters, or a
    /// backlogged tenant's with a short queue (see [`State::pop_light`]).
    Light,
}

enum Enqueued {
    Granted(Permit),
    Shed(Shed),
    Waiting(oneshot::Receiver<Permit>, u64),
}

/// What [`Scheduler::queue`] did with a request: settled at once, or queued.
pub enum Queued<'a> {
    /// Granted or refused at once.
    Settled(Result<Permit, Shed>),
    /// In its tenant's queue.
    Waiting(Waiting<'a>),
}

/// A request in its tenant's queue (see [`Scheduler::queue`]).
pub struct Waiting<'a> {
    wait: Wait<'a>,
    ask: Ask,
}

impl Waiting<'_> {
    /// Waits until the request is granted, or shed: its deadline passed (a permit granted at
    /// that very instant is returned), or another request needed its place. Cancel-safe: a
    /// dropped call leaves the request queued.
    pub async fn granted(&mut self) -> Result<Permit, Shed> {
        tokio::select! {
            // A permit that arrives together with the deadline is used, not thrown away.
            biased;
            res = &mut self.wait.rx => {
                self.wait.settled = true;
                // The sender is dropped unsent only when the waiter was dropped to make room
                // for another tenant's request (the queues together were full).
                res.map_err(|_| Shed { reason: ShedReason::QueueFullTotal, retry_after: RETRY_AFTER_MIN })
            }
            () = tokio::time::sleep_until(self.ask.deadline) => self.wait.time_out(&self.ask),
        }
    }

    /// The level slot it is queued at (a reload may have moved it since it queued), or the
    /// last one it was seen at once granted or shed.
    pub fn level(&self) -> usize {
        let q = self.wait.sched.lock();
        q.find(self.ask.level, self.ask.tenant, self.wait.id).unwrap_or(self.ask.level)
    }

    /// Moves the request to priority level slot `level`, keeping its place in time (its id)
    /// and its deadline, if its tenant's queue there has room; false, and nothing changes,
    /// if it has not, or if the request is no longer queued (granted or shed: [`granted`]
    /// says which). A move never sheds anyone and never counts as a shed.
    ///
    /// [`granted`]: Waiting::granted
    pub fn move_to(&mut self, level: usize) -> bool {
        if self.wait.settled {
            return false;
        }
        let sched = self.wait.sched;
        let tenant = self.ask.tenant;
        let mut q = sched.lock();
        // The levels in force and the request's own are read under the lock a reload holds
        // while it changes both: a level removed meanwhile is not moved into (its queue is
        // served only when no level in force has a waiter), and a level the reload moved the
        // request out of is not taken for where it is.
        let to = Scheduler::level_of(&sched.levels.load(), level);
        let Some(from) = q.find(self.ask.level, tenant, self.wait.id) else { return false };
        self.ask.level = from;
        self.wait.level = from;
        if from == to {
            return true;
        }
        if q.levels[to].tenant(tenant).waiters.len() >= self.ask.max_queue {
            return false;
        }
        let Some(waiter) = q.levels[from].take(tenant, self.wait.id) else { return false };
        q.levels[to].insert(tenant, waiter);
        self.ask.level = to;
        self.wait.level = to;
        // The new level may have a free seat the old one had not.
        sched.dispatch_locked(&mut q);
        true
    }
}

/// A queued `acquire`: leaves the queue when dropped unsettled (cancellation or deadline).
struct Wait<'a> {
    sched: &'a Arc<Scheduler>,
    level: usize,
    tenant: usize,
    id: u64,
    rx: oneshot::Receiver<Permit>,
    settled: bool,
}

impl Wait<'_> {
    fn time_out(&mut self, ask: &Ask) -> Result<Permit, Shed> {
        self.settled = true;
        let mut q = self.sched.lock();
        if let Some(level) = q.remove(self.level, self.tenant, self.id) {
            self.sched.waiting.fetch_sub(1, Ordering::SeqCst);
            let released = self.sched.released.load(Ordering::Relaxed);
            let drain = q.drain.sample(Instant::now(), released);
            let part = self.sched.level_part(&self.sched.levels.load(), level);
            let st = &mut q.levels[level];
            st.tenants[self.tenant].shed_queue_timeout += 1;
            let retry_after = st.retry_after(drain, part, ask);
            return Err(Shed { reason: ShedReason::QueueTimeout, retry_after });
        }
        drop(q);
        // Not in the queue: it was granted as the deadline passed, and the permit was sent
        // under the lock we just held, so it is in the channel.
        self.rx.try_recv().map_err(|_| Shed { reason: ShedReason::QueueTimeout, retry_after: RETRY_AFTER_MIN })
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut q = self.sched.lock();
        if q.remove(self.level, self.tenant, self.id).is_some() {
            self.sched.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        // Otherwise a permit was already sent; `rx` drops right after this (without the lock
        // held) and the unreceived permit's own drop frees the slot.
    }
}

/// One granted bureau slot. Dropping it frees the slot and hands it to the next waiter.
#[must_use = "dropping a permit frees its slot at once"]
pub struct Permit {
    sched: Arc<Scheduler>,
    /// False only for a permit that bounced off a dropped waiter inside dispatch.
    armed: bool,
    /// What the adaptive controller noted at the grant (its phase, the calls in flight), so
    /// that the sample is read against the limit it was granted under.
    grant: Grant,
    /// The tenant whose `held` count includes this permit: set for grants from the queue (see
    /// [`TenantQueue::held`]), `None` for the lock-free grants made while nobody queued.
    holder: Option<usize>,
    /// The priority level slot it counts in.
    level: usize,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("armed", &self.armed).finish_non_exhaustive()
    }
}

impl Permit {
    fn new(sched: Arc<Scheduler>, level: usize) -> Permit {
        let grant = match sched.controller.load().as_ref() {
            // This permit already counts in `in_flight`. With replicas sharing the budget (Redis
            // backend) the controller sizes the whole budget, so this replica's concurrency
            // stands for its share of the total.
            Some(controller) => {
                let replicas = (sched.share.load(Ordering::Relaxed) & 0xffff_ffff).max(1) as usize;
                controller.grant(sched.in_flight.load(Ordering::Relaxed) * replicas)
            }
            None => Grant::default(),
        };
        Permit { sched, armed: true, grant, holder: None, level }
    }

    /// Frees the slot, reporting how the bureau call went: its `latency` and `signal` (a 5xx,
    /// timeout or connection error is [`Signal::Error`]; a 429 or a 503 with `Retry-After` is
    /// [`Signal::BackPressure`]; a 4xx the client caused is [`Signal::Ok`]). The sample feeds
    /// the adaptive controller, if one is installed. Dropping a permit instead frees the slot
    /// without a sample (e.g. the call never reached the bureau).
    pub fn complete(self, latency: Duration, signal: Signal) {
        let controller = self.sched.controller.load();
        if let Some(controller) = controller.as_ref() {
            if let Some(limit) = controller.observe(self.grant, latency, signal) {
                self.sched.set_limit(limit);
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed {
            self.sched.release(self.level, self.holder);
        }
    }
}

/// Replica `rank`'s part of `base` split among `replicas`: equal parts, the remainder to the
/// lowest ranks, at least 1.
fn share_of(base: usize, rank: usize, replicas: usize) -> usize {
    let replicas = replicas.max(1);
    let part = base / replicas + usize::from(rank < base % replicas);
    part.max(1)
}

/// Everything behind the queue lock: one fair-queuing [`State`] per priority level slot, and
/// the drain rate.
struct Queues {
    levels: Vec<State>,
    drain: DrainRate,
    /// Waiter ids, increasing across levels, so each tenant's queue is sorted by id and a
    /// waiter moved to another level is still found by its id.
    next_id: u64,
}

impl Queues {
    fn new(now: Instant) -> Queues {
        Queues {
            levels: (0..MAX_LEVELS).map(|_| State::new()).collect(),
            drain: DrainRate { at: now, released: 0, per_sec: None },
            next_id: 0,
        }
    }

    /// The level a slot freed under `limit` goes to, with `total` calls in flight (that one
    /// included): by the level rules among the levels in force ([`levels::choose`]), else a
    /// level no longer in force that still has waiters (it drains on what is left over).
    fn level_for(&self, table: &LevelTable, held: &[usize; MAX_LEVELS], total: usize, limit: usize) -> Option<usize> {
        let waiting: [usize; MAX_LEVELS] = std::array::from_fn(|l| self.levels[l].queued);
        if !table.is_split() {
            let only = table.order()[0];
            if waiting[only] > 0 {
                return Some(only);
            }
        } else if let Some(level) = levels::choose(table, &table.seats(limit), held, &waiting, total, limit) {
            return Some(level);
        }
        (0..MAX_LEVELS).find(|&l| waiting[l] > 0 && !table.contains(l))
    }

    /// The level waiter `id` of `tenant` is queued in, looking in `level` first (a reload may
    /// have moved it); `None` if it is no longer queued (granted or shed).
    fn find(&self, level: usize, tenant: usize, id: u64) -> Option<usize> {
        let queued = |l: usize| {
            self.levels[l].tenants.get(tenant).is_some_and(|t| t.waiters.binary_search_by_key(&id, |w| w.id).is_ok())
        };
        (0..MAX_LEVELS).map(|i| (level + i) % MAX_LEVELS).find(|&l| queued(l))
    }

    /// Removes waiter `id` of `tenant`, looking in `level` first (a reload may have moved it to
    /// another); the level it was in, or `None` if it is no longer queued (granted).
    fn remove(&mut self, level: usize, tenant: usize, id: u64) -> Option<usize> {
        if self.levels[level].remove(tenant, id) {
            return Some(level);
        }
        (0..MAX_LEVELS).find(|&l| l != level && self.levels[l].remove(tenant, id))
    }

    /// When all queues together are full: the `(level, tenant)` whose newest waiter makes room
    /// for `ask`. Less important levels make room first (the longest queue of the least
    /// important level with waiters below `ask`'s); within `ask`'s own level the longest queue,
    /// if it is longer than the asker's by more than one. `None`: the asker is refused.
    fn make_room(&self, table: &LevelTable, ask: &Ask) -> Option<(usize, usize)> {
        let rank = |l: usize| table.order().iter().position(|&o| o == l).unwrap_or(usize::MAX);
        let mine = rank(ask.level);
        let mut below: Vec<usize> = (0..MAX_LEVELS).filter(|&l| self.levels[l].queued > 0 && rank(l) > mine).collect();
        below.sort_by_key(|&l| std::cmp::Reverse(rank(l)));
        if let Some(&level) = below.first() {
            return self.levels[level].longest_queue().map(|(tenant, _)| (level, tenant));
        }
        let st = &self.levels[ask.level];
        let own = st.tenants.get(ask.tenant).map_or(0, |t| t.waiters.len());
        st.longest_queue().filter(|&(_, len)| len > own + 1).map(|(tenant, _)| (ask.level, tenant))
    }
}

/// The virtual service of a request of `cost` at `weight`: `cost / weight` in fixed point.
fn service(cost: u32, weight: u32) -> u128 {
    u128::from(cost.max(1)) * VTIME_SCALE / u128::from(weight.max(1))
}

/// One start-time fair queue over flows: the groups of a priority level (a tenant in no group
/// is a group of its own), or the members of one group. The flows' own state ([`Flow`]) lives
/// with them; this holds the lists and the virtual clock.
#[derive(Default)]
struct Sfq {
    /// Sparse flows, FIFO, served before the heap: each arrived with nothing queued and a
    /// finish tag at most one request ahead of `vtime`. Entries are `(start tag, ticket, flow)`;
    /// one whose ticket is not the flow's current one, or whose flow emptied by cancellations,
    /// is dropped when popped.
    sparse: VecDeque<(u128, u64, usize)>,
    /// Backlogged flows, by the virtual start tag of their next request; ties go to the earlier
    /// entry. Entries are `(tag, ticket, flow)`, stale ones dropped when popped.
    heap: BinaryHeap<Reverse<(u128, u64, usize)>>,
    /// Virtual time: the start tag of the last grant from the heap. Every heap tag is >= it.
    vtime: u128,
    /// Ticket of the last list or heap entry, increasing: the heap's tie-breaker too.
    seq: u64,
    /// Sum of the weights of the flows with something queued.
    active_weight: u64,
    /// The largest finish tag charged: where the virtual time goes when a busy period ends
    /// ([`GroupQueue::idle`]).
    max_finish: u128,
}

/// A flow's place in its [`Sfq`]. A flow has at most one current entry (its `ticket`), so a
/// stale entry never grants twice, and at most one stale entry per flow lingers.
#[derive(Default)]
struct Flow {
    /// Virtual finish tag of its last grant.
    finish: u128,
    listed: Listed,
    /// The ticket of its current entry (valid while `listed` is not `Idle`).
    ticket: u64,
    /// The weight counted in the queue's `active_weight` while it has waiters, 0 while not.
    active_weight: u32,
}

/// Where a flow's current entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Listed {
    /// No current entry: nothing queued and the last entry was popped.
    #[default]
    Idle,
    /// In `Sfq::sparse`.
    Sparse,
    /// In `Sfq::heap`.
    Heap,
}

/// An entry popped or picked from an [`Sfq`]: whose, its ticket, its start tag, and whether it
/// came from the heap (whose grants move the virtual time).
#[derive(Clone, Copy)]
struct Pick {
    flow: usize,
    ticket: u64,
    start: u128,
    from_heap: bool,
}

impl Sfq {
    /// Counts `flow` (index `id`) active at `weight`, its first request costing `cost`, and
    /// lists it: sparse if it is within its share (its last finish tag at most that request's
    /// virtual service ahead of the virtual time), else in the heap at max(vtime, finish), so
    /// idling banks no credit. The one request of slack absorbs a quiet flow's random bunching;
    /// a flow sending above its share has a finish tag that runs further ahead.
    fn activate(&mut self, flow: &mut Flow, id: usize, weight: u32, cost: u32) {
        flow.active_weight = weight.max(1);
        self.active_weight += u64::from(flow.active_weight);
        let start = self.vtime.max(flow.finish);
        let sparse = flow.finish <= self.vtime + service(cost, weight);
        match (flow.listed, sparse) {
            // A stale entry whose flow emptied by cancellations: the flow keeps its place. A
            // sparse entry stays sparse (`finish` has not moved, `vtime` only grows); a heap
            // entry's tag is already max(vtime then, finish), and `finish` is still ahead.
            (Listed::Sparse, _) | (Listed::Heap, false) => {}
            // Idle, or a stale heap entry of a flow that has become sparse (the new ticket
            // makes the old entry stale).
            (_, true) => {
                self.seq += 1;
                flow.ticket = self.seq;
                flow.listed = Listed::Sparse;
                self.sparse.push_back((start, self.seq, id));
            }
            (Listed::Idle, false) => self.push_heap(flow, id, start),
        }
    }

    fn push_heap(&mut self, flow: &mut Flow, id: usize, tag: u128) {
        self.seq += 1;
        flow.ticket = self.seq;
        flow.listed = Listed::Heap;
        self.heap.push(Reverse((tag, self.seq, id)));
    }

    /// `flow` has nothing queued any more: its weight leaves at once (so that estimates see
    /// only flows that compete); its entry stays, dropped when popped.
    fn deactivate(&mut self, flow: &mut Flow) {
        self.active_weight -= u64::from(flow.active_weight);
        flow.active_weight = 0;
    }

    /// Charges `flow` a grant of `cost` at `weight` picked at `pick`, and relists it in the
    /// heap if it still has waiters (a flow with a backlog is not sparse), else idles it. With
    /// `forgive` (a down probe's quiet flow) the finish tag stops one request past the virtual
    /// time: the slots the probe withholds slow the virtual time, and a quiet flow must not
    /// lose its standing for a shortfall the bureau does not have.
    fn charge(&mut self, flow: &mut Flow, pick: Pick, cost: u32, weight: u32, more: bool, forgive: bool) {
        if pick.from_heap {
            self.vtime = self.vtime.max(pick.start);
        }
        let start = pick.start.max(flow.finish);
        flow.finish = start + service(cost, weight);
        if forgive {
            flow.finish = flow.finish.min(self.vtime + service(cost, weight));
        }
        self.max_finish = self.max_finish.max(flow.finish);
        if more {
            self.push_heap(flow, pick.flow, flow.finish);
        } else {
            flow.listed = Listed::Idle;
            self.deactivate(flow);
        }
    }

    /// Whether `entry` (ticket `ticket`) is `flow`'s current one.
    fn current(flow: &Flow, ticket: u64) -> bool {
        flow.listed != Listed::Idle && flow.ticket == ticket
    }

    /// The current entries, sparse ones first (in order), then the heap's (in no order).
    fn entries(&self) -> impl Iterator<Item = Pick> + '_ {
        let sparse = self.sparse.iter().map(|&(start, ticket, flow)| Pick { flow, ticket, start, from_heap: false });
        let heap =
            self.heap.iter().map(|&Reverse((start, ticket, flow))| Pick { flow, ticket, start, from_heap: true });
        sparse.chain(heap)
    }
}

/// One priority level's fair queuing: groups, then the tenants of each group (hierarchical
/// start-time fair queuing, group then tenant, each by weight and sparse-first). A tenant in no
/// group is a group of one. Tenant groups share one weight: a member surging alone gets all of
/// it, members surging together divide it by their weights.
struct State {
    /// The groups with a waiter (and those with stale entries), by flow index
    /// ([`Ask::group_flow`]).
    top: Sfq,
    /// Indexed by flow index; grown on first use.
    groups: Vec<GroupQueue>,
    /// Indexed by tenant index; grown on first use of an index.
    tenants: Vec<TenantQueue>,
    /// Waiters in all its tenants' queues.
    queued: usize,
}

/// A group at the top of a level: its place there, and the fair queue of its members.
#[derive(Default)]
struct GroupQueue {
    flow: Flow,
    members: Sfq,
    /// Waiters of the tenants listed under it.
    queued: usize,
}

impl GroupQueue {
    /// Its last waiter left: the members' busy period ends, and their virtual time moves to
    /// the largest finish tag charged (SFQ's rule at the end of a busy period), so that a
    /// member that comes back within its share is sparse again inside the group. Without it a
    /// group of one (a tenant in no group), whose own grants never move its members' clock,
    /// would drift into its own heap after a couple of requests.
    fn idle(&mut self) {
        self.members.vtime = self.members.vtime.max(self.members.max_finish);
    }
}

#[derive(Default)]
struct TenantQueue {
    waiters: VecDeque<Waiter>,
    /// Its place in its group's fair queue.
    flow: Flow,
    /// The group flow it is queued under: set when its queue becomes non-empty, kept until it
    /// empties (a reload that moves it to another group applies from its next backlog).
    group: usize,
    /// Permits granted from the queue and not yet released: the slots the tenant holds under
    /// contention. A down probe's extra slots and forgiveness go only to a tenant below its
    /// weighted share of the cruise limit ([`State::within_share`]). Grants made while nobody
    /// queued are not counted: they predate the contention and end within a bureau call.
    held: u32,
    granted_after_wait: u64,
    shed_queue_full: u64,
    shed_queue_timeout: u64,
    shed_queue_full_total: u64,
}

impl TenantQueue {
    /// Whether entry `ticket` in `group`'s lists is `t`'s live one (current, with a waiter).
    /// An entry is current only in the group the tenant is queued under (tickets are per
    /// group); a current one whose queue cancellations emptied is idled, as it is dropped.
    fn settle(t: &mut TenantQueue, group: usize, ticket: u64) -> bool {
        if t.group == group && Sfq::current(&t.flow, ticket) {
            if !t.waiters.is_empty() {
                return true;
            }
            t.flow.listed = Listed::Idle;
        }
        false
    }
}

struct Waiter {
    id: u64,
    /// The tenant's weight within its group (its own weight for a group of one).
    weight: u32,
    /// Its group's flow index and weight.
    group: usize,
    group_weight: u32,
    cost: u32,
    tx: oneshot::Sender<Permit>,
}

impl State {
    fn new() -> State {
        State { top: Sfq::default(), groups: Vec::new(), tenants: Vec::new(), queued: 0 }
    }

    fn tenant(&mut self, tenant: usize) -> &mut TenantQueue {
        if tenant >= self.tenants.len() {
            self.tenants.resize_with(tenant + 1, TenantQueue::default);
        }
        &mut self.tenants[tenant]
    }

    /// Appends waiter `id` to its tenant's queue; lists the tenant (and its group) if idle.
    fn push(&mut self, id: u64, ask: &Ask, tx: oneshot::Sender<Permit>) {
        let waiter = Waiter {
            id,
            weight: ask.weight.max(1),
            group: ask.group_flow(),
            group_weight: ask.group_weight(),
            cost: ask.cost.max(1),
            tx,
        };
        self.insert(ask.tenant, waiter);
    }

    /// Puts a waiter in `tenant`'s queue in id order (one moved from a removed level may be
    /// older than those queued here); lists the tenant in its group, and the group at the top,
    /// if they were idle.
    fn insert(&mut self, tenant: usize, waiter: Waiter) {
        let (weight, cost, group_weight) = (waiter.weight, waiter.cost, waiter.group_weight);
        self.tenant(tenant);
        if waiter.group >= self.groups.len() {
            self.groups.resize_with(waiter.group + 1, GroupQueue::default);
        }
        let t = &mut self.tenants[tenant];
        if t.waiters.is_empty() && t.group != waiter.group {
            // Queued under another group from now on (a reload moved it): it starts there as
            // a newcomer; its entries in the old group's lists are stale (`t.group` differs).
            t.flow = Flow::default();
            t.group = waiter.group;
        }
        let at = t.waiters.partition_point(|w| w.id < waiter.id);
        t.waiters.insert(at, waiter);
        self.queued += 1;
        let g = &mut self.groups[t.group];
        if t.waiters.len() == 1 {
            g.members.activate(&mut t.flow, tenant, weight, cost);
        }
        g.queued += 1;
        if g.queued == 1 {
            self.top.activate(&mut g.flow, t.group, group_weight, cost);
        }
    }

    /// Takes every waiter out, with its tenant, in each tenant's order; leaves the level empty
    /// (finish tags and held permits stay).
    fn take_all(&mut self) -> Vec<(usize, Waiter)> {
        let mut out = Vec::with_capacity(self.queued);
        for (tenant, t) in self.tenants.iter_mut().enumerate() {
            t.flow.listed = Listed::Idle;
            t.flow.active_weight = 0;
            out.extend(t.waiters.drain(..).map(|w| (tenant, w)));
        }
        for g in &mut self.groups {
            g.flow.listed = Listed::Idle;
            g.flow.active_weight = 0;
            g.queued = 0;
            g.members.sparse.clear();
            g.members.heap.clear();
            g.members.active_weight = 0;
        }
        self.top.sparse.clear();
        self.top.heap.clear();
        self.top.active_weight = 0;
        self.queued = 0;
        out
    }

    /// Removes and returns the waiter served next: the oldest sparse group's, else the one
    /// start-time fair queuing picks among the backlogged groups; within the group, the oldest
    /// sparse member's, else the backlogged member's with the smallest tag.
    /// During a down probe, a sparse tenant that already holds its share of the cruise limit
    /// comes after the backlogged ones (else, forgiven and so still sparse, it would take the
    /// slots under the probe's limit too).
    fn pop_next(&mut self, probe: Option<usize>) -> Option<(usize, Waiter)> {
        self.pop_sparse(probe, probe.is_some())
            .or_else(|| self.pop_backlogged(probe))
            .or_else(|| self.pop_sparse(probe, false))
    }

    /// During a down probe whose cruise limit is `cruise`: whether `tenant` holds fewer slots
    /// than its weighted share of it (its group's share among the groups that queue, its own
    /// within the group). Only such a tenant is served above the probe's limit and forgiven the
    /// withheld slots; one that holds more (all its calls in flight, asking again as each
    /// returns) would otherwise take every slot the probe withholds from the backlogged ones.
    fn within_share(&self, tenant: usize, cruise: usize) -> bool {
        let t = &self.tenants[tenant];
        let g = &self.groups[t.group];
        let weight = u128::from(t.flow.active_weight.max(1));
        let members = u128::from(g.members.active_weight).max(weight);
        let group_weight = u128::from(g.flow.active_weight.max(1));
        let groups = u128::from(self.top.active_weight).max(group_weight);
        u128::from(t.held) * members * groups < cruise as u128 * weight * group_weight
    }

    /// The member of `group` served next: the oldest sparse one, else the backlogged one with
    /// the smallest tag. Stale entries met on the way are dropped.
    fn pick_member(&mut self, group: usize) -> Option<Pick> {
        let g = &mut self.groups[group];
        while let Some(&(start, ticket, flow)) = g.members.sparse.front() {
            if TenantQueue::settle(&mut self.tenants[flow], group, ticket) {
                return Some(Pick { flow, ticket, start, from_heap: false });
            }
            g.members.sparse.pop_front();
        }
        while let Some(&Reverse((start, ticket, flow))) = g.members.heap.peek() {
            if TenantQueue::settle(&mut self.tenants[flow], group, ticket) {
                return Some(Pick { flow, ticket, start, from_heap: true });
            }
            g.members.heap.pop();
        }
        None
    }

    /// Whether `pick` is a current entry of a member of `group` with a waiter.
    fn live_member(&self, group: usize, pick: &Pick) -> bool {
        let t = &self.tenants[pick.flow];
        Sfq::current(&t.flow, pick.ticket) && t.group == group && !t.waiters.is_empty()
    }

    /// Whether `pick` is a current entry at the top of a group with a waiter.
    fn live_group(&self, pick: &Pick) -> bool {
        let g = &self.groups[pick.flow];
        Sfq::current(&g.flow, pick.ticket) && g.queued > 0
    }

    /// During a down probe, the head waiter of the backlogged group's member with the
    /// smallest tags among those with at most [`LIGHT_QUEUE`] waiters within their share. Such
    /// a tenant is not surging: it fell into the heap through random bunching near its share,
    /// and the slots a probe withholds must not come from it. A scan over the backlogged
    /// groups and their members, only while a probe is on. The entries it bypasses become
    /// stale (their tickets change) and are dropped when popped.
    fn pop_light(&mut self, probe: Option<usize>) -> Option<(usize, Waiter)> {
        let cruise = probe?;
        let mut best: Option<(Pick, Pick)> = None;
        for top in self.top.entries().filter(|p| p.from_heap && self.live_group(p)) {
            for member in self.groups[top.flow].members.entries() {
                let light = (1..=LIGHT_QUEUE).contains(&self.tenants[member.flow].waiters.len());
                if !light || !self.live_member(top.flow, &member) || !self.within_share(member.flow, cruise) {
                    continue;
                }
                let key = |(t, m): &(Pick, Pick)| (t.start, t.ticket, m.start, m.ticket);
                if best.as_ref().is_none_or(|b| key(&(top, member)) < key(b)) {
                    best = Some((top, member));
                }
            }
        }
        let (top, member) = best?;
        Some(self.grant(top, member, false))
    }

    /// The oldest sparse group's next waiter (with `within`, the first sparse group with a
    /// sparse member within its share of a probe's cruise limit). During a down probe a tenant
    /// within its share ([`State::within_share`]) is forgiven the withheld slots ([`Sfq::charge`]).
    fn pop_sparse(&mut self, probe: Option<usize>, within: bool) -> Option<(usize, Waiter)> {
        if within {
            let cruise = probe?;
            let found = self.top.sparse.iter().enumerate().find_map(|(at, &(start, ticket, flow))| {
                let top = Pick { flow, ticket, start, from_heap: false };
                if !self.live_group(&top) {
                    return None;
                }
                let member = self.groups[flow]
                    .members
                    .sparse
                    .iter()
                    .map(|&(start, ticket, flow)| Pick { flow, ticket, start, from_heap: false })
                    .find(|m| self.live_member(top.flow, m) && self.within_share(m.flow, cruise))?;
                Some((at, top, member))
            });
            let (at, top, member) = found?;
            self.top.sparse.remove(at);
            // Within its share: forgiven the withheld slots.
            return Some(self.grant(top, member, true));
        }
        loop {
            let (start, ticket, flow) = self.top.sparse.pop_front()?;
            let top = Pick { flow, ticket, start, from_heap: false };
            if let Some(granted) = self.grant_next_of(top, probe) {
                return Some(granted);
            }
        }
    }

    /// The waiter start-time fair queuing picks among the backlogged groups.
    fn pop_backlogged(&mut self, probe: Option<usize>) -> Option<(usize, Waiter)> {
        while let Some(Reverse((start, ticket, flow))) = self.top.heap.pop() {
            let top = Pick { flow, ticket, start, from_heap: true };
            if let Some(granted) = self.grant_next_of(top, probe) {
                return Some(granted);
            }
        }
        None
    }

    /// Grants the next member's head waiter of the group of entry `top` (just taken off its
    /// list), if the entry is current and the group has a waiter; else idles a current entry.
    fn grant_next_of(&mut self, top: Pick, probe: Option<usize>) -> Option<(usize, Waiter)> {
        let g = &mut self.groups[top.flow];
        if !Sfq::current(&g.flow, top.ticket) {
            return None;
        }
        if g.queued == 0 {
            g.flow.listed = Listed::Idle;
            return None;
        }
        let Some(member) = self.pick_member(top.flow) else {
            // Unreachable: a group with waiters has a current entry for each member that has
            // some. Idle it rather than loop on it.
            debug_assert!(false, "a group with waiters has a member to serve");
            self.groups[top.flow].flow.listed = Listed::Idle;
            return None;
        };
        let forgive = probe.is_some_and(|cruise| !top.from_heap && self.within_share(member.flow, cruise));
        Some(self.grant(top, member, forgive))
    }

    /// Pops the head waiter of tenant `member` in group `top` and charges both: the tenant in
    /// its group's fair queue at its weight, the group at the top at the group's weight (a
    /// group of one: the same weight twice). Each is relisted in its heap while it has waiters.
    /// The entries passed are current (the caller checked) and taken off their lists, or
    /// bypassed (their tickets change here, so they are dropped when popped).
    fn grant(&mut self, top: Pick, member: Pick, forgive: bool) -> (usize, Waiter) {
        let g = &mut self.groups[top.flow];
        let t = &mut self.tenants[member.flow];
        let waiter = t.waiters.pop_front().expect("a live member has a waiter");
        // Off its list when it is the head (a bypassed entry elsewhere goes stale).
        if member.from_heap {
            if g.members.heap.peek().is_some_and(|Reverse((_, ticket, _))| *ticket == member.ticket) {
                g.members.heap.pop();
            }
        } else if let Some(at) = g.members.sparse.iter().position(|&(_, ticket, _)| ticket == member.ticket) {
            g.members.sparse.remove(at);
        }
        self.queued -= 1;
        g.queued -= 1;
        let more = !t.waiters.is_empty();
        g.members.charge(&mut t.flow, member, waiter.cost, waiter.weight, more, forgive);
        let more = g.queued > 0;
        if !more {
            g.idle();
        }
        self.top.charge(&mut g.flow, top, waiter.cost, waiter.group_weight, more, forgive);
        (member.flow, waiter)
    }

    /// Removes waiter `id` from `tenant`'s queue; false if it is no longer queued (granted).
    fn remove(&mut self, tenant: usize, id: u64) -> bool {
        self.take(tenant, id).is_some()
    }

    /// Takes waiter `id` out of `tenant`'s queue; `None` if it is no longer queued (granted).
    fn take(&mut self, tenant: usize, id: u64) -> Option<Waiter> {
        let t = self.tenants.get_mut(tenant)?;
        let at = t.waiters.binary_search_by_key(&id, |w| w.id).ok()?;
        let waiter = t.waiters.remove(at)?;
        self.queued -= 1;
        let g = &mut self.groups[t.group];
        g.queued -= 1;
        // The entries stay (dropped when popped); the weights leave at once so that
        // Retry-After estimates see only the flows that compete.
        if t.waiters.is_empty() {
            g.members.deactivate(&mut t.flow);
        }
        if g.queued == 0 {
            g.idle();
            self.top.deactivate(&mut g.flow);
        }
        Some(waiter)
    }

    /// The active tenant with the most waiters, and how many (active ones only: those listed
    /// in a listed group, so the scan is over the tenants that compete, not all configured).
    fn longest_queue(&self) -> Option<(usize, usize)> {
        self.top
            .entries()
            .flat_map(|g| self.groups[g.flow].members.entries())
            .map(|m| (m.flow, self.tenants[m.flow].waiters.len()))
            .max_by_key(|&(_, len)| len)
            .filter(|&(_, len)| len > 0)
    }

    /// Drops `tenant`'s newest waiter (its sender goes unsent: the waiter is told it was shed).
    fn drop_newest(&mut self, tenant: usize) -> bool {
        let Some(id) = self.tenants[tenant].waiters.back().map(|w| w.id) else { return false };
        self.remove(tenant, id)
    }

    /// How long until `ask`'s tenant's queue, plus one more request, has drained, when the
    /// bureau frees `drain` slots a second and this level's nominal part of them is `part`.
    fn retry_after(&self, drain: Option<f64>, part: f64, ask: &Ask) -> Duration {
        let Some(total_per_sec) = drain.map(|d| d * part) else {
            // Nothing measured yet: no evidence the bureau is slow, and the next shed will
            // have a measured rate.
            return RETRY_AFTER_MIN;
        };
        let secs = self.drain_secs(total_per_sec, ask);
        if !secs.is_finite() || secs >= RETRY_AFTER_MAX.as_secs_f64() {
            return RETRY_AFTER_MAX;
        }
        Duration::from_secs(secs.ceil() as u64).max(RETRY_AFTER_MIN)
    }

    /// Seconds until `ask`'s tenant's queue, plus one more request, has drained when this level
    /// frees `per_sec` slots a second: under contention the tenant drains at its weighted share
    /// of them, its group's share among the active groups times its own within the group (more
    /// if the others use less: fair queuing is work-conserving, so this errs long, never
    /// short). Shared by `Retry-After` and [`Scheduler::estimated_wait`].
    fn drain_secs(&self, per_sec: f64, ask: &Ask) -> f64 {
        let (queued, own) = self.tenants.get(ask.tenant).map_or((0, 0), |t| (t.waiters.len(), t.flow.active_weight));
        let group =
            self.tenants.get(ask.tenant).filter(|t| !t.waiters.is_empty()).map_or(ask.group_flow(), |t| t.group);
        let (members, group_own) =
            self.groups.get(group).map_or((0, 0), |g| (g.members.active_weight, g.flow.active_weight));
        let weight = ask.weight.max(1);
        let members = members + if own == 0 { u64::from(weight) } else { 0 };
        let group_weight = ask.group_weight();
        let groups = self.top.active_weight + if group_own == 0 { u64::from(group_weight) } else { 0 };
        let share = f64::from(weight) / members as f64 * f64::from(group_weight) / groups as f64;
        (queued + 1) as f64 / (per_sec * share.min(1.0))
    }

    /// Whether `ask` would be sparse at both levels if it were queued now.
    fn would_be_sparse(&self, ask: &Ask) -> bool {
        let (queued, finish) = self.tenants.get(ask.tenant).map_or((0, 0), |t| (t.waiters.len(), t.flow.finish));
        let group = ask.group_flow();
        let (g_queued, g_finish, g_vtime) =
            self.groups.get(group).map_or((0, 0, 0), |g| (g.queued, g.flow.finish, g.members.vtime));
        queued == 0
            && finish <= g_vtime + service(ask.cost, ask.weight)
            && g_queued == 0
            && g_finish <= self.top.vtime + service(ask.cost, ask.group_weight())
    }
}

/// Slots freed per second, as an EWMA over irregular samples.
struct DrainRate {
    at: Instant,
    released: u64,
    per_sec: Option<f64>,
}

impl DrainRate {
    /// Folds in the releases since the last sample (if at least `DRAIN_SAMPLE_MIN` ago) and
    /// returns the estimate; `None` until anything was measured.
    fn sample(&mut self, now: Instant, released: u64) -> Option<f64> {
        let dt = now.saturating_duration_since(self.at);
        let count = released.saturating_sub(self.released) as f64;
        if dt >= DRAIN_SAMPLE_MIN {
            let dt = dt.as_secs_f64();
            let instant = count / dt;
            // Weight by elapsed time, so that a long quiet gap counts for more than a blip.
            let alpha = 1.0 - (-dt / DRAIN_TAU_SECS).exp();
            self.per_sec = Some(self.per_sec.map_or(instant, |old| old + alpha * (instant - old)));
            self.at = now;
            self.released = released;
        } else if self.per_sec.is_none() && count > 0.0 && !dt.is_zero() {
            // Before the first full sample, a provisional rate beats none.
            return Some(count / dt.as_secs_f64());
        }
        self.per_sec
    }
}

#[cfg(test)]
mod tests;

//! Stage: identical look-ups in flight at the same time share one bureau call.
//!
//! In a surge the same look-up often arrives several times within the few milliseconds a bureau
//! call takes (a loan flow's steps, client retries); a cache cannot help, since nothing has come
//! back yet to store. Here the first such request leads: its bureau call runs in a task of its
//! own, and the identical requests that arrive while it runs follow, receiving the same status,
//! headers and body (a shared `Bytes`), or the same error. "Identical" is decided by the
//! [`CacheKey`], which carries the tenant unless the route is shared: a follower only ever gets
//! an answer fetched for its own tenant.
//!
//! Why a task and not the leader's own future (as moka's `get_with` does): if the leading client
//! goes away or times out, its future is dropped, and with it a call that others are waiting for;
//! they would start over and call the bureau again, in the middle of a surge. Here nobody's
//! cancellation reaches the call, every waiter (the leader's request included) waits with its own
//! deadline, and the flight is removed from the map when the call ends, on every path (a guard,
//! so a panicking call cannot leave waiters stuck behind it).
//!
//! A flight queues for its bureau slot at the most important priority level among the requests
//! waiting for it ([`FlightLevels`]): an interactive look-up that joins a batch pre-screen's
//! identical call still queued raises the call to interactive (it is re-queued there, keeping
//! its queue deadline; it is never sent twice), and it falls back when that look-up leaves.
//!
//! The in-flight map is sharded by key: a mutex per shard is held only to look up, insert or
//! remove a flight, never across an `.await`.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use bureau_guard::cache::coalesce::{Coalescer, Role};
//! # use bureau_guard::cache::store::Fetched;
//! # use bureau_guard::cache::key::CacheKey;
//! # async fn demo(key: CacheKey) {
//! let coalescer = Coalescer::new();
//! let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
//! let result = coalescer
//!     .run(key, 0, deadline, std::time::Duration::from_secs(5), |_interest| async {
//!         // Owns everything it needs: runs even if this request is gone.
//!         Ok(Arc::new(Fetched::new(http::StatusCode::OK, http::HeaderMap::new(), "report".into())))
//!     })
//!     .await;
//! if let Ok((answer, Role::Follower)) = result { /* not charged: no bureau call of its own */ }
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::bureau::scheduler::MAX_LEVELS;
use crate::cache::key::CacheKey;
use crate::cache::store::Fetched;
use crate::respond::{ErrorKind, ProxyError};

/// Shards of the in-flight map: enough that concurrent look-ups rarely meet on one mutex.
const SHARDS: usize = 64;

/// What a shared bureau call ends with.
pub type FetchResult = Result<Arc<Fetched>, ProxyError>;

/// Whether a request made the bureau call or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its bureau call: it is charged the quota, and its answer may fill the cache.
    Leader,
    /// Received another request's answer: no bureau call of its own, so no charge.
    Follower,
}

/// Why a request got no answer from a shared call.
#[derive(Debug, Clone)]
pub enum CoalesceError {
    /// The bureau call failed; everyone waiting on it gets this same error.
    Fetch(ProxyError),
    /// This request's deadline passed first; the call goes on for the others (and the cache).
    Timeout,
    /// The call ended without an answer: its task panicked or the runtime is shutting down.
    Abandoned,
}

impl From<CoalesceError> for ProxyError {
    fn from(e: CoalesceError) -> ProxyError {
        match e {
            CoalesceError::Fetch(err) => err,
            CoalesceError::Timeout => ProxyError::new(ErrorKind::RequestTimeout, "no answer from the bureau in time"),
            CoalesceError::Abandoned => {
                ProxyError::new(ErrorKind::BureauBadResponse, "the bureau call ended without an answer")
            }
        }
    }
}

/// Where a flight is: what its waiters watch.
#[derive(Clone)]
enum Stage {
    /// Waiting for a bureau slot.
    Queued,
    /// At the bureau since this instant: each waiter gives it `respond_within` from then.
    Sent(Instant),
    /// Ended with this result.
    Done(FetchResult),
}

/// One bureau call that identical requests can join by subscribing, and the priority levels of
/// those waiting for it.
#[derive(Clone)]
struct Flight {
    tx: watch::Sender<Stage>,
    levels: FlightLevels,
}

type Shard = Mutex<HashMap<CacheKey, Flight>>;

/// The priority level slots of the requests waiting for one flight (each counted while it
/// waits), which the flight's call watches while it is queued: it queues at the most important
/// of them.
#[derive(Clone)]
pub struct FlightLevels(Arc<LevelCounts>);

struct LevelCounts {
    /// Waiters per level slot.
    counts: [std::sync::atomic::AtomicUsize; MAX_LEVELS],
    /// Bumped at each join and leave, so a watcher never misses a change.
    changed: watch::Sender<u64>,
}

impl FlightLevels {
    fn new() -> FlightLevels {
        FlightLevels(Arc::new(LevelCounts {
            counts: std::array::from_fn(|_| std::sync::atomic::AtomicUsize::new(0)),
            changed: watch::Sender::new(0),
        }))
    }

    /// Counts a waiter in `level` until the returned guard drops.
    fn join(&self, level: usize) -> LevelGuard {
        let level = level.min(MAX_LEVELS - 1);
        self.0.counts[level].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.changed.send_modify(|v| *v += 1);
        LevelGuard { levels: self.clone(), level }
    }

    /// The most important level slot with a waiter, by `order` (slots most important first);
    /// a slot no longer in `order` (its level was removed) ranks last. `None`: nobody waits.
    pub fn best(&self, order: &[usize]) -> Option<usize> {
        let waiting = |s: usize| self.0.counts[s].load(std::sync::atomic::Ordering::SeqCst) > 0;
        order.iter().copied().find(|&s| waiting(s)).or_else(|| (0..MAX_LEVELS).find(|&s| waiting(s)))
    }

    /// Resolves at the next join or leave after the last one this watcher saw (never, once
    /// the flight has ended).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.0.changed.subscribe()
    }
}

/// One waiter's place in [`FlightLevels`].
struct LevelGuard {
    levels: FlightLevels,
    level: usize,
}

impl Drop for LevelGuard {
    fn drop(&mut self) {
        self.levels.0.counts[self.level].fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.levels.0.changed.send_modify(|v| *v += 1);
    }
}

/// The in-flight map. One per process, shared by every snapshot; cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    shards: Arc<[Shard]>,
    /// Flights run as tasks of this tracker, so that shutdown can wait for them.
    tracker: TaskTracker,
}

/// The leader's view of who still waits for its flight, handed to the fetch.
pub struct Interest {
    coalescer: Coalescer,
    key: CacheKey,
    tx: watch::Sender<Stage>,
    levels: FlightLevels,
}

impl Interest {
    /// Resolves once every request waiting for the flight has gone (disconnected or past its
    /// deadline). The flight is then out of the map: nobody can join it any more, so a fetch
    /// that stops here (still queued for a bureau slot) leaves no one without an answer.
    pub async fn gone(&self) {
        loop {
            self.tx.closed().await;
            let mut map = self.coalescer.shard(&self.key);
            // Re-checked under the lock: a request may have joined since `closed` resolved.
            if self.tx.receiver_count() == 0 {
                if map.get(&self.key).is_some_and(|f| f.tx.same_channel(&self.tx)) {
                    map.remove(&self.key);
                }
                return;
            }
        }
    }

    /// Whether any request still waits for the answer.
    pub fn waiting(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// The priority levels of the requests waiting for the flight: while queued, the call
    /// queues at the most important.
    pub fn levels(&self) -> FlightLevels {
        self.levels.clone()
    }

    /// The call is at the bureau from now on: waiters give it their `respond_within` from now.
    pub fn sent(&self) {
        self.tx.send_replace(Stage::Sent(Instant::now()));
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::with_tracker(TaskTracker::new())
    }

    /// A coalescer whose flights run as tasks of `tracker`.
    pub fn with_tracker(tracker: TaskTracker) -> Coalescer {
        Coalescer { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), tracker }
    }

    /// Answers the look-up `key` for a request of priority level slot `level`: joins the call
    /// in flight for it, or starts one with `make_fetch` (called at most once, only when
    /// leading). Waits until `deadline` at most; counts in the flight's [`FlightLevels`] while
    /// it waits.
    ///
    /// The future `make_fetch` returns runs in a spawned task, detached from this request: it
    /// must own all it needs (request parts, body, quota reservation, the scheduler permit it
    /// acquires), must end on its own (its own timeouts: nobody cancels it), and should fill the
    /// cache before it returns, so that requests arriving after the flight ends find the answer.
    /// It is given the flight's [`Interest`]: a fetch still queued for a bureau slot when
    /// everyone has gone should stop there (it costs nothing yet); one already at the bureau
    /// should run to its end. A follower drops `make_fetch` uncalled as soon as it joins.
    pub async fn run<F, Fut>(
        &self,
        key: CacheKey,
        level: usize,
        deadline: Instant,
        respond_within: Duration,
        make_fetch: F,
    ) -> Result<(Arc<Fetched>, Role), CoalesceError>
    where
        F: FnOnce(Interest) -> Fut,
        Fut: Future<Output = FetchResult> + Send + 'static,
    {
        let (rx, role, _counted) = {
            let mut map = self.shard(&key);
            match map.get(&key) {
                Some(flight) => {
                    // Not needed, and what it owns (a quota reservation, say) is released now.
                    drop(make_fetch);
                    (flight.tx.subscribe(), Role::Follower, flight.levels.join(level))
                }
                None => {
                    let (tx, rx) = watch::channel(Stage::Queued);
                    let levels = FlightLevels::new();
                    // Counted before the call starts, so that it queues at this level.
                    let counted = levels.join(level);
                    map.insert(key, Flight { tx: tx.clone(), levels: levels.clone() });
                    drop(map);
                    // The guard exists before the task, so that even a task that never runs
                    // (the runtime shutting down) removes the flight when it is dropped.
                    let interest = Interest { coalescer: self.clone(), key, tx: tx.clone(), levels };
                    let guard = FlightGuard { coalescer: self.clone(), key, tx };
                    let fetch = make_fetch(interest);
                    self.tracker.spawn(async move {
                        let result = fetch.await;
                        // Published first, then removed (the guard's drop): a request that finds
                        // the flight in between gets this answer at once, a later one starts anew.
                        guard.tx.send_replace(Stage::Done(result));
                    });
                    (rx, Role::Leader, counted)
                }
            }
        };
        wait(rx, deadline, respond_within).await.map(|answer| (answer, role))
    }

    /// Bureau calls in flight now (takes each shard's lock briefly: for metrics, not the request path).
    pub fn in_flight(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Requests waiting on the call in flight for `key`, its leader's included (0: none in flight).
    pub fn waiting(&self, key: &CacheKey) -> usize {
        self.shard(key).get(key).map_or(0, |f| f.tx.receiver_count())
    }

    /// Requests waiting on all calls in flight, leaders included (takes each shard's lock
    /// briefly: for metrics and tests, not the request path).
    pub fn waiting_total(&self) -> usize {
        self.shards.iter().map(|s| lock(s).values().map(|f| f.tx.receiver_count()).sum::<usize>()).sum()
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, HashMap<CacheKey, Flight>> {
        // A keyed hash is uniform: its first byte spreads keys over the shards.
        lock(&self.shards[usize::from(key.as_bytes()[0]) % SHARDS])
    }
}

/// A shard's lock. A panic cannot leave a map half-changed (each critical section is one
/// `get`/`insert`/`remove`), so a poisoned lock is still sound to use.
fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<CacheKey, Flight>> {
    shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits for the flight's result until `deadline`, or `respond_within` after the call was
/// sent, whichever comes first.
async fn wait(
    mut rx: watch::Receiver<Stage>,
    mut deadline: Instant,
    respond_within: Duration,
) -> Result<Arc<Fetched>, CoalesceError> {
    loop {
        match &*rx.borrow_and_update() {
            Stage::Done(Ok(answer)) => return Ok(answer.clone()),
            Stage::Done(Err(err)) => return Err(CoalesceError::Fetch(err.clone())),
            Stage::Sent(at) => deadline = deadline.min(*at + respond_within),
            Stage::Queued => {}
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Err(_) => return Err(CoalesceError::Timeout),
            // Every sender is gone without a result: the task was dropped before finishing.
            Ok(Err(_)) => return Err(CoalesceError::Abandoned),
            Ok(Ok(())) => {}
        }
    }
}

/// The leader's side of a flight: publishes through `tx`, and removes the flight from the map
/// when dropped (the call ended, panicked, or its task was dropped unfinished).
struct FlightGuard {
    coalescer: Coalescer,
    key: CacheKey,
    tx: watch::Sender<Stage>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut map = self.coalescer.shard(&self.key);
        // Only this flight: never a later one under the same key.
        if map.get(&self.key).is_some_and(|f| f.tx.same_channel(&self.tx)) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Poll;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use tokio::sync::{Notify, Semaphore};

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn answer(body: &'static str) -> Arc<Fetched> {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        Arc::new(Fetched::new(StatusCode::OK, h, Bytes::from_static(body.as_bytes())))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// A bureau stand-in: counts calls; each call answers once released.
    #[derive(Clone)]
    struct Bureau {
        calls: Arc<AtomicUsize>,
        answers: Arc<Semaphore>,
    }

    impl Default for Bureau {
        fn default() -> Self {
            Bureau { calls: Arc::default(), answers: Arc::new(Semaphore::new(0)) }
        }
    }

    impl Bureau {
        fn fetch(&self, result: FetchResult) -> impl Future<Output = FetchResult> + Send + use<> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answers = self.answers.clone();
            async move {
                answers.acquire().await.expect("never closed").forget();
                result
            }
        }

        /// Lets `n` calls answer.
        fn release(&self, n: usize) {
            self.answers.add_permits(n);
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    type Run = Pin<Box<dyn Future<Output = Result<(Arc<Fetched>, Role), CoalesceError>> + Send>>;

    /// A request entering the coalescer with `deadline`; its call (if it leads) answers `result`.
    fn request(c: &Coalescer, b: &Bureau, deadline: Instant, result: FetchResult) -> Run {
        let (c, b) = (c.clone(), b.clone());
        Box::pin(async move { c.run(key(1), 0, deadline, HOUR, |_| b.fetch(result)).await })
    }

    /// Polls `run` once: enough to lead (insert the flight, spawn the call) or to join, both of
    /// which happen before `run` first waits. No timing involved.
    async fn enter(run: &mut Run) {
        std::future::poll_fn(|cx| {
            assert!(run.as_mut().poll(cx).is_pending(), "the call has not answered yet");
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_flights_level_is_its_most_important_waiters_and_follows_joins_and_leaves() {
        let levels = FlightLevels::new();
        let mut changes = levels.watch();
        let order = [2, 0, 1];
        assert_eq!(levels.best(&order), None);
        let batch = levels.join(1);
        assert_eq!(levels.best(&order), Some(1));
        let urgent = levels.join(2);
        assert!(changes.has_changed().unwrap(), "a join is seen");
        assert_eq!(levels.best(&order), Some(2));
        changes.borrow_and_update();
        drop(urgent);
        assert!(changes.has_changed().unwrap(), "a leave is seen");
        assert_eq!(levels.best(&order), Some(1));
        // A slot whose level was removed ranks last.
        let removed = levels.join(5);
        assert_eq!(levels.best(&order), Some(1));
        drop(batch);
        assert_eq!(levels.best(&order), Some(5));
        drop(removed);
        assert_eq!(levels.best(&order), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_hundred_identical_lookups_make_one_bureau_call() {
        let c = Coalescer::new();
        let bureau = Bureau::default();
        let start = Arc::new(tokio::sync::Barrier::new(200));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (c, bureau, start) = (c.clone(), bureau.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    c.run(key(1), 0, far(), HOUR, |_| bureau.fetch(Ok(answer("report")))).await
                })
            })
            .collect();
        // Hold the bureau's answer until all 200 wait on the same call.
        while c.waiting(&key(1)) < 200 {
            tokio::task::yield_now().await;
        }
        bureau.release(1);
        let mut leaders = 0;
        for t in tasks {
            let (resp, role) = t.await.unwrap().unwrap();
            assert_eq!(resp.body, "report");
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(bureau.calls(), 1, "exactly one bureau call");
        assert_eq!(leaders, 1);
        assert_eq!(c.in_flight(), 0, "the flight is gone once it ended");
    }

    #[tokio::test]
    async fn followers_get_the_same_answer_without_a_copy() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let mut leader = request(&c, &bureau, far(), Ok(answer("report")));
        let mut follower = request(&c, &bureau, far(), Ok(answer("a second call")));
        enter(&mut leader).await;
        enter(&mut follower).await;
        assert_eq!(c.waiting(&key(1)), 2);
        bureau.release(1);
        let (a, ra) = leader.await.unwrap();
        let (b, rb) = follower.await.unwrap();
        assert_eq!((ra, rb), (Role::Leader, Role::Follower));
        assert!(Arc::ptr_eq(&a, &b), "one answer, shared");
        assert_eq!(b.status, StatusCode::OK);
        assert_eq!(b.headers["content-type"], "application/json");
        assert_eq!(bureau.calls(), 1);
    }

    #[tokio::test]
    async fn a_follower_releases_what_its_fetch_owned_when_it_joins() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let mut leader = request(&c, &bureau, far(), Ok(answer("report")));
        enter(&mut leader).await;
        // Stands for the follower's quota reservation: refunded on drop.
        let reservation = Arc::new(());
        let held = reservation.clone();
        let (c1, b1) = (c.clone(), bureau.clone());
        let mut follower: Run = Box::pin(async move {
            c1.run(key(1), 0, far(), HOUR, move |_| {
                let _owned = held;
                b1.fetch(Ok(answer("never")))
            })
            .await
        });
        enter(&mut follower).await;
        assert_eq!(Arc::strong_count(&reservation), 1, "released before the answer arrives");
        bureau.release(1);
        assert_eq!(follower.await.unwrap().1, Role::Follower);
        leader.await.unwrap();
    }

    #[tokio::test]
    async fn different_keys_do_not_share() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let (c1, b1, c2, b2) = (c.clone(), bureau.clone(), c.clone(), bureau.clone());
        let mut a: Run = Box::pin(async move { c1.run(key(1), 0, far(), HOUR, |_| b1.fetch(Ok(answer("a")))).await });
        let mut b: Run = Box::pin(async move { c2.run(key(2), 0, far(), HOUR, |_| b2.fetch(Ok(answer("b")))).await });
        enter(&mut a).await;
        enter(&mut b).await;
        assert_eq!(c.in_flight(), 2);
        bureau.release(2);
        assert_eq!(a.await.unwrap(), (answer("a"), Role::Leader));
        assert_eq!(b.await.unwrap(), (answer("b"), Role::Leader));
        assert_eq!(bureau.calls(), 2);
    }

    /// Answers compare by status and body in `assert_eq!`.
    impl PartialEq for Fetched {
        fn eq(&self, other: &Fetched) -> bool {
            self.status == other.status && self.body == other.body
        }
    }

    #[tokio::test]
    async fn the_call_survives_its_leader_going_away() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let mut leader = request(&c, &bureau, far(), Ok(answer("report")));
        enter(&mut leader).await;
        let mut followers: Vec<Run> = (0..5).map(|_| request(&c, &bureau, far(), Ok(answer("again")))).collect();
        for f in &mut followers {
            enter(f).await;
        }
        // The leader's client disconnects: hyper drops the request's future.
        drop(leader);
        assert_eq!(c.in_flight(), 1, "the call goes on");
        bureau.release(1);
        for f in followers {
            assert_eq!(f.await.unwrap(), (answer("report"), Role::Follower));
        }
        assert_eq!(bureau.calls(), 1, "nobody called the bureau again");
    }

    #[tokio::test]
    async fn the_call_goes_on_with_nobody_waiting_and_ends() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let mut leader = request(&c, &bureau, far(), Ok(answer("report")));
        enter(&mut leader).await;
        drop(leader);
        bureau.release(1);
        // The detached call still finishes (and would fill the cache); then its flight is gone.
        while c.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(bureau.calls(), 1);
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_waiter_once() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let err = ProxyError::new(ErrorKind::BureauTimeout, "the bureau did not answer within 5s");
        let mut waiters: Vec<Run> = (0..10).map(|_| request(&c, &bureau, far(), Err(err.clone()))).collect();
        for w in &mut waiters {
            enter(w).await;
        }
        bureau.release(1);
        for w in waiters {
            match w.await {
                Err(CoalesceError::Fetch(e)) => {
                    assert_eq!(e.kind, ErrorKind::BureauTimeout);
                    assert_eq!(ProxyError::from(CoalesceError::Fetch(e)).kind, ErrorKind::BureauTimeout);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(bureau.calls(), 1, "the error is shared, not retried by each waiter");
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn each_waiter_keeps_its_own_deadline_and_the_call_goes_on() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        let start = Instant::now();
        let mut impatient = request(&c, &bureau, start + Duration::from_secs(1), Ok(answer("late")));
        let mut patient = request(&c, &bureau, start + Duration::from_secs(10), Ok(answer("x")));
        enter(&mut impatient).await;
        enter(&mut patient).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(impatient.await, Err(CoalesceError::Timeout)), "its own deadline");
        assert_eq!(c.in_flight(), 1, "the call is still in flight");
        enter(&mut patient).await;
        bureau.release(1);
        assert_eq!(patient.await.unwrap(), (answer("late"), Role::Follower));
        assert_eq!(bureau.calls(), 1);
        assert_eq!(ProxyError::from(CoalesceError::Timeout).kind, ErrorKind::RequestTimeout);
    }

    #[tokio::test]
    async fn the_flight_ends_with_the_call_and_a_second_wave_calls_again() {
        let (c, bureau) = (Coalescer::new(), Bureau::default());
        for wave in 1..=2 {
            let mut waiters: Vec<Run> = (0..3).map(|_| request(&c, &bureau, far(), Ok(answer("r")))).collect();
            for w in &mut waiters {
                enter(w).await;
            }
            bureau.release(1);
            for w in waiters {
                w.await.unwrap();
            }
            assert_eq!(c.in_flight(), 0);
            assert_eq!(bureau.calls(), wave);
        }
        // After a failure too.
        let r = c
            .run(key(1), 0, far(), HOUR, |_| async { Err(ProxyError::new(ErrorKind::BureauUnreachable, "down")) })
            .await;
        assert!(matches!(r, Err(CoalesceError::Fetch(_))));
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_panicking_call_releases_its_waiters() {
        let c = Coalescer::new();
        let release = Arc::new(Notify::new());
        let (c1, r1) = (c.clone(), release.clone());
        let mut waiter: Run = Box::pin(async move {
            c1.run(key(1), 0, far(), HOUR, |_| async move {
                r1.notified().await;
                panic!("a bug in the fetch");
            })
            .await
        });
        enter(&mut waiter).await;
        release.notify_one();
        assert!(matches!(waiter.await, Err(CoalesceError::Abandoned)));
        assert_eq!(c.in_flight(), 0, "the guard removed the flight");
        let r = c.run(key(1), 0, far(), HOUR, |_| async { Ok(answer("fine")) }).await.unwrap();
        assert_eq!(r, (answer("fine"), Role::Leader));
    }
}

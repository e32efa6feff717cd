//! The open connections: how many, from where, and which one to close when there is no room.
//!
//! Every socket costs a descriptor, and descriptors are finite: a thousand silent sockets under
//! a limit of 1024 make `accept` fail for every bank. So the listener admits at most
//! `server.max_connections`, and at most `server.max_connections_per_source` from one address.
//! When full, a new connection takes the place of the one that costs banks least: first a
//! connection that has not yet sent a complete request head (not yet identified: a silent
//! socket, a slow handshake), the oldest first; then the connection idle the longest. A
//! connection with a request in flight is never chosen; if every one is busy the newcomer is
//! refused.
//!
//! The table is locked at accept and close only. On the request path a connection's state is
//! a few atomics ([`Activity`]) that its service wrapper ([`Tracked`]) updates.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::client_addr::{TrustedProxies, canonical};
use crate::respond::Body;

/// Why a connection was refused or closed by the listener, as one bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` reached and every connection busy.
    Full,
    /// `max_connections_per_source` reached for this address.
    PerSource,
    /// A PROXY header from an untrusted peer, or a trusted one's missing or invalid.
    ProxyHeader,
}

impl Refused {
    pub const ALL: [Refused; 3] = [Refused::Full, Refused::PerSource, Refused::ProxyHeader];

    pub const fn as_str(self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::PerSource => "per_source",
            Refused::ProxyHeader => "proxy_header",
        }
    }
}

/// Why the listener closed a connection it had admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No complete request head within `header_read_timeout` of accept (PROXY header, TLS
    /// handshake and protocol preface included).
    HeaderTimeout,
    /// No request for `idle_timeout`.
    Idle,
    /// Made room for a new connection (it was not yet identified, or idle).
    Evicted,
}

impl Closed {
    pub const ALL: [Closed; 3] = [Closed::HeaderTimeout, Closed::Idle, Closed::Evicted];

    pub const fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::Idle => "idle",
            Closed::Evicted => "evicted",
        }
    }
}

/// The listener's metric handles (registered for the proxy listener, unexported for others).
#[derive(Clone)]
pub struct ConnMetrics {
    /// Connections admitted and open now.
    pub open: IntGauge,
    /// The `max_connections` in force.
    pub max: IntGauge,
    refused: [IntCounter; Refused::ALL.len()],
    closed: [IntCounter; Closed::ALL.len()],
    pub accept_errors: IntCounter,
    /// Connections open now by the worker thread that accepted them (`server.workers`): how
    /// evenly the kernel spreads them.
    pub per_worker: IntGaugeVec,
}

fn per_worker() -> IntGaugeVec {
    IntGaugeVec::new(
        Opts::new(
            "bureau_guard_worker_connections",
            "Client connections open now, by the worker thread that accepted them (none on the shared runtime, server.workers = 0).",
        ),
        &["worker"],
    )
    .expect("valid metric")
}

impl ConnMetrics {
    /// Registers `bureau_guard_connections`, `..._max`, `..._refused_total{reason}`,
    /// `..._closed_total{reason}` and `bureau_guard_accept_errors_total`.
    pub fn register(registry: &Registry) -> ConnMetrics {
        let refused = IntCounterVec::new(
            Opts::new(
                "bureau_guard_connections_refused_total",
                "Connections closed at accept, by reason (full, per_source, proxy_header).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let closed = IntCounterVec::new(
            Opts::new(
                "bureau_guard_connections_closed_total",
                "Admitted connections the listener closed, by reason (header_timeout, idle, evicted).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let m = ConnMetrics {
            open: IntGauge::new("bureau_guard_connections", "Client connections open now.").expect("valid metric"),
            max: IntGauge::new("bureau_guard_connections_max", "server.max_connections in force.")
                .expect("valid metric"),
            refused: Refused::ALL.map(|r| refused.with_label_values(&[r.as_str()])),
            closed: Closed::ALL.map(|c| closed.with_label_values(&[c.as_str()])),
            accept_errors: IntCounter::new(
                "bureau_guard_accept_errors_total",
                "Failed accepts (EMFILE and friends: the descriptor limit is reached).",
            )
            .expect("valid metric"),
            per_worker: per_worker(),
        };
        for c in [
            Box::new(m.open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.max.clone()),
            Box::new(refused),
            Box::new(closed),
            Box::new(m.accept_errors.clone()),
            Box::new(m.per_worker.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Handles exported nowhere (the admin listener, the mock bureau).
    pub fn unregistered() -> ConnMetrics {
        let c = |name: &str| IntCounter::new(name, "unexported").expect("valid name");
        ConnMetrics {
            open: IntGauge::new("open", "unexported").expect("valid name"),
            max: IntGauge::new("max", "unexported").expect("valid name"),
            refused: Refused::ALL.map(|r| c(r.as_str())),
            closed: Closed::ALL.map(|r| c(r.as_str())),
            accept_errors: c("accept_errors"),
            per_worker: per_worker(),
        }
    }

    /// The gauge of worker `worker` (1-based), created at start so its series exists from zero.
    pub fn worker(&self, worker: usize) -> IntGauge {
        self.per_worker.with_label_values(&[&worker.to_string()])
    }

    pub fn refused(&self, r: Refused) {
        self.refused[r as usize].inc();
    }

    pub fn closed(&self, c: Closed) {
        self.closed[c as usize].inc();
    }
}

/// What one connection is doing, shared by its task, its service and the table.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    /// Requests being answered now.
    in_flight: AtomicUsize,
    /// A complete request head has arrived at least once.
    identified: AtomicBool,
    /// Milliseconds after `accepted` at which `in_flight` last dropped to zero.
    idle_since_ms: AtomicU64,
    evicted: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            identified: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            evicted: Notify::new(),
        }
    }

    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    pub fn identified(&self) -> bool {
        self.identified.load(Ordering::Acquire)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// When the connection last became idle; `None` while busy.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.busy() {
            return None;
        }
        Some(self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }

    /// Resolves once the table has chosen this connection to make room (at once if it has).
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }

    fn begin(self: &Arc<Self>) -> RequestActive {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.identified.store(true, Ordering::Release);
        RequestActive(self.clone())
    }
}

/// A request in flight on its connection: the connection is busy while one lives.
struct RequestActive(Arc<Activity>);

impl Drop for RequestActive {
    fn drop(&mut self) {
        let a = &self.0;
        // Stored before the decrement: whoever sees the connection idle sees a fresh time.
        let ms = a.accepted.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        a.idle_since_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's service, marking it identified and busy while it answers.
#[derive(Clone)]
pub struct Tracked<S> {
    pub inner: S,
    pub activity: Arc<Activity>,
}

impl<S> tower::Service<Request<Incoming>> for Tracked<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        // Not boxed: the request's future (a few KiB) is moved once less and allocated once less.
        TrackedFuture { active: Some(self.activity.begin()), inner: self.inner.call(req) }
    }
}

pin_project_lite::pin_project! {
    /// A request's future that keeps its connection busy until it has answered.
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        active: Option<RequestActive>,
    }
}

impl<F: Future> Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.active.take();
        Poll::Ready(out)
    }
}

/// `server.max_connections` and `max_connections_per_source`, with the open connections.
pub struct Connections {
    max: usize,
    per_source: usize,
    /// Their connections are many clients' (a load balancer): not limited per source.
    exempt: TrustedProxies,
    table: Mutex<Table>,
    pub metrics: ConnMetrics,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
    by_source: HashMap<IpAddr, usize>,
}

struct Entry {
    source: IpAddr,
    /// Counted in `by_source` (not from a trusted proxy).
    counted: bool,
    activity: Arc<Activity>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if entry.counted {
            self.uncount(entry.source);
        }
        Some(entry)
    }

    fn uncount(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// The connection to close to make room: not yet identified (oldest accepted) before idle
    /// (idle longest); never a busy one.
    fn victim(&self) -> Option<u64> {
        let unidentified = self
            .open
            .iter()
            .filter(|(_, e)| !e.activity.identified() && !e.activity.busy())
            .min_by_key(|(_, e)| e.activity.accepted)
            .map(|(id, _)| *id);
        unidentified.or_else(|| {
            self.open
                .iter()
                .filter_map(|(id, e)| e.activity.idle_since().map(|t| (*id, t)))
                .min_by_key(|(_, t)| *t)
                .map(|(id, _)| id)
        })
    }
}

impl Connections {
    /// `max` connections at once (at least 1), `per_source` from one address (at least 1).
    pub fn new(max: usize, per_source: usize, exempt: TrustedProxies, metrics: ConnMetrics) -> Arc<Connections> {
        metrics.max.set(i64::try_from(max).unwrap_or(i64::MAX));
        Arc::new(Connections {
            max: max.max(1),
            per_source: per_source.max(1),
            exempt,
            table: Mutex::default(),
            metrics,
        })
    }

    /// No limits: for listeners that are not exposed to banks (admin, the mock bureau).
    pub fn unlimited() -> Arc<Connections> {
        Connections::new(usize::MAX, usize::MAX, TrustedProxies::default(), ConnMetrics::unregistered())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent: a panic elsewhere cannot tear it.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `source`, closing another to make room if needed.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refused> {
        let source = canonical(source);
        let counted = !self.exempt.contains(source);
        let mut t = self.lock();
        if counted && t.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Err(Refused::PerSource);
        }
        if t.open.len() >= self.max {
            let Some(id) = t.victim() else { return Err(Refused::Full) };
            let victim = t.remove(id).expect("the victim is in the table");
            // notify_one keeps a permit: the task sees it even if it is not waiting yet.
            victim.activity.evicted.notify_one();
            self.metrics.closed(Closed::Evicted);
        }
        let id = t.next_id;
        t.next_id += 1;
        let activity = Arc::new(Activity::new());
        t.open.insert(id, Entry { source, counted, activity: activity.clone() });
        if counted {
            *t.by_source.entry(source).or_insert(0) += 1;
        }
        self.metrics.open.set(t.open.len() as i64);
        drop(t);
        let worker = match crate::server::workers::current() {
            0 => None,
            n => Some(self.metrics.worker(n)),
        };
        if let Some(g) = &worker {
            g.inc();
        }
        Ok(Slot { id, conns: self.clone(), activity, worker })
    }
}

/// A connection's place in the table, given back when dropped.
pub struct Slot {
    id: u64,
    conns: Arc<Connections>,
    pub activity: Arc<Activity>,
    /// The accepting worker's gauge (`None` off the worker threads).
    worker: Option<IntGauge>,
}

impl Slot {
    /// The client turned out to be `source` (a trusted proxy's PROXY header): count it there.
    pub fn rebind(&self, source: IpAddr) -> Result<(), Refused> {
        let source = canonical(source);
        let counted = !self.conns.exempt.contains(source);
        let mut t = self.conns.lock();
        let Some(entry) = t.open.get(&self.id) else { return Ok(()) }; // evicted meanwhile
        let (old, was_counted) = (entry.source, entry.counted);
        if counted && t.by_source.get(&source).copied().unwrap_or(0) >= self.conns.per_source {
            return Err(Refused::PerSource);
        }
        if was_counted {
            t.uncount(old);
        }
        if counted {
            *t.by_source.entry(source).or_insert(0) += 1;
        }
        let entry = t.open.get_mut(&self.id).expect("checked above");
        entry.source = source;
        entry.counted = counted;
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        t.remove(self.id);
        self.conns.metrics.open.set(t.open.len() as i64);
        if let Some(g) = &self.worker {
            g.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_oldest_unidentified_goes_first_then_the_longest_idle_never_a_busy_one() {
        let conns = Connections::new(3, 10, TrustedProxies::default(), ConnMetrics::unregistered());
        let busy = conns.admit(ip("10.0.0.1")).unwrap();
        let _request = busy.activity.begin();
        tokio::time::advance(Duration::from_secs(1)).await;
        let idle = conns.admit(ip("10.0.0.2")).unwrap();
        drop(idle.activity.begin());
        tokio::time::advance(Duration::from_secs(1)).await;
        let silent = conns.admit(ip("10.0.0.3")).unwrap();

        let fourth = conns.admit(ip("10.0.0.4")).unwrap();
        tokio::time::timeout(Duration::from_millis(1), silent.activity.evicted()).await.expect("silent one evicted");
        drop(fourth.activity.begin()); // identified, idle now: idle shorter than `idle`
        tokio::time::advance(Duration::from_secs(1)).await;
        let fifth = conns.admit(ip("10.0.0.5")).unwrap();
        tokio::time::timeout(Duration::from_millis(1), idle.activity.evicted()).await.expect("longest idle evicted");
        let sixth = conns.admit(ip("10.0.0.6")).unwrap();
        let evicted = tokio::time::timeout(Duration::from_millis(1), fifth.activity.evicted()).await;
        evicted.expect("not yet identified before idle");
        // Left: busy, fourth, sixth. All busy: nobody can be evicted, the newcomer is refused.
        let _b4 = fourth.activity.begin();
        let _b6 = sixth.activity.begin();
        assert_eq!(conns.admit(ip("10.0.0.7")).err(), Some(Refused::Full));
        assert!(tokio::time::timeout(Duration::from_millis(1), busy.activity.evicted()).await.is_err());
    }

    #[test]
    fn per_source_limit_counts_the_client_not_its_trusted_proxy() {
        let blocks = vec![super::super::client_addr::Cidr::parse("10.0.0.0/8").unwrap()];
        let trusted = TrustedProxies { blocks, forwarded_for: false };
        let conns = Connections::new(100, 2, trusted, ConnMetrics::unregistered());
        let _a = conns.admit(ip("192.0.2.1")).unwrap();
        let _b = conns.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(conns.admit(ip("192.0.2.1")).err(), Some(Refused::PerSource));
        let lb: Vec<_> = (0..5).map(|_| conns.admit(ip("10.1.1.1")).unwrap()).collect();
        assert_eq!(lb[0].rebind(ip("192.0.2.1")), Err(Refused::PerSource));
        lb[1].rebind(ip("192.0.2.9")).unwrap();
        drop(_a);
        lb[2].rebind(ip("192.0.2.1")).unwrap();
    }
}

//! `serve`: restore state, bind, run until told to stop, drain, persist. The config is already
//! validated when it gets here, so a bad config never binds a port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admission::quota::Windows;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StateBackend};
use crate::ops::admin::Admin;
use crate::proxy::Proxy;
use crate::runtime::Shared;
use crate::server::{self, ConnLimits};
use crate::state::file::{CounterStore, FileStore, LoadError, Loaded, SavedState};

/// A running proxy: its bound addresses and the means to stop it.
pub struct Running {
    /// Where bank traffic is served.
    pub addr: SocketAddr,
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    stop_persist: watch::Sender<bool>,
    /// `server.readiness_grace`: not ready, still accepting.
    grace: std::time::Duration,
    /// `server.drain_timeout`: the longest shutdown waits for requests and bureau calls.
    drain: std::time::Duration,
    proxy: Serving,
    admin_task: JoinHandle<bool>,
    persist_task: JoinHandle<()>,
}

/// Where the proxy's connections are served (`server.workers`).
enum Serving {
    /// On the runtime that started the proxy.
    Shared(JoinHandle<bool>),
    /// On worker threads of their own.
    Workers(server::workers::Workers),
}

/// The proxy's listening sockets, bound.
enum Listeners {
    Shared(TcpListener),
    /// One per worker thread, one `SO_REUSEPORT` group.
    Group(Vec<std::net::TcpListener>),
}

impl Listeners {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listeners::Shared(l) => l.local_addr(),
            Listeners::Group(ls) => ls[0].local_addr(),
        }
    }
}

/// Binds both listeners from `config` and starts serving. Port 0 picks a free port (tests).
pub async fn start(config: Config) -> std::io::Result<Running> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// [`start`] with an injected wall clock for quota windows (tests cross midnight with it).
pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> std::io::Result<Running> {
    start_with(config, Options { clock, config_path: None }).await
}

/// How to start, beyond the config.
pub struct Options {
    /// Wall clock for quota windows.
    pub clock: Arc<dyn Clock>,
    /// The file the config came from; `reload` re-reads it.
    pub config_path: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options { clock: Arc::new(SystemClock), config_path: None }
    }
}

/// [`start`] with [`Options`]. Opens the audit log (if any) and restores the saved counters
/// before binding anything; fails if either cannot be read.
pub async fn start_with(config: Config, options: Options) -> std::io::Result<Running> {
    let (listen, admin_listen) = (config.server.listen, config.admin.listen);
    let workers = config.server.workers.threads();
    let limits = ConnLimits {
        idle_timeout: config.server.idle_timeout,
        http2_keep_alive: Some((config.server.http2_keep_alive_interval, config.server.http2_keep_alive_timeout)),
        ..ConnLimits::for_max_header_bytes(config.server.max_header_bytes, config.server.header_read_timeout)
    };
    let nofile = server::nofile::current();
    let max_connections = config.server.max_connections.unwrap_or_else(|| {
        let bureau = config.upstream.max_concurrency as u64 + config.upstream.pool_max_idle as u64;
        server::nofile::default_max_connections(nofile, bureau)
    });
    let per_source =
        config.server.max_connections_per_source.unwrap_or_else(|| server::nofile::default_per_source(max_connections));
    if let Some(n) = nofile
        && max_connections as u64 + server::nofile::RESERVED > n
    {
        tracing::warn!(
            max_connections,
            nofile = n,
            "server.max_connections is close to or above the descriptor limit: accept may fail with EMFILE before the cap applies; raise the limit (LimitNOFILE=) or lower the cap"
        );
    }
    let proxy_protocol = match config.server.proxy_protocol {
        true => server::ProxyProtocol::From(config.server.trusted_proxies.clone()),
        false => server::ProxyProtocol::Off,
    };
    let drain = config.server.drain_timeout;
    let store = config.state.file.clone().map(FileStore::new);
    let flush_interval = config.state.flush_interval;
    let shared = Shared::build(config, options.clock, options.config_path)?;
    // Counters from the last run, before anything binds (and before the first request can touch
    // them): saved counters that cannot be read stop start-up here, since the first save would
    // overwrite them.
    if let Some(store) = &store {
        restore(&shared, store)?;
    } else if shared.redis.is_none() {
        tracing::warn!("state.file not set: quota counters are kept in memory only and restart from zero");
    }
    if let Some(redis) = &shared.redis {
        // Count this replica in before taking traffic, so its first requests already use its
        // share of the bureau budget. A Redis that is down is not fatal: on_unavailable applies.
        let joined = match redis.join().await {
            Ok(joined) => joined,
            Err(refused) => return Err(std::io::Error::other(refused)),
        };
        if joined {
            tracing::info!(
                replica = redis.replica_id(),
                replicas = redis.replicas(),
                "joined the replicas sharing limits through Redis"
            );
        } else {
            // The error itself was logged once, as the outage began.
            tracing::warn!(
                replica = redis.replica_id(),
                "no Redis at start-up; serving under state.redis.on_unavailable until a heartbeat succeeds"
            );
        }
    }
    let listener = match workers {
        0 => Listeners::Shared(TcpListener::bind(listen).await?),
        n => Listeners::Group(server::workers::bind_group(listen, n)?),
    };
    let admin_listener = TcpListener::bind(admin_listen).await?;
    let grace = shared.snapshot.load().config.server.readiness_grace;
    let conns = server::Connections::new(
        max_connections,
        per_source,
        shared.trusted_proxies.clone(),
        shared.metrics.connections.clone(),
    );
    tracing::info!(max_connections, max_connections_per_source = per_source, nofile = ?nofile, "connection limits");
    let edge = server::Edge { limits, tls: None, proxy_protocol, conns, drain_timeout: drain };
    start_on(shared, listener, admin_listener, Settings { edge, drain, store, flush_interval, grace })
}

/// What `start_on` needs beyond the shared state, fixed at start-up.
struct Settings {
    edge: server::Edge,
    drain: std::time::Duration,
    store: Option<FileStore>,
    flush_interval: std::time::Duration,
    grace: std::time::Duration,
}

/// Starts serving on bound listeners.
fn start_on(
    shared: Arc<Shared>,
    listener: Listeners,
    admin_listener: TcpListener,
    settings: Settings,
) -> std::io::Result<Running> {
    let Settings { mut edge, drain, store, flush_interval, grace } = settings;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr().expect("a bound listener has an address");
    shared.metrics.reload_last_success_timestamp_seconds.set(shared.clock.now_unix_ms() / 1000);

    let (stop, stopped) = watch::channel(false);
    let (stop_admin, admin_stopped) = watch::channel(false);
    // Counters are written one last time after the drain: requests finishing during it still charge.
    let (stop_persist, persist_stopped) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Each connection's service knows its addresses and, with TLS, the client certificate its
    // handshake verified.
    edge.tls = shared
        .tls_listener
        .as_ref()
        .map(|current| server::TlsListener { current: current.clone(), counters: shared.handshakes.clone() });
    let header_read_timeout = edge.limits.header_read_timeout;
    let proxy_shared = shared.clone();
    let make = move |peer: &server::Peer| {
        let proxy = Proxy::for_connection(proxy_shared.clone(), peer);
        tower::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        })
    };
    let proxy = match listener {
        Listeners::Shared(listener) => {
            Serving::Shared(tokio::spawn(server::serve_edge(listener, edge, make, wait(stopped.clone()))))
        }
        Listeners::Group(listeners) => {
            for worker in 1..=listeners.len() {
                shared.metrics.connections.worker(worker).set(0);
            }
            let make = Arc::new(make);
            let stopped = stopped.clone();
            let workers = server::workers::Workers::start(listeners, move |listener| {
                let make = make.clone();
                server::serve_edge(listener, edge.clone(), move |peer: &server::Peer| make(peer), wait(stopped.clone()))
            })?;
            tracing::info!(workers = workers.threads(), "serving on worker threads, one runtime and bureau pool each");
            Serving::Workers(workers)
        }
    };
    // The admin listener keeps answering /metrics and /readyz (false) while the proxy drains.
    let admin_limits = ConnLimits::for_max_header_bytes(16 * 1024, header_read_timeout);
    let admin_shared = shared.clone();
    let shared_for_persist = shared.clone();
    let admin_task = tokio::spawn(server::serve_edge(
        admin_listener,
        server::Edge::plain(admin_limits, drain),
        move |peer: &server::Peer| {
            let admin = Admin::new(admin_shared.clone(), Some(peer.addr.peer), admin_addr);
            tower::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.serve(req).await) }
            })
        },
        wait(admin_stopped),
    ));
    let persist_task = tokio::spawn(async move {
        tokio::join!(
            persist_loop(shared_for_persist.clone(), store, flush_interval, wait(persist_stopped.clone())),
            usage_loop(shared_for_persist.clone(), wait(persist_stopped.clone())),
            redis_loop(shared_for_persist, wait(persist_stopped)),
        );
    });
    if !admin_addr.ip().is_loopback() && !shared.snapshot.load().config.admin.auth.has_token() {
        tracing::warn!(%admin_addr, "the admin listener is reachable beyond this host and has no token: anyone who reaches it can reload, reset quotas and purge the cache; set admin.token_sha256 or admin.token_env instead of admin.insecure_no_token");
    }
    shared.ready.store(true, Ordering::Release);
    let tls = shared.snapshot.load().config.server.tls.as_ref().map_or("off", |t| t.client_auth.as_str());
    tracing::info!(%addr, %admin_addr, tls = shared.tls_listener.is_some(), client_auth = tls, "bureau-guard serving");
    for w in shared.snapshot.load().config.warnings() {
        tracing::warn!(warning = %w, "config warning");
    }
    Ok(Running {
        addr,
        admin_addr,
        shared,
        stop,
        stop_admin,
        stop_persist,
        grace,
        drain,
        proxy,
        admin_task,
        persist_task,
    })
}

impl Running {
    /// Readiness goes false first; then the proxy stops accepting and lets in-flight requests
    /// finish within the drain timeout (the admin listener keeps answering meanwhile), the
    /// counters are written one last time, and the admin listener closes. Returns whether every
    /// proxy connection closed in time.
    pub async fn shutdown(self) -> bool {
        self.shared.ready.store(false, Ordering::Release);
        if !self.grace.is_zero() {
            tracing::info!(grace = ?self.grace, "not ready; still accepting while load balancers notice");
            tokio::time::sleep(self.grace).await;
        }
        let _ = self.stop.send(true);
        let drain_deadline = tokio::time::Instant::now() + self.drain;
        let mut proxy = self.proxy;
        let proxy_drained = match &mut proxy {
            Serving::Shared(task) => task.await.unwrap_or(false),
            Serving::Workers(workers) => workers.drained().await,
        };
        // Bureau calls whose clients have gone, and coalesced flights, run on their own: wait for
        // them within the same drain timeout, so that their quota charges reach the final flush.
        self.shared.calls.close();
        if tokio::time::timeout_at(drain_deadline, self.shared.calls.wait()).await.is_err() {
            tracing::warn!(
                calls = self.shared.calls.len(),
                "bureau calls still running after the drain timeout; their charges made so far are saved"
            );
        }
        if let Serving::Workers(workers) = proxy {
            workers.release().await;
        }
        let _ = self.stop_persist.send(true);
        let _ = self.persist_task.await;
        if let Some(audit) = &self.shared.audit {
            audit.flush().await;
        }
        let _ = self.stop_admin.send(true);
        let _ = self.admin_task.await;
        proxy_drained
    }
}

/// Loads the saved counters into `shared`; an error if they exist but cannot be read (or a
/// corrupt file cannot be moved aside).
fn restore(shared: &Shared, store: &FileStore) -> Result<(), LoadError> {
    match store.load()? {
        Loaded::Empty => {
            tracing::info!(file = %store.path().display(), "no saved quota state; counters start from zero")
        }
        Loaded::Found(saved) => {
            shared.states.restore(&saved);
            tracing::info!(file = %store.path().display(), tenants = saved.tenants.len(), "quota counters restored");
        }
        Loaded::Corrupt { reason, moved_to } => {
            shared.metrics.state_load_errors_total.inc();
            tracing::error!(
                file = %store.path().display(),
                moved_to = %moved_to.display(),
                %reason,
                "quota state file is corrupt; it was moved aside and counters start from zero"
            );
        }
    }
    Ok(())
}

/// With the Redis backend: heartbeats, lease renewals and recovery every heartbeat interval;
/// on stop (after the drain), everything this replica holds goes back to Redis.
async fn redis_loop(shared: Arc<Shared>, stop: impl std::future::Future<Output = ()>) {
    let Some(redis) = shared.redis.clone() else { return };
    let StateBackend::Redis(settings) = &shared.snapshot.load().config.state.backend else { return };
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => break,
        }
        let snap = shared.snapshot.load_full();
        let now_ms = shared.clock.now_unix_ms();
        let w = Windows::at(now_ms, snap.config.quota.utc_offset);
        // Every contract: the tenants', their routes' and their groups'.
        let contracts = snap.tenants.contracts();
        // Tenants (and route or group limits) a reload removed: what they still hold goes back.
        let kept: std::collections::HashSet<&str> = contracts.iter().map(|c| &*c.id).collect();
        let retired: Vec<_> = shared
            .states
            .all()
            .into_iter()
            .chain(shared.states.all_contracts())
            .filter(|(id, _)| !kept.contains(id.as_str()))
            .collect();
        tokio::select! {
            () = redis.tick(contracts, &retired, &w, now_ms / 1000) => {}
            // Shutdown does not wait for a tick on a slow Redis (up to lease_ttl / 2): cutting
            // it is safe (a sync in flight is resent with its token by the release below; a
            // give-back cut in flight loses its units to the tenant, the safe side).
            () = &mut stop => break,
        }
    }
    let snap = shared.snapshot.load_full();
    let now_ms = shared.clock.now_unix_ms();
    let w = Windows::at(now_ms, snap.config.quota.utc_offset);
    redis.release_all(snap.tenants.contracts(), &w, now_ms / 1000).await;
}

/// Every `interval`, if anything changed, write the counters. On stop: one final write.
async fn persist_loop(
    shared: Arc<Shared>,
    store: Option<FileStore>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_saved: Option<SavedState> = None;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = &mut stop => true,
        };
        if let Some(store) = &store {
            let now = shared.states.snapshot();
            if last_saved.as_ref() == Some(&now) {
                // Nothing changed: the file on disk is current as of this tick.
                shared.metrics.state_last_save_timestamp_seconds.set(shared.clock.now_unix_ms() / 1000);
            } else {
                let s = store.clone();
                let to_save = now.clone();
                // fsync blocks: keep it off the runtime's worker threads.
                let result = tokio::task::spawn_blocking(move || s.save(&to_save)).await;
                match result {
                    Ok(Ok(())) => {
                        shared.metrics.state_last_save_timestamp_seconds.set(shared.clock.now_unix_ms() / 1000);
                        last_saved = Some(now);
                    }
                    Ok(Err(e)) => {
                        shared.metrics.state_save_errors_total.inc();
                        tracing::error!(file = %store.path().display(), error = %e, "cannot write quota state");
                    }
                    Err(e) => tracing::error!(error = %e, "quota state writer panicked"),
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// The last copy of usage to Redis at shutdown: a hung Redis must not hold the exit.
const FINAL_USAGE_COPY: Duration = Duration::from_secs(1);

/// Every `usage.flush_interval`: the usage counts to their day files (and, with Redis, the
/// totals that changed to Redis); once a day (and at start), the days past `usage.retention`
/// deleted. On stop (after the drain): one final flush.
async fn usage_loop(shared: Arc<Shared>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let interval = shared.snapshot.load().config.usage.flush_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned_on = None;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = &mut stop => true,
        };
        let today = crate::usage::day_at(shared.clock.now_unix_ms(), shared.snapshot.load().config.quota.utc_offset);
        let usage = shared.usage.clone();
        let prune = pruned_on != Some(today);
        // File appends and fsync block: off the runtime's worker threads.
        let result = tokio::task::spawn_blocking(move || {
            let removed = if prune { usage.prune(today) } else { 0 };
            usage.flush().map(|()| removed)
        })
        .await;
        match result {
            Ok(Ok(removed)) => {
                pruned_on = Some(today);
                if removed > 0 {
                    tracing::info!(days = removed, "usage days past usage.retention deleted");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write usage; the counts stay in memory and are retried"),
            Err(e) => tracing::error!(error = %e, "usage writer panicked"),
        }
        // With Redis: this flush's totals there too, one pipeline (kept and retried if not). A
        // copy never holds up a stop: cut (its pairs marked again), then one last try, bounded
        // (with `usage.dir` a restart copies what it missed).
        if let Some(redis) = &shared.redis {
            if stopping {
                let _ = tokio::time::timeout(FINAL_USAGE_COPY, shared.usage.ship(redis)).await;
                return;
            }
            tokio::select! {
                _ = shared.usage.ship(redis) => {}
                () = &mut stop => {
                    let _ = tokio::time::timeout(FINAL_USAGE_COPY, shared.usage.ship(redis)).await;
                    return;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

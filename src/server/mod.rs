//! The listener: accept connections, serve HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN
//! `h2` over TLS) on one port, and drain gracefully on shutdown. One accept loop serves plain
//! and TLS listeners alike (the proxy, the admin listener and the mock bureau).
//!
//! A connection costs a descriptor from accept on, so its first phase is bounded: from accept
//! to its first complete request head — PROXY header ([`proxy_protocol`]), TLS handshake,
//! protocol preface, head — it has `header_read_timeout`, then it is closed. hyper-util's auto
//! builder reads the preface with no timer at all, and hyper's own header timer starts only
//! after it, so this deadline is ours. After that, a connection with no request in flight for
//! `idle_timeout` is closed gracefully (h2 has no idle timer of its own; h1's keep-alive wait
//! is also bounded by hyper's header timer), and h2 connections are pinged so a dead peer is
//! noticed. [`conns`] caps the connections and chooses which to close when full;
//! [`client_addr`] says whom a connection is from; [`auth_failures`] holds off sources that
//! keep failing authentication.
//!
//! With TLS, the handshake runs in the connection's own task, never in the accept loop (one
//! slow client must not stall everyone's accepts). Each handshake takes the rustls config
//! current at that moment from an `ArcSwap`, so a reload's new certificates serve new
//! connections while open ones continue; a reload's new client verification is applied to open
//! connections as well (see [`tls::Listener::reload`]), and a connection ends when its client
//! certificate expires.
//!
//! Servers take an already-bound listener, so tests bind `127.0.0.1:0` and run in-process. The
//! loop follows hyper-util's graceful example: accept, `select!` on shutdown, watch each
//! connection, then drain with a timeout (an idle keep-alive client must not hold shutdown open).

pub(crate) mod auth_failures;
pub(crate) mod client_addr;
pub(crate) mod conns;
pub(crate) mod nofile;
pub mod proxy_protocol;
pub mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::either::Either;

use crate::clock::{Clock, SystemClock};
use crate::respond::Body;
use crate::tls::{self, ClientCert, HandshakeCounters};
pub use client_addr::{ClientAddr, TrustedProxies};
pub use conns::{Closed, ConnMetrics, Connections, Refused};
use proxy_protocol::{HeaderError, Prefixed};

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// From accept to the first complete request head (PROXY header, TLS handshake, preface
    /// included), and for each later head (hyper's timer): slowloris and silent sockets.
    pub header_read_timeout: Duration,
    /// Hard cap on a request head; the request path answers JSON 431 below it, hyper a bare 431 above.
    pub max_head_bytes: usize,
    /// A connection with no request in flight this long is closed gracefully.
    pub idle_timeout: Duration,
    /// h2 PING interval and how long a PONG may take before the connection is closed.
    pub http2_keep_alive: Option<(Duration, Duration)>,
}

impl ConnLimits {
    /// The hard caps for a configured `max_header_bytes`: twice that, so the JSON 431 of the
    /// request path answers everything but abuse; hyper's own floor is 8 KiB. Idle and
    /// keep-alive settings are the defaults (`config::defaults`).
    pub fn for_max_header_bytes(max_header_bytes: u64, header_read_timeout: Duration) -> ConnLimits {
        use crate::config::defaults;
        let cap = usize::try_from(max_header_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
        ConnLimits {
            header_read_timeout,
            max_head_bytes: cap.max(8192),
            idle_timeout: defaults::IDLE_TIMEOUT,
            http2_keep_alive: Some((defaults::HTTP2_KEEP_ALIVE_INTERVAL, defaults::HTTP2_KEEP_ALIVE_TIMEOUT)),
        }
    }
}

/// The listener's TLS: the current settings (swapped on reload) and the handshake counters.
#[derive(Clone)]
pub struct TlsListener {
    pub current: Arc<ArcSwap<tls::Listener>>,
    pub counters: HandshakeCounters,
}

/// Whether connections may start with a PROXY protocol header.
#[derive(Debug, Clone, Default)]
pub enum ProxyProtocol {
    /// Never expected; a connection that starts with one is served as whatever it sends.
    #[default]
    Off,
    /// Required from these peers (their client address is the header's); from anyone else a
    /// header refuses the connection.
    From(TrustedProxies),
}

/// How a listener treats its connections, beyond hyper's settings.
#[derive(Clone)]
pub struct Edge {
    pub limits: ConnLimits,
    /// `None`: plain HTTP.
    pub tls: Option<TlsListener>,
    pub proxy_protocol: ProxyProtocol,
    pub conns: Arc<Connections>,
    /// The most a graceful close (shutdown, idle, verification) waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Edge {
    /// Plain HTTP, no connection limits, no PROXY protocol: listeners banks do not reach.
    pub fn plain(limits: ConnLimits, drain_timeout: Duration) -> Edge {
        Edge { limits, tls: None, proxy_protocol: ProxyProtocol::Off, conns: Connections::unlimited(), drain_timeout }
    }
}

/// Who is on the other end of a connection, for its service.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: ClientAddr,
    /// The verified client certificate (mTLS), if it presented one.
    pub client_cert: Option<Arc<ClientCert>>,
}

/// Serves `service` on `listener` (plain, unlimited) until `shutdown` resolves, then gives open
/// connections up to `drain_timeout` to finish their requests. Returns whether the drain
/// completed in time.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> bool
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    serve_edge(listener, Edge::plain(limits, drain_timeout), move |_: &Peer| service.clone(), shutdown).await
}

/// The accept loop: admits each connection into `edge.conns` (or refuses it), and serves it in
/// its own task with a service made from its [`Peer`]. On `shutdown`, stops accepting, closes
/// every connection gracefully and waits up to `edge.drain_timeout`; returns whether they all
/// closed in time.
pub async fn serve_edge<S, F>(
    listener: TcpListener,
    edge: Edge,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) -> bool
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    F: Fn(&Peer) -> S + Send + Sync + 'static,
{
    let ctx = Arc::new(ConnCtx { builder: conn_builder(edge.limits), make_service, edge });
    // hyper-util's `GracefulShutdown`, with more causes: a connection also closes when it is
    // idle, evicted, or its client fails a reload's new client verification, and that crate's
    // connection trait is sealed. Each connection holds a receiver; the drain waits for them all.
    let drain_tx = tokio::sync::watch::Sender::new(());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = accept(&listener, &ctx.edge.conns.metrics) => {
                let Some((stream, peer)) = accepted else { continue };
                let slot = match ctx.edge.conns.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(refused) => {
                        ctx.edge.conns.metrics.refused(refused);
                        tracing::debug!(%peer, reason = refused.as_str(), "connection refused");
                        continue;
                    }
                };
                // Taken now: the drain waits for this connection from its first byte.
                let drain = drain_tx.subscribe();
                tokio::spawn(ctx.clone().serve(stream, peer, slot, drain));
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drain_tx.send_replace(());
    tokio::time::timeout(ctx.edge.drain_timeout, drain_tx.closed()).await.is_ok()
}

/// hyper's per-connection settings: HTTP/1.1 and HTTP/2 on one port, with the limits.
fn conn_builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes)
        .keep_alive(true);
    let mut h2 = builder.http2();
    h2.timer(TokioTimer::new()).max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    if let Some((interval, timeout)) = limits.http2_keep_alive {
        h2.keep_alive_interval(Some(interval)).keep_alive_timeout(timeout);
    }
    builder
}

/// What every connection's task needs, shared with the accept loop.
struct ConnCtx<F> {
    builder: auto::Builder<TokioExecutor>,
    make_service: F,
    edge: Edge,
}

/// The connection's byte stream: plain or TLS, with bytes read ahead (PROXY checks) in front.
type Io = Either<Prefixed<TcpStream>, tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>;

/// Why a connection's first phase ended without HTTP.
enum SetupFailed {
    Refused(Refused),
    /// Closed, a failed handshake (counted by `tls::accept`), or the head deadline.
    Gone,
}

impl<F> ConnCtx<F> {
    /// PROXY header (if any), then the TLS handshake (if any), under the head deadline.
    async fn setup(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        slot: &conns::Slot,
        deadline: Instant,
    ) -> Result<(Io, SocketAddr, Option<Arc<ClientCert>>), SetupFailed> {
        let refused = |e: HeaderError| match e {
            HeaderError::Closed => SetupFailed::Gone,
            HeaderError::Invalid | HeaderError::Untrusted => SetupFailed::Refused(Refused::ProxyHeader),
        };
        let (stream, client) = match &self.edge.proxy_protocol {
            ProxyProtocol::Off => (Prefixed::new(Vec::new(), stream), peer),
            ProxyProtocol::From(trusted) if trusted.contains(peer.ip()) => {
                let (source, stream) = proxy_protocol::read_header(stream).await.map_err(refused)?;
                let client = source.unwrap_or(peer);
                slot.rebind(client.ip()).map_err(SetupFailed::Refused)?;
                (stream, client)
            }
            ProxyProtocol::From(_) => (proxy_protocol::refuse_header(stream).await.map_err(refused)?, peer),
        };
        let Some(tls) = &self.edge.tls else { return Ok((Either::Left(stream), client, None)) };
        let config = tls.current.load().config.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let stream = tls::accept(config, stream, left, &tls.counters).await.ok_or(SetupFailed::Gone)?;
        let cert = stream.get_ref().1.peer_certificates().and_then(ClientCert::from_chain).map(Arc::new);
        Ok((Either::Right(stream), client, cert))
    }

    /// One connection, from accept to close. It closes when the client leaves; at its head
    /// deadline if no request head came (at once, nothing is in flight); gracefully (requests
    /// in flight finish, h1 closes after them, h2 sends GOAWAY) when idle, on shutdown, when
    /// evicted while idle, when its client fails a reload's new client verification or its
    /// certificate expires. A graceful close is bounded by `drain_timeout`. `drain` is held to
    /// the end: the shutdown waits for this connection.
    async fn serve<S>(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: conns::Slot,
        mut drain: tokio::sync::watch::Receiver<()>,
    ) where
        S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
        F: Fn(&Peer) -> S,
    {
        let metrics = &self.edge.conns.metrics;
        let activity = slot.activity.clone();
        let head_deadline = activity.accepted() + self.edge.limits.header_read_timeout;
        let setup = tokio::select! {
            r = tokio::time::timeout_at(head_deadline, self.setup(stream, peer, &slot, head_deadline)) => r,
            () = activity.evicted() => return,
            _ = drain.changed() => return,
        };
        let (io, client, client_cert) = match setup {
            Ok(Ok(ok)) => ok,
            Ok(Err(SetupFailed::Refused(r))) => {
                metrics.refused(r);
                tracing::debug!(%peer, reason = r.as_str(), "connection refused");
                return;
            }
            Ok(Err(SetupFailed::Gone)) => return,
            Err(_) => {
                metrics.closed(Closed::HeaderTimeout);
                return;
            }
        };

        let tls_listener = self.edge.tls.as_ref().map(|t| t.current.clone());
        let mut verified_under = tls_listener.as_ref().map(|l| l.load_full());
        let next_expiry =
            |c: &Option<Arc<ClientCert>>| c.as_ref().map_or(i64::MAX, |c| c.next_expiry(SystemClock.now_unix_s()));
        let mut expires = next_expiry(&client_cert);
        let peer_info = Peer { addr: ClientAddr { peer, client }, client_cert: client_cert.clone() };
        let service = conns::Tracked { inner: (self.make_service)(&peer_info), activity: activity.clone() };
        let conn = self.builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)).into_owned();
        let mut conn = std::pin::pin!(conn);
        // Reasons to close that come from outside the connection.
        let close = async {
            loop {
                tokio::select! {
                    _ = drain.changed() => return,
                    () = activity.evicted() => {
                        metrics.closed(Closed::Evicted);
                        return;
                    }
                    () = tls::until_unix(expires) => {
                        // A certificate of the chain expired: is the client still verified?
                        let still = tls_listener.as_ref().is_none_or(|l| l.load().still_admits(client_cert.as_deref()));
                        if !still {
                            tracing::debug!("client certificate expired: closing the connection");
                            return;
                        }
                        expires = next_expiry(&client_cert);
                    }
                    () = retired(verified_under.as_deref()) => {
                        // Stored before it retired the old one: this is the new verification.
                        let now = tls_listener.as_ref().map(|l| l.load_full());
                        if now.as_ref().is_some_and(|n| !n.still_admits(client_cert.as_deref())) {
                            tracing::debug!("client no longer passes the reloaded client verification: closing the connection");
                            return;
                        }
                        verified_under = now;
                    }
                }
            }
        };
        let mut close = std::pin::pin!(close);
        // One timer: the head deadline until identified, then the idle deadline; once closing,
        // the drain deadline. A connection identified early can go idle before its head
        // deadline, so the first look is at the earlier of the two.
        let idle_timeout = self.edge.limits.idle_timeout;
        let timer = tokio::time::sleep_until(head_deadline.min(activity.accepted() + idle_timeout));
        let mut timer = std::pin::pin!(timer);
        let mut closing = false;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                () = &mut close, if !closing => {
                    if !activity.identified() {
                        return; // nothing in flight, nothing to say goodbye to
                    }
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    timer.as_mut().reset(Instant::now() + self.edge.drain_timeout);
                }
                () = &mut timer => {
                    if closing {
                        tracing::debug!("connection cut: its requests outlasted the drain timeout");
                        return;
                    }
                    let now = Instant::now();
                    if !activity.identified() {
                        if now >= head_deadline {
                            metrics.closed(Closed::HeaderTimeout);
                            return;
                        }
                        timer.as_mut().reset(head_deadline.min(now + idle_timeout));
                        continue;
                    }
                    match activity.idle_since() {
                        Some(since) if now >= since + idle_timeout => {
                            metrics.closed(Closed::Idle);
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                            timer.as_mut().reset(now + self.edge.drain_timeout);
                        }
                        Some(since) => timer.as_mut().reset(since + idle_timeout),
                        // Busy: look again in an idle timeout (it cannot be idle sooner than that).
                        None => timer.as_mut().reset(now + idle_timeout),
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Resolves when `listener`'s client verification is replaced; never without TLS.
async fn retired(listener: Option<&tls::Listener>) {
    match listener {
        Some(l) => l.retired.wait().await,
        None => std::future::pending().await,
    }
}

/// The next connection, with `TCP_NODELAY` set; `None` after an accept error (EMFILE and
/// friends), having backed off briefly instead of spinning.
async fn accept(listener: &TcpListener, metrics: &ConnMetrics) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) => {
            metrics.accept_errors.inc();
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

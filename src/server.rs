//! The listener: accept connections, serve HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN
//! `h2` over TLS) on one port, and drain gracefully on shutdown.
//!
//! With TLS, the handshake runs in the connection's own task, never in the accept loop (one slow
//! client must not stall everyone's accepts), bounded by `header_read_timeout` like a slow
//! request head. Each handshake takes the rustls config current at that moment from an
//! `ArcSwap`, so a reload's new certificates serve new connections while open ones continue;
//! a reload's new client verification is applied to open connections as well (see
//! [`tls::Listener::reload`]), and a connection ends when its client certificate expires.
//!
//! Servers take an already-bound listener, so tests bind `127.0.0.1:0` and run in-process. The
//! loop follows hyper-util's graceful example: accept, `select!` on shutdown, watch each
//! connection, then drain with a timeout (an idle keep-alive client must not hold shutdown open).

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
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::respond::Body;
use crate::tls::{self, ClientCert, HandshakeCounters};

/// Connection-level limits enforced by hyper itself.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A client must finish sending a request head within this time (slowloris).
    pub header_read_timeout: Duration,
    /// Hard cap on a request head; the request path answers JSON 431 below it, hyper a bare 431 above.
    pub max_head_bytes: usize,
}

impl ConnLimits {
    /// The hard caps for a configured `max_header_bytes`: twice that, so the JSON 431 of the
    /// request path answers everything but abuse; hyper's own floor is 8 KiB.
    pub fn for_max_header_bytes(max_header_bytes: u64, header_read_timeout: Duration) -> ConnLimits {
        let cap = usize::try_from(max_header_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
        ConnLimits { header_read_timeout, max_head_bytes: cap.max(8192) }
    }
}

/// Serves `service` on `listener` until `shutdown` resolves, then gives open connections up to
/// `drain_timeout` to finish their requests. Returns whether the drain completed in time.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> bool
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    serve_with_peer(listener, move |_| service.clone(), limits, shutdown, drain_timeout).await
}

/// Like [`serve`], with a service made per connection from the peer's address.
pub async fn serve_with_peer<S>(
    listener: TcpListener,
    make_service: impl Fn(SocketAddr) -> S,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> bool
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = conn_builder(limits);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = accept(&listener) => {
                let Some((stream, peer)) = accepted else { continue };
                let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(make_service(peer)));
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    // Errors here are the client's connection going away or a malformed request
                    // hyper already answered; nothing to do but note it.
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::time::timeout(drain_timeout, graceful.shutdown()).await.is_ok()
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
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    builder
}

/// The listener's TLS: the current settings (swapped on reload) and the handshake counters.
#[derive(Clone)]
pub struct TlsListener {
    pub current: Arc<ArcSwap<tls::Listener>>,
    pub counters: HandshakeCounters,
}

/// Like [`serve_with_peer`] over TLS: the service is made per connection after the handshake,
/// from the peer's address and its verified client certificate (if it presented one).
pub async fn serve_tls<S, F>(
    listener: TcpListener,
    tls: TlsListener,
    make_service: F,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> bool
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    F: Fn(SocketAddr, Option<Arc<ClientCert>>) -> S + Send + Sync + 'static,
{
    let builder = Arc::new(conn_builder(limits));
    let make_service = Arc::new(make_service);
    // hyper-util's `GracefulShutdown`, with more causes: a TLS connection also closes when its
    // client fails a reload's new client verification or its certificate expires, and that
    // crate's connection trait is sealed. Each connection holds a receiver; the drain waits for
    // them all.
    let drain_tx = tokio::sync::watch::Sender::new(());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = accept(&listener) => {
                let Some((stream, peer)) = accepted else { continue };
                // Taken now: the drain waits for this connection from its first byte, handshake included.
                let drain = drain_tx.subscribe();
                let conn = TlsConn {
                    builder: builder.clone(),
                    make_service: make_service.clone(),
                    listeners: tls.current.clone(),
                    counters: tls.counters.clone(),
                    limits,
                    drain_timeout,
                };
                tokio::spawn(conn.serve(stream, peer, drain));
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drain_tx.send_replace(());
    tokio::time::timeout(drain_timeout, drain_tx.closed()).await.is_ok()
}

/// What one TLS connection's task needs, shared with the accept loop.
struct TlsConn<F> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    make_service: Arc<F>,
    listeners: Arc<ArcSwap<tls::Listener>>,
    counters: HandshakeCounters,
    limits: ConnLimits,
    drain_timeout: Duration,
}

impl<F> TlsConn<F> {
    /// Handshake, then HTTP until the client leaves or a reason to close comes: shutdown, a
    /// reload's client verification this client no longer passes, or its certificate expiring.
    /// The close is graceful (in-flight requests finish; h1 closes after them, h2 sends
    /// GOAWAY) and bounded by `drain_timeout`. `drain` is held to the end: the shutdown waits
    /// for this connection, handshake included.
    async fn serve<S>(
        self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        mut drain: tokio::sync::watch::Receiver<()>,
    ) where
        S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
        F: Fn(SocketAddr, Option<Arc<ClientCert>>) -> S,
    {
        let mut verified_under = self.listeners.load_full();
        let timeout = self.limits.header_read_timeout;
        let Some(stream) = tls::accept(verified_under.config.clone(), stream, timeout, &self.counters).await else {
            return;
        };
        let client_cert = stream.get_ref().1.peer_certificates().and_then(ClientCert::from_chain).map(Arc::new);
        let next_expiry = |c: &Option<Arc<ClientCert>>| c.as_ref().map_or(i64::MAX, |c| c.next_expiry(tls::unix_now()));
        let mut expires = next_expiry(&client_cert);
        let service = TowerToHyperService::new((self.make_service)(peer, client_cert.clone()));
        let conn = self.builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let mut conn = std::pin::pin!(conn);
        let close = async {
            loop {
                tokio::select! {
                    _ = drain.changed() => return,
                    () = tls::until_unix(expires) => {
                        // A certificate of the chain expired: is the client still verified?
                        if !self.listeners.load().still_admits(client_cert.as_deref()) {
                            tracing::debug!("client certificate expired: closing the connection");
                            return;
                        }
                        expires = next_expiry(&client_cert);
                    }
                    () = verified_under.retired.wait() => {
                        // Stored before it retired the old one: this is the new verification.
                        let now = self.listeners.load_full();
                        if !now.still_admits(client_cert.as_deref()) {
                            tracing::debug!("client no longer passes the reloaded client verification: closing the connection");
                            return;
                        }
                        verified_under = now;
                    }
                }
            }
        };
        let mut close = std::pin::pin!(close);
        let deadline = tokio::time::sleep(Duration::MAX);
        let mut deadline = std::pin::pin!(deadline);
        let mut closing = false;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                () = &mut close, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    deadline.as_mut().reset(tokio::time::Instant::now() + self.drain_timeout);
                }
                () = &mut deadline, if closing => {
                    tracing::debug!("connection cut: its requests outlasted the drain timeout");
                    return;
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// The next connection, with `TCP_NODELAY` set; `None` after an accept error (EMFILE and
/// friends), having backed off briefly instead of spinning.
async fn accept(listener: &TcpListener) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

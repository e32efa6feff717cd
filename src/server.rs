//! The listener: accept connections, serve HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN
//! `h2` over TLS) on one port, and drain gracefully on shutdown.
//!
//! With TLS, the handshake runs in the connection's own task, never in the accept loop (one slow
//! client must not stall everyone's accepts), bounded by `header_read_timeout` like a slow
//! request head. Each handshake takes the rustls config current at that moment from an
//! `ArcSwap`, so a reload's new certificates serve new connections while open ones continue.
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
    // hyper-util's `GracefulShutdown`, with more causes: a TLS connection also closes when the
    // client verification it passed is replaced, or its certificate expires, and that crate's
    // connection trait is sealed. Each connection holds a receiver; the drain waits for them all.
    let drain_tx = tokio::sync::watch::Sender::new(());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = accept(&listener) => {
                let Some((stream, peer)) = accepted else { continue };
                // Taken now: the drain waits for this connection from its first byte, handshake included.
                let mut drain = drain_tx.subscribe();
                let current = tls.current.load_full();
                let (builder, make_service, counters) = (builder.clone(), make_service.clone(), tls.counters.clone());
                tokio::spawn(async move {
                    let timeout = limits.header_read_timeout;
                    let Some(stream) = tls::accept(current.config.clone(), stream, timeout, &counters).await else {
                        return;
                    };
                    let client_cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| Arc::new(ClientCert::from_der(leaf)));
                    let expires = client_cert.as_ref().map_or(i64::MAX, |c| c.not_after);
                    let service = TowerToHyperService::new(make_service(peer, client_cert));
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let mut conn = std::pin::pin!(conn);
                    // Why this connection should stop taking requests: shutdown, client
                    // verification replaced by a reload, or the client certificate expiring.
                    let close = async {
                        tokio::select! {
                            _ = drain.changed() => {}
                            () = current.retired.wait() => tracing::debug!("client verification changed: closing the connection"),
                            () = tls::until_unix(expires) => tracing::debug!("client certificate expired: closing the connection"),
                        }
                    };
                    let mut close = std::pin::pin!(close);
                    let mut closing = false;
                    let result = loop {
                        tokio::select! {
                            result = conn.as_mut() => break result,
                            () = &mut close, if !closing => {
                                closing = true;
                                // In-flight requests finish; h1 closes after them, h2 sends GOAWAY.
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drain_tx.send_replace(());
    tokio::time::timeout(drain_timeout, drain_tx.closed()).await.is_ok()
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

//! The listener: accept connections, serve HTTP/1.1 and HTTP/2 (h2c prior knowledge) on one
//! port, and drain gracefully on shutdown.
//!
//! Servers take an already-bound listener, so tests bind `127.0.0.1:0` and run in-process. The
//! loop follows hyper-util's graceful example: accept, `select!` on shutdown, watch each
//! connection, then drain with a timeout (an idle keep-alive client must not hold shutdown open).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::respond::Body;

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

    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
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

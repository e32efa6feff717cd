//! The mock bureau's own accept loop: HTTP/1.1 and HTTP/2 on one port, plain or TLS, and a
//! graceful stop.
//!
//! bureau-sim cannot use the proxy's listener (bureau-guard's `server/`): bureau-guard depends on
//! bureau-sim for its `demo` and `mock-bureau` commands, so the dependency can only go this way.
//! A bureau stand-in needs much less than the proxy's edge: no connection caps, no PROXY
//! protocol, no client addresses. What it keeps is what its clients rely on: a deadline from
//! accept to the first request head (TLS handshake included) and a cap on the head's size, so a
//! silent or oversized client cannot hold a connection; h2 pings; and a stop that finishes the
//! requests in flight (bounded), as hyper-util's graceful example does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::MockBureau;

/// From accept to the first complete request head (TLS handshake included), and for each later
/// head: a client that says nothing is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most a request head may take, in bytes (hyper answers 431 past it).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// h2 PING interval, and how long a PONG may take before the connection is closed.
const HTTP2_KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(20), Duration::from_secs(10));

/// How long a stop waits for the requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `bureau` on `listener` (over TLS with `tls`) until `stop` turns true, then closes every
/// connection gracefully and waits up to [`DRAIN_TIMEOUT`] for their requests. Returns whether
/// they all finished in time.
pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    bureau: Arc<MockBureau>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let builder = Arc::new(conn_builder());
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    // Each connection holds a receiver: the drain waits until they have all gone.
    let drain = watch::Sender::new(());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = Conn { builder: builder.clone(), bureau: bureau.clone(), closing: drain.subscribe() };
                tokio::spawn(conn.run(stream, tls.clone()));
            }
            () = &mut stopped => break,
        }
    }
    drop(listener);
    drain.send_replace(());
    tokio::time::timeout(DRAIN_TIMEOUT, drain.closed()).await.is_ok()
}

/// hyper's per-connection settings: HTTP/1.1 and HTTP/2 on one port, with the limits above.
fn conn_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Some(HTTP2_KEEP_ALIVE.0))
        .keep_alive_timeout(HTTP2_KEEP_ALIVE.1);
    builder
}

/// One connection's task.
struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    bureau: Arc<MockBureau>,
    /// Changes when the bureau stops; held to the end, so the drain waits for this connection.
    closing: watch::Receiver<()>,
}

impl Conn {
    /// The TLS handshake (in this task, never in the accept loop), bounded by the head deadline;
    /// then HTTP.
    async fn run(mut self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        let Some(tls) = tls else { return self.serve(stream).await };
        let handshake = tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream));
        tokio::select! {
            done = handshake => {
                // A failed or silent handshake has nothing to answer.
                if let Ok(Ok(stream)) = done {
                    self.serve(stream).await;
                }
            }
            _ = self.closing.changed() => {}
        }
    }

    /// Serves requests until the client leaves or the bureau stops; on a stop, requests in
    /// flight finish (h1 closes after them, h2 sends GOAWAY) within [`DRAIN_TIMEOUT`].
    async fn serve<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut self, io: I) {
        let bureau = self.bureau.clone();
        let service = service_fn(move |req| {
            let bureau = bureau.clone();
            async move { Ok::<_, Infallible>(bureau.handle(req).await) }
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = self.closing.changed() => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
    }
}

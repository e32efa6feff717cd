//! The hyper floor (issue 16): the least a proxy built on the required stack does per request,
//! measured side by side with bureau-guard and nginx in `--mode closed`, so that the part of
//! bureau-guard's CPU per request that is the stack's, not its own, is a measurement and not an
//! inference from a profile.
//!
//! It is bureau-guard's request path with every stage of its own removed: a worker thread per
//! CPU, each with a current-thread tokio runtime, its own listening socket of one `SO_REUSEPORT`
//! group and its own hyper-util client pool (as `server.workers`); hyper's HTTP/1 server with
//! keep-alive and no timers; the request body collected and the bureau's answer collected before
//! it is answered (bureau-guard holds the bureau slot until the whole answer has arrived, and
//! caches it). No tenant, no limit, no header rewriting, no metrics, no log.
//!
//! Run by the bench itself: `proxy_overhead --floor-proxy LISTEN UPSTREAM` (the bench binary
//! re-executes itself with these arguments, so that the floor is a process of its own whose CPU
//! time is read as the other targets' are).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Pool = Client<HttpConnector, Full<Bytes>>;

/// Serves until killed: a worker thread per CPU.
pub(super) fn serve(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let authority: Arc<Authority> = Arc::new(upstream.to_string().parse().context("upstream address")?);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let socket = reuse_port_listener(listen)?;
            let authority = Arc::clone(&authority);
            Ok(std::thread::spawn(move || worker(socket, authority)))
        })
        .collect::<anyhow::Result<_>>()?;
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a floor worker panicked"))??;
    }
    Ok(())
}

fn reuse_port_listener(listen: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into()).with_context(|| format!("binding {listen}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn worker(socket: std::net::TcpListener, authority: Arc<Authority>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(socket)?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let pool: Pool = Client::builder(TokioExecutor::new()).build(http);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (pool, authority) = (pool.clone(), Arc::clone(&authority));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| forward(req, pool.clone(), Arc::clone(&authority)));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

async fn forward(
    req: Request<Incoming>,
    pool: Pool,
    authority: Arc<Authority>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut uri = Uri::builder().scheme(Scheme::HTTP).authority((*authority).clone());
    if let Some(pq) = parts.uri.path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    parts.uri = uri.build().expect("a path from a parsed URI and a parsed authority");
    parts.headers.remove(http::header::HOST);
    let bad_gateway = || {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    };
    let Ok(resp) = pool.request(Request::from_parts(parts, Full::new(body))).await else { return Ok(bad_gateway()) };
    let (head, body) = resp.into_parts();
    match body.collect().await {
        Ok(bytes) => Ok(Response::from_parts(head, Full::new(bytes.to_bytes()))),
        Err(_) => Ok(bad_gateway()),
    }
}

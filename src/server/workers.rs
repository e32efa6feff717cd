//! Worker threads: one single-threaded runtime per thread, each accepting on its own listening
//! socket of one `SO_REUSEPORT` group, so a connection, its requests, their bureau calls and the
//! answers all run on the thread that accepted it (issue 16).
//!
//! Why not tokio's work-stealing runtime: with it, a request's client socket, its bureau socket
//! and its task wake on different threads, and every hop is a cross-thread wake-up (a futex, a
//! context switch). The profile of the multi-threaded proxy at 8,000 req/s put 60% of its CPU in
//! the kernel, 27% of it in `finish_task_switch` alone (benches/README.md, issue 16). nginx,
//! HAProxy and pingora keep a connection on one thread for the same reason. What it costs: a
//! busy connection cannot spread over cores (one bank's single h2 connection is served by one
//! thread), and the kernel, not the load, decides which thread a new connection lands on. Neither
//! matters for the mission: the bureau's budget, not the proxy's CPU, is what a surge exhausts.
//! `server.workers = 0` keeps the shared runtime for deployments that prefer it.
//!
//! The bureau connection pools are per thread too ([`current`] picks the thread's pool in
//! `bureau::upstream`): hyper's pooled connection is a task on the runtime that opened it, and a
//! request on another thread would hand its call to that task across threads.
//!
//! What outlives a request (a bureau call whose client left, a coalesced flight) is a task on the
//! thread's runtime, so a worker keeps its runtime running after its listener closes, until the
//! shutdown has waited for those calls ([`Workers::release`]).

use std::cell::Cell;
use std::net::SocketAddr;

use tokio::sync::{oneshot, watch};

thread_local! {
    /// 1-based index of the worker thread this is; 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread is (1-based), or 0 when it is not one of the proxy's workers (the
/// shared runtime, the admin listener, a test's runtime).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// `n` listening sockets bound to `addr` in one `SO_REUSEPORT` group (the kernel spreads new
/// connections over them). Port 0 binds an ephemeral port for the first and the same port for
/// the others.
pub fn bind_group(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener = std::net::TcpListener::from(socket);
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// The running worker threads.
pub struct Workers {
    /// Each worker's drain result, sent when its listener has closed and its connections ended.
    drained: Vec<oneshot::Receiver<bool>>,
    /// Set when the shutdown no longer needs the workers' runtimes (the calls they ran are done
    /// or given up); dropped with `Workers`, which also lets them end.
    release: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per listener, each running `serve(listener)` on a runtime of its own.
    /// The runtimes are built before any thread starts, so a failure leaves nothing running.
    pub fn start<F, Fut>(listeners: Vec<std::net::TcpListener>, serve: F) -> std::io::Result<Workers>
    where
        F: Fn(tokio::net::TcpListener) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = bool>,
    {
        let runtimes = listeners
            .iter()
            .map(|_| tokio::runtime::Builder::new_current_thread().enable_all().build())
            .collect::<std::io::Result<Vec<_>>>()?;
        let release = watch::Sender::new(false);
        let mut drained = Vec::with_capacity(listeners.len());
        let mut threads = Vec::with_capacity(listeners.len());
        for (i, (listener, runtime)) in listeners.into_iter().zip(runtimes).enumerate() {
            let (done, done_rx) = oneshot::channel();
            let mut released = release.subscribe();
            let serve = serve.clone();
            let thread = std::thread::Builder::new().name(format!("bureau-guard-{}", i + 1)).spawn(move || {
                WORKER.with(|w| w.set(i + 1));
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, worker = i + 1, "worker cannot register its listener");
                            let _ = done.send(false);
                            return;
                        }
                    };
                    let _ = done.send(serve(listener).await);
                    // Calls that outlive their requests run on this runtime: keep it turning.
                    let _ = released.wait_for(|r| *r).await;
                });
            })?;
            drained.push(done_rx);
            threads.push(thread);
        }
        Ok(Workers { drained, release, threads })
    }

    /// How many worker threads there are.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Waits for every worker's listener to close and its connections to end; whether they all
    /// drained in time.
    pub async fn drained(&mut self) -> bool {
        let mut all = true;
        for rx in std::mem::take(&mut self.drained) {
            all &= rx.await.unwrap_or(false);
        }
        all
    }

    /// Lets the workers' runtimes stop (anything still running on them is dropped) and waits
    /// for their threads to end.
    pub async fn release(self) {
        let Workers { release, threads, .. } = self;
        let _ = release.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

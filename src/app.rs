//! `serve`: bind, run until told to stop, drain. The config is already validated when it gets
//! here, so a bad config never binds a port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::Config;
use crate::proxy::Proxy;
use crate::runtime::Shared;
use crate::server::{self, ConnLimits};

/// A running proxy: its bound addresses and the means to stop it.
pub struct Running {
    /// Where bank traffic is served.
    pub addr: SocketAddr,
    /// Where the admin endpoints are served.
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    proxy_task: JoinHandle<bool>,
    admin_task: JoinHandle<bool>,
}

/// Binds both listeners from `config` and starts serving. Port 0 picks a free port (tests).
pub async fn start(config: Config) -> std::io::Result<Running> {
    let listener = TcpListener::bind(config.server.listen).await?;
    let admin_listener = TcpListener::bind(config.admin.listen).await?;
    Ok(start_on(config, listener, admin_listener))
}

/// Starts serving on listeners the caller already bound.
pub fn start_on(config: Config, listener: TcpListener, admin_listener: TcpListener) -> Running {
    let addr = listener.local_addr().expect("a bound listener has an address");
    let admin_addr = admin_listener.local_addr().expect("a bound listener has an address");
    let limits = ConnLimits::for_max_header_bytes(config.server.max_header_bytes, config.server.header_read_timeout);
    let drain = config.server.drain_timeout;
    let shared = Shared::new(config);
    let (stop, stopped) = watch::channel(false);

    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let proxy_task =
        tokio::spawn(server::serve(listener, Proxy::new(shared.clone()), limits, wait(stopped.clone()), drain));
    // The admin listener keeps answering /metrics and /readyz (false) while the proxy drains.
    let admin_limits = ConnLimits::for_max_header_bytes(16 * 1024, limits.header_read_timeout);
    let admin_task =
        tokio::spawn(server::serve(admin_listener, Admin::new(shared.clone()), admin_limits, wait(stopped), drain));
    shared.ready.store(true, Ordering::Release);
    tracing::info!(%addr, %admin_addr, "bureau-guard serving");
    Running { addr, admin_addr, shared, stop, proxy_task, admin_task }
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the drain timeout, and returns
    /// whether every connection closed in time.
    pub async fn shutdown(self) -> bool {
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        let proxy_drained = self.proxy_task.await.unwrap_or(false);
        let _ = self.admin_task.await;
        proxy_drained
    }
}

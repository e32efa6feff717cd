//! bureau-guard as the replay sees it: started from a config, read while the traffic runs, shut
//! down to read what it charged.
//!
//! bureau-sim cannot depend on bureau-guard: bureau-guard depends on bureau-sim (its `tools`
//! feature runs the mock bureau and this replay as `mock-bureau` and `demo`), and Cargo allows
//! no cycle. So the replay names what it needs of the proxy here, and bureau-guard implements
//! it (its `tools` module). The config is the text `bureau-guard serve` reads
//! ([`super::guard_config`]), so a scenario means the same to both.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

/// Starts bureau-guard for one replay.
pub trait GuardUnderTest {
    /// A proxy this started.
    type Running: RunningGuard;

    /// Starts a proxy from `config`, a bureau-guard config as TOML text (ports chosen by the OS,
    /// the bureau's URL in it). An invalid config is an error.
    fn start(&self, config: &str) -> impl Future<Output = anyhow::Result<Self::Running>> + Send;
}

/// A proxy serving the replay's traffic.
pub trait RunningGuard: Send + Sync {
    /// Where the banks send their look-ups.
    fn addr(&self) -> SocketAddr;

    /// The fair scheduler's bureau budget now: the fixed `max_concurrency`, or where the
    /// adaptive limit has brought it.
    fn limit(&self) -> usize;

    /// Stops the proxy, waiting for its bureau calls (abandoned ones included) so that their
    /// charges are final; then the daily quota units it charged, by tenant id.
    fn shutdown(self) -> impl Future<Output = BTreeMap<String, u64>> + Send;
}

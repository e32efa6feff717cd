//! What an operator touches while the proxy runs, apart from bank traffic.
//!
//! - `admin`: the admin listener: health, readiness, metrics, tenants, cache purge, reload
//! - [`metrics`]: the Prometheus registry and its handles, resolved once per (tenant, route)
//! - [`reload`]: re-read, validate, diff and swap a config without dropping a request
//! - [`series`]: every series the dashboard reads declared at 0 from the start, dropped on removal

pub(crate) mod admin;
pub mod metrics;
pub mod reload;
pub mod series;

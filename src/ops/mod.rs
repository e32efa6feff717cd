//! What an operator touches while the proxy runs, apart from bank traffic.
//!
//! - `admin`: the admin listener: health, readiness, metrics, tenants, cache purge, reload
//! - [`metrics`]: the Prometheus registry and its handles, resolved once per (tenant, route)
//! - [`reload`]: re-read, validate, diff and swap a config without dropping a request

pub(crate) mod admin;
pub mod metrics;
pub mod reload;

//! bureau-guard: a reverse proxy that protects a credit bureau's API from the institutions that
//! depend on it.
//!
//! The request path, one module per stage, assembled in [`proxy`]:
//!
//! - [`server`]: the listener (HTTP/1.1 + h2c, header timeout, graceful drain)
//! - [`limits`]: head and body size limits (431, 413)
//! - [`tenant`]: who is asking (api key → tenant, constant-time), key removed (401)
//! - [`route`]: which configured route (404)
//! - [`upstream`]: the pooled call to the bureau (502, 504)
//! - [`respond`]: every error's status and JSON body, and the [`respond::Outcome`] labels
//!
//! Around it: [`config`] (TOML → validated config, every problem reported), [`runtime`] (the
//! compiled config behind an atomic pointer), [`metrics`], [`admin`] (health, metrics), [`app`]
//! (bind, run, drain), [`mock_bureau`] (a bureau with a capacity model), [`loadgen`] (open-loop
//! load for benchmarks and the demo), [`cli`].

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod headers;
pub mod limits;
pub mod metrics;
pub mod mock_bureau;
pub mod proxy;
pub mod quota;
pub mod ratelimit;
pub mod respond;
pub mod route;
pub mod runtime;
pub mod server;
pub mod state;
pub mod tenant;
pub mod upstream;

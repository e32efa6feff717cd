//! bureau-guard: a reverse proxy that protects a credit bureau's API from the institutions that
//! depend on it.
//!
//! The request path, one module per stage, assembled in [`proxy`]:
//!
//! - [`server`]: the listener (HTTP/1.1 + h2c, TLS, PROXY protocol; deadlines from accept,
//!   connection caps, penalties for repeated 401s; graceful drain)
//! - [`limits`]: head and body size limits (431, 413)
//! - [`tenant`]: who is asking (api key → tenant, constant-time), key removed (401)
//! - [`path`]: the one target that is routed, keyed and forwarded (normalised; ambiguity: 400)
//! - [`route`]: which configured route (404)
//! - [`ratelimit`]: the tenant's rate and in-flight cap (429)
//! - [`cache`]: repeated look-ups answered from memory, keyed by [`cache_key`] (per tenant
//!   unless a route is shared; 400 for a body that is not JSON)
//! - [`quota`]: the tenant's daily/monthly bureau calls, reserved then charged (429)
//! - [`coalesce`]: identical look-ups in flight share one bureau call, detached from any client
//! - [`breaker`]: the bureau's own signals: a circuit breaker while it fails, a hold while it
//!   answers 429/503 (503)
//! - [`scheduler`]: a bureau slot, shared by weighted fair queuing ([`adaptive`] sizes it) (503);
//!   from here on the call holds its slot until the bureau answers, whatever its client does
//! - [`upstream`]: the pooled call to the bureau (502, 504)
//! - [`respond`]: every error's status and JSON body, and the [`respond::Outcome`] labels
//! - [`audit`]: the optional log of who received which answer
//!
//! Around it: [`config`] (TOML → validated config, every problem reported), [`runtime`] (the
//! compiled config behind an atomic pointer), [`state`] (live counters and their persistence),
//! [`reload`] (validate, diff, swap), [`metrics`], [`admin`] (health, metrics, tenants, reload,
//! purge), [`app`] (bind, run, drain), [`headers`] (hop-by-hop, request ids), [`mock_bureau`] (a
//! bureau with a capacity model), [`loadgen`] (open-loop load), [`surge`] (the 2017 scenario for
//! the demo and benchmark), [`cli`].

pub mod adaptive;
pub mod admin;
pub mod app;
pub mod audit;
pub mod breaker;
pub mod cache;
pub mod cache_key;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod headers;
pub mod lease;
pub mod limits;
pub mod loadgen;
pub mod metrics;
pub mod mock_bureau;
pub mod path;
pub mod proxy;
pub mod quota;
pub mod ratelimit;
pub mod redis_state;
pub mod reload;
pub mod respond;
pub mod route;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod surge;
pub mod tenant;
pub mod tls;
pub mod upstream;

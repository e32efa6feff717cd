//! bureau-guard: a reverse proxy that protects a credit bureau's API from the institutions that
//! depend on it.
//!
//! The request path is assembled in order in [`proxy`]; each folder holds one part of it, in
//! the order a request meets them:
//!
//! - [`server`]: the listener: accept, TLS ([`tls`]), PROXY protocol, client address,
//!   connection caps, deadlines from accept, graceful drain
//! - [`admission`]: who is asking and may they: size limits (431, 413), tenant (401, 403), rate
//!   and in-flight (429), daily and monthly quota (429), each for the tenant, its route and its
//!   group (`contract`)
//! - [`route`]: the one normalised target (400) and which configured route it is (404)
//! - [`cache`]: the cache key (400 for a body that is not JSON), answers from memory, identical
//!   look-ups coalesced into one bureau call, the audit log of who received what
//! - [`bureau`]: circuit breaker and hold (503), the fair scheduler and its adaptive limit (503),
//!   the headers the bureau receives, the upstream call (502, 504)
//!
//! Every error's status and JSON body is built in [`respond`]. Around the path: [`config`]
//! (TOML → validated config, every problem reported), `runtime` (the compiled config behind
//! an atomic pointer, and the process's shared state), [`clock`] (the one wall clock,
//! injectable), [`state`] (live counters, on disk or in
//! Redis), [`usage`] (statements of what each tenant is billed for, by route and day),
//! [`ops`] (admin listener, metrics, reload), [`app`] (bind, run, drain) and [`cli`]
//! (the binary's commands). With the `tools` feature (on by default), `tools` lets
//! `bureau-sim`'s surge replay drive this proxy (the `demo` command, benchmarks, tests).
//!
//! Modules are `pub(crate)` unless something outside the crate uses them: the binary
//! ([`cli::main`]), the integration tests and benchmarks (which start the proxy through [`app`]
//! and drive some stages directly), and the fuzz targets (the parsers).

pub mod admission;
pub mod app;
pub mod bureau;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ops;
pub mod proxy;
pub mod respond;
pub mod route;
pub(crate) mod runtime;
pub mod server;
pub mod state;
pub mod tls;
#[cfg(feature = "tools")]
pub mod tools;
pub mod usage;

pub use app::{Options, Running};
pub use config::Config;

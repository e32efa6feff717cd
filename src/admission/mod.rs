//! Admission: who is asking, and may they. Every stage here answers a request itself (401, 403,
//! 413, 429, 431) before it costs the bureau anything; the cheapest checks come first.
//!
//! - `limits`: head and body size (431, 413), before any other work
//! - [`tenant`]: api key or client certificate → tenant (401, 403); the key header removed
//! - [`ratelimit`]: the tenant's rate, burst and requests in flight (429)
//! - [`quota`]: the tenant's daily and monthly bureau calls, reserved then charged (429)
//! - [`contract`]: whose limits a request is charged to: its tenant, its route, its group
//! - `backend`: the one interface over local and Redis admission, and [`verdict`]: what it answers
//!
//! The counters these stages keep belong to the tenant, not to a config: they live in
//! [`crate::state`].

pub(crate) mod backend;
pub mod contract;
pub(crate) mod limits;
pub mod quota;
pub mod ratelimit;
pub mod tenant;
pub mod verdict;

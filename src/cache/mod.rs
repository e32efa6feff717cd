//! The cache side: look-ups answered without a bureau call, and the record of who got what.
//!
//! - [`key`]: what makes two look-ups the same: a keyed hash of the route, its scope (the tenant
//!   unless the route is shared) and the parts the bureau reads (400 for a body that is not JSON)
//! - [`store`]: fresh answers from memory, bounded in bytes, no quota charged; stale ones when
//!   the bureau fails and the route allows it
//! - [`coalesce`]: identical look-ups in flight share one bureau call, detached from any client
//! - `audit`: the optional log of who received which answer, wherever it came from
//!
//! A key never crosses tenants unless a route says `scope = "shared"`: the cache, the coalescer
//! and the audit log all key on [`key::CacheKey`].

pub(crate) mod audit;
pub mod coalesce;
pub mod key;
pub mod store;

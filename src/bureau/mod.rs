//! The bureau side: everything between an admitted request and the bureau's answer.
//!
//! - `breaker`: the bureau's own signals: a circuit breaker while it fails, a hold while it
//!   answers 429/503 (503)
//! - [`scheduler`]: a bureau slot, shared among tenants by weighted fair queuing (503 when the
//!   queue is full or its deadline passes); [`adaptive`] keeps the budget at the bureau's knee
//! - `call`: one bureau call, split at its grant: queued for the request, then the bureau's
//!   (it detaches from a request that goes away)
//! - `headers`: what the bureau receives: hop-by-hop fields, identity and credentials removed,
//!   `x-tenant` and request ids set
//! - `upstream`: the pooled call to the bureau (502, 504); it knows nothing about tenants
//!
//! From the scheduler's grant on, a call belongs to the bureau, not to its client: it holds its
//! slot until the bureau has answered (see `call`).

pub mod adaptive;
pub(crate) mod breaker;
pub(crate) mod call;
pub(crate) mod headers;
pub mod scheduler;
pub(crate) mod upstream;

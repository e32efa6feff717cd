//! TLS on both sides: the banks' connections to bureau-guard, and bureau-guard's to the bureau.
//!
//! Banks reach the bureau over networks they do not control, and an api key alone is a bearer
//! secret that leaks with any log or proxy in between. So the listener can terminate TLS and,
//! with `client_auth`, ask each bank for a client certificate: the certificate's identity
//! (SAN DNS name, SAN URI or subject CN, as configured) names the institution, and
//! `admission/tenant.rs` maps it to a tenant per request. Toward the bureau, an `https://`
//! upstream gets a verified connection (hostname always checked) and, if configured,
//! bureau-guard's own client certificate.
//!
//! Everything that can be wrong with a PEM file (missing, garbage, key not matching its
//! certificate, expired, an empty CA bundle, a bad CRL) is found here *while the config is
//! validated*, so `check`, `serve` and `reload` reject it with the file's TOML path, and the
//! rustls configs are built once per config, never per connection. The crypto provider is ring,
//! passed explicitly everywhere (two providers in one process panic at run time): nothing depends on a process-wide default.
//!
//! `files.rs` reads and checks the PEM files and builds the rustls configs; `identity.rs` is
//! what a client certificate says about who connects; `listener.rs` is the listener's side at
//! run time: handshakes, their labels, and client verification again after a reload or at a
//! certificate's expiry.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

mod files;
mod identity;
mod listener;
#[cfg(test)]
pub(crate) mod test_certs;

pub use files::{
    EXPIRY_WARNING, FileProblem, FileStamp, ServerTls, ServerTlsSettings, UpstreamTls, UpstreamTlsSettings, Watched,
    format_time, load_server, load_upstream, stale_crl_warnings, warnings,
};
pub use identity::{ClientAuth, ClientCert, IdentitySource};
pub use listener::{Handshake, HandshakeCounters, Listener, Retirement, accept, until_unix};

/// The one crypto provider of the process (ring), built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

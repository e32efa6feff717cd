//! The listener's TLS at run time: the rustls config swapped whole on reload, handshakes and
//! their labels, and open connections verified again when client verification changes or a
//! client certificate expires.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::files::{FileStamp, ServerTls};
use super::identity::{ClientAuth, ClientCert};
use crate::clock::{Clock, SystemClock};

/// The listener's TLS settings as the accept loop needs them, swapped whole on reload.
#[derive(Debug)]
pub struct Listener {
    pub config: Arc<rustls::ServerConfig>,
    /// What client certificates were verified against.
    verification: Verification,
    /// Fired when connections accepted under `verification` must be verified again.
    pub retired: Arc<Retirement>,
}

/// The settings a client certificate is checked against in the handshake.
#[derive(Clone)]
struct Verification {
    client_auth: ClientAuth,
    client_ca: Option<FileStamp>,
    crls: Vec<FileStamp>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl PartialEq for Verification {
    /// Equal when built from the same settings and file contents.
    fn eq(&self, o: &Self) -> bool {
        self.client_auth == o.client_auth && self.client_ca == o.client_ca && self.crls == o.crls
    }
}

impl fmt::Debug for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verification")
            .field("client_auth", &self.client_auth)
            .field("client_ca", &self.client_ca)
            .field("crls", &self.crls)
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub fn new(tls: &ServerTls) -> Listener {
        Listener {
            config: tls.rustls.clone(),
            verification: Verification::of(tls),
            retired: Arc::new(Retirement::new()),
        }
    }

    /// A listener on a rustls config built elsewhere (the mock bureau's), never reloaded.
    pub fn fixed(config: Arc<rustls::ServerConfig>) -> Listener {
        let verification =
            Verification { client_auth: ClientAuth::Off, client_ca: None, crls: Vec::new(), verifier: None };
        Listener { config, verification, retired: Arc::new(Retirement::new()) }
    }

    /// Swaps in the listener for a reloaded `tls`. A new certificate alone serves new
    /// handshakes while open connections go on. New client verification (CA, CRL,
    /// `client_auth`) also retires the old listener, after the new one is in place: each of its
    /// open connections checks its client against the new verification
    /// ([`Listener::still_admits`]) and closes, gracefully, if it no longer passes, so a
    /// certificate the new CRL revokes is not served for as long as its bank keeps the
    /// connection open, while a routine CRL refresh closes nobody else's.
    pub fn reload(current: &ArcSwap<Listener>, tls: &ServerTls) {
        let old = current.load_full();
        let verification = Verification::of(tls);
        let same = verification == old.verification;
        let retired = if same { old.retired.clone() } else { Arc::new(Retirement::new()) };
        current.store(Arc::new(Listener { config: tls.rustls.clone(), verification, retired }));
        if !same {
            old.retired.retire();
        }
    }

    /// Whether a connection whose client presented `cert` (or none) would pass this listener's
    /// client verification now.
    pub fn still_admits(&self, cert: Option<&ClientCert>) -> bool {
        let v = &self.verification;
        match (cert, &v.verifier) {
            (None, _) => v.client_auth != ClientAuth::Required,
            // A certificate that is no longer asked for is ignored (admission/tenant.rs: the key
            // decides).
            (Some(_), None) => true,
            (Some(c), Some(verifier)) => {
                let Some((leaf, intermediates)) = c.chain.split_first() else { return false };
                verifier.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now()).is_ok()
            }
        }
    }
}

impl Verification {
    fn of(tls: &ServerTls) -> Verification {
        Verification {
            client_auth: tls.client_auth,
            client_ca: tls.client_ca.clone(),
            crls: tls.crls.clone(),
            verifier: tls.client_verifier.clone(),
        }
    }
}

/// A signal to the connections of one client-verification generation that it was replaced.
#[derive(Debug)]
pub struct Retirement(tokio::sync::watch::Sender<bool>);

impl Retirement {
    fn new() -> Retirement {
        Retirement(tokio::sync::watch::Sender::new(false))
    }

    fn retire(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once retired (at once if it already is).
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // The sender is `self`, alive while this borrow is: `wait_for` cannot fail.
        let _ = rx.wait_for(|retired| *retired).await;
    }
}

/// Resolves at `unix_s` by the wall clock (a certificate's `notAfter`), never if that is
/// `i64::MAX`. Sleeps in steps of at most a day: tokio timers cap far deadlines, and a long wait
/// re-reads the clock.
pub async fn until_unix(unix_s: i64) {
    if unix_s == i64::MAX {
        return std::future::pending().await;
    }
    loop {
        let now = SystemClock.now_unix_s();
        if now >= unix_s {
            return;
        }
        tokio::time::sleep(Duration::from_secs((unix_s - now).min(86_400) as u64)).await;
    }
}

/// How a handshake ended, as one bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Ok,
    /// The client's certificate does not chain to `client_ca` (or its signature is bad).
    Untrusted,
    /// The client's certificate is expired or not yet valid.
    Expired,
    /// The client's certificate is on a configured CRL.
    Revoked,
    /// `client_auth = "required"` and the client sent none.
    NoClientCert,
    /// The client did not finish the handshake within `server.header_read_timeout`.
    Timeout,
    /// Anything else: a client that gave up (e.g. it did not trust our certificate), a protocol
    /// or version mismatch, plain HTTP sent to the TLS port.
    Failed,
}

impl Handshake {
    pub const ALL: [Handshake; 7] = [
        Handshake::Ok,
        Handshake::Untrusted,
        Handshake::Expired,
        Handshake::Revoked,
        Handshake::NoClientCert,
        Handshake::Timeout,
        Handshake::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::Untrusted => "untrusted",
            Handshake::Expired => "expired",
            Handshake::Revoked => "revoked",
            Handshake::NoClientCert => "no_client_cert",
            Handshake::Timeout => "timeout",
            Handshake::Failed => "failed",
        }
    }

    /// Classifies the error tokio-rustls returned for a failed handshake.
    pub fn of_error(e: &std::io::Error) -> Handshake {
        use rustls::{CertificateError, Error};
        let Some(err) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
            return Handshake::Failed;
        };
        match err {
            Error::NoCertificatesPresented => Handshake::NoClientCert,
            Error::InvalidCertificate(c) => match c {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Handshake::Expired,
                CertificateError::Revoked => Handshake::Revoked,
                _ => Handshake::Untrusted,
            },
            _ => Handshake::Failed,
        }
    }
}

/// Counters of `bureau_guard_tls_handshakes_total`, one per [`Handshake`], resolved once.
#[derive(Clone)]
pub struct HandshakeCounters(pub [prometheus::IntCounter; Handshake::ALL.len()]);

impl HandshakeCounters {
    /// Counters exported nowhere (the mock bureau's TLS listener).
    pub fn unregistered() -> HandshakeCounters {
        HandshakeCounters(Handshake::ALL.map(|h| {
            prometheus::IntCounter::new(format!("handshakes_{}", h.as_str()), "unexported").expect("valid name")
        }))
    }

    pub fn record(&self, h: Handshake) {
        self.0[h as usize].inc();
    }
}

/// Runs the server side of a handshake on `stream`, bounded by `timeout` so a silent client
/// cannot hold a task. Counts the outcome.
pub async fn accept<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    config: Arc<rustls::ServerConfig>,
    stream: S,
    timeout: Duration,
    counters: &HandshakeCounters,
) -> Option<tokio_rustls::server::TlsStream<S>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let outcome = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err((Handshake::of_error(&e), Some(e))),
        Err(_) => Err((Handshake::Timeout, None)),
    };
    match outcome {
        Ok(tls) => {
            counters.record(Handshake::Ok);
            Some(tls)
        }
        Err((kind, e)) => {
            counters.record(kind);
            tracing::debug!(result = kind.as_str(), error = ?e, "TLS handshake failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_labels_are_indexed_in_order() {
        for (i, h) in Handshake::ALL.iter().enumerate() {
            assert_eq!(*h as usize, i);
        }
    }
}

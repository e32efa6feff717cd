//! PEM files → checked rustls server and client configs.
//!
//! Every file is read and checked here while a config is validated (`check`, start, reload),
//! never per connection: what is wrong with it becomes a [`FileProblem`] at its TOML key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use x509_parser::parse_x509_crl;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::{ClientAuth, IdentitySource};
use super::provider;

/// ALPN ids offered to banks, preferred first: h2 multiplexes a bank's look-ups on one connection.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A certificate expiring sooner than this gets a warning from `check`, at start-up and on reload:
/// a month leaves time to get a new one through a bank's or the bureau's change process.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// A file as it was read for this config: where, and the SHA-256 of its bytes. Two configs with
/// the same path but a rotated file differ, so reload rebuilds what the file feeds.
#[derive(Clone, PartialEq, Eq)]
pub struct FileStamp {
    pub path: PathBuf,
    pub sha256: [u8; 32],
}

impl FileStamp {
    /// A short fingerprint of the contents for diffs and logs: enough to tell two versions of a
    /// file apart within one process's output, and no help to whoever reads it. Not a prefix of
    /// the SHA-256: with that, anyone who saw a reload's output could test a guessed or stolen
    /// key file against it offline. A keyed hash under a key this process drew at random instead
    /// (so `check --diff` and the running proxy show different fingerprints for one file).
    pub fn short(&self) -> String {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).expect("the operating system's random source is available");
            key
        });
        hex::encode(&blake3::keyed_hash(key, &self.sha256).as_bytes()[..6])
    }
}

impl fmt::Debug for FileStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (contents {}…)", self.path.display(), self.short())
    }
}

/// A certificate whose expiry is watched: `check` warns, a metric exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// TOML path of the file it came from, e.g. `server.tls.cert`.
    pub toml_path: String,
    /// The certificate's subject, for humans.
    pub subject: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// Validated `[server.tls]`, with the rustls config built from it.
#[derive(Clone)]
pub struct ServerTls {
    pub cert: FileStamp,
    pub key: FileStamp,
    pub client_auth: ClientAuth,
    pub client_ca: Option<FileStamp>,
    pub crls: Vec<FileStamp>,
    pub identity: IdentitySource,
    /// Unix seconds at which the server's own certificate (its leaf) expires.
    pub not_after: i64,
    /// Every certificate read (chain and CA bundle), for expiry warnings.
    pub watched: Vec<Watched>,
    /// Each CRL's `nextUpdate` (unix seconds), by TOML path, for a warning once it has passed.
    pub crl_next_update: Vec<(String, i64)>,
    /// The client certificate verifier inside `rustls` (`None` with `client_auth = "off"`),
    /// to verify an open connection's certificate again after a reload.
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    /// Shared by every handshake until the next reload.
    pub rustls: Arc<rustls::ServerConfig>,
}

impl PartialEq for ServerTls {
    /// Equal when built from the same settings and the same file contents.
    fn eq(&self, o: &Self) -> bool {
        self.cert == o.cert
            && self.key == o.key
            && self.client_auth == o.client_auth
            && self.client_ca == o.client_ca
            && self.crls == o.crls
            && self.identity == o.identity
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_auth", &self.client_auth)
            .field("client_ca", &self.client_ca)
            .field("crls", &self.crls)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Validated `[upstream.tls]` (or its defaults for an `https://` URL), with the rustls config.
#[derive(Clone)]
pub struct UpstreamTls {
    /// `None`: the platform's roots (the system trust store).
    pub ca: Option<FileStamp>,
    pub client_cert: Option<FileStamp>,
    pub client_key: Option<FileStamp>,
    /// Unix seconds at which bureau-guard's own client certificate expires, if it has one.
    pub client_not_after: Option<i64>,
    pub watched: Vec<Watched>,
    pub rustls: Arc<rustls::ClientConfig>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, o: &Self) -> bool {
        self.ca == o.ca && self.client_cert == o.client_cert && self.client_key == o.client_key
    }
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Loading: each function returns a message for the TOML path the caller knows.

/// A problem with one file: the TOML path key it belongs to (relative to the section) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// Key within the section, e.g. `cert`, `key`, `crl[1]`.
    pub key: String,
    pub message: String,
}

fn problem(key: &str, message: impl Into<String>) -> FileProblem {
    FileProblem { key: key.to_string(), message: message.into() }
}

/// Reads a file for `key`, stamping its contents.
fn read(key: &str, path: &Path) -> Result<(Vec<u8>, FileStamp), FileProblem> {
    let bytes = std::fs::read(path).map_err(|e| problem(key, format!("cannot read {}: {e}", path.display())))?;
    let stamp = FileStamp { path: path.to_path_buf(), sha256: Sha256::digest(&bytes).into() };
    Ok((bytes, stamp))
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn certs(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, FileProblem> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(c) if c.is_empty() => Err(problem(key, format!("{}: no PEM CERTIFICATE block found", path.display()))),
        Ok(c) => Ok(c),
        Err(e) => Err(problem(key, format!("{}: not a valid PEM certificate file ({e})", path.display()))),
    }
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(key: &str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, FileProblem> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| problem(key, format!("{}: no usable PEM private key ({e})", path.display())))
}

/// What x509-parser tells about a certificate: subject and validity.
struct CertFacts {
    subject: String,
    not_before: i64,
    not_after: i64,
}

fn facts(cert: &CertificateDer<'_>) -> Result<CertFacts, String> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| format!("not a valid X.509 certificate ({e})"))?;
    let v = x509.validity();
    Ok(CertFacts {
        subject: x509.subject().to_string(),
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// A unix time as `2026-05-01 12:00:00 UTC`.
pub fn format_time(unix_s: i64) -> String {
    chrono::DateTime::from_timestamp(unix_s, 0)
        .map_or_else(|| unix_s.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// Checks every certificate of a chain is within its validity at `now`; returns what to watch.
fn check_chain(
    key: &str,
    toml_path: &str,
    path: &Path,
    chain: &[CertificateDer<'_>],
    now: i64,
) -> Result<Vec<Watched>, FileProblem> {
    let mut watched = Vec::with_capacity(chain.len());
    for (i, cert) in chain.iter().enumerate() {
        let which = if i == 0 { "the certificate".to_string() } else { format!("chain certificate #{}", i + 1) };
        let f = facts(cert).map_err(|e| problem(key, format!("{}: {which}: {e}", path.display())))?;
        if f.not_after < now {
            return Err(problem(
                key,
                format!("{}: {which} ({}) expired on {}", path.display(), f.subject, format_time(f.not_after)),
            ));
        }
        if f.not_before > now {
            return Err(problem(
                key,
                format!(
                    "{}: {which} ({}) is not valid before {}",
                    path.display(),
                    f.subject,
                    format_time(f.not_before)
                ),
            ));
        }
        watched.push(Watched { toml_path: toml_path.to_string(), subject: f.subject, not_after: f.not_after });
    }
    Ok(watched)
}

/// A certificate chain and its key, checked to belong together and to be valid now.
struct Identity {
    certified: CertifiedKey,
    cert: FileStamp,
    key: FileStamp,
    not_after: i64,
    watched: Vec<Watched>,
}

/// Loads `cert_path` + `key_path` (keys `cert_key`/`key_key` in the section, `section` its TOML path).
fn identity(
    section: &str,
    (cert_key, cert_path): (&str, &Path),
    (key_key, key_path): (&str, &Path),
    now: i64,
) -> Result<Identity, Vec<FileProblem>> {
    let cert = read(cert_key, cert_path).and_then(|(pem, stamp)| Ok((certs(cert_key, cert_path, &pem)?, stamp)));
    let key = read(key_key, key_path).and_then(|(pem, stamp)| Ok((private_key(key_key, key_path, &pem)?, stamp)));
    let ((chain, cert_stamp), (key_der, key_stamp)) = match (cert, key) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let watched =
        check_chain(cert_key, &format!("{section}.{cert_key}"), cert_path, &chain, now).map_err(|p| vec![p])?;
    let not_after = watched.first().map_or(i64::MAX, |w| w.not_after);
    let certified = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        let msg = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                format!("{} does not match the certificate in {}", key_path.display(), cert_path.display())
            }
            other => format!("{}: cannot use this key ({other})", key_path.display()),
        };
        vec![problem(key_key, msg)]
    })?;
    Ok(Identity { certified, cert: cert_stamp, key: key_stamp, not_after, watched })
}

/// A CA bundle: at least one certificate still valid; expired ones are skipped (with a warning
/// from [`warnings`]) so a stale entry in a vendor bundle does not stop the proxy.
fn ca_bundle(key: &str, toml_path: &str, path: &Path, now: i64) -> Result<CaBundle, FileProblem> {
    let (pem, stamp) = read(key, path)?;
    let all = certs(key, path, &pem)?;
    let mut roots = RootCertStore::empty();
    let mut watched = Vec::new();
    for (i, cert) in all.iter().enumerate() {
        let f = facts(cert).map_err(|e| problem(key, format!("{}: certificate #{}: {e}", path.display(), i + 1)))?;
        watched.push(Watched { toml_path: toml_path.to_string(), subject: f.subject, not_after: f.not_after });
        if f.not_after >= now {
            roots.add(cert.clone()).map_err(|e| {
                problem(key, format!("{}: certificate #{} is not a usable trust anchor ({e})", path.display(), i + 1))
            })?;
        }
    }
    if roots.is_empty() {
        return Err(problem(key, format!("{}: every CA certificate in it has expired", path.display())));
    }
    Ok(CaBundle { roots: Arc::new(roots), stamp, watched })
}

struct CaBundle {
    roots: Arc<RootCertStore>,
    stamp: FileStamp,
    watched: Vec<Watched>,
}

/// The settings of `[server.tls]` after their strings were parsed (paths resolved, enums known).
#[derive(Debug, Clone)]
pub struct ServerTlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_auth: ClientAuth,
    pub client_ca: Option<PathBuf>,
    pub crl: Vec<PathBuf>,
    pub identity: IdentitySource,
}

/// Reads every file of `[server.tls]` and builds the listener's rustls config. `now`: unix seconds.
pub fn load_server(s: &ServerTlsSettings, now: i64) -> Result<ServerTls, Vec<FileProblem>> {
    let mut problems = Vec::new();
    let id = identity("server.tls", ("cert", &s.cert), ("key", &s.key), now).map_err(|p| problems.extend(p)).ok();
    let ca = s
        .client_ca
        .as_deref()
        .map(|path| ca_bundle("client_ca", "server.tls.client_ca", path, now))
        .transpose()
        .map_err(|p| problems.push(p))
        .ok()
        .flatten();
    let mut crls = Vec::new();
    let mut crl_stamps = Vec::new();
    let mut crl_next_update = Vec::new();
    for (i, path) in s.crl.iter().enumerate() {
        let key = format!("crl[{i}]");
        let loaded = read(&key, path).and_then(|(pem, stamp)| {
            let list: Result<Vec<_>, _> = CertificateRevocationListDer::pem_slice_iter(&pem).collect();
            match list {
                Ok(l) if l.is_empty() => Err(problem(&key, format!("{}: no PEM X509 CRL block found", path.display()))),
                Ok(l) => Ok((l, stamp)),
                Err(e) => Err(problem(&key, format!("{}: not a valid PEM CRL file ({e})", path.display()))),
            }
        });
        match loaded {
            Ok((l, stamp)) => {
                let next =
                    l.iter().filter_map(|crl| Some(parse_x509_crl(crl.as_ref()).ok()?.1.next_update()?.timestamp()));
                if let Some(next) = next.min() {
                    crl_next_update.push((format!("server.tls.crl[{i}]"), next));
                }
                crls.extend(l);
                crl_stamps.push(stamp);
            }
            Err(p) => problems.push(p),
        }
    }
    let (Some(id), true) = (id, problems.is_empty()) else { return Err(problems) };

    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![problem("cert", format!("no usable TLS version ({e})"))])?;
    let mut client_verifier = None;
    let builder = match (s.client_auth, &ca) {
        (ClientAuth::Off, _) => builder.with_no_client_auth(),
        // Never quietly serve without client verification that was asked for.
        (_, None) => {
            return Err(vec![problem(
                "client_ca",
                "required with client_auth: the CA bundle that issues the banks' certificates",
            )]);
        }
        (auth, Some(ca)) => {
            let mut v = WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider())
                .with_crls(crls)
                // Banks' CAs publish CRLs for the certificates they issue; intermediates' own
                // revocation lists are rarely at hand, and requiring them would refuse everyone.
                .only_check_end_entity_revocation();
            if auth == ClientAuth::Optional {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| {
                let key = if s.crl.is_empty() { "client_ca" } else { "crl" };
                vec![problem(key, format!("cannot build the client certificate verifier: {e}"))]
            })?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(id.certified)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    if s.client_auth != ClientAuth::Off {
        disable_resumption(&mut config);
    }
    let mut watched = id.watched;
    watched.extend(ca.as_ref().map(|c| c.watched.clone()).unwrap_or_default());
    Ok(ServerTls {
        cert: id.cert,
        key: id.key,
        client_auth: s.client_auth,
        client_ca: ca.map(|c| c.stamp),
        crls: crl_stamps,
        identity: s.identity,
        not_after: id.not_after,
        watched,
        crl_next_update,
        client_verifier,
        rustls: Arc::new(config),
    })
}

/// No session resumption (TLS 1.2 session ids, TLS 1.3 tickets) on a listener that verifies
/// client certificates: every connection is a full handshake, its certificate verified now.
///
/// A resumed session brings back the client certificate of the handshake that made it, never
/// verified again: a bank could go on connecting with a certificate past its `notAfter` (the
/// connection's expiry watch only sees times still ahead; a reload's new CA or CRL already ends
/// resumption, as it builds a new session cache). Verifying the chain again after a resumed
/// handshake would keep resumption, but the refusal would come after the handshake, as a closed
/// connection instead of a `certificate_expired` alert and the `expired` handshake label, and
/// it would be a second place where client verification happens. What resumption saves is
/// small here: rustls resumes TLS 1.3 with a fresh key exchange anyway, so a full handshake
/// costs our certificate's signature and the client chain's verification, a few hundred µs of
/// CPU per *new* connection (`benches/README.md`, `tls-handshake`: 262–278 µs for the whole
/// TLS 1.3 handshake), and banks keep pooled, kept-alive connections.
fn disable_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    // rustls' default ticketer already never produces tickets (no stateless resumption); with
    // no session storage either, tickets would name nothing: send none.
    config.send_tls13_tickets = 0;
}

/// The settings of `[upstream.tls]` after parsing.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTlsSettings {
    pub ca: Option<PathBuf>,
    /// Both or neither (checked by the caller).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Reads every file of `[upstream.tls]` and builds the bureau client's rustls config.
///
/// Without `ca`, the server is verified against the platform's roots (the system trust store,
/// read by rustls-native-certs), where an institution's operators manage the CAs they trust; an
/// image without one (distroless) gets a clear config problem asking for `ca`.
pub fn load_upstream(s: &UpstreamTlsSettings, now: i64) -> Result<UpstreamTls, Vec<FileProblem>> {
    let mut problems = Vec::new();
    let ca =
        s.ca.as_deref()
            .map(|path| ca_bundle("ca", "upstream.tls.ca", path, now))
            .transpose()
            .map_err(|p| problems.push(p))
            .ok()
            .flatten();
    let id = s
        .client_cert
        .as_ref()
        .map(|(cert, key)| identity("upstream.tls", ("client_cert", cert), ("client_key", key), now))
        .transpose()
        .map_err(|p| problems.extend(p))
        .ok()
        .flatten();
    if !problems.is_empty() {
        return Err(problems);
    }
    let roots = match &ca {
        Some(ca) => ca.roots.clone(),
        None => Arc::new(platform_roots()?),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![problem("ca", format!("no usable TLS version ({e})"))])?
        // Hostname verification is part of WebPkiServerVerifier; there is no switch to turn it off.
        .with_root_certificates(roots);
    let mut watched = ca.as_ref().map(|c| c.watched.clone()).unwrap_or_default();
    let (config, client_cert, client_key, client_not_after) = match id {
        None => (builder.with_no_client_auth(), None, None, None),
        Some(id) => {
            watched.extend(id.watched);
            let resolver = Arc::new(SingleClientCert(Arc::new(id.certified)));
            (builder.with_client_cert_resolver(resolver), Some(id.cert), Some(id.key), Some(id.not_after))
        }
    };
    Ok(UpstreamTls {
        ca: ca.map(|c| c.stamp),
        client_cert,
        client_key,
        client_not_after,
        watched,
        rustls: Arc::new(config),
    })
}

/// The system trust store; a problem at `ca` if it holds no usable certificate.
fn platform_roots() -> Result<RootCertStore, Vec<FileProblem>> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found.errors.first().map_or_else(|| "it is empty".to_string(), |e| e.to_string());
        return Err(vec![problem(
            "ca",
            format!("no CA certificate in the platform's trust store ({why}); set ca to the bureau's CA bundle"),
        )]);
    }
    Ok(roots)
}

/// bureau-guard's one client certificate, offered whenever the bureau asks (already loaded and
/// checked: `with_client_auth_cert` would parse the key a second time).
#[derive(Debug)]
struct SingleClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for SingleClientCert {
    fn resolve(&self, _hints: &[&[u8]], sigschemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        // Offer it only if the bureau accepts a signature our key can make.
        self.0.key.choose_scheme(sigschemes).is_some().then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A CRL whose `nextUpdate` has passed at `now`: a warning, not an error. rustls is left to
/// accept it (its default): refusing every bank because its CA published late would be the
/// outage this proxy exists to prevent; the operator is told, at `check`, start and reload.
pub fn stale_crl_warnings(next_update: &[(String, i64)], now: i64) -> Vec<(String, String)> {
    next_update
        .iter()
        .filter(|(_, next)| *next < now)
        .map(|(path, next)| {
            let message = format!(
                "the CRL was due to be replaced on {} (its nextUpdate); revocations published since are not known",
                format_time(*next)
            );
            (path.clone(), message)
        })
        .collect()
}

/// Expiry warnings at `now` (unix seconds): certificates that expire within [`EXPIRY_WARNING`],
/// and expired CA certificates that were skipped.
pub fn warnings(watched: &[Watched], now: i64) -> Vec<(String, String)> {
    let soon = now + EXPIRY_WARNING.as_secs() as i64;
    let mut out = Vec::new();
    for w in watched {
        if w.not_after < now {
            out.push((w.toml_path.clone(), format!("{} expired on {}; ignored", w.subject, format_time(w.not_after))));
        } else if w.not_after < soon {
            let days = (w.not_after - now) / 86_400;
            out.push((
                w.toml_path.clone(),
                format!("{} expires on {} (in {days} days)", w.subject, format_time(w.not_after)),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, SystemClock};
    use crate::tls::test_certs;

    fn now() -> i64 {
        SystemClock.now_unix_s()
    }

    fn settings(dir: &Path, cert: &str, key: &str) -> ServerTlsSettings {
        ServerTlsSettings {
            cert: dir.join(cert),
            key: dir.join(key),
            client_auth: ClientAuth::Off,
            client_ca: None,
            crl: Vec::new(),
            identity: IdentitySource::SanDns,
        }
    }

    fn messages(r: Result<ServerTls, Vec<FileProblem>>) -> Vec<String> {
        r.err().unwrap_or_default().into_iter().map(|p| format!("{}: {}", p.key, p.message)).collect()
    }

    #[test]
    fn a_good_pair_loads_with_alpn_and_its_expiry() {
        let dir = test_certs::files("good", 90);
        let tls = load_server(&settings(&dir, "leaf.pem", "leaf.key"), now()).expect("loads");
        assert_eq!(tls.rustls.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(tls.not_after > now() + 89 * 86_400);
        assert!(warnings(&tls.watched, now()).is_empty());
    }

    #[test]
    fn missing_garbage_and_mismatched_files_are_reported_with_their_key() {
        let dir = test_certs::files("bad", 90);
        std::fs::write(dir.join("garbage.pem"), "hello").unwrap();
        let m = messages(load_server(&settings(&dir, "nope.pem", "garbage.pem"), now()));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].starts_with("cert: cannot read ") && m[0].contains("nope.pem"), "{m:?}");
        assert!(m[1].starts_with("key: ") && m[1].contains("no usable PEM private key"), "{m:?}");

        let m = messages(load_server(&settings(&dir, "garbage.pem", "leaf.key"), now()));
        assert!(m[0].starts_with("cert: ") && m[0].contains("no PEM CERTIFICATE block"), "{m:?}");

        let m = messages(load_server(&settings(&dir, "leaf.pem", "other.key"), now()));
        assert!(m[0].starts_with("key: ") && m[0].contains("does not match the certificate"), "{m:?}");
    }

    #[test]
    fn an_expired_certificate_is_an_error_and_an_expiring_one_a_warning() {
        let dir = test_certs::files("expired", -1);
        let m = messages(load_server(&settings(&dir, "leaf.pem", "leaf.key"), now()));
        assert!(m[0].starts_with("cert: ") && m[0].contains("expired on"), "{m:?}");

        let dir = test_certs::files("expiring", 20);
        let tls = load_server(&settings(&dir, "leaf.pem", "leaf.key"), now()).expect("loads");
        let w = warnings(&tls.watched, now());
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].0, "server.tls.cert");
        assert!(w[0].1.starts_with("CN=unit-leaf expires on"), "{w:?}");
    }

    #[test]
    fn client_auth_needs_a_usable_ca_bundle() {
        let dir = test_certs::files("ca", 90);
        let mut s = settings(&dir, "leaf.pem", "leaf.key");
        s.client_auth = ClientAuth::Required;
        s.client_ca = Some(dir.join("leaf.key"));
        let m = messages(load_server(&s, now()));
        assert!(m[0].starts_with("client_ca: ") && m[0].contains("no PEM CERTIFICATE block"), "{m:?}");
        s.client_ca = Some(dir.join("ca.pem"));
        s.crl = vec![dir.join("ca.pem")];
        let m = messages(load_server(&s, now()));
        assert!(m[0].starts_with("crl[0]: ") && m[0].contains("no PEM X509 CRL block"), "{m:?}");
        s.crl.clear();
        assert!(load_server(&s, now()).is_ok());
        s.client_ca = None;
        let m = messages(load_server(&s, now()));
        assert!(m[0].starts_with("client_ca: required with client_auth"), "never quietly without client auth: {m:?}");
    }

    #[test]
    fn listeners_that_verify_client_certificates_never_resume_sessions() {
        let dir = test_certs::files("resumption", 90);
        let mut s = settings(&dir, "leaf.pem", "leaf.key");
        let plain = load_server(&s, now()).expect("loads");
        assert!(plain.rustls.session_storage.can_cache(), "without client certificates, resumption stays");
        for auth in [ClientAuth::Optional, ClientAuth::Required] {
            s.client_auth = auth;
            s.client_ca = Some(dir.join("ca.pem"));
            let tls = load_server(&s, now()).expect("loads");
            assert!(!tls.rustls.session_storage.can_cache(), "{auth:?}: no session-id cache");
            assert!(!tls.rustls.ticketer.enabled(), "{auth:?}: no stateless tickets");
            assert_eq!(tls.rustls.send_tls13_tickets, 0, "{auth:?}");
        }
    }

    #[test]
    fn upstream_client_certificate_is_checked_like_the_server_one() {
        let dir = test_certs::files("upstream", 90);
        let s = UpstreamTlsSettings {
            ca: Some(dir.join("ca.pem")),
            client_cert: Some((dir.join("leaf.pem"), dir.join("other.key"))),
        };
        let problems = load_upstream(&s, now()).unwrap_err();
        assert_eq!(problems[0].key, "client_key", "{problems:?}");
        let s = UpstreamTlsSettings { client_cert: Some((dir.join("leaf.pem"), dir.join("leaf.key"))), ..s };
        let tls = load_upstream(&s, now()).expect("loads");
        assert!(tls.client_not_after.is_some());
        let expired = test_certs::files("upstream-expired", -1);
        let s = UpstreamTlsSettings { client_cert: Some((expired.join("leaf.pem"), expired.join("leaf.key"))), ..s };
        let problems = load_upstream(&s, now()).unwrap_err();
        assert!(problems[0].key == "client_cert" && problems[0].message.contains("expired on"), "{problems:?}");
        assert!(load_upstream(&UpstreamTlsSettings::default(), now()).is_ok(), "built-in roots");
    }

    #[test]
    fn expiry_warnings_cover_soon_and_skipped() {
        let now = 1_700_000_000;
        let w = |p: &str, days: i64| Watched {
            toml_path: p.into(),
            subject: "CN=x".into(),
            not_after: now + days * 86_400 + 60,
        };
        let out = warnings(&[w("server.tls.cert", 10), w("server.tls.cert", 31), w("server.tls.client_ca", -2)], now);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].1.contains("(in 10 days)"), "{out:?}");
        assert!(out[1].1.contains("expired on") && out[1].1.ends_with("ignored"), "{out:?}");
    }
}

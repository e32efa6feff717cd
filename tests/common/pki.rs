//! Test certificates made at test time with rcgen: CAs, server and client certificates, CRLs,
//! written as PEM files, and a rustls client to talk to a TLS listener.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::{Duration, OffsetDateTime};
use tokio::net::TcpStream;

/// A certificate authority that can issue certificates and CRLs.
pub struct Ca {
    pub pem: String,
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// An issued certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
    pub serial: SerialNumber,
}

/// What goes into a leaf certificate.
pub struct LeafSpec<'a> {
    pub cn: &'a str,
    pub dns: &'a [&'a str],
    pub uris: &'a [&'a str],
    pub ip: bool,
    /// Days from now; negative: already expired.
    pub not_after_days: i64,
    /// Seconds from now, instead of `not_after_days` (a certificate that expires during a test).
    pub not_after_secs: Option<i64>,
}

impl Default for LeafSpec<'_> {
    fn default() -> Self {
        LeafSpec { cn: "leaf", dns: &[], uris: &[], ip: false, not_after_days: 365, not_after_secs: None }
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), der: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    pub fn issue(&self, spec: &LeafSpec<'_>) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, spec.cn);
        params.subject_alt_names = spec
            .dns
            .iter()
            .map(|d| SanType::DnsName((*d).try_into().unwrap()))
            .chain(spec.uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())))
            .collect();
        if spec.ip {
            params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        params.not_before = OffsetDateTime::now_utc() - Duration::days(400);
        params.not_after = OffsetDateTime::now_utc()
            + spec.not_after_secs.map_or_else(|| Duration::days(spec.not_after_days), Duration::seconds);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let serial = SerialNumber::from_slice(&fastrand::u64(1..).to_be_bytes());
        params.serial_number = Some(serial.clone());
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            serial,
        }
    }

    /// A CRL revoking `serials`, due to be replaced in a week.
    pub fn crl(&self, serials: &[&SerialNumber]) -> String {
        self.crl_due(serials, Duration::days(7))
    }

    /// A CRL revoking `serials` whose `nextUpdate` is `next_update` from now (negative: overdue).
    pub fn crl_due(&self, serials: &[&SerialNumber], next_update: Duration) -> String {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::days(30),
            next_update: now + next_update,
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: (*s).clone(),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `NAME.pem` and `NAME.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// Writes `text` to `dir/name` and returns the path as a TOML-ready string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A rustls client trusting `ca`, offering `client` if given, with `alpn`; `versions` empty: both.
pub fn client_config(
    ca: &Ca,
    client: Option<&Leaf>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let versions = if versions.is_empty() { rustls::DEFAULT_VERSIONS } else { versions };
    let builder = rustls::ClientConfig::builder_with_provider(bureau_guard::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => builder.with_client_auth_cert(vec![leaf.der.clone()], leaf.key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// One TLS connection to the proxy, speaking HTTP/1.1 or HTTP/2 as ALPN decided.
pub struct TlsConn {
    /// The certificate the server presented.
    pub server_cert: CertificateDer<'static>,
    pub alpn: Option<Vec<u8>>,
    pub version: rustls::ProtocolVersion,
    send: Sender,
    /// The client side of the connection; ends when the server closes it.
    driver: tokio::task::JoinHandle<()>,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// The answer to one request.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub version: http::Version,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

impl TlsConn {
    /// Connects and completes the handshake (the client's side of it: with TLS 1.3 a server that
    /// refuses the client's certificate says so on the first read).
    pub async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<TlsConn> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        let (_, conn) = tls.get_ref();
        let server_cert = conn.peer_certificates().and_then(|c| c.first()).cloned().expect("server sent a certificate");
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let version = conn.protocol_version().expect("handshake done");
        let io = TokioIo::new(tls);
        let send = if alpn.as_deref() == Some(b"h2") {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(std::io::Error::other)?;
            (Sender::H2(send), tokio::spawn(async move { drop(conn.await) }))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(std::io::Error::other)?;
            (Sender::H1(send), tokio::spawn(async move { drop(conn.await) }))
        };
        let (send, driver) = send;
        Ok(TlsConn { server_cert, alpn, version, send, driver })
    }

    /// Resolves when the server has closed the connection (gracefully or not).
    pub async fn closed(self) {
        let TlsConn { driver, send, .. } = self;
        // Held until then: a client that drops its sender closes the connection itself.
        driver.await.unwrap();
        drop(send);
    }

    /// Whether the server has closed the connection already.
    pub fn is_closed(&self) -> bool {
        self.driver.is_finished()
    }

    /// `GET path` with `headers`; an error if the connection fails (e.g. the server refused it).
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, hyper::Error> {
        let mut req = Request::get(format!("https://localhost{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = match &mut self.send {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        Ok(Answer { status: parts.status, version: parts.version, body: body.collect().await?.to_bytes() })
    }
}

/// Connects and sends one `GET`; the error as a string if any step fails.
pub async fn get_once(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let mut conn = TlsConn::connect(addr, config).await.map_err(|e| format!("handshake: {e}"))?;
    conn.get(path, headers).await.map_err(|e| format!("request: {e}"))
}

//! TLS end to end (issue 7): a real proxy on 127.0.0.1:0 with certificates made at test time,
//! real rustls clients, and a TLS mock bureau for the upstream side.
//!
//! About 850 lines: the tests share one set-up (a CA, certificates, a config writer) and read
//! as one story of the TLS listener, reload included.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::path::Path;
use std::sync::Arc;

use bureau_guard::app::{self, Options, Running};
use bureau_guard::clock::{Clock, SystemClock};
use bureau_guard::config::Config;
use bureau_sim::mock_bureau;
use common::*;
use pki::*;
use tokio::net::TcpListener;

/// The CA, server certificate and files of one test.
struct Setup {
    dir: std::path::PathBuf,
    ca: Ca,
    cert: String,
    key: String,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = temp_dir(name);
        let ca = Ca::new("Bureau Guard Test CA");
        let server = ca.issue(&LeafSpec { cn: "bureau-guard", dns: &["localhost"], ip: true, ..LeafSpec::default() });
        let (cert, key) = server.write(&dir, "server");
        Setup { ca, cert: cert.display().to_string(), key: key.display().to_string(), dir }
    }

    /// `[server.tls]` with this setup's certificate, plus `extra` lines.
    fn server_tls(&self, extra: &str) -> String {
        format!("[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}", self.cert, self.key)
    }

    /// `[server.tls]` asking for client certificates issued by `client_ca`.
    fn mtls(&self, client_auth: &str, client_ca: &Ca, extra: &str) -> String {
        let ca = write(&self.dir, "client-ca.pem", &client_ca.pem);
        self.server_tls(&format!("client_auth = \"{client_auth}\"\nclient_ca = \"{ca}\"\n{extra}"))
    }

    fn client(&self, leaf: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca, leaf, &[b"http/1.1"], &[])
    }
}

async fn proxy_with(mock_url: &str, x: &Extras<'_>) -> Running {
    start_proxy(&config_with(mock_url, x)).await
}

/// A proxy requiring client certificates issued by `banks`, tenant a being `bank-a.example`.
async fn bank_a_by_certificate(s: &Setup, banks: &Ca, mock_url: &str) -> Running {
    let x = Extras {
        server: &s.mtls("required", banks, ""),
        tenant_a: "client_cert_names = [\"bank-a.example\"]",
        ..Extras::default()
    };
    proxy_with(mock_url, &x).await
}

fn handshakes(proxy: &Running, result: &str) -> u64 {
    proxy.shared.metrics.tls_handshakes_total.with_label_values(&[result]).get()
}

/// A bank's client certificate issued by `ca`.
fn bank_cert(ca: &Ca, dns: &str) -> Leaf {
    ca.issue(&LeafSpec { cn: "Bank A Ltd", dns: &[dns], uris: &["spiffe://banks/bank-a"], ..LeafSpec::default() })
}

#[tokio::test]
async fn handshake_ok_with_tls13_and_tls12() {
    let s = Setup::new("tls-ok");
    let mock = start_mock(fast_mock()).await;
    let proxy = proxy_with(&mock.url(), &Extras { server: &s.server_tls(""), ..Extras::default() }).await;
    for (version, want) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let config = client_config(&s.ca, None, &[b"http/1.1"], &[version]);
        let mut conn = TlsConn::connect(proxy.addr, config).await.expect("handshake");
        assert_eq!(conn.version, want);
        assert_eq!(conn.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let r = conn.get("/v1/score/S-1", &[("x-api-key", KEY_A)]).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.version, http::Version::HTTP_11);
    }
    assert_eq!(handshakes(&proxy, "ok"), 2);
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("a"), Some(&2));
    // Plain HTTP sent to the TLS port is a failed handshake, not a request.
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let c = client();
            c.get(format!("http://{}/v1/score/S-1", proxy.addr).parse().unwrap()).await
        })
        .await
        .expect("answered or closed at once")
        .is_err()
    );
    wait_until("the plain-HTTP handshake to be counted", || handshakes(&proxy, "failed") == 1).await;
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn_over_tls() {
    let s = Setup::new("tls-h2");
    let mock = start_mock(fast_mock()).await;
    let proxy = proxy_with(&mock.url(), &Extras { server: &s.server_tls(""), ..Extras::default() }).await;
    let config = client_config(&s.ca, None, &[b"h2", b"http/1.1"], &[]);
    let mut conn = TlsConn::connect(proxy.addr, config).await.expect("handshake");
    assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
    // Several requests multiplexed on the one connection.
    for i in 0..3 {
        let r = conn.get(&format!("/v1/score/S-{i}"), &[("x-api-key", KEY_B)]).await.unwrap();
        assert_eq!((r.status, r.version), (http::StatusCode::OK, http::Version::HTTP_2), "{:?}", r.body);
    }
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("b"), Some(&3));
    assert_eq!(handshakes(&proxy, "ok"), 1);
}

#[tokio::test]
async fn client_certificate_from_an_untrusted_ca_is_rejected() {
    let s = Setup::new("tls-untrusted");
    let banks = Ca::new("Banks CA");
    let rogue = Ca::new("Rogue CA");
    let mock = start_mock(fast_mock()).await;
    let proxy = bank_a_by_certificate(&s, &banks, &mock.url()).await;
    let forged = bank_cert(&rogue, "bank-a.example");
    let r = get_once(proxy.addr, s.client(Some(&forged)), "/v1/score/S-1", &[]).await;
    assert!(r.is_err(), "a certificate from an untrusted CA got {r:?}");
    wait_until("the untrusted handshake to be counted", || handshakes(&proxy, "untrusted") == 1).await;
    // The same name from the trusted CA passes.
    let good = bank_cert(&banks, "bank-a.example");
    let r = get_once(proxy.addr, s.client(Some(&good)), "/v1/score/S-1", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(mock.bureau.stats().calls_total, 1, "the rejected client never reached the bureau");
}

#[tokio::test]
async fn expired_client_certificate_is_rejected() {
    let s = Setup::new("tls-expired");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let proxy = bank_a_by_certificate(&s, &banks, &mock.url()).await;
    let expired = banks.issue(&LeafSpec { dns: &["bank-a.example"], not_after_days: -1, ..LeafSpec::default() });
    let r = get_once(proxy.addr, s.client(Some(&expired)), "/v1/score/S-1", &[("x-api-key", KEY_A)]).await;
    assert!(r.is_err(), "an expired certificate got {r:?}");
    wait_until("the expired handshake to be counted", || handshakes(&proxy, "expired") == 1).await;
    assert_eq!(mock.bureau.stats().calls_total, 0);
}

#[tokio::test]
async fn required_client_auth_refuses_a_client_without_a_certificate_even_with_a_key() {
    let s = Setup::new("tls-nocert");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let proxy = proxy_with(&mock.url(), &Extras { server: &s.mtls("required", &banks, ""), ..Extras::default() }).await;
    let r = get_once(proxy.addr, s.client(None), "/v1/score/S-1", &[("x-api-key", KEY_A)]).await;
    assert!(r.is_err(), "no certificate got {r:?}");
    wait_until("the handshake to be counted", || handshakes(&proxy, "no_client_cert") == 1).await;
}

#[tokio::test]
async fn revoked_client_certificate_is_rejected_with_a_crl() {
    let s = Setup::new("tls-crl");
    let banks = Ca::new("Banks CA");
    let good = bank_cert(&banks, "bank-a.example");
    let revoked = bank_cert(&banks, "bank-a.example");
    let crl = write(&s.dir, "banks.crl.pem", &banks.crl(&[&revoked.serial]));
    let mock = start_mock(fast_mock()).await;
    let x = Extras {
        server: &s.mtls("required", &banks, &format!("crl = [\"{crl}\"]")),
        tenant_a: "client_cert_names = [\"bank-a.example\"]",
        ..Extras::default()
    };
    let proxy = proxy_with(&mock.url(), &x).await;
    let r = get_once(proxy.addr, s.client(Some(&revoked)), "/v1/score/S-1", &[]).await;
    assert!(r.is_err(), "a revoked certificate got {r:?}");
    wait_until("the revoked handshake to be counted", || handshakes(&proxy, "revoked") == 1).await;
    let r = get_once(proxy.addr, s.client(Some(&good)), "/v1/score/S-1", &[]).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn tenant_is_taken_from_the_san_dns_name_and_a_key_must_agree() {
    let s = Setup::new("tls-san");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let x = Extras {
        server: &s.mtls("required", &banks, ""),
        tenant_a: "client_cert_names = [\"Bank-A.example\"]",
        tenant_b: "client_cert_names = [\"bank-b.example\"]",
        ..Extras::default()
    };
    let proxy = proxy_with(&mock.url(), &x).await;
    let bank_a = bank_cert(&banks, "bank-a.example");
    let mut conn = TlsConn::connect(proxy.addr, s.client(Some(&bank_a))).await.unwrap();

    // No key: the certificate alone names tenant a (names compare case-insensitively).
    let r = conn.get("/v1/score/S-1", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Its own key agrees.
    let r = conn.get("/echo/x", &[("x-api-key", KEY_A)]).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = r.json();
    assert_eq!(seen["headers"]["x-tenant"], "a", "{seen}");
    assert!(seen["headers"].get("x-api-key").is_none(), "the key is still stripped: {seen}");
    // Another tenant's key contradicts the certificate.
    let r = conn.get("/v1/score/S-1", &[("x-api-key", KEY_B)]).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "identity_mismatch");
    // An unknown key is an invalid key, certificate or not.
    let r = conn.get("/v1/score/S-1", &[("authorization", "Bearer nope")]).await.unwrap();
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (401, Some("invalid_api_key")));
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("a"), Some(&1));

    // A trusted certificate that no tenant lists.
    let stranger = bank_cert(&banks, "bank-z.example");
    let r = get_once(proxy.addr, s.client(Some(&stranger)), "/v1/score/S-1", &[("x-api-key", KEY_A)]).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "unknown_client_certificate");
    let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert_eq!(
        metric_value(
            &text,
            "bureau_guard_requests_total{outcome=\"unknown_client_certificate\",route=\"_none\",tenant=\"_none\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

async fn tenant_by(identity: &str, name: &str, leaf: impl Fn(&Ca) -> Leaf) -> serde_json::Value {
    let s = Setup::new("tls-identity");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let tenant_b = format!("client_cert_names = [\"{name}\"]");
    let x = Extras {
        server: &s.mtls("required", &banks, &format!("client_identity = \"{identity}\"")),
        tenant_b: &tenant_b,
        ..Extras::default()
    };
    let proxy = proxy_with(&mock.url(), &x).await;
    let r = get_once(proxy.addr, s.client(Some(&leaf(&banks))), "/echo/x", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()
}

#[tokio::test]
async fn tenant_is_taken_from_the_subject_cn_or_a_san_uri_when_configured() {
    // The certificate's SAN DNS name would say nothing: the CN names bank b.
    let seen = tenant_by("cn", "Bank B Ltd", |ca| {
        ca.issue(&LeafSpec { cn: "Bank B Ltd", dns: &["unrelated.example"], ..LeafSpec::default() })
    })
    .await;
    assert_eq!(seen["headers"]["x-tenant"], "b", "{seen}");
    let seen = tenant_by("san_uri", "spiffe://banks/bank-b", |ca| {
        ca.issue(&LeafSpec { cn: "x", uris: &["spiffe://banks/bank-b"], ..LeafSpec::default() })
    })
    .await;
    assert_eq!(seen["headers"]["x-tenant"], "b", "{seen}");
}

#[tokio::test]
async fn optional_client_auth_falls_back_to_the_api_key() {
    let s = Setup::new("tls-optional");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let x = Extras {
        server: &s.mtls("optional", &banks, ""),
        tenant_a: "client_cert_names = [\"bank-a.example\"]",
        ..Extras::default()
    };
    let proxy = proxy_with(&mock.url(), &x).await;
    let r = get_once(proxy.addr, s.client(None), "/echo/x", &[("x-api-key", KEY_B)]).await.unwrap();
    assert_eq!(r.json()["headers"]["x-tenant"], "b");
    let r = get_once(proxy.addr, s.client(None), "/echo/x", &[]).await.unwrap();
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (401, Some("missing_api_key")));
    let cert = bank_cert(&banks, "bank-a.example");
    let r = get_once(proxy.addr, s.client(Some(&cert)), "/echo/x", &[]).await.unwrap();
    assert_eq!(r.json()["headers"]["x-tenant"], "a");
    // Optional does not mean unchecked: a certificate from elsewhere is still refused.
    let rogue = bank_cert(&Ca::new("Rogue CA"), "bank-a.example");
    assert!(get_once(proxy.addr, s.client(Some(&rogue)), "/echo/x", &[("x-api-key", KEY_A)]).await.is_err());
}

#[tokio::test]
async fn certificate_and_key_that_do_not_match_are_a_config_problem() {
    let s = Setup::new("tls-mismatch");
    let other = s.ca.issue(&LeafSpec::default());
    let (_, other_key) = other.write(&s.dir, "other");
    let tls = format!("[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n", s.cert, other_key.display());
    let text = config_with("http://127.0.0.1:1", &Extras { server: &tls, ..Extras::default() });
    let err = Config::from_toml(&text, &|_| None).unwrap_err().to_string();
    assert!(err.starts_with("server.tls.key: ") && err.contains("does not match the certificate in"), "{err}");
    // The binary's `check` says the same and exits 1; `serve` validates the same way.
    let path = s.dir.join("mismatch.toml");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bureau-guard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("server.tls.key: ") && stdout.contains("does not match"), "{stdout}");
}

#[tokio::test]
async fn check_warns_about_a_certificate_expiring_within_30_days_and_exits_0() {
    let s = Setup::new("tls-expiring");
    let soon = s.ca.issue(&LeafSpec { dns: &["localhost"], not_after_days: 10, ..LeafSpec::default() });
    let (cert, key) = soon.write(&s.dir, "soon");
    let tls = format!("[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display());
    let path = s.dir.join("expiring.toml");
    std::fs::write(&path, config_with("http://127.0.0.1:1", &Extras { server: &tls, ..Extras::default() })).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bureau-guard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("warning: server.tls.cert: CN=leaf expires on") && stdout.contains(" days)"), "{stdout}");
}

#[tokio::test]
async fn check_warns_about_an_overdue_crl_and_the_listener_still_uses_it() {
    let s = Setup::new("tls-crl-overdue");
    let banks = Ca::new("Banks CA");
    let revoked = bank_cert(&banks, "bank-a.example");
    let crl = write(&s.dir, "old.crl.pem", &banks.crl_due(&[&revoked.serial], time::Duration::days(-2)));
    let x = Extras {
        server: &s.mtls("required", &banks, &format!("crl = [\"{crl}\"]")),
        tenant_a: "client_cert_names = [\"bank-a.example\"]",
        ..Extras::default()
    };
    let path = s.dir.join("overdue.toml");
    std::fs::write(&path, config_with("http://127.0.0.1:1", &x)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bureau-guard"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("warning: server.tls.crl[0]: the CRL was due to be replaced on"), "{stdout}");
    // Overdue is not void: what it revokes stays revoked.
    let mock = start_mock(fast_mock()).await;
    let proxy = proxy_with(&mock.url(), &x).await;
    // Exported for alerting too: the CRL was due two days ago.
    let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    let due = metric_value(&text, "bureau_guard_tls_crl_next_update_timestamp_seconds{crl=\"0\"}").expect("exported");
    let now = SystemClock.now_unix_ms() as f64 / 1000.0;
    assert!((now - due - 2.0 * 86_400.0).abs() < 600.0, "due {due}, now {now}");
    assert!(get_once(proxy.addr, s.client(Some(&revoked)), "/v1/score/S-1", &[]).await.is_err());
    wait_until("the revoked handshake to be counted", || handshakes(&proxy, "revoked") == 1).await;
}

/// A TLS mock bureau with its own CA, requiring a client certificate from `clients`.
async fn tls_bureau(clients: &Ca) -> (mock_bureau::MockHandle, Ca) {
    tls_bureau_for(clients, &LeafSpec { cn: "bureau", dns: &["localhost"], ip: true, ..LeafSpec::default() }).await
}

/// Like [`tls_bureau`], the bureau's certificate made from `spec`.
async fn tls_bureau_for(clients: &Ca, spec: &LeafSpec<'_>) -> (mock_bureau::MockHandle, Ca) {
    let bureau_ca = Ca::new("Bureau Private CA");
    let leaf = bureau_ca.issue(spec);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(clients.der.clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), bureau_guard::tls::provider())
            .build()
            .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(bureau_guard::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![leaf.der.clone()], leaf.key())
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    (mock_bureau::start_tls(fast_mock(), listener, Arc::new(config)), bureau_ca)
}

/// `[upstream.tls]` lines trusting `ca`, with bureau-guard's client certificate if given.
fn upstream_tls(dir: &Path, ca: &Ca, client: Option<&Leaf>) -> String {
    let ca = write(dir, "bureau-ca.pem", &ca.pem);
    let mut out = format!("[upstream.tls]\nca = \"{ca}\"\n");
    if let Some(leaf) = client {
        let (cert, key) = leaf.write(dir, "guard-client");
        out += &format!("client_cert = \"{}\"\nclient_key = \"{}\"\n", cert.display(), key.display());
    }
    out
}

#[tokio::test]
async fn upstream_tls_with_a_private_ca_and_a_client_certificate() {
    let dir = temp_dir("tls-upstream");
    let guards = Ca::new("Guard Client CA");
    let (mock, bureau_ca) = tls_bureau(&guards).await;
    assert!(mock.url().starts_with("https://127.0.0.1:"));
    let me = guards.issue(&LeafSpec { cn: "bureau-guard", ..LeafSpec::default() });
    let proxy =
        proxy_with(&mock.url(), &Extras { upstream: &upstream_tls(&dir, &bureau_ca, Some(&me)), ..Extras::default() })
            .await;
    for i in 0..3 {
        let r = get(&format!("http://{}/v1/score/S-{i}", proxy.addr), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("a"), Some(&3));
    assert!(proxy.shared.snapshot.load().upstream.is_tls());
    let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
    assert!(text.contains("bureau_guard_tls_certificate_expiry_timestamp_seconds{cert=\"upstream_client\"}"), "{text}");
}

#[tokio::test]
async fn upstream_tls_with_the_wrong_ca_or_no_client_certificate_fails_with_502() {
    let dir = temp_dir("tls-upstream-bad");
    let guards = Ca::new("Guard Client CA");
    let (mock, bureau_ca) = tls_bureau(&guards).await;
    let me = guards.issue(&LeafSpec { cn: "bureau-guard", ..LeafSpec::default() });

    // The bureau's certificate does not chain to the CA bureau-guard was told to trust.
    let wrong = upstream_tls(&dir, &Ca::new("Some Other CA"), Some(&me));
    let proxy = proxy_with(&mock.url(), &Extras { upstream: &wrong, ..Extras::default() }).await;
    let r = get(&format!("http://{}/v1/score/S-1", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["error"], "bureau_unreachable");
    assert!(body["message"].as_str().unwrap().contains("TLS handshake with the bureau failed"), "{body}");

    // Right CA, but the bureau insists on a client certificate bureau-guard does not have.
    let anonymous = upstream_tls(&dir, &bureau_ca, None);
    let proxy = proxy_with(&mock.url(), &Extras { upstream: &anonymous, ..Extras::default() }).await;
    let r = get(&format!("http://{}/v1/score/S-1", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(mock.bureau.stats().calls_total, 0, "nothing got through");
}

#[tokio::test]
async fn certificate_reload_serves_new_handshakes_and_keeps_open_connections() {
    let s = Setup::new("tls-reload");
    let mock = start_mock(fast_mock()).await;
    let path = s.dir.join("bureau-guard.toml");
    std::fs::write(&path, config_with(&mock.url(), &Extras { server: &s.server_tls(""), ..Extras::default() }))
        .unwrap();
    let config = Config::load(&path).unwrap();
    let proxy =
        app::start_with(config, Options { config_path: Some(path.clone()), ..Default::default() }).await.unwrap();
    let old_cert = std::fs::read_to_string(&s.cert).unwrap();

    let mut before = TlsConn::connect(proxy.addr, s.client(None)).await.unwrap();
    assert_eq!(before.get("/v1/score/S-1", &[("x-api-key", KEY_A)]).await.unwrap().status, 200);

    // A new certificate at the same paths, then reload.
    let renewed = s.ca.issue(&LeafSpec { cn: "bureau-guard-2026", dns: &["localhost"], ..LeafSpec::default() });
    std::fs::write(&s.cert, &renewed.cert_pem).unwrap();
    std::fs::write(&s.key, &renewed.key_pem).unwrap();
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied(), "{out:?}");
    let changed: Vec<String> = out.changes.iter().map(ToString::to_string).collect();
    assert!(changed.iter().any(|c| c.starts_with("server.tls.cert: ") && !c.contains("restart")), "{changed:?}");
    assert!(changed.iter().any(|c| c.starts_with("server.tls.key: ")), "{changed:?}");
    assert!(!changed.iter().any(|c| c.contains("PRIVATE KEY")), "no key material in a diff: {changed:?}");

    // The open connection goes on with the certificate it was opened with...
    assert_eq!(before.get("/v1/score/S-2", &[("x-api-key", KEY_A)]).await.unwrap().status, 200);
    assert_eq!(before.server_cert.as_ref(), first_der(&old_cert).as_slice());
    // ...and a new one gets the new certificate.
    let mut after = TlsConn::connect(proxy.addr, s.client(None)).await.unwrap();
    assert_eq!(after.server_cert, renewed.der);
    assert_eq!(after.get("/v1/score/S-3", &[("x-api-key", KEY_A)]).await.unwrap().status, 200);

    // A broken key file rejects the reload; the running certificate stays.
    std::fs::write(&s.key, "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n").unwrap();
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(!out.applied());
    assert!(out.problems.iter().any(|p| p.starts_with("server.tls.key: ")), "{:?}", out.problems);
    let third = TlsConn::connect(proxy.addr, s.client(None)).await.unwrap();
    assert_eq!(third.server_cert, renewed.der);
    assert_eq!(before.get("/v1/score/S-4", &[("x-api-key", KEY_A)]).await.unwrap().status, 200);
}

#[tokio::test]
async fn client_cert_names_changed_by_reload_apply_to_open_connections() {
    let s = Setup::new("tls-reload-names");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let path = s.dir.join("bureau-guard.toml");
    let tls = s.mtls("required", &banks, "");
    let write_config = |tenant_a: &str, tenant_b: &str| {
        std::fs::write(
            &path,
            config_with(&mock.url(), &Extras { server: &tls, tenant_a, tenant_b, ..Extras::default() }),
        )
        .unwrap()
    };
    write_config("client_cert_names = [\"bank-a.example\"]", "");
    let proxy = app::start_with(
        Config::load(&path).unwrap(),
        Options { config_path: Some(path.clone()), ..Default::default() },
    )
    .await
    .unwrap();
    let cert = bank_cert(&banks, "bank-a.example");
    let mut conn = TlsConn::connect(proxy.addr, s.client(Some(&cert))).await.unwrap();
    assert_eq!(conn.get("/echo/x", &[]).await.unwrap().json()["headers"]["x-tenant"], "a");

    // The institution's certificate moves to tenant b (e.g. after a merger).
    write_config("", "client_cert_names = [\"bank-a.example\"]");
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied(), "{out:?}");
    assert_eq!(conn.get("/echo/x", &[]).await.unwrap().json()["headers"]["x-tenant"], "b");
}

/// The DER of the first certificate in a PEM text.
fn first_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap().to_vec()
}

#[tokio::test]
async fn a_bureau_certificate_for_another_name_fails_with_502() {
    let dir = temp_dir("tls-upstream-name");
    let guards = Ca::new("Guard Client CA");
    // Issued by the CA bureau-guard trusts, but for another host than the URL's 127.0.0.1.
    let spec = LeafSpec { cn: "127.0.0.1", dns: &["bureau.other.example"], ..LeafSpec::default() };
    let (mock, bureau_ca) = tls_bureau_for(&guards, &spec).await;
    let me = guards.issue(&LeafSpec { cn: "bureau-guard", ..LeafSpec::default() });
    let tls = upstream_tls(&dir, &bureau_ca, Some(&me));
    let proxy = proxy_with(&mock.url(), &Extras { upstream: &tls, ..Extras::default() }).await;
    let r = get(&format!("http://{}/v1/score/S-1", proxy.addr), &[("x-api-key", KEY_A)]).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["error"], "bureau_unreachable");
    assert!(body["message"].as_str().unwrap().contains("TLS handshake with the bureau failed"), "{body}");
    assert_eq!(mock.bureau.stats().calls_total, 0, "nothing reached a bureau that is not the one named");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_holds_up_nobody_and_is_timed_out() {
    let s = Setup::new("tls-silent");
    let mock = start_mock(fast_mock()).await;
    let x = Extras { server: &format!("header_read_timeout = \"500ms\"\n{}", s.server_tls("")), ..Extras::default() };
    let proxy = proxy_with(&mock.url(), &x).await;
    // Connected, silent: no ClientHello ever comes.
    let silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let r = get_once(proxy.addr, s.client(None), "/v1/score/S-1", &[("x-api-key", KEY_A)]).await.unwrap();
    assert_eq!(r.status, 200, "served while the silent client is still connected");
    wait_until("the silent client's handshake to time out", || handshakes(&proxy, "timeout") == 1).await;
    // The server gave up on it: the socket reads end-of-file.
    let mut buf = [0u8; 1];
    silent.readable().await.unwrap();
    assert_eq!(silent.try_read(&mut buf).unwrap_or(0), 0);
}

#[tokio::test]
async fn identity_holds_per_request_on_an_h2_connection_with_a_client_certificate() {
    let s = Setup::new("tls-h2-mtls");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let proxy = bank_a_by_certificate(&s, &banks, &mock.url()).await;
    // Upper case in the certificate: DNS names compare case-insensitively on both sides.
    let cert = bank_cert(&banks, "BANK-A.Example");
    let config = client_config(&s.ca, Some(&cert), &[b"h2"], &[]);
    let mut conn = TlsConn::connect(proxy.addr, config).await.unwrap();
    assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
    let mut answers = Vec::new();
    for i in 0..6 {
        // Every other request carries another tenant's key.
        let key: &[(&str, &str)] = if i % 2 == 0 { &[] } else { &[("x-api-key", KEY_B)] };
        answers.push(conn.get(&format!("/echo/h2-{i}"), key).await.unwrap());
    }
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.version, http::Version::HTTP_2);
        if i % 2 == 0 {
            assert_eq!(r.json()["headers"]["x-tenant"], "a", "{:?}", r.body);
        } else {
            assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (401, Some("identity_mismatch")));
        }
    }
    assert_eq!(mock.bureau.stats().calls_by_tenant.get("b"), None);
}

/// Starts a proxy on the config file at `path`, reloadable from it.
async fn reloadable(path: &Path) -> Running {
    let options = Options { config_path: Some(path.to_path_buf()), ..Default::default() };
    app::start_with(Config::load(path).unwrap(), options).await.unwrap()
}

#[tokio::test]
async fn a_crl_loaded_by_reload_closes_the_revoked_banks_open_connections_only() {
    let s = Setup::new("tls-reload-crl");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let path = s.dir.join("bureau-guard.toml");
    let good = bank_cert(&banks, "bank-a.example");
    let bad = bank_cert(&banks, "bank-a.example");
    let write_config = |ca: &Ca, extra: &str| {
        let x = Extras {
            server: &s.mtls("required", ca, extra),
            tenant_a: "client_cert_names = [\"bank-a.example\"]",
            ..Extras::default()
        };
        std::fs::write(&path, config_with(&mock.url(), &x)).unwrap();
    };
    write_config(&banks, "");
    let proxy = reloadable(&path).await;
    let connect =
        |leaf: &Leaf, alpn: &'static [u8]| TlsConn::connect(proxy.addr, client_config(&s.ca, Some(leaf), &[alpn], &[]));
    let mut bad_h1 = connect(&bad, b"http/1.1").await.unwrap();
    let mut bad_h2 = connect(&bad, b"h2").await.unwrap();
    let mut good_h1 = connect(&good, b"http/1.1").await.unwrap();
    for c in [&mut bad_h1, &mut bad_h2, &mut good_h1] {
        assert_eq!(c.get("/v1/score/S-1", &[]).await.unwrap().status, 200);
    }

    // The bank's CA revokes one certificate; the operator installs the new CRL.
    let crl = write(&s.dir, "banks.crl.pem", &banks.crl(&[&bad.serial]));
    write_config(&banks, &format!("crl = [\"{crl}\"]"));
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied(), "{out:?}");
    assert!(out.changes.iter().any(|c| c.to_string().starts_with("server.tls.crl: ")), "{out:?}");

    // The revoked bank's open connections are closed (gracefully: they were idle)...
    let closing = async {
        bad_h1.closed().await;
        bad_h2.closed().await;
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), closing).await.expect("revoked connections closed");
    // ...the other bank's was verified again and goes on (a routine CRL refresh closes nobody)...
    assert_eq!(good_h1.get("/v1/score/S-2", &[]).await.unwrap().status, 200);
    assert!(!good_h1.is_closed());
    // ...and on reconnecting, the revoked certificate fails its handshake.
    assert!(get_once(proxy.addr, s.client(Some(&bad)), "/v1/score/S-2", &[]).await.is_err());
    wait_until("the revoked handshake to be counted", || handshakes(&proxy, "revoked") == 1).await;
    let mut again = connect(&good, b"http/1.1").await.unwrap();
    assert_eq!(again.get("/v1/score/S-3", &[]).await.unwrap().status, 200);

    // A CA bundle that no longer trusts the banks' CA closes the rest.
    write_config(&Ca::new("Other Banks CA"), "");
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied(), "{out:?}");
    let closing = async {
        good_h1.closed().await;
        again.closed().await;
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), closing).await.expect("untrusted now: closed");
    write_config(&banks, &format!("crl = [\"{crl}\"]"));
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied(), "{out:?}");
    let mut again = connect(&good, b"h2").await.unwrap();
    assert_eq!(again.get("/v1/score/S-4", &[]).await.unwrap().status, 200);

    // A reload that changes no client verification (here: a tenant added) leaves them alone.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text += &format!("[[tenants]]\nid = \"c\"\napi_key_sha256 = \"{}\"\n", sha("key-c"));
    std::fs::write(&path, text).unwrap();
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied() && out.changes.iter().any(|c| c.to_string().starts_with("tenants[c]")), "{out:?}");
    assert_eq!(again.get("/v1/score/S-5", &[]).await.unwrap().status, 200);
    assert!(!again.is_closed());
}

#[tokio::test]
async fn client_identity_changed_by_reload_applies_to_open_connections() {
    let s = Setup::new("tls-reload-identity");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let path = s.dir.join("bureau-guard.toml");
    let write_config = |identity: &str, names: &str| {
        let tenant_a = format!("client_cert_names = [\"{names}\"]");
        let x = Extras {
            server: &s.mtls("required", &banks, &format!("client_identity = \"{identity}\"")),
            tenant_a: &tenant_a,
            ..Extras::default()
        };
        std::fs::write(&path, config_with(&mock.url(), &x)).unwrap();
    };
    write_config("san_dns", "bank-a.example");
    let proxy = reloadable(&path).await;
    let mut conn = TlsConn::connect(proxy.addr, s.client(Some(&bank_cert(&banks, "bank-a.example")))).await.unwrap();
    assert_eq!(conn.get("/echo/x", &[]).await.unwrap().json()["headers"]["x-tenant"], "a");

    // The bureau's operators move to subject CNs: the same connection is known by its CN now.
    write_config("cn", "Bank A Ltd");
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied(), "{out:?}");
    let r = conn.get("/echo/y", &[]).await.unwrap();
    assert_eq!(r.json()["headers"]["x-tenant"], "a", "{:?}", r.body);
}

#[tokio::test]
async fn a_connection_is_closed_when_its_client_certificate_expires() {
    let s = Setup::new("tls-cert-expiry");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let x = Extras {
        // hyper also closes an idle connection after header_read_timeout: far beyond the test.
        server: &format!("header_read_timeout = \"60s\"\n{}", s.mtls("required", &banks, "")),
        tenant_a: "client_cert_names = [\"bank-a.example\"]",
        ..Extras::default()
    };
    let proxy = proxy_with(&mock.url(), &x).await;
    let short = banks.issue(&LeafSpec {
        cn: "Bank A",
        dns: &["bank-a.example"],
        not_after_secs: Some(3),
        ..LeafSpec::default()
    });
    let mut conn = TlsConn::connect(proxy.addr, s.client(Some(&short))).await.unwrap();
    assert_eq!(conn.get("/v1/score/S-1", &[]).await.unwrap().status, 200);
    let opened = std::time::Instant::now();
    // Kept alive and idle: only the certificate's expiry ends it.
    tokio::time::timeout(std::time::Duration::from_secs(15), conn.closed()).await.expect("closed at expiry");
    assert!(
        opened.elapsed() >= std::time::Duration::from_secs(1),
        "closed after {:?}, before expiry",
        opened.elapsed()
    );
    let r = get_once(proxy.addr, s.client(Some(&short)), "/v1/score/S-2", &[]).await;
    assert!(r.is_err(), "an expired certificate reconnected: {r:?}");
}

#[tokio::test]
async fn a_revoked_banks_request_in_flight_is_cut_after_the_drain_timeout() {
    let s = Setup::new("tls-reload-cut");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let path = s.dir.join("bureau-guard.toml");
    let bad = bank_cert(&banks, "bank-a.example");
    let write_config = |extra: &str| {
        let x = Extras {
            server: &format!("drain_timeout = \"1s\"\n{}", s.mtls("required", &banks, extra)),
            upstream: "response_timeout = \"60s\"",
            tenant_a: "client_cert_names = [\"bank-a.example\"]",
            ..Extras::default()
        };
        std::fs::write(&path, config_with(&mock.url(), &x)).unwrap();
    };
    write_config("");
    let proxy = reloadable(&path).await;
    let mut conn = TlsConn::connect(proxy.addr, s.client(Some(&bad))).await.unwrap();
    assert_eq!(conn.get("/v1/score/S-1", &[]).await.unwrap().status, 200);
    // A look-up the bureau takes half a minute to answer, in flight when the CRL arrives.
    mock.bureau.set_service_time(std::time::Duration::from_secs(30));
    let slow = tokio::spawn(async move { conn.get("/v1/score/S-2", &[]).await });
    wait_until("the look-up at the bureau", || mock.bureau.stats().in_flight == 1).await;
    let crl = write(&s.dir, "banks.crl.pem", &banks.crl(&[&bad.serial]));
    write_config(&format!("crl = [\"{crl}\"]"));
    assert!(bureau_guard::ops::reload::reload_from_file(&proxy.shared).applied());
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), slow)
        .await
        .expect("cut within the drain timeout, not after the bureau's 30 s")
        .unwrap();
    assert!(answer.is_err(), "the revoked connection was cut: {answer:?}");
}

#[tokio::test]
async fn an_expired_certificate_the_chain_does_not_use_does_not_close_the_connection() {
    let s = Setup::new("tls-extra-expired");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let proxy = bank_a_by_certificate(&s, &banks, &mock.url()).await;
    let leaf = bank_cert(&banks, "bank-a.example");
    // Some clients send more than their path: here an old certificate from elsewhere, expired.
    let stale =
        Ca::new("Old Cross-signing CA").issue(&LeafSpec { cn: "old", not_after_days: -30, ..LeafSpec::default() });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.ca.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(bureau_guard::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![leaf.der.clone(), stale.der.clone()], leaf.key())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut conn = TlsConn::connect(proxy.addr, Arc::new(config)).await.unwrap();
    for i in 0..3 {
        let r = conn.get(&format!("/v1/score/X-{i}"), &[]).await.expect("the connection stays open");
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn a_reload_that_turns_tls_off_keeps_exporting_what_the_listener_still_serves() {
    let s = Setup::new("tls-off-metrics");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let path = s.dir.join("bureau-guard.toml");
    let crl = write(&s.dir, "banks.crl.pem", &banks.crl(&[]));
    let x = Extras {
        server: &s.mtls("required", &banks, &format!("crl = [\"{crl}\"]")),
        tenant_a: "client_cert_names = [\"bank-a.example\"]",
        ..Extras::default()
    };
    std::fs::write(&path, config_with(&mock.url(), &x)).unwrap();
    let proxy = reloadable(&path).await;
    let series = [
        "bureau_guard_tls_certificate_expiry_timestamp_seconds{cert=\"server\"}",
        "bureau_guard_tls_crl_next_update_timestamp_seconds{crl=\"0\"}",
    ];
    let exported = || {
        let text = String::from_utf8(proxy.shared.metrics.encode()).unwrap();
        series.map(|s| metric_value(&text, s))
    };
    let before = exported();
    assert!(before.iter().all(Option::is_some), "{before:?}");
    // [server.tls] removed: needs a restart, so the listener keeps its certificate and CRL...
    std::fs::write(&path, config_with(&mock.url(), &Extras::default())).unwrap();
    let out = bureau_guard::ops::reload::reload_from_file(&proxy.shared);
    assert!(out.applied() && out.changes.iter().any(|c| c.path == "server.tls" && c.needs_restart), "{out:?}");
    // ...and their expiry and due dates stay on the dashboard.
    assert_eq!(exported(), before);
}

#[tokio::test]
async fn a_client_cannot_resume_a_session_after_its_certificate_expires() {
    let s = Setup::new("tls-resume-expired");
    let banks = Ca::new("Banks CA");
    let mock = start_mock(fast_mock()).await;
    let proxy = bank_a_by_certificate(&s, &banks, &mock.url()).await;
    let issued = SystemClock.now_unix_s();
    let short = banks.issue(&LeafSpec {
        cn: "Bank A",
        dns: &["bank-a.example"],
        not_after_secs: Some(3),
        ..LeafSpec::default()
    });
    // One client per version, each kept for both connections: its session cache (TLS 1.3
    // tickets, TLS 1.2 session ids) is what a bank that resumes holds on to.
    let clients = [&rustls::version::TLS13, &rustls::version::TLS12]
        .map(|v| client_config(&s.ca, Some(&short), &[b"http/1.1"], &[v]));
    for c in &clients {
        let r = get_once(proxy.addr, c.clone(), "/v1/score/S-1", &[]).await.expect("valid certificate");
        assert_eq!(r.status, 200);
    }
    // The certificate's notAfter (whole seconds, at most `issued + 3`) passes by the wall clock:
    // what is awaited is time itself, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while SystemClock.now_unix_s() <= issued + 4 {
        assert!(std::time::Instant::now() < deadline, "the wall clock did not move");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let expired_before = handshakes(&proxy, "expired");
    for (c, version) in clients.iter().zip(["TLS 1.3", "TLS 1.2"]) {
        let r = get_once(proxy.addr, c.clone(), "/v1/score/S-2", &[]).await;
        assert!(r.is_err(), "{version}: a session of an expired certificate was resumed: {r:?}");
    }
    assert_eq!(handshakes(&proxy, "expired") - expired_before, 2, "refused in the handshake, as expired");
}

//! Certificates made at test time (rcgen), written as PEM files, for the unit tests of the TLS
//! files and of the config.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use time::{Duration, OffsetDateTime};

/// A CA, and a leaf it issued valid until `days` from now (negative: expired), as PEM files in
/// a fresh directory: `ca.pem`, `leaf.pem`, `leaf.key`, plus `other.key` (an unrelated key).
pub fn files(name: &str, days: i64) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bg-unit-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name.push(DnType::CommonName, "Unit CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("self-signed");
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    leaf.distinguished_name.push(DnType::CommonName, "unit-leaf");
    leaf.not_before = OffsetDateTime::now_utc() - Duration::days(400);
    leaf.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &issuer).expect("signed");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("leaf.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("leaf.key"), key.serialize_pem()).expect("write");
    std::fs::write(dir.join("other.key"), KeyPair::generate().expect("key").serialize_pem()).expect("write");
    dir
}

//! Client certificate identity: whether the listener asks for a certificate, which of its
//! names names the institution, and the names a verified chain carries.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// `server.tls.client_auth`: whether the listener asks banks for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate asked for; tenants are identified by api key only.
    Off,
    /// A certificate is asked for; a bank without one falls back to its api key, a bank with one
    /// must present a trusted one, and that certificate then names the tenant (one no tenant
    /// lists gets 403 even with a valid key: a certificate is never ignored once presented).
    Optional,
    /// No handshake completes without a trusted client certificate.
    Required,
}

impl ClientAuth {
    pub fn parse(s: &str) -> Option<ClientAuth> {
        match s {
            "off" => Some(ClientAuth::Off),
            "optional" => Some(ClientAuth::Optional),
            "required" => Some(ClientAuth::Required),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Off => "off",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// `server.tls.client_identity`: which name in a client certificate names the institution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// Subject alternative names of type DNS (compared in lower case, as DNS names are).
    SanDns,
    /// Subject alternative names of type URI (e.g. SPIFFE ids), compared exactly.
    SanUri,
    /// The subject's common name(s), compared exactly (legacy PKIs without SANs).
    Cn,
}

impl IdentitySource {
    pub fn parse(s: &str) -> Option<IdentitySource> {
        match s {
            "san_dns" => Some(IdentitySource::SanDns),
            "san_uri" => Some(IdentitySource::SanUri),
            "cn" => Some(IdentitySource::Cn),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            IdentitySource::SanDns => "san_dns",
            IdentitySource::SanUri => "san_uri",
            IdentitySource::Cn => "cn",
        }
    }

    /// A configured name in the form certificates are compared in.
    pub fn normalize(self, name: &str) -> String {
        match self {
            IdentitySource::SanDns => name.to_ascii_lowercase(),
            IdentitySource::SanUri | IdentitySource::Cn => name.to_string(),
        }
    }
}

/// What the handshake proved about the client, fixed for the life of the connection.
///
/// Only the identity *strings* are kept, never a tenant, and those of every kind: the name →
/// tenant map and the kind of name it uses (`client_identity`) live in the config snapshot, so a
/// reload that changes `client_cert_names` or `client_identity` applies to the next request on an
/// already open connection. The chain is kept to verify it again when a reload brings new
/// client verification (a CRL that revokes it, a CA no longer trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SAN DNS names, normalized (see [`IdentitySource::normalize`]).
    dns: Box<[Box<str>]>,
    /// SAN URIs, as written.
    uri: Box<[Box<str>]>,
    /// Subject common names, as written.
    cn: Box<[Box<str>]>,
    /// When the certificates of the chain expire (unix seconds, ascending): at each, the
    /// connection is verified again (`Listener::still_admits`), and closed if it fails. Not
    /// closed outright: a client may send a certificate its verified path does not use (an
    /// old cross-signed CA, expired long ago).
    expiries: Box<[i64]>,
    /// The chain the client presented, leaf first.
    pub(super) chain: Box<[CertificateDer<'static>]>,
}

impl ClientCert {
    /// The identities in a verified chain (leaf first, as `peer_certificates` gives it);
    /// `None` for an empty one.
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<ClientCert> {
        let leaf = chain.first()?;
        let mut expiries: Vec<i64> = chain
            .iter()
            .filter_map(|c| Some(X509Certificate::from_der(c.as_ref()).ok()?.1.validity().not_after.timestamp()))
            .collect();
        expiries.sort_unstable();
        expiries.dedup();
        let expiries = expiries.into_boxed_slice();
        let chain: Box<[CertificateDer<'static>]> = chain.iter().map(|c| c.clone().into_owned()).collect();
        let Ok((_, x509)) = X509Certificate::from_der(leaf.as_ref()) else {
            // rustls verified it, so it parses; if x509-parser disagrees, it maps to no tenant.
            return Some(ClientCert { dns: Box::new([]), uri: Box::new([]), cn: Box::new([]), expiries, chain });
        };
        let (mut dns, mut uri) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => dns.push(IdentitySource::SanDns.normalize(d).into()),
                    GeneralName::URI(u) => uri.push(Box::from(*u)),
                    _ => {}
                }
            }
        }
        let cn: Vec<Box<str>> =
            x509.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(Box::from).collect();
        Some(ClientCert {
            dns: dns.into_boxed_slice(),
            uri: uri.into_boxed_slice(),
            cn: cn.into_boxed_slice(),
            expiries,
            chain,
        })
    }

    /// The first second, from `now_unix_s` on, at which a certificate of the chain is expired
    /// (a `notAfter` is the last valid second); `i64::MAX` if none.
    pub fn next_expiry(&self, now_unix_s: i64) -> i64 {
        self.expiries.iter().map(|&t| t.saturating_add(1)).find(|&t| t > now_unix_s).unwrap_or(i64::MAX)
    }

    /// The names of one kind; may be empty when the certificate carries none.
    pub fn names(&self, source: IdentitySource) -> &[Box<str>] {
        match source {
            IdentitySource::SanDns => &self.dns,
            IdentitySource::SanUri => &self.uri,
            IdentitySource::Cn => &self.cn,
        }
    }

    /// A certificate with the given names of every kind (unit tests of the tenant table).
    #[cfg(test)]
    pub fn with_names(names: &[&str]) -> ClientCert {
        let all: Box<[Box<str>]> = names.iter().map(|n| Box::from(*n)).collect();
        ClientCert { dns: all.clone(), uri: all.clone(), cn: all, expiries: Box::new([]), chain: Box::new([]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_their_names() {
        for a in [ClientAuth::Off, ClientAuth::Optional, ClientAuth::Required] {
            assert_eq!(ClientAuth::parse(a.as_str()), Some(a));
        }
        for s in [IdentitySource::SanDns, IdentitySource::SanUri, IdentitySource::Cn] {
            assert_eq!(IdentitySource::parse(s.as_str()), Some(s));
        }
        assert_eq!(IdentitySource::SanDns.normalize("Bank-A.Example"), "bank-a.example");
        assert_eq!(IdentitySource::Cn.normalize("Bank A"), "Bank A");
    }
}

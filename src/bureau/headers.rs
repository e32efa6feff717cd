//! Header hygiene between the bank and the bureau: hop-by-hop fields, identity and credentials,
//! request ids.
//!
//! A proxy must not forward the fields that describe one connection (RFC 9110 §7.6.1): the
//! `Connection` field, every field it names, and the classic hop-by-hop set.
//!
//! The bureau must learn who asks from bureau-guard alone. A bank could otherwise send
//! `x_tenant: other-bank` (CGI/WSGI-style servers read `_` and `-` alike: both are
//! `HTTP_X_TENANT`), its own `Forwarded`/`X-Forwarded-For`, or a second credential the bureau
//! honours. So every field whose name, lower-cased with `_` read as `-`, is one of
//! [`IDENTITY`] or [`CREDENTIALS`] is removed, all its values, before bureau-guard sets its own.
//!
//! Request ids tie a bank's log line to ours and to the bureau's. The id bureau-guard sends,
//! answers and audits as `x-request-id` is always its own, unique per process without a lock (a
//! random prefix and an atomic counter). A valid id the client sent (`x-client-request-id`, or
//! `x-request-id`) is kept apart, under the name that says whose it is: `x-client-request-id`,
//! to the bureau, in the audit record and in the response.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::{
    CONNECTION, FORWARDED, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_TENANT: HeaderName = HeaderName::from_static("x-tenant");
/// The id a client gave its request, kept apart from ours (never trusted as ours).
pub static X_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-client-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Fields the bureau could read as who is asking or from where: the ones bureau-guard sets, and
/// the forwarding fields only bureau-guard may set (from the connection, not from the client);
/// and the control fields bureau-guard consumes (`x-bureau-priority`, `x-request-timeout-ms`,
/// read in `route/`) or sets itself (`x-expected-timeout-ms`), never passed on as the client
/// sent them.
pub const IDENTITY: &[&str] = &[
    "x-tenant",
    "x-bureau-priority",
    "x-request-timeout-ms",
    "x-expected-timeout-ms",
    "x-request-id",
    "x-client-request-id",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];

/// Credentials: the tenant's key (in whichever field and however many values), and any other
/// the bureau could honour. bureau-guard authenticates to the bureau itself (its TLS client
/// certificate) and names the tenant in `x-tenant`; a cookie is dropped too, because a session
/// the bureau recognised would change answers that are cached and coalesced without it.
pub const CREDENTIALS: &[&str] = &["x-api-key", "authorization", "proxy-authorization", "cookie"];
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop fields: those named by `Connection`, then the fixed set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        // Collect first: the names borrow from the map we are about to change. Rare path.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    // One pass over the names present (a few) instead of a hashed look-up per hop-by-hop name.
    let hop = [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
    ];
    if headers.keys().any(|name| hop.contains(&name)) {
        for name in hop {
            headers.remove(name);
        }
    }
}

/// Whether the field `name` (lower-case, as `HeaderMap` holds it) reads as `ours` once `_` is
/// taken for `-`.
fn reads_as(name: &[u8], ours: &str) -> bool {
    name.len() == ours.len() && name.iter().zip(ours.bytes()).all(|(&a, b)| a == b || (a == b'_' && b == b'-'))
}

/// Removes every field the bureau could read as identity or a credential ([`IDENTITY`],
/// [`CREDENTIALS`], in any spelling with `_` for `-`), all their values. One pass over the
/// names; allocates only when there is something to remove.
pub fn strip_identity(headers: &mut HeaderMap) {
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|n| IDENTITY.iter().chain(CREDENTIALS).any(|ours| reads_as(n.as_str().as_bytes(), ours)))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

/// Prepares the headers the bureau receives: hop-by-hop fields, identity and credentials
/// removed, then bureau-guard's own `x-tenant`, `x-request-id`, the client's id apart, and the
/// client's address as bureau-guard knows it (`Forwarded: for=`, RFC 7239, and
/// `X-Forwarded-For`), never as the client claims it.
pub fn forward(headers: &mut HeaderMap, tenant: &HeaderValue, id: &RequestId, client: Option<&SourceFields>) {
    strip_hop_by_hop(headers);
    strip_identity(headers);
    headers.insert(&X_TENANT, tenant.clone());
    headers.insert(&X_REQUEST_ID, id.id.clone());
    if let Some(client) = &id.client {
        headers.insert(&X_CLIENT_REQUEST_ID, client.clone());
    }
    if let Some(client) = client {
        headers.insert(FORWARDED, client.forwarded.clone());
        headers.insert(&X_FORWARDED_FOR, client.x_forwarded_for.clone());
    }
}

/// A client's address as the bureau is told it (`Forwarded: for=`, `X-Forwarded-For`),
/// formatted once per connection rather than per request (the formatting was a tenth of
/// bureau-guard's own instructions per request).
#[derive(Debug)]
pub struct SourceFields {
    ip: IpAddr,
    forwarded: HeaderValue,
    x_forwarded_for: HeaderValue,
}

impl SourceFields {
    pub fn new(ip: IpAddr) -> SourceFields {
        let forwarded = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        SourceFields {
            ip,
            forwarded: HeaderValue::from_str(&forwarded).expect("an address is a valid header value"),
            x_forwarded_for: HeaderValue::from_str(&ip.to_string()).expect("an address is a valid value"),
        }
    }

    /// `ip`'s fields: `known`'s if they are `ip`'s (the connection's peer, nearly always), else
    /// made now (a trusted proxy named another client).
    pub fn of(known: Option<&Arc<SourceFields>>, ip: IpAddr) -> Arc<SourceFields> {
        match known {
            Some(k) if k.ip == ip => Arc::clone(k),
            _ => Arc::new(SourceFields::new(ip)),
        }
    }
}

/// A request's ids: bureau-guard's own, and the one its client sent, if valid.
#[derive(Debug, Clone)]
pub struct RequestId {
    /// Sent, answered and audited as `x-request-id`.
    pub id: HeaderValue,
    /// The client's, sent, answered and audited as `x-client-request-id`.
    pub client: Option<HeaderValue>,
}

/// Makes request ids: `<8 hex process prefix>-<16 hex counter>`.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds { prefix: fastrand::u32(..), next: AtomicU64::new(0) }
    }
}

impl RequestIds {
    /// A new id of ours, and the client's `x-client-request-id` (else `x-request-id`) if it is
    /// valid (1-128 of `A-Za-z0-9-_.:`).
    pub fn for_request(&self, headers: &HeaderMap) -> RequestId {
        let client = [&X_CLIENT_REQUEST_ID, &X_REQUEST_ID]
            .into_iter()
            .find_map(|name| headers.get(name).filter(|v| is_valid_request_id(v.as_bytes())))
            .cloned();
        RequestId { id: self.generate(), client }
    }

    /// A new id, unique within this process and unlikely to repeat across restarts.
    pub fn generate(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 25];
        hex::encode_to_slice(self.prefix.to_be_bytes(), &mut buf[..8]).expect("8 hex chars for 4 bytes");
        buf[8] = b'-';
        hex::encode_to_slice(n.to_be_bytes(), &mut buf[9..]).expect("16 hex chars for 8 bytes");
        HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
    }
}

fn is_valid_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_and_fixed_hop_by_hop_fields() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn our_request_id_is_always_made_and_the_clients_kept_apart_when_valid() {
        let ids = RequestIds::default();
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("bank-a:42"));
        let id = ids.for_request(&h);
        assert_ne!(id.id, "bank-a:42", "never the client's");
        assert_eq!(id.id.len(), 25);
        assert_eq!(id.client.as_ref().unwrap(), "bank-a:42");
        h.insert(&X_CLIENT_REQUEST_ID, HeaderValue::from_static("bank-a:43"));
        assert_eq!(ids.for_request(&h).client.unwrap(), "bank-a:43", "the explicit name first");
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(ids.for_request(&h).client.is_none());
        assert_ne!(ids.generate(), ids.generate());
    }

    #[test]
    fn identity_and_credential_fields_are_removed_in_every_spelling() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x_tenant", "other-bank"),
            ("x-tenant", "other-bank"),
            ("x_request_id", "forged"),
            ("x-request-id", "forged"),
            ("x_client_request_id", "forged"),
            ("forwarded", "for=10.0.0.1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x_forwarded_for", "10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-api-key", "key-a"),
            ("x_api_key", "key-a"),
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("proxy-authorization", "Basic x"),
            ("cookie", "session=bank-b"),
            ("x-bank-trace", "kept"),
            ("x_bank_trace", "kept"),
        ] {
            h.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        h.append(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer key-a"));
        strip_identity(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-bank-trace", "x_bank_trace"], "{h:?}");
    }

    #[test]
    fn forward_sets_our_identity_and_the_clients_id_apart() {
        let mut h = HeaderMap::new();
        h.insert("x_tenant", HeaderValue::from_static("b"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("forged"));
        let id = RequestId { id: HeaderValue::from_static("ours-1"), client: Some(HeaderValue::from_static("bank:1")) };
        forward(&mut h, &HeaderValue::from_static("a"), &id, None);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[&X_TENANT], "a");
        assert_eq!(h[&X_REQUEST_ID], "ours-1");
        assert_eq!(h[&X_CLIENT_REQUEST_ID], "bank:1");
    }

    #[test]
    fn forward_says_where_the_request_came_from_as_we_know_it() {
        let id = RequestId { id: HeaderValue::from_static("ours-1"), client: None };
        let mut h = HeaderMap::new();
        h.insert(FORWARDED, HeaderValue::from_static("for=10.9.9.9"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9"));
        forward(&mut h, &HeaderValue::from_static("a"), &id, Some(&SourceFields::new("192.0.2.7".parse().unwrap())));
        assert_eq!(
            (h[&FORWARDED].to_str().unwrap(), h["x-forwarded-for"].to_str().unwrap()),
            ("for=192.0.2.7", "192.0.2.7")
        );
        assert_eq!(h.get_all(FORWARDED).iter().count(), 1, "the client's own is gone");
        forward(&mut h, &HeaderValue::from_static("a"), &id, Some(&SourceFields::new("2001:db8::1".parse().unwrap())));
        assert_eq!(h[&FORWARDED], "for=\"[2001:db8::1]\"");
    }
}

/// The identity invariant as properties: whatever names and values a client sends, in whatever
/// `_`/`-` spelling and case, the bureau sees only bureau-guard's identity fields.
#[cfg(test)]
mod property {
    use proptest::prelude::*;

    use super::*;

    /// One of our identity or credential names, in a random spelling: each `-` maybe `_`, each
    /// letter maybe upper case (`HeaderName` lower-cases it, as the wire does not).
    fn ours_spelled() -> impl Strategy<Value = String> {
        let name = prop::sample::select(IDENTITY.iter().chain(CREDENTIALS).copied().collect::<Vec<_>>());
        (name, prop::collection::vec(any::<(bool, bool)>(), 32)).prop_map(|(n, flips)| {
            n.chars()
                .zip(flips)
                .map(|(c, (under, upper))| match c {
                    '-' if under => '_',
                    c if upper => c.to_ascii_uppercase(),
                    c => c,
                })
                .collect()
        })
    }

    /// Names that are not ours but look close (a prefix, a suffix, one letter off).
    fn other_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "x-tenants",
            "x-tenant-id",
            "tenant",
            "x_bank_trace",
            "x-request",
            "x-api-keys",
            "authorization2",
            "accept",
            "content-type",
            "x-forwarded",
            "cookie2",
        ])
        .prop_map(String::from)
    }

    fn value() -> impl Strategy<Value = HeaderValue> {
        "[ -~]{0,24}".prop_map(|v| HeaderValue::from_str(&v).expect("visible ASCII is a valid value"))
    }

    fn request_headers() -> impl Strategy<Value = Vec<(String, HeaderValue)>> {
        prop::collection::vec((prop_oneof![ours_spelled(), other_name()], value()), 0..12)
    }

    fn map(fields: &[(String, HeaderValue)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(HeaderName::from_bytes(n.as_bytes()).expect("a valid name"), v.clone());
        }
        h
    }

    fn is_ours(name: &str) -> bool {
        let dashed = name.to_ascii_lowercase().replace('_', "-");
        IDENTITY.iter().chain(CREDENTIALS).any(|ours| *ours == dashed)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn strip_identity_removes_every_spelling_and_nothing_else(fields in request_headers()) {
            let mut h = map(&fields);
            strip_identity(&mut h);
            for (n, v) in &fields {
                let lower = n.to_ascii_lowercase();
                if is_ours(n) {
                    prop_assert!(!h.contains_key(lower.as_str()), "{} survived", n);
                } else {
                    prop_assert!(h.get_all(lower.as_str()).iter().any(|x| x == v), "{} was removed", n);
                }
            }
        }

        #[test]
        fn forward_never_lets_a_client_identity_through(
            fields in request_headers(),
            client_id in prop::option::of("[A-Za-z0-9._:-]{1,16}"),
            addr in prop::option::of(any::<std::net::IpAddr>()),
        ) {
            let mut h = map(&fields);
            let id = RequestId {
                id: HeaderValue::from_static("ours-1"),
                client: client_id.map(|c| HeaderValue::from_str(&c).unwrap()),
            };
            forward(&mut h, &HeaderValue::from_static("bank-a"), &id, addr.map(SourceFields::new).as_ref());
            // Every field left that reads as ours has exactly one value, and it is ours.
            let ours: Vec<(&str, Option<String>)> = vec![
                ("x-tenant", Some("bank-a".into())),
                ("x-request-id", Some("ours-1".into())),
                ("x-client-request-id", id.client.as_ref().map(|c| c.to_str().unwrap().to_string())),
                ("forwarded", addr.map(|a| match a {
                    IpAddr::V4(v4) => format!("for={v4}"),
                    IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
                })),
                ("x-forwarded-for", addr.map(|a| a.to_string())),
            ];
            for name in h.keys() {
                if is_ours(name.as_str()) {
                    let expected = ours.iter().find(|(n, _)| *n == name.as_str()).and_then(|(_, v)| v.as_deref());
                    let values: Vec<&str> = h.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
                    prop_assert_eq!(values, expected.into_iter().collect::<Vec<_>>(), "{}", name);
                }
            }
            for (name, value) in &ours {
                prop_assert_eq!(h.get(*name).map(|v| v.to_str().unwrap()), value.as_deref(), "{}", name);
            }
        }
    }
}

//! Header hygiene between the bank and the bureau: hop-by-hop fields and request ids.
//!
//! A proxy must not forward the fields that describe one connection (RFC 9110 §7.6.1): the
//! `Connection` field, every field it names, and the classic hop-by-hop set. Request ids tie a
//! bank's log line to ours and to the bureau's: a valid id sent by the client is kept, otherwise
//! one is made here, unique per process without a lock (a random prefix and an atomic counter).

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_TENANT: HeaderName = HeaderName::from_static("x-tenant");
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
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
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
    /// The client's `x-request-id` if it is valid (1-128 of `A-Za-z0-9-_.:`), else a new one.
    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID)
            && is_valid_request_id(v.as_bytes())
        {
            return v.clone();
        }
        self.generate()
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
    fn request_ids_are_kept_when_valid_and_made_otherwise() {
        let ids = RequestIds::default();
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("bank-a:42"));
        assert_eq!(ids.for_request(&h), "bank-a:42");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        let made = ids.for_request(&h);
        assert_eq!(made.len(), 25);
        assert_ne!(ids.generate(), ids.generate());
    }
}

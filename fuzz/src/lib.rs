//! The fuzz targets' bodies: each takes arbitrary bytes, runs one parser, and panics if a
//! property the rest of the proxy relies on does not hold.
//!
//! Shared by the cargo-fuzz targets (`fuzz_targets/`, nightly, coverage-guided) and by
//! `tests/fuzz_corpus.rs` (stable: every seed replayed by `cargo test`, plus a bounded mutation
//! loop when `BUREAU_GUARD_FUZZ_SECONDS` is set), so a crash found by either is a test case for
//! both. Kept out of the shipped library: it is included by path.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bureau_guard::cache::key::{KeyPart, KeySecret, KeySpec, Scope};
use bureau_guard::config::Config;
use bureau_guard::route::path::normalize;
use bureau_guard::server::proxy_protocol::{HeaderError, read_header, refuse_header};

/// The config parser: any text parses into a config or into at least one problem, never a
/// panic; a config that parses parses again to the same config.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |name: &str| (name.len() % 2 == 0).then(|| format!("value-of-{name}"));
    match Config::from_toml(text, &env) {
        Ok(c) => {
            let again = Config::from_toml(text, &env).expect("the same text parses twice");
            assert_eq!(c, again, "parsing is deterministic");
        }
        Err(e) => assert!(!e.problems.is_empty(), "an error carries at least one problem"),
    }
}

/// Path normalisation: a target is refused or normalised; the normal form is normal (idempotent),
/// absolute, without `//` or dot segments; an escaped `/` is always refused; the query is
/// forwarded byte for byte.
pub fn path(data: &[u8]) {
    let Ok(uri) = http::Uri::try_from(data) else { return };
    let Some(original) = uri.path_and_query().map(|pq| pq.as_str().to_string()) else { return };
    let result = normalize(&uri);
    let raw_path = uri.path().to_ascii_lowercase();
    if raw_path.contains("%2f") || raw_path.contains("%5c") {
        assert!(result.is_err(), "{original:?}: an escaped slash must be refused");
    }
    let Ok(out) = result else { return };
    let normal = out.map_or(original.clone(), |pq| pq.as_str().to_string());
    check_normal_path(&original, &normal);
    let again: http::Uri = normal.parse().expect("a normal target parses");
    assert_eq!(normalize(&again), Ok(None), "{original:?} → {normal:?} is not normal");
}

/// What every target the bureau is sent looks like.
pub fn check_normal_path(original: &str, normal: &str) {
    let (path, query) = normal.split_once('?').map_or((normal, None), |(p, q)| (p, Some(q)));
    assert!(path.starts_with('/'), "{original:?} → {normal:?}: not absolute");
    assert!(!path.contains("//"), "{original:?} → {normal:?}: empty segment");
    assert!(path == "/" || !path.ends_with('/'), "{original:?} → {normal:?}: trailing slash");
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "{original:?} → {normal:?}: dot segment");
    }
    let original_query = original.split_once('?').map(|(_, q)| q);
    assert_eq!(query, original_query, "{original:?} → {normal:?}: the query changed");
}

/// Cache-key building: never a panic, the same request always gets the same key, and with the
/// tenant scope two tenants never share one.
///
/// Input: one byte picks the key parts, then the path value, query and body separated by `\n`.
pub fn cache_key(data: &[u8]) {
    let Some((&select, rest)) = data.split_first() else { return };
    let mut fields = rest.splitn(3, |&b| b == b'\n');
    let value = String::from_utf8_lossy(fields.next().unwrap_or_default());
    let query = fields.next().map(String::from_utf8_lossy);
    let body = fields.next().unwrap_or_default();

    let all = ["path.subject_id", "query.report_type", "body.subject_id", "body.applicant.id"];
    let parts: Vec<KeyPart> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| select & (1 << i) != 0)
        .map(|(_, p)| KeyPart::parse(p).expect("valid part"))
        .collect();
    let scope = if select & 0x80 != 0 { Scope::Shared } else { Scope::Tenant };
    let spec = KeySpec::new("r", scope, parts);
    let secret = KeySecret::from_bytes([5; 32]);

    // The path value as the proxy would route it: normalised first, refused if ambiguous.
    let Ok(uri) = http::Uri::try_from(format!("/v1/score/{value}")) else { return };
    let Ok(normal) = normalize(&uri) else { return };
    let forwarded = normal.map_or_else(|| uri.path().to_string(), |pq| pq.path().to_string());
    let mut router = matchit::Router::new();
    router.insert("/v1/score/{subject_id}", ()).expect("a valid pattern");
    let params = router.at(&forwarded).map(|m| m.params).unwrap_or_default();

    let key = |tenant: &str| spec.key(&secret, tenant, &params, query.as_deref(), body);
    let (a, again) = (key("bank-a"), key("bank-a"));
    assert_eq!(a, again, "one request, one key");
    if let (Ok(a), Ok(b)) = (a, key("bank-b")) {
        assert_eq!(a == b, scope == Scope::Shared, "tenants share a key only on a shared route");
    }
}

/// PROXY header parsing, on a trusted connection and an untrusted one: never a panic; what
/// follows the header is handed back whole and in order (nothing read past the header is lost);
/// the part consumed is exactly one complete header.
pub fn proxy_header(data: &[u8]) {
    // Split the input into reads of varying sizes, as a socket would deliver it.
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    match ready(read_header(Chunked { data, at: 0, chunk })) {
        Ok((source, mut rest)) => {
            let after = read_all(&mut rest);
            assert!(data.ends_with(&after), "the bytes after the header are handed back in order");
            let consumed = &data[..data.len() - after.len()];
            assert!(!consumed.is_empty() && consumed.len() <= 1024 + 256, "one bounded header");
            let header_len = match ppp::HeaderResult::parse(consumed) {
                ppp::HeaderResult::V1(Ok(h)) => h.header.len(),
                ppp::HeaderResult::V2(Ok(h)) => h.len(),
                other => panic!("the consumed bytes are not a valid header: {other:?}"),
            };
            assert_eq!(header_len, consumed.len(), "exactly one header is consumed");
            if source.is_some() {
                assert!(consumed.starts_with(b"PROXY ") || consumed.starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
            }
        }
        Err(HeaderError::Untrusted) => unreachable!("read_header trusts its peer"),
        Err(HeaderError::Invalid | HeaderError::Closed) => {
            // However the reads split it, a header `ppp` accepts whole (of a size we wait for)
            // is not refused.
            let whole = match ppp::HeaderResult::parse(data) {
                ppp::HeaderResult::V1(Ok(h)) => Some(h.header.len()),
                ppp::HeaderResult::V2(Ok(h)) => Some(h.len()),
                _ => None,
            };
            assert!(whole.is_none_or(|len| len > 1024), "a valid header was refused");
        }
    }
    match ready(refuse_header(Chunked { data, at: 0, chunk })) {
        Ok(mut rest) => assert_eq!(read_all(&mut rest), data, "an untrusted peer's bytes are kept whole"),
        Err(HeaderError::Untrusted) => {
            assert!(data.starts_with(b"PROXY ") || data.starts_with(b"\r\n\r\n\0\r\nQUIT\n"))
        }
        Err(HeaderError::Closed) => {
            let undecided = |sig: &[u8]| data.len() < sig.len() && sig.starts_with(data);
            assert!(undecided(b"PROXY ") || undecided(b"\r\n\r\n\0\r\nQUIT\n"), "closed while undecided");
        }
        Err(HeaderError::Invalid) => unreachable!("refuse_header only refuses headers"),
    }
}

/// A reader that never waits and hands out at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    at: usize,
    chunk: usize,
}

impl tokio::io::AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (self.data.len() - self.at).min(self.chunk).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose reads never wait (in-memory readers) to its end, without a runtime.
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("in-memory reads never wait"),
    }
}

fn read_all<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    ready(r.read_to_end(&mut out)).expect("in-memory reads do not fail");
    out
}

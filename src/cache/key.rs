//! What makes two look-ups "the same": the cache and coalescing key of a request.
//!
//! Caching and coalescing hand one bureau answer to several requests, so the key decides who may
//! receive what. Get it wrong one way and a bank receives a report fetched for another subject
//! (or another bank); get it wrong the other way and identical look-ups are all sent to the bureau.
//! So a key is built from exactly what the route's `cache_key` names (path and query parameters,
//! JSON body fields), normalized only where the bureau must read two spellings alike, and it is
//! always scoped: to the tenant, unless the route is explicitly `scope = "shared"`.
//!
//! The key is a 32-byte keyed hash ([`blake3`] with a secret that is configured or random per
//! process), never the raw values: subject ids do not sit in memory as cache keys, and a key that
//! ends up in an audit line says nothing to whoever lacks the secret.
//!
//! The rule: two requests get one key only if the bureau sees the same bytes for the keyed
//! parts, however it parses them (a wrong merge leaks a report; a missed one costs one bureau
//! call). So a key is never looser than the bureau:
//! - path values are keyed as they are forwarded: the target is normalised before routing
//!   (`route/path.rs`: `%2D` is already `-`, hex upper-case, ambiguous escapes refused), and the
//!   parameter's bytes are keyed as they are, never decoded again (`a%2Bb` and `a+b` differ);
//! - the query is forwarded unchanged, so a query part keys on the raw `name=value` pairs, in
//!   order, of every parameter a lenient parser could read as that name: the name
//!   percent-decoded, `+` as a space, in any case (`Report%5FType=x` is keyed, as spelled, for
//!   `report_type`); `+`, `%20` and `%2B` differ, as do `%2b` and `%2B`;
//! - JSON bodies are parsed once; field order and whitespace do not matter, string escapes are
//!   decoded (every JSON parser does), `1` and `"1"` differ; field names that are equal or equal
//!   but for case (`subject_id`, `Subject_ID`, `subject\u005fid`) twice in one object and
//!   non-JSON bodies are refused (400: parsers pick different ones); a key field is found in any
//!   case and keyed with its name as spelled; a non-integer number in a key field cannot be
//!   keyed exactly, so such a request bypasses cache and coalescing;
//! - a missing part is keyed as missing, which differs from an empty value.
//!
//! ```
//! use bureau_guard::cache::key::{KeyPart, KeySecret, KeySpec, Scope};
//!
//! let spec = KeySpec::new("report", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap()]);
//! let secret = KeySecret::from_bytes([7; 32]);
//! let params = matchit::Params::new();
//! let a = spec.key(&secret, "bank-a", &params, None, br#"{"subject_id": "S1", "purpose": "loan"}"#).unwrap();
//! let b = spec.key(&secret, "bank-a", &params, None, br#"{"purpose":"loan","subject_id":"S1"}"#).unwrap();
//! assert_eq!(a, b);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use matchit::Params;
use percent_encoding::percent_decode;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Bumped if the encoding below ever changes, so old and new keys can never be equal.
const DOMAIN: &[u8] = b"bureau-guard cache key v2";

/// The secret that keys every cache key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySecret([u8; 32]);

impl KeySecret {
    pub fn from_bytes(bytes: [u8; 32]) -> KeySecret {
        KeySecret(bytes)
    }

    /// Parses 64 hex characters (e.g. the output of `openssl rand -hex 32`).
    pub fn from_hex(s: &str) -> Option<KeySecret> {
        let mut bytes = [0u8; 32];
        (s.len() == 64 && hex::decode_to_slice(s, &mut bytes).is_ok()).then_some(KeySecret(bytes))
    }

    /// A fresh secret from the operating system's random source. Keys made with it are valid for
    /// this process only, so a restart starts with a cold cache and new audit subject hashes.
    pub fn random() -> KeySecret {
        let mut bytes = [0u8; 32];
        // Failing to read the OS random source means the OS cannot run TLS or anything else
        // either; there is no safe fallback (a guessable secret would make keys guessable).
        getrandom::fill(&mut bytes).expect("the operating system's random source is available");
        KeySecret(bytes)
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(<redacted>)")
    }
}

/// Whose look-ups may share an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    /// Only requests of the same tenant: a tenant only ever receives what was fetched for itself.
    #[default]
    Tenant,
    /// Every tenant: for non-personal reference data only, and only when configured explicitly.
    Shared,
}

impl Scope {
    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Shared => "shared",
        }
    }
}

/// One named part of a route's `cache_key`, as written in the config (`"path.subject_id"`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyPart {
    /// A `{name}` parameter of the route's path pattern.
    Path(String),
    /// A query parameter (every `name=value` pair a parser could read as it, raw, in order).
    Query(String),
    /// A field of the JSON body; several names walk into nested objects (`body.applicant.id`).
    Body(Vec<String>),
}

impl KeyPart {
    /// Parses `path.NAME`, `query.NAME` or `body.FIELD[.FIELD...]`. The error says what is wrong
    /// with `s`, for a config problem.
    pub fn parse(s: &str) -> Result<KeyPart, String> {
        let expected = "expected \"path.NAME\", \"query.NAME\" or \"body.FIELD\"";
        let Some((source, name)) = s.split_once('.') else {
            return Err(format!("{s:?}: {expected}"));
        };
        if name.is_empty() {
            return Err(format!("{s:?}: the name after {source:?} is empty"));
        }
        match source {
            "path" => Ok(KeyPart::Path(name.to_string())),
            "query" => Ok(KeyPart::Query(name.to_string())),
            "body" => {
                let fields: Vec<String> = name.split('.').map(str::to_string).collect();
                if fields.iter().any(String::is_empty) {
                    return Err(format!("{s:?}: empty field name in {name:?}"));
                }
                Ok(KeyPart::Body(fields))
            }
            other => Err(format!("{s:?}: unknown source {other:?}; {expected}")),
        }
    }

    /// Whether the part reads the request body.
    pub fn is_body(&self) -> bool {
        matches!(self, KeyPart::Body(_))
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Path(n) => write!(f, "path.{n}"),
            KeyPart::Query(n) => write!(f, "query.{n}"),
            KeyPart::Body(fields) => write!(f, "body.{}", fields.join(".")),
        }
    }
}

/// A look-up's identity: a keyed hash of route, scope and the named parts.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lower-case hex characters: the audit log's subject hash.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A key from raw bytes (tests and benchmarks; real keys come from [`KeySpec::key`]).
    pub fn from_bytes(bytes: [u8; 32]) -> CacheKey {
        CacheKey(bytes)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", hex::encode(&self.0[..8]))
    }
}

/// Why no key could be made for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The route keys on body fields and the body is not JSON (or repeats a field name, which
    /// parsers resolve differently). The client's fault: answer 400 `bad_request`, call nobody.
    InvalidJson(String),
    /// A key field holds a value that cannot be keyed exactly (a non-integer number): serve the
    /// request, but neither from the cache nor by joining another call.
    Inexact,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::InvalidJson(e) => write!(f, "the request body is not valid JSON: {e}"),
            KeyError::Inexact => f.write_str("a key field holds a number that cannot be keyed exactly"),
        }
    }
}

/// A route's key recipe, compiled once per config.
#[derive(Debug, Clone)]
pub struct KeySpec {
    route: Arc<str>,
    scope: Scope,
    /// Sorted, so reordering `cache_key` in the config does not change the keys; each with its
    /// name as hashed (`body.subject_id`), made once here rather than per request.
    parts: Vec<(KeyPart, Box<str>)>,
    needs_body: bool,
}

impl KeySpec {
    /// `parts` are the route's validated `cache_key`.
    pub fn new(route: &str, scope: Scope, mut parts: Vec<KeyPart>) -> KeySpec {
        parts.sort();
        parts.dedup();
        let needs_body = parts.iter().any(KeyPart::is_body);
        let parts = parts
            .into_iter()
            .map(|p| {
                let name = p.to_string().into_boxed_str();
                (p, name)
            })
            .collect();
        KeySpec { route: Arc::from(route), scope, parts, needs_body }
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Whether [`KeySpec::key`] parses the body (the proxy must have read it).
    pub fn needs_body(&self) -> bool {
        self.needs_body
    }

    /// The key of one request of this route, asked by `tenant` (its id). `params` are the
    /// route's path parameters (of the normalised path, as forwarded), `query` the raw query
    /// string, `body` the raw body (read only if some part names a body field).
    pub fn key(
        &self,
        secret: &KeySecret,
        tenant: &str,
        params: &Params<'_, '_>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<CacheKey, KeyError> {
        let json = if self.needs_body { Some(parse_body(body)?) } else { None };
        let mut h = blake3::Hasher::new_keyed(&secret.0);
        h.update(DOMAIN);
        field(&mut h, self.route.as_bytes());
        match self.scope {
            Scope::Tenant => {
                h.update(&[1]);
                field(&mut h, tenant.as_bytes());
            }
            // A different tag than any tenant: no tenant id can spell the shared scope.
            Scope::Shared => {
                h.update(&[2]);
            }
        }
        let mut scratch = Vec::new();
        for (part, name) in &self.parts {
            field(&mut h, name.as_bytes());
            match part {
                // Bytes as forwarded: decoding here would merge what a raw-reading bureau splits.
                KeyPart::Path(name) => match params.get(name) {
                    Some(raw) => values(&mut h, std::iter::once(raw.as_bytes())),
                    None => missing(&mut h),
                },
                KeyPart::Query(name) => {
                    let mut found = query
                        .unwrap_or("")
                        .split('&')
                        .filter(|pair| {
                            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
                            !pair.is_empty() && lenient_name_eq(k, name, &mut scratch)
                        })
                        .peekable();
                    if found.peek().is_none() {
                        missing(&mut h);
                    } else {
                        values(&mut h, found.map(str::as_bytes));
                    }
                }
                KeyPart::Body(fields) => {
                    let mut value = json.as_ref();
                    h.update(&[3]);
                    for f in fields {
                        let Some((spelled, v)) = value.and_then(|v| v.get(f)) else {
                            value = None;
                            break;
                        };
                        // The name as spelled: `Subject_ID` is another request than `subject_id`
                        // for a bureau that matches names exactly.
                        field(&mut h, spelled.as_bytes());
                        value = Some(v);
                    }
                    match value {
                        Some(v) => {
                            scratch.clear();
                            v.write_canonical(&mut scratch)?;
                            values(&mut h, std::iter::once(scratch.as_slice()));
                        }
                        None => missing(&mut h),
                    }
                }
            }
        }
        Ok(CacheKey(*h.finalize().as_bytes()))
    }
}

/// A length-prefixed field, so that no two sequences of fields hash the same bytes.
fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn missing(h: &mut blake3::Hasher) {
    h.update(&[0]);
}

fn values<'a>(h: &mut blake3::Hasher, vs: impl Iterator<Item = &'a [u8]>) {
    h.update(&[1]);
    for v in vs {
        field(h, v);
    }
}

/// Whether a parser could read the raw query name `raw` as `name`: percent-decoded, `+` as a
/// space, compared without regard to ASCII case. Exact names need no decoding.
fn lenient_name_eq(raw: &str, name: &str, buf: &mut Vec<u8>) -> bool {
    if raw.eq_ignore_ascii_case(name) {
        return true;
    }
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return false;
    }
    buf.clear();
    buf.extend(percent_decode(raw.as_bytes()).map(|b| if b == b'+' { b' ' } else { b }));
    buf.eq_ignore_ascii_case(name.as_bytes())
}

/// A field name as case-insensitive parsers compare it (Java's `equalsIgnoreCase`, .NET's
/// `OrdinalIgnoreCase`): each character upper-cased, then lower-cased, so that `ſ` (long s) and
/// the Kelvin sign fold with `s` and `k`.
fn fold(name: &str) -> std::borrow::Cow<'_, str> {
    if name.is_ascii() {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return name.to_ascii_lowercase().into();
        }
        return name.into();
    }
    name.chars().flat_map(char::to_uppercase).flat_map(char::to_lowercase).collect::<String>().into()
}

fn parse_body(body: &[u8]) -> Result<Json, KeyError> {
    serde_json::from_slice(body).map_err(|e| KeyError::InvalidJson(e.to_string()))
}

/// A JSON value as far as a key cares: objects sorted by field name, duplicate names refused,
/// numbers kept exact (integers) or marked as not keyable (floats).
#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Float,
    String(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

impl Json {
    /// The field named `field` in any case, with its name as spelled (at most one: names equal
    /// but for case were refused when parsing).
    fn get(&self, field: &str) -> Option<(&str, &Json)> {
        let Json::Object(m) = self else { return None };
        if let Some((k, v)) = m.get_key_value(field) {
            return Some((k, v));
        }
        let folded = fold(field);
        m.iter().find(|(k, _)| fold(k) == folded).map(|(k, v)| (k.as_str(), v))
    }

    /// Canonical JSON text: no whitespace, fields sorted, strings with serde_json's escaping.
    fn write_canonical(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Json::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Json::Float => return Err(KeyError::Inexact),
            Json::String(s) => write_string(s, out),
            Json::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_canonical(out)?;
                }
                out.push(b']');
            }
            Json::Object(fields) => {
                out.push(b'{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_string(k, out);
                    out.push(b':');
                    v.write_canonical(out)?;
                }
                out.push(b'}');
            }
        }
        Ok(())
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing a string into a Vec cannot fail");
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Int(i128::from(v)))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Json, E> {
        // serde_json hands over floats and integers beyond 64 bits as f64, which has lost digits:
        // two different numbers could become one key.
        Ok(Json::Float)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut fields = BTreeMap::new();
        let mut folded = std::collections::HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value()?;
            // Parsers disagree on duplicates (first wins, last wins) and some compare names
            // without case: the bureau could read another subject than the key names.
            if !folded.insert(fold(&name).into_owned()) {
                return Err(de::Error::custom(format!("duplicate field {name:?} (names are compared without case)")));
            }
            fields.insert(name, value);
        }
        Ok(Json::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(parts: &[&str]) -> KeySpec {
        KeySpec::new("report", Scope::Tenant, parts.iter().map(|p| KeyPart::parse(p).unwrap()).collect())
    }

    fn secret() -> KeySecret {
        KeySecret::from_bytes([42; 32])
    }

    fn body_key(spec: &KeySpec, tenant: &str, body: &str) -> Result<CacheKey, KeyError> {
        spec.key(&secret(), tenant, &Params::new(), None, body.as_bytes())
    }

    /// Path parameters as the router would extract them from `path` for `pattern`.
    fn with_params<R>(pattern: &str, path: &str, f: impl FnOnce(&Params<'_, '_>) -> R) -> R {
        let mut router = matchit::Router::new();
        router.insert(pattern, ()).unwrap();
        let m = router.at(path).unwrap();
        f(&m.params)
    }

    #[test]
    fn field_order_and_whitespace_do_not_change_the_key() {
        let s = spec(&["body.subject_id", "body.report_type"]);
        let a = body_key(&s, "bank-a", r#"{"subject_id":"S1","report_type":"full","nonce":1}"#).unwrap();
        let b = body_key(&s, "bank-a", "{\n  \"report_type\" : \"full\",\n\t\"subject_id\": \"S1\", \"nonce\": 2 }")
            .unwrap();
        assert_eq!(a, b, "same parts, different order, whitespace and unkeyed fields");
        let nested_a = body_key(&spec(&["body.applicant"]), "t", r#"{"applicant":{"id":"S1","dob":"1990"}}"#);
        let nested_b = body_key(&spec(&["body.applicant"]), "t", r#"{"applicant":{ "dob":"1990" ,"id":"S1"}}"#);
        assert_eq!(nested_a.unwrap(), nested_b.unwrap(), "nested objects are canonical too");
    }

    #[test]
    fn different_values_and_types_give_different_keys() {
        let s = spec(&["body.subject_id"]);
        let k = |b: &str| body_key(&s, "bank-a", b).unwrap();
        assert_ne!(k(r#"{"subject_id":"S1"}"#), k(r#"{"subject_id":"S2"}"#));
        assert_ne!(k(r#"{"subject_id":"1"}"#), k(r#"{"subject_id":1}"#), "a string is not a number");
        assert_eq!(k(r#"{"subject_id":"A"}"#), k(r#"{"subject_id":"\u0041"}"#), "escapes are decoded");
        let nested = spec(&["body.applicant.id"]);
        assert_eq!(
            body_key(&nested, "t", r#"{"applicant":{"id":"S1","x":1}}"#).unwrap(),
            body_key(&nested, "t", r#"{"applicant":{"id":"S1"}}"#).unwrap()
        );
    }

    #[test]
    fn tenants_get_different_keys_unless_the_route_is_shared() {
        let s = spec(&["body.subject_id"]);
        let body = r#"{"subject_id":"S1"}"#;
        assert_ne!(body_key(&s, "bank-a", body).unwrap(), body_key(&s, "bank-b", body).unwrap());
        let shared = KeySpec::new("codes", Scope::Shared, vec![KeyPart::parse("body.subject_id").unwrap()]);
        assert_eq!(body_key(&shared, "bank-a", body).unwrap(), body_key(&shared, "bank-b", body).unwrap());
        // The shared scope and a tenant-scoped key for the same route never collide.
        let tenant_scoped = KeySpec::new("codes", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap()]);
        assert_ne!(body_key(&shared, "", body).unwrap(), body_key(&tenant_scoped, "", body).unwrap());
    }

    #[test]
    fn routes_and_secrets_separate_keys() {
        let body = br#"{"subject_id":"S1"}"#;
        let parts = vec![KeyPart::parse("body.subject_id").unwrap()];
        let a = KeySpec::new("report", Scope::Tenant, parts.clone());
        let b = KeySpec::new("score", Scope::Tenant, parts);
        let p = Params::new();
        assert_ne!(a.key(&secret(), "t", &p, None, body).unwrap(), b.key(&secret(), "t", &p, None, body).unwrap());
        let other = KeySecret::from_bytes([43; 32]);
        assert_ne!(a.key(&secret(), "t", &p, None, body).unwrap(), a.key(&other, "t", &p, None, body).unwrap());
    }

    #[test]
    fn a_missing_part_differs_from_an_empty_one() {
        let s = spec(&["body.subject_id"]);
        let missing = body_key(&s, "t", r#"{"other":"x"}"#).unwrap();
        assert_ne!(missing, body_key(&s, "t", r#"{"subject_id":""}"#).unwrap());
        assert_ne!(missing, body_key(&s, "t", r#"{"subject_id":null}"#).unwrap());
        let q = spec(&["query.report_type"]);
        let k = |query: Option<&str>| q.key(&secret(), "t", &Params::new(), query, b"").unwrap();
        assert_ne!(k(None), k(Some("report_type=")));
        assert_ne!(k(Some("report_type")), k(Some("other=1")), "a bare name is present and empty");
        assert_eq!(k(None), k(Some("other=1")));
    }

    #[test]
    fn invalid_or_ambiguous_json_is_refused() {
        let s = spec(&["body.subject_id"]);
        for bad in ["", "{", "subject_id=S1", r#"{"subject_id":"S1","subject_id":"S2"}"#] {
            assert!(matches!(body_key(&s, "t", bad), Err(KeyError::InvalidJson(_))), "{bad:?}");
        }
        assert_eq!(body_key(&s, "t", r#"{"subject_id":1.5}"#), Err(KeyError::Inexact));
        assert_eq!(body_key(&s, "t", r#"{"subject_id":123456789012345678901234567890}"#), Err(KeyError::Inexact));
        assert!(body_key(&s, "t", r#"{"subject_id":"S1","amount":1.5}"#).is_ok(), "only key fields must be exact");
        assert!(body_key(&s, "t", "[1,2]").is_ok(), "valid JSON without the field: keyed as missing");
        // A route that keys on no body field never looks at the body.
        assert!(spec(&["query.id"]).key(&secret(), "t", &Params::new(), None, b"not json").is_ok());
    }

    #[test]
    fn path_values_are_keyed_as_forwarded_never_decoded_again() {
        let s = spec(&["path.subject_id"]);
        let key =
            |path: &str| with_params("/v1/score/{subject_id}", path, |p| s.key(&secret(), "t", p, None, b"").unwrap());
        // A bureau that reads raw paths answers these differently: one key each.
        assert_ne!(key("/v1/score/S%2D1001"), key("/v1/score/S-1001"));
        assert_ne!(key("/v1/score/a%2Bb"), key("/v1/score/a+b"));
        assert_ne!(key("/v1/score/a%20b"), key("/v1/score/a+b"));
        assert_ne!(key("/v1/score/ABC"), key("/v1/score/abc"));
        assert_eq!(key("/v1/score/S-1001"), key("/v1/score/S-1001"));
    }

    #[test]
    fn query_parts_key_the_raw_pairs_a_lenient_parser_reads_as_the_name() {
        let s = spec(&["query.report_type"]);
        let k = |query: &str| s.key(&secret(), "t", &Params::new(), Some(query), b"").unwrap();
        assert_ne!(k("report_type=a+b"), k("report_type=a%20b"), "+ and %20 are different bytes");
        assert_ne!(k("report_type=a+b"), k("report_type=a%2Bb"));
        assert_ne!(k("report_type=a%2Bb"), k("report_type=a%2bb"), "the query is forwarded unchanged");
        assert_ne!(k("report_type=x"), k("report_type=x&report_type=y"), "every pair counts");
        assert_ne!(k("report_type=x&report_type=y"), k("report_type=y&report_type=x"), "in order");
        assert_eq!(k("a=1&report_type=x"), k("report_type=x&b=2"), "other parameters are not keyed");
        // Names a decoding or case-blind parser reads as `report_type` are keyed, as spelled:
        // otherwise `report%5Ftype=B` would share the key of a request without the parameter.
        let plain = k("report_type=x");
        for other in ["report%5Ftype=B&report_type=x", "Report_Type=B&report_type=x", "report_type=x&REPORT_TYPE=B"] {
            assert_ne!(k(other), plain, "{other:?}");
        }
        assert_ne!(k("report%5Ftype=B"), k("report%5Ftype=C"));
        assert_ne!(k("report%5Ftype=B"), k("other=1"), "present, not missing");
        assert_ne!(k("report_type=x"), k("Report_Type=x"), "another spelling: other bytes");
    }

    #[test]
    fn body_field_names_equal_but_for_case_are_refused_and_keyed_as_spelled() {
        let s = spec(&["body.subject_id"]);
        for bad in [
            r#"{"subject_id":"S1","Subject_ID":"S2"}"#,
            r#"{"subject_id":"S1","subject\u005fid":"S2"}"#,
            r#"{"subject_id":"S1","ſubject_id":"S2"}"#,
            r#"{"x":{"a":1,"A":2},"subject_id":"S1"}"#,
        ] {
            assert!(matches!(body_key(&s, "t", bad), Err(KeyError::InvalidJson(_))), "{bad:?}");
        }
        let k = |b: &str| body_key(&s, "t", b).unwrap();
        let missing = k(r#"{"other":1}"#);
        assert_ne!(k(r#"{"Subject_ID":"S2"}"#), missing, "a case-blind bureau reads S2");
        assert_ne!(k(r#"{"Subject_ID":"S2"}"#), k(r#"{"SUBJECT_ID":"S3"}"#));
        assert_ne!(k(r#"{"Subject_ID":"S2"}"#), k(r#"{"subject_id":"S2"}"#), "another spelling: other bytes");
        assert_eq!(k(r#"{"subject\u005fid":"S2"}"#), k(r#"{"subject_id":"S2"}"#), "every JSON parser decodes escapes");
    }

    #[test]
    fn the_order_of_parts_in_the_config_does_not_matter() {
        let body = r#"{"subject_id":"S1","report_type":"full"}"#;
        let a = body_key(&spec(&["body.subject_id", "body.report_type"]), "t", body).unwrap();
        let b = body_key(&spec(&["body.report_type", "body.subject_id"]), "t", body).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn parts_parse_and_print_back() {
        for s in ["path.subject_id", "query.report_type", "body.subject_id", "body.applicant.id"] {
            assert_eq!(KeyPart::parse(s).unwrap().to_string(), s);
        }
        assert!(KeyPart::parse("subject_id").unwrap_err().contains("expected \"path.NAME\""));
        assert!(KeyPart::parse("header.x").unwrap_err().contains("unknown source \"header\""));
        assert!(KeyPart::parse("body.").unwrap_err().contains("empty"));
        assert!(KeyPart::parse("body.a..b").unwrap_err().contains("empty field name"));
    }

    #[test]
    fn secrets_parse_from_hex_and_never_print() {
        let hex64 = "00".repeat(31) + "ff";
        assert_eq!(KeySecret::from_hex(&hex64).unwrap().0[31], 0xff);
        assert!(KeySecret::from_hex("abc").is_none());
        assert_eq!(format!("{:?}", KeySecret::random()), "KeySecret(<redacted>)");
        assert_ne!(KeySecret::random(), KeySecret::random());
    }
}

/// The rule as a property: two requests share a key only if every bureau model below reads the
/// same values for the keyed parts. The models are the parsers a bureau may have: raw bytes,
/// percent-decoding (with or without `+` as a space), `;` as a query separator, case-blind
/// names, first or last of duplicate JSON fields.
#[cfg(test)]
mod property {
    use proptest::prelude::*;

    use super::*;

    fn secret() -> KeySecret {
        KeySecret::from_bytes([9; 32])
    }

    fn decode(s: &str, plus_is_space: bool) -> Vec<u8> {
        let s = if plus_is_space { s.replace('+', " ") } else { s.to_string() };
        percent_decode(s.as_bytes()).collect()
    }

    /// What a bureau model reads as `report_type` from a query it is sent.
    fn query_views(query: &str) -> Vec<Vec<Vec<u8>>> {
        let mut views = Vec::new();
        for separators in [&['&'][..], &['&', ';'][..]] {
            for (decoded, plus) in [(false, false), (true, false), (true, true)] {
                for case_blind in [false, true] {
                    let mut view = Vec::new();
                    for pair in query.split(separators).filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        let (k, v) = if decoded { (decode(k, plus), decode(v, plus)) } else { (k.into(), v.into()) };
                        let hit = if case_blind { k.eq_ignore_ascii_case(b"report_type") } else { k == b"report_type" };
                        if hit {
                            view.push(v);
                        }
                    }
                    views.push(view);
                }
            }
        }
        views
    }

    /// What a bureau model reads as `subject_id` from a JSON body it is sent.
    fn body_views(body: &str) -> Vec<Option<String>> {
        let Ok(serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(body) else {
            return vec![None];
        };
        // Every field in order, duplicates kept (serde_json's map would drop them).
        let fields: Vec<(String, String)> = {
            let mut out = Vec::new();
            let mut de = serde_json::Deserializer::from_str(body);
            struct Pairs<'a>(&'a mut Vec<(String, String)>);
            impl<'de> de::Visitor<'de> for Pairs<'_> {
                type Value = ();
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                    while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                        self.0.push((k, v.to_string()));
                    }
                    Ok(())
                }
            }
            de::Deserializer::deserialize_map(&mut de, Pairs(&mut out)).expect("valid JSON object");
            out
        };
        let mut views = Vec::new();
        for case_blind in [false, true] {
            let hits: Vec<&String> = fields
                .iter()
                .filter(|(k, _)| if case_blind { fold(k) == "subject_id" } else { k == "subject_id" })
                .map(|(_, v)| v)
                .collect();
            views.push(hits.first().map(|v| v.to_string()));
            views.push(hits.last().map(|v| v.to_string()));
        }
        views
    }

    fn query_part() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "report_type",
            "Report_Type",
            "report%5Ftype",
            "report%5ftype",
            "other",
            "report_typ",
        ]);
        let values = prop::sample::select(vec!["a", "A", "a+b", "a%20b", "a%2Bb", "a%2bb", "%41", "", "b"]);
        let pair = (names, values, any::<bool>())
            .prop_map(|(n, v, eq)| if eq || !v.is_empty() { format!("{n}={v}") } else { n.to_string() });
        prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&"))
    }

    fn body() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "subject_id",
            "Subject_ID",
            "SUBJECT_ID",
            "subject\\u005fid",
            "\u{17f}ubject_id",
            "subject_i",
            "other",
        ]);
        let values = prop::sample::select(vec![r#""S1""#, r#""S2""#, r#""\u00531""#, "1", r#""1""#, "null"]);
        prop::collection::vec((names, values), 0..4).prop_map(|fields| {
            let fields: Vec<String> = fields.iter().map(|(n, v)| format!("\"{n}\":{v}")).collect();
            format!("{{{}}}", fields.join(","))
        })
    }

    fn path_value() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "S", "s", "-", "%2D", "%2d", "+", "%2B", "%2b", "%20", "%41", "a", "%C3%A9", "%c3%a9", "~", "%7E",
        ]);
        prop::collection::vec(pieces, 1..4).prop_map(|p| p.concat())
    }

    /// The path the bureau is sent for `/v1/score/{value}`, and its key; `None` if refused.
    fn path_key(spec: &KeySpec, value: &str) -> Option<(String, CacheKey)> {
        let uri: http::Uri = format!("/v1/score/{value}").parse().ok()?;
        let forwarded = match crate::route::path::normalize(&uri).ok()? {
            Some(pq) => pq.path().to_string(),
            None => uri.path().to_string(),
        };
        let mut router = matchit::Router::new();
        router.insert("/v1/score/{subject_id}", ()).unwrap();
        let m = router.at(&forwarded).ok()?;
        let key = spec.key(&secret(), "t", &m.params, None, b"").ok()?;
        Some((forwarded, key))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn one_path_key_means_one_forwarded_path(a in path_value(), b in path_value()) {
            let spec = KeySpec::new("score", Scope::Tenant, vec![KeyPart::parse("path.subject_id").unwrap()]);
            if let (Some((pa, ka)), Some((pb, kb))) = (path_key(&spec, &a), path_key(&spec, &b)) {
                prop_assert_eq!(ka == kb, pa == pb, "{} → {}, {} → {}", a, pa, b, pb);
            }
        }

        #[test]
        fn one_query_key_means_every_parser_reads_the_same(a in query_part(), b in query_part()) {
            let spec = KeySpec::new("q", Scope::Tenant, vec![KeyPart::parse("query.report_type").unwrap()]);
            let key = |q: &str| spec.key(&secret(), "t", &Params::new(), Some(q), b"").unwrap();
            if key(&a) == key(&b) {
                prop_assert_eq!(query_views(&a), query_views(&b), "{:?} and {:?} share a key", a, b);
            }
        }

        #[test]
        fn one_key_over_several_parts_means_the_same_bytes_for_each(
            a in (path_value(), query_part(), body()),
            b in (path_value(), query_part(), body()),
        ) {
            // The parts are hashed one after another: no value may spill into the next part.
            let parts = ["path.subject_id", "query.report_type", "body.subject_id"];
            let spec = KeySpec::new("all", Scope::Tenant, parts.iter().map(|p| KeyPart::parse(p).unwrap()).collect());
            let key = |(value, query, body): &(String, String, String)| -> Option<(String, CacheKey)> {
                let uri: http::Uri = format!("/v1/score/{value}").parse().ok()?;
                let forwarded = crate::route::path::normalize(&uri).ok()?.map_or(uri.path().to_string(), |pq| pq.path().to_string());
                let mut router = matchit::Router::new();
                router.insert("/v1/score/{subject_id}", ()).unwrap();
                let m = router.at(&forwarded).ok()?;
                let k = spec.key(&secret(), "t", &m.params, Some(query), body.as_bytes()).ok()?;
                Some((forwarded, k))
            };
            if let (Some((pa, ka)), Some((pb, kb))) = (key(&a), key(&b)) && ka == kb {
                prop_assert_eq!(pa, pb);
                prop_assert_eq!(query_views(&a.1), query_views(&b.1));
                prop_assert_eq!(body_views(&a.2), body_views(&b.2));
            }
        }

        #[test]
        fn field_order_and_whitespace_do_not_change_a_body_key(
            fields in prop::collection::btree_map("[a-z_]{1,8}", prop::sample::select(vec!["1", "\"S1\"", "null", "[1,{\"x\":2}]", "{\"id\":\"A\"}"]), 0..6),
            order in any::<prop::sample::Index>(),
            space in prop::sample::select(vec!["", " ", "\n\t "]),
        ) {
            let spec = KeySpec::new("r", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap(), KeyPart::parse("body.applicant.id").unwrap()]);
            let mut fields: Vec<(String, &str)> = fields.into_iter().collect();
            fields.push(("subject_id".into(), "\"S1\""));
            fields.push(("applicant".into(), "{\"id\":\"A\",\"z\":1}"));
            let text = |fields: &[(String, &str)], sp: &str| {
                let f: Vec<String> = fields.iter().map(|(k, v)| format!("{sp}\"{k}\"{sp}:{sp}{v}{sp}")).collect();
                format!("{{{}}}", f.join(","))
            };
            let key = |body: &str| spec.key(&secret(), "t", &Params::new(), None, body.as_bytes()).unwrap();
            let plain = key(&text(&fields, ""));
            let by = order.index(fields.len());
            fields.rotate_left(by);
            prop_assert_eq!(key(&text(&fields, space)), plain);
        }

        #[test]
        fn tenants_never_share_a_key_unless_the_route_is_shared(
            a in "[a-z-]{0,6}", b in "[a-z-]{0,6}", body in body(),
        ) {
            let parts = vec![KeyPart::parse("body.subject_id").unwrap()];
            let tenant = KeySpec::new("r", Scope::Tenant, parts.clone());
            let shared = KeySpec::new("r", Scope::Shared, parts);
            let key = |s: &KeySpec, t: &str| s.key(&secret(), t, &Params::new(), None, body.as_bytes());
            if let (Ok(ka), Ok(kb)) = (key(&tenant, &a), key(&tenant, &b)) {
                prop_assert_eq!(ka == kb, a == b, "{:?} and {:?}", a, b);
                prop_assert_ne!(key(&shared, &a).unwrap(), ka, "the shared scope is apart from every tenant");
                prop_assert_eq!(key(&shared, &a).unwrap(), key(&shared, &b).unwrap());
            }
        }

        #[test]
        fn any_request_gets_a_key_or_a_reason_never_a_panic(
            query in prop::option::of(".{0,40}"),
            body in prop::collection::vec(any::<u8>(), 0..80),
            json in body(),
        ) {
            let parts = ["query.report_type", "body.subject_id", "body.applicant.id"];
            let spec = KeySpec::new("r", Scope::Tenant, parts.iter().map(|p| KeyPart::parse(p).unwrap()).collect());
            for body in [&body[..], json.as_bytes()] {
                let once = spec.key(&secret(), "t", &Params::new(), query.as_deref(), body);
                prop_assert_eq!(&once, &spec.key(&secret(), "t", &Params::new(), query.as_deref(), body));
            }
        }

        #[test]
        fn one_body_key_means_every_parser_reads_the_same(a in body(), b in body()) {
            let spec = KeySpec::new("r", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap()]);
            let key = |body: &str| spec.key(&secret(), "t", &Params::new(), None, body.as_bytes());
            if let (Ok(ka), Ok(kb)) = (key(&a), key(&b)) && ka == kb {
                prop_assert_eq!(body_views(&a), body_views(&b), "{} and {} share a key", a, b);
            }
        }
    }
}

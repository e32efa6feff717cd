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
//! Normalization rules, each chosen so that it can only merge requests the bureau reads alike
//! (a wrong merge leaks a report; a missed one costs one bureau call):
//! - path and query values are percent-decoded (`%41` is `A`); `+` stays `+`;
//!   a query parameter given several times keys on all its values, in order;
//! - JSON bodies are parsed once; field order and whitespace do not matter, string escapes are
//!   decoded, `1` and `"1"` differ; duplicate field names and non-JSON bodies are refused (400);
//!   a non-integer number in a key field cannot be keyed exactly, so such a request bypasses
//!   cache and coalescing;
//! - a missing part is keyed as missing, which differs from an empty value.
//!
//! ```
//! use bureau_guard::cache_key::{KeyPart, KeySecret, KeySpec, Scope};
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
const DOMAIN: &[u8] = b"bureau-guard cache key v1";

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
    /// A query parameter (all its values, in order).
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
    /// route's path parameters, `query` the raw query string, `body` the raw body (read only if
    /// some part names a body field).
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
                KeyPart::Path(name) => match params.get(name) {
                    Some(raw) => values(&mut h, std::iter::once(decode(raw, &mut scratch))),
                    None => missing(&mut h),
                },
                KeyPart::Query(name) => {
                    let mut found: Vec<Vec<u8>> = Vec::new();
                    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if decode(k, &mut scratch) == name.as_bytes() {
                            found.push(decode(v, &mut scratch).to_vec());
                        }
                    }
                    if found.is_empty() {
                        missing(&mut h);
                    } else {
                        values(&mut h, found.iter().map(Vec::as_slice));
                    }
                }
                KeyPart::Body(fields) => {
                    let value = json.as_ref().and_then(|v| fields.iter().try_fold(v, |v, f| v.get(f)));
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

/// Percent-decodes `raw` into `buf` (bytes, not text: invalid UTF-8 stays distinct).
fn decode<'b>(raw: &str, buf: &'b mut Vec<u8>) -> &'b [u8] {
    buf.clear();
    buf.extend(percent_decode(raw.as_bytes()));
    buf
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
    fn get(&self, field: &str) -> Option<&Json> {
        match self {
            Json::Object(m) => m.get(field),
            _ => None,
        }
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
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value()?;
            // Parsers disagree on duplicates (first wins, last wins): the bureau could read
            // another subject than the key names.
            if fields.contains_key(&name) {
                return Err(de::Error::custom(format!("duplicate field {name:?}")));
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
    fn path_and_query_values_are_percent_decoded_and_nothing_more() {
        let s = spec(&["path.subject_id", "query.report_type"]);
        let key = |path: &str, query: &str| {
            with_params("/v1/score/{subject_id}", path, |p| s.key(&secret(), "t", p, Some(query), b"").unwrap())
        };
        assert_eq!(key("/v1/score/ABC", "report_type=full"), key("/v1/score/%41BC", "report%5Ftype=f%75ll"));
        assert_ne!(key("/v1/score/ABC", "report_type=full"), key("/v1/score/abc", "report_type=full"));
        assert_ne!(key("/v1/score/a+b", "report_type=x"), key("/v1/score/a%20b", "report_type=x"), "+ is not a space");
        assert_ne!(
            key("/v1/score/%FF", "report_type=x"),
            key("/v1/score/%FE", "report_type=x"),
            "bytes, not lossy text"
        );
        assert_ne!(
            key("/v1/score/A", "report_type=x&report_type=y"),
            key("/v1/score/A", "report_type=x"),
            "every value of a repeated parameter counts"
        );
        assert_eq!(key("/v1/score/A", "a=1&report_type=x"), key("/v1/score/A", "report_type=x&b=2"));
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

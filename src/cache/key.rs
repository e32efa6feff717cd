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
mod tests;

/// The rule as a property: two requests share a key only if every bureau model below reads the
/// same values for the keyed parts. The models are the parsers a bureau may have: raw bytes,
/// percent-decoding (with or without `+` as a space), `;` as a query separator, case-blind
/// names, first or last of duplicate JSON fields.
#[cfg(test)]
mod property;

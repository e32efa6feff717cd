//! Part of the route stage: the one request target that is routed, priced, keyed and forwarded.
//!
//! A path can be spelled many ways that a web server reads alike: `/v1/score/../admin`,
//! `/v1//score/S1`, `/v1/score/S%2D1`, `/v1/score/S1;x=y`, `/v1/score/S1/`. If bureau-guard routed
//! one spelling and the bureau, after its own normalisation, served another endpoint, the request
//! would be priced, cached and audited as something it is not. So the target is normalised once,
//! here, before routing; what cannot be normalised without guessing how the bureau reads it is
//! refused; and the normalised target is what goes to the bureau (`bureau/upstream.rs` only
//! prefixes it).
//!
//! Path rules, in order:
//! - the path must be absolute (`/...`); `*` and other forms are refused;
//! - refused (400): raw `\` and `;` (path parameters: servers strip `;...` before matching),
//!   raw bytes outside ASCII, malformed escapes (`%`, `%G1`), and escapes of what would change
//!   the path's structure or be decoded twice: `%2F` (`/`), `%5C` (`\`), `%2E` (`.`), `%3B`
//!   (`;`), `%25` (`%`) and control bytes (`%00`–`%1F`, `%7F`);
//! - escaped unreserved characters are decoded (`%41` → `A`, `%2D` → `-`; RFC 3986 §6.2.2.2) and
//!   other escapes get upper-case hex (`%c3` → `%C3`, §6.2.2.1);
//! - empty segments are dropped (`//` → `/`) and then the dot segments `.` and `..` removed
//!   (§5.2.4; `..` at the root stays at the root);
//! - a trailing `/` is dropped (`/v1/score/S1/` → `/v1/score/S1`), except for the path `/`.
//!
//! The query is forwarded byte for byte; it is refused if it holds a malformed escape, an
//! escaped control byte, a raw byte outside ASCII, or a `;` (which some parsers treat as a
//! second separator besides `&`: the bureau would read parameters the key did not see).
//!
//! A target that is already normal (nearly every request) is checked in one pass over its bytes
//! and not copied.

use http::Uri;
use http::uri::PathAndQuery;

/// Why a request target was refused; the message never repeats the target (it may hold a
/// subject id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Not an absolute path (`*`, or a path not starting with `/`).
    NotAbsolute,
    /// `%` not followed by two hex digits.
    MalformedEscape,
    /// An escaped `/`, `\`, `.`, `;`, `%` or control byte.
    EncodedDelimiter,
    /// A raw `\`.
    Backslash,
    /// A raw `;` in the path.
    PathParameter,
    /// A raw `;` in the query.
    QuerySemicolon,
    /// A raw byte outside ASCII (it must be percent-encoded).
    NonAscii,
}

impl TargetError {
    /// What to tell the client.
    pub fn message(self) -> &'static str {
        match self {
            TargetError::NotAbsolute => "the request target must be an absolute path",
            TargetError::MalformedEscape => "the request target holds a malformed percent-escape",
            TargetError::EncodedDelimiter => {
                "the request target holds an escaped '/', '\\', '.', ';', '%' or control byte, which servers read differently"
            }
            TargetError::Backslash => "the path holds a '\\', which servers read differently",
            TargetError::PathParameter => "the path holds a ';' parameter, which servers read differently",
            TargetError::QuerySemicolon => "the query holds a ';', which some servers read as a separator",
            TargetError::NonAscii => "the request target holds a byte outside ASCII that is not percent-encoded",
        }
    }
}

/// Checks `uri`'s target and returns the normalised one if it differs (`None`: `uri` is already
/// normal, use it as it is).
pub fn normalize(uri: &Uri) -> Result<Option<PathAndQuery>, TargetError> {
    // `Uri::path` reads the empty path of `?q` (or `http://host?q`) as `/`, but
    // `bureau/upstream.rs` forwards the target as it came: refuse it rather than route one target
    // and send another.
    if uri.path_and_query().is_some_and(|pq| pq.as_str().starts_with('?')) {
        return Err(TargetError::NotAbsolute);
    }
    let path = uri.path();
    if let Some(query) = uri.query() {
        check_query(query.as_bytes())?;
    }
    if !check_path(path.as_bytes())? {
        return Ok(None);
    }
    let mut out = rewrite_path(path);
    if let Some(query) = uri.query() {
        out.push('?');
        out.push_str(query);
    }
    // Only ASCII that was valid in the original target, re-assembled: always valid.
    Ok(Some(PathAndQuery::try_from(out).expect("a normalised target is a valid target")))
}

/// Validates `path`; `Ok(true)` if it must be rewritten to be normal.
fn check_path(path: &[u8]) -> Result<bool, TargetError> {
    if path.first() != Some(&b'/') {
        return Err(TargetError::NotAbsolute);
    }
    let mut rewrite = false;
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'\\' => return Err(TargetError::Backslash),
            b';' => return Err(TargetError::PathParameter),
            b if !b.is_ascii() => return Err(TargetError::NonAscii),
            b'%' => {
                let (byte, lower) = escape(path, i)?;
                if refused_escape(byte) {
                    return Err(TargetError::EncodedDelimiter);
                }
                rewrite |= lower || is_unreserved(byte);
                i += 3;
                continue;
            }
            b'/' => {
                // The segment that starts here: empty (`//`, trailing `/`), `.` or `..`.
                let rest = &path[i + 1..];
                let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                let segment = &rest[..end];
                let trailing = segment.is_empty() && end == rest.len() && i > 0;
                let empty_inside = segment.is_empty() && end < rest.len();
                rewrite |= trailing || empty_inside || segment == b"." || segment == b"..";
            }
            _ => {}
        }
        i += 1;
    }
    Ok(rewrite)
}

fn check_query(query: &[u8]) -> Result<(), TargetError> {
    let mut i = 0;
    while i < query.len() {
        match query[i] {
            b';' => return Err(TargetError::QuerySemicolon),
            b if !b.is_ascii() => return Err(TargetError::NonAscii),
            b'%' => {
                let (byte, _) = escape(query, i)?;
                if byte.is_ascii_control() {
                    return Err(TargetError::EncodedDelimiter);
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The byte escaped at `s[i..i + 3]` (`s[i]` is `%`), and whether its hex is lower-case.
fn escape(s: &[u8], i: usize) -> Result<(u8, bool), TargetError> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some((b - b'0', false)),
        b'A'..=b'F' => Some((b - b'A' + 10, false)),
        b'a'..=b'f' => Some((b - b'a' + 10, true)),
        _ => None,
    };
    match (s.get(i + 1).and_then(|&b| hex(b)), s.get(i + 2).and_then(|&b| hex(b))) {
        (Some((hi, l1)), Some((lo, l2))) => Ok((hi << 4 | lo, l1 || l2)),
        _ => Err(TargetError::MalformedEscape),
    }
}

/// Escapes that change the path's structure when decoded, or that a second decoding would turn
/// into one (`%252F`), or that C-based servers cut at.
fn refused_escape(b: u8) -> bool {
    matches!(b, b'/' | b'\\' | b'.' | b';' | b'%') || b.is_ascii_control()
}

/// RFC 3986 unreserved, less `.` (refused escaped, see above).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~')
}

/// The normal form of a path that [`check_path`] accepted.
fn rewrite_path(path: &str) -> String {
    let mut segments: Vec<String> = Vec::new();
    for raw in path.split('/') {
        match raw {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(normalize_escapes(raw)),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Decodes escaped unreserved characters and upper-cases the hex of the others.
fn normalize_escapes(segment: &str) -> String {
    let b = segment.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (byte, _) = escape(b, i).expect("checked by check_path");
            if is_unreserved(byte) {
                out.push(char::from(byte));
            } else {
                out.push('%');
                out.push_str(&format!("{byte:02X}"));
            }
            i += 3;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;

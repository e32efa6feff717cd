//! Stage 0 of the request path: size limits, checked before any other work.
//!
//! Oversized heads and bodies are the cheapest attacks on a proxy, so they are refused first,
//! from the head alone when `Content-Length` already says too much. hyper enforces a hard cap on
//! the head buffer and the header read timeout (see `server/mod.rs`); this stage gives the clear
//! JSON answer (431/413) for everything under that cap.

use bytes::Bytes;
use http::request::Parts;
use http_body_util::{BodyExt, Limited};

use crate::respond::{ErrorKind, ProxyError};

/// Bytes a request head occupies, approximately as on the wire (`name: value\r\n`).
pub fn head_bytes(parts: &Parts) -> u64 {
    let fields: usize = parts.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    (parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len()) + fields) as u64
}

/// Refuses a head over `max_header_bytes` (431) or announcing a body over `max_body` (413).
pub fn check_head(parts: &Parts, max_header_bytes: u64, max_body: u64) -> Result<(), ProxyError> {
    if head_bytes(parts) > max_header_bytes {
        return Err(ProxyError::new(
            ErrorKind::HeadersTooLarge,
            format!("request head exceeds {max_header_bytes} bytes"),
        ));
    }
    let announced = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max_body) {
        return Err(too_large(max_body));
    }
    Ok(())
}

/// Reads the whole body, refusing it (413) as soon as it passes `max_body` bytes. Any body
/// type: hyper's `Incoming` from a connection, or a `Full` from an in-process test.
pub async fn read_body<B>(body: B, max_body: u64) -> Result<Bytes, ProxyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(max_body)),
        Err(_) => Err(ProxyError::new(ErrorKind::BadRequest, "could not read the request body")),
    }
}

fn too_large(max_body: u64) -> ProxyError {
    ProxyError::new(ErrorKind::BodyTooLarge, format!("request body exceeds {max_body} bytes"))
}

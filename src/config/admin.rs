//! `[admin]`: the admin listener and who may use `/admin/*`.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Problems, defaults};

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Who may use `/admin/*`: a token, or (written out by the operator) anyone.
    pub auth: AdminAuth,
    /// `admin.allowed_hosts`: names (`host` or `host:port`, lower case) that `/admin/*` answers
    /// to besides the listen address and localhost, 127.0.0.1 and [::1] at its port.
    pub allowed_hosts: Vec<String>,
    /// `admin.zero_series_max_tenants`: with at most this many tenants, every per-tenant series
    /// the dashboard reads is exported at 0 from the start (`ops/series.rs`); above it, a
    /// tenant's series appear with its first event.
    pub zero_series_max_tenants: usize,
}

/// Tenants whose series are all exported from the start, by default: 31 + 21 per route each
/// (`ops/series.rs`), so 1,000 tenants with 4 routes is ~115k lines, which one Prometheus
/// scrapes comfortably.
pub const ZERO_SERIES_MAX_TENANTS: usize = 1_000;

/// How `/admin/*` requests are authorized.
#[derive(Clone, PartialEq, Eq)]
pub enum AdminAuth {
    /// The SHA-256 of the token every `/admin/*` request must present as `Authorization:
    /// Bearer TOKEN` (`token_sha256`, or the digest of `token_env`'s value).
    Token([u8; 32]),
    /// `admin.insecure_no_token = true`: `/admin/*` is open to whatever reaches the listener.
    InsecureNoToken,
}

impl AdminAuth {
    /// Whether a token is required.
    pub fn has_token(&self) -> bool {
        matches!(self, AdminAuth::Token(_))
    }
}

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The digest is not shown: it would let whoever reads a debug dump test guesses offline.
        f.write_str(match self {
            AdminAuth::Token(_) => "Token(..)",
            AdminAuth::InsecureNoToken => "InsecureNoToken",
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    listen: Option<String>,
    token_sha256: Option<String>,
    token_env: Option<String>,
    insecure_no_token: Option<bool>,
    allowed_hosts: Option<Vec<String>>,
    zero_series_max_tenants: Option<i64>,
}

pub(super) fn validate(p: &mut Problems, a: &RawAdmin, env: &dyn Fn(&str) -> Option<String>) -> AdminConfig {
    let token_digest = match (&a.token_sha256, &a.token_env) {
        (Some(_), Some(_)) => {
            p.add("admin.token_env", "give either token_sha256 or token_env, not both");
            None
        }
        (Some(hex_str), None) => {
            let mut d = [0u8; 32];
            if hex_str.len() != 64 || hex::decode_to_slice(hex_str, &mut d).is_err() {
                p.add("admin.token_sha256", "expected 64 hex characters (the SHA-256 of the token)");
                None
            } else {
                Some(d)
            }
        }
        (None, Some(var)) => p.env_var("admin.token_env", env, var).map(|t| Sha256::digest(t.as_bytes()).into()),
        (None, None) => None,
    };
    let insecure = a.insecure_no_token.unwrap_or(false);
    let has_token = a.token_sha256.is_some() || a.token_env.is_some();
    let auth = match token_digest {
        Some(d) => AdminAuth::Token(d),
        // A token that is set but invalid was reported above; this is only a placeholder.
        None => AdminAuth::InsecureNoToken,
    };
    if has_token && insecure {
        p.add("admin.insecure_no_token", "a token is set: remove insecure_no_token or the token");
    } else if !has_token && !insecure {
        p.add(
            "admin",
            "no admin token: set admin.token_sha256 (the SHA-256 of a secret) or admin.token_env (the \
             variable that holds it), or write admin.insecure_no_token = true to leave /admin/* open to \
             every local process and to web pages a browser on this host visits",
        );
    }
    let allowed_hosts = a
        .allowed_hosts
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, h)| {
            let ok = !h.is_empty()
                && h.parse::<http::uri::Authority>().is_ok_and(|host| host.as_str() == h && !h.contains('@'));
            if !ok {
                p.add(
                    format!("admin.allowed_hosts[{i}]"),
                    format!("{h:?} is not a host name or host:port (no scheme, path or user)"),
                );
            }
            ok.then(|| h.to_ascii_lowercase())
        })
        .collect();
    let zero_series_max_tenants = p
        .in_range("admin.zero_series_max_tenants", a.zero_series_max_tenants, 0..=1_000_000)
        .map_or(ZERO_SERIES_MAX_TENANTS, |n| n as usize);
    AdminConfig {
        listen: p.addr("admin.listen", a.listen.as_deref(), defaults::ADMIN_LISTEN),
        auth,
        allowed_hosts,
        zero_series_max_tenants,
    }
}

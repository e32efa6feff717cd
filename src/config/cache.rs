//! `[cache]`: the response cache all caching routes share, and the secret of its keys.

use serde::Deserialize;

use super::{Problems, defaults};
use crate::cache::key::KeySecret;

/// `[cache]`: the response cache shared by all routes that set `cache_ttl`.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Bound on the cache's weighted size (bodies, headers, a fixed overhead per entry).
    pub max_bytes: u64,
    /// Bodies larger than this are not stored.
    pub max_entry_bytes: u64,
    /// The secret of the keyed hashes that name look-ups; `None`: random per process (a restart
    /// then changes every key, which is fine for the cache but not for audit subject hashes).
    pub key_secret: Option<KeySecret>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    max_bytes: Option<String>,
    max_entry_bytes: Option<String>,
    key_secret_hex: Option<String>,
    key_secret_env: Option<String>,
}

pub(super) fn validate(p: &mut Problems, c: &RawCache, env: &dyn Fn(&str) -> Option<String>) -> CacheConfig {
    let max_bytes = p.size("cache.max_bytes", c.max_bytes.as_deref(), defaults::CACHE_MAX_BYTES);
    let max_entry_bytes =
        p.size("cache.max_entry_bytes", c.max_entry_bytes.as_deref(), defaults::CACHE_MAX_ENTRY_BYTES);
    if max_entry_bytes > max_bytes {
        p.add("cache.max_entry_bytes", format!("{max_entry_bytes} bytes is more than cache.max_bytes ({max_bytes})"));
    } else if max_entry_bytes > u64::from(u32::MAX / 2) {
        p.add("cache.max_entry_bytes", "must be below 2GiB");
    }
    let hint = "64 hex characters, e.g. from `openssl rand -hex 32`";
    let key_secret = match (&c.key_secret_hex, &c.key_secret_env) {
        (Some(_), Some(_)) => {
            p.add("cache.key_secret_env", "give either key_secret_hex or key_secret_env, not both");
            None
        }
        (Some(hex_str), None) => KeySecret::from_hex(hex_str).or_else(|| {
            p.add("cache.key_secret_hex", format!("expected {hint}"));
            None
        }),
        (None, Some(var)) => p.env_var("cache.key_secret_env", env, var).and_then(|v| {
            KeySecret::from_hex(v.trim()).or_else(|| {
                p.add("cache.key_secret_env", format!("environment variable {var} must hold {hint}"));
                None
            })
        }),
        (None, None) => None,
    };
    CacheConfig { max_bytes, max_entry_bytes, key_secret }
}

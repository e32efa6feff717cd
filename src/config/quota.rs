//! `[quota]`: when the daily and monthly windows turn.

use serde::Deserialize;

use super::{Problems, defaults};

#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    /// Daily and monthly windows reset at local midnight of this offset from UTC.
    pub utc_offset: chrono::FixedOffset,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    utc_offset: Option<String>,
}

pub(super) fn validate(p: &mut Problems, q: &RawQuota) -> QuotaConfig {
    QuotaConfig { utc_offset: utc_offset(p, q.utc_offset.as_deref()) }
}

fn utc_offset(p: &mut Problems, raw: Option<&str>) -> chrono::FixedOffset {
    let default = chrono::FixedOffset::east_opt(defaults::UTC_OFFSET_SECS).expect("+09:00 is a valid offset");
    let Some(s) = raw else { return default };
    let parsed = (|| {
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1, &s[1..]),
            b'-' => (-1, &s[1..]),
            _ => return None,
        };
        let (h, m) = rest.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
        if h > 14 || m > 59 {
            return None;
        }
        chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60))
    })();
    parsed.unwrap_or_else(|| {
        p.add("quota.utc_offset", format!("invalid offset {s:?}; expected \"+HH:MM\" or \"-HH:MM\", e.g. \"+09:00\""));
        default
    })
}

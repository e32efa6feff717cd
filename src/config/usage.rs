//! `[usage]`: the statements of look-ups by tenant, route and day (`src/usage/`).

use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// Usage kept this long by default: a bureau's invoice disputes reach back a year and a month.
pub const RETENTION: Duration = Duration::from_secs(400 * 86_400);
/// Counts reach the usage files this often by default (charges are durable before their call:
/// this bounds only what the other columns, hits and refusals, may lose to a `kill -9`).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// `[usage]`: where usage is kept and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageConfig {
    /// One append-only file per local day in this directory; `None` keeps usage in memory only
    /// (statements cover the time since start, and charges are not made durable).
    pub dir: Option<std::path::PathBuf>,
    /// Days older than this are deleted (whole days: a day is kept while any of it is younger).
    pub retention: Duration,
    /// How often the counters are appended to the day's file.
    pub flush_interval: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig { dir: None, retention: RETENTION, flush_interval: FLUSH_INTERVAL }
    }
}

impl UsageConfig {
    /// Days kept, counting today.
    pub fn retention_days(&self) -> u32 {
        (self.retention.as_secs().div_ceil(86_400)).max(1) as u32
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsage {
    dir: Option<String>,
    retention: Option<String>,
    flush_interval: Option<String>,
}

pub(super) fn validate(p: &mut Problems, u: &RawUsage) -> UsageConfig {
    if u.dir.as_deref() == Some("") {
        p.add("usage.dir", "must not be empty; leave it out to keep usage in memory only");
    }
    let retention = p.duration("usage.retention", u.retention.as_deref(), RETENTION);
    let retention = if retention < Duration::from_secs(86_400) {
        p.add("usage.retention", "must be at least one day (\"1d\"); a statement is by day");
        RETENTION
    } else {
        retention
    };
    UsageConfig {
        dir: u.dir.as_deref().filter(|d| !d.is_empty()).map(std::path::PathBuf::from),
        retention,
        flush_interval: p.duration("usage.flush_interval", u.flush_interval.as_deref(), FLUSH_INTERVAL),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn problems(usage: &str) -> String {
        let text = format!(
            "[admin]\ninsecure_no_token = true\n[upstream]\nurl = \"http://127.0.0.1:1\"\n[usage]\n{usage}\n[[routes]]\nname = \"s\"\nmethod = \"GET\"\npath = \"/s\"\n[[tenants]]\nid = \"a\"\napi_key_sha256 = \"{}\"\n",
            "0".repeat(64)
        );
        match Config::from_toml(&text, &|_| None) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn retention_is_checked_with_its_path() {
        assert_eq!(problems("retention = \"400d\"\ndir = \"/tmp/u\""), "");
        assert!(problems("retention = \"12h\"").contains("usage.retention: must be at least one day"));
        assert!(problems("retention = \"forever\"").contains("usage.retention: invalid duration"));
        // Ten years at most (every duration's bound): 3,650 files.
        assert!(problems("retention = \"3700d\"").contains("usage.retention: \"3700d\" is longer than"));
        assert!(problems("dir = \"\"").contains("usage.dir: must not be empty"));
        assert!(problems("flush_interval = \"0s\"").contains("usage.flush_interval: must be greater than zero"));
    }

    #[test]
    fn retention_rounds_up_to_whole_days() {
        let u = super::UsageConfig { retention: std::time::Duration::from_secs(86_400 + 1), ..Default::default() };
        assert_eq!(u.retention_days(), 2);
    }
}

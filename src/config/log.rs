//! `[log]`: the log's format and the access log.

use serde::Deserialize;

use super::Problems;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One line per request (tenant, route, status, outcome, latency, request id).
    pub access_log: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    format: Option<String>,
    access_log: Option<bool>,
}

pub(super) fn validate(p: &mut Problems, l: &RawLog) -> LogConfig {
    LogConfig {
        format: match l.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add("log.format", format!("unknown format {other:?}; expected \"text\" or \"json\""));
                LogFormat::Text
            }
        },
        access_log: l.access_log.unwrap_or(true),
    }
}

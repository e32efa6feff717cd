//! `[audit]`: the append-only log of who received which answer.

use serde::Deserialize;

use super::Problems;

/// `[audit]`: the optional append-only log of who received which answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditConfig {
    /// JSON lines are appended here; `None` disables the audit log.
    pub file: Option<std::path::PathBuf>,
    /// Once a record has been lost, refuse (503) answers that would go unaudited, instead of
    /// serving them while readiness reports the failure.
    pub fail_closed: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    file: Option<String>,
    fail_closed: Option<bool>,
}

pub(super) fn validate(p: &mut Problems, a: &RawAudit) -> AuditConfig {
    let audit = AuditConfig {
        file: a.file.as_deref().map(std::path::PathBuf::from),
        fail_closed: a.fail_closed.unwrap_or(false),
    };
    if a.file.as_deref() == Some("") {
        p.add("audit.file", "must not be empty; leave it out to disable the audit log");
    }
    if audit.fail_closed && a.file.is_none() {
        p.add("audit.fail_closed", "only meaningful with audit.file");
    }
    audit
}

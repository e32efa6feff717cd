//! Every series the dashboard reads exists from the start.
//!
//! A counter created at its first event leaves a panel saying "No data" exactly when an
//! operator checks that nothing is wrong (no tenant refused, no request shed), and a `rate()`
//! misses the first increment. Tenants, routes and reasons are known from the config, so each
//! known label set is exported at 0 when the proxy starts and after every reload (Prometheus'
//! instrumentation practice), and the series of tenants and routes a reload removed are
//! dropped, so the dashboard does not show them flat forever.
//!
//! Per tenant, with `R` configured routes: `requests_total` for the 4 answered outcomes per
//! route (4R), `request_duration_seconds` per route (R histograms of 17 lines),
//! `limit_rejections_total` enforced for 4 reasons, `sheds_total` for 6 reasons,
//! `bureau_calls_abandoned_total`, `bureau_calls_charged_total`, `queue_depth`, `queue_wait_seconds` (17 lines) and
//! `quota_used` daily and monthly: [`per_tenant`] lines, 116 with 4 routes. Above
//! `admin.zero_series_max_tenants` tenants (default 1,000: ~116k lines with 4 routes) only the
//! tenant-free series are declared: a tenant's appear with its first event, as before.

use std::collections::HashSet;

use crate::config::Config;
use crate::ops::metrics::{Metrics, NONE_LABEL, PASSTHROUGH_LABEL};
use crate::respond::{ErrorKind, Outcome};

/// The outcomes the dashboard's rate panels read for every tenant and route.
const ANSWERED: [Outcome; 4] = [Outcome::Bureau, Outcome::CacheHit, Outcome::Coalesced, Outcome::Stale];
/// `limit_rejections_total` reasons (the tenant limits' 429s).
const LIMIT_REASONS: [ErrorKind; 4] = [
    ErrorKind::RateLimited,
    ErrorKind::TooManyInFlight,
    ErrorKind::DailyQuotaExhausted,
    ErrorKind::MonthlyQuotaExhausted,
];
/// `sheds_total` reasons (`bureau/call.rs`).
const SHED_REASONS: [&str; 6] =
    ["queue_full", "queue_timeout", "bureau_hold", "overdue", "queue_full_total", "deadline"];
/// Lines of one histogram: its buckets (+Inf included), `_sum` and `_count`.
const HISTOGRAM_LINES: usize = 14 + 1 + 2;

/// The lines one tenant adds to `/metrics` when its series are declared at 0, with `routes`
/// configured routes.
pub fn per_tenant(routes: usize) -> usize {
    ANSWERED.len() * routes
        + HISTOGRAM_LINES * routes
        + LIMIT_REASONS.len()
        + SHED_REASONS.len()
        + 2 // bureau_calls_abandoned_total, bureau_calls_charged_total
        + 1 // queue_depth
        + HISTOGRAM_LINES // queue_wait_seconds
        + 2 // quota_used daily, monthly
}

/// Declares the series of `new` at 0 (every tenant's, up to `admin.zero_series_max_tenants`)
/// and, after a reload from `old`, removes those of tenants and routes `new` no longer has.
pub fn declare(m: &Metrics, new: &Config, old: Option<&Config>) {
    m.cache_stores_total.with_label_values(&["stored"]);
    if let Some(old) = old {
        drop_removed(m, new, old);
    }
    if new.tenants.len() > new.admin.zero_series_max_tenants {
        return;
    }
    for t in &new.tenants {
        let id = t.id.as_str();
        for r in &new.routes {
            for outcome in ANSWERED {
                m.requests_total.with_label_values(&[id, &r.name, outcome.as_str()]);
            }
            m.request_duration_seconds.with_label_values(&[id, &r.name]);
        }
        for reason in LIMIT_REASONS {
            m.limit_rejections_total.with_label_values(&[id, reason.code(), "enforced"]);
        }
        for reason in SHED_REASONS {
            m.sheds_total.with_label_values(&[id, reason]);
        }
        m.bureau_calls_abandoned_total.with_label_values(&[id]);
        m.bureau_calls_charged_total.with_label_values(&[id]);
        m.queue_depth.with_label_values(&[id]);
        m.queue_wait_seconds.with_label_values(&[id]);
        for window in ["daily", "monthly"] {
            m.quota_used.with_label_values(&[id, window]);
        }
    }
}

/// Removes every series labelled with a tenant or route that `old` had and `new` has not.
fn drop_removed(m: &Metrics, new: &Config, old: &Config) {
    let kept_tenants: HashSet<&str> = new.tenants.iter().map(|t| t.id.as_str()).collect();
    let kept_routes: HashSet<&str> = new.routes.iter().map(|r| r.name.as_str()).collect();
    let gone_tenants: Vec<&str> =
        old.tenants.iter().map(|t| t.id.as_str()).filter(|t| !kept_tenants.contains(t)).collect();
    let gone_routes: Vec<&str> =
        old.routes.iter().map(|r| r.name.as_str()).filter(|r| !kept_routes.contains(r)).collect();
    if gone_tenants.is_empty() && gone_routes.is_empty() {
        return;
    }
    let old_routes: Vec<&str> =
        old.routes.iter().map(|r| r.name.as_str()).chain([NONE_LABEL, PASSTHROUGH_LABEL]).collect();
    let old_tenants: Vec<&str> = old.tenants.iter().map(|t| t.id.as_str()).chain([NONE_LABEL]).collect();
    let outcomes: Vec<&str> = (0..Outcome::COUNT).map(outcome_label).collect();
    // Every (tenant, route) pair where either is gone.
    for t in &old_tenants {
        for r in &old_routes {
            if !gone_tenants.contains(t) && !gone_routes.contains(r) {
                continue;
            }
            let _ = m.request_duration_seconds.remove_label_values(&[t, r]);
            for o in &outcomes {
                let _ = m.requests_total.remove_label_values(&[t, r, o]);
            }
        }
    }
    for t in gone_tenants {
        for reason in LIMIT_REASONS {
            for mode in ["enforced", "dry_run"] {
                let _ = m.limit_rejections_total.remove_label_values(&[t, reason.code(), mode]);
            }
        }
        for reason in SHED_REASONS {
            let _ = m.sheds_total.remove_label_values(&[t, reason]);
        }
        let _ = m.bureau_calls_abandoned_total.remove_label_values(&[t]);
        let _ = m.bureau_calls_charged_total.remove_label_values(&[t]);
        let _ = m.queue_depth.remove_label_values(&[t]);
        let _ = m.queue_wait_seconds.remove_label_values(&[t]);
        for window in ["daily", "monthly"] {
            let _ = m.quota_used.remove_label_values(&[t, window]);
            let _ = m.quota_limit.remove_label_values(&[t, window]);
        }
    }
}

/// The `outcome` label of dense outcome index `i` (see [`Outcome::index`]).
fn outcome_label(i: usize) -> &'static str {
    const ANSWERED_ALL: [Outcome; 5] =
        [Outcome::Bureau, Outcome::CacheHit, Outcome::Coalesced, Outcome::Stale, Outcome::Abandoned];
    ANSWERED_ALL
        .iter()
        .copied()
        .chain(ErrorKind::ALL.iter().map(|k| Outcome::Rejected(*k)))
        .find(|o| o.index() == i)
        .map_or("", Outcome::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(tenants: &[&str], routes: &[&str], cap: Option<usize>) -> Config {
        let mut text = String::from("[admin]\ninsecure_no_token = true\n");
        if let Some(cap) = cap {
            text.push_str(&format!("zero_series_max_tenants = {cap}\n"));
        }
        text.push_str("[upstream]\nurl = \"http://127.0.0.1:1\"\n");
        for r in routes {
            text.push_str(&format!("[[routes]]\nname = \"{r}\"\nmethod = \"GET\"\npath = \"/{r}\"\n"));
        }
        for (i, t) in tenants.iter().enumerate() {
            text.push_str(&format!("[[tenants]]\nid = \"{t}\"\napi_key_sha256 = \"{:064x}\"\n", i + 1));
        }
        Config::from_toml(&text, &|_| None).unwrap()
    }

    fn lines_of(m: &Metrics, tenant: &str) -> usize {
        let text = String::from_utf8(m.encode()).unwrap();
        let label = format!("tenant=\"{tenant}\"");
        text.lines().filter(|l| !l.starts_with('#') && l.contains(&label)).count()
    }

    #[test]
    fn every_tenant_series_exists_at_zero_and_the_count_is_as_stated() {
        let m = Metrics::new();
        let cfg = config(&["a", "b"], &["score", "report"], None);
        declare(&m, &cfg, None);
        assert_eq!(lines_of(&m, "a"), per_tenant(2));
        assert_eq!(m.limit_rejections_total.with_label_values(&["b", "daily_quota_exhausted", "enforced"]).get(), 0);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(r#"bureau_guard_sheds_total{reason="queue_full",tenant="a"} 0"#), "{text}");
        assert!(text.contains(r#"bureau_guard_requests_total{outcome="cache_hit",route="report",tenant="b"} 0"#));
        assert_eq!(per_tenant(4), 116, "the figure the module doc states");
    }

    #[test]
    fn a_reload_drops_removed_tenants_and_routes_and_declares_new_ones() {
        let m = Metrics::new();
        let old = config(&["a", "b"], &["score", "report"], None);
        declare(&m, &old, None);
        m.requests_total.with_label_values(&["a", "report", "rate_limited"]).inc();
        m.requests_total.with_label_values(&["_none", "report", "missing_api_key"]).inc();
        let new = config(&["a", "c"], &["score"], None);
        declare(&m, &new, Some(&old));
        assert_eq!(lines_of(&m, "b"), 0, "b is gone");
        assert_eq!(lines_of(&m, "a"), per_tenant(1), "a keeps only score's series");
        assert_eq!(lines_of(&m, "c"), per_tenant(1), "c is new, at 0");
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(!text.contains("route=\"report\""), "{text}");
    }

    #[test]
    fn above_the_cap_tenant_series_wait_for_their_first_event() {
        let m = Metrics::new();
        declare(&m, &config(&["a", "b", "c"], &["score"], Some(2)), None);
        assert_eq!(lines_of(&m, "a"), 0);
        assert!(
            String::from_utf8(m.encode()).unwrap().contains(r#"bureau_guard_cache_stores_total{result="stored"} 0"#)
        );
    }
}

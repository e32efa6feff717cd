//! `[[routes]]`: method and path → route, its cost, and how its look-ups are cached and coalesced.

use std::collections::HashMap;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Deserialize;

use super::{Labels, Problems, defaults};
use crate::cache::key::{KeyPart, Scope};

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Metric label and log field: `[A-Za-z0-9_-]`, unique.
    pub name: String,
    pub method: Method,
    /// Path pattern with `{param}` segments, e.g. `/v1/score/{subject_id}`.
    pub path: String,
    /// Weight of one request of this route in rate and fair-share accounting.
    pub cost: u32,
    /// Caching and coalescing; all off unless the route opts in.
    pub cache: RouteCache,
}

/// How a route's identical look-ups share bureau calls. The default does nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCache {
    /// Identical look-ups in flight at once share one bureau call.
    pub coalesce: bool,
    /// Answers are kept this long at most (the bureau's `Cache-Control` may say less); `None`:
    /// not cached.
    pub cache_ttl: Option<Duration>,
    /// How long after expiry an entry may be served when the bureau fails; zero: never.
    pub stale_if_error: Duration,
    /// Response statuses that are cached.
    pub cache_statuses: Vec<StatusCode>,
    /// What identifies a look-up; required when coalescing or caching (may be empty: every
    /// request of the route is the same look-up).
    pub cache_key: Vec<KeyPart>,
    /// Whose requests may share an answer.
    pub scope: Scope,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            coalesce: false,
            cache_ttl: None,
            stale_if_error: Duration::ZERO,
            cache_statuses: default_cache_statuses(),
            cache_key: Vec::new(),
            scope: Scope::Tenant,
        }
    }
}

fn default_cache_statuses() -> Vec<StatusCode> {
    defaults::CACHE_STATUSES
        .iter()
        .map(|s| StatusCode::from_u16(*s).expect("the defaults are valid statuses"))
        .collect()
}

impl RouteCache {
    /// Whether the route caches or coalesces at all.
    pub fn enabled(&self) -> bool {
        self.coalesce || self.cache_ttl.is_some()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    name: Option<String>,
    method: Option<String>,
    path: Option<String>,
    cost: Option<i64>,
    coalesce: Option<bool>,
    cache_ttl: Option<String>,
    cache_key: Option<Vec<String>>,
    scope: Option<String>,
    stale_if_error: Option<String>,
    cache_statuses: Option<Vec<i64>>,
    /// Resolved in `priority.rs`, against the levels.
    pub(super) priority: Option<String>,
}

pub(super) fn validate(p: &mut Problems, raw: &[RawRoute]) -> Vec<RouteConfig> {
    let mut out = Vec::with_capacity(raw.len());
    let mut names = Labels::new("routes", "name", "route name");
    let mut patterns: HashMap<(String, &str), usize> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        let name = names.check(p, i, r.name.as_deref());
        let method = match r.method.as_deref() {
            None => {
                p.add(at("method"), "required, e.g. \"GET\" or \"POST\"");
                None
            }
            Some(m) => match Method::from_bytes(m.as_bytes()) {
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => Some(method),
                _ => {
                    p.add(at("method"), format!("invalid HTTP method {m:?}; use upper case, e.g. \"GET\""));
                    None
                }
            },
        };
        let path = match r.path.as_deref() {
            None => {
                p.add(at("path"), "required, e.g. \"/v1/score/{subject_id}\"");
                None
            }
            Some(path) if !path.starts_with('/') => {
                p.add(at("path"), format!("{path:?} must start with /"));
                None
            }
            Some(path) => match crate::route::check_pattern(path) {
                Ok(()) => Some(path),
                Err(e) => {
                    p.add(at("path"), e);
                    None
                }
            },
        };
        if let (Some(m), Some(path)) = (&method, path)
            && let Some(first) = patterns.insert((m.to_string(), path), i)
        {
            p.add(at("path"), format!("{m} {path} is already routes[{first}]"));
        }
        let cost = p.in_range(&at("cost"), r.cost, 1..=1_000_000).map_or(1, |c| c as u32);
        let cache = validate_route_cache(p, i, r, method.as_ref(), path);
        if let (Some(name), Some(method), Some(path)) = (name, method, path) {
            out.push(RouteConfig { name: name.to_string(), method, path: path.to_string(), cost, cache });
        }
    }
    if out.len() == raw.len()
        && let Err(e) = crate::route::RouteTable::new(&out)
    {
        p.add("routes", e);
    }
    out
}

/// Methods whose requests carry a body a key can read.
fn has_body(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

/// The caching and coalescing settings of `routes[i]`. `method` and `path` are `None` when
/// invalid (already reported); checks that need them are skipped then.
fn validate_route_cache(
    p: &mut Problems,
    i: usize,
    r: &RawRoute,
    method: Option<&Method>,
    path: Option<&str>,
) -> RouteCache {
    let at = |field: &str| format!("routes[{i}].{field}");
    let cache_ttl = r.cache_ttl.as_deref().map(|s| p.duration(&at("cache_ttl"), Some(s), Duration::ZERO));
    let coalesce = r.coalesce.unwrap_or(false);
    let enabled = coalesce || r.cache_ttl.is_some();
    let no_effect = "has no effect without coalesce = true or cache_ttl";
    let needs_ttl = "only meaningful with cache_ttl";

    let stale_if_error = match r.stale_if_error.as_deref() {
        None => Duration::ZERO,
        Some(_) if r.cache_ttl.is_none() => {
            p.add(at("stale_if_error"), if enabled { needs_ttl } else { no_effect });
            Duration::ZERO
        }
        Some(s) => p.duration(&at("stale_if_error"), Some(s), Duration::ZERO),
    };

    let mut cache_statuses: Vec<StatusCode> = Vec::new();
    match &r.cache_statuses {
        None => cache_statuses = default_cache_statuses(),
        Some(_) if r.cache_ttl.is_none() => p.add(at("cache_statuses"), if enabled { needs_ttl } else { no_effect }),
        Some(list) if list.is_empty() => p.add(at("cache_statuses"), "must not be empty; leave it out for [200]"),
        Some(list) => {
            for (j, s) in list.iter().enumerate() {
                let item_at = format!("{}[{j}]", at("cache_statuses"));
                match u16::try_from(*s)
                    .ok()
                    .filter(|s| (200..=499).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                {
                    None => p.add(
                        item_at,
                        format!(
                            "{s} must be a status from 200 to 499 (a cached bureau failure would hide its recovery)"
                        ),
                    ),
                    Some(code) if cache_statuses.contains(&code) => p.add(item_at, format!("{s} is listed twice")),
                    Some(code) => cache_statuses.push(code),
                }
            }
        }
    }

    let scope = match r.scope.as_deref() {
        None => Scope::Tenant,
        Some(_) if !enabled => {
            p.add(at("scope"), no_effect);
            Scope::Tenant
        }
        Some("tenant") => Scope::Tenant,
        Some("shared") => Scope::Shared,
        Some(other) => {
            p.add(
                at("scope"),
                format!(
                    "unknown scope {other:?}; expected \"tenant\" (the default) or \"shared\" (non-personal data only)"
                ),
            );
            Scope::Tenant
        }
    };

    let mut cache_key = Vec::new();
    match &r.cache_key {
        None if enabled => p.add(
            at("cache_key"),
            "required with coalesce or cache_ttl: name what identifies a look-up, e.g. [\"path.subject_id\"] or \
             [\"body.subject_id\", \"body.report_type\"] ([] if every request of the route is the same look-up)",
        ),
        None => {}
        Some(_) if !enabled => p.add(at("cache_key"), no_effect),
        Some(list) => {
            let params = path.map(crate::route::param_names);
            for (j, s) in list.iter().enumerate() {
                let item_at = format!("{}[{j}]", at("cache_key"));
                let part = match KeyPart::parse(s) {
                    Ok(part) => part,
                    Err(e) => {
                        p.add(item_at, e);
                        continue;
                    }
                };
                match (&part, &params, method) {
                    (KeyPart::Path(name), Some(params), _) if !params.contains(&name.as_str()) => {
                        let have = if params.is_empty() {
                            "it has none".to_string()
                        } else {
                            format!("it has {}", params.join(", "))
                        };
                        p.add(item_at, format!("{s:?}: {{{name}}} is not a parameter of the route's path ({have})"));
                    }
                    (KeyPart::Body(_), _, Some(m)) if !has_body(m) => {
                        p.add(
                            item_at,
                            format!("{s:?} needs a method with a body (POST, PUT or PATCH); this route is {m}"),
                        );
                    }
                    _ if cache_key.contains(&part) => p.add(item_at, format!("{s:?} is listed twice")),
                    _ => cache_key.push(part),
                }
            }
        }
    }

    RouteCache {
        coalesce,
        cache_ttl: cache_ttl.filter(|d| !d.is_zero()),
        stale_if_error,
        cache_statuses,
        cache_key,
        scope,
    }
}

//! `[[tenants]]`: who may call, by api key or client certificate, and each one's contract.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Labels, Problems, defaults};
use crate::tls::IdentitySource;

#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    /// Stable identifier: metric label, `x-tenant` header value, log field.
    pub id: String,
    pub name: String,
    /// SHA-256 digests of the tenant's API keys (several during a key rotation).
    pub key_digests: Vec<[u8; 32]>,
    /// Share of the bureau under contention, relative to other tenants.
    pub weight: u32,
    pub limits: TenantLimits,
    /// Limits of the tenant's requests of one route, each on top of `limits` (a request must
    /// pass both), in the order of `[[routes]]`.
    pub routes: Vec<RouteLimits>,
    /// Client certificate identities (of `server.tls.client_identity`'s kind, normalized) that
    /// name this tenant.
    pub client_cert_names: Vec<String>,
}

/// A tenant's contract. `None` means no limit of that kind.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLimits {
    /// Sustained requests per second, in route cost units.
    pub rate: Option<f64>,
    /// Cost units that may be spent at once after an idle period (defaults to one second of `rate`).
    pub burst: u32,
    /// Requests of this tenant inside bureau-guard at once.
    pub max_in_flight: Option<u32>,
    /// Bureau calls per local day.
    pub daily_quota: Option<u64>,
    /// Bureau calls per local calendar month.
    pub monthly_quota: Option<u64>,
    /// Requests that may wait for a bureau slot; one more gets 503 `bureau_busy` at once.
    pub max_queue: usize,
    /// Limits that are computed, logged and counted but not enforced.
    pub dry_run: DryRun,
}

/// `[tenants.routes.NAME]`: a tenant's contract for one product (route), e.g. full reports
/// capped apart from scores.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteLimits {
    /// A configured route's name.
    pub route: String,
    /// `max_queue` is unused (the tenant's applies).
    pub limits: TenantLimits,
}

/// Which limits run in dry-run mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DryRun {
    pub rate: bool,
    pub in_flight: bool,
    pub daily: bool,
    pub monthly: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    id: Option<String>,
    name: Option<String>,
    api_key_sha256: Option<OneOrMany>,
    api_key_env: Option<OneOrMany>,
    weight: Option<i64>,
    rate: Option<f64>,
    burst: Option<i64>,
    max_in_flight: Option<i64>,
    daily_quota: Option<i64>,
    monthly_quota: Option<i64>,
    max_queue: Option<i64>,
    dry_run: Option<BoolOrList>,
    client_cert_names: Option<Vec<String>>,
    /// Resolved in `priority.rs`, against the levels.
    pub(super) priority: Option<String>,
    pub(super) priorities: Option<Vec<String>>,
    routes: Option<BTreeMap<String, RawRouteLimits>>,
}

/// `[tenants.routes.NAME]`: the limits a tenant has on one route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteLimits {
    rate: Option<f64>,
    burst: Option<i64>,
    max_in_flight: Option<i64>,
    daily_quota: Option<i64>,
    monthly_quota: Option<i64>,
    dry_run: Option<BoolOrList>,
}

/// The limit keys a tenant, a tenant's route and a group have in common, as read.
pub(super) struct RawLimits<'a> {
    pub rate: Option<f64>,
    pub burst: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub daily_quota: Option<i64>,
    pub monthly_quota: Option<i64>,
    pub max_queue: Option<i64>,
    pub dry_run: Option<&'a BoolOrList>,
}

/// `dry_run = true` or `dry_run = ["rate", "daily"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum BoolOrList {
    Bool(bool),
    List(Vec<String>),
}

/// `key = "x"` or `key = ["x", "y"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// Each value with the path suffix that addresses it (`""` for a lone string, `[i]` in a list).
    fn items(&self) -> Vec<(String, &str)> {
        match self {
            OneOrMany::One(s) => vec![(String::new(), s.as_str())],
            OneOrMany::Many(v) => v.iter().enumerate().map(|(i, s)| (format!("[{i}]"), s.as_str())).collect(),
        }
    }
}

pub(super) fn validate(
    p: &mut Problems,
    raw: &[RawTenant],
    env: &dyn Fn(&str) -> Option<String>,
    routes: &[super::RouteConfig],
) -> Vec<TenantConfig> {
    let max_cost = routes.iter().map(|r| r.cost).max().unwrap_or(1);
    if raw.is_empty() {
        p.add("tenants", "at least one [[tenants]] entry is required");
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut ids = Labels::new("tenants", "id", "tenant id");
    let mut keys: HashMap<[u8; 32], String> = HashMap::new();
    for (i, t) in raw.iter().enumerate() {
        let at = |field: &str| format!("tenants[{i}].{field}");
        let id = ids.check(p, i, t.id.as_deref());

        let mut digests = Vec::new();
        let mut add_digest = |p: &mut Problems, path: String, d: [u8; 32]| {
            if let Some(first) = keys.get(&d) {
                p.add(path, format!("duplicate api key (also {first})"));
            } else {
                keys.insert(d, path);
                digests.push(d);
            }
        };
        if let Some(list) = &t.api_key_sha256 {
            for (suffix, hex_str) in list.items() {
                let path = format!("{}{suffix}", at("api_key_sha256"));
                let mut d = [0u8; 32];
                if hex_str.len() != 64 || hex::decode_to_slice(hex_str, &mut d).is_err() {
                    p.add(path, "expected 64 hex characters (the SHA-256 of the key, e.g. from `sha256sum`)");
                } else {
                    add_digest(p, path, d);
                }
            }
        }
        if let Some(list) = &t.api_key_env {
            for (suffix, var) in list.items() {
                let path = format!("{}{suffix}", at("api_key_env"));
                if let Some(key) = p.env_var(&path, env, var) {
                    add_digest(p, path, Sha256::digest(key.as_bytes()).into());
                }
            }
        }
        // A tenant identified by its client certificate alone needs no key (checked with the
        // certificate names in `validate_cert_names`).
        if t.api_key_sha256.is_none() && t.api_key_env.is_none() && t.client_cert_names.is_none() {
            p.add(at("api_key_sha256"), "each tenant needs api_key_sha256, api_key_env or client_cert_names");
        }

        let weight = p.in_range(&at("weight"), t.weight, 1..=1000).map_or(1, |w| w as u32);
        let raw_limits = RawLimits {
            rate: t.rate,
            burst: t.burst,
            max_in_flight: t.max_in_flight,
            daily_quota: t.daily_quota,
            monthly_quota: t.monthly_quota,
            max_queue: t.max_queue,
            dry_run: t.dry_run.as_ref(),
        };
        let limits = validate_limits(p, &format!("tenants[{i}]"), &raw_limits, max_cost);
        let route_limits = validate_route_limits(p, i, t.routes.as_ref(), routes);
        if let Some(id) = id {
            out.push(TenantConfig {
                id: id.to_string(),
                name: t.name.clone().unwrap_or_else(|| id.to_string()),
                key_digests: digests,
                weight,
                limits,
                routes: route_limits,
                client_cert_names: Vec::new(),
            });
        }
    }
    out
}

/// `[tenants.routes.NAME]` of tenant `i`: each name a configured route, limits as a tenant's
/// (burst at least the route's cost), in the order of `[[routes]]`.
fn validate_route_limits(
    p: &mut Problems,
    i: usize,
    raw: Option<&BTreeMap<String, RawRouteLimits>>,
    routes: &[super::RouteConfig],
) -> Vec<RouteLimits> {
    let Some(raw) = raw else { return Vec::new() };
    let mut out = Vec::with_capacity(raw.len());
    for (name, r) in raw {
        let at = format!("tenants[{i}].routes.{name}");
        let Some(route) = routes.iter().find(|route| route.name == *name) else {
            let known: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
            p.add(at, format!("unknown route {name:?}; configured routes: {}", known.join(", ")));
            continue;
        };
        let raw_limits = RawLimits {
            rate: r.rate,
            burst: r.burst,
            max_in_flight: r.max_in_flight,
            daily_quota: r.daily_quota,
            monthly_quota: r.monthly_quota,
            max_queue: None,
            dry_run: r.dry_run.as_ref(),
        };
        let limits = validate_limits(p, &at, &raw_limits, route.cost);
        if limits.rate.is_none()
            && limits.max_in_flight.is_none()
            && limits.daily_quota.is_none()
            && limits.monthly_quota.is_none()
        {
            p.add(at, "sets no limit; give rate, max_in_flight, daily_quota or monthly_quota, or remove it");
            continue;
        }
        out.push(RouteLimits { route: name.clone(), limits });
    }
    // The order of `[[routes]]`: what the compiled table and the diff follow.
    out.sort_by_key(|r| routes.iter().position(|route| route.name == r.route));
    out
}

/// The limit keys under `prefix` (`tenants[0]`, `tenants[0].routes.score`, `groups[1]`).
/// `max_cost`: the dearest request the limit sees; its burst must let one through.
pub(super) fn validate_limits(p: &mut Problems, prefix: &str, t: &RawLimits<'_>, max_cost: u32) -> TenantLimits {
    let at = |field: &str| format!("{prefix}.{field}");
    let rate = match t.rate {
        None => None,
        Some(r) if r.is_finite() && (1e-6..=1e9).contains(&r) => Some(r),
        Some(r) => {
            p.add(at("rate"), format!("{r} must be a number of requests per second between 0.000001 and 1e9"));
            None
        }
    };
    let burst = p.in_range(&at("burst"), t.burst, 1..=u32::MAX as i64).map(|b| b as u32);
    if burst.is_some() && rate.is_none() {
        p.add(at("burst"), "only meaningful with `rate`");
    }
    // Default burst: one second's worth of rate, at least the dearest route so it can ever pass.
    let burst = burst.unwrap_or_else(|| rate.map_or(1, |r| r.ceil() as u32).max(max_cost));
    // The bucket's depth in time must fit the limiter's nanosecond arithmetic (and be sane).
    if let Some(r) = rate
        && f64::from(burst) / r > 1e9
    {
        p.add(at("burst"), format!("{burst} at {r}/s takes more than 1e9 s to refill; lower burst or raise rate"));
    }
    if rate.is_some() && burst < max_cost {
        p.add(
            at("burst"),
            format!("{burst} is below the cost of the dearest route it applies to ({max_cost}); such requests could never pass"),
        );
    }
    let mut dry_run = DryRun::default();
    match t.dry_run {
        None | Some(BoolOrList::Bool(false)) => {}
        Some(BoolOrList::Bool(true)) => dry_run = DryRun { rate: true, in_flight: true, daily: true, monthly: true },
        Some(BoolOrList::List(names)) => {
            for (j, name) in names.iter().enumerate() {
                match name.as_str() {
                    "rate" => dry_run.rate = true,
                    "in_flight" => dry_run.in_flight = true,
                    "daily" => dry_run.daily = true,
                    "monthly" => dry_run.monthly = true,
                    other => p.add(
                        format!("{}[{j}]", at("dry_run")),
                        format!("unknown limit {other:?}; expected \"rate\", \"in_flight\", \"daily\" or \"monthly\""),
                    ),
                }
            }
        }
    }
    TenantLimits {
        rate,
        burst,
        max_in_flight: p.in_range(&at("max_in_flight"), t.max_in_flight, 1..=1_000_000).map(|n| n as u32),
        // Counters hold 40 bits (state/mod.rs): a larger quota could never be reached.
        daily_quota: p.in_range(&at("daily_quota"), t.daily_quota, 1..=(1 << 40) - 1).map(|n| n as u64),
        monthly_quota: p.in_range(&at("monthly_quota"), t.monthly_quota, 1..=(1 << 40) - 1).map(|n| n as u64),
        max_queue: p.in_range(&at("max_queue"), t.max_queue, 0..=1_000_000).map_or(defaults::MAX_QUEUE, |n| n as usize),
        dry_run,
    }
}

/// Each tenant's `client_cert_names`: non-empty, normalized, on one tenant only, and only with a
/// listener that asks for certificates. `raw` and `tenants` are matched by id (invalid tenants
/// were dropped from `tenants` and already reported).
pub(super) fn validate_cert_names(
    p: &mut Problems,
    raw: &[RawTenant],
    mut tenants: Vec<TenantConfig>,
    identity: Option<IdentitySource>,
    tls_configured: bool,
) -> Vec<TenantConfig> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, t) in raw.iter().enumerate() {
        let Some(list) = &t.client_cert_names else { continue };
        let at = format!("tenants[{i}].client_cert_names");
        let Some(identity) = identity else {
            // Without [server.tls] its own problems already explain; say only what is missing.
            let why = if tls_configured {
                "only meaningful with server.tls.client_auth = \"optional\" or \"required\""
            } else {
                "only meaningful with [server.tls] and client_auth = \"optional\" or \"required\""
            };
            p.add(at, why);
            continue;
        };
        let mut names = Vec::with_capacity(list.len());
        for (j, name) in list.iter().enumerate() {
            let item_at = format!("{at}[{j}]");
            let name = identity.normalize(name.trim());
            if name.is_empty() {
                p.add(item_at, "must not be empty");
            } else if let Some(first) = seen.get(&name) {
                p.add(
                    item_at,
                    format!("{name:?} already names tenants[{first}]: a certificate must map to one tenant"),
                );
            } else {
                seen.insert(name.clone(), i);
                names.push(name);
            }
        }
        if names.is_empty() && list.is_empty() && t.api_key_sha256.is_none() && t.api_key_env.is_none() {
            p.add(at, "empty, and the tenant has no api key either: nothing could identify it");
            continue;
        }
        if let Some(tenant) = tenants.iter_mut().find(|c| t.id.as_deref() == Some(c.id.as_str())) {
            tenant.client_cert_names = names;
        }
    }
    tenants
}

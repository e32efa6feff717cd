//! `[[priority]]`: the levels the bureau budget is split into (issue 17), and the `priority` /
//! `priorities` keys of routes and tenants that name them.

use serde::Deserialize;

use super::{Labels, Problems};
use crate::bureau::scheduler::{LevelSpec, MAX_LEVELS};

/// One priority level: its name (a metric label, and what the `x-bureau-priority` header and
/// the `priority` keys name) and its part of the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorityConfig {
    pub name: String,
    pub spec: LevelSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPriority {
    name: Option<String>,
    share: Option<i64>,
    lendable: Option<f64>,
    borrow: Option<f64>,
}

pub(super) fn validate(p: &mut Problems, raw: &[RawPriority]) -> Vec<PriorityConfig> {
    if raw.len() > MAX_LEVELS {
        p.add("priority", format!("{} levels; at most {MAX_LEVELS}", raw.len()));
    }
    let mut names = Labels::new("priority", "name", "priority level");
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = |field: &str| format!("priority[{i}].{field}");
        let name = names.check(p, i, r.name.as_deref());
        let share = p.in_range(&at("share"), r.share, 1..=1000).map_or(1, |s| s as u32);
        let fraction = |p: &mut Problems, field: &str, v: Option<f64>, max: f64| match v {
            Some(x) if !(0.0..=max).contains(&x) => {
                p.add(at(field), format!("{x} must be between 0 and {max}"));
                None
            }
            v => v,
        };
        let lendable = fraction(p, "lendable", r.lendable, 1.0).unwrap_or(1.0);
        let borrow = fraction(p, "borrow", r.borrow, 1000.0);
        if let Some(name) = name {
            out.push(PriorityConfig { name: name.to_string(), spec: LevelSpec { share, lendable, borrow } });
        }
    }
    out
}

/// The level slot named `name` at `path` (`routes[2].priority`), reported when unknown.
pub(super) fn slot(p: &mut Problems, levels: &[PriorityConfig], path: &str, name: &str) -> Option<usize> {
    let found = levels.iter().position(|l| l.name == name);
    if found.is_none() {
        let known: Vec<&str> = levels.iter().map(|l| l.name.as_str()).collect();
        if known.is_empty() {
            p.add(path, format!("names level {name:?} but no [[priority]] level is configured"));
        } else {
            p.add(path, format!("unknown priority level {name:?}; one of {}", known.join(", ")));
        }
    }
    found
}

/// The levels, and which level each route and tenant names, by route and tenant index.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Priorities {
    /// In declaration order (most important first); a level's slot is its index. Empty: no
    /// levels, the whole budget is one.
    pub levels: Vec<PriorityConfig>,
    /// `routes[i].priority`: the level the route's requests go to unless the client names one.
    pub routes: Vec<Option<usize>>,
    /// `tenants[i].priority` and `.priorities`.
    pub tenants: Vec<TenantPriority>,
}

/// A tenant's levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantPriority {
    /// Where its requests go when neither the request nor the route names a level: its
    /// `priority`, else the first level.
    pub default: usize,
    /// The levels its requests may name in `x-bureau-priority` (bit `i`: level `i`): its
    /// `priorities`, else only its default.
    pub allowed: u8,
}

impl TenantPriority {
    /// Whether the tenant's contract allows level `slot`.
    pub fn allows(self, slot: usize) -> bool {
        slot < 8 && self.allowed & (1 << slot) != 0
    }
}

/// Resolves the `priority` / `priorities` keys of routes and tenants against the levels.
pub(super) fn resolve(
    p: &mut Problems,
    levels: Vec<PriorityConfig>,
    routes: &[Option<String>],
    tenants: &[(Option<String>, Option<Vec<String>>)],
) -> Priorities {
    let routes = routes
        .iter()
        .enumerate()
        .map(|(i, name)| name.as_deref().and_then(|n| slot(p, &levels, &format!("routes[{i}].priority"), n)))
        .collect();
    let tenants = tenants
        .iter()
        .enumerate()
        .map(|(i, (default, allowed))| {
            let default =
                default.as_deref().and_then(|n| slot(p, &levels, &format!("tenants[{i}].priority"), n)).unwrap_or(0);
            // Slots past the eighth level are reported by `validate` (at most 8); they are left
            // out of the mask rather than shifted out of it.
            let bit = |s: usize| if s < 8 { 1u8 << s } else { 0 };
            let mut mask = bit(default);
            for (j, n) in allowed.iter().flatten().enumerate() {
                if let Some(s) = slot(p, &levels, &format!("tenants[{i}].priorities[{j}]"), n) {
                    mask |= bit(s);
                }
            }
            TenantPriority { default, allowed: mask }
        })
        .collect();
    Priorities { levels, routes, tenants }
}

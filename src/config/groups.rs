//! `[[groups]]`: affiliates under one contract. A bank, its card arm and its capital arm are
//! three tenants but one customer of the bureau; spread over three ids their load would count
//! three times. A group caps what its members use together (rate, in flight, daily and monthly
//! look-ups), on top of each member's own limits, and carries one weight for the fair
//! scheduler's group level.

use std::collections::HashMap;

use serde::Deserialize;

use super::tenants::{BoolOrList, RawLimits, TenantConfig, TenantLimits, validate_limits};
use super::{Labels, Problems};

/// A validated group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// Stable identifier: metric label, admin view, Redis key.
    pub id: String,
    /// Tenant ids; each tenant is in at most one group.
    pub members: Vec<String>,
    /// Share of the bureau under contention of the group as a whole, relative to other groups
    /// and ungrouped tenants.
    pub weight: u32,
    /// What the members use together (`max_queue` is unused).
    pub limits: TenantLimits,
}

impl GroupConfig {
    /// Whether any aggregate limit is set (else the group only weighs in the scheduler).
    pub fn has_limits(&self) -> bool {
        let l = &self.limits;
        l.rate.is_some() || l.max_in_flight.is_some() || l.daily_quota.is_some() || l.monthly_quota.is_some()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    id: Option<String>,
    members: Option<Vec<String>>,
    weight: Option<i64>,
    rate: Option<f64>,
    burst: Option<i64>,
    max_in_flight: Option<i64>,
    daily_quota: Option<i64>,
    monthly_quota: Option<i64>,
    dry_run: Option<BoolOrList>,
}

/// Each group: a label-safe unique id, members that are configured tenants (each in one group
/// only), a weight, and limits as a tenant's (burst at least the dearest route's cost).
pub(super) fn validate(
    p: &mut Problems,
    raw: &[RawGroup],
    tenants: &[TenantConfig],
    max_cost: u32,
) -> Vec<GroupConfig> {
    let mut out = Vec::with_capacity(raw.len());
    let mut ids = Labels::new("groups", "id", "group id");
    // Tenant id → the group that has it: its index, and how to name it.
    let mut member_of: HashMap<&str, (usize, String)> = HashMap::new();
    for (i, g) in raw.iter().enumerate() {
        let at = |field: &str| format!("groups[{i}].{field}");
        let id = ids.check(p, i, g.id.as_deref());
        let mut members = Vec::new();
        match &g.members {
            None => p.add(at("members"), "required: the ids of the tenants in the group"),
            Some(list) if list.is_empty() => p.add(at("members"), "must name at least one tenant"),
            Some(list) => {
                for (j, m) in list.iter().enumerate() {
                    let m_at = format!("{}[{j}]", at("members"));
                    if !tenants.iter().any(|t| t.id == *m) {
                        p.add(m_at, format!("unknown tenant {m:?}; members must be ids of [[tenants]]"));
                    } else if let Some((first, first_name)) = member_of.get(m.as_str()) {
                        let why = if *first == i {
                            format!("tenant {m:?} is listed twice")
                        } else {
                            format!("tenant {m:?} is already in {first_name}; a tenant belongs to at most one group")
                        };
                        p.add(m_at, why);
                    } else {
                        let name = match id {
                            Some(id) => format!("groups[{i}] ({id:?})"),
                            None => format!("groups[{i}]"),
                        };
                        member_of.insert(m, (i, name));
                        members.push(m.clone());
                    }
                }
            }
        }
        let weight = p.in_range(&at("weight"), g.weight, 1..=1000).map_or(1, |w| w as u32);
        let raw_limits = RawLimits {
            rate: g.rate,
            burst: g.burst,
            max_in_flight: g.max_in_flight,
            daily_quota: g.daily_quota,
            monthly_quota: g.monthly_quota,
            max_queue: None,
            dry_run: g.dry_run.as_ref(),
        };
        let limits = validate_limits(p, &format!("groups[{i}]"), &raw_limits, max_cost);
        if let Some(id) = id {
            out.push(GroupConfig { id: id.to_string(), members, weight, limits });
        }
    }
    out
}

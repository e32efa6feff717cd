//! Which priority level a request queues in for a bureau slot (issue 17).
//!
//! A request names a level in `x-bureau-priority` (a level name from `[[priority]]`), which its
//! tenant may only set to a level its contract allows (`tenants[].priorities`); otherwise the
//! route's level (`routes[].priority`) applies, else the tenant's default (`tenants[].priority`,
//! else the first level). The header is consumed here: the bureau never sees it, so what reaches
//! the bureau means what bureau-guard queued and priced.
//!
//! Without `[[priority]]` levels the header is removed and ignored, not refused: the budget is
//! then one level, so the header cannot ask for anything a contract withholds, and clients may
//! send it before an operator configures levels (a 400 would break them on every proxy that has
//! none). With levels, a name the tenant may not use is a 400: the contract is then explicit.

use http::HeaderMap;
use http::header::HeaderName;

use crate::config::Priorities;
use crate::respond::{ErrorKind, ProxyError};

/// The request field a client names its level in.
pub static PRIORITY: HeaderName = HeaderName::from_static("x-bureau-priority");

/// The level slot of a request of tenant `tenant` (its index in the config) on a route whose
/// level is `route` (`None`: the route names none), removing the client's `x-bureau-priority`
/// from `headers`. A level the tenant may not name, an unknown one, or the field given twice is
/// a 400 that says which levels the tenant may name.
pub fn level(
    p: &Priorities,
    tenant: usize,
    route: Option<usize>,
    headers: &mut HeaderMap,
) -> Result<usize, ProxyError> {
    if p.levels.is_empty() {
        headers.remove(&PRIORITY);
        return Ok(0);
    }
    let contract = p.tenants.get(tenant).copied();
    let default = route.or(contract.map(|c| c.default)).unwrap_or(0);
    let Some(asked) = take_one(headers)? else { return Ok(default) };
    let slot = p.levels.iter().position(|l| l.name.as_bytes() == asked.as_bytes());
    match (slot, contract) {
        (Some(slot), Some(c)) if c.allows(slot) => Ok(slot),
        _ => {
            let allowed: Vec<&str> = p
                .levels
                .iter()
                .enumerate()
                .filter(|&(s, _)| contract.is_some_and(|c| c.allows(s)))
                .map(|(_, l)| l.name.as_str())
                .collect();
            let allowed = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
            Err(ProxyError::new(
                ErrorKind::BadRequest,
                format!("x-bureau-priority names a level your contract does not allow; allowed: {allowed}"),
            ))
        }
    }
}

/// Removes every `x-bureau-priority` field; the one value, if any. Two fields are refused (a
/// client, or something on the way, would have the two read differently).
fn take_one(headers: &mut HeaderMap) -> Result<Option<http::HeaderValue>, ProxyError> {
    let mut values = match headers.entry(&PRIORITY) {
        http::header::Entry::Occupied(e) => e.remove_entry_mult().1,
        http::header::Entry::Vacant(_) => return Ok(None),
    };
    let first = values.next();
    if values.next().is_some() {
        return Err(ProxyError::new(ErrorKind::BadRequest, "x-bureau-priority given more than once"));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bureau::scheduler::LevelSpec;
    use crate::config::{PriorityConfig, TenantPriority};

    fn priorities() -> Priorities {
        let level = |name: &str| PriorityConfig { name: name.into(), spec: LevelSpec::WHOLE };
        Priorities {
            levels: vec![level("interactive"), level("batch")],
            routes: vec![None, Some(1)],
            // Tenant 0 may name both; tenant 1 only its default, batch.
            tenants: vec![TenantPriority { default: 0, allowed: 0b11 }, TenantPriority { default: 1, allowed: 0b10 }],
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&PRIORITY, v.parse().expect("a header value"));
        }
        h.insert("x-other", "kept".parse().expect("a header value"));
        h
    }

    #[test]
    fn the_request_names_an_allowed_level_else_the_route_else_the_tenant() {
        let p = priorities();
        let mut h = headers(&["batch"]);
        assert_eq!(level(&p, 0, None, &mut h).expect("allowed"), 1);
        assert!(!h.contains_key(&PRIORITY), "consumed");
        assert!(h.contains_key("x-other"));
        assert_eq!(level(&p, 0, Some(1), &mut headers(&["interactive"])).expect("allowed"), 0);
        assert_eq!(level(&p, 0, Some(1), &mut headers(&[])).expect("the route's"), 1);
        assert_eq!(level(&p, 1, None, &mut headers(&[])).expect("the tenant's"), 1);
    }

    #[test]
    fn without_levels_the_header_is_removed_and_ignored() {
        let p = Priorities {
            levels: Vec::new(),
            routes: vec![None],
            tenants: vec![TenantPriority { default: 0, allowed: 1 }],
        };
        let mut h = headers(&["interactive", "batch"]);
        assert_eq!(level(&p, 0, None, &mut h).expect("ignored"), 0);
        assert!(h.get(&PRIORITY).is_none(), "consumed");
    }

    #[test]
    fn a_level_the_contract_does_not_allow_unknown_or_given_twice_is_refused_and_consumed() {
        let p = priorities();
        for (tenant, values) in [(1, vec!["interactive"]), (0, vec!["urgent"]), (0, vec!["batch", "interactive"])] {
            let mut h = headers(&values);
            let err = level(&p, tenant, None, &mut h).expect_err("refused");
            assert_eq!(err.kind, ErrorKind::BadRequest, "{values:?}");
            assert!(!h.contains_key(&PRIORITY));
        }
        let err = level(&p, 1, None, &mut headers(&["interactive"])).expect_err("refused");
        assert!(err.to_string().contains("allowed: batch"), "{err}");
    }
}

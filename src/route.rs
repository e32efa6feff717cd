//! Stage 2 of the request path: which configured route a request is.
//!
//! The route gives a request its name (for metrics and logs), its `cost`, and later its cache and
//! coalescing policy. Matching is a radix-tree look-up (`matchit`, the router under axum), so it
//! costs the same with two routes or two hundred, and ambiguous patterns are refused when the
//! config is loaded rather than resolved by order at run time.

use http::Method;
use matchit::{Params, Router};

use crate::config::RouteConfig;

/// A compiled route table: path pattern → the routes (one per method) that use it.
#[derive(Debug, Clone)]
pub struct RouteTable {
    router: Router<Vec<(Method, usize)>>,
}

/// A matched route: its index in the config's `routes` and the path parameters.
pub struct RouteMatch<'k, 'v> {
    pub index: usize,
    pub params: Params<'k, 'v>,
}

/// Checks that `pattern` is a valid path pattern on its own (`{name}` segments, `{*rest}` at the end).
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    Router::new().insert(pattern, ()).map_err(|e| format!("invalid path pattern {pattern:?}: {e}"))
}

/// The parameter names of a path pattern: `x` for `{x}` and `rest` for `{*rest}`; `{{` and `}}`
/// are literal braces.
pub fn param_names(pattern: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        if rest[open + 1..].starts_with('{') {
            rest = &rest[open + 2..];
            continue;
        }
        let Some(len) = rest[open + 1..].find('}') else { break };
        let name = &rest[open + 1..open + 1 + len];
        names.push(name.strip_prefix('*').unwrap_or(name));
        rest = &rest[open + 2 + len..];
    }
    names
}

impl RouteTable {
    /// Builds the table; fails if two patterns are ambiguous (e.g. `/a/{x}` and `/a/{y}`).
    pub fn new(routes: &[RouteConfig]) -> Result<RouteTable, String> {
        let mut by_pattern: Vec<(&str, Vec<(Method, usize)>)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match by_pattern.iter_mut().find(|(p, _)| *p == r.path) {
                Some((_, methods)) => methods.push((r.method.clone(), i)),
                None => by_pattern.push((&r.path, vec![(r.method.clone(), i)])),
            }
        }
        let mut router = Router::new();
        for (pattern, methods) in by_pattern {
            router.insert(pattern, methods).map_err(|e| format!("path pattern {pattern:?}: {e}"))?;
        }
        Ok(RouteTable { router })
    }

    /// The route for `method` and `path`, if any.
    pub fn find<'k, 'v>(&'k self, method: &Method, path: &'v str) -> Option<RouteMatch<'k, 'v>> {
        let m = self.router.at(path).ok()?;
        let index = m.value.iter().find(|(rm, _)| rm == method)?.1;
        Some(RouteMatch { index, params: m.params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, method: Method, path: &str) -> RouteConfig {
        RouteConfig { name: name.into(), method, path: path.into(), cost: 1, cache: Default::default() }
    }

    #[test]
    fn matches_method_and_pattern_and_extracts_params() {
        let t = RouteTable::new(&[
            route("report", Method::POST, "/v1/credit-report"),
            route("score", Method::GET, "/v1/score/{subject_id}"),
            route("score_del", Method::DELETE, "/v1/score/{subject_id}"),
        ])
        .unwrap();
        let m = t.find(&Method::GET, "/v1/score/123").unwrap();
        assert_eq!(m.index, 1);
        assert_eq!(m.params.get("subject_id"), Some("123"));
        assert_eq!(t.find(&Method::DELETE, "/v1/score/9").unwrap().index, 2);
        assert_eq!(t.find(&Method::POST, "/v1/credit-report").unwrap().index, 0);
        assert!(t.find(&Method::GET, "/v1/credit-report").is_none(), "wrong method");
        assert!(t.find(&Method::GET, "/v1/score").is_none());
        assert!(t.find(&Method::GET, "/v1/score/1/2").is_none());
    }

    #[test]
    fn param_names_of_patterns() {
        assert_eq!(param_names("/v1/score/{subject_id}"), ["subject_id"]);
        assert_eq!(param_names("/v1/{kind}/x/{*rest}"), ["kind", "rest"]);
        assert_eq!(param_names("/v1/{{literal}}/{id}"), ["id"]);
        assert!(param_names("/v1/credit-report").is_empty());
    }

    #[test]
    fn ambiguous_patterns_are_refused() {
        let err = RouteTable::new(&[route("a", Method::GET, "/a/{x}"), route("b", Method::GET, "/a/{y}")]).unwrap_err();
        assert!(err.contains("/a/{y}"), "{err}");
    }
}

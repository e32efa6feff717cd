//! Stage 2 of the request path: which configured route a request is.
//!
//! The route gives a request its name (for metrics and logs), its `cost`, and later its cache and
//! coalescing policy. Matching is a radix-tree look-up (`matchit`, the router under axum), so it
//! costs the same with two routes or two hundred, and ambiguous patterns are refused when the
//! config is loaded rather than resolved by order at run time.
//!
//! [`path`] comes first: the request target is normalised once (ambiguity: 400), and that one
//! target is routed, keyed and forwarded.

pub mod path;
pub mod priority;

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

/// Routing and normalisation together: the proxy routes the normalised target, so normalising
/// must not move a request from one route to another.
#[cfg(test)]
mod property {
    use http::Uri;
    use proptest::prelude::*;

    use super::*;

    fn table() -> RouteTable {
        let route = |name: &str, path: &str| RouteConfig {
            name: name.into(),
            method: Method::GET,
            path: path.into(),
            cost: 1,
            cache: Default::default(),
        };
        RouteTable::new(&[
            route("score", "/v1/score/{subject_id}"),
            route("report", "/v1/credit-report"),
            route("admin", "/v1/admin"),
            route("files", "/v1/files/{kind}/{*rest}"),
        ])
        .unwrap()
    }

    fn path() -> impl Strategy<Value = String> {
        let segment = prop::sample::select(vec![
            "v1",
            "score",
            "credit-report",
            "credit%2Dreport",
            "admin",
            "%61dmin",
            "files",
            "S1",
            "%53%31",
            "%c3%a9",
            "",
            ".",
            "..",
            "a+b",
            "%2B",
        ]);
        // Mostly under a route's prefix, so that most paths match something.
        let prefix = prop::sample::select(vec!["", "v1/", "v1/score/", "v1//score/", "v1/files/k/", "v1/files//k/"]);
        (prefix, prop::collection::vec(segment, 0..4), any::<bool>())
            .prop_map(|(pre, s, trailing)| format!("/{pre}{}{}", s.join("/"), if trailing { "/" } else { "" }))
    }

    fn normalised(p: &str) -> Option<String> {
        let uri: Uri = p.parse().ok()?;
        Some(match crate::route::path::normalize(&uri).ok()? {
            Some(pq) => pq.path().to_string(),
            None => uri.path().to_string(),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A path without dot segments that matches a route matches the same route once
        /// normalised. (Dot segments are why paths are normalised first: `/v1/score/..` is
        /// `/v1`, not a score look-up for the subject `..`.) The one exception is a catch-all
        /// that held nothing but empty segments (`/v1/files/k//`): normal, it holds nothing and
        /// the path is no longer that route's, which is a 404, never another route.
        #[test]
        fn normalising_keeps_a_request_on_its_route(p in path()) {
            let t = table();
            let Some(n) = normalised(&p) else { return Ok(()) };
            let normal = t.find(&Method::GET, &n).map(|m| m.index);
            if !p.split('/').any(|s| s == "." || s == "..") {
                if let Some(raw) = t.find(&Method::GET, &p) {
                    let empty_rest = raw.params.get("rest").is_some_and(|r| r.split('/').all(str::is_empty));
                    if empty_rest {
                        prop_assert_eq!(normal, None, "{} → {}", p, n);
                    } else {
                        prop_assert_eq!(normal, Some(raw.index), "{} → {}", p, n);
                    }
                }
            }
            // The normal form routes the same as its own normal form (routing is stable).
            let again = normalised(&n).expect("a normal path is accepted");
            prop_assert_eq!(t.find(&Method::GET, &again).map(|m| m.index), normal);
        }
    }
}

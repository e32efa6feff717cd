//! `[tenants.routes.NAME]` and `[[groups]]`: each problem at its path.

use super::*;

/// `minimal()` with a route `report` of cost 5, tenants `bank-b` and `bank-c` (each followed by
/// `b` and `c`), then `extra`.
fn config(b: &str, c: &str, extra: &str) -> String {
    format!(
        r#"{}
[[routes]]
name = "report"
method = "POST"
path = "/v1/credit-report"
cost = 5
[[tenants]]
id = "bank-b"
api_key_sha256 = "{}"
{b}
[[tenants]]
id = "bank-c"
api_key_sha256 = "{}"
{c}
{extra}"#,
        minimal(),
        "ab".repeat(32),
        "cd".repeat(32),
    )
}

fn with_tenants(extra: &str) -> String {
    config("", "", extra)
}

#[test]
fn route_limits_and_groups_are_compiled_with_their_defaults() {
    let text = config(
        "[tenants.routes.report]\nmonthly_quota = 9\nrate = 1",
        "",
        "[[groups]]\nid = \"kb\"\nmembers = [\"bank-b\", \"bank-c\"]\nrate = 10\nmax_in_flight = 4\n\
         [[groups]]\nid = \"solo\"\nmembers = [\"bank-a\"]\nweight = 5\n",
    );
    let c = Config::from_toml(&text, &no_env).unwrap_or_else(|e| panic!("{e}"));
    let b = &c.tenants[1];
    assert_eq!(b.routes.len(), 1);
    assert_eq!(b.routes[0].route, "report");
    assert_eq!(b.routes[0].limits.monthly_quota, Some(9));
    assert_eq!(b.routes[0].limits.burst, 5, "one second of rate, at least the route's cost");
    let kb = &c.groups[0];
    assert_eq!((kb.weight, kb.limits.rate, kb.limits.burst), (1, Some(10.0), 10));
    assert_eq!(kb.limits.max_in_flight, Some(4));
    assert!(kb.has_limits());
    assert_eq!(c.groups[1].weight, 5);
    assert!(!c.groups[1].has_limits(), "a group may only weigh");
}

#[test]
fn route_limit_problems_are_reported_at_their_paths() {
    let text = config(
        "[tenants.routes.nope]\nrate = 1\n[tenants.routes.score]\nrate = 0\n\
         [tenants.routes.report]\nrate = 1\nburst = 2\n",
        "[tenants.routes.score]\ndry_run = true\n",
        "",
    );
    let found = problems(&text);
    assert_eq!(
        found,
        [
            "tenants[1].routes.nope: unknown route \"nope\"; configured routes: score, report",
            "tenants[1].routes.report.burst: 2 is below the cost of the dearest route it applies to (5); such requests could never pass",
            "tenants[1].routes.score.rate: 0 must be a number of requests per second between 0.000001 and 1e9",
            "tenants[1].routes.score: sets no limit; give rate, max_in_flight, daily_quota or monthly_quota, or remove it",
            "tenants[2].routes.score: sets no limit; give rate, max_in_flight, daily_quota or monthly_quota, or remove it",
        ],
    );
    let unknown = config("[tenants.routes.score]\nmax_queue = 3", "", "");
    assert!(problems(&unknown)[0].contains("unknown field `max_queue`"), "{:?}", problems(&unknown));
}

#[test]
fn group_problems_are_reported_at_their_paths() {
    let text = with_tenants(
        "[[groups]]\nid = \"kb\"\nmembers = [\"bank-b\", \"bank-x\", \"bank-b\"]\nrate = -3\n\
         [[groups]]\nid = \"kb\"\nmembers = [\"bank-c\", \"bank-b\"]\nweight = 0\nmax_in_flight = 0\n\
         [[groups]]\nid = \"empty\"\nmembers = []\n\
         [[groups]]\nmembers = [\"bank-a\"]\n\
         [[groups]]\nid = \"costly\"\nmembers = [\"bank-a\"]\nrate = 10\nburst = 1\n",
    );
    let found = problems(&text);
    assert_eq!(
        found,
        [
            "groups[0].members[1]: unknown tenant \"bank-x\"; members must be ids of [[tenants]]",
            "groups[0].members[2]: tenant \"bank-b\" is listed twice",
            "groups[0].rate: -3 must be a number of requests per second between 0.000001 and 1e9",
            "groups[1].id: duplicate group id \"kb\" (also groups[0])",
            "groups[1].members[1]: tenant \"bank-b\" is already in groups[0] (\"kb\"); a tenant belongs to at most one group",
            "groups[1].weight: 0 must be between 1 and 1000",
            "groups[1].max_in_flight: 0 must be between 1 and 1000000",
            "groups[2].members: must name at least one tenant",
            "groups[3].id: required",
            "groups[4].members[0]: tenant \"bank-a\" is already in groups[3]; a tenant belongs to at most one group",
            "groups[4].burst: 1 is below the cost of the dearest route it applies to (5); such requests could never pass",
        ],
    );
}

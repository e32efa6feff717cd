//! The parser's examples: defaults, each section's problems at their paths, TLS files, secrets
//! from the environment. `property.rs`: the parser as properties.

use http::StatusCode;
use sha2::{Digest, Sha256};

use super::*;
use crate::cache::key::{KeyPart, KeySecret, Scope};
use crate::tls::IdentitySource;

mod contracts;
mod property;

const KEY_HEX: &str = "5b2cd6b7a9d6b8bb4c6e1a5ec4d1a4a6e3c0f7d0b5e1d4a8c7f2e0b6a9d3c1e4";

fn no_env(_: &str) -> Option<String> {
    None
}

fn minimal() -> String {
    format!(
        r#"
[admin]
insecure_no_token = true
[upstream]
url = "http://127.0.0.1:8081"
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[tenants]]
id = "bank-a"
api_key_sha256 = "{KEY_HEX}"
"#
    )
}

fn problems(text: &str) -> Vec<String> {
    match Config::from_toml(text, &no_env) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_config_without_an_admin_token_is_rejected_with_what_to_set() {
    let without = minimal().replace("[admin]\ninsecure_no_token = true\n", "");
    let found = problems(&without);
    assert_eq!(found.len(), 1, "{found:?}");
    for want in ["admin.token_sha256", "admin.token_env", "insecure_no_token = true"] {
        assert!(found[0].contains(want), "{found:?} should name {want}");
    }
    let token = format!("[admin]\ntoken_sha256 = \"{KEY_HEX}\"\n{without}");
    let c = Config::from_toml(&token, &no_env).expect("a token is enough");
    assert!(c.admin.auth.has_token());
    assert!(!format!("{:?}", c.admin).contains(&KEY_HEX[..8]), "the digest stays out of debug output");
    let both = token.replacen("[admin]\n", "[admin]\ninsecure_no_token = true\n", 1);
    assert_eq!(problems(&both), ["admin.insecure_no_token: a token is set: remove insecure_no_token or the token"]);
    let hosts = token.replacen(
        "[admin]\n",
        "[admin]\nallowed_hosts = [\"Guard-1.internal\", \"ops:8443\", \"http://x\", \"\"]\n",
        1,
    );
    let found = problems(&hosts);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("admin.allowed_hosts[2]") && found[1].starts_with("admin.allowed_hosts[3]"));
    let ok = token.replacen("[admin]\n", "[admin]\nallowed_hosts = [\"Guard-1.internal\", \"ops:8443\"]\n", 1);
    assert_eq!(Config::from_toml(&ok, &no_env).unwrap().admin.allowed_hosts, ["guard-1.internal", "ops:8443"]);
}

#[test]
fn redis_backend_is_validated_with_every_problem_at_its_path() {
    let with = |state: &str| format!("{}\n{state}", minimal());
    let c = Config::from_toml(
        &with("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"redis://:s3cret@127.0.0.1:6379/0\""),
        &no_env,
    )
    .expect("valid");
    let StateBackend::Redis(r) = &c.state.backend else { panic!("redis backend") };
    assert_eq!(
        (r.timeout, r.lease, r.on_unavailable),
        (defaults::REDIS_TIMEOUT, defaults::REDIS_LEASE, FailPolicy::FailOpen)
    );
    assert!(!format!("{r:?}").contains("s3cret"), "the password never reaches Debug output");
    assert_eq!(r.expected_replicas, 1);

    let p = problems(&with(
        "[state]\nbackend = \"redis\"\nfile = \"x.json\"\n[state.redis]\ntimeout = \"5s\"\non_unavailable = \"maybe\"\nheartbeat_interval = \"1s\"\nlease_ttl = \"1s\"\nkey_prefix = \"a{b}\"\nexpected_replicas = 0",
    ));
    for want in [
        "state.file:",
        "state.redis.url: required",
        "state.redis.timeout:",
        "state.redis.on_unavailable: unknown policy \"maybe\"",
        "state.redis.lease_ttl: must be at least twice",
        "state.redis.key_prefix:",
        "state.redis.expected_replicas: 0 must be between 1 and 1000",
    ] {
        assert!(p.iter().any(|x| x.starts_with(want)), "missing {want:?} in {p:?}");
    }
    assert!(problems(&with("[state]\nbackend = \"etcd\"")).iter().any(|x| x.starts_with("state.backend: unknown")));
    assert!(
        problems(&with("[state.redis]\nurl = \"redis://x\"")).iter().any(|x| x.starts_with("state.redis: only used"))
    );
    let tls_on_plain =
        problems(&with("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"redis://h\"\nca = \"ca.pem\""));
    assert!(
        tls_on_plain.iter().any(|x| x.starts_with("state.redis.ca: ca, client_cert and client_key are only")),
        "{tls_on_plain:?}"
    );
    let missing = problems(&with(
        "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"rediss://h\"\nca = \"/nonexistent/ca.pem\"\nclient_cert = \"c.pem\"",
    ));
    assert!(missing.iter().any(|x| x.starts_with("state.redis.client_key: required")), "{missing:?}");
    let unreadable = problems(&with(
        "[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"rediss://h\"\nca = \"/nonexistent/ca.pem\"",
    ));
    assert!(unreadable.iter().any(|x| x.starts_with("state.redis.ca:")), "{unreadable:?}");
    let bad_url = problems(&with("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"http://u:pw@host\""));
    assert!(
        bad_url.iter().any(|x| x.starts_with("state.redis.url: invalid Redis URL") && !x.contains(":pw@")),
        "{bad_url:?}"
    );
    let from_env = Config::from_toml(
        &with("[state]\nbackend = \"redis\"\n[state.redis]\nurl_env = \"REDIS_URL\"\nlease = \"0s\""),
        &|name| (name == "REDIS_URL").then(|| "redis://127.0.0.1:6380".to_string()),
    )
    .expect("url from the environment");
    let StateBackend::Redis(r) = &from_env.state.backend else { panic!("redis backend") };
    assert_eq!((r.url.as_str(), r.lease), ("redis://127.0.0.1:6380", Duration::ZERO));
}

#[test]
fn redacted_urls_keep_the_user_and_hide_the_password() {
    assert_eq!(redact_url("redis://app:pw@h:6379/1"), "redis://app:***@h:6379/1");
    assert_eq!(redact_url("rediss://:pw@h"), "rediss://:***@h");
    assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    assert_eq!(redact_url("redis+unix:///run/redis.sock?db=1&pass=pw"), "redis+unix:///run/redis.sock?***");
}

#[test]
fn bureau_call_bounds_and_breaker_are_validated_with_their_paths() {
    let c = Config::from_toml(&minimal(), &no_env).expect("valid");
    assert_eq!(c.upstream.max_call_time, Duration::from_secs(30), "six times response_timeout");
    let slow = minimal().replacen("[upstream]", "[upstream]\nresponse_timeout = \"60s\"", 1);
    assert_eq!(Config::from_toml(&slow, &no_env).expect("valid").upstream.max_call_time, Duration::from_secs(360));
    assert_eq!(c.upstream.retry_after_cap, defaults::RETRY_AFTER_CAP);
    assert_eq!(c.upstream.breaker, BreakerSettings::default());

    let url = "url = \"http://127.0.0.1:8081\"";
    let bad = format!(
        "{url}\nresponse_timeout = \"10s\"\nmax_call_time = \"5s\"\nretry_after_cap = \"0s\"\n\
         [upstream.breaker]\nfailures = 0\nopen_for = \"soon\"\nprobes = 20000"
    );
    let p = problems(&minimal().replacen(url, &bad, 1));
    for path in [
        "upstream.max_call_time: 5s must be at least upstream.response_timeout (10s)",
        "upstream.retry_after_cap: must be greater than zero",
        "upstream.breaker.failures: 0 must be between 1 and 10000",
        "upstream.breaker.probes: 20000 must be between 1 and 10000",
        "upstream.breaker.open_for: invalid duration \"soon\"",
    ] {
        assert!(p.iter().any(|s| s.starts_with(path)), "{path} missing from {p:?}");
    }
    assert_eq!(p.len(), 5, "{p:?}");
    let absurd = problems(&minimal().replacen(url, &format!("{url}\nresponse_timeout = \"500000000000y\""), 1));
    assert!(absurd[0].starts_with("upstream.response_timeout: \"500000000000y\" is longer than"), "{absurd:?}");
    let unknown = problems(&minimal().replacen(url, &format!("{url}\n[upstream.breaker]\ncooldown = 1"), 1));
    assert!(unknown[0].starts_with("upstream.breaker.cooldown: unknown field"), "{unknown:?}");
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_toml(&minimal(), &no_env).expect("valid");
    assert_eq!(c.server.listen, defaults::LISTEN.parse().unwrap());
    assert_eq!(c.server.max_body, defaults::MAX_BODY);
    assert_eq!(c.tenants[0].weight, 1);
    assert_eq!(c.tenants[0].name, "bank-a");
    assert_eq!(c.routes[0].cost, 1);
}

#[test]
fn unknown_key_is_reported_with_its_path() {
    let text = minimal().replace("[upstream]", "[upstream]\ncolour = \"blue\"");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("upstream.colour: unknown field `colour`"), "{p:?}");
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = format!(
        r#"
[admin]
insecure_no_token = true
[server]
max_body = "lots"
request_timeout = "soon"
[upstream]
url = "ftp://bureau"
[[routes]]
name = "score"
method = "get"
path = "v1/score"
[[tenants]]
id = "a"
api_key_sha256 = "{KEY_HEX}"
[[tenants]]
id = "a"
api_key_sha256 = "{KEY_HEX}"
[[tenants]]
id = "c"
api_key_sha256 = "abc"
weight = 0
"#
    );
    let p = problems(&text);
    let expect = [
        "server.max_body: invalid size \"lots\"",
        "server.request_timeout: invalid duration \"soon\"",
        "upstream.url: \"ftp://bureau\" must start with http://",
        "routes[0].method: invalid HTTP method \"get\"",
        "routes[0].path: \"v1/score\" must start with /",
        "tenants[1].id: duplicate tenant id \"a\" (also tenants[0])",
        "tenants[1].api_key_sha256: duplicate api key (also tenants[0].api_key_sha256)",
        "tenants[2].api_key_sha256: expected 64 hex characters",
        "tenants[2].weight: 0 must be between 1 and 1000",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn api_key_from_env_is_hashed_and_missing_env_is_an_error() {
    let text = minimal().replace(&format!("api_key_sha256 = \"{KEY_HEX}\""), "api_key_env = [\"K1\", \"K2\"]");
    let env = |name: &str| (name == "K1").then(|| "secret".to_string());
    let err = Config::from_toml(&text, &env).unwrap_err();
    assert_eq!(err.to_string(), "tenants[0].api_key_env[1]: environment variable K2 is not set or empty");
    let env = |name: &str| Some(format!("secret-{name}"));
    let c = Config::from_toml(&text, &env).expect("valid");
    let want: [u8; 32] = Sha256::digest(b"secret-K1").into();
    assert_eq!(c.tenants[0].key_digests[0], want);
    assert_eq!(c.tenants[0].key_digests.len(), 2);
}

#[test]
fn route_names_and_tenant_ids_follow_one_rule() {
    let text = minimal().replace(
        "[[tenants]]",
        "[[routes]]\nname = \"score\"\nmethod = \"GET\"\npath = \"/v2/score\"\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v3/score\"\n\
         [[routes]]\nname = \"_internal\"\nmethod = \"GET\"\npath = \"/v4/score\"\n\
         [[tenants]]\nid = \"_bank\"\napi_key_env = \"UNSET\"\n[[tenants]]",
    );
    let found = problems(&text);
    let expect = [
        "routes[1].name: duplicate route name \"score\" (also routes[0])",
        "routes[2].name: required",
        "routes[3].name: \"_internal\" must be 1-64 characters of A-Z a-z 0-9 _ - . and not start with _",
        "tenants[0].id: \"_bank\" must be 1-64 characters of A-Z a-z 0-9 _ - . and not start with _",
    ];
    for e in expect {
        assert!(found.iter().any(|line| line == e), "missing {e:?} in {found:#?}");
    }
}

#[test]
fn conflicting_route_patterns_are_rejected() {
    let text = minimal()
        + r#"
[[routes]]
name = "score2"
method = "GET"
path = "/v1/score/{id}"
"#;
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("routes: "), "{p:?}");
}

#[test]
fn bad_types_and_syntax_are_reported_with_line() {
    let p = problems("[server]\nlisten = 8080\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("server.listen: invalid type: integer `8080`, expected a string"), "{p:?}");
    let p = problems("[server\n");
    assert!(p[0].contains("(line 1)"), "{p:?}");
}

#[test]
fn caching_is_off_by_default_and_cache_defaults_apply() {
    let c = Config::from_toml(&minimal(), &no_env).expect("valid");
    assert_eq!(c.routes[0].cache, RouteCache::default());
    assert!(!c.routes[0].cache.enabled());
    assert_eq!(c.cache.max_bytes, defaults::CACHE_MAX_BYTES);
    assert_eq!(c.cache.max_entry_bytes, defaults::CACHE_MAX_ENTRY_BYTES);
    assert!(c.cache.key_secret.is_none());
    assert!(c.audit.file.is_none());
    assert!(!c.audit.fail_closed);
}

#[test]
fn route_cache_settings_are_parsed() {
    let text = minimal()
        + r#"
[[routes]]
name = "report"
method = "POST"
path = "/v1/credit-report"
coalesce = true
cache_ttl = "10m"
cache_key = ["body.subject_id", "body.report_type", "query.purpose"]
stale_if_error = "1h"
cache_statuses = [200, 404]
[[routes]]
name = "codes"
method = "GET"
path = "/v1/codes/{kind}"
cache_ttl = "1h"
cache_key = ["path.kind"]
scope = "shared"
[[routes]]
name = "batch"
method = "POST"
path = "/v1/batch"
coalesce = true
cache_key = []
[cache]
max_bytes = "64MiB"
max_entry_bytes = "32KiB"
key_secret_hex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
[audit]
file = "/var/log/bureau-guard/audit.jsonl"
fail_closed = true
"#;
    let c = Config::from_toml(&text, &no_env).expect("valid");
    let report = &c.routes[1].cache;
    assert!(report.coalesce);
    assert_eq!(report.cache_ttl, Some(Duration::from_secs(600)));
    assert_eq!(report.stale_if_error, Duration::from_secs(3600));
    assert_eq!(report.cache_statuses, [StatusCode::OK, StatusCode::NOT_FOUND]);
    assert_eq!(
        report.cache_key,
        [
            KeyPart::Body(vec!["subject_id".into()]),
            KeyPart::Body(vec!["report_type".into()]),
            KeyPart::Query("purpose".into())
        ]
    );
    assert_eq!(report.scope, Scope::Tenant);
    let codes = &c.routes[2].cache;
    assert_eq!((codes.coalesce, codes.scope), (false, Scope::Shared));
    assert_eq!(codes.cache_statuses, [StatusCode::OK], "default statuses");
    let batch = &c.routes[3].cache;
    assert!(batch.enabled() && batch.cache_key.is_empty() && batch.cache_ttl.is_none());
    assert_eq!(c.cache.max_bytes, 64 * 1024 * 1024);
    assert_eq!(c.cache.max_entry_bytes, 32 * 1024);
    assert_eq!(c.cache.key_secret, KeySecret::from_hex(&hex::encode((0u8..32).collect::<Vec<u8>>())));
    assert_eq!(c.audit.file.as_deref(), Some(Path::new("/var/log/bureau-guard/audit.jsonl")));
    assert!(c.audit.fail_closed);
}

#[test]
fn cache_problems_are_reported_with_their_paths() {
    let text = minimal()
        + r#"
[[routes]]
name = "a"
method = "GET"
path = "/a/{subject_id}"
coalesce = true
[[routes]]
name = "b"
method = "GET"
path = "/b/{subject_id}"
cache_ttl = "1m"
cache_key = ["path.id", "body.subject_id", "header.x", "path.subject_id", "path.subject_id", "subject_id"]
scope = "everyone"
cache_statuses = [500, 200, 200]
[[routes]]
name = "c"
method = "POST"
path = "/c"
cache_key = ["body.subject_id"]
stale_if_error = "1m"
scope = "shared"
[[routes]]
name = "d"
method = "POST"
path = "/d"
coalesce = true
cache_key = []
stale_if_error = "1m"
cache_statuses = [200]
[[routes]]
name = "e"
method = "POST"
path = "/e"
cache_ttl = "0s"
cache_key = ["body.x"]
cache_statuses = []
[cache]
max_bytes = "1MiB"
max_entry_bytes = "2MiB"
key_secret_hex = "zz"
[audit]
fail_closed = true
"#;
    let p = problems(&text);
    let expect = [
        "routes[1].cache_key: required with coalesce or cache_ttl",
        "routes[2].cache_key[0]: \"path.id\": {id} is not a parameter of the route's path (it has subject_id)",
        "routes[2].cache_key[1]: \"body.subject_id\" needs a method with a body (POST, PUT or PATCH); this route is GET",
        "routes[2].cache_key[2]: \"header.x\": unknown source \"header\"",
        "routes[2].cache_key[4]: \"path.subject_id\" is listed twice",
        "routes[2].cache_key[5]: \"subject_id\": expected \"path.NAME\", \"query.NAME\" or \"body.FIELD\"",
        "routes[2].scope: unknown scope \"everyone\"",
        "routes[2].cache_statuses[0]: 500 must be a status from 200 to 499",
        "routes[2].cache_statuses[2]: 200 is listed twice",
        "routes[3].stale_if_error: has no effect without coalesce = true or cache_ttl",
        "routes[3].scope: has no effect without coalesce = true or cache_ttl",
        "routes[3].cache_key: has no effect without coalesce = true or cache_ttl",
        "routes[4].stale_if_error: only meaningful with cache_ttl",
        "routes[4].cache_statuses: only meaningful with cache_ttl",
        "routes[5].cache_ttl: must be greater than zero",
        "routes[5].cache_statuses: must not be empty",
        "cache.max_entry_bytes: 2097152 bytes is more than cache.max_bytes (1048576)",
        "cache.key_secret_hex: expected 64 hex characters",
        "audit.fail_closed: only meaningful with audit.file",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn tls_sections_are_validated_with_their_files() {
    let dir = crate::tls::test_certs::files("config", 90);
    let f = |name: &str| dir.join(name).display().to_string();
    let server_tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = \"required\"\nclient_ca = \"{}\"\n",
        f("leaf.pem"),
        f("leaf.key"),
        f("ca.pem")
    );
    let text = minimal().replace("[upstream]", &format!("{server_tls}[upstream]"))
        + "client_cert_names = [\"Bank-A.example\"]\n"
        + "[[tenants]]\nid = \"b\"\nclient_cert_names = [\"bank-b.example\"]\n";
    let c = Config::from_toml(&text, &no_env).expect("valid");
    assert!(c.tenants[1].key_digests.is_empty(), "a certificate-only tenant needs no key");
    let tls = c.server.tls.as_ref().expect("tls on");
    assert_eq!((tls.client_auth, tls.identity), (ClientAuth::Required, IdentitySource::SanDns));
    assert_eq!(c.tenants[0].client_cert_names, ["bank-a.example"], "DNS names are lower-cased");
    assert!(c.upstream.tls.is_none());
    assert!(c.warnings().is_empty());

    // https turns upstream TLS on, with the built-in roots when nothing else is said.
    let https = minimal().replace("http://127.0.0.1:8081", "https://bureau.example");
    assert!(Config::from_toml(&https, &no_env).expect("valid").upstream.tls.is_some());
}

#[test]
fn every_certificate_expiring_soon_is_warned_about_redis_ones_included() {
    let dir = crate::tls::test_certs::files("config-soon", 20);
    let f = |name: &str| dir.join(name).display().to_string();
    let text = format!(
        "{}\n[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"rediss://127.0.0.1:1\"\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        minimal(),
        f("ca.pem"),
        f("leaf.pem"),
        f("leaf.key")
    );
    let c = Config::from_toml(&text, &no_env).expect("valid");
    let w: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
    assert!(w.iter().any(|w| w.starts_with("state.redis.client_cert: CN=unit-leaf expires on")), "{w:?}");
    assert_eq!(w.len(), 1, "the CA is valid for longer: {w:?}");
}

#[test]
fn tls_problems_are_reported_with_their_paths() {
    let dir = crate::tls::test_certs::files("config-bad", 90);
    let f = |name: &str| dir.join(name).display().to_string();
    let text = format!(
        r#"
[admin]
insecure_no_token = true
[server.tls]
cert = "{}"
key = "{}"
client_auth = "sometimes"
client_identity = "email"
[upstream]
url = "http://127.0.0.1:8081"
[upstream.tls]
client_cert = "{}"
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[tenants]]
id = "a"
api_key_sha256 = "{KEY_HEX}"
client_cert_names = ["x"]
"#,
        f("leaf.pem"),
        f("missing.key"),
        f("leaf.pem")
    );
    let p = problems(&text);
    let expect = [
        "server.tls.client_auth: unknown value \"sometimes\"",
        "server.tls.client_identity: unknown value \"email\"",
        "server.tls.client_identity: only meaningful with client_auth",
        "upstream.tls: only meaningful with an https:// upstream.url",
        "tenants[0].client_cert_names: only meaningful with server.tls.client_auth",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");

    // Settings fine, files not: the file's own problem at its path; names on two tenants.
    let text = text
        .replace("client_auth = \"sometimes\"", &format!("client_auth = \"optional\"\nclient_ca = \"{}\"", f("ca.pem")))
        .replace("client_identity = \"email\"\n", "")
        .replace("http://127.0.0.1:8081", "https://127.0.0.1:8081")
        + &format!(
            "[[tenants]]\nid = \"b\"\napi_key_sha256 = \"{}\"\nclient_cert_names = [\"X\", \"\"]\n",
            "cd".repeat(32)
        );
    let p = problems(&text.replace("missing.key", "leaf.key"));
    let expect = [
        "upstream.tls.client_key: required with client_cert",
        "tenants[1].client_cert_names[0]: \"x\" already names tenants[0]",
        "tenants[1].client_cert_names[1]: must not be empty",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
    let p = problems(&text);
    assert!(p.iter().any(|l| l.starts_with("server.tls.key: cannot read ")), "{p:#?}");
}

#[test]
fn the_key_secret_can_come_from_the_environment() {
    let text = minimal() + "[cache]\nkey_secret_env = \"BG_KEY\"\n";
    let good = "ab".repeat(32);
    let c = Config::from_toml(&text, &|_: &str| Some(good.clone())).expect("valid");
    assert_eq!(c.cache.key_secret, KeySecret::from_hex(&good));
    let err = Config::from_toml(&text, &|_: &str| Some("hunter2".into())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cache.key_secret_env: environment variable BG_KEY must hold 64 hex characters, e.g. from `openssl rand -hex 32`"
    );
    assert!(!err.to_string().contains("hunter2"), "a wrong secret is not echoed");
    let err = Config::from_toml(&text, &no_env).unwrap_err();
    assert_eq!(err.to_string(), "cache.key_secret_env: environment variable BG_KEY is not set or empty");
    let both = text.replace("[cache]\n", &format!("[cache]\nkey_secret_hex = \"{good}\"\n"));
    let err = Config::from_toml(&both, &|_: &str| Some(good.clone())).unwrap_err();
    assert_eq!(err.to_string(), "cache.key_secret_env: give either key_secret_hex or key_secret_env, not both");
    assert!(!format!("{:?}", c.cache).contains(&good), "Debug never shows the secret");
}

#[test]
fn server_workers_is_one_per_cpu_a_count_or_zero_for_the_shared_runtime() {
    use crate::config::Workers;
    let with = |line: &str| format!("[server]\n{line}\n{}", minimal());
    let workers = |line: &str| Config::from_toml(&with(line), &no_env).expect("valid").server.workers;
    assert_eq!(workers(""), Workers::PerCpu);
    assert!(Workers::PerCpu.threads() >= 1);
    assert_eq!(workers("workers = 0"), Workers::Shared);
    assert_eq!(Workers::Shared.threads(), 0);
    assert_eq!(workers("workers = 3"), Workers::Threads(3));
    for bad in ["workers = -1", "workers = 1025"] {
        let found = problems(&with(bad));
        assert_eq!(found.len(), 1, "{bad}: {found:?}");
        assert!(found[0].starts_with("server.workers: must be 0 (one shared runtime) to 1024"), "{found:?}");
    }
    // A change is reported, and needs a restart (threads and sockets are made at start).
    let (a, b) = (parse_ok(&with("workers = 2")), parse_ok(&with("workers = 0")));
    let changes = crate::ops::reload::diff(&a, &b);
    let change = changes.iter().find(|c| c.path == "server.workers").expect("the change is listed");
    assert!(change.needs_restart, "{change}");
}

fn parse_ok(text: &str) -> Config {
    Config::from_toml(text, &no_env).expect("valid")
}

//! The parser as properties: no text makes it panic or fail without a reason, and what a valid
//! config says is what the parsed one holds.

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::*;

fn env(name: &str) -> Option<String> {
    (name == "SET").then(|| "a-key".to_string())
}

/// TOML-shaped text from the config's own keys and values, in any order and nesting.
fn toml_like() -> impl Strategy<Value = String> {
    let line = prop::sample::select(vec![
        "[server]",
        "[admin]",
        "[upstream]",
        "[upstream.adaptive]",
        "[upstream.breaker]",
        "[upstream.tls]",
        "[state]",
        "[state.redis]",
        "[cache]",
        "[audit]",
        "[log]",
        "[quota]",
        "[server.tls]",
        "[[routes]]",
        "[[tenants]]",
        "listen = \"127.0.0.1:0\"",
        "listen = \"[::1]:99999\"",
        "max_body = \"1KiB\"",
        "max_body = \"-1\"",
        "request_timeout = \"0s\"",
        "request_timeout = \"1ms\"",
        "url = \"http://b:1/x\"",
        "url = \"ftp://b\"",
        "url = \"redis://:pw@h\"",
        "backend = \"redis\"",
        "max_concurrency = 0",
        "min = 3",
        "max = 2",
        "backoff = 1.5",
        "name = \"r\"",
        "method = \"GET\"",
        "method = \"get\"",
        "path = \"/v1/{x}\"",
        "path = \"/v1/{x}/{*rest}\"",
        "path = \"v1\"",
        "cost = 0",
        "cache_ttl = \"1m\"",
        "coalesce = true",
        "cache_key = [\"path.x\", \"query.y\", \"body.a.b\"]",
        "cache_key = [\"header.x\"]",
        "scope = \"shared\"",
        "stale_if_error = \"1h\"",
        "cache_statuses = [200, 600]",
        "id = \"t\"",
        "id = \"_t\"",
        "api_key_env = \"SET\"",
        "api_key_env = [\"SET\", \"UNSET\"]",
        "api_key_sha256 = \"00\"",
        "rate = 0.5",
        "rate = -1",
        "burst = 4000000000",
        "daily_quota = 1",
        "dry_run = true",
        "dry_run = [\"rate\", \"x\"]",
        "weight = 0",
        "utc_offset = \"+25:00\"",
        "utc_offset = \"-03:30\"",
        "trusted_proxies = [\"10.0.0.0/33\"]",
        "proxy_protocol = true",
        "client_auth = \"required\"",
        "key_secret_hex = \"zz\"",
        "key_secret_env = \"SET\"",
        "file = \"\"",
        "x = 1",
        "= 1",
        "[",
        "\"\\u0000\" = 1",
        "a.b.c = 1",
    ]);
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_text_parses_or_says_why(text in prop_oneof![".{0,200}", toml_like()]) {
        if let Err(e) = Config::from_toml(&text, &env) {
            prop_assert!(!e.problems.is_empty());
            prop_assert!(e.problems.iter().all(|p| !p.message.is_empty()), "{:?}", e.problems);
        }
    }

    #[test]
    fn a_valid_config_holds_what_it_says(
        tenants in prop::collection::btree_map("[a-z][a-z0-9-]{0,12}", (1u32..=1000, prop::option::of(1u32..100_000), prop::option::of(1u64..1u64 << 40)), 1..5),
        routes in prop::collection::btree_map("[a-z][a-z0-9_]{0,12}", (prop::sample::select(vec!["GET", "POST", "DELETE"]), 1u32..=1000, any::<bool>()), 1..5),
        request_ms in 1u64..3_600_000,
        port in (1u16..).prop_filter("the admin listener's default port", |p| *p != 9090),
    ) {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nrequest_timeout = \"{request_ms}ms\"\n[admin]\ninsecure_no_token = true\n[upstream]\nurl = \"http://bureau:8081\"\n"
        );
        for (i, (name, (method, cost, cached))) in routes.iter().enumerate() {
            text += &format!("[[routes]]\nname = \"{name}\"\nmethod = \"{method}\"\npath = \"/r{i}/{{id}}\"\ncost = {cost}\n");
            if *cached {
                text += "cache_ttl = \"1m\"\ncache_key = [\"path.id\"]\n";
            }
        }
        for (id, (weight, rate, daily)) in &tenants {
            let digest = hex::encode(Sha256::digest(id.as_bytes()));
            text += &format!("[[tenants]]\nid = \"{id}\"\napi_key_sha256 = \"{digest}\"\nweight = {weight}\n");
            if let Some(r) = rate {
                text += &format!("rate = {r}\n");
            }
            if let Some(d) = daily {
                text += &format!("daily_quota = {d}\n");
            }
        }
        let c = match Config::from_toml(&text, &env) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))),
        };
        prop_assert_eq!(c.server.listen.port(), port);
        prop_assert_eq!(c.server.request_timeout, Duration::from_millis(request_ms));
        prop_assert_eq!(c.routes.len(), routes.len());
        for (r, (name, (method, cost, cached))) in c.routes.iter().zip(&routes) {
            prop_assert_eq!(&r.name, name);
            prop_assert_eq!(r.method.as_str(), *method);
            prop_assert_eq!(r.cost, *cost);
            prop_assert_eq!(r.cache.cache_ttl.is_some(), *cached);
        }
        prop_assert_eq!(c.tenants.len(), tenants.len());
        for (t, (id, (weight, rate, daily))) in c.tenants.iter().zip(&tenants) {
            prop_assert_eq!(&t.id, id);
            prop_assert_eq!(t.weight, *weight);
            prop_assert_eq!(t.key_digests.clone(), vec![<[u8; 32]>::from(Sha256::digest(id.as_bytes()))]);
            prop_assert_eq!(t.limits.rate, rate.map(f64::from));
            prop_assert_eq!(t.limits.daily_quota, *daily);
        }
        // And the same text parses to the same config again.
        prop_assert_eq!(Config::from_toml(&text, &env).ok(), Some(c));
    }
}

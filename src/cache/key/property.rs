use proptest::prelude::*;

use super::*;

fn secret() -> KeySecret {
    KeySecret::from_bytes([9; 32])
}

fn decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let s = if plus_is_space { s.replace('+', " ") } else { s.to_string() };
    percent_decode(s.as_bytes()).collect()
}

/// What a bureau model reads as `report_type` from a query it is sent.
fn query_views(query: &str) -> Vec<Vec<Vec<u8>>> {
    let mut views = Vec::new();
    for separators in [&['&'][..], &['&', ';'][..]] {
        for (decoded, plus) in [(false, false), (true, false), (true, true)] {
            for case_blind in [false, true] {
                let mut view = Vec::new();
                for pair in query.split(separators).filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let (k, v) = if decoded { (decode(k, plus), decode(v, plus)) } else { (k.into(), v.into()) };
                    let hit = if case_blind { k.eq_ignore_ascii_case(b"report_type") } else { k == b"report_type" };
                    if hit {
                        view.push(v);
                    }
                }
                views.push(view);
            }
        }
    }
    views
}

/// What a bureau model reads as `subject_id` from a JSON body it is sent.
fn body_views(body: &str) -> Vec<Option<String>> {
    let Ok(serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(body) else {
        return vec![None];
    };
    // Every field in order, duplicates kept (serde_json's map would drop them).
    let fields: Vec<(String, String)> = {
        let mut out = Vec::new();
        let mut de = serde_json::Deserializer::from_str(body);
        struct Pairs<'a>(&'a mut Vec<(String, String)>);
        impl<'de> de::Visitor<'de> for Pairs<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    self.0.push((k, v.to_string()));
                }
                Ok(())
            }
        }
        de::Deserializer::deserialize_map(&mut de, Pairs(&mut out)).expect("valid JSON object");
        out
    };
    let mut views = Vec::new();
    for case_blind in [false, true] {
        let hits: Vec<&String> = fields
            .iter()
            .filter(|(k, _)| if case_blind { fold(k) == "subject_id" } else { k == "subject_id" })
            .map(|(_, v)| v)
            .collect();
        views.push(hits.first().map(|v| v.to_string()));
        views.push(hits.last().map(|v| v.to_string()));
    }
    views
}

fn query_part() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "report_type",
        "Report_Type",
        "report%5Ftype",
        "report%5ftype",
        "other",
        "report_typ",
    ]);
    let values = prop::sample::select(vec!["a", "A", "a+b", "a%20b", "a%2Bb", "a%2bb", "%41", "", "b"]);
    let pair = (names, values, any::<bool>())
        .prop_map(|(n, v, eq)| if eq || !v.is_empty() { format!("{n}={v}") } else { n.to_string() });
    prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&"))
}

fn body() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "subject_id",
        "Subject_ID",
        "SUBJECT_ID",
        "subject\\u005fid",
        "\u{17f}ubject_id",
        "subject_i",
        "other",
    ]);
    let values = prop::sample::select(vec![r#""S1""#, r#""S2""#, r#""\u00531""#, "1", r#""1""#, "null"]);
    prop::collection::vec((names, values), 0..4).prop_map(|fields| {
        let fields: Vec<String> = fields.iter().map(|(n, v)| format!("\"{n}\":{v}")).collect();
        format!("{{{}}}", fields.join(","))
    })
}

fn path_value() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "S", "s", "-", "%2D", "%2d", "+", "%2B", "%2b", "%20", "%41", "a", "%C3%A9", "%c3%a9", "~", "%7E",
    ]);
    prop::collection::vec(pieces, 1..4).prop_map(|p| p.concat())
}

/// The path the bureau is sent for `/v1/score/{value}`, and its key; `None` if refused.
fn path_key(spec: &KeySpec, value: &str) -> Option<(String, CacheKey)> {
    let uri: http::Uri = format!("/v1/score/{value}").parse().ok()?;
    let forwarded = match crate::route::path::normalize(&uri).ok()? {
        Some(pq) => pq.path().to_string(),
        None => uri.path().to_string(),
    };
    let mut router = matchit::Router::new();
    router.insert("/v1/score/{subject_id}", ()).unwrap();
    let m = router.at(&forwarded).ok()?;
    let key = spec.key(&secret(), "t", &m.params, None, b"").ok()?;
    Some((forwarded, key))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn one_path_key_means_one_forwarded_path(a in path_value(), b in path_value()) {
        let spec = KeySpec::new("score", Scope::Tenant, vec![KeyPart::parse("path.subject_id").unwrap()]);
        if let (Some((pa, ka)), Some((pb, kb))) = (path_key(&spec, &a), path_key(&spec, &b)) {
            prop_assert_eq!(ka == kb, pa == pb, "{} → {}, {} → {}", a, pa, b, pb);
        }
    }

    #[test]
    fn one_query_key_means_every_parser_reads_the_same(a in query_part(), b in query_part()) {
        let spec = KeySpec::new("q", Scope::Tenant, vec![KeyPart::parse("query.report_type").unwrap()]);
        let key = |q: &str| spec.key(&secret(), "t", &Params::new(), Some(q), b"").unwrap();
        if key(&a) == key(&b) {
            prop_assert_eq!(query_views(&a), query_views(&b), "{:?} and {:?} share a key", a, b);
        }
    }

    #[test]
    fn one_key_over_several_parts_means_the_same_bytes_for_each(
        a in (path_value(), query_part(), body()),
        b in (path_value(), query_part(), body()),
    ) {
        // The parts are hashed one after another: no value may spill into the next part.
        let parts = ["path.subject_id", "query.report_type", "body.subject_id"];
        let spec = KeySpec::new("all", Scope::Tenant, parts.iter().map(|p| KeyPart::parse(p).unwrap()).collect());
        let key = |(value, query, body): &(String, String, String)| -> Option<(String, CacheKey)> {
            let uri: http::Uri = format!("/v1/score/{value}").parse().ok()?;
            let forwarded = crate::route::path::normalize(&uri).ok()?.map_or(uri.path().to_string(), |pq| pq.path().to_string());
            let mut router = matchit::Router::new();
            router.insert("/v1/score/{subject_id}", ()).unwrap();
            let m = router.at(&forwarded).ok()?;
            let k = spec.key(&secret(), "t", &m.params, Some(query), body.as_bytes()).ok()?;
            Some((forwarded, k))
        };
        if let (Some((pa, ka)), Some((pb, kb))) = (key(&a), key(&b)) && ka == kb {
            prop_assert_eq!(pa, pb);
            prop_assert_eq!(query_views(&a.1), query_views(&b.1));
            prop_assert_eq!(body_views(&a.2), body_views(&b.2));
        }
    }

    #[test]
    fn field_order_and_whitespace_do_not_change_a_body_key(
        fields in prop::collection::btree_map("[a-z_]{1,8}", prop::sample::select(vec!["1", "\"S1\"", "null", "[1,{\"x\":2}]", "{\"id\":\"A\"}"]), 0..6),
        order in any::<prop::sample::Index>(),
        space in prop::sample::select(vec!["", " ", "\n\t "]),
    ) {
        let spec = KeySpec::new("r", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap(), KeyPart::parse("body.applicant.id").unwrap()]);
        let mut fields: Vec<(String, &str)> = fields.into_iter().collect();
        fields.push(("subject_id".into(), "\"S1\""));
        fields.push(("applicant".into(), "{\"id\":\"A\",\"z\":1}"));
        let text = |fields: &[(String, &str)], sp: &str| {
            let f: Vec<String> = fields.iter().map(|(k, v)| format!("{sp}\"{k}\"{sp}:{sp}{v}{sp}")).collect();
            format!("{{{}}}", f.join(","))
        };
        let key = |body: &str| spec.key(&secret(), "t", &Params::new(), None, body.as_bytes()).unwrap();
        let plain = key(&text(&fields, ""));
        let by = order.index(fields.len());
        fields.rotate_left(by);
        prop_assert_eq!(key(&text(&fields, space)), plain);
    }

    #[test]
    fn tenants_never_share_a_key_unless_the_route_is_shared(
        a in "[a-z-]{0,6}", b in "[a-z-]{0,6}", body in body(),
    ) {
        let parts = vec![KeyPart::parse("body.subject_id").unwrap()];
        let tenant = KeySpec::new("r", Scope::Tenant, parts.clone());
        let shared = KeySpec::new("r", Scope::Shared, parts);
        let key = |s: &KeySpec, t: &str| s.key(&secret(), t, &Params::new(), None, body.as_bytes());
        if let (Ok(ka), Ok(kb)) = (key(&tenant, &a), key(&tenant, &b)) {
            prop_assert_eq!(ka == kb, a == b, "{:?} and {:?}", a, b);
            prop_assert_ne!(key(&shared, &a).unwrap(), ka, "the shared scope is apart from every tenant");
            prop_assert_eq!(key(&shared, &a).unwrap(), key(&shared, &b).unwrap());
        }
    }

    #[test]
    fn any_request_gets_a_key_or_a_reason_never_a_panic(
        query in prop::option::of(".{0,40}"),
        body in prop::collection::vec(any::<u8>(), 0..80),
        json in body(),
    ) {
        let parts = ["query.report_type", "body.subject_id", "body.applicant.id"];
        let spec = KeySpec::new("r", Scope::Tenant, parts.iter().map(|p| KeyPart::parse(p).unwrap()).collect());
        for body in [&body[..], json.as_bytes()] {
            let once = spec.key(&secret(), "t", &Params::new(), query.as_deref(), body);
            prop_assert_eq!(&once, &spec.key(&secret(), "t", &Params::new(), query.as_deref(), body));
        }
    }

    #[test]
    fn one_body_key_means_every_parser_reads_the_same(a in body(), b in body()) {
        let spec = KeySpec::new("r", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap()]);
        let key = |body: &str| spec.key(&secret(), "t", &Params::new(), None, body.as_bytes());
        if let (Ok(ka), Ok(kb)) = (key(&a), key(&b)) && ka == kb {
            prop_assert_eq!(body_views(&a), body_views(&b), "{} and {} share a key", a, b);
        }
    }
}

use super::*;

fn spec(parts: &[&str]) -> KeySpec {
    KeySpec::new("report", Scope::Tenant, parts.iter().map(|p| KeyPart::parse(p).unwrap()).collect())
}

fn secret() -> KeySecret {
    KeySecret::from_bytes([42; 32])
}

fn body_key(spec: &KeySpec, tenant: &str, body: &str) -> Result<CacheKey, KeyError> {
    spec.key(&secret(), tenant, &Params::new(), None, body.as_bytes())
}

/// Path parameters as the router would extract them from `path` for `pattern`.
fn with_params<R>(pattern: &str, path: &str, f: impl FnOnce(&Params<'_, '_>) -> R) -> R {
    let mut router = matchit::Router::new();
    router.insert(pattern, ()).unwrap();
    let m = router.at(path).unwrap();
    f(&m.params)
}

#[test]
fn field_order_and_whitespace_do_not_change_the_key() {
    let s = spec(&["body.subject_id", "body.report_type"]);
    let a = body_key(&s, "bank-a", r#"{"subject_id":"S1","report_type":"full","nonce":1}"#).unwrap();
    let b =
        body_key(&s, "bank-a", "{\n  \"report_type\" : \"full\",\n\t\"subject_id\": \"S1\", \"nonce\": 2 }").unwrap();
    assert_eq!(a, b, "same parts, different order, whitespace and unkeyed fields");
    let nested_a = body_key(&spec(&["body.applicant"]), "t", r#"{"applicant":{"id":"S1","dob":"1990"}}"#);
    let nested_b = body_key(&spec(&["body.applicant"]), "t", r#"{"applicant":{ "dob":"1990" ,"id":"S1"}}"#);
    assert_eq!(nested_a.unwrap(), nested_b.unwrap(), "nested objects are canonical too");
}

#[test]
fn different_values_and_types_give_different_keys() {
    let s = spec(&["body.subject_id"]);
    let k = |b: &str| body_key(&s, "bank-a", b).unwrap();
    assert_ne!(k(r#"{"subject_id":"S1"}"#), k(r#"{"subject_id":"S2"}"#));
    assert_ne!(k(r#"{"subject_id":"1"}"#), k(r#"{"subject_id":1}"#), "a string is not a number");
    assert_eq!(k(r#"{"subject_id":"A"}"#), k(r#"{"subject_id":"\u0041"}"#), "escapes are decoded");
    let nested = spec(&["body.applicant.id"]);
    assert_eq!(
        body_key(&nested, "t", r#"{"applicant":{"id":"S1","x":1}}"#).unwrap(),
        body_key(&nested, "t", r#"{"applicant":{"id":"S1"}}"#).unwrap()
    );
}

#[test]
fn tenants_get_different_keys_unless_the_route_is_shared() {
    let s = spec(&["body.subject_id"]);
    let body = r#"{"subject_id":"S1"}"#;
    assert_ne!(body_key(&s, "bank-a", body).unwrap(), body_key(&s, "bank-b", body).unwrap());
    let shared = KeySpec::new("codes", Scope::Shared, vec![KeyPart::parse("body.subject_id").unwrap()]);
    assert_eq!(body_key(&shared, "bank-a", body).unwrap(), body_key(&shared, "bank-b", body).unwrap());
    // The shared scope and a tenant-scoped key for the same route never collide.
    let tenant_scoped = KeySpec::new("codes", Scope::Tenant, vec![KeyPart::parse("body.subject_id").unwrap()]);
    assert_ne!(body_key(&shared, "", body).unwrap(), body_key(&tenant_scoped, "", body).unwrap());
}

#[test]
fn routes_and_secrets_separate_keys() {
    let body = br#"{"subject_id":"S1"}"#;
    let parts = vec![KeyPart::parse("body.subject_id").unwrap()];
    let a = KeySpec::new("report", Scope::Tenant, parts.clone());
    let b = KeySpec::new("score", Scope::Tenant, parts);
    let p = Params::new();
    assert_ne!(a.key(&secret(), "t", &p, None, body).unwrap(), b.key(&secret(), "t", &p, None, body).unwrap());
    let other = KeySecret::from_bytes([43; 32]);
    assert_ne!(a.key(&secret(), "t", &p, None, body).unwrap(), a.key(&other, "t", &p, None, body).unwrap());
}

#[test]
fn a_missing_part_differs_from_an_empty_one() {
    let s = spec(&["body.subject_id"]);
    let missing = body_key(&s, "t", r#"{"other":"x"}"#).unwrap();
    assert_ne!(missing, body_key(&s, "t", r#"{"subject_id":""}"#).unwrap());
    assert_ne!(missing, body_key(&s, "t", r#"{"subject_id":null}"#).unwrap());
    let q = spec(&["query.report_type"]);
    let k = |query: Option<&str>| q.key(&secret(), "t", &Params::new(), query, b"").unwrap();
    assert_ne!(k(None), k(Some("report_type=")));
    assert_ne!(k(Some("report_type")), k(Some("other=1")), "a bare name is present and empty");
    assert_eq!(k(None), k(Some("other=1")));
}

#[test]
fn invalid_or_ambiguous_json_is_refused() {
    let s = spec(&["body.subject_id"]);
    for bad in ["", "{", "subject_id=S1", r#"{"subject_id":"S1","subject_id":"S2"}"#] {
        assert!(matches!(body_key(&s, "t", bad), Err(KeyError::InvalidJson(_))), "{bad:?}");
    }
    assert_eq!(body_key(&s, "t", r#"{"subject_id":1.5}"#), Err(KeyError::Inexact));
    assert_eq!(body_key(&s, "t", r#"{"subject_id":123456789012345678901234567890}"#), Err(KeyError::Inexact));
    assert!(body_key(&s, "t", r#"{"subject_id":"S1","amount":1.5}"#).is_ok(), "only key fields must be exact");
    assert!(body_key(&s, "t", "[1,2]").is_ok(), "valid JSON without the field: keyed as missing");
    // A route that keys on no body field never looks at the body.
    assert!(spec(&["query.id"]).key(&secret(), "t", &Params::new(), None, b"not json").is_ok());
}

#[test]
fn path_values_are_keyed_as_forwarded_never_decoded_again() {
    let s = spec(&["path.subject_id"]);
    let key =
        |path: &str| with_params("/v1/score/{subject_id}", path, |p| s.key(&secret(), "t", p, None, b"").unwrap());
    // A bureau that reads raw paths answers these differently: one key each.
    assert_ne!(key("/v1/score/S%2D1001"), key("/v1/score/S-1001"));
    assert_ne!(key("/v1/score/a%2Bb"), key("/v1/score/a+b"));
    assert_ne!(key("/v1/score/a%20b"), key("/v1/score/a+b"));
    assert_ne!(key("/v1/score/ABC"), key("/v1/score/abc"));
    assert_eq!(key("/v1/score/S-1001"), key("/v1/score/S-1001"));
}

#[test]
fn query_parts_key_the_raw_pairs_a_lenient_parser_reads_as_the_name() {
    let s = spec(&["query.report_type"]);
    let k = |query: &str| s.key(&secret(), "t", &Params::new(), Some(query), b"").unwrap();
    assert_ne!(k("report_type=a+b"), k("report_type=a%20b"), "+ and %20 are different bytes");
    assert_ne!(k("report_type=a+b"), k("report_type=a%2Bb"));
    assert_ne!(k("report_type=a%2Bb"), k("report_type=a%2bb"), "the query is forwarded unchanged");
    assert_ne!(k("report_type=x"), k("report_type=x&report_type=y"), "every pair counts");
    assert_ne!(k("report_type=x&report_type=y"), k("report_type=y&report_type=x"), "in order");
    assert_eq!(k("a=1&report_type=x"), k("report_type=x&b=2"), "other parameters are not keyed");
    // Names a decoding or case-blind parser reads as `report_type` are keyed, as spelled:
    // otherwise `report%5Ftype=B` would share the key of a request without the parameter.
    let plain = k("report_type=x");
    for other in ["report%5Ftype=B&report_type=x", "Report_Type=B&report_type=x", "report_type=x&REPORT_TYPE=B"] {
        assert_ne!(k(other), plain, "{other:?}");
    }
    assert_ne!(k("report%5Ftype=B"), k("report%5Ftype=C"));
    assert_ne!(k("report%5Ftype=B"), k("other=1"), "present, not missing");
    assert_ne!(k("report_type=x"), k("Report_Type=x"), "another spelling: other bytes");
}

#[test]
fn body_field_names_equal_but_for_case_are_refused_and_keyed_as_spelled() {
    let s = spec(&["body.subject_id"]);
    for bad in [
        r#"{"subject_id":"S1","Subject_ID":"S2"}"#,
        r#"{"subject_id":"S1","subject\u005fid":"S2"}"#,
        r#"{"subject_id":"S1","ſubject_id":"S2"}"#,
        r#"{"x":{"a":1,"A":2},"subject_id":"S1"}"#,
    ] {
        assert!(matches!(body_key(&s, "t", bad), Err(KeyError::InvalidJson(_))), "{bad:?}");
    }
    let k = |b: &str| body_key(&s, "t", b).unwrap();
    let missing = k(r#"{"other":1}"#);
    assert_ne!(k(r#"{"Subject_ID":"S2"}"#), missing, "a case-blind bureau reads S2");
    assert_ne!(k(r#"{"Subject_ID":"S2"}"#), k(r#"{"SUBJECT_ID":"S3"}"#));
    assert_ne!(k(r#"{"Subject_ID":"S2"}"#), k(r#"{"subject_id":"S2"}"#), "another spelling: other bytes");
    assert_eq!(k(r#"{"subject\u005fid":"S2"}"#), k(r#"{"subject_id":"S2"}"#), "every JSON parser decodes escapes");
}

#[test]
fn the_order_of_parts_in_the_config_does_not_matter() {
    let body = r#"{"subject_id":"S1","report_type":"full"}"#;
    let a = body_key(&spec(&["body.subject_id", "body.report_type"]), "t", body).unwrap();
    let b = body_key(&spec(&["body.report_type", "body.subject_id"]), "t", body).unwrap();
    assert_eq!(a, b);
}

#[test]
fn parts_parse_and_print_back() {
    for s in ["path.subject_id", "query.report_type", "body.subject_id", "body.applicant.id"] {
        assert_eq!(KeyPart::parse(s).unwrap().to_string(), s);
    }
    assert!(KeyPart::parse("subject_id").unwrap_err().contains("expected \"path.NAME\""));
    assert!(KeyPart::parse("header.x").unwrap_err().contains("unknown source \"header\""));
    assert!(KeyPart::parse("body.").unwrap_err().contains("empty"));
    assert!(KeyPart::parse("body.a..b").unwrap_err().contains("empty field name"));
}

#[test]
fn secrets_parse_from_hex_and_never_print() {
    let hex64 = "00".repeat(31) + "ff";
    assert_eq!(KeySecret::from_hex(&hex64).unwrap().0[31], 0xff);
    assert!(KeySecret::from_hex("abc").is_none());
    assert_eq!(format!("{:?}", KeySecret::random()), "KeySecret(<redacted>)");
    assert_ne!(KeySecret::random(), KeySecret::random());
}

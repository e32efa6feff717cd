use super::*;

/// The target forwarded for `target`: itself if normal, else its normal form.
fn norm(target: &str) -> Result<String, TargetError> {
    let uri: Uri = target.parse().unwrap_or_else(|e| panic!("{target:?}: {e}"));
    Ok(match normalize(&uri)? {
        None => uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string(),
        Some(pq) => pq.as_str().to_string(),
    })
}

#[test]
fn normal_targets_are_left_alone_and_not_copied() {
    for t in ["/", "/v1/score/S-1001", "/v1/score/S%20A?x=1&y=a+b%2B", "/a/.b/..c/~x", "/echo/%C3%A9", "/a?"] {
        let uri: Uri = t.parse().unwrap();
        assert_eq!(normalize(&uri), Ok(None), "{t:?}");
    }
}

#[test]
fn dot_segments_duplicate_and_trailing_slashes_are_normalised() {
    for (t, want) in [
        ("/v1/score/../admin", "/v1/admin"),
        ("/v1/./score/S1", "/v1/score/S1"),
        ("/../../v1/score/S1", "/v1/score/S1"),
        ("/v1//score///S1", "/v1/score/S1"),
        ("//v1/score/S1", "/v1/score/S1"),
        ("/v1/score/S1/", "/v1/score/S1"),
        ("/v1/score/S1/.", "/v1/score/S1"),
        ("/v1/score/S1/..", "/v1/score"),
        ("/..", "/"),
        ("//", "/"),
        ("/v1/score/S1/?x=1", "/v1/score/S1?x=1"),
        ("/a/b/../../c/./d//?q=%2F..", "/c/d?q=%2F.."),
    ] {
        assert_eq!(norm(t).as_deref(), Ok(want), "{t:?}");
    }
}

#[test]
fn escapes_of_unreserved_characters_are_decoded_and_hex_is_upper_case() {
    assert_eq!(norm("/v1/score/S%2D1001").as_deref(), Ok("/v1/score/S-1001"));
    assert_eq!(norm("/v1/score/%41%62%7e%5F").as_deref(), Ok("/v1/score/Ab~_"));
    assert_eq!(norm("/v1/score/%c3%a9").as_deref(), Ok("/v1/score/%C3%A9"));
    assert_eq!(
        norm("/v1/score/a%2bb").as_deref(),
        Ok("/v1/score/a%2Bb"),
        "an escaped reserved character stays escaped"
    );
    assert_eq!(norm("/v1/score/a%2Bb?x=%2b").as_deref(), Ok("/v1/score/a%2Bb?x=%2b"), "the query is never rewritten");
}

#[test]
fn ambiguous_targets_are_refused() {
    use TargetError::*;
    for (t, why) in [
        ("/v1/score/..%2Fadmin", EncodedDelimiter),
        ("/v1/score/%2e%2e/admin", EncodedDelimiter),
        ("/v1/score/%2E", EncodedDelimiter),
        ("/v1/score/a%5Cb", EncodedDelimiter),
        ("/v1/score/a%3Bb", EncodedDelimiter),
        ("/v1/score/a%252Fb", EncodedDelimiter),
        ("/v1/score/a%00", EncodedDelimiter),
        ("/v1/score/a%0d%0a", EncodedDelimiter),
        ("/v1/score/S1;jsessionid=x", PathParameter),
        ("/v1/score/S1;", PathParameter),
        ("/v1/score/a\\..\\b", Backslash),
        ("/v1/score/%", MalformedEscape),
        ("/v1/score/%4", MalformedEscape),
        ("/v1/score/%G1", MalformedEscape),
        ("/v1/score/S1?x=%", MalformedEscape),
        ("/v1/score/S1?x=%zz", MalformedEscape),
        ("/v1/score/S1?x=1;report_type=full", QuerySemicolon),
        ("/v1/score/S1?x=%00", EncodedDelimiter),
        ("*", NotAbsolute),
        // Found by fuzzing: routed as `/`, but forwarded as it came, without a path.
        ("://a?a/r", NotAbsolute),
        ("http://bureau.example?x=1", NotAbsolute),
    ] {
        assert_eq!(norm(t), Err(why), "{t:?}");
    }
}

#[test]
fn raw_bytes_outside_ascii_are_refused() {
    // `Uri` parsing may accept them; build the check on bytes directly.
    assert_eq!(check_path("/v1/score/\u{e9}".as_bytes()), Err(TargetError::NonAscii));
    assert_eq!(check_query("x=\u{e9}".as_bytes()), Err(TargetError::NonAscii));
}

#[test]
fn normalising_twice_changes_nothing() {
    for t in ["/v1//score/./S%2d1/../S%c3%A9/", "/a/%7e/b/..", "/x/y/z?q=1"] {
        let once = norm(t).unwrap();
        let uri: Uri = once.parse().unwrap();
        assert_eq!(normalize(&uri), Ok(None), "{t:?} → {once:?} is normal");
    }
}

/// Normalisation as properties over targets built from the pieces that make paths ambiguous.
mod property {
    use proptest::prelude::*;

    use super::*;

    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/", "/", "/", "//", ".", "..", "/.", "/..", "a", "S-1", "v1", "~", "%41", "%2D", "%2d", "%7e", "%c3%a9",
            "%C3", "%20", "%2B", "+", "%2F", "%2f", "%2E", "%2e", "%5C", "%25", "%252F", "%00", "%", "%G1", ";", "\\",
            ":", "@", "!", "$", "'", "(", "*", ",", "=",
        ])
    }

    fn query_piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "=", "&", "%2F", "%2f", "..", "/", "+", "%00", "%", ";", "?", "%41"])
    }

    /// A target: a path of pieces, maybe a query.
    fn target() -> impl Strategy<Value = String> {
        let path = prop::collection::vec(piece(), 0..10).prop_map(|p| format!("/{}", p.concat()));
        let query = prop::option::of(prop::collection::vec(query_piece(), 0..5).prop_map(|q| q.concat()));
        (path, query).prop_map(|(p, q)| match q {
            Some(q) => format!("{p}?{q}"),
            None => p,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_normal_form_is_normal_and_never_climbs_or_doubles(t in target()) {
            let Ok(uri) = t.parse::<Uri>() else { return Ok(()) };
            if let Ok(normal) = norm(&t) {
                let (path, query) = normal.split_once('?').map_or((normal.as_str(), None), |(p, q)| (p, Some(q)));
                prop_assert!(path.starts_with('/'), "{} → {}", t, normal);
                prop_assert!(!path.contains("//"), "{} → {}", t, normal);
                prop_assert!(path == "/" || !path.ends_with('/'), "{} → {}", t, normal);
                prop_assert!(path.split('/').all(|s| s != "." && s != ".."), "{} → {}", t, normal);
                prop_assert_eq!(query, uri.query(), "the query is forwarded as sent");
                // Idempotent: the normal form is left alone (and not copied).
                prop_assert_eq!(normalize(&normal.parse().unwrap()), Ok(None), "{} → {}", t, normal);
            }
        }

        #[test]
        fn escaped_slashes_and_dots_are_always_refused(t in target()) {
            let Ok(uri) = t.parse::<Uri>() else { return Ok(()) };
            let path = uri.path().to_ascii_lowercase();
            if ["%2f", "%5c", "%2e", "%25"].iter().any(|e| path.contains(e)) {
                prop_assert!(norm(&t).is_err(), "{} was not refused", t);
            }
        }

        #[test]
        fn what_is_normal_already_is_not_rewritten(t in target()) {
            // A target that comes back unchanged must have been reported as normal (no copy), and
            // one reported normal must be normal by the rules above.
            let Ok(uri) = t.parse::<Uri>() else { return Ok(()) };
            if let Ok(Some(pq)) = normalize(&uri) {
                prop_assert_ne!(pq.as_str(), t.as_str(), "rewritten to itself");
            }
        }
    }
}

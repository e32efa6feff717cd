//! The admin listener as a browser page or another local process would try it: a token for
//! every `/admin/*` request, only its own names in `Host`, nothing sent by another site.

mod common;

use common::*;
use http::Method;

const TOKEN: &str = "admin-test-token";

async fn with_token() -> Env {
    let admin = format!("token_sha256 = \"{}\"", sha(TOKEN));
    Env::with(fast_mock(), &Extras { admin: &admin, ..Extras::default() }).await
}

#[tokio::test]
async fn with_a_token_set_usage_needs_it_and_probes_do_not() {
    let env = with_token().await;
    let bearer = format!("Bearer {TOKEN}");
    let r = get(&env.admin_url("/admin/tenants"), &[]).await;
    assert_eq!(r.status, 401, "tenant usage is not for anyone who can reach the port");
    assert_eq!(r.json()["error"], "unauthorized");
    assert_eq!(get(&env.admin_url("/admin/tenants"), &[("authorization", &bearer)]).await.status, 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&env.admin_url(open), &[]).await.status, 200, "{open}");
    }
}

#[tokio::test]
async fn a_foreign_host_or_another_site_is_refused_even_with_the_token() {
    let env = with_token().await;
    let bearer = format!("Bearer {TOKEN}");
    let purge = env.admin_url("/admin/cache/purge");
    let port = env.proxy.admin_addr.port();
    let c = client();
    // DNS rebinding: a page at attacker.example whose name now resolves to 127.0.0.1.
    let rebound = format!("attacker.example:{port}");
    let r = send(&c, Method::POST, &purge, &[("host", &rebound), ("authorization", &bearer)], b"").await;
    assert_eq!(r.status, 421, "{:?}", r.body);
    assert_eq!(r.json()["error"], "unknown_host");
    // CSRF: a page elsewhere posting to localhost (a form or fetch sends Origin).
    let r =
        send(&c, Method::POST, &purge, &[("origin", "http://attacker.example"), ("authorization", &bearer)], b"").await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.json()["error"], "cross_origin");
    let r = send(&c, Method::POST, &purge, &[("sec-fetch-site", "cross-site"), ("authorization", &bearer)], b"").await;
    assert_eq!(r.status, 403);
    // The operator, by the listen address, localhost, or the listener's own page.
    let localhost = format!("localhost:{port}");
    let own = format!("http://localhost:{port}");
    for headers in
        [vec![], vec![("host", localhost.as_str())], vec![("host", localhost.as_str()), ("origin", own.as_str())]]
    {
        let mut headers = headers;
        headers.push(("authorization", &bearer));
        let r = send(&c, Method::POST, &purge, &headers, b"").await;
        assert_eq!(r.status, 200, "{headers:?}: {:?}", r.body);
    }
    // Probes and scrapers address the listener by any name.
    assert_eq!(get(&env.admin_url("/readyz"), &[("host", &rebound)]).await.status, 200);
}

#[tokio::test]
async fn allowed_hosts_adds_names_the_operator_uses() {
    let admin = format!("token_sha256 = \"{}\"\nallowed_hosts = [\"guard-1.internal\"]", sha(TOKEN));
    let env = Env::with(fast_mock(), &Extras { admin: &admin, ..Extras::default() }).await;
    let bearer = format!("Bearer {TOKEN}");
    let port = env.proxy.admin_addr.port();
    let named = format!("guard-1.internal:{port}");
    let r = get(&env.admin_url("/admin/tenants"), &[("host", &named), ("authorization", &bearer)]).await;
    assert_eq!(r.status, 200);
    let other = format!("guard-2.internal:{port}");
    let r = get(&env.admin_url("/admin/tenants"), &[("host", &other), ("authorization", &bearer)]).await;
    assert_eq!(r.status, 421);
}

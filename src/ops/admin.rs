//! The admin listener: health, readiness, metrics, tenant usage and resets, on a port separate
//! from bank traffic so a surge of look-ups can never hide the proxy's own state from the operator.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 while serving, 503 before start and while draining |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /admin/tenants` | every tenant's limits and live usage, JSON |
//! | `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=ID][&format=csv\|json]` | usage statement by tenant, route and day (token) |
//! | `GET /admin/usage/request?id=ID[&since=YYYY-MM-DD][&limit=N]` | the audit records of one request and of the answers that rode on its bureau call, at most `limit` (100; 1000 at most), one scan at a time (429 otherwise) (token) |
//! | `GET /admin/usage/request?client_request_id=ID&tenant=T[&since=..][&limit=N]` | the records of one tenant's own client request id (token) |
//! | `POST /admin/tenants/{id}/reset` | zero a tenant's daily and monthly counters, its routes' too (token) |
//! | `POST /admin/reload` | re-read and apply the config file (token); 200 applied, 422 rejected |
//! | `POST /admin/cache/purge[?tenant=ID\|?route=NAME]` | drop cached answers: a tenant's, a route's, or all (token) |
//!
//! Every `/admin/*` request (usage included) must carry `Authorization: Bearer TOKEN`
//! (`admin.token_sha256`/`token_env`); only a config that writes `admin.insecure_no_token = true`
//! leaves them open. A listener on loopback is no protection by itself: any local process, and any
//! web page a browser on the host visits, can reach it. So `/admin/*` also answers only to the
//! names it is known by (`Host`: its listen address, localhost, 127.0.0.1 and [::1] at its port,
//! and `admin.allowed_hosts`; 421 otherwise, which defeats DNS rebinding) and refuses requests a
//! browser marks as coming from another site (`Origin` not one of those names, or
//! `Sec-Fetch-Site: cross-site`/`same-site`: 403), so a page cannot forge a POST (CSRF).
//! `/healthz`, `/readyz` and `/metrics` stay open to any name: probes and scrapers address the
//! listener by IP, and they change nothing. Each `POST` is logged with the peer address and the
//! `x-operator` header, if sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, ORIGIN};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admission::contract::Contract;
use crate::admission::quota::Windows;
use crate::config::AdminAuth;
use crate::respond::Body;
use crate::runtime::Shared;

/// The admin endpoints, one per connection (it knows its peer); served through
/// `tower::service_fn` in `app.rs`.
#[derive(Clone)]
pub struct Admin {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    /// The admin listener's bound address: the names it answers to follow from it.
    local: SocketAddr,
}

impl Admin {
    /// The service for one connection from `peer` to the admin listener bound at `local`.
    pub fn new(shared: Arc<Shared>, peer: Option<SocketAddr>, local: SocketAddr) -> Admin {
        Admin { shared, peer, local }
    }

    /// The checks every `/admin/*` request passes before its handler runs (see the module doc):
    /// the answer refusing it, if it fails one.
    fn refusal<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        let snap = self.shared.snapshot.load();
        let admin = &snap.config.admin;
        let hosts = AllowedHosts { local: self.local, extra: &admin.allowed_hosts };
        match same_site(req, &hosts) {
            Err(Refusal::Host) => {
                return Some(json(
                    StatusCode::MISDIRECTED_REQUEST,
                    &serde_json::json!({"error": "unknown_host", "message": "this admin listener does not answer to that Host; address it by its listen address or localhost, or add the name to admin.allowed_hosts"}),
                ));
            }
            Err(Refusal::CrossOrigin) => {
                return Some(json(
                    StatusCode::FORBIDDEN,
                    &serde_json::json!({"error": "cross_origin", "message": "admin requests from another site (Origin, Sec-Fetch-Site) are refused"}),
                ));
            }
            Ok(()) => {}
        }
        (!authorized(&admin.auth, req)).then(unauthorized)
    }

    /// `POST /admin/reload`: file reading and compiling run off the async workers.
    async fn reload(self, req: Request<Incoming>) -> Response<Body> {
        let who = self.who(&req);
        let shared = self.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || crate::ops::reload::reload_from_file(&shared)).await;
        match outcome {
            Ok(out) => {
                tracing::info!(by = %who, result = out.result, "reload requested");
                let status = if out.applied() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
                json(status, &out)
            }
            Err(_) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"result": "rejected", "changes": [], "problems": ["the reload task failed; the running config is unchanged"]}),
            ),
        }
    }

    /// `GET /admin/usage`: a usage statement (see `usage/`); 400 for a bad query or a tenant
    /// neither configured nor in the statement's days.
    async fn usage(self, req: Request<Incoming>) -> Response<Body> {
        use crate::usage::query::{self, Format};
        let bad = |message: String| {
            json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": "bad_request", "message": message}))
        };
        let usage = self.shared.usage.clone();
        let q = match query::parse(req.uri().query().unwrap_or(""), usage.retention_days()) {
            Ok(q) => q,
            Err(message) => return bad(message),
        };
        let snap = self.shared.snapshot.load_full();
        let (from, to, tenant) = (q.from, q.to, q.tenant.clone());
        // With Redis, every replica's usage: this one's copied there first (`usage/shared.rs`).
        let rows = if let Some(redis) = &self.shared.redis {
            let shared = if usage.ship(redis).await {
                redis.read_usage(from, to, tenant.as_deref()).await
            } else {
                Err("this replica's latest counts could not be copied".into())
            };
            match shared {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read usage from Redis");
                    let mut resp = json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"error": "usage_unavailable", "message": "Redis did not answer: the statement across replicas cannot be made now; every replica keeps its counts and copies them once Redis is back"}),
                    );
                    resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return resp;
                }
            }
        } else {
            // File reads (and the flush before them) block: off the async workers.
            match tokio::task::spawn_blocking(move || usage.rows(from, to, tenant.as_deref())).await {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read usage");
                    return json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"error": "usage_unavailable", "message": "the usage files could not be read; see the proxy's log"}),
                    );
                }
                Err(_) => {
                    return json(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({"error": "usage_unavailable"}));
                }
            }
        };
        let configured: Vec<String> = match &q.tenant {
            Some(t) => snap.tenants.by_id(t).map(|_| t.clone()).into_iter().collect(),
            None => snap.tenants.iter().map(|t| t.id.to_string()).collect(),
        };
        if let Some(t) = &q.tenant
            && configured.is_empty()
            && rows.is_empty()
        {
            return bad(format!("unknown tenant {t:?}: not in the running config and no usage in these days"));
        }
        match q.format {
            Format::Csv => {
                let mut resp = Response::new(Full::new(Bytes::from(crate::usage::statement::csv(&rows))));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8; header=present"));
                resp
            }
            Format::Json => {
                let statement =
                    crate::usage::statement::statement(q.from, q.to, snap.config.quota.utc_offset, &configured, &rows);
                let mut v = serde_json::to_value(statement).expect("a statement serializes");
                // Whose look-ups it counts: an operator comparing replicas must know.
                v["covers"] = serde_json::Value::from(match self.shared.redis {
                    Some(_) => "every replica sharing this Redis (the others' as of their last flush)",
                    None => "this replica",
                });
                json(StatusCode::OK, &v)
            }
        }
    }

    /// `GET /admin/usage/request?id=ID|client_request_id=ID&tenant=T[&since=YYYY-MM-DD][&limit=N]`:
    /// the audit records of one request and of the answers that rode on its bureau call, or of
    /// one tenant's client request id, across rotated audit files (`usage/reconcile.rs`). One
    /// scan at a time: a second is answered 429 with `Retry-After`.
    async fn usage_request(self, req: Request<Incoming>) -> Response<Body> {
        let bad = |message: String| {
            json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": "bad_request", "message": message}))
        };
        let snap = self.shared.snapshot.load_full();
        let Some(audit) = snap.config.audit.file.clone() else {
            return bad("no audit.file in the running config: there are no records to search".into());
        };
        let q = match crate::usage::query::parse_search(req.uri().query().unwrap_or(""), snap.config.quota.utc_offset) {
            Ok(q) => q,
            Err(message) => return bad(message),
        };
        let permit = match self.shared.usage.scans().try_start() {
            Ok(permit) => permit,
            Err(retry_after_s) => {
                let mut resp = json(
                    StatusCode::TOO_MANY_REQUESTS,
                    &serde_json::json!({"error": "scan_in_progress", "message": "another reconciliation scan is running; one runs at a time, retry once it has ended", "retry_after_s": retry_after_s}),
                );
                resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_s));
                return resp;
            }
        };
        // The scan reads gigabytes: on a blocking thread, holding the permit to its end even if
        // the operator's connection goes first.
        let scan = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            crate::usage::reconcile::find(&audit, &q.search, q.since_unix_ms, q.limit)
        });
        match scan.await {
            Ok(Ok(found)) => json(StatusCode::OK, &found),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the audit log");
                json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": "audit_unreadable", "message": "the audit files could not be read; see the proxy's log"}),
                )
            }
            Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({"error": "audit_unreadable"})),
        }
    }

    /// `POST /admin/cache/purge`: for when the bureau corrects a record.
    async fn purge(self, req: Request<Incoming>) -> Response<Body> {
        use crate::cache::store::Purge;
        let query = req.uri().query().unwrap_or("");
        let mut tenant = None;
        let mut route = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("tenant", v)) if !v.is_empty() => tenant = Some(v.to_string()),
                Some(("route", v)) if !v.is_empty() => route = Some(v.to_string()),
                _ => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "bad_request", "message": "use ?tenant=ID, ?route=NAME, or nothing for all"}),
                    );
                }
            }
        }
        let what = match (&tenant, &route) {
            (Some(_), Some(_)) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "bad_request", "message": "give tenant or route, not both"}),
                );
            }
            (Some(t), None) => Purge::Tenant(t),
            (None, Some(r)) => Purge::Route(r),
            (None, None) => Purge::All,
        };
        let scope = format!("{what:?}");
        let purged = self.shared.cache.purge(what).await;
        tracing::warn!(by = %self.who(&req), %scope, purged, "cache purged");
        json(StatusCode::OK, &serde_json::json!({"purged": purged}))
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                let (status, mut body) = if self.shared.is_ready() {
                    (StatusCode::OK, "ready\n".to_string())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
                };
                // What an operator must know about the shared state, ready or not.
                for note in self.shared.redis.iter().flat_map(|r| r.readiness_notes()) {
                    body.push_str(&format!("warning: {note}\n"));
                }
                let mut resp = text(status, "");
                *resp.body_mut() = Full::new(Bytes::from(body));
                resp
            }
            (&Method::GET, "/metrics") => {
                self.shared.refresh_gauges();
                let mut resp = Response::new(Full::new(Bytes::from(self.shared.metrics.encode())));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                resp
            }
            (&Method::GET, "/admin/tenants") => json(StatusCode::OK, &self.tenants()),
            _ => not_found(),
        }
    }

    fn who(&self, req: &Request<Incoming>) -> String {
        let operator = req
            .headers()
            .get("x-operator")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(64).collect::<String>());
        match (operator, self.peer) {
            (Some(op), Some(peer)) => format!("{op} from {peer}"),
            (Some(op), None) => op,
            (None, Some(peer)) => peer.to_string(),
            (None, None) => "unknown".to_string(),
        }
    }

    /// `POST /admin/tenants/{id}/reset`.
    async fn reset(self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        let id = path.strip_prefix("/admin/tenants/").and_then(|rest| rest.strip_suffix("/reset")).unwrap_or("");
        let snap = self.shared.snapshot.load_full();
        let Some(tenant) = snap.tenants.by_id(id) else {
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "unknown_tenant", "message": "no tenant with that id in the running config"}),
            );
        };
        let w = Windows::at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset);
        let unavailable = |what: &str| {
            let message = format!("Redis did not answer; {what}");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"error": "state_unavailable", "message": message}),
            )
        };
        let Some((daily, monthly)) = self.reset_contract(tenant, &w).await else {
            return unavailable("nothing was reset");
        };
        // The tenant's limits per route are its own too (its group's are shared: not reset).
        let mut routes = serde_json::Map::new();
        for (i, route) in snap.routes.iter().enumerate() {
            let Some(rc) = tenant.route_contract(i) else { continue };
            let Some((daily, monthly)) = self.reset_contract(&rc.contract, &w).await else {
                return unavailable("the tenant's own counts were reset, not all of its routes'");
            };
            routes.insert(route.name.to_string(), serde_json::json!({"daily_was": daily, "monthly_was": monthly}));
        }
        tracing::warn!(tenant = id, by = %self.who(&req), daily_was = daily, monthly_was = monthly, routes = routes.len(), "quota counters reset");
        let mut reset = serde_json::json!({"daily_was": daily, "monthly_was": monthly});
        if !routes.is_empty() {
            reset["routes"] = serde_json::Value::Object(routes);
        }
        json(StatusCode::OK, &serde_json::json!({"tenant": id, "reset": reset}))
    }

    /// Zeroes a contract's daily and monthly counts of windows `w` (with Redis, for every
    /// replica); the counts that were there, or `None` when Redis did not answer (nothing reset).
    async fn reset_contract(&self, c: &Contract, w: &Windows) -> Option<(u64, u64)> {
        let mut was = (c.state.daily.get(w.day), c.state.monthly.get(w.month));
        if let Some(redis) = &self.shared.redis {
            was = redis.reset(c, w).await?;
        }
        c.state.daily.set(w.day, 0);
        c.state.monthly.set(w.month, 0);
        Some(was)
    }

    fn tenants(&self) -> Vec<TenantView> {
        let snap = self.shared.snapshot.load();
        let w = Windows::at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset);
        snap.tenants
            .iter()
            .map(|t| {
                let (limits, usage) = self.contract_view(t, &w);
                let routes = snap
                    .routes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        let c = &t.route_contract(i)?.contract;
                        let (limits, usage) = self.contract_view(c, &w);
                        Some((r.name.to_string(), ContractView { limits, usage }))
                    })
                    .collect();
                let group = t.group.as_ref().map(|g| {
                    let view = g.contract.as_ref().map(|c| {
                        let (limits, usage) = self.contract_view(c, &w);
                        ContractView { limits, usage }
                    });
                    GroupView { id: g.id.to_string(), weight: g.weight, contract: view }
                });
                TenantView {
                    id: t.id.to_string(),
                    name: t.name.clone(),
                    weight: t.weight,
                    limits,
                    usage,
                    routes,
                    group,
                }
            })
            .collect()
    }

    /// One contract's limits and live use (a tenant's, its route's, its group's).
    fn contract_view(&self, c: &Contract, w: &Windows) -> (LimitsView, UsageView) {
        let l = &c.limits;
        let used = self.shared.quota_used(c, w);
        let limits = LimitsView {
            rate: l.rate,
            burst: l.rate.map(|_| l.burst),
            max_in_flight: l.max_in_flight,
            daily_quota: l.daily_quota,
            monthly_quota: l.monthly_quota,
            dry_run: [
                ("rate", l.dry_run.rate),
                ("in_flight", l.dry_run.in_flight),
                ("daily", l.dry_run.daily),
                ("monthly", l.dry_run.monthly),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect(),
        };
        let usage = UsageView {
            in_flight: c.state.in_flight.load(Ordering::Acquire),
            daily_used: used.0,
            daily_resets_in_s: w.day_resets_in_s,
            monthly_used: used.1,
            monthly_resets_in_s: w.month_resets_in_s,
        };
        (limits, usage)
    }
}

#[derive(Serialize)]
struct TenantView {
    id: String,
    name: String,
    weight: u32,
    limits: LimitsView,
    usage: UsageView,
    /// The tenant's own limits per route (`[tenants.routes.NAME]`), by route name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    routes: BTreeMap<String, ContractView>,
    /// The tenant's group, and what its members use together.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<GroupView>,
}

#[derive(Serialize)]
struct ContractView {
    limits: LimitsView,
    usage: UsageView,
}

#[derive(Serialize)]
struct GroupView {
    id: String,
    weight: u32,
    /// The group's aggregate limits and their use (all members, all replicas); absent when the
    /// group sets none.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    contract: Option<ContractView>,
}

#[derive(Serialize)]
struct LimitsView {
    rate: Option<f64>,
    burst: Option<u32>,
    max_in_flight: Option<u32>,
    daily_quota: Option<u64>,
    monthly_quota: Option<u64>,
    dry_run: Vec<&'static str>,
}

#[derive(Serialize)]
struct UsageView {
    in_flight: u32,
    daily_used: u64,
    daily_resets_in_s: u64,
    monthly_used: u64,
    monthly_resets_in_s: u64,
}

/// Whether the request carries the admin token (or the config says none is needed).
fn authorized<B>(auth: &AdminAuth, req: &Request<B>) -> bool {
    let AdminAuth::Token(want) = auth else { return true };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
    presented.is_some_and(|d| bool::from(d.ct_eq(want)))
}

/// The names `/admin/*` answers to: `host:port`, lower case, the port always written.
struct AllowedHosts<'a> {
    local: SocketAddr,
    extra: &'a [String],
}

impl AllowedHosts<'_> {
    /// Whether `authority` (a `Host` value or an origin's host, already given its default port)
    /// is one of ours.
    fn contains(&self, authority: &str) -> bool {
        let port = self.local.port();
        let ours =
            [self.local.to_string(), format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
        ours.iter().any(|h| h == authority)
            || self.extra.iter().any(|h| h == authority || with_port(h, port) == authority)
    }
}

/// `host` with `port` unless it names one already (`[v6]` without a port included).
fn with_port(host: &str, port: u16) -> String {
    let has_port = match host.rfind(':') {
        Some(i) => !host.starts_with('[') || host[..i].ends_with(']'),
        None => false,
    };
    if has_port { host.to_string() } else { format!("{host}:{port}") }
}

/// Why `/admin/*` refused a request before looking at its token.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// `Host` (or the h2 `:authority`) is missing or not one of ours: DNS rebinding, or a typo.
    Host,
    /// A browser says another site sent it.
    CrossOrigin,
}

/// Whether the request was addressed to us by a name of ours, and not sent by another site.
fn same_site<B>(req: &Request<B>, hosts: &AllowedHosts<'_>) -> Result<(), Refusal> {
    let host =
        req.headers().get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str()));
    let host = host.map(|h| with_port(&h.trim().to_ascii_lowercase(), 80));
    if !host.is_some_and(|h| hosts.contains(&h)) {
        return Err(Refusal::Host);
    }
    if let Some(origin) = req.headers().get(ORIGIN) {
        // `null` (a sandboxed frame, a redirect) and anything unreadable are refused too.
        let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
        let ok = match (origin.strip_prefix("http://"), origin.strip_prefix("https://")) {
            (Some(h), _) => hosts.contains(&with_port(h, 80)),
            (_, Some(h)) => hosts.contains(&with_port(h, 443)),
            _ => false,
        };
        if !ok {
            return Err(Refusal::CrossOrigin);
        }
    }
    // Browsers that send Origin only on some requests still send Sec-Fetch-Site; a sibling
    // subdomain (`same-site`) is another origin all the same.
    let site = req.headers().get("sec-fetch-site").map(|v| v.as_bytes());
    if matches!(site, Some(b"cross-site" | b"same-site")) {
        return Err(Refusal::CrossOrigin);
    }
    Ok(())
}

fn unauthorized() -> Response<Body> {
    json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"error": "unauthorized", "message": "send the admin token as `Authorization: Bearer TOKEN`"}),
    )
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz, /metrics or /admin/tenants\n")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).expect("admin views serialize");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl Admin {
    /// Answers one request on the admin listener; never fails.
    pub async fn serve(self, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path().starts_with("/admin/")
            && let Some(refused) = self.refusal(&req)
        {
            return refused;
        }
        if req.method() == Method::POST && req.uri().path() == "/admin/reload" {
            return self.reload(req).await;
        }
        if req.method() == Method::GET && req.uri().path() == "/admin/usage" {
            return self.usage(req).await;
        }
        if req.method() == Method::GET && req.uri().path() == "/admin/usage/request" {
            return self.usage_request(req).await;
        }
        if req.method() == Method::POST && req.uri().path() == "/admin/cache/purge" {
            return self.purge(req).await;
        }
        if req.method() == Method::POST
            && req.uri().path().starts_with("/admin/tenants/")
            && req.uri().path().ends_with("/reset")
        {
            return self.reset(req).await;
        }
        self.handle(&req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/admin/reload");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn check(headers: &[(&str, &str)]) -> Result<(), Refusal> {
        let extra = ["guard-1.internal".to_string(), "ops.internal:8443".to_string()];
        let hosts = AllowedHosts { local: "10.0.0.5:9090".parse().unwrap(), extra: &extra };
        same_site(&req(headers), &hosts)
    }

    #[test]
    fn admin_answers_only_to_its_own_names() {
        for host in ["10.0.0.5:9090", "localhost:9090", "LOCALHOST:9090", "127.0.0.1:9090", "[::1]:9090"] {
            assert_eq!(check(&[("host", host)]), Ok(()), "{host}");
        }
        for host in ["guard-1.internal:9090", "guard-1.internal", "ops.internal:8443"] {
            // An allowed name without a port answers at the listener's port (and at 80 if it
            // is the listener's).
            let want = if host == "guard-1.internal" { Err(Refusal::Host) } else { Ok(()) };
            assert_eq!(check(&[("host", host)]), want, "{host}");
        }
        // DNS rebinding: the attacker's name resolves to us, the browser sends its name.
        for host in ["attacker.example:9090", "localhost:9091", "ops.internal:9090", "localhost", ""] {
            assert_eq!(check(&[("host", host)]), Err(Refusal::Host), "{host:?}");
        }
        assert_eq!(check(&[]), Err(Refusal::Host), "no Host at all");
    }

    #[test]
    fn admin_refuses_what_a_browser_says_another_site_sent() {
        let host = ("host", "localhost:9090");
        assert_eq!(check(&[host, ("origin", "http://localhost:9090")]), Ok(()));
        assert_eq!(check(&[host, ("origin", "https://ops.internal:8443")]), Ok(()));
        assert_eq!(check(&[host, ("sec-fetch-site", "same-origin")]), Ok(()));
        assert_eq!(check(&[host, ("sec-fetch-site", "none")]), Ok(()), "typed in the address bar");
        for origin in ["http://attacker.example", "null", "http://localhost:9091", "file://", "http://localhost"] {
            assert_eq!(check(&[host, ("origin", origin)]), Err(Refusal::CrossOrigin), "{origin}");
        }
        for site in ["cross-site", "same-site"] {
            assert_eq!(check(&[host, ("sec-fetch-site", site)]), Err(Refusal::CrossOrigin), "{site}");
        }
    }

    #[test]
    fn the_token_is_compared_by_digest_and_optional_only_when_written_out() {
        let auth = AdminAuth::Token(Sha256::digest(b"s3cret").into());
        assert!(authorized(&auth, &req(&[("authorization", "Bearer s3cret")])));
        assert!(!authorized(&auth, &req(&[("authorization", "Bearer guess")])));
        assert!(!authorized(&auth, &req(&[])));
        assert!(authorized(&AdminAuth::InsecureNoToken, &req(&[])));
    }

    #[test]
    fn with_port_adds_the_port_only_when_missing() {
        assert_eq!(with_port("a.internal", 80), "a.internal:80");
        assert_eq!(with_port("a.internal:81", 80), "a.internal:81");
        assert_eq!(with_port("[::1]", 80), "[::1]:80");
        assert_eq!(with_port("[::1]:9", 80), "[::1]:9");
    }
}

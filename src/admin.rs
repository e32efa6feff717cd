//! The admin listener: health, readiness, metrics, tenant usage and resets, on a port separate
//! from bank traffic so a surge of look-ups can never hide the proxy's own state from the operator.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 while serving, 503 before start and while draining |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /admin/tenants` | every tenant's limits and live usage, JSON |
//! | `POST /admin/tenants/{id}/reset` | zero a tenant's daily and monthly counters (token) |
//! | `POST /admin/reload` | re-read and apply the config file (token); 200 applied, 422 rejected |
//! | `POST /admin/cache/purge[?tenant=ID\|?route=NAME]` | drop cached answers: a tenant's, a route's, or all (token) |
//!
//! `POST` endpoints require `Authorization: Bearer TOKEN` when `admin.token_sha256`/`token_env`
//! is configured; each is logged with the peer address and the `x-operator` header, if sent.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::quota::Windows;
use crate::respond::Body;
use crate::runtime::Shared;

/// The admin endpoints as a tower `Service`, one per connection (it knows its peer).
#[derive(Clone)]
pub struct Admin {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>, peer: Option<SocketAddr>) -> Admin {
        Admin { shared, peer }
    }

    /// `POST /admin/reload`: file reading and compiling run off the async workers.
    async fn reload(self, req: Request<Incoming>) -> Response<Body> {
        if !self.authorized(&req) {
            return unauthorized();
        }
        let who = self.who(&req);
        let shared = self.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || crate::reload::reload_from_file(&shared)).await;
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

    /// `POST /admin/cache/purge`: for when the bureau corrects a record.
    async fn purge(self, req: Request<Incoming>) -> Response<Body> {
        use crate::cache::Purge;
        if !self.authorized(&req) {
            return unauthorized();
        }
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
                if self.shared.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                self.shared.refresh_gauges();
                let mut resp = Response::new(Full::new(Bytes::from(self.shared.metrics.encode())));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                resp
            }
            (&Method::GET, "/admin/tenants") => json(StatusCode::OK, &self.tenants()),
            (&Method::POST, p) if p.starts_with("/admin/") => {
                if !self.authorized(req) {
                    return unauthorized();
                }
                not_found()
            }
            _ => not_found(),
        }
    }

    /// Whether the request carries the admin token (or no token is configured).
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(want) = self.shared.snapshot.load().config.admin.token_digest else { return true };
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
        presented.is_some_and(|d| bool::from(d.ct_eq(&want)))
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
        if !self.authorized(&req) {
            return unauthorized();
        }
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
        let (mut daily, mut monthly) = (tenant.state.daily.get(w.day), tenant.state.monthly.get(w.month));
        if let Some(redis) = &self.shared.redis {
            // The shared counts, for every replica.
            match redis.reset(tenant, &w).await {
                Some(was) => (daily, monthly) = was,
                None => {
                    return json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"error": "state_unavailable", "message": "Redis did not answer; nothing was reset"}),
                    );
                }
            }
        }
        tenant.state.daily.set(w.day, 0);
        tenant.state.monthly.set(w.month, 0);
        tracing::warn!(tenant = id, by = %self.who(&req), daily_was = daily, monthly_was = monthly, "quota counters reset");
        json(StatusCode::OK, &serde_json::json!({"tenant": id, "reset": {"daily_was": daily, "monthly_was": monthly}}))
    }

    fn tenants(&self) -> Vec<TenantView> {
        let snap = self.shared.snapshot.load();
        let w = Windows::at(self.shared.clock.now_unix_ms(), snap.config.quota.utc_offset);
        snap.tenants
            .iter()
            .map(|t| {
                let l = &t.limits;
                let used = self.shared.quota_used(t, &w);
                TenantView {
                    id: t.id.to_string(),
                    name: t.name.clone(),
                    weight: t.weight,
                    limits: LimitsView {
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
                    },
                    usage: UsageView {
                        in_flight: t.state.in_flight.load(Ordering::Acquire),
                        daily_used: used.0,
                        daily_resets_in_s: w.day_resets_in_s,
                        monthly_used: used.1,
                        monthly_resets_in_s: w.month_resets_in_s,
                    },
                }
            })
            .collect()
    }
}

#[derive(Serialize)]
struct TenantView {
    id: String,
    name: String,
    weight: u32,
    limits: LimitsView,
    usage: UsageView,
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

impl tower::Service<Request<Incoming>> for Admin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if req.method() == Method::POST && req.uri().path() == "/admin/reload" {
            let admin = self.clone();
            return Box::pin(async move { Ok(admin.reload(req).await) });
        }
        if req.method() == Method::POST && req.uri().path() == "/admin/cache/purge" {
            let admin = self.clone();
            return Box::pin(async move { Ok(admin.purge(req).await) });
        }
        if req.method() == Method::POST
            && req.uri().path().starts_with("/admin/tenants/")
            && req.uri().path().ends_with("/reset")
        {
            let admin = self.clone();
            return Box::pin(async move { Ok(admin.reset(req).await) });
        }
        let resp = self.handle(&req);
        Box::pin(async move { Ok(resp) })
    }
}

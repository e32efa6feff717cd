//! The HTTP side: routing a request to its endpoint, the look-ups (refused, overloaded or worked),
//! their answers, and echo.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::capacity::Overload;
use super::stats::{Inside, bump};
use super::{Body, MockBureau};

/// `Retry-After` on overload 503s (queue full, queue timeout): a full bureau asks for a short
/// pause, not for silence.
const OVERLOAD_RETRY_AFTER_S: u32 = 1;

/// What a look-up asks for; its answer is built by the worker, as the bureau's work.
enum LookUp {
    Report { subject_id: String, report_type: String },
    Score { subject_id: String },
}

impl LookUp {
    fn answer(&self) -> Vec<u8> {
        match self {
            LookUp::Report { subject_id, report_type } => credit_report(subject_id, report_type),
            LookUp::Score { subject_id } => {
                let h = fnv(subject_id.as_bytes());
                format!(r#"{{"score":{},"grade":{},"model":"mock-v1"}}"#, 300 + h % 600, 1 + h % 10).into_bytes()
            }
        }
    }
}

impl MockBureau {
    pub(super) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/stats") => json(StatusCode::OK, &self.stats()),
            (Method::POST, "/stats/reset") => {
                self.reset_window();
                json(StatusCode::OK, &self.stats())
            }
            (Method::POST, "/control") => self.control(req).await,
            (_, p) if p == "/echo" || p.starts_with("/echo/") => {
                let _inside = Inside::enter(&self);
                echo(req).await
            }
            (Method::POST, "/v1/credit-report") => {
                let inside = Inside::enter(&self);
                let tenant = self.count_call(&req);
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let Ok(ask) = serde_json::from_slice::<ReportRequest>(&body) else {
                    self.calls_bad_request.fetch_add(1, Ordering::Relaxed);
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "expected JSON {\"subject_id\": string, \"report_type\": string}",
                    );
                };
                let ask = LookUp::Report { subject_id: ask.subject_id, report_type: ask.report_type };
                self.look_up(inside, tenant, ask).await
            }
            (Method::GET, p) if p.starts_with("/v1/score/") && p.len() > "/v1/score/".len() => {
                let inside = Inside::enter(&self);
                let tenant = self.count_call(&req);
                let ask = LookUp::Score { subject_id: p["/v1/score/".len()..].to_string() };
                self.look_up(inside, tenant, ask).await
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "unknown bureau endpoint"),
        }
    }

    /// Counts a look-up call; returns its tenant.
    fn count_call(&self, req: &Request<Incoming>) -> String {
        self.calls_total.fetch_add(1, Ordering::Relaxed);
        let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("-");
        bump(&mut self.tenants.lock().expect("stats lock not poisoned").calls, tenant);
        tenant.to_string()
    }

    /// Refuses the call at once, or runs its work in a task of its own and waits for the answer.
    /// The task, not this future, holds `inside`: a client that leaves drops this future, never
    /// the bureau's work.
    async fn look_up(self: &Arc<Self>, inside: Inside, tenant: String, ask: LookUp) -> Response<Body> {
        if let Some(refused) = self.refuse(&tenant) {
            return refused;
        }
        let (answer_tx, answer_rx) = oneshot::channel();
        let bureau = self.clone();
        tokio::spawn(async move {
            let answer = match bureau.work().await {
                Ok(()) => {
                    bureau.calls_ok.fetch_add(1, Ordering::Relaxed);
                    bump(&mut bureau.tenants.lock().expect("stats lock not poisoned").served, &tenant);
                    let mut resp = Response::new(Full::new(Bytes::from(ask.answer())));
                    bureau.look_up_headers(&mut resp);
                    Ok(resp)
                }
                Err(overload) => Err(bureau.overloaded(&tenant, overload)),
            };
            let served = answer.is_ok();
            if answer_tx.send(answer.unwrap_or_else(|overloaded| overloaded)).is_err() && served {
                bureau.finished_for_nobody.fetch_add(1, Ordering::Relaxed);
            }
            // The call leaves the bureau only now, whatever its client did.
            drop(inside);
        });
        match answer_rx.await {
            Ok(answer) => answer,
            Err(_) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the look-up's task ended without an answer")
            }
        }
    }

    /// The answer to a call the refusal in force picks, if any.
    pub(super) fn refuse(&self, tenant: &str) -> Option<Response<Body>> {
        let refusal = self.refusal()?;
        // `fastrand::f64()` is in [0, 1): a share of 1 refuses every call, 0 none.
        if fastrand::f64() >= refusal.share {
            return None;
        }
        self.calls_refused.fetch_add(1, Ordering::Relaxed);
        bump(&mut self.tenants.lock().expect("stats lock not poisoned").refused, tenant);
        let mut resp = json(
            refusal.status,
            &serde_json::json!({
                "error": "bureau_refused",
                "message": "the bureau refuses calls for now",
                "retry_after_s": refusal.retry_after_s,
            }),
        );
        if let Some(s) = refusal.retry_after_s {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        Some(resp)
    }

    fn overloaded(&self, tenant: &str, why: Overload) -> Response<Body> {
        self.calls_overloaded.fetch_add(1, Ordering::Relaxed);
        bump(&mut self.tenants.lock().expect("stats lock not poisoned").refused, tenant);
        let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "bureau_overloaded", why.as_str());
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(OVERLOAD_RETRY_AFTER_S));
        resp
    }

    fn look_up_headers(&self, resp: &mut Response<Body>) {
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(cc) = self.cache_control.load_full() {
            resp.headers_mut().insert(http::header::CACHE_CONTROL, (*cc).clone());
        }
    }
}

#[derive(Deserialize)]
struct ReportRequest {
    subject_id: String,
    report_type: String,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A deterministic report of about 1.5 KB: same subject and type, same bytes.
pub fn credit_report(subject_id: &str, report_type: &str) -> Vec<u8> {
    const KINDS: [&str; 6] = ["card", "mortgage", "auto", "personal", "student", "overdraft"];
    const BANDS: [&str; 5] = ["A", "B", "C", "D", "E"];
    let h = fnv(subject_id.as_bytes());
    let accounts: Vec<serde_json::Value> = (0..9u64)
        .map(|i| {
            let x = h.rotate_left((i * 7) as u32);
            serde_json::json!({
                "account_id": format!("ACC-{:012}", x % 1_000_000_000_000),
                "kind": KINDS[(x % 6) as usize],
                "opened": format!("20{:02}-{:02}-01", 5 + x % 19, 1 + x % 12),
                "limit": 1_000 * (1 + x % 500),
                "balance": 100 * (x % 4_000),
                "status": if x % 17 == 0 { "delinquent" } else { "current" },
                "payments_late_24m": x % 3,
            })
        })
        .collect();
    let report = serde_json::json!({
        "bureau": "mock-bureau",
        "report_type": report_type,
        "subject_hash": format!("{h:016x}"),
        "score": 300 + h % 600,
        "risk_band": BANDS[(h % 5) as usize],
        "inquiries_12m": h % 9,
        "accounts": accounts,
        "public_records": [],
        "generated_by": "bureau-guard mock-bureau; deterministic synthetic data, no real person",
    });
    serde_json::to_vec(&report).expect("serializing JSON values cannot fail")
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.entry(name.as_str().to_string()).and_modify(|e| *e = format!("{e}, {v}")).or_insert(v);
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }),
    )
}

pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(value).expect("serializable"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({"error": code, "message": message}))
}

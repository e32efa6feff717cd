//! Back-pressure on demand and live settings: refusals, and `POST /control`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Deserializer};
use tokio::time::Instant;

use super::handler::{error, json};
use super::{Body, MAX_SERVICE_MS, MAX_WORKERS, MockBureau};

/// Back-pressure on demand: the bureau answers `status` with `Retry-After` to a share of the
/// look-up calls, at once and before they queue for a worker, as a bureau shedding load does.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// 429 or 503.
    pub status: StatusCode,
    /// The share of look-up calls refused, 0..=1 (1: every call).
    pub share: f64,
    /// `Retry-After` in seconds; `None`: no header.
    pub retry_after_s: Option<u32>,
    /// How long the refusal lasts from [`MockBureau::set_refusal`]; `None`: until cleared.
    pub duration: Option<Duration>,
}

impl Refusal {
    /// Every problem with this refusal (empty: it is valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.status != StatusCode::TOO_MANY_REQUESTS && self.status != StatusCode::SERVICE_UNAVAILABLE {
            problems.push(format!("status {} must be 429 or 503", self.status.as_u16()));
        }
        if !(0.0..=1.0).contains(&self.share) {
            problems.push(format!("share {} must be between 0 and 1", self.share));
        }
        problems
    }
}

/// A [`Refusal`] that cannot be applied, with every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRefusal(pub Vec<String>);

impl fmt::Display for InvalidRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid refusal: {}", self.0.join("; "))
    }
}

impl std::error::Error for InvalidRefusal {}

/// A refusal in force, with its end.
#[derive(Debug)]
pub(super) struct ActiveRefusal {
    refusal: Refusal,
    until: Option<Instant>,
}

impl MockBureau {
    /// Refuses look-up calls as `refusal` says from now on (its `duration` counts from now);
    /// `None` stops refusing. An invalid refusal changes nothing.
    pub fn set_refusal(&self, refusal: Option<Refusal>) -> Result<(), InvalidRefusal> {
        let Some(refusal) = refusal else {
            self.refusal.store(None);
            return Ok(());
        };
        let problems = refusal.problems();
        if !problems.is_empty() {
            return Err(InvalidRefusal(problems));
        }
        let until = refusal.duration.map(|d| Instant::now() + d);
        self.refusal.store(Some(Arc::new(ActiveRefusal { refusal, until })));
        Ok(())
    }

    /// The refusal in force now, if any (an expired one is cleared).
    pub fn refusal(&self) -> Option<Refusal> {
        self.active_refusal().map(|active| active.refusal.clone())
    }

    fn active_refusal(&self) -> Option<Arc<ActiveRefusal>> {
        let active = self.refusal.load_full()?;
        if active.until.is_some_and(|until| until <= Instant::now()) {
            // Only this refusal: one set meanwhile stays.
            self.refusal.compare_and_swap(&Some(active), None);
            return None;
        }
        Some(active)
    }

    /// `POST /control`: every field is checked before any applies.
    pub(super) async fn control(&self, req: Request<Incoming>) -> Response<Body> {
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let change = match Control::parse(&body) {
            Ok(c) => c,
            Err(problems) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({
                        "error": "bad_request",
                        "message": format!("nothing changed: {}", problems.join("; ")),
                        "problems": problems,
                    }),
                );
            }
        };
        if let Some(d) = change.service_time {
            self.set_service_time(d);
        }
        if let Some(n) = change.workers {
            self.set_workers(n);
        }
        if let Some(refusal) = change.refusal {
            // Checked in `Control::parse`.
            if let Err(e) = self.set_refusal(refusal) {
                return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string());
            }
        }
        json(StatusCode::OK, &self.settings())
    }

    /// The live settings, as `/control` answers them.
    fn settings(&self) -> serde_json::Value {
        let refuse = self.active_refusal().map(|a| {
            serde_json::json!({
                "status": a.refusal.status.as_u16(),
                "share": a.refusal.share,
                "retry_after_s": a.refusal.retry_after_s,
                "for_ms": a.until.map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64),
            })
        });
        serde_json::json!({
            "service_ms": self.service_time().as_millis() as u64,
            "workers": self.workers(),
            "refuse": refuse,
        })
    }
}

/// A `/control` body, checked: each field present is a change to apply.
#[derive(Debug, Default, PartialEq)]
struct Control {
    service_time: Option<Duration>,
    workers: Option<usize>,
    /// `Some(None)`: stop refusing.
    refusal: Option<Option<Refusal>>,
}

impl Control {
    /// Every problem, or the change.
    fn parse(body: &[u8]) -> Result<Control, Vec<String>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            service_ms: Option<u64>,
            workers: Option<usize>,
            #[serde(default, deserialize_with = "present")]
            refuse: Option<Option<RawRefuse>>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawRefuse {
            status: u16,
            #[serde(default = "every_call")]
            share: f64,
            retry_after_s: Option<u32>,
            for_ms: Option<u64>,
        }
        fn every_call() -> f64 {
            1.0
        }
        /// A field present, even as `null` (`Some(None)`), apart from an absent one (`None`).
        fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
            T::deserialize(d).map(Some)
        }

        let raw: Raw = serde_json::from_slice(body).map_err(|e| {
            vec![format!(
                "{e}; expected a JSON object of optional fields service_ms, workers, refuse \
                 ({{\"status\": 429|503, \"share\": 0..1, \"retry_after_s\": S, \"for_ms\": MS}} or null)"
            )]
        })?;
        let mut problems = Vec::new();
        if raw.service_ms.is_some_and(|ms| ms > MAX_SERVICE_MS) {
            problems.push(format!("service_ms must be at most {MAX_SERVICE_MS}"));
        }
        if raw.workers.is_some_and(|n| n > MAX_WORKERS) {
            problems.push(format!("workers must be at most {MAX_WORKERS}"));
        }
        let refusal = match raw.refuse {
            None => None,
            Some(None) => Some(None),
            Some(Some(r)) => match StatusCode::from_u16(r.status) {
                Ok(status) => {
                    let refusal = Refusal {
                        status,
                        share: r.share,
                        retry_after_s: r.retry_after_s,
                        duration: r.for_ms.map(Duration::from_millis),
                    };
                    problems.extend(refusal.problems().into_iter().map(|p| format!("refuse: {p}")));
                    Some(Some(refusal))
                }
                Err(_) => {
                    problems.push(format!("refuse: status {} must be 429 or 503", r.status));
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Control { service_time: raw.service_ms.map(Duration::from_millis), workers: raw.workers, refusal })
    }
}

//! The 2017 day, replayed on this machine: one bank surges far past the bureau's capacity while
//! two others keep their usual pace. Used by `bureau-guard demo` and by `benches/surge.rs`.
//!
//! The same open-loop traffic is sent twice: through bureau-guard (budget = the bureau's
//! workers, fair queuing, bounded queues) and straight to the bureau. Through bureau-guard the
//! quiet banks keep their success rate and latency and the surging bank gets the capacity they
//! leave; straight to the bureau everybody's look-ups queue and fail together.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::app;
use crate::config::Config;
use crate::loadgen::{LoadGenerator, LoadgenOptions, RequestFactory, RunSnapshot, StreamSpec};
use crate::mock_bureau::{self, MockConfig, Stats};

/// The surging tenant and the two quiet ones, with their demo keys.
pub const TENANTS: [(&str, &str); 3] =
    [("bank-a", "demo-key-bank-a"), ("bank-b", "demo-key-bank-b"), ("card-c", "demo-key-card-c")];

/// What to replay.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The bureau's capacity model.
    pub bureau: MockConfig,
    /// Requests per second of each quiet tenant, throughout.
    pub quiet_rate: f64,
    /// Requests per second of the surging tenant once it surges.
    pub surge_rate: f64,
    /// How long before the surge starts (the quiet tenants' baseline).
    pub calm: Duration,
    /// How long the surge lasts.
    pub surge: Duration,
    /// Each tenant's `max_queue` in bureau-guard.
    pub max_queue: usize,
    /// bureau-guard's `upstream.queue_timeout`.
    pub queue_timeout: Duration,
}

impl Default for Scenario {
    /// The issue's scenario: a bureau of 8 workers × 20 ms (≈ 400 req/s), two tenants at
    /// 40 req/s, one jumping from 0 to 1600 req/s (4× the bureau).
    fn default() -> Self {
        Scenario {
            bureau: MockConfig {
                workers: 8,
                service_time: Duration::from_millis(20),
                jitter: Duration::from_millis(2),
                queue: 64,
                queue_timeout: Duration::from_secs(1),
            },
            quiet_rate: 40.0,
            surge_rate: 1600.0,
            calm: Duration::from_secs(5),
            surge: Duration::from_secs(10),
            max_queue: 8,
            queue_timeout: Duration::from_millis(500),
        }
    }
}

impl Scenario {
    /// The bureau's capacity in requests per second.
    pub fn bureau_capacity(&self) -> f64 {
        self.bureau.workers as f64 / self.bureau.service_time.as_secs_f64().max(1e-6)
    }
}

/// Where the traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Guard,
    Direct,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Guard => "through bureau-guard",
            Target::Direct => "straight to the bureau",
        }
    }
}

/// The figures of one replay.
#[derive(Debug, Clone)]
pub struct Replay {
    pub target: Target,
    /// The whole run.
    pub total: RunSnapshot,
    /// The calm window (before the surge).
    pub calm: RunSnapshot,
    /// The surge window.
    pub surge: RunSnapshot,
    /// What reached the bureau.
    pub bureau: Stats,
    /// bureau-guard's capacity budget (None when direct).
    pub budget: Option<usize>,
}

/// The bureau-guard config of the scenario (ports chosen by the OS).
pub fn guard_config(s: &Scenario, bureau_url: &str) -> Config {
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "10s"
[admin]
listen = "127.0.0.1:0"
# The scenario makes no admin calls: a token nobody knows (a random digest) closes /admin/*.
token_sha256 = "{admin_digest}"
[upstream]
url = "{bureau_url}"
max_concurrency = {workers}
queue_timeout = "{queue_ms}ms"
response_timeout = "5s"
[log]
access_log = false
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
"#,
        workers = s.bureau.workers,
        queue_ms = s.queue_timeout.as_millis(),
        admin_digest = {
            let mut digest = [0u8; 32];
            getrandom::fill(&mut digest).expect("the operating system's random source is available");
            hex::encode(digest)
        },
    );
    for (id, key) in TENANTS {
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
        text.push_str(&format!(
            "[[tenants]]\nid = \"{id}\"\napi_key_sha256 = \"{digest}\"\nmax_queue = {}\n",
            s.max_queue
        ));
    }
    Config::from_toml(&text, &|_| None).expect("the scenario's config is valid")
}

fn streams(s: &Scenario, base: &str, target: Target) -> Vec<StreamSpec> {
    TENANTS
        .iter()
        .enumerate()
        .map(|(i, (id, key))| {
            let (base, id, key) = (base.to_string(), id.to_string(), key.to_string());
            let request = RequestFactory::from_fn(move |seq| {
                let mut req = Request::builder().uri(format!("{base}/v1/score/{id}-S{seq}"));
                req = match target {
                    Target::Guard => req.header("x-api-key", key.as_str()),
                    // Straight to the bureau, the bank says who it is itself.
                    Target::Direct => req.header("x-tenant", id.as_str()),
                };
                req.body(Full::new(Bytes::new())).expect("a valid request")
            });
            let spec = StreamSpec::new(TENANTS[i].0, request);
            if i == 0 {
                spec.phase(s.calm, 0.0).phase(s.surge, s.surge_rate)
            } else {
                spec.phase(s.calm + s.surge, s.quiet_rate)
            }
        })
        .collect()
}

/// Replays the scenario against `target`, calling `tick` about once a second with the
/// cumulative figures and the time elapsed.
pub async fn replay(s: &Scenario, target: Target, mut tick: impl FnMut(&RunSnapshot)) -> anyhow::Result<Replay> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bureau = mock_bureau::start(s.bureau.clone(), listener);
    let (base, guard) = match target {
        Target::Guard => {
            let running = app::start(guard_config(s, &bureau.url())).await?;
            (format!("http://{}", running.addr), Some(running))
        }
        Target::Direct => (bureau.url(), None),
    };
    let budget = guard.as_ref().map(|g| g.shared.scheduler.limit());

    let generator =
        LoadGenerator::new(LoadgenOptions { request_timeout: Duration::from_secs(5), ..Default::default() });
    let run = generator.start(streams(s, &base, target))?;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    let mut calm = None;
    while !run.is_finished() {
        every.tick().await;
        let now = run.snapshot();
        if calm.is_none() && now.elapsed >= s.calm {
            calm = Some(now.clone());
        }
        tick(&now);
    }
    let total = run.wait().await;
    let calm = calm.unwrap_or_else(|| total.clone());
    let surge = total.since(&calm);
    if let Some(g) = guard {
        g.shutdown().await;
    }
    let stats = bureau.bureau.stats();
    bureau.shutdown().await;
    Ok(Replay { target, total, calm, surge, bureau: stats, budget })
}

/// One line per tenant: success rate and latency through the calm and the surge windows.
pub fn summary(r: &Replay) -> String {
    let mut out = format!(
        "{}: bureau saw {} calls, at most {} at once{}\n",
        r.target.label(),
        r.bureau.calls_total,
        r.bureau.max_in_flight,
        r.budget.map(|b| format!(" (budget {b})")).unwrap_or_default()
    );
    out.push_str(&format!(
        "  {:<8} {:>7} {:>7} {:>7} {:>9} {:>12} {:>12} {:>14}\n",
        "tenant", "sent", "ok", "ok %", "failed", "calm p99 ms", "surge p99 ms", "reject p99 ms"
    ));
    for t in &r.total.streams {
        let ok = t.class_count(2);
        let pct = if t.sent == 0 { 100.0 } else { 100.0 * ok as f64 / t.sent as f64 };
        let p99 =
            |snap: &RunSnapshot| snap.stream(&t.name).map_or(0.0, |s| s.success_summary().p99.as_secs_f64() * 1000.0);
        out.push_str(&format!(
            "  {:<8} {:>7} {:>7} {:>6.2}% {:>9} {:>12.1} {:>12.1} {:>14.1}\n",
            t.name,
            t.sent,
            ok,
            pct,
            t.sent - ok,
            p99(&r.calm),
            p99(&r.surge),
            t.rejected_summary().p99.as_secs_f64() * 1000.0,
        ));
    }
    out
}

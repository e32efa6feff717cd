use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Response, server::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

type Respond = dyn Fn(&Request<Incoming>) -> (StatusCode, Duration) + Send + Sync;

/// An HTTP/1.1 server on 127.0.0.1:0 that answers each request with the
/// status `respond` picks, after the delay it picks, and counts requests.
struct TestServer {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl TestServer {
    async fn start(respond: impl Fn(&Request<Incoming>) -> (StatusCode, Duration) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let respond: Arc<Respond> = Arc::new(respond);
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let respond = Arc::clone(&respond);
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let (status, delay) = respond(&request);
                        async move {
                            tokio::time::sleep(delay).await;
                            let mut response = Response::new(Full::new(Bytes::from_static(b"{\"score\":700}")));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
        Self { addr, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

fn ok_instantly(_: &Request<Incoming>) -> (StatusCode, Duration) {
    (StatusCode::OK, Duration::ZERO)
}

fn generator(request_timeout: Duration) -> LoadGenerator {
    LoadGenerator::new(LoadgenOptions { request_timeout, ..LoadgenOptions::default() })
}

#[test]
fn phase_issues_ceiling_of_duration_times_rate() {
    assert_eq!(Phase::new(Duration::from_secs(1), 1000.0).requests(), 1000);
    // 0.3 * 10 is 3.0000000000000004 in floating point: still 3.
    assert_eq!(Phase::new(Duration::from_millis(300), 10.0).requests(), 3);
    // Sends at 0, 0.4 and 0.8 s.
    assert_eq!(Phase::new(Duration::from_secs(1), 2.5).requests(), 3);
    assert_eq!(Phase::new(Duration::from_secs(5), 0.0).requests(), 0);
    assert_eq!(Phase::new(Duration::from_secs(1), f64::NAN).requests(), 0);
}

#[test]
fn template_accepts_only_absolute_http_urls() {
    assert!(RequestTemplate::get("http://127.0.0.1:1/x").is_ok());
    assert!(RequestTemplate::get("https://127.0.0.1:1/x").is_ok());
    assert!(matches!(RequestTemplate::get("ftp://127.0.0.1:1/x"), Err(LoadgenError::InvalidUrl { .. })));
    assert!(matches!(RequestTemplate::get("/relative"), Err(LoadgenError::InvalidUrl { .. })));
    let template = RequestTemplate::get("http://127.0.0.1:1/x").unwrap();
    assert!(matches!(template.header("bad header", "v"), Err(LoadgenError::InvalidHeader { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_rejects_invalid_rates_and_empty_runs() {
    let template = RequestTemplate::get("http://127.0.0.1:1/").unwrap();
    let generator = generator(Duration::from_secs(1));
    assert!(matches!(generator.start(Vec::new()), Err(LoadgenError::NoStreams)));
    let negative = StreamSpec::new("s", template).phase(Duration::from_secs(1), -1.0);
    assert!(matches!(generator.start(vec![negative]), Err(LoadgenError::InvalidPhase { phase: 0, .. })));
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let template = RequestTemplate::get("http://127.0.0.1:1/").unwrap();
    let stream = StreamSpec::new("s", template).phase(Duration::from_secs(1), 1.0);
    let result = generator(Duration::from_secs(1)).start(vec![stream]);
    assert!(matches!(result, Err(LoadgenError::NoRuntime)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheduled_request_is_sent_once_across_phases_and_streams() {
    // Answers 200 only when the templated header arrived.
    let server = TestServer::start(|request| {
        let keyed = request.headers().get("x-api-key").is_some_and(|v| v == "k1");
        let status = if keyed { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
        (status, Duration::ZERO)
    })
    .await;
    let template = RequestTemplate::get(&server.url("/v1/score/S1")).unwrap().header("x-api-key", "k1").unwrap();
    let ramp = StreamSpec::new("ramp", template.clone())
        .phase(Duration::from_millis(400), 250.0) // 100
        .phase(Duration::from_millis(300), 500.0) // 150
        .phase(Duration::from_millis(200), 0.0) // pause
        .phase(Duration::from_millis(100), 100.0); // 10
    let steady = StreamSpec::new("steady", template).phase(Duration::from_millis(500), 100.0);
    assert_eq!(ramp.planned_requests(), 260);
    assert_eq!(steady.planned_requests(), 50);

    let report = generator(Duration::from_secs(10)).run(vec![ramp, steady]).await.unwrap();

    assert!(report.finished);
    for (name, planned) in [("ramp", 260), ("steady", 50)] {
        let stream = report.stream(name).unwrap();
        assert_eq!(stream.planned, planned, "{name}");
        assert_eq!(stream.sent, planned, "{name}");
        assert_eq!(stream.responses, planned, "{name}: {:?}", stream.last_error);
        assert_eq!(stream.status_count(200), planned, "{name}");
        assert_eq!(stream.success_latency_us.len(), planned, "{name}");
        assert_eq!(stream.send_lag_us.len(), planned, "{name}");
        assert_eq!(stream.failures(), 0, "{name}");
        assert_eq!(stream.in_flight(), 0, "{name}");
    }
    assert_eq!(server.received(), 310);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_counts_from_the_scheduled_time_not_the_send_time() {
    let server = TestServer::start(ok_instantly).await;
    let template = RequestTemplate::get(&server.url("/")).unwrap();
    // An empty schedule: the run exists only to execute one request by
    // hand, scheduled 300 ms before it is actually sent.
    let stream = StreamSpec::new("late", template).phase(Duration::from_millis(10), 0.0);
    let run = generator(Duration::from_secs(10)).start(vec![stream]).unwrap();
    let scheduled =
        Instant::now().checked_sub(Duration::from_millis(300)).expect("the machine has been up for more than 300 ms");
    execute(PendingGuard::acquire(&run.shared), 0, 0, scheduled).await;

    let report = run.wait().await;
    let stream = report.stream("late").unwrap();
    assert_eq!(stream.status_count(200), 1);
    // Compared at the histograms' resolution (0.1%).
    let floor = stream.success_latency_us.lowest_equivalent(300_000);
    assert!(stream.success_latency_us.min() >= floor);
    assert!(stream.send_lag_us.min() >= floor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_already_past_its_timeout_is_not_sent() {
    let server = TestServer::start(ok_instantly).await;
    let template = RequestTemplate::get(&server.url("/")).unwrap();
    let stream = StreamSpec::new("doomed", template).phase(Duration::from_millis(10), 0.0);
    let run = generator(Duration::from_millis(100)).start(vec![stream]).unwrap();
    let scheduled =
        Instant::now().checked_sub(Duration::from_millis(300)).expect("the machine has been up for more than 300 ms");
    execute(PendingGuard::acquire(&run.shared), 0, 0, scheduled).await;

    let report = run.wait().await;
    let stream = report.stream("doomed").unwrap();
    assert_eq!(stream.timeouts, 1);
    assert_eq!(stream.responses, 0);
    assert_eq!(server.received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_shows_its_delay_in_every_latency() {
    let server = TestServer::start(|_| (StatusCode::OK, Duration::from_millis(50))).await;
    let template = RequestTemplate::get(&server.url("/")).unwrap();
    let stream = StreamSpec::new("slow", template).phase(Duration::from_millis(500), 100.0);
    let report = generator(Duration::from_secs(10)).run(vec![stream]).await.unwrap();
    let stream = report.stream("slow").unwrap();
    assert_eq!(stream.status_count(200), 50);
    let floor = stream.success_latency_us.lowest_equivalent(50_000);
    assert!(stream.success_latency_us.min() >= floor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_are_counted_exactly_and_rejections_kept_apart() {
    // Path /s/{seq}: seq % 4 picks 429, 503, 504 or 200.
    let server = TestServer::start(|request| {
        let seq: u64 = request.uri().path().trim_start_matches("/s/").parse().unwrap_or(0);
        let status = match seq % 4 {
            0 => StatusCode::TOO_MANY_REQUESTS,
            1 => StatusCode::SERVICE_UNAVAILABLE,
            2 => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::OK,
        };
        (status, Duration::ZERO)
    })
    .await;
    let factory = RequestTemplate::get(&server.url("/")).unwrap().vary_path(|seq| format!("/s/{seq}"));
    let stream = StreamSpec::new("mixed", factory).phase(Duration::from_millis(500), 200.0);
    let report = generator(Duration::from_secs(10)).run(vec![stream]).await.unwrap();
    let stream = report.stream("mixed").unwrap();
    assert_eq!(stream.responses, 100);
    for code in [200, 429, 503, 504] {
        assert_eq!(stream.status_count(code), 25, "status {code}");
    }
    assert_eq!(stream.class_count(2), 25);
    assert_eq!(stream.class_count(4), 25);
    assert_eq!(stream.class_count(5), 50);
    assert_eq!(stream.success_latency_us.len(), 25);
    assert_eq!(stream.rejected_latency_us.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_response_in_time_are_timeouts() {
    let server = TestServer::start(|_| (StatusCode::OK, Duration::from_secs(30))).await;
    let template = RequestTemplate::get(&server.url("/")).unwrap();
    let stream = StreamSpec::new("stuck", template).phase(Duration::from_millis(100), 100.0);
    let report = generator(Duration::from_millis(200)).run(vec![stream]).await.unwrap();
    let stream = report.stream("stuck").unwrap();
    assert_eq!(stream.sent, 10);
    assert_eq!(stream.timeouts, 10);
    assert_eq!(stream.responses, 0);
    assert!(stream.success_latency_us.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_closes_its_connection() {
    use tokio::io::AsyncReadExt;
    // A server that reads the request, never answers, and reports when its client hangs up:
    // a proxy must see a bank that gave up as a disconnect, not as a request still waiting.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slow", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        while tcp.read(&mut buf).await.unwrap_or(0) > 0 {}
        let _ = closed_tx.send(Instant::now());
    });
    let stream = StreamSpec::new("gives-up", RequestTemplate::get(&url).unwrap()).phase(Duration::from_millis(1), 1.0);
    let started = Instant::now();
    let report = generator(Duration::from_millis(100)).run(vec![stream]).await.unwrap();
    assert_eq!(report.stream("gives-up").unwrap().timeouts, 1);
    let closed = tokio::time::timeout(Duration::from_secs(2), closed_rx)
        .await
        .expect("the server sees the client hang up")
        .unwrap();
    assert!(closed.duration_since(started) < Duration::from_millis(1000), "closed after {:?}", closed - started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_transport_errors() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let template = RequestTemplate::get(&format!("http://{addr}/")).unwrap();
    let stream = StreamSpec::new("down", template).phase(Duration::from_millis(100), 100.0);
    let report = generator(Duration::from_secs(5)).run(vec![stream]).await.unwrap();
    let stream = report.stream("down").unwrap();
    assert_eq!(stream.sent, 10);
    assert_eq!(stream.transport_errors, 10);
    assert_eq!(stream.responses, 0);
    assert!(stream.last_error.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_varied_path_is_a_request_error_not_a_send() {
    let server = TestServer::start(ok_instantly).await;
    let factory = RequestTemplate::get(&server.url("/"))
        .unwrap()
        .vary_path(|seq| if seq == 0 { "no slash".to_owned() } else { format!("/{seq}") });
    let stream = StreamSpec::new("typo", factory).phase(Duration::from_millis(100), 100.0);
    let report = generator(Duration::from_secs(10)).run(vec![stream]).await.unwrap();
    let stream = report.stream("typo").unwrap();
    assert_eq!(stream.request_errors, 1);
    assert_eq!(stream.status_count(200), 9);
    assert_eq!(server.received(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_show_a_run_in_progress_and_stop_ends_it() {
    let server = TestServer::start(ok_instantly).await;
    let template = RequestTemplate::get(&server.url("/")).unwrap();
    // Far longer than the test: it must end through `stop`.
    let stream = StreamSpec::new("long", template).phase(Duration::from_secs(600), 100.0);
    let run = generator(Duration::from_secs(10)).start(vec![stream]).unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let earlier = loop {
        let snapshot = run.snapshot();
        if snapshot.streams[0].responses >= 5 {
            break snapshot;
        }
        assert!(Instant::now() < deadline, "no responses: {snapshot}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!earlier.finished);
    assert!(!run.is_finished());

    run.stop();
    let report = run.wait().await;
    let stream = report.stream("long").unwrap();
    assert!(report.finished);
    assert!(stream.sent < stream.planned);
    assert_eq!(stream.responses, stream.sent);
    assert_eq!(stream.in_flight(), 0);
    assert_eq!(server.received(), stream.sent);

    let delta = report.since(&earlier);
    let delta = delta.stream("long").unwrap();
    assert_eq!(delta.sent, stream.sent - earlier.streams[0].sent);
    assert_eq!(
        delta.success_latency_us.len(),
        stream.success_latency_us.len() - earlier.streams[0].success_latency_us.len()
    );
}

//! An upstream for expiring credentials: it reads the expiry written into
//! each token it receives, rejects (401) a request whose token has expired,
//! and counts what it saw (the key_command and OAuth2 tests).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Request;
use tokio::sync::mpsc;

use crate::support::ops::{eventually, sse, AdminRelay, HeldStream};
use crate::support::{
    body_bytes, empty, http1_client, within, Exchange, MockUpstream, Relay, TestClient,
};

/// What the token-checking upstream saw.
#[derive(Default)]
struct Seen {
    accepted: usize,
    /// Requests that arrived with an expired (or unreadable) token.
    rejected: Vec<String>,
    /// The run number of every token that arrived.
    runs: BTreeSet<u64>,
}

/// The run number and expiry (ms since the epoch) in a token's header
/// value, `Bearer PREFIX<run>-<expiry>`.
fn token_parts(authorization: &[u8], prefix: &str) -> Option<(u64, u128)> {
    let text = std::str::from_utf8(authorization).ok()?;
    let rest = text.strip_prefix("Bearer ")?.strip_prefix(prefix)?;
    let (run, expiry) = rest.split_once('-')?;
    Some((run.parse().ok()?, expiry.parse().ok()?))
}

/// GETs `url` with `client`, bounded by [`within`].
pub(crate) async fn get(client: &TestClient, url: String) -> http::Response<hyper::body::Incoming> {
    let request = Request::get(url).body(empty()).expect("request");
    within("keyrelay's answer", client.request(request))
        .await
        .expect("response")
}

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

/// An upstream that answers 401 to a request whose token has expired,
/// 401 to every request under `/unauthorized`, hands requests under
/// `/stream` to the test, and answers the rest 200.
pub(crate) struct CheckingUpstream {
    pub(crate) url: String,
    seen: Arc<Mutex<Seen>>,
    streams: mpsc::UnboundedReceiver<Exchange>,
}

impl CheckingUpstream {
    /// Accepts tokens written `PREFIX<run>-<expiry in ms>`.
    pub(crate) async fn start(prefix: &'static str) -> Self {
        let mut mock = MockUpstream::start().await;
        let url = mock.url();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (to_test, streams) = mpsc::unbounded_channel();
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Some(exchange) = mock.recv().await else {
                    return;
                };
                let token = (exchange.request.headers().get("authorization"))
                    .and_then(|value| token_parts(value.as_bytes(), prefix));
                let fresh = token.is_some_and(|(_, expiry)| now_ms() <= expiry);
                {
                    let mut seen = record.lock().expect("lock");
                    if let Some((run, _)) = token {
                        seen.runs.insert(run);
                    }
                    if fresh {
                        seen.accepted += 1;
                    } else {
                        let path = exchange.request.uri().path().to_owned();
                        seen.rejected
                            .push(format!("{path} at {} ms: {token:?}", now_ms()));
                    }
                }
                let path = exchange.request.uri().path();
                if !fresh || path.starts_with("/unauthorized") {
                    exchange.respond_full(401, r#"{"error": "invalid token"}"#);
                } else if path.starts_with("/stream") {
                    let _ = to_test.send(exchange);
                } else {
                    exchange.respond_full(200, "ok");
                }
            }
        });
        Self { url, seen, streams }
    }

    pub(crate) fn accepted(&self) -> usize {
        self.seen.lock().expect("lock").accepted
    }

    pub(crate) fn rejected(&self) -> Vec<String> {
        self.seen.lock().expect("lock").rejected.clone()
    }

    pub(crate) fn runs_seen(&self) -> BTreeSet<u64> {
        self.seen.lock().expect("lock").runs.clone()
    }
}

impl CheckingUpstream {
    /// GETs `url` (a path under `/stream`) with `client`, answers it with a
    /// held event stream and returns once the client has its head.
    pub(crate) async fn open_stream(&mut self, client: &TestClient, url: String) -> HeldStream {
        let pending =
            tokio::spawn(client.request(Request::get(url).body(empty()).expect("request")));
        let exchange = within("the stream at the upstream", self.streams.recv())
            .await
            .expect("upstream running");
        let upstream_headers = exchange.request.headers().clone();
        let (tx, dropped) = exchange.respond_streaming_with(sse());
        let response = within("the stream's head", pending)
            .await
            .expect("join")
            .expect("response");
        assert_eq!(response.status(), 200);
        HeldStream {
            tx,
            dropped,
            body: response.into_body(),
            upstream_headers,
            relayed: 0,
        }
    }
}

/// Holds a stream open through `relay` while requests go one after another
/// for 4 s (and 200 of them at least), a stream frame in lockstep every
/// 250 ms; then checks that the stream completed untouched, the source was
/// asked (`fetches` counts it) at least twice meanwhile, the upstream saw
/// three tokens or more and never an expired one. Prints the figures.
pub(crate) async fn rotations_beside_a_stream(
    upstream: &mut CheckingUpstream,
    relay: &Relay,
    fetches: impl Fn() -> u64,
) {
    let client = http1_client();
    let mut stream = upstream.open_stream(&client, relay.url("/stream")).await;
    let fetches_at_start = fetches();
    let url = relay.url("/v1/models");
    let started = Instant::now();
    let (mut requests, mut frames) = (0, 0);
    while started.elapsed() < Duration::from_secs(4) || requests < 200 {
        let request = Request::get(&url).body(empty()).expect("request");
        let response = within("keyrelay's answer", client.request(request))
            .await
            .expect("response");
        assert_eq!(response.status(), 200, "request {requests}");
        requests += 1;
        if started.elapsed() >= Duration::from_millis(250) * frames {
            stream.lockstep(&format!("data: {frames}\n\n")).await;
            frames += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stream.finish().await;

    assert!(
        fetches() >= fetches_at_start + 2,
        "two rotations at least while the stream was open: {} fetches",
        fetches()
    );
    assert!(
        upstream.runs_seen().len() >= 3,
        "{:?}",
        upstream.runs_seen()
    );
    assert_eq!(
        upstream.rejected(),
        Vec::<String>::new(),
        "expired tokens sent"
    );
    assert_eq!(upstream.accepted(), requests + 1);
    eprintln!(
        "{requests} requests and {frames} stream frames over {} fetches, 0 expired tokens",
        fetches()
    );
}

/// An upstream 401 reaches the client unchanged and makes the source
/// (`fetches` counts it; once so far) fetch once more; more 401s within
/// the rate limit's window make it fetch no more, and the next request
/// carries the new token.
pub(crate) async fn one_fetch_for_401s(
    upstream: &CheckingUpstream,
    relay: &Relay,
    fetches: impl Fn() -> u64,
) {
    let client = http1_client();
    assert_eq!(fetches(), 1);
    let get = |path: &str| {
        let request = Request::get(relay.url(path))
            .body(empty())
            .expect("request");
        within("keyrelay's answer", client.request(request))
    };
    let response = get("/unauthorized").await.expect("response");
    assert_eq!(
        response.status(),
        401,
        "the upstream's 401 reaches the client"
    );
    let body = body_bytes(response).await;
    assert_eq!(&body[..], br#"{"error": "invalid token"}"#);
    eventually("a second fetch", || {
        let fetched = fetches();
        async move { (fetched == 2).then_some(()) }
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get("/unauthorized").await.expect("response").status(), 401);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fetches(), 2, "401s within 10 s make one fetch");
    assert_eq!(get("/v1/models").await.expect("response").status(), 200);
    assert!(
        upstream.runs_seen().contains(&2),
        "{:?}",
        upstream.runs_seen()
    );
}

/// Once `relay`'s credential has expired and its source keeps failing:
/// `/readyz` fails naming the route, a request gets 503
/// `credential_unavailable` with a `Retry-After`, nothing reaches the
/// upstream, and the expiry gauge is at or below zero.
pub(crate) async fn expired_means_503_and_nothing_forwarded(
    upstream: &CheckingUpstream,
    relay: &AdminRelay,
) {
    let labels = [("route", "default"), ("result", "error")];
    eventually("a failed refresh", || async {
        let failed = relay.scrape().await;
        (failed.counter("keyrelay_credential_refreshes_total", &labels) >= 1.0).then_some(())
    })
    .await;
    let not_ready = relay.wait_for_readyz(503).await;
    assert!(
        not_ready.body_text().contains("credential_unavailable")
            && not_ready.body_text().contains("default"),
        "{}",
        not_ready.body_text()
    );
    let forwarded = upstream.accepted() + upstream.rejected().len();
    let request = Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let response = within("keyrelay's answer", http1_client().request(request))
        .await
        .expect("response");
    assert_eq!(response.status(), 503);
    let retry_after = response.headers()["retry-after"].to_str().expect("ascii");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "{retry_after}"
    );
    let body: serde_json::Value =
        serde_json::from_slice(&body_bytes(response).await).expect("JSON error");
    assert_eq!(body["type"], "credential_unavailable");
    assert_eq!(
        upstream.accepted() + upstream.rejected().len(),
        forwarded,
        "nothing forwarded with an expired credential"
    );
    let scrape = relay.scrape().await;
    let left = scrape.value(
        "keyrelay_credential_expiry_seconds",
        &[("route", "default")],
    );
    assert!(left.is_some_and(|left| left <= 0.0), "{left:?}");
}

/// Once `relay`'s source works again: `/readyz` recovers, a request gets
/// 200, and no expired token ever reached the upstream. Stops keyrelay
/// (run at `RUST_LOG=trace`) and returns its log for the leak scans.
pub(crate) async fn recovered_then_log(
    upstream: &CheckingUpstream,
    relay: &mut AdminRelay,
) -> String {
    relay.wait_for_readyz(200).await;
    assert_eq!(
        get(&http1_client(), relay.url("/v1/models")).await.status(),
        200
    );
    assert_eq!(upstream.rejected(), Vec::<String>::new());
    let log = relay.process.stop_and_output().await;
    assert!(log.contains("TRACE"), "trace logging was on:\n{log}");
    log
}

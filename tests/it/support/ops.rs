//! Helpers for the operations tests (admin listener, metrics, lifecycle,
//! limits): the real binary with its admin listener, Prometheus scrapes, signals,
//! bounded polling and held streams through the mock upstream.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::channel::Sender;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::support::raw::{self, RawResponse};
use crate::support::*;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The signal number of SIGTERM (Linux).
pub(crate) const SIGTERM: u32 = 15;

/// Interval between re-checks of a polled condition (polling, not synchronisation:
/// the condition itself decides when the wait is over).
const POLL: Duration = Duration::from_millis(10);

/// Re-runs `probe` until it returns `Some`, for at most [`STEP`].
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {STEP:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// The real binary with an admin listener
// ---------------------------------------------------------------------------

/// `keyrelay` in front of `upstream`, on 127.0.0.1:0 with its admin listener on
/// 127.0.0.1:0 and [`KEY`] in its environment; callers add flags.
pub(crate) fn command(upstream: &str) -> std::process::Command {
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--upstream", upstream])
        // As in support::sources: the mocks take each connection for a
        // request, so no spare is kept.
        .args(["--warm-connections", "0"])
        .env("BASETEN_API_KEY", KEY);
    command
}

/// A keyrelay process and the address of its admin listener.
pub(crate) struct AdminRelay {
    pub process: RelayProcess,
    pub admin: SocketAddr,
}

impl AdminRelay {
    /// Spawns `command` (from [`command`]) and reads both addresses from its ready line.
    pub(crate) async fn spawn(command: std::process::Command) -> Self {
        let process = RelayProcess::spawn(command).await;
        // RelayProcess reports ready before the line lands in its log buffer.
        let admin = eventually("the admin address in the ready line", || {
            let log = process.log();
            async move { log.lines().find_map(admin_address) }
        })
        .await;
        Self { process, admin }
    }

    /// The proxy address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// A URL on the proxy port.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.process.addr)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.child.id().expect("keyrelay is running")
    }

    /// Sends `signal` (e.g. "TERM") to the process.
    pub(crate) async fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal).await;
    }

    /// True once the process has a handler for `signal` (a signal number),
    /// read from the caught-signals mask in `/proc/PID/status`.
    pub(crate) fn catches(&self, signal: u32) -> bool {
        super::catches_signal(self.pid(), signal)
    }

    /// Waits until keyrelay handles SIGTERM. keyrelay logs its ready line (and
    /// even serves requests) a moment before it installs its handlers; tests
    /// of what a signal does wait this out, while
    /// `sigterm_right_after_the_ready_line_drains_and_exits_0` covers the gap.
    pub(crate) async fn wait_for_sigterm_handler(&self) {
        eventually("keyrelay to install its SIGTERM handler", || {
            let caught = self.catches(SIGTERM);
            async move { caught.then_some(()) }
        })
        .await;
    }

    /// Waits at most `bound` for the process to exit, then for the rest of
    /// its log ([`super::RelayProcess::wait_for_log_end`]): after this,
    /// `process.log()` holds every line the process wrote.
    pub(crate) async fn exit_within(&mut self, bound: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(bound, self.process.child.wait()).await {
            Ok(status) => status.expect("wait for keyrelay"),
            Err(_) => panic!(
                "keyrelay did not exit within {bound:?}; log:\n{}",
                self.process.log()
            ),
        };
        self.process.wait_for_log_end().await;
        status
    }

    /// True while the process has not exited.
    pub(crate) fn running(&mut self) -> bool {
        self.process
            .child
            .try_wait()
            .expect("try_wait keyrelay")
            .is_none()
    }

    /// One request to the admin listener on a fresh connection.
    pub(crate) async fn admin(&self, method: &str, path: &str) -> RawResponse {
        admin_request(self.admin, method, path).await
    }

    /// The current Prometheus scrape.
    pub(crate) async fn scrape(&self) -> Scrape {
        let response = self.admin("GET", "/metrics").await;
        assert_eq!(response.status(), 200, "{}", response.body_text());
        Scrape(response.body_text())
    }

    /// Polls `/metrics` until sample `name{labels}` equals `want`; returns that scrape.
    pub(crate) async fn wait_for_sample(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> Scrape {
        let deadline = Instant::now() + STEP;
        loop {
            let scrape = self.scrape().await;
            if scrape.value(name, labels) == Some(want) {
                return scrape;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {STEP:?} waiting for {name}{labels:?} == {want}; last scrape:\n{}",
                scrape.0
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `/readyz` until it answers `status`.
    pub(crate) async fn wait_for_readyz(&self, status: u16) -> RawResponse {
        let admin = self.admin;
        eventually(&format!("/readyz to answer {status}"), || async move {
            let response = admin_request(admin, "GET", "/readyz").await;
            (response.status() == status).then_some(response)
        })
        .await
    }

    /// Waits until the log holds `needle` at least `times` times; returns the log.
    pub(crate) async fn wait_for_log(&self, needle: &str, times: usize) -> String {
        self.process.wait_for_log(needle, times).await
    }
}

/// Sends `signal` (e.g. "TERM") to process `pid` with kill(1).
pub(crate) async fn send_signal(pid: u32, signal: &str) {
    let pid = pid.to_string();
    let status = within(
        "the kill command",
        tokio::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status(),
    )
    .await
    .expect("run kill");
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

/// One request with an empty body to `addr`, on a fresh connection.
pub(crate) async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> RawResponse {
    admin_request_with(addr, method, path, &[], "").await
}

/// One request to `addr` on a fresh connection, with extra header lines and
/// `body` (sent with its Content-Length); a `Host` among `headers` replaces
/// the default one (`addr`).
pub(crate) async fn admin_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawResponse {
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        text.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let mut conn = raw::RawConn::connect(addr).await;
    conn.send(text).await;
    conn.read_response_to(method == "HEAD").await
}

/// Parses `admin=ADDR` (text logs) or `"admin":"ADDR"` (JSON logs) from the ready line.
fn admin_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("keyrelay ready") {
        return None;
    }
    let (start, marker) = ["admin=", "\"admin\":\""]
        .iter()
        .find_map(|marker| line.find(marker).map(|at| (at, *marker)))?;
    let rest = &line[start + marker.len()..];
    let end = rest.find([' ', '"']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Runs `keyrelay health --url URL` and returns its exit status and stderr.
pub(crate) async fn health_check(url: &str) -> (ExitStatus, String) {
    let mut command = tokio::process::Command::from(binary());
    command.args(["health", "--url", url]).kill_on_drop(true);
    let output = within("keyrelay health to finish", command.output())
        .await
        .expect("run keyrelay health");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// One `/metrics` body.
#[derive(Debug, Clone)]
pub(crate) struct Scrape(pub String);

impl Scrape {
    /// The value of the sample `name` whose label set is exactly `labels`.
    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let sample = parse_sample(line)?;
            if sample.name != name || sample.labels.len() != labels.len() {
                return None;
            }
            let all_match = labels
                .iter()
                .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v));
            all_match.then_some(sample.value)
        })
    }

    /// Like [`value`](Self::value), with an absent series counted as 0 (a
    /// labelled counter appears at its first increment).
    pub(crate) fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// A sample that must be present.
    pub(crate) fn present(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.0))
    }

    /// Every sample line (comments skipped).
    pub(crate) fn samples(&self) -> Vec<Sample> {
        self.0.lines().filter_map(parse_sample).collect()
    }
}

/// One sample line of the exposition.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// True if the sample carries label `key` with `value`.
    pub(crate) fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| k == key && v == value)
    }
}

/// Parses `name{k="v",...} value` (or `name value`); `None` for comments and blanks.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line[open..].find('}')? + open;
            let labels = line[open + 1..close]
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            (&line[..open], labels, &line[close + 1..])
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------
// Held streams through the mock upstream
// ---------------------------------------------------------------------------

/// The head of a server-sent-events answer, for [`HeldStream::open_request`].
pub(crate) fn sse() -> http::response::Builder {
    http::Response::builder().header("content-type", "text/event-stream")
}

/// A response stream the test feeds frame by frame from the mock upstream.
pub(crate) struct HeldStream {
    pub tx: Sender<Bytes, BoxError>,
    pub dropped: Dropped,
    pub body: Incoming,
    /// The request headers the upstream received.
    pub upstream_headers: http::HeaderMap,
    /// Bytes relayed to the client so far.
    pub relayed: usize,
}

impl HeldStream {
    /// GETs `url` with `client`, answers at `upstream` with a streaming 200 and
    /// returns once the client has the response head.
    pub(crate) async fn open(client: &TestClient, upstream: &mut MockUpstream, url: &str) -> Self {
        let request = Request::get(url).body(empty()).expect("request");
        Self::open_request(client, upstream, request, http::Response::builder()).await
    }

    /// Sends `request`, answers it at `upstream` with a streaming response
    /// from `answer` (status 200 unless set) and returns once the client has the head.
    pub(crate) async fn open_request(
        client: &TestClient,
        upstream: &mut MockUpstream,
        request: Request<TestBody>,
        answer: http::response::Builder,
    ) -> Self {
        let pending = tokio::spawn(client.request(request));
        let exchange = upstream.next().await;
        let upstream_headers = exchange.request.headers().clone();
        let (tx, dropped) = exchange.respond_streaming_with(answer);
        let response = within("the streamed response head", pending)
            .await
            .expect("join")
            .expect("keyrelay answered");
        assert_eq!(response.status(), 200, "a held stream starts with 200");
        let body = response.into_body();
        Self {
            tx,
            dropped,
            body,
            upstream_headers,
            relayed: 0,
        }
    }

    /// Sends `frame` upstream and waits until the client has read exactly it.
    pub(crate) async fn lockstep(&mut self, frame: &str) {
        let frame = Bytes::from(frame.to_owned());
        within(
            "the upstream to take a frame",
            self.tx.send_data(frame.clone()),
        )
        .await
        .expect("upstream send");
        let got = next_data(&mut self.body)
            .await
            .expect("a frame, not the end")
            .expect("a frame, not an error");
        assert_eq!(got, frame, "frames arrive whole and in order");
        self.relayed += got.len();
    }

    /// Ends the upstream body and checks the client sees a clean end.
    pub(crate) async fn finish(self) -> usize {
        let Self {
            tx,
            mut body,
            relayed,
            ..
        } = self;
        drop(tx);
        match next_data(&mut body).await {
            None => relayed,
            Some(Ok(data)) => panic!("unexpected data after the upstream ended: {data:?}"),
            Some(Err(err)) => panic!("the stream was cut instead of ending cleanly: {err:?}"),
        }
    }
}

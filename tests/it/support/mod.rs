//! Shared test helpers: a controllable mock upstream, keyrelay started
//! in-process or as the real binary, and clients. Everything binds 127.0.0.1:0.
//!
//! Each helper is declared once here (hyper's tests/support pattern); the
//! submodules are the raw HTTP/1.1 peers (client and scripted upstream), the
//! recording upstream, the hand-written HTTP/2 framer, the RELIABILITY.md
//! report lines, the real binary with its admin listener, Python clients,
//! TLS, and the guard tests' helpers. Everything here is used by some test:
//! there is no `dead_code` allow, so a helper nothing calls any more fails the
//! build instead of lingering.

pub(crate) mod expiring;
pub(crate) mod guard_util;
pub(crate) mod h2_frames;
pub(crate) mod h2_server;
pub(crate) mod ops;
pub(crate) mod otlp;
pub(crate) mod python;
pub(crate) mod raw;
pub(crate) mod recording_upstream;
pub(crate) mod reliability;
pub(crate) mod tls;
pub(crate) mod token_endpoint;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::channel::{Channel, Sender};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use keyrelay::config::{self, OverrideValue, Sources};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// The upstream key every test configures. Distinctive so a leak scan finds it.
pub(crate) const KEY: &str = "kr-test-KEY-5f3c9a1e7b2d4c6f";

/// The header value the mock upstream expects keyrelay to inject.
pub(crate) const EXPECTED_AUTH: &str = "Api-Key kr-test-KEY-5f3c9a1e7b2d4c6f";

/// A path under the system temp dir that no other test, thread or process
/// uses: `keyrelay-LABEL-PID-N-NAME`. All tests run in one process, so the
/// pid alone no longer tells two tests apart; the counter does.
pub(crate) fn unique_temp_path(label: &str, name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "keyrelay-{label}-{}-{n}-{name}",
        std::process::id()
    ))
}

/// A file deleted when the test is done with it.
pub(crate) struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub(crate) fn path(&self) -> &str {
        self.0.to_str().expect("temp path is UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: a leftover file in the temp dir harms nobody.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A uniquely named temporary file (see [`unique_temp_path`]) holding
/// `contents`, removed on drop.
pub(crate) fn temp_file(label: &str, name: &str, contents: impl AsRef<[u8]>) -> TempFile {
    let path = unique_temp_path(label, name);
    std::fs::write(&path, contents).expect("write temp file");
    TempFile(path)
}

/// Generous bound for anything a test waits on; failures show up as timeouts.
pub(crate) const STEP: Duration = Duration::from_secs(10);

pub(crate) type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The hyper client the tests use, HTTP/1.1 or h2c.
pub(crate) type TestClient = Client<HttpConnector, TestBody>;

/// The ```toml blocks of README.md that contain `needle` (for tests that
/// load the README's configs).
pub(crate) fn readme_toml_blocks(needle: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let blocks: Vec<String> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.contains(needle))
        .map(str::to_owned)
        .collect();
    assert!(!blocks.is_empty(), "a README config with {needle}");
    blocks
}

/// Awaits `future` for at most [`STEP`], panicking with `what` on timeout.
pub(crate) async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?} waiting for {what}"))
}

// ---------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------

/// One request that reached the mock upstream, waiting for the test to answer it.
pub(crate) struct Exchange {
    pub request: Request<Incoming>,
    respond: oneshot::Sender<Response<TestBody>>,
}

impl Exchange {
    /// The request body keyrelay sent, read whole and parsed as JSON.
    pub(crate) async fn body_json(&mut self) -> serde_json::Value {
        let sent = within("the request body", self.request.body_mut().collect())
            .await
            .expect("body")
            .to_bytes();
        serde_json::from_slice(&sent).expect("JSON upstream")
    }

    /// Answers with `response`.
    pub(crate) fn respond(self, response: Response<TestBody>) {
        let _ = self.respond.send(response);
    }

    /// Answers with `response` before reading the request body, then reads
    /// the body in the background; the task returns how much of it arrived.
    pub(crate) fn respond_before_reading(
        self,
        response: Response<TestBody>,
    ) -> tokio::task::JoinHandle<usize> {
        let Self { request, respond } = self;
        let _ = respond.send(response);
        tokio::spawn(async move {
            let body = request.into_body().collect().await;
            body.map_or(0, |body| body.to_bytes().len())
        })
    }

    /// Answers with a fixed body (sent with Content-Length).
    pub(crate) fn respond_full(self, status: u16, body: &'static str) {
        let mut response = Response::new(full(body));
        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
        self.respond(response);
    }

    /// Answers 200 with a body the test feeds frame by frame (sent chunked).
    ///
    /// The returned [`Dropped`] resolves when the mock's server drops the body,
    /// i.e. when the connection or stream to keyrelay is gone.
    pub(crate) fn respond_streaming(
        self,
    ) -> (
        Sender<Bytes, Box<dyn std::error::Error + Send + Sync>>,
        Dropped,
    ) {
        self.respond_streaming_with(Response::builder())
    }

    /// Like [`respond_streaming`](Self::respond_streaming) with custom status/headers.
    pub(crate) fn respond_streaming_with(
        self,
        builder: http::response::Builder,
    ) -> (
        Sender<Bytes, Box<dyn std::error::Error + Send + Sync>>,
        Dropped,
    ) {
        let (sender, channel) = Channel::new(1);
        let (body, dropped) = ObservedBody::new(channel);
        let response = builder.body(body.boxed()).expect("response");
        self.respond(response);
        (sender, dropped)
    }
}

/// A mock upstream on 127.0.0.1:0 (HTTP/1.1 and h2c) handing each request to the test.
pub(crate) struct MockUpstream {
    pub addr: SocketAddr,
    exchanges: mpsc::UnboundedReceiver<Exchange>,
    /// Number of TCP connections accepted so far.
    pub connections: Arc<Mutex<usize>>,
}

impl MockUpstream {
    pub(crate) async fn start() -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.expect("bind mock")).await
    }

    /// A mock upstream serving `listener` (a port the test chose).
    pub(crate) async fn on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let (tx, exchanges) = mpsc::unbounded_channel();
        let connections = Arc::new(Mutex::new(0));
        let counter = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_nodelay(true).expect("nodelay");
                *counter.lock().expect("lock") += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let (respond, response) = oneshot::channel();
                            if tx.send(Exchange { request, respond }).is_err() {
                                return Ok::<_, Infallible>(Response::new(full("mock gone")));
                            }
                            Ok(response.await.unwrap_or_else(|_| {
                                let mut r = Response::new(full("test dropped the exchange"));
                                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                                r
                            }))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            exchanges,
            connections,
        }
    }

    /// The base URL to configure as keyrelay's upstream.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for the next request to reach the upstream.
    pub(crate) async fn next(&mut self) -> Exchange {
        within("a request at the mock upstream", self.exchanges.recv())
            .await
            .expect("mock upstream stopped")
    }

    /// Waits, unbounded, for the next request: for a task that serves the
    /// mock for as long as the test runs; `None` once the mock has stopped.
    pub(crate) async fn recv(&mut self) -> Option<Exchange> {
        self.exchanges.recv().await
    }

    /// True if no request has reached the upstream (without waiting).
    pub(crate) fn nothing_received(&mut self) -> bool {
        self.exchanges.try_recv().is_err()
    }
}

/// Resolves when the observed body was dropped by the server holding it.
pub(crate) struct Dropped(oneshot::Receiver<()>);

impl Dropped {
    pub(crate) async fn wait(self) {
        let _ = within("the upstream to see the stream dropped", self.0).await;
    }

    /// True if the body has been dropped already.
    pub(crate) fn happened(&mut self) -> bool {
        !matches!(self.0.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }
}

/// Wraps a body and reports when it is dropped.
pub(crate) struct ObservedBody<B> {
    inner: Pin<Box<B>>,
    on_drop: Option<oneshot::Sender<()>>,
}

impl<B> ObservedBody<B> {
    pub(crate) fn new(inner: B) -> (Self, Dropped) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                inner: Box::pin(inner),
                on_drop: Some(tx),
            },
            Dropped(rx),
        )
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(tx) = self.on_drop.take() {
            let _ = tx.send(());
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.inner.as_mut().poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty() -> TestBody {
    full(Bytes::new())
}

/// Sends `request` with `client`, answers it at `upstream` with `answer`, and
/// returns the headers the upstream saw and keyrelay's response, body read.
pub(crate) async fn round_trip(
    client: &TestClient,
    upstream: &mut MockUpstream,
    request: Request<TestBody>,
    answer: Response<TestBody>,
) -> (http::HeaderMap, Response<Bytes>) {
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    let seen = exchange.request.headers().clone();
    exchange.respond(answer);
    let response = within("keyrelay's response", pending)
        .await
        .expect("join")
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = within("the body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    (seen, Response::from_parts(parts, body))
}

/// A 200 answer with `body`, for the mock upstream.
pub(crate) fn ok(body: &'static str) -> Response<TestBody> {
    Response::new(full(body))
}

/// How many TCP connections `upstream` has accepted so far.
pub(crate) fn upstream_connections(upstream: &MockUpstream) -> usize {
    *upstream.connections.lock().expect("lock")
}

/// Every value of header `name` in `headers`, in order, as text.
pub(crate) fn header_values<'a>(headers: &'a http::HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ASCII header"))
        .collect()
}

// ---------------------------------------------------------------------------
// keyrelay in-process
// ---------------------------------------------------------------------------

/// keyrelay running in this process, on 127.0.0.1:0.
pub(crate) struct Relay {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Relay {
    /// Starts keyrelay in front of `upstream` with [`KEY`] and extra settings.
    pub(crate) async fn start(upstream: &str, settings: &[(&str, &str)]) -> Self {
        Self::from_sources(&sources(upstream, settings)).await
    }

    /// Starts keyrelay from sources the test built itself (e.g. with more
    /// variables in `env`).
    pub(crate) async fn from_sources(sources: &Sources) -> Self {
        Self::from_config(config::load(sources).expect("test config is valid")).await
    }

    /// Starts keyrelay from a validated config the test may have adjusted
    /// (e.g. a Baseten shortcut's upstream pointed at a local server).
    pub(crate) async fn from_config(config: config::Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(keyrelay::run(config, listener, async {
            let _ = stop.await;
        }));
        Self {
            addr,
            shutdown: Some(shutdown),
            task,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Asks keyrelay to shut down and waits until it has.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        within("keyrelay to stop", &mut self.task)
            .await
            .expect("join")
            .expect("run");
    }
}

/// A port on 127.0.0.1 with nothing listening: bound by the OS, then released.
pub(crate) fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Config sources for tests: [`KEY`] in the swapped environment, flags as
/// overrides (comma-separated for list settings).
pub(crate) fn sources(upstream: &str, settings: &[(&str, &str)]) -> Sources {
    let mut sources = Sources {
        env: HashMap::from([("BASETEN_API_KEY".to_owned(), KEY.to_owned())]),
        ..Sources::default()
    };
    sources.set("upstream", OverrideValue::Text(upstream.to_owned()));
    sources.set("listen", OverrideValue::Text("127.0.0.1:0".to_owned()));
    // The mock upstreams count connections (a refused request must "reach
    // nobody") and some serve one connection at a time, so the spare
    // connection keyrelay keeps by default would read as traffic. The warm
    // tests and tests/interop/ run with the default.
    sources.set("warm_connections", OverrideValue::Text("0".to_owned()));
    for (key, value) in settings {
        let is_list = config::SETTINGS
            .iter()
            .any(|s| s.key == *key && s.kind == config::Kind::List);
        let value = if is_list {
            OverrideValue::List(value.split(',').map(|v| v.trim().to_owned()).collect())
        } else {
            OverrideValue::Text((*value).to_owned())
        };
        sources.set(key, value);
    }
    sources
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// An HTTP/1.1 client with no pooling surprises (fresh connections per test).
pub(crate) fn http1_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub(crate) fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Collects a whole response body.
pub(crate) async fn body_bytes(response: Response<Incoming>) -> Bytes {
    within("the whole body", response.into_body().collect())
        .await
        .expect("body completes")
        .to_bytes()
}

/// Reads the next non-empty data frame of `body`, skipping trailers; `None` at the end.
pub(crate) async fn next_data<B>(body: &mut B) -> Option<Result<Bytes, B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        match within("the next body frame", body.frame()).await? {
            Ok(frame) => match frame.into_data() {
                // HTTP/2 may end a stream with an empty DATA frame: no content.
                Ok(data) if data.is_empty() => continue,
                Ok(data) => return Some(Ok(data)),
                Err(_trailers) => continue,
            },
            Err(err) => return Some(Err(err)),
        }
    }
}

// ---------------------------------------------------------------------------
// keyrelay as a child process
// ---------------------------------------------------------------------------

/// The real `keyrelay` binary built by cargo for these tests.
///
/// `KEYRELAY_TEST_BINARY` swaps in another build of it, run through
/// `KEYRELAY_TEST_RUNNER` when that is set too: deploy/qemu_test.sh runs the
/// tests that drive the binary against the aarch64 release build under
/// qemu-user this way.
pub(crate) fn binary() -> std::process::Command {
    let program = std::env::var_os("KEYRELAY_TEST_BINARY")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_keyrelay").into());
    let mut command = match std::env::var_os("KEYRELAY_TEST_RUNNER") {
        Some(runner) => {
            let mut command = std::process::Command::new(runner);
            command.arg(program);
            command
        }
        None => std::process::Command::new(program),
    };
    command.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command
}

/// A running keyrelay process whose stderr (logs) is captured in full.
pub(crate) struct RelayProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
    /// The task copying stderr into `log`; it ends at the stream's end.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl RelayProcess {
    /// Spawns `command` (from [`binary`]) and waits for the "keyrelay ready" line.
    pub(crate) async fn spawn(command: std::process::Command) -> Self {
        Self::spawn_with_stdin(command, Stdio::null()).await
    }

    /// [`spawn`](Self::spawn) with `stdin` as the process's standard input
    /// (a socket handed to it, say).
    pub(crate) async fn spawn_with_stdin(command: std::process::Command, stdin: Stdio) -> Self {
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn keyrelay");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = oneshot::channel();
        let sink = Arc::clone(&log);
        let reader = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = ready_address(&line) {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut log = sink.lock().expect("lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = within("keyrelay to report ready", ready_rx)
            .await
            .expect("keyrelay exited before it was ready");
        Self {
            child,
            addr,
            log,
            reader: Some(reader),
        }
    }

    /// Everything the process wrote to stderr so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    /// Waits (bounded by [`STEP`]) until the captured log holds `needle` at
    /// least `times` times, and returns the log.
    ///
    /// A child's stderr offers no event to wait on (a line is written just
    /// after the moment it describes), so this polls the captured text.
    pub(crate) async fn wait_for_log(&self, needle: &str, times: usize) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= times {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {needle:?} {times} time(s) in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the process with SIGTERM, as an operator would, so that it
    /// writes every log line before it exits, and returns everything it
    /// printed: stderr (the log) followed by stdout.
    pub(crate) async fn stop_and_output(&mut self) -> String {
        let pid = self.child.id().expect("running");
        // The ready line comes a moment before the signal handlers.
        ops::eventually("keyrelay to install its SIGTERM handler", || {
            let caught = catches_signal(pid, ops::SIGTERM);
            async move { caught.then_some(()) }
        })
        .await;
        ops::send_signal(pid, "TERM").await;
        self.output_after_exit().await
    }

    /// Once the process has exited: waits (bounded by [`STEP`]) until its
    /// stderr has been read to the end, so that [`log`](Self::log) holds
    /// every line it wrote. Its exit and its last lines reach the test as
    /// two events, and the copying task may not have had its turn yet when
    /// the exit is seen: a log read then can miss the lines written last.
    pub(crate) async fn wait_for_log_end(&mut self) {
        if let Some(reader) = self.reader.take() {
            within("keyrelay's stderr to end", reader)
                .await
                .expect("stderr reader");
        }
    }

    /// Waits (bounded) for the process to exit and for its stderr to be
    /// read to the end, then returns stderr followed by stdout.
    async fn output_after_exit(&mut self) -> String {
        let mut stdout = self.child.stdout.take().expect("stdout");
        within("keyrelay to exit", self.child.wait())
            .await
            .expect("wait for keyrelay");
        let mut printed = String::new();
        within(
            "keyrelay's stdout",
            tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut printed),
        )
        .await
        .expect("stdout");
        self.wait_for_log_end().await;
        self.log() + &printed
    }

    /// Peak resident memory (VmHWM) of the process, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    /// Resident memory (VmRSS) of the process now, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// A `kB` field of `/proc/PID/status`.
    fn status_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    }
}

/// True once process `pid` has a handler for `signal` (a signal number),
/// read from the caught-signals mask in `/proc/PID/status`.
pub(crate) fn catches_signal(pid: u32, signal: u32) -> bool {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .expect("SigCgt in /proc/PID/status");
    mask & (1 << (signal - 1)) != 0
}

/// Parses `listen=127.0.0.1:PORT` out of keyrelay's "keyrelay ready" log line.
fn ready_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("keyrelay ready") {
        return None;
    }
    // Text logs say `listen=ADDR`, JSON logs `"listen":"ADDR"`.
    let (start, marker) = ["listen=", "\"listen\":\""]
        .iter()
        .find_map(|marker| line.find(marker).map(|at| (at, *marker)))?;
    let rest = &line[start + marker.len()..];
    let end = rest.find([' ', '"']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

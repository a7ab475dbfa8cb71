//! A real HTTP/2 server over TLS (hyper's server, rustls, a CA made per test)
//! with the limits keyrelay's upstream pool must live with, and a frame
//! counter on what keyrelay sends it.
//!
//! The counter sits between TLS and hyper and parses the client's frame
//! headers as they are read, so a test can say "keyrelay sent 0 RST_STREAM
//! frames over 5,000 requests" from what really crossed the connection, not
//! from keyrelay's own view. The limits are the ones real servers impose:
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (nginx 128, h2o 100), GOAWAY after N
//! requests (nginx's `keepalive_requests`), and a connection that goes silent
//! (no PING answers, no frames) as a dead peer does.
//!
//! Paths served (every response carries `x-upstream-version: HTTP/2.0`):
//! - `/small`: 200 `hello` with a Content-Length, the body in its own DATA
//!   frame and END_STREAM on an empty DATA frame after it, as nginx and most
//!   proxies send a body they relay.
//! - `/stream?n=N`: N chunks of `token-K\n`, no Content-Length.
//! - `/echo` (any method): the request body back, chunk by chunk.
//! - `/hold`: one chunk `first\n`, then waits for [`H2Upstream::release`],
//!   then `last\n`: a long generation the test ends when it chooses.
//! - `/freeze`: makes this connection go silent for good, then never answers.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use crate::support::tls::TestCa;
use crate::support::TempFile;
use crate::support::TestBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 frame type of RST_STREAM (RFC 9113 section 6.4).
const RST_STREAM: u8 = 0x3;
/// HTTP/2 frame type of PING.
const PING: u8 = 0x6;
/// The client connection preface every HTTP/2 connection starts with.
const PREFACE_LEN: usize = 24;

/// The limits the server imposes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; `None` is hyper's default (200).
    pub max_concurrent_streams: Option<u32>,
    /// Send GOAWAY (graceful: streams in flight finish) after this many
    /// requests on a connection.
    pub max_requests_per_connection: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: Some(4096),
            max_requests_per_connection: None,
        }
    }
}

/// What the server has seen, counted across all its connections.
#[derive(Default)]
pub(crate) struct Counters {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// RST_STREAM frames the client sent.
    pub resets_received: AtomicUsize,
    /// PING frames the client sent (acks included).
    pub pings_received: AtomicUsize,
    /// GOAWAYs this server started (after `max_requests_per_connection`).
    pub goaways_sent: AtomicUsize,
    /// Streams open right now, and the most seen at once on one connection.
    pub open_streams: AtomicUsize,
    pub peak_streams_per_connection: AtomicUsize,
    /// Requests that did not arrive as HTTP/2.
    pub not_http2: AtomicUsize,
}

/// The HTTP/2 TLS upstream on 127.0.0.1:0 (certificate for `localhost`).
pub(crate) struct H2Upstream {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    ca_file: TempFile,
    release: watch::Sender<bool>,
}

impl H2Upstream {
    pub(crate) async fn start(limits: Limits) -> Self {
        let ca = TestCa::new();
        let cert = ca.issue(&["localhost"]);
        let ca_file = ca.write_pem_file();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(cert.chain, cert.key)
            .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind h2");
        let addr = listener.local_addr().expect("addr");
        let counters = Arc::new(Counters::default());
        let (release, released) = watch::channel(false);
        let shared = Arc::clone(&counters);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let counters = Arc::clone(&shared);
                let released = released.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    serve_connection(tls, limits, counters, released).await;
                });
            }
        });
        Self {
            addr,
            counters,
            ca_file,
            release,
        }
    }

    /// The upstream URL (the certificate names `localhost`).
    pub(crate) fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The CA file keyrelay must trust (`ca_file`).
    pub(crate) fn ca_file(&self) -> &str {
        self.ca_file.path()
    }

    /// Lets every `/hold` stream, now and later, send its last chunk and end.
    pub(crate) fn release(&self) {
        let _ = self.release.send(true);
    }

    pub(crate) fn count(&self, counter: impl Fn(&Counters) -> &AtomicUsize) -> usize {
        counter(&self.counters).load(Ordering::SeqCst)
    }
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    limits: Limits,
    counters: Arc<Counters>,
    released: watch::Receiver<bool>,
) {
    let frozen = Arc::new(AtomicBool::new(false));
    let io = FrameCounter::new(tls, Arc::clone(&counters), Arc::clone(&frozen));
    let per_connection = Arc::new(ConnectionState::default());
    let state = Arc::clone(&per_connection);
    let service = service_fn(move |request: Request<Incoming>| {
        let counters = Arc::clone(&counters);
        let state = Arc::clone(&state);
        let frozen = Arc::clone(&frozen);
        let released = released.clone();
        async move {
            Ok::<_, Infallible>(answer(request, counters, state, frozen, released, limits).await)
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_concurrent_streams(limits.max_concurrent_streams);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = per_connection.goaway.notified() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

#[derive(Default)]
struct ConnectionState {
    requests: AtomicUsize,
    open: AtomicUsize,
    goaway: Notify,
}

/// Counts one open stream on a connection (and the server) while it lives.
struct OpenStream {
    counters: Arc<Counters>,
    state: Arc<ConnectionState>,
}

impl OpenStream {
    fn new(counters: Arc<Counters>, state: Arc<ConnectionState>) -> Self {
        counters.open_streams.fetch_add(1, Ordering::SeqCst);
        let now = state.open.fetch_add(1, Ordering::SeqCst) + 1;
        counters
            .peak_streams_per_connection
            .fetch_max(now, Ordering::SeqCst);
        Self { counters, state }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.counters.open_streams.fetch_sub(1, Ordering::SeqCst);
        self.state.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    request: Request<Incoming>,
    counters: Arc<Counters>,
    state: Arc<ConnectionState>,
    frozen: Arc<AtomicBool>,
    mut released: watch::Receiver<bool>,
    limits: Limits,
) -> Response<TestBody> {
    counters.requests.fetch_add(1, Ordering::SeqCst);
    if request.version() != http::Version::HTTP_2 {
        counters.not_http2.fetch_add(1, Ordering::SeqCst);
    }
    let served = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if limits.max_requests_per_connection == Some(served) {
        counters.goaways_sent.fetch_add(1, Ordering::SeqCst);
        state.goaway.notify_one();
    }
    let open = OpenStream::new(Arc::clone(&counters), state);
    let (tx, body) = queue_body();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let mut response = Response::builder().header("x-upstream-version", "HTTP/2.0");
    match path.as_str() {
        "/small" => {
            response = response.header("content-length", "5");
            tokio::spawn(async move {
                let _open = open;
                let _ = tx.send_data(Bytes::from_static(b"hello")).await;
                // Dropping the sender ends the stream: an empty DATA frame
                // with END_STREAM, a moment after the body, as a relaying
                // server sends it when its own upstream finishes.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            });
        }
        "/stream" => {
            let n: usize = query
                .strip_prefix("n=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(5);
            tokio::spawn(async move {
                let _open = open;
                for k in 0..n {
                    if tx.send_data(format!("token-{k}\n").into()).await.is_err() {
                        return;
                    }
                }
            });
        }
        "/echo" => {
            let mut incoming = request.into_body();
            tokio::spawn(async move {
                let _open = open;
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() && tx.send_data(data).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        "/hold" => {
            tokio::spawn(async move {
                let _open = open;
                if tx.send_data(Bytes::from_static(b"first\n")).await.is_err() {
                    return;
                }
                let _ = released.wait_for(|released| *released).await;
                let _ = tx.send_data(Bytes::from_static(b"last\n")).await;
            });
        }
        // What names the upstream in the request: `:authority`, and any
        // `host` header (an HTTP/2 request needs none).
        "/host" => {
            let host = request.headers().get_all("host").iter().count();
            let authority = request.uri().authority().map(|a| a.to_string());
            tokio::spawn(async move {
                let _open = open;
                let seen = format!("host headers: {host}, authority: {authority:?}");
                let _ = tx.send_data(seen.into()).await;
            });
        }
        "/freeze" => {
            frozen.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        _ => {
            response = response.status(404);
            drop(open);
        }
    }
    response.body(body.boxed()).expect("response")
}

/// A response body fed by a queue. (http-body-util's `Channel` can end a
/// body early when its sender is dropped right after sending: it checks the
/// sender's liveness separately from the queue, so under a busy runtime the
/// last frames can be lost. A test server must not make keyrelay look bad.)
fn queue_body() -> (QueueSender, QueueBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (QueueSender(tx), QueueBody(rx))
}

struct QueueSender(tokio::sync::mpsc::Sender<Bytes>);

impl QueueSender {
    async fn send_data(&self, data: Bytes) -> Result<(), ()> {
        self.0.send(data).await.map_err(|_| ())
    }
}

struct QueueBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for QueueBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|data| Ok(hyper::body::Frame::data(data))))
    }
}

/// The TLS stream with the client's frames counted as they are read, and a
/// switch that makes the connection go silent (reads and writes never
/// complete), as a dead peer does.
struct FrameCounter<S: Lingering> {
    /// `Some` until dropped.
    inner: Option<S>,
    counters: Arc<Counters>,
    frozen: Arc<AtomicBool>,
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

/// A socket that can be closed the way nginx closes (`lingering_close`):
/// after the server is done writing, it keeps reading (and discarding) for a
/// moment, so that frames the client sent meanwhile do not make the kernel
/// answer with a TCP reset that destroys the GOAWAY before the client reads it.
trait Lingering: AsyncRead + Unpin + Send + Sized + 'static {
    fn linger(mut self) {
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut self, &mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

impl<S: AsyncRead + Unpin + Send + 'static> Lingering for S {}

impl<S: Lingering> Drop for FrameCounter<S> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.linger();
        }
    }
}

impl<S: Lingering> FrameCounter<S> {
    fn new(inner: S, counters: Arc<Counters>, frozen: Arc<AtomicBool>) -> Self {
        Self {
            inner: Some(inner),
            counters,
            frozen,
            preface_left: PREFACE_LEN,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// Walks the bytes just read: preface, then 9-byte frame headers and
    /// the payloads they announce.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    match h[3] {
                        RST_STREAM => {
                            self.counters.resets_received.fetch_add(1, Ordering::SeqCst);
                        }
                        PING => {
                            self.counters.pings_received.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

impl<S: Lingering> AsyncRead for FrameCounter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let result = Pin::new(inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = buf.filled()[before..].to_vec();
            self.observe(&read);
        }
        result
    }
}

impl<S: Lingering + AsyncWrite> AsyncWrite for FrameCounter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

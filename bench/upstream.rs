//! Mock upstream for the keyrelay benchmark (`bench/run.sh`); not part of keyrelay.
//!
//! A small, fast HTTP/1.1 server that plays the model endpoint behind every
//! proxy under test (and is hit directly for the "direct" baseline). It is
//! built for speed so that it is never the bottleneck, and it checks on every
//! request that the caller sent `Authorization: Api-Key <key>` (401
//! otherwise), so a proxy that fails to inject the key shows up as errors.
//!
//! It prints `listening 127.0.0.1:PORT` on its first line of stdout, then
//! serves until killed. Routes (all `GET`):
//!
//! - `/small`: a ~70-byte body with `Content-Length` (throughput runs);
//! - `/stream?n=N&interval_us=I&size=S[&id=ID]`: a chunked response of `N`
//!   records of `S` bytes, the first at once and then each `I` µs after the
//!   previous one. Each record is `SEQ SEND_NS....\n` where `SEND_NS` is
//!   the wall clock (`CLOCK_REALTIME`, nanoseconds) when it was handed to the
//!   connection, so a client on the same machine can tell how late it is.
//!   When a stream with an `id` is dropped before its last record (the client,
//!   or a proxy in between, went away), the drop time is remembered. With
//!   `&sse=1` each record is an OpenAI-style chat chunk instead,
//!   `data: {"choices":[{"index":0,"delta":{"content":"SEQ SEND_NS...."}}]}`
//!   and a blank line, served as `text/event-stream`, and the last one is
//!   followed by a `usage` event and `data: [DONE]`: what keyrelay's usage
//!   tap reads (`bench/instructions.sh --chunks`);
//! - `/cancelled?id=ID&wait_ms=W`: the drop time (ns) of stream `ID`, waiting
//!   up to `W` ms for it; 404 if it was not dropped in that time;
//! - `/bulk?bytes=N&chunk=C`: `N` bytes streamed chunked in `C`-byte frames;
//! - `POST /v1/traces`: an OTLP/HTTP sink (no key asked): the body is read
//!   and dropped, 200 (`bench/instructions.sh --traces`);
//! - `/stats`: counters (`connections` accepted, `requests`, `unauthorized`,
//!   `cancelled`, `open_streams`).
//!
//! Flags: `--listen ADDR` (default `127.0.0.1:0`), `--key KEY` (default
//! `bench-key`), `--threads N` (runtime worker threads, default 2).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::time::{Instant, Sleep};

/// Body of `/small`.
const SMALL_BODY: &[u8] =
    b"{\"id\":\"bench\",\"output\":\"hello from the keyrelay benchmark upstream\"}\n";

/// Smallest record `/stream` will send: sequence, space, 19-digit timestamp, newline.
const MIN_RECORD: usize = 32;

/// Size of the shared buffer `/bulk` slices its frames from.
const BULK_BUFFER: usize = 1 << 20;

/// Longest `/cancelled` may wait, whatever it is asked.
const MAX_CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Longest `/stream` may run, whatever it is asked (bounds every loop).
const MAX_STREAM: Duration = Duration::from_secs(600);

fn main() -> std::process::ExitCode {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut key = "bench-key".to_owned();
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let ok = match (flag.as_str(), value) {
            ("--listen", Some(v)) => v.parse().map(|a| listen = a).is_ok(),
            ("--key", Some(v)) => {
                key = v;
                true
            }
            ("--threads", Some(v)) => v.parse().map(|n| threads = n).is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("usage: bench-upstream [--listen ADDR] [--key KEY] [--threads N]");
            return std::process::ExitCode::from(64);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(serve(listen, key)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-upstream: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Shared state: the expected credential, counters, and drop times of cancelled streams.
struct State {
    expected: HeaderValue,
    connections: AtomicU64,
    requests: AtomicU64,
    unauthorized: AtomicU64,
    cancelled: AtomicU64,
    open_streams: AtomicU64,
    drops: Mutex<HashMap<u64, u64>>,
    bulk: Bytes,
}

async fn serve(listen: SocketAddr, key: String) -> std::io::Result<()> {
    let expected = HeaderValue::from_str(&format!("Api-Key {key}"))
        .map_err(|_| std::io::Error::other("the key is not a valid header value"))?;
    let state = Arc::new(State {
        expected,
        connections: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        unauthorized: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        open_streams: AtomicU64::new(0),
        drops: Mutex::new(HashMap::new()),
        bulk: Bytes::from(vec![b'x'; BULK_BUFFER]),
    });
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    // A deep backlog: thousands of proxied streams may connect at once.
    let listener = socket.listen(4096)?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, typically: back off instead of spinning.
                eprintln!("bench-upstream: accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(request, &state).await) }
            });
            // Errors here are clients going away, which the benchmark does on purpose.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Wall clock in nanoseconds since the epoch (shared with the load generator).
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The numeric query parameter `name`, or `default`.
fn param(query: &str, name: &str, default: u64) -> u64 {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

fn respond(status: StatusCode, body: BenchBody) -> Response<BenchBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

async fn handle(request: Request<Incoming>, state: &Arc<State>) -> Response<BenchBody> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    if request.uri().path() == "/v1/traces" {
        // keyrelay's span exports: no key is sent to a collector.
        let _ = http_body_util::BodyExt::collect(request.into_body()).await;
        return respond(StatusCode::OK, BenchBody::once(Bytes::new()));
    }
    if request.headers().get(AUTHORIZATION) != Some(&state.expected) {
        state.unauthorized.fetch_add(1, Ordering::Relaxed);
        return respond(
            StatusCode::UNAUTHORIZED,
            BenchBody::once(Bytes::from_static(
                b"{\"error\":\"missing or wrong key\"}\n",
            )),
        );
    }
    let query = request.uri().query().unwrap_or("");
    match request.uri().path() {
        "/small" => {
            let mut response = respond(
                StatusCode::OK,
                BenchBody::once(Bytes::from_static(SMALL_BODY)),
            );
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        "/stream" => {
            let count = param(query, "n", 100);
            let interval = Duration::from_micros(param(query, "interval_us", 5000));
            let size = (param(query, "size", 64) as usize).clamp(MIN_RECORD, 1 << 16);
            let id = query
                .split('&')
                .any(|pair| pair.starts_with("id="))
                .then(|| param(query, "id", 0));
            let sse = param(query, "sse", 0) == 1;
            state.open_streams.fetch_add(1, Ordering::Relaxed);
            let mut response = respond(
                StatusCode::OK,
                BenchBody::Ticks(TickBody {
                    next: 0,
                    count,
                    interval,
                    start: Instant::now(),
                    last: Instant::now(),
                    size,
                    sleep: None,
                    id,
                    sse,
                    state: Arc::clone(state),
                }),
            );
            if sse {
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            }
            response
        }
        "/bulk" => {
            let remaining = param(query, "bytes", 1 << 30);
            let chunk = (param(query, "chunk", 1 << 16) as usize).clamp(1, BULK_BUFFER);
            respond(
                StatusCode::OK,
                BenchBody::Bulk {
                    remaining,
                    chunk,
                    buffer: state.bulk.clone(),
                },
            )
        }
        "/cancelled" => {
            let id = param(query, "id", 0);
            let wait = Duration::from_millis(param(query, "wait_ms", 2000)).min(MAX_CANCEL_WAIT);
            let deadline = Instant::now() + wait;
            loop {
                let found = state
                    .drops
                    .lock()
                    .map(|mut d| d.remove(&id))
                    .unwrap_or(None);
                if let Some(dropped_ns) = found {
                    return respond(
                        StatusCode::OK,
                        BenchBody::once(Bytes::from(format!("{dropped_ns}\n"))),
                    );
                }
                if Instant::now() >= deadline {
                    return respond(
                        StatusCode::NOT_FOUND,
                        BenchBody::once(Bytes::from_static(b"not dropped\n")),
                    );
                }
                // Only the answer waits on this; the drop time itself is taken in `Drop`.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        "/stats" => {
            let text = format!(
                "connections {}\nrequests {}\nunauthorized {}\ncancelled {}\nopen_streams {}\n",
                state.connections.load(Ordering::Relaxed),
                state.requests.load(Ordering::Relaxed),
                state.unauthorized.load(Ordering::Relaxed),
                state.cancelled.load(Ordering::Relaxed),
                state.open_streams.load(Ordering::Relaxed),
            );
            respond(StatusCode::OK, BenchBody::once(Bytes::from(text)))
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            BenchBody::once(Bytes::from_static(b"no such route\n")),
        ),
    }
}

/// Every response body the mock sends.
enum BenchBody {
    /// One frame with a known length (sent with `Content-Length`).
    Once(Option<Bytes>),
    /// Timestamped records on a schedule.
    Ticks(TickBody),
    /// Bulk bytes as fast as the connection takes them (chunked).
    Bulk {
        remaining: u64,
        chunk: usize,
        buffer: Bytes,
    },
}

impl BenchBody {
    fn once(bytes: Bytes) -> Self {
        Self::Once(Some(bytes))
    }
}

impl Body for BenchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Once(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Ticks(ticks) => ticks.poll_record(cx).map(|r| r.map(|b| Ok(Frame::data(b)))),
            Self::Bulk {
                remaining,
                chunk,
                buffer,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let len = (*chunk as u64).min(*remaining) as usize;
                *remaining -= len as u64;
                Poll::Ready(Some(Ok(Frame::data(buffer.slice(..len)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Once(bytes) => bytes.is_none(),
            Self::Ticks(ticks) => ticks.next >= ticks.count,
            Self::Bulk { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Once(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}

/// `/stream`'s body: each record is due `interval` after the previous one was
/// sent (a relative schedule, so a late timer never makes a burst of records).
struct TickBody {
    next: u64,
    count: u64,
    interval: Duration,
    start: Instant,
    last: Instant,
    size: usize,
    sleep: Option<Pin<Box<Sleep>>>,
    id: Option<u64>,
    /// Records as OpenAI-style SSE chunks, ending with a usage event.
    sse: bool,
    state: Arc<State>,
}

impl TickBody {
    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.next >= self.count {
            return Poll::Ready(None);
        }
        if self.next > 0 {
            if self.start.elapsed() > MAX_STREAM {
                // Past the bound on a stream's length: end it.
                self.next = self.count;
                return Poll::Ready(None);
            }
            let deadline = self.last + self.interval;
            if Instant::now() < deadline {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
        self.last = Instant::now();
        let mut record = format!("{:08} {:019} ", self.next, now_ns()).into_bytes();
        self.next += 1;
        if self.sse {
            return Poll::Ready(Some(Bytes::from(self.sse_record(record))));
        }
        record.resize(self.size - 1, b'.');
        record.push(b'\n');
        Poll::Ready(Some(Bytes::from(record)))
    }

    /// `text` as a chat chunk event of about `size` bytes; the last record
    /// carries the usage event and `[DONE]` after it.
    fn sse_record(&self, mut text: Vec<u8>) -> Vec<u8> {
        const HEAD: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"";
        const TAIL: &[u8] = b"\"}}]}\n\n";
        text.resize(
            self.size
                .saturating_sub(HEAD.len() + TAIL.len())
                .max(text.len()),
            b'.',
        );
        let mut event = [HEAD, &text, TAIL].concat();
        if self.next == self.count {
            let usage = format!(
                "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
                self.count
            );
            event.extend_from_slice(usage.as_bytes());
        }
        event
    }
}

impl Drop for TickBody {
    fn drop(&mut self) {
        let dropped_ns = now_ns();
        self.state.open_streams.fetch_sub(1, Ordering::Relaxed);
        if self.next < self.count {
            self.state.cancelled.fetch_add(1, Ordering::Relaxed);
            if let Some(id) = self.id {
                if let Ok(mut drops) = self.state.drops.lock() {
                    drops.insert(id, dropped_ns);
                }
            }
        }
    }
}

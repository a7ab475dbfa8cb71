//! A pool of HTTP/2 connections to one upstream.
//!
//! hyper-util's pooled client keeps one HTTP/2 connection per host and queues
//! streams behind it when the server's `SETTINGS_MAX_CONCURRENT_STREAMS` is
//! reached (nginx allows 128, h2o and haproxy 100): stream 129 waits for
//! stream 1 to finish, which for a held token stream can be minutes. This pool
//! instead gives each request a stream slot on a connection with room and
//! opens another connection when every one is full.
//!
//! - **Opening.** Requests that find no room wait on a connection being
//!   opened, up to [`ASSUMED_STREAMS`] per attempt (the value RFC 9113 asks
//!   servers to allow at least), so a burst of 2,000 requests opens about
//!   twenty connections, not 2,000. If the attempt fails, its waiters fail
//!   with its error (one refused connect, not a storm of them).
//! - **GOAWAY and dead connections.** A connection that received GOAWAY,
//!   failed its keepalive PING, or closed is skipped and dropped from the
//!   pool; its streams in flight finish on it (or fail visibly if it died).
//! - **Resending what never arrived.** A request hyper could not put on a
//!   connection, or a stream the server refused without processing it
//!   (REFUSED_STREAM, or above a graceful GOAWAY's last stream id, RFC 9113
//!   sections 6.8 and 8.7), is sent again on another connection with the
//!   same head and body bytes (see [`RequestBody::recorded`]).
//! - **Warm connections.** [`Http2Pool::keep_warm`] opens `warm_connections`
//!   at startup and re-opens them when the server closes them; PINGs keep
//!   them alive. Idle connections beyond those close after
//!   `pool_idle_timeout`.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Scheme;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

use super::connect::{connector, Alpn, Connector};
use super::error::SendError;
use crate::config::{Config, UpstreamUrl};
use crate::proxy::request_body::RequestBody;

/// Streams a connection being opened is expected to carry: RFC 9113 section
/// 5.1.2 recommends servers allow at least 100.
const ASSUMED_STREAMS: usize = 100;

/// What a request is told when connections opened, yet none had room for
/// another stream.
const NO_CAPACITY: &str = "the upstream allows no HTTP/2 streams";

/// What waiters are told when the task opening their connection is gone.
const ABANDONED: &str = "the connection attempt was abandoned";

/// How often a request is sent again after a stream the server refused.
const MAX_RESENDS: usize = 3;

/// How many times a request may find every connection full, open one, and
/// still find no room (a server that allows no streams at all).
const MAX_OPEN_ROUNDS: usize = 8;

/// Cancelled streams h2 remembers so that their late frames are ignored
/// rather than answered with a reset that counts towards h2's limit of
/// locally caused resets (h2's default remembers 50, too few for a burst of
/// clients going away at once).
const CANCELLED_STREAMS_REMEMBERED: usize = 4096;

/// Flow-control windows: what the upstream may send before keyrelay has
/// relayed it, per stream and per connection. They bound memory when
/// clients read slowly (at most 8 MiB buffered per connection), and the
/// connection window also sizes h2's budget for small DATA frames (half the
/// window): token streams arrive as DATA frames of a few dozen bytes, and
/// with the 64 KiB windows of hyper's adaptive mode that budget (32 KiB,
/// about 170 buffered frames) ran out at 2,000 streams through nginx and h2
/// closed every connection with ENHANCE_YOUR_CALM "too_many_data_frames".
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// How long a stream on a closed connection may still get its answer.
const LOST_STREAM_GRACE: Duration = Duration::from_millis(200);

/// Wait before retrying a warm connection that could not be opened; doubles
/// per failure up to the maximum.
const WARM_RETRY: Duration = Duration::from_millis(250);
const MAX_WARM_RETRY: Duration = Duration::from_secs(30);

/// How long a refused stream's body may take to come back from hyper.
const BODY_RETURN_WAIT: Duration = Duration::from_secs(1);

/// Connections to one upstream origin; cloning shares the pool.
#[derive(Clone)]
pub(crate) struct Http2Pool {
    inner: Arc<Inner>,
}

struct Inner {
    /// `scheme://authority`, what the connector dials.
    target: Uri,
    connector: Connector,
    /// What the connector offers in ALPN: `h2`, or `h2` and `http/1.1`.
    alpn: Alpn,
    /// Set when a pool offering both versions found the server choosing
    /// HTTP/1.1 (see [`Http2Pool::negotiate`]).
    server_chose_http1: AtomicBool,
    builder: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    /// Connections kept open while idle (`warm_connections`).
    warm: usize,
    /// Signalled when a connection ends, for the warm keeper.
    ended: tokio::sync::Notify,
    epoch: Instant,
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connections: Vec<Arc<Connection>>,
    opening: Vec<Opening>,
}

/// A connection attempt under way and the requests waiting for it.
struct Opening {
    id: u64,
    waiters: usize,
    done: watch::Receiver<Option<Result<(), SendError>>>,
}

struct Connection {
    sender: http2::SendRequest<RequestBody>,
    streams: AtomicUsize,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` as last seen by the
    /// connection task (hyper reports it on the connection, not the sender).
    max_streams: AtomicUsize,
    /// Milliseconds after the pool's epoch when `streams` last fell to 0.
    idle_since: AtomicU64,
    /// Changes (to an error) when the socket is dropped, i.e. when the
    /// HTTP/2 connection is over for every stream on it.
    io_closed: watch::Receiver<()>,
}

impl Connection {
    fn usable(&self) -> bool {
        // The sender closes when hyper's connection task ends (GOAWAY, a
        // failed PING, an error); the socket closes when the last stream is
        // over.
        !self.sender.is_closed() && self.io_closed.has_changed().is_ok()
    }

    fn has_room(&self) -> bool {
        self.streams.load(Ordering::Acquire) < self.max_streams.load(Ordering::Acquire)
    }
}

/// One stream's place on a connection, held until the response body is
/// done with; the connection counts it against the server's limit.
pub struct StreamSlot {
    connection: Arc<Connection>,
    epoch: Instant,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.connection.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = millis_since(self.epoch);
            self.connection.idle_since.store(now, Ordering::Release);
        }
    }
}

/// The HTTP version the server chose in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Negotiated {
    /// `h2`: requests go on this pool.
    Http2,
    /// `http/1.1` (or no ALPN at all): requests go over HTTP/1.1.
    Http1,
}

impl Http2Pool {
    /// A pool for `upstream`, built from the validated config, offering
    /// `alpn` (`Http2`, or `Both` for `upstream_http = "auto"`).
    pub(crate) fn new(
        config: &Config,
        upstream: &UpstreamUrl,
        alpn: Alpn,
    ) -> std::io::Result<Self> {
        let target = upstream.origin();
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(config.http2_keepalive_interval)
            .keep_alive_timeout(config.http2_keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_reset_streams(CANCELLED_STREAMS_REMEMBERED);
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                connector: connector(config, alpn)?,
                alpn,
                server_chose_http1: AtomicBool::new(false),
                builder,
                idle_timeout: config.pool.idle_timeout,
                warm: config.pool.warm_connections,
                ended: tokio::sync::Notify::new(),
                epoch: Instant::now(),
                next_id: AtomicU64::new(0),
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// True when `other` is this pool (a clone of it).
    pub(crate) fn is(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Sends `request` on a connection with room, opening one if needed, and
    /// sends it again elsewhere if the server refused it unprocessed.
    pub(crate) async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, StreamSlot), SendError> {
        let mut resends = 0;
        loop {
            let head = copy_head(&request);
            let (parts, body) = request.into_parts();
            // A body already over is not waited for when sending again.
            let spare = hyper::body::Body::is_end_stream(&body).then(|| body.empty_copy());
            let (body, body_back) = body.recorded();
            let idempotent = is_idempotent(&parts.method);
            let (mut sender, slot) = self.slot().await?;
            let mut closed = slot.connection.io_closed.clone();
            let sent = sender.try_send_request(Request::from_parts(parts, body));
            tokio::pin!(sent);
            let outcome = tokio::select! {
                biased;
                outcome = &mut sent => Some(outcome),
                // The connection's socket is gone. hyper can lose a stream
                // in a GOAWAY race instead of failing it; after a moment for
                // an answer already read to arrive, the pool gives up on it
                // rather than wait forever.
                _ = closed.changed() => tokio::time::timeout(LOST_STREAM_GRACE, &mut sent).await.ok(),
            };
            let failure = match outcome {
                Some(Ok(response)) => return Ok((response, slot)),
                Some(Err(failed)) => Failure::Send(failed),
                None => Failure::Lost,
            };
            drop(slot);
            let again = match failure {
                _ if resends == MAX_RESENDS => false,
                // Never written to a connection: the request comes back whole.
                Failure::Send(mut failed) if failed.message().is_some() => {
                    resends += 1;
                    request = failed.take_message().expect("checked above");
                    continue;
                }
                // A refused stream was not processed: any request may go
                // again. A connection that failed (or closed) before answering
                // may have processed it: only a request that is harmless twice
                // goes again.
                Failure::Send(ref failed) => {
                    was_refused_unprocessed(failed.error())
                        || (idempotent && is_connection_failure(failed.error()))
                }
                Failure::Lost => idempotent,
            };
            if again {
                if let Some(body) = body_again(spare, body_back).await {
                    tracing::debug!("upstream did not answer a stream; sending it again");
                    resends += 1;
                    request = Request::from_parts(head, body);
                    continue;
                }
            }
            // Not safe to send again, or its body is too large to have been
            // kept, or was not given back in time.
            return Err(failure.into_error());
        }
    }

    /// The task that keeps `warm_connections` connections open (opening
    /// them at startup, again when the server closes one), until dropped.
    /// It ends only for a pool offering both versions whose server turns
    /// out to choose HTTP/1.1.
    pub(crate) fn keep_warm(&self) -> impl Future<Output = ()> + Send + 'static {
        let pool = self.clone();
        async move {
            let mut retry = WARM_RETRY;
            loop {
                if pool.inner.server_chose_http1.load(Ordering::Acquire) {
                    return;
                }
                let ended = pool.inner.ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                let missing = {
                    let mut state = pool.inner.lock();
                    pool.inner.prune(&mut state);
                    let open = state.connections.len() + state.opening.len();
                    pool.inner.warm.saturating_sub(open)
                };
                if missing == 0 {
                    ended.await;
                    // Not at once: a server that closes every connection
                    // must not be dialled in a tight loop.
                    tokio::time::sleep(super::warm::MIN_REDIAL).await;
                    continue;
                }
                let mut done = {
                    let mut state = pool.inner.lock();
                    Inner::open(&pool.inner, &mut state)
                };
                match done.wait_for(Option::is_some).await.map(|o| o.clone()) {
                    Ok(Some(Err(err)))
                        if !pool.inner.server_chose_http1.load(Ordering::Acquire) =>
                    {
                        if retry == WARM_RETRY {
                            tracing::warn!(upstream = %pool.inner.target, error = %err,
                                "could not open a warm HTTP/2 upstream connection; retrying");
                        }
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(MAX_WARM_RETRY);
                    }
                    _ => retry = WARM_RETRY,
                }
            }
        }
    }

    /// For a pool offering both versions: the one the server speaks. The
    /// first call opens a connection to find out; an HTTP/2 one stays in
    /// the pool for the requests, an HTTP/1.1 one is closed and the answer
    /// kept (a server's ALPN preference is its configuration, so it is not
    /// asked again).
    pub(crate) async fn negotiate(&self) -> Result<Negotiated, SendError> {
        for _ in 0..MAX_OPEN_ROUNDS {
            if self.inner.server_chose_http1.load(Ordering::Acquire) {
                return Ok(Negotiated::Http1);
            }
            let mut done = {
                let mut state = self.inner.lock();
                self.inner.prune(&mut state);
                if !state.connections.is_empty() {
                    return Ok(Negotiated::Http2);
                }
                // Not a waiter for a stream: it takes none.
                match state.opening.first() {
                    Some(opening) => opening.done.clone(),
                    None => Inner::open(&self.inner, &mut state),
                }
            };
            let outcome = done.wait_for(Option::is_some).await.map(|o| o.clone());
            if self.inner.server_chose_http1.load(Ordering::Acquire) {
                return Ok(Negotiated::Http1);
            }
            match outcome {
                Ok(Some(Err(err))) => return Err(err),
                Err(_) => return Err(SendError::cannot_connect(ABANDONED)),
                Ok(_) => {}
            }
        }
        Err(SendError::cannot_connect(NO_CAPACITY))
    }

    /// A stream slot on a connection with room.
    async fn slot(&self) -> Result<(http2::SendRequest<RequestBody>, StreamSlot), SendError> {
        for _ in 0..MAX_OPEN_ROUNDS {
            let mut done = {
                let mut state = self.inner.lock();
                self.inner.prune(&mut state);
                if let Some(connection) = state.connections.iter().find(|c| c.has_room()) {
                    connection.streams.fetch_add(1, Ordering::AcqRel);
                    let slot = StreamSlot {
                        connection: Arc::clone(connection),
                        epoch: self.inner.epoch,
                    };
                    return Ok((connection.sender.clone(), slot));
                }
                match state
                    .opening
                    .iter_mut()
                    .find(|opening| opening.waiters < ASSUMED_STREAMS)
                {
                    Some(opening) => {
                        opening.waiters += 1;
                        opening.done.clone()
                    }
                    None => Inner::open(&self.inner, &mut state),
                }
            };
            let outcome = match done.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone(),
                Err(_) => Some(Err(SendError::cannot_connect(ABANDONED))),
            };
            if let Some(Err(err)) = outcome {
                return Err(err);
            }
        }
        Err(SendError::cannot_connect(NO_CAPACITY))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the pool's lists consistent
        // (every change is a single push or retain), so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops connections that ended or are going away, and idle ones past
    /// `idle_timeout` beyond the `warm` ones kept.
    fn prune(&self, state: &mut State) {
        let now = millis_since(self.epoch);
        let limit = u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut kept_warm = 0;
        state.connections.retain(|connection| {
            if !connection.usable() {
                return false;
            }
            let idle = connection.streams.load(Ordering::Acquire) == 0
                && now.saturating_sub(connection.idle_since.load(Ordering::Acquire)) > limit;
            if idle {
                if kept_warm == self.warm {
                    return false;
                }
                kept_warm += 1;
            }
            true
        });
    }

    /// Starts opening a connection; the caller is its first waiter.
    fn open(this: &Arc<Self>, state: &mut State) -> watch::Receiver<Option<Result<(), SendError>>> {
        let id = this.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done) = watch::channel(None);
        state.opening.push(Opening {
            id,
            waiters: 1,
            done: done.clone(),
        });
        // Its own task: a request that gives up waiting must not abandon a
        // connection other requests wait for.
        let pool = Arc::clone(this);
        tokio::spawn(async move {
            let result = pool.connect().await;
            let outcome = {
                let mut state = pool.lock();
                state.opening.retain(|opening| opening.id != id);
                match result {
                    Ok(connection) => {
                        state.connections.push(connection);
                        Ok(())
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "opening an HTTP/2 upstream connection failed");
                        Err(err)
                    }
                }
            };
            let _ = done_tx.send(Some(outcome));
        });
        done
    }

    async fn connect(self: &Arc<Self>) -> Result<Arc<Connection>, SendError> {
        let io = self.connector.clone().oneshot(self.target.clone()).await?;
        if self.target.scheme() == Some(&Scheme::HTTPS) && !io.connected().is_negotiated_h2() {
            if self.alpn == Alpn::Both {
                self.server_chose_http1.store(true, Ordering::Release);
                return Err(SendError::cannot_connect(
                    "the upstream chose HTTP/1.1 in the TLS handshake (ALPN)",
                ));
            }
            return Err(SendError::cannot_connect(
                "the upstream did not accept HTTP/2 in the TLS handshake (ALPN); \
                 set upstream_http = \"1.1\" or \"auto\" for it",
            ));
        }
        let (closed_tx, io_closed) = watch::channel(());
        let io = WatchedIo {
            inner: io,
            _closed: closed_tx,
        };
        let (sender, mut task) = self
            .builder
            .handshake(io)
            .await
            .map_err(SendError::connecting)?;
        let connection = Arc::new(Connection {
            sender,
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(task.current_max_send_streams()),
            idle_since: AtomicU64::new(millis_since(self.epoch)),
            io_closed,
        });
        let watched: Weak<Connection> = Arc::downgrade(&connection);
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            // The task is polled for every request it dispatches, so the
            // limit is fresh whenever the pool is about to count on it.
            let ended = std::future::poll_fn(|cx| {
                let poll = Pin::new(&mut task).poll(cx);
                if let Some(connection) = watched.upgrade() {
                    let limit = task.current_max_send_streams();
                    connection.max_streams.store(limit, Ordering::Release);
                }
                poll
            })
            .await;
            if let Err(err) = ended {
                tracing::debug!(error = %err, "HTTP/2 upstream connection ended");
            }
            if let Some(pool) = pool.upgrade() {
                pool.ended.notify_one();
            }
        });
        Ok(connection)
    }
}

/// How an attempt to send a request failed.
// A local of one function, on the failure path: its size costs nothing
// worth a box (hyper's own `try_send_request` allows the same).
#[allow(clippy::large_enum_variant)]
enum Failure {
    /// hyper failed it (and may hand the request back).
    Send(hyper::client::conn::TrySendError<Request<RequestBody>>),
    /// Its connection closed and it was never answered.
    Lost,
}

impl Failure {
    fn into_error(self) -> SendError {
        match self {
            Self::Send(failed) => SendError::sending(failed.into_error()),
            Self::Lost => SendError::connection_lost(),
        }
    }
}

/// The body to send again: an empty one if it had ended before it was sent,
/// else what hyper hands back when it drops the first attempt's body.
async fn body_again(
    spare: Option<RequestBody>,
    body_back: tokio::sync::oneshot::Receiver<crate::proxy::request_body::UnsentBody>,
) -> Option<RequestBody> {
    if spare.is_some() {
        return spare;
    }
    match tokio::time::timeout(BODY_RETURN_WAIT, body_back).await {
        Ok(Ok(unsent)) => Some(unsent.resend()),
        _ => None,
    }
}

/// A connection's socket that tells the pool when it is dropped.
struct WatchedIo<T> {
    inner: T,
    _closed: watch::Sender<()>,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}

/// Methods a client may send twice without harm (RFC 9110 section 9.2.2).
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The method, target, version and headers of `request`, for a resend.
fn copy_head(request: &Request<RequestBody>) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy.into_parts().0
}

/// True when the server said it did not process the stream: REFUSED_STREAM,
/// or a graceful GOAWAY whose last stream id is below it.
fn was_refused_unprocessed(err: &hyper::Error) -> bool {
    let mut source = err.source();
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = err.source();
    }
    false
}

/// True when the error is the connection failing (reset, closed, broken
/// pipe), not something the server said about this stream.
fn is_connection_failure(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            return matches!(
                io.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            );
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.is_io() || (h2.is_go_away() && h2.is_remote()) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

//! keyrelay's HTTP/1.1 upstream pool, one per serving thread, on hyper's
//! own `client::conn::http1` connections.
//!
//! It does what hyper-util's pooled client did for keyrelay, with less work
//! per request: idle connections sit in a short list per origin (routes
//! have a handful of origins, found by comparing scheme and authority, not
//! by hashing them), the most recently used is taken first (its buffers are
//! still in cache), and a connection goes back to the list from the response
//! body's drop once the body was read to its end, rather than from a task
//! spawned per request to watch for that.
//!
//! - A request taken by an idle connection that turns out to be closed (the
//!   server's keep-alive ran out as keyrelay picked it) is handed back by
//!   hyper unsent and tried on the next connection, or a new one: it never
//!   reached the upstream, so it cannot be processed twice.
//! - A request that was written on a reused connection which then failed
//!   before a single response byte came back (the server closed it as the
//!   request crossed its keep-alive timeout) is sent once more, on a new
//!   connection, only when it is bodiless and its method idempotent (GET,
//!   HEAD, OPTIONS, DELETE), as nginx and Go's transport do. Each connection
//!   counts the bytes it has read, so "no response byte" is a fact, not a
//!   guess from hyper's error. A request with a body, one on a new
//!   connection, or one that got any response byte is never sent again.
//! - A connection idle for `pool_idle_timeout` is closed, by a task that
//!   runs only while connections are idle, so keyrelay rarely picks one the
//!   server is closing. At most `pool_max_idle_per_host` idle connections
//!   are kept per origin.
//! - A response body dropped before its end (the client went away) drops
//!   the connection with it: hyper closes it, which tells the upstream to
//!   stop generating.
//! - New connections come from the [`WarmConnector`]: a warm spare when it
//!   has one (treated as a reused connection above: it was opened before
//!   the request and may be closing), else a connection dialled for the
//!   request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Method;
use http::{Request, Response, Uri};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::SendError;
use super::warm::Io;
use super::WarmConnector;
use crate::proxy::request_body::RequestBody;

/// One serving thread's HTTP/1.1 connections to every upstream origin.
/// Cloning shares the connections.
#[derive(Clone)]
pub(crate) struct Http1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: WarmConnector,
    state: Mutex<State>,
    idle_timeout: Duration,
    max_idle_per_origin: usize,
}

#[derive(Default)]
struct State {
    /// Idle connections by origin; an origin's list stays once created.
    origins: Vec<IdleList>,
    /// True while the task that closes expired idle connections runs.
    reaping: bool,
}

/// The idle connections of one origin, the most recently used last.
struct IdleList {
    /// `scheme://authority/`, as the connector dials it.
    origin: Uri,
    connections: Vec<Idle>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection's request side and the count of bytes it has read.
struct Conn {
    sender: SendRequest<RequestBody>,
    read: Arc<AtomicU64>,
}

impl Conn {
    fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

/// A connection lent to one request until its response body is done with.
/// Dropped after [`Http1Lease::reusable`], it goes back to the pool.
pub struct Http1Lease {
    pool: Weak<Inner>,
    /// The origin's place in the pool's list.
    origin: usize,
    /// Always `Some` until dropped.
    conn: Option<Conn>,
    reusable: bool,
}

impl Http1Lease {
    /// The response was read to its end: the connection may serve another
    /// request (if hyper finds it still open).
    pub fn reusable(&mut self) {
        self.reusable = true;
    }
}

impl Drop for Http1Lease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !self.reusable || conn.sender.is_closed() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            Inner::put(&pool, self.origin, conn);
        }
    }
}

impl Http1Pool {
    /// An empty pool dialling through `connector`.
    pub(crate) fn new(
        connector: WarmConnector,
        idle_timeout: Duration,
        max_idle_per_origin: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                state: Mutex::default(),
                idle_timeout,
                max_idle_per_origin,
            }),
        }
    }

    /// Sends `request` (its URI absolute, its `Host` set by the caller: see
    /// `set_version` in `proxy/mod.rs`) on an idle connection to `origin`
    /// (`scheme://authority/` of the request's URI, which the route built
    /// once), or on a new one, and returns the response with the lease on
    /// its connection.
    pub(crate) async fn send(
        &self,
        mut request: Request<RequestBody>,
        origin: &Uri,
    ) -> Result<(Response<Incoming>, Http1Lease), SendError> {
        debug_assert!(same_origin(origin, request.uri()));
        *request.uri_mut() = origin_form(request.uri());

        let index = self.inner.origin_index(origin);
        // What a resend needs, copied once a connection opened before this
        // request takes it, and only for requests that may have one.
        let mut resendable: Option<Resendable> = None;
        // Idle pooled connections, most recent first, then a warm spare:
        // each was opened before this request, and the server may be
        // closing it as the request arrives.
        loop {
            let mut conn = match self.inner.checkout(index) {
                Some(conn) => conn,
                None => match self.inner.connector.spare_for(origin) {
                    Some(io) => self.handshake(io).await?,
                    None => break,
                },
            };
            let copy = resendable.get_or_insert_with(|| Resendable::of(&request));
            let read_before = conn.bytes_read();
            match conn.sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.lease(index, conn))),
                Err(mut failed) => match failed.take_message() {
                    // Not written: the connection closed under it. Next one.
                    Some(unsent) => {
                        unsent.body().metrics().upstream_retry("unsent");
                        request = unsent;
                    }
                    None => match copy.take() {
                        // Written, and the connection died before answering
                        // with a single byte: the server closed a connection
                        // it had kept open. Once more, on a new one.
                        Some(again) if conn.bytes_read() == read_before => {
                            tracing::debug!(
                                error = %failed.error(),
                                "reused upstream connection closed before answering; sending again"
                            );
                            again.body().metrics().upstream_retry("stale_connection");
                            request = again;
                            break;
                        }
                        _ => return Err(SendError::sending(failed.into_error())),
                    },
                },
            }
        }

        // A connection dialled for this request: what fails here is not a
        // stale connection, and is not sent again.
        let io = self.inner.connector.dial(origin.clone()).await?;
        let mut conn = self.handshake(io).await?;
        match conn.sender.try_send_request(request).await {
            Ok(response) => Ok((response, self.lease(index, conn))),
            Err(failed) => Err(SendError::sending(failed.into_error())),
        }
    }

    /// An HTTP/1.1 connection on `io`, its reads counted.
    async fn handshake(&self, io: Io) -> Result<Conn, SendError> {
        let read = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(CountReads {
            io: TokioIo::new(PlainOrTls::from(io)),
            read: Arc::clone(&read),
        });
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::connecting)?;
        // WebSocket upgrades leave hyper through the connection here.
        tokio::spawn(ConnectionTask {
            connection: connection.with_upgrades(),
        });
        Ok(Conn { sender, read })
    }

    fn lease(&self, origin: usize, conn: Conn) -> Http1Lease {
        Http1Lease {
            pool: Arc::downgrade(&self.inner),
            origin,
            conn: Some(conn),
            reusable: false,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is a push, pop or retain: poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The place of `origin`'s list, made on its first request.
    fn origin_index(&self, origin: &Uri) -> usize {
        let mut state = self.lock();
        if let Some(index) = state
            .origins
            .iter()
            .position(|list| same_origin(&list.origin, origin))
        {
            return index;
        }
        state.origins.push(IdleList {
            origin: origin.clone(),
            connections: Vec::new(),
        });
        state.origins.len() - 1
    }

    /// The most recently used idle connection to origin `index` that is
    /// ready for a request; closed ones and ones past the idle timeout are
    /// dropped on the way.
    ///
    /// A connection goes back to the list as soon as its response body has
    /// ended, a moment before hyper turns it to the next request (and longer
    /// if the upstream answered before reading the whole request body, which
    /// hyper then finishes sending). Such a connection stays in the list
    /// for a later request rather than making this one wait for it.
    fn checkout(&self, index: usize) -> Option<Conn> {
        let mut state = self.lock();
        let connections = &mut state.origins[index].connections;
        let now = Instant::now();
        let mut at = connections.len();
        while at > 0 {
            at -= 1;
            let idle = &connections[at];
            if now.duration_since(idle.since) >= self.idle_timeout || idle.conn.sender.is_closed() {
                connections.remove(at);
            } else if idle.conn.sender.is_ready() {
                return Some(connections.remove(at).conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request to origin `index`, unless the origin
    /// has its fill of idle connections; starts the reaper if it is not
    /// running.
    fn put(this: &Arc<Self>, index: usize, conn: Conn) {
        let mut state = this.lock();
        let list = &mut state.origins[index];
        if list.connections.len() >= this.max_idle_per_origin {
            return;
        }
        list.connections.push(Idle {
            conn,
            since: Instant::now(),
        });
        if !state.reaping {
            // Outside a runtime (a thread shutting down) nothing needs reaping.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.reaping = true;
                drop(state);
                runtime.spawn(reap(Arc::downgrade(this)));
            }
        }
    }
}

/// Closes idle connections past the idle timeout (and drops closed ones)
/// every half timeout while any are idle, then stops; the next connection
/// put back starts it again. Holds the pool weakly, so a dropped pool ends
/// it.
async fn reap(pool: Weak<Inner>) {
    loop {
        let Some(period) = pool.upgrade().map(|inner| inner.idle_timeout / 2) else {
            return;
        };
        tokio::time::sleep(period.max(Duration::from_millis(10))).await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        let mut state = inner.lock();
        let now = Instant::now();
        let mut idle = 0;
        for list in &mut state.origins {
            list.connections.retain(|connection| {
                now.duration_since(connection.since) < inner.idle_timeout
                    && !connection.conn.sender.is_closed()
            });
            idle += list.connections.len();
        }
        if idle == 0 {
            // Under the lock: a put from now on sees it stopped.
            state.reaping = false;
            return;
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream connection's task: hyper's connection, run to its end,
    /// its error logged. Written out rather than as an `async` block, which
    /// would hold the connection twice for its whole life (the captured
    /// value and the future awaiting it: 3.5 KiB a task instead of 1.8;
    /// issue 29).
    struct ConnectionTask<C> {
        #[pin]
        connection: C,
    }
}

impl<C: Future<Output = hyper::Result<()>>> Future for ConnectionTask<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Err(err) = std::task::ready!(self.project().connection.poll(cx)) {
            tracing::debug!(error = %err, "upstream connection ended with an error");
        }
        Poll::Ready(())
    }
}

/// A copy of a request that may be sent a second time: bodiless, with an
/// idempotent method. Taken before the request goes out, since hyper keeps
/// a request it has written.
struct Resendable(Option<Request<RequestBody>>);

impl Resendable {
    fn of(request: &Request<RequestBody>) -> Self {
        let idempotent = matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        );
        // No body at all: an empty one that is already at its end (no
        // chunked framing still to come), and no upgrade to another protocol.
        let bodiless = request.body().is_end_stream()
            && !request
                .headers()
                .contains_key(http::header::TRANSFER_ENCODING)
            && !request.headers().contains_key(http::header::UPGRADE);
        if !(idempotent && bodiless) {
            return Self(None);
        }
        let mut copy = Request::new(request.body().empty_copy());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        Self(Some(copy))
    }

    /// The copy, once: a request is sent at most twice.
    fn take(&mut self) -> Option<Request<RequestBody>> {
        self.0.take()
    }
}

/// An upstream connection as its task holds it for the connection's life:
/// a TLS stream boxed, so that a plain one does not carry its size inline
/// (rustls' client state in hyper-rustls' `MaybeHttpsStream`; issue 29).
enum PlainOrTls {
    Plain(TokioIo<TcpStream>),
    Tls(Box<Io>),
}

impl From<Io> for PlainOrTls {
    fn from(io: Io) -> Self {
        match io {
            MaybeHttpsStream::Http(tcp) => Self::Plain(tcp),
            tls => Self::Tls(Box::new(tls)),
        }
    }
}

impl hyper::rt::Read for PlainOrTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for PlainOrTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

/// An upstream connection that counts the bytes it reads, so the pool can
/// tell a connection that died before answering from one that died
/// mid-answer.
struct CountReads<T> {
    io: T,
    read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountReads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountReads<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn same_origin(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme() && a.authority() == b.authority()
}

/// The request target an HTTP/1.1 request line carries: path and query.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}

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
//!   reached the upstream, so it cannot be processed twice. A request that
//!   may have been written is never sent again.
//! - A connection idle for `pool_idle_timeout` is closed, by a task that
//!   runs only while connections are idle, so keyrelay rarely picks one the
//!   server is closing. At most `pool_max_idle_per_host` idle connections
//!   are kept per origin.
//! - A response body dropped before its end (the client went away) drops
//!   the connection with it: hyper closes it, which tells the upstream to
//!   stop generating.
//! - New connections come from the [`WarmConnector`], which hands out a
//!   warm spare when it has one.

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::uri::{Parts, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tokio::time::Instant;
use tower::ServiceExt;

use super::WarmConnector;
use crate::proxy::request_body::RequestBody;

type BoxError = Box<dyn StdError + Send + Sync>;

/// One serving thread's HTTP/1.1 connections to every upstream origin.
/// Cloning shares the connections.
#[derive(Clone)]
pub struct Http1Pool {
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
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// A connection lent to one request until its response body is done with.
/// Dropped after [`Http1Lease::reusable`], it goes back to the pool.
pub struct Http1Lease {
    pool: Weak<Inner>,
    /// The origin's place in the pool's list.
    origin: usize,
    /// Always `Some` until dropped.
    sender: Option<SendRequest<RequestBody>>,
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
        let Some(sender) = self.sender.take() else {
            return;
        };
        if !self.reusable || sender.is_closed() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            Inner::put(&pool, self.origin, sender);
        }
    }
}

/// Why a request could not be sent.
#[derive(Debug)]
pub enum Http1Error {
    /// No connection could be opened (DNS, TCP, TLS or the connect timeout).
    Connect(BoxError),
    /// The connection failed while the request was sent or answered.
    Send(hyper::Error),
}

impl Http1Error {
    /// True when the request never left keyrelay for want of a connection.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl fmt::Display for Http1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(_) => f.write_str("could not connect to the upstream"),
            Self::Send(_) => f.write_str("the upstream connection failed"),
        }
    }
}

impl StdError for Http1Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Connect(err) => Some(&**err),
            Self::Send(err) => Some(err),
        }
    }
}

impl Http1Pool {
    /// An empty pool dialling through `connector`.
    pub fn new(
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

    /// Sends `request` (its URI absolute) on an idle connection to its
    /// origin, or on a new one, and returns the response with the lease on
    /// its connection.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Http1Lease), Http1Error> {
        let origin = origin_of(request.uri());
        if !request.headers().contains_key(http::header::HOST) {
            if let Some(host) = origin
                .authority()
                .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
            {
                request.headers_mut().insert(http::header::HOST, host);
            }
        }
        *request.uri_mut() = origin_form(request.uri());

        let index = self.inner.origin_index(&origin);
        while let Some(mut sender) = self.inner.checkout(index) {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.lease(index, sender))),
                Err(mut failed) => match failed.take_message() {
                    // Not written: the connection closed under it. Next one.
                    Some(unsent) => request = unsent,
                    None => return Err(Http1Error::Send(failed.into_error())),
                },
            }
        }

        let io = self
            .inner
            .connector
            .clone()
            .oneshot(origin)
            .await
            .map_err(Http1Error::Connect)?;
        let (mut sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|err| Http1Error::Connect(err.into()))?;
        tokio::spawn(async move {
            // WebSocket upgrades leave hyper through the connection here.
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        match sender.try_send_request(request).await {
            Ok(response) => Ok((response, self.lease(index, sender))),
            Err(failed) => Err(Http1Error::Send(failed.into_error())),
        }
    }

    fn lease(&self, origin: usize, sender: SendRequest<RequestBody>) -> Http1Lease {
        Http1Lease {
            pool: Arc::downgrade(&self.inner),
            origin,
            sender: Some(sender),
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
    fn checkout(&self, index: usize) -> Option<SendRequest<RequestBody>> {
        let mut state = self.lock();
        let connections = &mut state.origins[index].connections;
        let now = Instant::now();
        let mut at = connections.len();
        while at > 0 {
            at -= 1;
            let idle = &connections[at];
            if now.duration_since(idle.since) >= self.idle_timeout || idle.sender.is_closed() {
                connections.remove(at);
            } else if idle.sender.is_ready() {
                return Some(connections.remove(at).sender);
            }
        }
        None
    }

    /// Keeps `sender` for the next request to origin `index`, unless the origin
    /// has its fill of idle connections; starts the reaper if it is not
    /// running.
    fn put(this: &Arc<Self>, index: usize, sender: SendRequest<RequestBody>) {
        let mut state = this.lock();
        let list = &mut state.origins[index];
        if list.connections.len() >= this.max_idle_per_origin {
            return;
        }
        list.connections.push(Idle {
            sender,
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
                    && !connection.sender.is_closed()
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

fn same_origin(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme() && a.authority() == b.authority()
}

/// `scheme://authority/` of an absolute URI: what is dialled, and the pool's key.
fn origin_of(uri: &Uri) -> Uri {
    let mut parts = Parts::default();
    parts.scheme = uri.scheme().cloned();
    parts.authority = uri.authority().cloned();
    parts.path_and_query = Some(PathAndQuery::from_static("/"));
    Uri::from_parts(parts).unwrap_or_default()
}

/// The request target an HTTP/1.1 request line carries: path and query.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}

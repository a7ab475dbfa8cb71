//! `client_idle_timeout`: a client connection with no request in flight is
//! closed after this long, whatever the client sends in between.
//!
//! hyper's HTTP/2 server has no idle timeout of its own, and it answers
//! PINGs (and keyrelay's own keep-alive PINGs are answered) without a
//! request: a client that opens an h2c connection and only pings would hold
//! it forever. So each connection counts its requests in flight here, from
//! the moment the request arrives until its response body is done with (or
//! dropped), and the connection's task closes it gracefully (GOAWAY on
//! HTTP/2) once the count has stayed at zero for the timeout. Nothing but a
//! request counts as activity: not PINGs, not SETTINGS, not WINDOW_UPDATEs.
//! On HTTP/1.1 the same rule closes an idle keep-alive connection
//! (`header_read_timeout` usually does it first).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use crate::proxy::Proxy;

/// How long a connection closed for idleness may take to finish the
/// GOAWAY exchange: HTTP/2 sends its final GOAWAY only once the client
/// answers a PING, which a hostile client never does.
pub(crate) const GOAWAY_GRACE: Duration = Duration::from_secs(2);

/// The requests in flight on one client connection, and when the last one
/// ended.
///
/// Two atomic updates and one clock read per request, and no wake-up: the
/// idle timer ([`idle_for`]) looks at them only when it fires. (A channel
/// that woke the timer on every change, re-arming it each time, cost about
/// 5,000 instructions per request in `bench/instructions.sh`.)
#[derive(Clone)]
pub(crate) struct InFlight(Arc<Activity>);

struct Activity {
    /// Requests whose response body is not done with yet.
    open: AtomicUsize,
    /// When the last request ended, in nanoseconds since `since`.
    last_end: AtomicU64,
    since: Instant,
}

impl InFlight {
    /// A connection with nothing in flight, idle from now.
    pub(crate) fn new() -> Self {
        Self(Arc::new(Activity {
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            since: Instant::now(),
        }))
    }

    fn start(&self) -> Open {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        Open(Arc::clone(&self.0))
    }

    /// When the connection became idle, or `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        (self.0.open.load(Ordering::Acquire) == 0).then(|| {
            let ended = self.0.last_end.load(Ordering::Relaxed);
            self.0.since + Duration::from_nanos(ended)
        })
    }
}

/// One request in flight; dropping it ends it.
struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        let elapsed = self.0.since.elapsed().as_nanos();
        self.0.last_end.store(
            u64::try_from(elapsed).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// Resolves once the connection has had no request in flight for `limit`
/// (counted from the first poll at the earliest). The timer wakes only
/// when a deadline passes, and then moves the deadline on if a request came
/// in meanwhile.
pub(crate) async fn idle_for(in_flight: InFlight, limit: Duration) {
    let mut deadline = Instant::now() + limit;
    loop {
        tokio::time::sleep_until(deadline).await;
        deadline = match in_flight.idle_since() {
            None => Instant::now() + limit,
            Some(since) if since + limit <= Instant::now() => return,
            Some(since) => since + limit,
        };
    }
}

/// The proxy as one client connection serves it, counting its requests.
#[derive(Clone)]
pub(crate) struct Counted {
    proxy: Proxy,
    in_flight: InFlight,
}

impl Counted {
    pub(crate) fn new(proxy: Proxy, in_flight: InFlight) -> Self {
        Self { proxy, in_flight }
    }
}

type ProxyFuture = <Proxy as tower::Service<Request<Incoming>>>::Future;
type ProxyBody = crate::proxy::ResponseBody;

impl tower::Service<Request<Incoming>> for Counted {
    type Response = Response<CountedBody>;
    type Error = Infallible;
    type Future = CountedFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::poll_ready(&mut self.proxy, cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        CountedFuture {
            request: Some(self.in_flight.start()),
            inner: tower::Service::call(&mut self.proxy, request),
        }
    }
}

/// The proxy's answer, holding the request's place in the count.
pub(crate) struct CountedFuture {
    inner: ProxyFuture,
    request: Option<Open>,
}

impl Future for CountedFuture {
    type Output = Result<Response<CountedBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(response) = std::task::ready!(self.inner.as_mut().poll(cx));
        let request = self.request.take();
        Poll::Ready(Ok(response.map(|inner| CountedBody {
            inner,
            _request: request,
        })))
    }
}

/// A response body that ends its request's place in the count when dropped.
pub(crate) struct CountedBody {
    inner: ProxyBody,
    _request: Option<Open>,
}

impl Body for CountedBody {
    type Data = <ProxyBody as Body>::Data;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

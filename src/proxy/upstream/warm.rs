//! Warm HTTP/1.1 upstream connections: TCP and TLS done before a request
//! needs them.
//!
//! A model endpoint is a DNS lookup, a TCP handshake and a TLS handshake
//! away, often 100–300 ms from a laptop, and without this the first request
//! after startup (or after the pool idled out) pays all of it. A keeper task
//! per upstream origin holds `warm_connections` spare connections, opened at
//! startup (readiness does not wait for them) and re-opened whenever the
//! server closes one or a request takes one. The connector hands a spare to
//! the first request that needs a new connection, so the HTTP/1.1 pool above
//! needs no changes. (HTTP/2 pools keep whole HTTP/2 connections warm
//! instead, with PINGs: an HTTP/2 server speaks first, so a bare spare
//! would not stay silent.)
//!
//! An HTTP/1.1 server sends nothing before a request, so anything readable
//! on a spare (end of file, data, an error) means the server is done with
//! it: the keeper watches each one for that and replaces it, and a spare is
//! checked once more as it is handed out. A close can also be lost (a NAT
//! forgetting the connection, a laptop asleep), so a spare is also replaced
//! once it is older than `pool_idle_timeout`, the age past which the pool
//! above stops reusing its own idle connections for the same reason.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::connect::Connector;
use super::error::SendError;

/// An upstream connection as the connector makes it.
pub(super) type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Wait before retrying a spare that could not be opened; doubles per
/// failure up to [`MAX_RETRY`], so a down upstream costs a dial now and then.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Least time between a server closing a warm connection and the next
/// dial, so a server that closes every connection at once is not dialled in
/// a tight loop (a spare taken by a request is replaced at once).
pub(super) const MIN_REDIAL: Duration = Duration::from_secs(1);

/// A connector that hands out spare connections where it keeps them, and
/// dials otherwise. Cloning shares the spares.
#[derive(Clone)]
pub(crate) struct WarmConnector {
    dial: Connector,
    origins: Arc<Mutex<Vec<Arc<Origin>>>>,
}

/// The spares of one origin.
struct Origin {
    /// `scheme://authority/`, what is dialled.
    target: Uri,
    count: usize,
    /// Age at which a spare is replaced rather than handed out.
    max_age: Duration,
    spares: Mutex<Vec<Spare>>,
    /// Signalled when a request looks for a spare (and may have taken one),
    /// so the keeper tops the spares up.
    taken: Notify,
}

/// A spare connection and when it was opened.
struct Spare {
    io: Io,
    opened: Instant,
}

impl Origin {
    fn lock(&self) -> MutexGuard<'_, Vec<Spare>> {
        // Every change is a push, pop or retain: a panic cannot leave the
        // list half-changed, so poisoning is ignored.
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serves(&self, uri: &Uri) -> bool {
        self.target.scheme() == uri.scheme() && self.target.authority() == uri.authority()
    }

    /// A spare that is still open and young enough, if there is one.
    fn take(&self) -> Option<Io> {
        let mut spares = self.lock();
        let mut check = Context::from_waker(Waker::noop());
        // Whatever happens, the keeper tops the spares up.
        self.taken.notify_one();
        while let Some(mut spare) = spares.pop() {
            if spare.opened.elapsed() < self.max_age && is_open(&mut spare.io, &mut check) {
                return Some(spare.io);
            }
        }
        None
    }

    /// Resolves when the server has closed a spare, having dropped it.
    async fn any_closed(&self) {
        std::future::poll_fn(|cx| {
            let mut spares = self.lock();
            let before = spares.len();
            spares.retain_mut(|spare| is_open(&mut spare.io, cx));
            if spares.len() < before {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Resolves when the oldest spare reaches `max_age`, having dropped it.
    async fn oldest_expired(&self) {
        let oldest = self.lock().iter().map(|spare| spare.opened).min();
        let Some(oldest) = oldest else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(oldest + self.max_age).await;
        self.lock()
            .retain(|spare| spare.opened.elapsed() < self.max_age);
    }
}

/// True when nothing is readable on `io`: the server has neither closed it
/// nor sent anything. Registers `cx` to be woken when that changes.
fn is_open(io: &mut Io, cx: &mut Context<'_>) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let mut buf = hyper::rt::ReadBuf::uninit(&mut byte);
    let poll = hyper::rt::Read::poll_read(Pin::new(io), cx, buf.unfilled());
    poll.is_pending()
}

impl WarmConnector {
    pub(crate) fn new(dial: Connector) -> Self {
        Self {
            dial,
            origins: Arc::default(),
        }
    }

    /// The task that keeps `count` spare connections to `target`'s origin
    /// open, each for at most `max_age`, until it is dropped (the caller
    /// runs it beside the server).
    pub(crate) fn keep_warm(
        &self,
        target: Uri,
        count: usize,
        max_age: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let origin = Arc::new(Origin {
            target,
            count,
            // Not below the redial pace: a tiny age would only churn.
            max_age: max_age.max(MIN_REDIAL),
            spares: Mutex::new(Vec::with_capacity(count)),
            taken: Notify::new(),
        });
        self.origins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&origin));
        keep(origin, self.dial.clone())
    }

    /// A new connection to `uri`'s origin, never a spare.
    pub(super) fn dial(
        &self,
        uri: Uri,
    ) -> impl Future<Output = Result<Io, SendError>> + Send + 'static {
        self.dial.clone().oneshot(uri)
    }

    /// A warm spare for `uri`'s origin, if one is open and young enough.
    pub(super) fn spare_for(&self, uri: &Uri) -> Option<Io> {
        let origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        origins.iter().find(|o| o.serves(uri))?.take()
    }
}

async fn keep(origin: Arc<Origin>, dial: Connector) {
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    loop {
        if origin.lock().len() < origin.count {
            match dial.clone().oneshot(origin.target.clone()).await {
                Ok(io) => {
                    if failing {
                        tracing::info!(upstream = %origin.target, "warm upstream connection open again");
                    }
                    origin.lock().push(Spare {
                        io,
                        opened: Instant::now(),
                    });
                    (retry, failing) = (FIRST_RETRY, false);
                }
                Err(err) => {
                    // Said once per outage; the requests' own errors say the rest.
                    if !failing {
                        tracing::warn!(upstream = %origin.target, error = %err,
                            "could not open a warm upstream connection; retrying");
                    }
                    failing = true;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
            continue;
        }
        tokio::select! {
            () = origin.any_closed() => {
                tracing::debug!(upstream = %origin.target, "the upstream closed a warm connection; opening another");
                tokio::time::sleep(MIN_REDIAL).await;
            }
            () = origin.oldest_expired() => {}
            () = origin.taken.notified() => {}
        }
    }
}

impl Service<Uri> for WarmConnector {
    type Response = Io;
    type Error = SendError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, SendError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        self.dial.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self.spare_for(&uri) {
            Some(io) => Box::pin(std::future::ready(Ok(io))),
            None => Box::pin(self.dial.call(uri)),
        }
    }
}

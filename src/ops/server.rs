//! One serving thread's accept loop, per-connection serving and graceful
//! shutdown ([`crate::ops::workers`] runs one per thread).
//!
//! Each accepted socket gets `TCP_NODELAY` (small token frames must not wait
//! for Nagle) and is served by hyper-util's auto builder, which speaks
//! HTTP/1.1 or HTTP/2 with prior knowledge on the same port, or, when its
//! first bytes are surely HTTP/1 (nearly always), by hyper's HTTP/1 builder
//! directly: the auto builder reads the first bytes itself and hands hyper a
//! first read of 24 bytes, which makes hyper grow the connection's read
//! buffer from 8 to 16 KiB, kept for the connection's life (issue 29). On shutdown the
//! listener closes at once, connections are asked to finish what they are
//! doing (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY), and
//! whatever is still running after the grace period is aborted. A connection
//! with no request in flight for `client_idle_timeout` is closed the same
//! graceful way ([`crate::ops::client_idle`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::ops::listener::{Listener, Stream};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::ops::client_idle::{self, Counted, InFlight};
use crate::proxy::tunnel::Tunnels;
use crate::proxy::Proxy;

/// HTTP/2 streams a client may reset before keyrelay has accepted them.
const HTTP2_MAX_PENDING_RESETS: usize = 20;

/// HTTP/2 streams keyrelay may reset for a client's protocol errors before it
/// closes the connection.
const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// PINGs on idle HTTP/2 client connections find dead peers.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does
/// not spin while the condition lasts.
pub(crate) const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `proxy` on `listener` until `shutdown` resolves, then drains.
pub(crate) async fn serve(
    listener: Listener,
    proxy: Proxy,
    tunnels: Arc<Tunnels>,
    shutdown: impl Future<Output = ()>,
    config: &Config,
) -> std::io::Result<()> {
    let grace = config.shutdown_grace;
    let limits = &config.limits;
    let builder = Arc::new(Builders::new(limits));
    let timeouts = Timeouts {
        first_bytes: limits.header_read_timeout,
        idle: limits.client_idle_timeout,
    };
    // Tells connections that have not sent a byte yet that keyrelay is
    // draining: hyper's graceful shutdown cannot reach them (they are not
    // served yet), and waiting out their first-bytes timeout would hold up
    // the drain by up to header_read_timeout for nothing (browsers and
    // pooled clients open such connections ahead of need).
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            // In order: a shutdown is seen at once; then every connection the
            // kernel has queued is accepted before finished ones are reaped,
            // so a burst drains from the backlog as fast as it can.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let in_flight = InFlight::new();
                let service =
                    TowerToHyperService::new(Counted::new(proxy.clone(), in_flight.clone()));
                connections.spawn(serve_connection(
                    stream,
                    peer,
                    service,
                    Arc::clone(&builder),
                    timeouts,
                    in_flight,
                    draining.clone(),
                ));
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    let _ = draining_tx.send(true);
    let open = connections.len();
    tracing::info!(open_connections = open, grace = ?grace, "shutting down; draining connections");
    let drained = async {
        // Each connection task saw the drain signal and closes gracefully.
        while connections.join_next().await.is_some() {}
        // Upgraded connections (WebSockets) left hyper's watch when they switched.
        tunnels.wait_idle().await;
    };
    let finished = match grace {
        Some(grace) => tokio::time::timeout(grace, drained).await.is_ok(),
        None => {
            drained.await;
            true
        }
    };
    if !finished {
        tracing::warn!(
            still_open = connections.len(),
            tunnels = tunnels.active(),
            "grace period over; aborting remaining connections"
        );
    }
    tunnels.abort_all();
    connections.shutdown().await;
    Ok(())
}

/// How long a connection may stay silent: before its first bytes, and with
/// no request in flight.
#[derive(Clone, Copy)]
struct Timeouts {
    first_bytes: Option<Duration>,
    idle: Option<Duration>,
}

/// The HTTP/1.1 and HTTP/2 settings every client connection is served with:
/// hyper-util's auto builder, and hyper's HTTP/1 builder with the same
/// HTTP/1 settings for connections whose first bytes are surely HTTP/1.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
}

impl Builders {
    fn new(limits: &crate::config::Limits) -> Self {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // Also caps the request head: hyper answers 431 beyond it.
            .max_buf_size(limits.max_request_header_size);
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_request_header_size).unwrap_or(u32::MAX))
            // Rapid-reset defence: few streams reset before they are served.
            .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
            .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_request_header_size)
            // hyper's read can overshoot max_buf_size within the buffer it
            // already holds, so a head a little over the limit would pass
            // on this path; this checks the parsed head itself (431).
            .max_header_size(limits.max_request_header_size);
        Self { auto, http1 }
    }

    fn serve(&self, stream: Stream, surely_http1: bool, service: Service) -> Connection {
        let io = TokioIo::new(stream);
        if surely_http1 {
            Connection::Http1 {
                conn: self.http1.serve_connection(io, service).with_upgrades(),
            }
        } else {
            Connection::Auto {
                conn: Box::pin(
                    self.auto
                        .serve_connection_with_upgrades(io, service)
                        .into_owned(),
                ),
            }
        }
    }
}

type Service = TowerToHyperService<Counted>;
type AutoConnection = auto::UpgradeableConnection<'static, TokioIo<Stream>, Service, TokioExecutor>;

pin_project_lite::pin_project! {
    /// A client connection served by either builder. The auto builder's
    /// connection (h2c, Unix sockets: rare) is boxed: inline it made every
    /// connection's task 1,536 bytes for 656 of hyper's HTTP/1 (issue 29).
    #[project = ConnectionProj]
    enum Connection {
        Http1 { #[pin] conn: http1::UpgradeableConnection<TokioIo<Stream>, Service> },
        Auto { conn: Pin<Box<AutoConnection>> },
    }
}

impl Connection {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.project() {
            ConnectionProj::Http1 { conn } => conn.graceful_shutdown(),
            ConnectionProj::Auto { conn } => conn.as_mut().graceful_shutdown(),
        }
    }
}

impl Future for Connection {
    type Output = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ConnectionProj::Http1 { conn } => conn.poll(cx).map_err(Into::into),
            ConnectionProj::Auto { conn } => conn.as_mut().poll(cx),
        }
    }
}

/// Awaits the future in `slot`, or never if there is none yet.
async fn awaited<F: Future<Output = ()> + Unpin>(slot: &mut Option<F>) {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// One client connection, from its first bytes to its end: served by hyper,
/// closed gracefully when keyrelay drains or when it has had no request in
/// flight for `client_idle_timeout`, and cut if it then will not finish.
async fn serve_connection(
    stream: Stream,
    peer: String,
    service: Service,
    builder: Arc<Builders>,
    timeouts: Timeouts,
    in_flight: InFlight,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    // The first bytes tell HTTP/1.1 from HTTP/2. hyper would wait for them
    // without a limit; a silent client must not hold a connection for free.
    let first_bytes = async {
        match timeouts.first_bytes {
            Some(limit) => tokio::time::timeout(limit, stream.surely_http1()).await,
            None => Ok(stream.surely_http1().await),
        }
    };
    let surely_http1 = tokio::select! {
        waited = first_bytes => match waited {
            // A failed peek is hyper's to meet and report.
            Ok(sniffed) => sniffed.unwrap_or(false),
            Err(_) => {
                tracing::debug!(%peer, "client sent nothing; closing");
                return;
            }
        },
        _ = draining.wait_for(|draining| *draining) => {
            tracing::debug!(%peer, "client sent nothing before shutdown; closing");
            return;
        }
    };
    let connection = builder.serve(stream, surely_http1, service);
    tokio::pin!(connection);
    let after_goaway = in_flight.clone();
    let idle = async {
        match timeouts.idle {
            Some(limit) => client_idle::idle_for(in_flight, limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle);
    // Made only once the idle close began, and boxed: a client that never
    // completes the GOAWAY exchange is cut after it. Most connections never
    // get there, and a held stream's task need not carry its timer.
    let mut cut = None;
    // Drain and idleness end a connection the same way:
    // hyper finishes what is in flight (HTTP/2: GOAWAY).
    let mut closing = false;
    let mut idle_closing = false;
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            _ = draining.wait_for(|draining| *draining), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!(%peer, "no request for client_idle_timeout; closing");
                connection.as_mut().graceful_shutdown();
                closing = true;
                idle_closing = true;
                cut = Some(Box::pin(client_idle::idle_for(
                    after_goaway.clone(),
                    client_idle::GOAWAY_GRACE,
                )));
            }
            () = awaited(&mut cut), if idle_closing => {
                tracing::debug!(%peer, "idle connection did not finish closing; dropping it");
                break Ok(());
            }
        }
    };
    if let Err(err) = ended {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
}

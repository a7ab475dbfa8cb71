//! One serving thread's accept loop, per-connection serving and graceful
//! shutdown ([`crate::ops::workers`] runs one per thread).
//!
//! Each accepted socket gets `TCP_NODELAY` (small token frames must not wait
//! for Nagle) and is served by hyper-util's auto builder, which speaks
//! HTTP/1.1 or HTTP/2 with prior knowledge on the same port. On shutdown the
//! listener closes at once, connections are asked to finish what they are
//! doing (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY), and
//! whatever is still running after the grace period is aborted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::ops::listener::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::task::JoinSet;

use crate::config::Config;
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
pub async fn serve(
    listener: Listener,
    proxy: Proxy,
    tunnels: Arc<Tunnels>,
    shutdown: impl Future<Output = ()>,
    config: &Config,
) -> std::io::Result<()> {
    let grace = config.shutdown_grace;
    let limits = &config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Also caps the request head: hyper answers 431 beyond it.
        .max_buf_size(limits.max_request_header_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_request_header_size).unwrap_or(u32::MAX))
        // Rapid-reset defence: few streams reset before they are served.
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL);

    let builder = Arc::new(builder);
    let first_bytes_timeout = limits.header_read_timeout;
    let graceful = GracefulShutdown::new();
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
                let service = TowerToHyperService::new(proxy.clone());
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                let mut draining = draining.clone();
                connections.spawn(async move {
                    // hyper waits for the first bytes (to tell HTTP/1.1 from
                    // HTTP/2) without a limit; a silent client must not hold a
                    // connection for free.
                    if let Some(limit) = first_bytes_timeout {
                        tokio::select! {
                            waited = tokio::time::timeout(limit, stream.wait_for_data()) => {
                                if waited.is_err() {
                                    tracing::debug!(%peer, "client sent nothing; closing");
                                    return;
                                }
                            }
                            _ = draining.wait_for(|draining| *draining) => {
                                tracing::debug!(%peer, "client sent nothing before shutdown; closing");
                                return;
                            }
                        }
                    }
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(err) = watcher.watch(connection).await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    let _ = draining_tx.send(true);
    let open = graceful.count();
    tracing::info!(open_connections = open, grace = ?grace, "shutting down; draining connections");
    let drained = async {
        graceful.shutdown().await;
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

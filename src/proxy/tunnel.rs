//! Upgraded connections (WebSockets): after `101 Switching Protocols`, bytes
//! are spliced both ways between the client and the upstream.
//!
//! Browsers cannot set headers on a WebSocket, so this is how a browser
//! reaches an authenticated WebSocket endpoint: keyrelay adds the key to the
//! upgrade request, then gets out of the way. When either side closes, its
//! half-close is passed on; when both are done (or either fails), both
//! connections are dropped, which closes them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::{watch, Notify};

use crate::proxy::context::Settlement;
use crate::telemetry::record::Outcome;

/// The upgraded connections in flight, so shutdown can wait for them (within
/// the grace period) and then cut them.
#[derive(Debug)]
pub struct Tunnels {
    active: AtomicUsize,
    idle: Notify,
    abort: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            abort: watch::Sender::new(false),
        }
    }
}

impl Tunnels {
    /// Tunnels in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once no tunnel is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Cuts every tunnel still open.
    pub fn abort_all(&self) {
        self.abort.send_replace(true);
    }

    /// Relays `client` and `upstream` in a tracked task.
    pub fn spawn(self: &Arc<Self>, client: OnUpgrade, upstream: OnUpgrade, request: Settlement) {
        self.active.fetch_add(1, Ordering::AcqRel);
        let tunnels = Arc::clone(self);
        let mut abort = self.abort.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = splice(client, upstream, request) => {}
                _ = abort.wait_for(|cut| *cut) => {
                    tracing::debug!("shutdown: cutting an upgraded connection");
                }
            }
            if tunnels.active.fetch_sub(1, Ordering::AcqRel) == 1 {
                tunnels.idle.notify_waiters();
            }
        });
    }
}

/// Waits for both sides to finish switching protocols, then relays until done.
/// The tunnel's end settles the request (dropped first, by a shutdown that
/// cuts it, [`Settlement`]'s fallback does).
async fn splice(client: OnUpgrade, upstream: OnUpgrade, mut request: Settlement) {
    let log = &mut request.record;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(request_id = log.id(), error = %err, "upgrade failed");
            log.finish(Outcome::UpstreamError);
            request.settle();
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((_to_upstream, to_client)) => {
            log.set_tunnelled_bytes(to_client);
            log.finish(Outcome::Ok);
        }
        Err(err) => {
            tracing::debug!(request_id = log.id(), error = %err, "upgraded connection ended with an error");
            log.finish(Outcome::ClientCancelled);
        }
    }
    request.settle();
}

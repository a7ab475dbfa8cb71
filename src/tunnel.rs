//! Upgraded connections (WebSockets): after `101 Switching Protocols`, bytes
//! are spliced both ways between the client and the upstream.
//!
//! Browsers cannot set headers on a WebSocket, so this is how a browser
//! reaches an authenticated WebSocket endpoint: keyrelay adds the key to the
//! upgrade request, then gets out of the way. When either side closes, its
//! half-close is passed on; when both are done (or either fails), both
//! connections are dropped, which closes them.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::access::{Outcome, RequestLog};

/// Waits for both sides to finish switching protocols, then relays until done.
pub async fn splice(client: OnUpgrade, upstream: OnUpgrade, mut log: RequestLog) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(request_id = log.id(), error = %err, "upgrade failed");
            log.finish(Outcome::UpstreamError);
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
}

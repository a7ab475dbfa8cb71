//! Process lifecycle shared by the proxy and the admin listener: whether
//! keyrelay is draining (readiness fails), and requests to quit.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Draining state and the quit request (`POST /quitquitquit`).
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    draining: AtomicBool,
    quit: Notify,
}

impl Lifecycle {
    /// True once shutdown has begun; `/readyz` then fails.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the start of shutdown.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Asks the process to shut down as if signalled (for Kubernetes Jobs).
    pub(crate) fn request_quit(&self) {
        // notify_one keeps the permit if nobody is waiting yet.
        self.quit.notify_one();
    }

    /// Resolves when a quit was requested.
    pub(crate) async fn quit_requested(&self) {
        self.quit.notified().await;
    }
}

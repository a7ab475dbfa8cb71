//! Shutdown signals: the first SIGTERM or SIGINT drains, a second one exits at once.

use std::future::Future;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Exit status when a second signal cuts the drain short (128 + SIGTERM).
const EXIT_ON_SECOND_SIGNAL: i32 = 143;

/// Installs the SIGTERM/SIGINT handlers now, and returns a future that
/// resolves on the first signal; after that, another one exits the process.
///
/// Installing before the future is polled matters: keyrelay reports ready
/// before its accept loop first polls the shutdown future, and a SIGTERM in
/// between must drain, not kill. Must be called inside the Tokio runtime.
pub fn shutdown_requested() -> impl Future<Output = ()> {
    let handlers = Handlers::install();
    async move {
        let Some(mut handlers) = handlers else {
            // Without handlers the process still dies to the default action.
            return std::future::pending().await;
        };
        handlers.recv().await;
        tracing::info!("shutdown signal received; draining (signal again to exit at once)");
        // The same handlers keep recording signals, so a second one that
        // arrives before this task first runs is not lost.
        tokio::spawn(async move {
            handlers.recv().await;
            tracing::warn!("second shutdown signal; exiting without draining");
            crate::telemetry::logging::flush_and_stop();
            std::process::exit(EXIT_ON_SECOND_SIGNAL);
        });
    }
}

struct Handlers {
    term: Signal,
    int: Signal,
}

impl Handlers {
    fn install() -> Option<Self> {
        Some(Self {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

//! Shutdown signals: the first SIGTERM or SIGINT drains, a second one exits at once.

use tokio::signal::unix::{signal, SignalKind};

/// Exit status when a second signal cuts the drain short (128 + SIGTERM).
const EXIT_ON_SECOND_SIGNAL: i32 = 143;

/// Resolves on the first SIGTERM or SIGINT; after that, another one exits the process.
pub async fn shutdown_requested() {
    wait_for_signal().await;
    tracing::info!("shutdown signal received; draining (signal again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second shutdown signal; exiting without draining");
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    });
}

async fn wait_for_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies to the default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

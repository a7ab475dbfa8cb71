//! Shutdown signals: the first SIGTERM or SIGINT drains, a second one exits at once.
//!
//! On Windows the same goes for the console's events: Ctrl-C, Ctrl-Break,
//! closing the console window and system shutdown. Windows ends the process
//! a few seconds after a close or shutdown event (about 5 s for a console
//! window) whatever it is doing, so a drain then is cut to that.

use std::future::Future;

#[cfg(unix)]
use tokio::signal::unix::{signal, Signal, SignalKind};
#[cfg(windows)]
use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, ctrl_shutdown};
#[cfg(windows)]
use tokio::signal::windows::{CtrlBreak, CtrlC, CtrlClose, CtrlShutdown};

/// Keeps SIGHUP from ending the process. `systemctl reload` (and many
/// supervisors) send it to mean "reload"; keyrelay's reloaders (key files,
/// access-token files, expiring credentials) each listen for it, but with
/// none configured its default action would kill the proxy. Installs the
/// handler now; the future logs each SIGHUP.
#[cfg(unix)]
pub fn hangups_reload_only() -> impl Future<Output = ()> {
    let hangups = signal(SignalKind::hangup()).ok();
    async move {
        let Some(mut hangups) = hangups else {
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: re-reading key and access-token files and refreshing expiring credentials, where configured");
        }
    }
}

/// Exit status when a second signal cuts the drain short (128 + SIGTERM; the
/// same on Windows, so scripts see one value).
const EXIT_ON_SECOND_SIGNAL: i32 = 143;

/// Installs the SIGTERM/SIGINT (Windows: console event) handlers now, and returns a future that
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

#[cfg(unix)]
struct Handlers {
    term: Signal,
    int: Signal,
}

#[cfg(unix)]
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

/// Windows' console events. Logoff is left out: Windows sends it to
/// services only, and a service would see it for every user who logs off.
#[cfg(windows)]
struct Handlers {
    c: CtrlC,
    brk: CtrlBreak,
    close: CtrlClose,
    shutdown: CtrlShutdown,
}

#[cfg(windows)]
impl Handlers {
    fn install() -> Option<Self> {
        Some(Self {
            c: ctrl_c().ok()?,
            brk: ctrl_break().ok()?,
            close: ctrl_close().ok()?,
            shutdown: ctrl_shutdown().ok()?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.c.recv() => {}
            _ = self.brk.recv() => {}
            _ = self.close.recv() => {}
            _ = self.shutdown.recv() => {}
        }
    }
}

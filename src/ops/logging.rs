//! Log output: `tracing` to stderr, text or JSON, filtered by `RUST_LOG`.
//!
//! Requests never wait on stderr. Each event is formatted where it happens
//! and handed to a writer thread through a bounded queue
//! (`tracing-appender`'s non-blocking writer); the thread gathers lines in a
//! buffer and writes them with one `write(2)` whenever the queue runs dry. If
//! the thread falls behind (a stalled terminal, a slow log collector) new
//! lines are dropped and counted ([`dropped_lines`], the
//! `keyrelay_log_lines_dropped` metric, a periodic warning), never stalling a
//! request. The [`LogGuard`] that [`init`] returns flushes every queued line
//! when it is dropped, so whatever was logged before a SIGTERM is written
//! before the process exits.
//!
//! Nothing keyrelay logs carries a credential: the key lives in a type that
//! prints a mask, the injected header value is marked sensitive, and request
//! headers are never logged. A test runs the binary at `RUST_LOG=trace` and
//! scans everything it printed for the key.

use std::io::{BufWriter, IsTerminal};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset: keyrelay's own events at info.
const DEFAULT_FILTER: &str = "info";

/// Lines queued for the writer thread before new ones are dropped: about
/// 4 MB of access-log lines, a second or more of a busy proxy's output.
const QUEUE_LINES: usize = 16_384;

/// What the writer thread gathers before one write to stderr.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// How often a falling-behind writer is reported.
const DROPPED_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The installed writer's count of dropped lines.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The installed writer thread; dropping it writes out every queued line
/// and joins the thread. Global so the exit-at-once path can flush too.
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Keeps the log writer running; dropping it writes out every queued line
/// (see [`flush_and_stop`]).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    /// False for a second `init`, which installed nothing of its own.
    installed: bool,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if self.installed {
            flush_and_stop();
        }
    }
}

/// Writes out every queued line and stops the writer thread; lines logged
/// after this are lost. For the end of the process, including
/// `std::process::exit`, which runs no destructors.
pub fn flush_and_stop() {
    let writer = WRITER.lock().map(|mut slot| slot.take());
    drop(writer);
}

/// Installs the global subscriber; later calls are ignored (their guard holds nothing).
pub fn init(format: LogFormat) -> LogGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("keyrelay-log")
        .finish(BufWriter::with_capacity(
            WRITE_BUFFER_BYTES,
            std::io::stderr(),
        ));
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    let installed = match installed {
        Ok(()) => {
            let _ = DROPPED.set(dropped);
            if let Ok(mut slot) = WRITER.lock() {
                *slot = Some(guard);
            }
            true
        }
        // A second init (tests, demo after proxy) keeps the first subscriber.
        Err(_) => false,
    };
    LogGuard { installed }
}

/// Log lines dropped so far because the writer thread was behind.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Warns, every [`DROPPED_REPORT_INTERVAL`], when lines were dropped since the
/// last report. The warning itself may be dropped too; the metric is not.
pub(crate) async fn report_dropped_lines() {
    let mut reported = dropped_lines();
    let mut tick = tokio::time::interval(DROPPED_REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = dropped_lines();
        if now > reported {
            tracing::warn!(
                dropped = now - reported,
                total = now,
                "log output is slower than keyrelay: lines were dropped rather than delay requests"
            );
            reported = now;
        }
    }
}

//! Log output: `tracing` to stderr, text or JSON, filtered by `RUST_LOG`.
//!
//! Requests never wait on stderr. Each event is formatted where it happens
//! and appended to an in-memory buffer that a writer thread writes out in
//! batches ([`crate::telemetry::log_writer`]). If the thread falls behind (a
//! stalled terminal, a slow log collector) new lines are dropped and counted
//! ([`dropped_lines`], the `keyrelay_log_lines_dropped` metric, a periodic
//! warning), never stalling a request. The [`LogGuard`] that [`init`] returns
//! writes out every line appended before it is dropped, so whatever was
//! logged before a SIGTERM is written before the process exits. The access
//! log's line per request skips `tracing`'s formatter for one of its own
//! ([`crate::telemetry::access_log`]) but goes to the same writer.
//!
//! Nothing keyrelay logs carries a credential: the key lives in a type that
//! prints a mask, the injected header value is marked sensitive, and request
//! headers are never logged. A test runs the binary at `RUST_LOG=trace` and
//! scans everything it printed for the key.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::telemetry::log_writer::{LogWriter, WriterGuard};

/// Filter used when `RUST_LOG` is unset: keyrelay's own events at info.
const DEFAULT_FILTER: &str = "info";

/// Bytes of lines waiting for the writer thread before new ones are
/// dropped: about 16,000 access-log lines, a second or more of a busy
/// proxy's output.
const PENDING_LIMIT: usize = 4 * 1024 * 1024;

/// How often a falling-behind writer is reported.
const DROPPED_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Where the access log writes its hand-formatted lines (see
/// [`crate::telemetry::access_log`]): the same queue as every other line.
static SINK: OnceLock<Sink> = OnceLock::new();

/// The installed log writer, for lines formatted outside `tracing`.
#[derive(Debug)]
pub(crate) struct Sink {
    /// The queue every log line goes through.
    pub writer: LogWriter,
    /// The `--log-format` chosen.
    pub format: LogFormat,
    /// Whether lines are styled for a terminal, as `tracing`'s are.
    pub ansi: bool,
}

/// The installed log writer; `None` before [`init`] or when another
/// subscriber was installed first.
pub(crate) fn sink() -> Option<&'static Sink> {
    SINK.get()
}

/// The installed writer thread; dropping it writes out every queued line
/// and joins the thread. Global so the exit-at-once path can flush too.
static WRITER: Mutex<Option<WriterGuard>> = Mutex::new(None);

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
    let (writer, guard) = LogWriter::start(std::io::stderr(), PENDING_LIMIT);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer.clone());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    let installed = match installed {
        Ok(()) => {
            let _ = SINK.set(Sink {
                writer,
                format,
                ansi,
            });
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
    SINK.get().map_or(0, |sink| sink.writer.dropped())
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

/// An error and its causes, joined (hyper-util's client error says only
/// "client error (Connect)" at the top).
pub(crate) fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

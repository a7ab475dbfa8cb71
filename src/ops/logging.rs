//! Log output: `tracing` to stderr, text or JSON, filtered by `RUST_LOG`.
//!
//! Nothing keyrelay logs carries a credential: the key lives in a type that
//! prints a mask, the injected header value is marked sensitive, and request
//! headers are never logged. A test runs the binary at `RUST_LOG=trace` and
//! scans everything it printed for the key.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset: keyrelay's own events at info.
const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber; later calls are ignored.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests, demo after proxy) keeps the first subscriber.
    drop(result);
}

//! What keyrelay reports about its work: the metrics, the access log, the
//! per-request access record that feeds both, the process's log lines and
//! the thread that writes them, and the figures they print about a
//! response's tokens.
//!
//! A leaf below the data path: `proxy`, `usage` and `secrets` report
//! through it, and it names none of them (only `config`, for the log
//! format).

pub(crate) mod access_log;
pub(crate) mod log_writer;
pub mod logging;
pub mod metrics;
pub(crate) mod record;
pub mod tokens;
pub mod trace;

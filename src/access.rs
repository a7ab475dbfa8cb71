//! The access log: one structured event per request, emitted when it ends.
//!
//! A [`RequestLog`] travels with the request and then with its response body,
//! collecting timings and byte counts. It emits its event when dropped, so a
//! stream that ends in any way (finished, failed, or abandoned by the client)
//! is logged exactly once. Only the method and path are logged: never headers,
//! queries or bodies, which can carry secrets.

use std::time::Duration;

use http::{Method, Uri};
use tokio::time::Instant;

/// Target of access-log events, for `RUST_LOG=keyrelay::access=info` style filters.
pub const TARGET: &str = "keyrelay::access";

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response reached the client.
    Ok,
    /// The client went away before the response ended.
    ClientCancelled,
    /// The upstream failed, before or during the response.
    UpstreamError,
    /// A timeout (response headers or idle between frames) ended the request.
    Timeout,
    /// keyrelay refused the request itself (e.g. CONNECT).
    Rejected,
}

impl Outcome {
    /// The name used in log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientCancelled => "client_cancelled",
            Self::UpstreamError => "upstream_error",
            Self::Timeout => "timeout",
            Self::Rejected => "rejected",
        }
    }
}

/// Everything the access-log event reports about one request.
#[derive(Debug)]
pub struct RequestLog {
    id: u64,
    method: Method,
    uri: Uri,
    started: Instant,
    status: Option<u16>,
    token: Option<String>,
    first_byte: Option<Duration>,
    bytes: u64,
    outcome: Option<Outcome>,
}

impl RequestLog {
    /// Starts the record when the request arrives.
    pub fn start(id: u64, method: Method, uri: Uri) -> Self {
        Self {
            id,
            method,
            uri,
            started: Instant::now(),
            status: None,
            token: None,
            first_byte: None,
            bytes: 0,
            outcome: None,
        }
    }

    /// The request id, shared with the request's tracing span.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Records which local access token the request used (its name, never its value).
    pub fn set_token(&mut self, name: Option<String>) {
        self.token = name;
    }

    /// Records the status sent to the client.
    pub fn set_status(&mut self, status: u16) {
        self.status = Some(status);
    }

    /// Counts a data frame relayed to the client.
    pub fn add_bytes(&mut self, len: usize, now: Instant) {
        self.first_byte
            .get_or_insert_with(|| now.duration_since(self.started));
        self.bytes += len as u64;
    }

    /// Records the bytes an upgraded connection relayed to the client.
    pub fn set_tunnelled_bytes(&mut self, bytes: u64) {
        self.bytes = bytes;
    }

    /// Records how the request ended; the first outcome recorded wins.
    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::ClientCancelled);
        let ttfb_ms = self.first_byte.map(millis);
        tracing::info!(
            target: TARGET,
            request_id = self.id,
            method = %self.method,
            path = self.uri.path(),
            status = self.status,
            token = self.token.as_deref(),
            ttfb_ms,
            duration_ms = millis(self.started.elapsed()),
            bytes = self.bytes,
            outcome = outcome.as_str(),
            "request finished"
        );
    }
}

/// Milliseconds with microsecond precision, the unit of every timing field.
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1e3
}

//! The figures telemetry reports about a response's tokens: what the
//! upstream said it used ([`Usage`], read by `usage::tap`), what the tap
//! saw ([`UsageReport`]), the timings derived from it ([`TokenFigures`]),
//! and whose budget a response overshot ([`Overshoot`]). Plain values: the
//! usage folder fills them in, the metrics and the access log print them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Tokens one response used, as far as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub prompt: Option<u64>,
    /// Output (completion) tokens.
    pub completion: Option<u64>,
    /// Input tokens served from the provider's prompt cache.
    pub cached: Option<u64>,
}

impl Usage {
    /// True if no figure was reported.
    pub fn is_empty(&self) -> bool {
        self.prompt.is_none() && self.completion.is_none() && self.cached.is_none()
    }

    /// Takes every figure `later` reports, keeping the others.
    pub fn merge(&mut self, later: Usage) {
        self.prompt = later.prompt.or(self.prompt);
        self.completion = later.completion.or(self.completion);
        self.cached = later.cached.or(self.cached);
    }
}

/// What the tap learnt from one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// The usage the upstream reported, if any.
    pub usage: Usage,
    /// When the first generated content passed (time to first token).
    pub first_content: Option<Instant>,
    /// Why the tap stopped reading, if it did.
    pub gave_up: Option<GaveUp>,
    /// SSE events seen carrying a `"delta"` (a generated chunk: at least
    /// one token each), for a charge when no usage is reported.
    pub deltas: u64,
}

/// Why a tap stopped reading its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// An SSE line longer than the tap's `MAX_LINE`.
    OverlongLine,
    /// A JSON body larger than the tap's `MAX_JSON`.
    OverlongJson,
    /// A compressed body, which the tap does not inflate.
    Encoded,
}

impl GaveUp {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OverlongLine => "overlong_line",
            Self::OverlongJson => "overlong_json",
            Self::Encoded => "encoded",
        }
    }
}

/// The timings derived from a usage report.
#[derive(Debug, Clone, Copy)]
pub struct TokenFigures {
    /// From the request's arrival to the first generated content.
    pub time_to_first_token: Option<Duration>,
    /// Output tokens per second after the first one arrived.
    pub tokens_per_second: Option<f64>,
}

/// Who spends against a budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "scope", content = "name", rename_all = "snake_case")]
pub enum Account {
    /// Everyone calling this route.
    Route(String),
    /// The local access token of this name (never its value).
    AccessToken(String),
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Route(name) => write!(f, "route {name}"),
            Self::AccessToken(name) => write!(f, "access token {name}"),
        }
    }
}

/// Tokens a response spent beyond one of its budgets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overshoot {
    /// Whose budget.
    pub account: Account,
    /// Tokens beyond it.
    pub tokens: u64,
}

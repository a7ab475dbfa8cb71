//! A budget's size and window: `TOKENS/WINDOW`, windows fixed and aligned
//! to UTC.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The length of a budget's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    pub(super) fn seconds(self) -> u64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// The start (Unix seconds) of the window that holds `now`.
    pub(super) fn start(self, now: u64) -> u64 {
        now - now % self.seconds()
    }
}

/// One configured budget: `tokens` per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimit {
    /// Tokens (prompt + completion) the window allows.
    pub tokens: u64,
    /// The window.
    pub window: Window,
}

/// The largest budget a window may have: a trillion tokens, far beyond
/// any real spend, and below 10^14, past which the Redis reserve script
/// (Lua numbers written with `%.14g`) would turn counts into exponents
/// that `INCRBY` refuses, leaving requests unmetered.
pub const MAX_BUDGET_TOKENS: u64 = 1_000_000_000_000;

impl BudgetLimit {
    /// Parses `TOKENS/WINDOW`: `2000000/day`, `50_000/minute`, `1e6`-free.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (tokens, window) = text.trim().split_once('/').ok_or_else(|| {
            format!("{text:?} is not TOKENS/WINDOW, such as 2000000/day or 50000/minute")
        })?;
        let digits: String = tokens.trim().chars().filter(|c| *c != '_').collect();
        let tokens = digits
            .parse::<u64>()
            .ok()
            .filter(|tokens| (1..=MAX_BUDGET_TOKENS).contains(tokens))
            .ok_or_else(|| {
                format!(
                    "{text:?}: the token count must be a whole number from 1 to {MAX_BUDGET_TOKENS}"
                )
            })?;
        let window = match window.trim().to_ascii_lowercase().as_str() {
            "m" | "min" | "minute" => Window::Minute,
            "h" | "hour" => Window::Hour,
            "d" | "day" => Window::Day,
            other => {
                return Err(format!(
                    "{text:?}: the window {other:?} is not one of: minute, hour, day"
                ))
            }
        };
        Ok(Self { tokens, window })
    }
}

impl fmt::Display for BudgetLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tokens, self.window.name())
    }
}

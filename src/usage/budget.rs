//! Token budgets: how many LLM tokens a route, or each local access token,
//! may spend per minute, hour or day.
//!
//! A request is refused (429, `Retry-After`) before anything goes upstream
//! when one of its budgets is already used up in the current window. What a
//! response spends (prompt + completion tokens, as the [tap](super::tap)
//! read them) is charged when it ends: a stream that crosses its budget was
//! admitted and is finished, and the tokens beyond the budget are reported
//! as overshoot.
//!
//! Windows are fixed and aligned to UTC (a day budget resets at midnight
//! UTC), so that every replica and a restart agree on which window a moment
//! falls in, with no clock of keyrelay's own to keep.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    fn seconds(self) -> u64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// The start (Unix seconds) of the window that holds `now`.
    fn start(self, now: u64) -> u64 {
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
            .filter(|tokens| *tokens > 0)
            .ok_or_else(|| format!("{text:?}: the token count must be a whole number above 0"))?;
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

/// A budget that is used up: which, and how long until its window ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// The budget, e.g. `access token CHAT_APP: 50000/minute`.
    pub budget: String,
    /// Until the window frees up.
    pub retry_after: Duration,
}

/// Tokens a response spent beyond one of its budgets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overshoot {
    /// Whose budget.
    pub account: Account,
    /// Tokens beyond it.
    pub tokens: u64,
}

/// Tokens spent in one account's current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Spent {
    /// The window's start, Unix seconds.
    start: u64,
    tokens: u64,
}

/// Every budget and what was spent against it.
#[derive(Debug, Default)]
pub struct Budgets {
    /// Each route's own budgets, by route index, with its name.
    routes: Vec<(String, Vec<BudgetLimit>)>,
    /// The budgets each access token has, and the tokens' names.
    per_token: Vec<BudgetLimit>,
    token_names: Vec<String>,
    spent: Mutex<HashMap<(Account, Window), Spent>>,
    /// Spending since the state file was last written.
    dirty: AtomicBool,
}

impl Budgets {
    /// Budgets for routes (name and budgets, by route index) and for each
    /// of the named access tokens.
    pub fn new(
        routes: Vec<(String, Vec<BudgetLimit>)>,
        per_token: Vec<BudgetLimit>,
        token_names: Vec<String>,
    ) -> Self {
        Self {
            routes,
            per_token,
            token_names,
            ..Self::default()
        }
    }

    /// The budgets `config` sets: each route's, and each access token's.
    pub fn from_config(config: &crate::Config) -> Self {
        Self::new(
            config
                .routes
                .iter()
                .map(|route| (route.name.clone(), route.budgets.clone()))
                .collect(),
            config.access.token_budgets.clone(),
            config
                .access
                .tokens
                .iter()
                .map(|token| token.name().to_owned())
                .collect(),
        )
    }

    /// True when no budget is configured: nothing to check or charge.
    pub fn is_empty(&self) -> bool {
        self.per_token.is_empty() && self.routes.iter().all(|(_, limits)| limits.is_empty())
    }

    /// The budgets a request on `route` with access token `token` spends against.
    fn applicable<'a>(
        &'a self,
        route: usize,
        token: Option<&'a str>,
    ) -> impl Iterator<Item = (Account, BudgetLimit)> + 'a {
        let route_budgets = self
            .routes
            .get(route)
            .into_iter()
            .flat_map(|(name, limits)| {
                limits
                    .iter()
                    .map(move |limit| (Account::Route(name.clone()), *limit))
            });
        let token_budgets = token.into_iter().flat_map(move |token| {
            self.per_token
                .iter()
                .map(move |limit| (Account::AccessToken(token.to_owned()), *limit))
        });
        route_budgets.chain(token_budgets)
    }

    /// Refuses the request if one of its budgets is used up at `now`.
    pub fn check(
        &self,
        route: usize,
        token: Option<&str>,
        now: SystemTime,
    ) -> Result<(), Exhausted> {
        let now = unix_seconds(now);
        let spent = self.lock();
        for (account, limit) in self.applicable(route, token) {
            let start = limit.window.start(now);
            let used = spent_in(&spent, &account, limit.window, start);
            if used >= limit.tokens {
                return Err(Exhausted {
                    budget: format!("{account}: {limit}"),
                    retry_after: Duration::from_secs(start + limit.window.seconds() - now),
                });
            }
        }
        Ok(())
    }

    /// Charges `tokens` to every budget of the request; returns the tokens
    /// spent beyond each budget this crossed or had already used up.
    pub fn charge(
        &self,
        route: usize,
        token: Option<&str>,
        tokens: u64,
        now: SystemTime,
    ) -> Vec<Overshoot> {
        if tokens == 0 {
            return Vec::new();
        }
        let now = unix_seconds(now);
        let mut overshoots = Vec::new();
        let mut spent = self.lock();
        for (account, limit) in self.applicable(route, token) {
            let start = limit.window.start(now);
            let entry = spent
                .entry((account.clone(), limit.window))
                .or_insert(Spent { start, tokens: 0 });
            if entry.start != start {
                *entry = Spent { start, tokens: 0 };
            }
            let before = entry.tokens;
            entry.tokens = before.saturating_add(tokens);
            let beyond = entry.tokens.saturating_sub(before.max(limit.tokens));
            if beyond > 0 {
                overshoots.push(Overshoot {
                    account,
                    tokens: beyond,
                });
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
        overshoots
    }

    /// Every budget with what is spent in its current window, for `/usage`.
    pub fn report(&self, now: SystemTime) -> serde_json::Value {
        let now = unix_seconds(now);
        let spent = self.lock();
        let accounts = self
            .routes
            .iter()
            .flat_map(|(name, limits)| {
                limits
                    .iter()
                    .map(move |limit| (Account::Route(name.clone()), *limit))
            })
            .chain(self.token_names.iter().flat_map(|name| {
                self.per_token
                    .iter()
                    .map(move |limit| (Account::AccessToken(name.clone()), *limit))
            }));
        let budgets: Vec<_> = accounts
            .map(|(account, limit)| {
                let start = limit.window.start(now);
                let used = spent_in(&spent, &account, limit.window, start);
                let (scope, name) = match &account {
                    Account::Route(name) => ("route", name),
                    Account::AccessToken(name) => ("access_token", name),
                };
                serde_json::json!({
                    "scope": scope,
                    "name": name,
                    "budget": limit.to_string(),
                    "limit": limit.tokens,
                    "window": limit.window.name(),
                    "spent": used,
                    "remaining": limit.tokens.saturating_sub(used),
                    "resets_in_seconds": start + limit.window.seconds() - now,
                })
            })
            .collect();
        serde_json::json!({ "budgets": budgets })
    }

    /// What is spent, as the state file holds it; `None` if nothing was
    /// spent since the last call.
    pub fn state_if_changed(&self) -> Option<String> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        Some(self.state())
    }

    /// What is spent, as the state file holds it.
    pub fn state(&self) -> String {
        let spent = self.lock();
        let accounts: Vec<StateEntry> = spent
            .iter()
            .map(|((account, window), spent)| StateEntry {
                account: account.clone(),
                window: *window,
                start: spent.start,
                tokens: spent.tokens,
            })
            .collect();
        serde_json::json!({ "version": STATE_VERSION, "accounts": accounts }).to_string()
    }

    /// Takes back what a state file says was spent in the windows still
    /// current at `now`; returns how many accounts it restored.
    pub fn restore(&self, text: &str, now: SystemTime) -> Result<usize, String> {
        let state: State = serde_json::from_str(text)
            .map_err(|err| format!("not a keyrelay usage state: {err}"))?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "version {} is not {STATE_VERSION}, the version this keyrelay writes",
                state.version
            ));
        }
        let now = unix_seconds(now);
        let mut spent = self.lock();
        let mut restored = 0;
        for entry in state.accounts {
            if entry.start == entry.window.start(now) {
                spent.insert(
                    (entry.account, entry.window),
                    Spent {
                        start: entry.start,
                        tokens: entry.tokens,
                    },
                );
                restored += 1;
            }
        }
        Ok(restored)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Account, Window), Spent>> {
        // A panic while holding the lock leaves only counts behind.
        self.spent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The state file's format version.
const STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u32,
    accounts: Vec<StateEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateEntry {
    #[serde(flatten)]
    account: Account,
    window: Window,
    start: u64,
    tokens: u64,
}

/// Tokens `account` spent in the `window` that starts at `start`.
fn spent_in(
    spent: &HashMap<(Account, Window), Spent>,
    account: &Account,
    window: Window,
    start: u64,
) -> u64 {
    spent
        .get(&(account.clone(), window))
        .filter(|spent| spent.start == start)
        .map_or(0, |spent| spent.tokens)
}

fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// A day and a minute budget on route 0 ("chat"), 100/minute per token.
    fn budgets() -> Budgets {
        let limit = |text| BudgetLimit::parse(text).expect("valid budget");
        Budgets::new(
            vec![("chat".to_owned(), vec![limit("1_000/day")])],
            vec![limit("100/minute")],
            vec!["APP".to_owned()],
        )
    }

    #[test]
    fn budgets_parse_with_their_window() {
        assert_eq!(
            BudgetLimit::parse("2000000/day"),
            Ok(BudgetLimit {
                tokens: 2_000_000,
                window: Window::Day
            })
        );
        assert_eq!(
            BudgetLimit::parse(" 50_000 / Minute ").map(|b| b.to_string()),
            Ok("50000/minute".to_owned())
        );
        for bad in ["2000000", "0/day", "-5/day", "10/week", "many/day", "1.5/h"] {
            assert!(BudgetLimit::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_used_up_budget_refuses_until_its_window_ends() {
        let budgets = budgets();
        // 20 s into a minute (and into a day).
        let now = 86_400 * 20_000 + 20;
        assert_eq!(budgets.check(0, Some("APP"), at(now)), Ok(()));
        assert!(budgets.charge(0, Some("APP"), 99, at(now)).is_empty());
        assert_eq!(budgets.check(0, Some("APP"), at(now)), Ok(()));
        // The stream that crosses the budget is charged whole; 30 beyond it.
        let over = budgets.charge(0, Some("APP"), 31, at(now + 1));
        assert_eq!(
            over,
            vec![Overshoot {
                account: Account::AccessToken("APP".to_owned()),
                tokens: 30
            }]
        );
        let refused = budgets
            .check(0, Some("APP"), at(now + 1))
            .expect_err("used up");
        assert_eq!(refused.budget, "access token APP: 100/minute");
        assert_eq!(refused.retry_after, Duration::from_secs(39));
        // Another token, and requests without one, only meet the route's budget.
        assert_eq!(budgets.check(0, Some("OTHER"), at(now + 1)), Ok(()));
        assert_eq!(budgets.check(0, None, at(now + 1)), Ok(()));
        // The next minute frees the token's budget; the day still counts 130.
        assert_eq!(budgets.check(0, Some("APP"), at(now + 40)), Ok(()));
        let report = budgets.report(at(now + 40));
        assert_eq!(report["budgets"][0]["spent"], 130);
        assert_eq!(report["budgets"][1]["spent"], 0);
    }

    #[test]
    fn the_state_survives_a_restart_within_its_window_only() {
        let budgets = budgets();
        let now = 86_400 * 20_000 + 20;
        budgets.charge(0, Some("APP"), 60, at(now));
        let state = budgets.state_if_changed().expect("changed");
        assert!(budgets.state_if_changed().is_none(), "written once");

        let restarted = self::budgets();
        assert_eq!(restarted.restore(&state, at(now + 5)), Ok(2));
        assert_eq!(restarted.report(at(now + 5))["budgets"][1]["spent"], 60);
        // A minute later only the day's count is still current.
        let later = self::budgets();
        assert_eq!(later.restore(&state, at(now + 60)), Ok(1));

        for corrupt in [
            "",
            "{",
            "{\"version\":1}",
            "{\"version\":9,\"accounts\":[]}",
        ] {
            assert!(
                self::budgets().restore(corrupt, at(now)).is_err(),
                "{corrupt}"
            );
        }
    }
}

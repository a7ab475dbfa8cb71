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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use super::redis_store::{RedisClient, Reply};

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

/// What keyrelay does when the shared store cannot be reached
/// (`usage_store_unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Serve the request unmetered (the default): the model stays usable.
    Allow,
    /// Refuse it (503): no spending that cannot be counted.
    Deny,
}

/// Why a request is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// One of its budgets is used up.
    Exhausted(Exhausted),
    /// The shared store is unreachable and the policy is to deny.
    StoreUnavailable,
}

/// Where the spent tokens are counted.
#[derive(Debug)]
enum Store {
    /// In this process (the default), optionally kept in `usage_state_file`.
    Local {
        spent: Mutex<HashMap<(Account, Window), Spent>>,
        /// Spending since the state file was last written.
        dirty: AtomicBool,
    },
    /// In Redis, shared by every replica.
    Shared {
        redis: RedisClient,
        policy: Unavailable,
        /// The store failed last time; logged once until it answers again.
        down: AtomicBool,
        /// Until when requests skip the store after a failure, so that an
        /// unreachable Redis costs one timeout per backoff, not per request.
        skip_until: Mutex<Option<Instant>>,
        errors: Counter,
    },
}

/// Every budget and what was spent against it.
#[derive(Debug)]
pub struct Budgets {
    /// Each route's budgets, by route index, with the account they are
    /// counted in (its name, or `default` for an inherited top-level budget).
    routes: Vec<(String, Vec<BudgetLimit>)>,
    /// The budgets each access token has, and the tokens' names.
    per_token: Vec<BudgetLimit>,
    token_names: Vec<String>,
    store: Store,
}

impl Budgets {
    /// Budgets for routes (name and budgets, by route index) and for each
    /// of the named access tokens, counted in this process.
    pub fn new(
        routes: Vec<(String, Vec<BudgetLimit>)>,
        per_token: Vec<BudgetLimit>,
        token_names: Vec<String>,
    ) -> Self {
        Self {
            routes,
            per_token,
            token_names,
            store: Store::Local {
                spent: Mutex::new(HashMap::new()),
                dirty: AtomicBool::new(false),
            },
        }
    }

    /// The budgets `config` sets: each route's, and each access token's,
    /// counted where `usage_store` says; `store_errors` counts the shared
    /// store's failures.
    pub fn from_config(config: &crate::Config, store_errors: Counter) -> Self {
        let mut budgets = Self::new(
            config
                .routes
                .iter()
                .map(|route| (route.budget_account.clone(), route.budgets.clone()))
                .collect(),
            config.access.token_budgets.clone(),
            config
                .access
                .tokens
                .iter()
                .map(|token| token.name().to_owned())
                .collect(),
        );
        if let Some(address) = &config.usage_store {
            budgets.store = Store::Shared {
                redis: RedisClient::new(address.clone()),
                policy: config.usage_store_unavailable,
                down: AtomicBool::new(false),
                skip_until: Mutex::new(None),
                errors: store_errors,
            };
        }
        budgets
    }

    /// True when no budget is configured: nothing to check or charge.
    pub fn is_empty(&self) -> bool {
        self.per_token.is_empty() && self.routes.iter().all(|(_, limits)| limits.is_empty())
    }

    /// The budgets a request on `route` with access token `token` spends against.
    fn applicable(&self, route: usize, token: Option<&str>) -> Vec<(Account, BudgetLimit)> {
        let route_budgets = self
            .routes
            .get(route)
            .into_iter()
            .flat_map(|(name, limits)| {
                limits
                    .iter()
                    .map(move |limit| (Account::Route(name.clone()), *limit))
            });
        let token_budgets = token.into_iter().flat_map(|token| {
            self.per_token
                .iter()
                .map(move |limit| (Account::AccessToken(token.to_owned()), *limit))
        });
        route_budgets.chain(token_budgets).collect()
    }

    /// Every configured budget, for `/usage`; routes that share an account
    /// (the top-level budget they inherit) show it once.
    fn all(&self) -> Vec<(Account, BudgetLimit)> {
        let mut seen = Vec::new();
        let routes = self
            .routes
            .iter()
            .filter(|(name, _)| {
                let first = !seen.contains(name);
                seen.push(name.clone());
                first
            })
            .flat_map(|(name, limits)| {
                limits
                    .iter()
                    .map(move |limit| (Account::Route(name.clone()), *limit))
            });
        let tokens = self.token_names.iter().flat_map(|name| {
            self.per_token
                .iter()
                .map(move |limit| (Account::AccessToken(name.clone()), *limit))
        });
        routes.chain(tokens).collect()
    }

    /// What `accounts` spent in their windows current at `now` (Unix
    /// seconds); `None` when the shared store could not be read.
    async fn spent(&self, accounts: &[(Account, BudgetLimit)], now: u64) -> Option<Vec<u64>> {
        match &self.store {
            Store::Local { spent, .. } => {
                let spent = lock(spent);
                Some(
                    accounts
                        .iter()
                        .map(|(account, limit)| {
                            spent_in(&spent, account, limit.window, limit.window.start(now))
                        })
                        .collect(),
                )
            }
            Store::Shared { redis, .. } => {
                if self.skipping_store() {
                    return None;
                }
                let mut mget = vec![b"MGET".to_vec()];
                mget.extend(
                    accounts
                        .iter()
                        .map(|(account, limit)| redis_key(account, *limit, now)),
                );
                let replies = redis.pipeline(&[mget]).await;
                let counts = match replies.as_deref() {
                    Ok([Reply::Array(values)]) if values.len() == accounts.len() => values
                        .iter()
                        .map(Reply::as_count)
                        .collect::<Option<Vec<u64>>>(),
                    _ => None,
                };
                self.store_answered(counts.is_some(), replies.err());
                counts
            }
        }
    }

    /// True if a request on `route` with access token `token` has a budget.
    pub fn applies_to(&self, route: usize, token: Option<&str>) -> bool {
        self.routes
            .get(route)
            .is_some_and(|(_, limits)| !limits.is_empty())
            || (token.is_some() && !self.per_token.is_empty())
    }

    /// Refuses the request if one of its budgets is used up at `now`.
    pub async fn check(
        &self,
        route: usize,
        token: Option<&str>,
        now: SystemTime,
    ) -> Result<(), Refused> {
        let accounts = self.applicable(route, token);
        if accounts.is_empty() {
            return Ok(());
        }
        let now = unix_seconds(now);
        let Some(spent) = self.spent(&accounts, now).await else {
            return match &self.store {
                Store::Shared {
                    policy: Unavailable::Deny,
                    ..
                } => Err(Refused::StoreUnavailable),
                _ => Ok(()),
            };
        };
        for ((account, limit), used) in accounts.iter().zip(spent) {
            if used >= limit.tokens {
                let start = limit.window.start(now);
                return Err(Refused::Exhausted(Exhausted {
                    budget: format!("{account}: {limit}"),
                    retry_after: Duration::from_secs(start + limit.window.seconds() - now),
                }));
            }
        }
        Ok(())
    }

    /// Charges `tokens` to every budget of the request, and hands
    /// `overshot` the tokens spent beyond each budget this crossed or had
    /// already used up. With the shared store the charge is sent from a
    /// task of its own, so the stream that ended never waits on Redis.
    pub fn charge(
        self: &Arc<Self>,
        route: usize,
        token: Option<&str>,
        tokens: u64,
        now: SystemTime,
        overshot: impl FnOnce(Vec<Overshoot>) + Send + 'static,
    ) {
        let accounts = self.applicable(route, token);
        if tokens == 0 || accounts.is_empty() {
            return;
        }
        let now = unix_seconds(now);
        match &self.store {
            Store::Local { spent, dirty } => {
                let mut spent = lock(spent);
                let mut overshoots = Vec::new();
                for (account, limit) in accounts {
                    let start = limit.window.start(now);
                    let entry = spent
                        .entry((account.clone(), limit.window))
                        .or_insert(Spent { start, tokens: 0 });
                    if entry.start != start {
                        *entry = Spent { start, tokens: 0 };
                    }
                    entry.tokens = entry.tokens.saturating_add(tokens);
                    overshoots.extend(overshoot(account, limit, entry.tokens, tokens));
                }
                dirty.store(true, Ordering::Relaxed);
                drop(spent);
                overshot(overshoots);
            }
            Store::Shared { .. } => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let budgets = Arc::clone(self);
                runtime.spawn(async move {
                    budgets.charge_shared(accounts, tokens, now, overshot).await
                });
            }
        }
    }

    async fn charge_shared(
        &self,
        accounts: Vec<(Account, BudgetLimit)>,
        tokens: u64,
        now: u64,
        overshot: impl FnOnce(Vec<Overshoot>),
    ) {
        let Store::Shared { redis, .. } = &self.store else {
            return;
        };
        if self.skipping_store() {
            // Lost, as the outage's log line and policy say.
            return;
        }
        // INCRBY takes a signed 64-bit amount.
        let amount = tokens.min(i64::MAX as u64).to_string().into_bytes();
        let commands: Vec<Vec<Vec<u8>>> = accounts
            .iter()
            .flat_map(|(account, limit)| {
                let key = redis_key(account, *limit, now);
                // Kept for a window past its own end, then Redis drops it.
                let expiry = (2 * limit.window.seconds()).to_string().into_bytes();
                [
                    vec![b"INCRBY".to_vec(), key.clone(), amount.clone()],
                    vec![b"EXPIRE".to_vec(), key, expiry],
                ]
            })
            .collect();
        let replies = redis.pipeline(&commands).await;
        let totals: Option<Vec<u64>> = replies
            .as_ref()
            .ok()
            .map(|replies| replies.iter().step_by(2).map(Reply::as_count).collect())
            .and_then(|totals: Option<Vec<u64>>| totals.filter(|t| t.len() == accounts.len()));
        self.store_answered(totals.is_some(), replies.err());
        let Some(totals) = totals else { return };
        let overshoots = accounts
            .into_iter()
            .zip(totals)
            .filter_map(|((account, limit), total)| overshoot(account, limit, total, tokens))
            .collect();
        overshot(overshoots);
    }

    /// Notes whether the shared store answered, logging a failure once and
    /// its recovery once, and counting every failure.
    fn store_answered(&self, answered: bool, error: Option<std::io::Error>) {
        let Store::Shared {
            down,
            errors,
            policy,
            skip_until,
            ..
        } = &self.store
        else {
            return;
        };
        *lock(skip_until) = (!answered).then(|| Instant::now() + STORE_BACKOFF);
        if answered {
            if down.swap(false, Ordering::Relaxed) {
                tracing::info!("usage_store: Redis answers again; budgets are enforced");
            }
            return;
        }
        errors.inc();
        if !down.swap(true, Ordering::Relaxed) {
            let reason =
                error.map_or_else(|| "an unexpected reply".to_owned(), |err| err.to_string());
            tracing::error!(
                error = %reason,
                policy = match policy {
                    Unavailable::Allow => "allow: requests are served unmetered",
                    Unavailable::Deny => "deny: requests with a budget get 503",
                },
                "usage_store: Redis is unavailable"
            );
        }
    }

    /// True while a failed shared store is being left alone; each request
    /// that skips it counts as a store error.
    fn skipping_store(&self) -> bool {
        let Store::Shared {
            skip_until, errors, ..
        } = &self.store
        else {
            return false;
        };
        let skipping = lock(skip_until).is_some_and(|until| Instant::now() < until);
        if skipping {
            errors.inc();
        }
        skipping
    }

    /// Every budget with what is spent in its current window, for `/usage`.
    pub async fn report(&self, now: SystemTime) -> serde_json::Value {
        let now = unix_seconds(now);
        let accounts = self.all();
        let spent = self.spent(&accounts, now).await;
        let budgets: Vec<_> = accounts
            .iter()
            .enumerate()
            .map(|(index, (account, limit))| {
                let start = limit.window.start(now);
                let used = spent.as_ref().map(|spent| spent[index]);
                let (scope, name) = match account {
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
                    "remaining": used.map(|used| limit.tokens.saturating_sub(used)),
                    "resets_in_seconds": start + limit.window.seconds() - now,
                })
            })
            .collect();
        let store = match self.store {
            Store::Local { .. } => "local",
            Store::Shared { .. } => "redis",
        };
        serde_json::json!({ "store": store, "budgets": budgets })
    }

    /// What is spent, as the state file holds it; `None` if nothing was
    /// spent since the last call (or the counts are in Redis).
    pub fn state_if_changed(&self) -> Option<String> {
        let Store::Local { dirty, .. } = &self.store else {
            return None;
        };
        if !dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        Some(self.state())
    }

    /// What is spent, as the state file holds it.
    pub fn state(&self) -> String {
        let accounts: Vec<StateEntry> = match &self.store {
            Store::Local { spent, .. } => lock(spent)
                .iter()
                .map(|((account, window), spent)| StateEntry {
                    account: account.clone(),
                    window: *window,
                    start: spent.start,
                    tokens: spent.tokens,
                })
                .collect(),
            Store::Shared { .. } => Vec::new(),
        };
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
        let Store::Local { spent, .. } = &self.store else {
            return Ok(0);
        };
        let now = unix_seconds(now);
        let mut spent = lock(spent);
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
}

/// The tokens beyond `limit` once an account's window reached `total`
/// with `charged` just added: all of them if the budget was already used
/// up, the part past it if this charge crossed it.
fn overshoot(account: Account, limit: BudgetLimit, total: u64, charged: u64) -> Option<Overshoot> {
    let before = total.saturating_sub(charged);
    let beyond = total.saturating_sub(before.max(limit.tokens));
    (beyond > 0).then_some(Overshoot {
        account,
        tokens: beyond,
    })
}

/// The Redis key of an account's window current at `now`.
fn redis_key(account: &Account, limit: BudgetLimit, now: u64) -> Vec<u8> {
    let (scope, name) = match account {
        Account::Route(name) => ("route", name),
        Account::AccessToken(name) => ("access_token", name),
    };
    format!(
        "keyrelay:budget:{scope}:{name}:{}:{}",
        limit.window.name(),
        limit.window.start(now)
    )
    .into_bytes()
}

/// How long requests leave a failed shared store alone before trying it again.
const STORE_BACKOFF: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves only counts behind.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    /// Charges synchronously (the local store calls back at once).
    fn charge(
        budgets: &Arc<Budgets>,
        token: Option<&str>,
        tokens: u64,
        now: u64,
    ) -> Vec<Overshoot> {
        let seen = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&seen);
        budgets.charge(0, token, tokens, at(now), move |over| {
            *sink.lock().expect("lock") = Some(over);
        });
        let over = seen.lock().expect("lock").take();
        over.expect("the local store charges at once")
    }

    #[tokio::test]
    async fn a_used_up_budget_refuses_until_its_window_ends() {
        let budgets = Arc::new(budgets());
        // 20 s into a minute (and into a day).
        let now = 86_400 * 20_000 + 20;
        assert_eq!(budgets.check(0, Some("APP"), at(now)).await, Ok(()));
        assert!(charge(&budgets, Some("APP"), 99, now).is_empty());
        assert_eq!(budgets.check(0, Some("APP"), at(now)).await, Ok(()));
        // The stream that crosses the budget is charged whole; 30 beyond it.
        assert_eq!(
            charge(&budgets, Some("APP"), 31, now + 1),
            vec![Overshoot {
                account: Account::AccessToken("APP".to_owned()),
                tokens: 30
            }]
        );
        let Err(Refused::Exhausted(refused)) = budgets.check(0, Some("APP"), at(now + 1)).await
        else {
            panic!("the token's budget is used up");
        };
        assert_eq!(refused.budget, "access token APP: 100/minute");
        assert_eq!(refused.retry_after, Duration::from_secs(39));
        // Another token, and requests without one, only meet the route's budget.
        assert_eq!(budgets.check(0, Some("OTHER"), at(now + 1)).await, Ok(()));
        assert_eq!(budgets.check(0, None, at(now + 1)).await, Ok(()));
        // The next minute frees the token's budget; the day still counts 130.
        assert_eq!(budgets.check(0, Some("APP"), at(now + 40)).await, Ok(()));
        let report = budgets.report(at(now + 40)).await;
        assert_eq!(report["budgets"][0]["spent"], 130);
        assert_eq!(report["budgets"][1]["spent"], 0);
    }

    #[test]
    fn overshoot_is_what_lies_beyond_the_budget() {
        let limit = BudgetLimit::parse("100/day").expect("budget");
        let account = || Account::Route("r".to_owned());
        let beyond = |total, charged| overshoot(account(), limit, total, charged).map(|o| o.tokens);
        assert_eq!(beyond(99, 99), None);
        assert_eq!(beyond(100, 1), None);
        assert_eq!(beyond(130, 31), Some(30));
        assert_eq!(beyond(150, 20), Some(20), "already used up: all of it");
    }

    #[tokio::test]
    async fn the_state_survives_a_restart_within_its_window_only() {
        let budgets = Arc::new(budgets());
        let now = 86_400 * 20_000 + 20;
        charge(&budgets, Some("APP"), 60, now);
        let state = budgets.state_if_changed().expect("changed");
        assert!(budgets.state_if_changed().is_none(), "written once");

        let restarted = self::budgets();
        assert_eq!(restarted.restore(&state, at(now + 5)), Ok(2));
        assert_eq!(
            restarted.report(at(now + 5)).await["budgets"][1]["spent"],
            60
        );
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

//! Token budgets: how many LLM tokens a route, or each local access token,
//! may spend per minute, hour or day.
//!
//! A request reserves what it may spend before it is sent
//! ([`Budgets::reserve`]): each budget holds the estimate, or what it has
//! left if that is less, and one with nothing left (reservations of
//! requests in flight included) refuses it (429, `Retry-After`) before
//! anything goes upstream. When the request ends its [`Reservation`] is
//! replaced by what it spent (prompt + completion tokens, as the
//! [tap](super::tap) read them, or a lower bound from what passed); a
//! stream that crosses its budget was admitted and is finished, and the
//! tokens beyond the budget are reported as overshoot.
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
pub use crate::telemetry::tokens::{Account, Overshoot};

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

/// A budget that is used up: which, and how long until its window ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// The budget, e.g. `access token CHAT_APP: 50000/minute`.
    pub budget: String,
    /// Until the window frees up.
    pub retry_after: Duration,
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

/// What a request is expected to spend, reserved before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    /// Its prompt, estimated from its body's length.
    pub prompt: u64,
    /// The most output it asked for (times its choices), or the route's
    /// `budget_reserve` when it named none.
    pub output: u64,
}

impl Estimate {
    fn total(self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

/// What one budget holds for a request in flight.
#[derive(Debug)]
struct Held {
    account: Account,
    limit: BudgetLimit,
    /// The window it is held in.
    start: u64,
    amount: u64,
}

/// Tokens held in a request's budgets until it ends. Dropping it without
/// [`Reservation::settle`] (a request that never reached the upstream)
/// gives everything back.
#[derive(Debug)]
pub struct Reservation {
    budgets: Arc<Budgets>,
    held: Vec<Held>,
    /// When it was made: a reservation dropped unsettled is given back to
    /// the windows it was taken from.
    made: SystemTime,
    /// The prompt estimate, for a charge when no usage could be read.
    pub prompt_estimate: u64,
}

impl Reservation {
    /// Replaces the reservation with `spent` tokens (see [`Budgets::settle`]).
    pub fn settle(
        mut self,
        spent: u64,
        now: SystemTime,
        overshot: impl FnOnce(Vec<Overshoot>) + Send + 'static,
    ) {
        let held = std::mem::take(&mut self.held);
        self.budgets.settle(held, spent, now, overshot);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            self.budgets.settle(held, 0, self.made, |_overshoots| {});
        }
    }
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

    /// Reserves `estimate` tokens of every budget of a request on `route`
    /// with access token `token`, before it is sent; `Ok(None)` when no
    /// budget applies. A budget with room left holds the estimate, or all
    /// of what it has left if that is less; a budget that is used up
    /// (reservations of requests in flight included) refuses the request.
    /// Locally this is one short lock; with the shared store one `EVAL`
    /// that checks and holds every budget atomically.
    pub async fn reserve(
        self: &Arc<Self>,
        route: usize,
        token: Option<&str>,
        estimate: Estimate,
        now: SystemTime,
    ) -> Result<Option<Reservation>, Refused> {
        let accounts = self.applicable(route, token);
        if accounts.is_empty() {
            return Ok(None);
        }
        let made = now;
        let now = unix_seconds(now);
        let wanted = estimate.total().max(1);
        let held = match &self.store {
            Store::Local { spent, dirty } => {
                let mut spent = lock(spent);
                for (account, limit) in &accounts {
                    let start = limit.window.start(now);
                    if spent_in(&spent, account, limit.window, start) >= limit.tokens {
                        return Err(exhausted(account, *limit, now));
                    }
                }
                let held = accounts
                    .into_iter()
                    .map(|(account, limit)| {
                        let start = limit.window.start(now);
                        let entry = window_entry(&mut spent, &account, limit.window, start);
                        let amount = wanted.min(limit.tokens.saturating_sub(entry.tokens));
                        entry.tokens += amount;
                        Held {
                            account,
                            limit,
                            start,
                            amount,
                        }
                    })
                    .collect();
                dirty.store(true, Ordering::Relaxed);
                held
            }
            Store::Shared { policy, .. } => match self.reserve_shared(&accounts, wanted, now).await
            {
                Some(Ok(held)) => held,
                Some(Err(refused)) => return Err(refused),
                None if *policy == Unavailable::Deny => return Err(Refused::StoreUnavailable),
                // Unmetered: nothing held, the usage is still charged if
                // the store answers by then.
                None => accounts
                    .into_iter()
                    .map(|(account, limit)| Held {
                        account,
                        limit,
                        start: limit.window.start(now),
                        amount: 0,
                    })
                    .collect(),
            },
        };
        Ok(Some(Reservation {
            budgets: Arc::clone(self),
            held,
            made,
            prompt_estimate: estimate.prompt,
        }))
    }

    /// The shared store's half of [`Budgets::reserve`]: `None` when it
    /// could not be asked.
    async fn reserve_shared(
        &self,
        accounts: &[(Account, BudgetLimit)],
        wanted: u64,
        now: u64,
    ) -> Option<Result<Vec<Held>, Refused>> {
        let Store::Shared { redis, .. } = &self.store else {
            return None;
        };
        if self.skipping_store() {
            return None;
        }
        let mut eval = vec![
            b"EVAL".to_vec(),
            RESERVE_SCRIPT.as_bytes().to_vec(),
            accounts.len().to_string().into_bytes(),
        ];
        eval.extend(
            accounts
                .iter()
                .map(|(account, limit)| redis_key(account, *limit, now)),
        );
        eval.push(wanted.min(MAX_INCR).to_string().into_bytes());
        for (_, limit) in accounts {
            eval.push(limit.tokens.min(MAX_INCR).to_string().into_bytes());
        }
        for (_, limit) in accounts {
            eval.push((2 * limit.window.seconds()).to_string().into_bytes());
        }
        let replies = redis.pipeline(&[eval]).await;
        let reply = match replies.as_deref() {
            Ok([Reply::Array(values)]) => values
                .iter()
                .map(|value| match value {
                    Reply::Integer(n) => Some(*n),
                    _ => None,
                })
                .collect::<Option<Vec<i64>>>(),
            _ => None,
        };
        let outcome = match reply.as_deref() {
            Some([1, amounts @ ..]) if amounts.len() == accounts.len() => Some(Ok(accounts
                .iter()
                .zip(amounts)
                .map(|((account, limit), amount)| Held {
                    account: account.clone(),
                    limit: *limit,
                    start: limit.window.start(now),
                    amount: u64::try_from(*amount).unwrap_or(0),
                })
                .collect())),
            Some([0, index]) => usize::try_from(*index - 1)
                .ok()
                .and_then(|index| accounts.get(index))
                .map(|(account, limit)| Err(exhausted(account, *limit, now))),
            _ => None,
        };
        self.store_answered(outcome.is_some(), replies.err());
        outcome
    }

    /// Replaces what `reservation` held with `spent`, the tokens the
    /// request really spent, and hands `overshot` the tokens beyond each
    /// budget this took past its limit. A window that ended in between
    /// gets nothing back; the new window is charged `spent`. With the
    /// shared store the difference is sent from a task of its own, so the
    /// stream that ended never waits on Redis.
    fn settle(
        self: &Arc<Self>,
        held: Vec<Held>,
        spent: u64,
        now: SystemTime,
        overshot: impl FnOnce(Vec<Overshoot>) + Send + 'static,
    ) {
        let now = unix_seconds(now);
        match &self.store {
            Store::Local {
                spent: counts,
                dirty,
            } => {
                let mut counts = lock(counts);
                let mut overshoots = Vec::new();
                for held in held {
                    let start = held.limit.window.start(now);
                    let entry = window_entry(&mut counts, &held.account, held.limit.window, start);
                    let charged = if held.start == start {
                        entry.tokens = entry.tokens.saturating_sub(held.amount);
                        entry.tokens = entry.tokens.saturating_add(spent);
                        spent.saturating_sub(held.amount)
                    } else {
                        entry.tokens = entry.tokens.saturating_add(spent);
                        spent
                    };
                    overshoots.extend(overshoot(held.account, held.limit, entry.tokens, charged));
                }
                dirty.store(true, Ordering::Relaxed);
                drop(counts);
                overshot(overshoots);
            }
            Store::Shared { .. } => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let budgets = Arc::clone(self);
                runtime
                    .spawn(async move { budgets.settle_shared(held, spent, now, overshot).await });
            }
        }
    }

    async fn settle_shared(
        &self,
        held: Vec<Held>,
        spent: u64,
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
        let spent = spent.min(MAX_INCR);
        // (what this adds to the window, as INCRBY's signed amount)
        let changes: Vec<(i64, Vec<u8>, u64)> = held
            .iter()
            .map(|held| {
                let start = held.limit.window.start(now);
                let key = redis_key(&held.account, held.limit, now);
                if held.start == start {
                    (
                        spent as i64 - held.amount.min(MAX_INCR) as i64,
                        key,
                        held.limit.window.seconds(),
                    )
                } else {
                    (spent as i64, key, held.limit.window.seconds())
                }
            })
            .collect();
        if changes.iter().all(|(change, _, _)| *change == 0) {
            return;
        }
        let commands: Vec<Vec<Vec<u8>>> = changes
            .iter()
            .flat_map(|(change, key, seconds)| {
                // Kept for a window past its own end, then Redis drops it.
                let expiry = (2 * seconds).to_string().into_bytes();
                [
                    vec![
                        b"INCRBY".to_vec(),
                        key.clone(),
                        change.to_string().into_bytes(),
                    ],
                    vec![b"EXPIRE".to_vec(), key.clone(), expiry],
                ]
            })
            .collect();
        let replies = redis.pipeline(&commands).await;
        let totals: Option<Vec<u64>> = replies
            .as_ref()
            .ok()
            .map(|replies| {
                replies
                    .iter()
                    .step_by(2)
                    .map(|reply| match reply {
                        // A key that expired in between may go below 0.
                        Reply::Integer(n) => Some(u64::try_from(*n).unwrap_or(0)),
                        _ => None,
                    })
                    .collect()
            })
            .and_then(|totals: Option<Vec<u64>>| totals.filter(|t| t.len() == held.len()));
        self.store_answered(totals.is_some(), replies.err());
        let Some(totals) = totals else { return };
        let overshoots = held
            .into_iter()
            .zip(totals)
            .zip(changes)
            .filter_map(|((held, total), (change, _, _))| {
                overshoot(
                    held.account,
                    held.limit,
                    total,
                    u64::try_from(change).unwrap_or(0),
                )
            })
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

/// The refusal for a used-up budget: which, and until when.
fn exhausted(account: &Account, limit: BudgetLimit, now: u64) -> Refused {
    let start = limit.window.start(now);
    Refused::Exhausted(Exhausted {
        budget: format!("{account}: {limit}"),
        retry_after: Duration::from_secs(start + limit.window.seconds() - now),
    })
}

/// An account's count for the window starting at `start`, reset if it
/// still holds an older window's.
fn window_entry<'a>(
    spent: &'a mut HashMap<(Account, Window), Spent>,
    account: &Account,
    window: Window,
    start: u64,
) -> &'a mut Spent {
    let entry = spent
        .entry((account.clone(), window))
        .or_insert(Spent { start, tokens: 0 });
    if entry.start != start {
        *entry = Spent { start, tokens: 0 };
    }
    entry
}

/// The largest amount sent to Redis (INCRBY takes a signed 64-bit amount;
/// Lua counts in doubles, exact to 2^53).
const MAX_INCR: u64 = 1 << 52;

/// Checks every budget key (KEYS) against its limit (ARGV[1 + i]) and, if
/// none is used up, holds min(ARGV[1], what is left) in each, setting its
/// expiry (ARGV[1 + n + i]); answers {1, held...} or {0, index used up}.
/// One round trip, atomic: concurrent requests cannot both take the last
/// tokens.
const RESERVE_SCRIPT: &str = r"
local n = #KEYS
local wanted = tonumber(ARGV[1])
local held = {}
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[1 + i])
  if used >= limit then return {0, i} end
  held[i] = math.min(wanted, limit - used)
end
local answer = {1}
for i = 1, n do
  redis.call('INCRBY', KEYS[i], held[i])
  redis.call('EXPIRE', KEYS[i], ARGV[1 + n + i])
  answer[i + 1] = held[i]
end
return answer
";

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
        assert!(BudgetLimit::parse("1_000_000_000_000/day").is_ok());
        for bad in [
            "2000000",
            "0/day",
            "-5/day",
            "10/week",
            "many/day",
            "1.5/h",
            "1_000_000_000_001/day",
            "100000000000000/day",
        ] {
            assert!(BudgetLimit::parse(bad).is_err(), "{bad}");
        }
    }

    fn estimate(output: u64) -> Estimate {
        Estimate { prompt: 0, output }
    }

    /// Reserves `reserve`, then settles `spent` (the local store calls back
    /// at once).
    async fn spend(
        budgets: &Arc<Budgets>,
        token: Option<&str>,
        reserve: u64,
        spent: u64,
        now: u64,
    ) -> Vec<Overshoot> {
        let reservation = budgets
            .reserve(0, token, estimate(reserve), at(now))
            .await
            .expect("admitted")
            .expect("budgeted");
        let seen = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&seen);
        reservation.settle(spent, at(now), move |over| {
            *sink.lock().expect("lock") = Some(over);
        });
        let over = seen.lock().expect("lock").take();
        over.expect("the local store settles at once")
    }

    async fn admits(budgets: &Arc<Budgets>, token: Option<&str>, now: u64) -> bool {
        budgets
            .reserve(0, token, estimate(1), at(now))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_used_up_budget_refuses_until_its_window_ends() {
        let budgets = Arc::new(budgets());
        // 20 s into a minute (and into a day).
        let now = 86_400 * 20_000 + 20;
        assert!(admits(&budgets, Some("APP"), now).await);
        assert!(spend(&budgets, Some("APP"), 50, 99, now).await.is_empty());
        assert!(admits(&budgets, Some("APP"), now).await);
        // The stream that crosses the budget is charged whole; 30 beyond it.
        assert_eq!(
            spend(&budgets, Some("APP"), 1, 31, now + 1).await,
            vec![Overshoot {
                account: Account::AccessToken("APP".to_owned()),
                tokens: 30
            }]
        );
        let Err(Refused::Exhausted(refused)) = budgets
            .reserve(0, Some("APP"), estimate(1), at(now + 1))
            .await
        else {
            panic!("the token's budget is used up");
        };
        assert_eq!(refused.budget, "access token APP: 100/minute");
        assert_eq!(refused.retry_after, Duration::from_secs(39));
        // Another token, and requests without one, only meet the route's budget.
        assert!(admits(&budgets, Some("OTHER"), now + 1).await);
        assert!(admits(&budgets, None, now + 1).await);
        // The next minute frees the token's budget; the day still counts 130.
        assert!(admits(&budgets, Some("APP"), now + 40).await);
        let report = budgets.report(at(now + 40)).await;
        assert_eq!(report["budgets"][0]["spent"], 130);
        assert_eq!(report["budgets"][1]["spent"], 0);
    }

    #[tokio::test]
    async fn reservations_in_flight_count_and_what_is_dropped_is_given_back() {
        let budgets = Arc::new(budgets());
        let now = 86_400 * 20_000 + 20;
        let reserve = |output| budgets.reserve(0, Some("APP"), estimate(output), at(now));
        // 60 + the 40 left of 100/minute: the third finds nothing left.
        let first = reserve(60).await.expect("fits").expect("held");
        let second = reserve(60).await.expect("the rest").expect("held");
        assert!(matches!(reserve(1).await, Err(Refused::Exhausted(_))));
        // A request that never reached the upstream gives its share back.
        drop(second);
        let third = reserve(10).await.expect("room again").expect("held");
        first.settle(5, at(now), |_| {});
        third.settle(5, at(now), |_| {});
        assert_eq!(budgets.report(at(now)).await["budgets"][1]["spent"], 10);
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
        spend(&budgets, Some("APP"), 60, 60, now).await;
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

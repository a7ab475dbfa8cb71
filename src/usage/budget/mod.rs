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

mod limits;
mod local;
mod shared;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;

use super::redis_store::RedisClient;
pub use crate::telemetry::tokens::{Account, Overshoot};
pub use limits::{BudgetLimit, Window, MAX_BUDGET_TOKENS};

/// A budget that is used up: which, and how long until its window ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// The budget, e.g. `access token CHAT_APP: 50000/minute`.
    pub budget: String,
    /// Until the window frees up.
    pub retry_after: Duration,
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
        spent: Mutex<local::Counts>,
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
                spent: Mutex::new(local::Counts::new()),
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
            Store::Local { spent, .. } => Some(local::spent(spent, accounts, now)),
            Store::Shared { redis, .. } => self.spent_shared(redis, accounts, now).await,
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
            Store::Local { spent, dirty } => local::reserve(spent, dirty, accounts, wanted, now)?,
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
            } => overshot(local::settle(counts, dirty, held, spent, now)),
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
}

/// The refusal for a used-up budget: which, and until when.
fn exhausted(account: &Account, limit: BudgetLimit, now: u64) -> Refused {
    let start = limit.window.start(now);
    Refused::Exhausted(Exhausted {
        budget: format!("{account}: {limit}"),
        retry_after: Duration::from_secs(start + limit.window.seconds() - now),
    })
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves only counts behind.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

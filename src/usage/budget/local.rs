//! The local store: spent tokens counted in this process, and the state
//! file's form of them (`usage_state_file`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{exhausted, lock, overshoot, unix_seconds, Store};
use super::{Account, BudgetLimit, Budgets, Held, Overshoot, Refused, Window};

/// Every account's count, by account and window.
pub(super) type Counts = HashMap<(Account, Window), Spent>;

/// Tokens spent in one account's current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Spent {
    /// The window's start, Unix seconds.
    start: u64,
    tokens: u64,
}

/// What `accounts` spent in their windows current at `now` (Unix seconds).
pub(super) fn spent(
    counts: &Mutex<Counts>,
    accounts: &[(Account, BudgetLimit)],
    now: u64,
) -> Vec<u64> {
    let spent = lock(counts);
    accounts
        .iter()
        .map(|(account, limit)| spent_in(&spent, account, limit.window, limit.window.start(now)))
        .collect()
}

/// The local store's half of [`Budgets::reserve`]: one short lock.
pub(super) fn reserve(
    counts: &Mutex<Counts>,
    dirty: &AtomicBool,
    accounts: Vec<(Account, BudgetLimit)>,
    wanted: u64,
    now: u64,
) -> Result<Vec<Held>, Refused> {
    let mut spent = lock(counts);
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
    Ok(held)
}

/// The local store's half of [`Budgets::settle`]: the overshoots, handed
/// on once the lock is released.
pub(super) fn settle(
    counts: &Mutex<Counts>,
    dirty: &AtomicBool,
    held: Vec<Held>,
    spent: u64,
    now: u64,
) -> Vec<Overshoot> {
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
    overshoots
}

impl Budgets {
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

/// An account's count for the window starting at `start`, reset if it
/// still holds an older window's.
fn window_entry<'a>(
    spent: &'a mut Counts,
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
fn spent_in(spent: &Counts, account: &Account, window: Window, start: u64) -> u64 {
    spent
        .get(&(account.clone(), window))
        .filter(|spent| spent.start == start)
        .map_or(0, |spent| spent.tokens)
}

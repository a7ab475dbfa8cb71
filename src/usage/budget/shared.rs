//! The shared store: spent tokens counted in Redis (`usage_store`), shared
//! by every replica, and what happens while it cannot be reached.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{exhausted, lock, overshoot, Store};
use super::{Account, BudgetLimit, Budgets, Held, Overshoot, Refused, Unavailable};
use crate::usage::redis_store::{RedisClient, Reply};

impl Budgets {
    /// The shared store's half of [`Budgets::spent`]: `None` when it could
    /// not be read.
    pub(super) async fn spent_shared(
        &self,
        redis: &RedisClient,
        accounts: &[(Account, BudgetLimit)],
        now: u64,
    ) -> Option<Vec<u64>> {
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

    /// The shared store's half of [`Budgets::reserve`]: `None` when it
    /// could not be asked.
    pub(super) async fn reserve_shared(
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

    pub(super) async fn settle_shared(
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
    pub(super) fn store_answered(&self, answered: bool, error: Option<std::io::Error>) {
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
    pub(super) fn skipping_store(&self) -> bool {
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

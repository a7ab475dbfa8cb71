//! Token usage: the tap that reads it off responses, and where budgets'
//! spending is kept. Each is refused when nothing would use it.

use std::path::PathBuf;

use super::{Problems, Reported};
use crate::config::{routes, RawConfig};
use crate::usage::budget::Unavailable;
use crate::usage::redis_store::RedisAddress;

/// The usage settings.
pub(super) struct Usage {
    pub(super) tap: bool,
    pub(super) state_file: Option<PathBuf>,
    pub(super) store: Option<RedisAddress>,
    pub(super) store_unavailable: Unavailable,
}

/// `usage_tap`, `usage_state_file`, `usage_store`,
/// `usage_store_unavailable`, and the budgets and `add_stream_usage` that
/// need the tap.
pub(super) fn check(raw: &RawConfig, found: &mut Problems) -> Result<Usage, Reported> {
    let budgeted = !raw.access_token_budget.is_empty()
        || !raw.token_budget.is_empty()
        || raw.routes.iter().any(routes::RawRoute::has_budget);
    let tap = tap(raw, budgeted, found);
    let state_file = raw
        .usage_state_file
        .as_deref()
        .map(str::trim)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from);
    if state_file.is_some() && !budgeted {
        found.report(
            "usage_state_file",
            "is set but no token budget is (token_budget, access_token_budget), so there is nothing to keep",
        );
    }
    let store = store(raw, budgeted, state_file.is_some(), found);
    let store_unavailable = match raw.usage_store_unavailable.trim() {
        "allow" => Ok(Unavailable::Allow),
        "deny" => Ok(Unavailable::Deny),
        other => {
            found.report(
                "usage_store_unavailable",
                format!("{other:?} is not one of: allow, deny"),
            );
            Err(Reported)
        }
    };
    Ok(Usage {
        tap: tap?,
        state_file,
        store: store?,
        store_unavailable: store_unavailable?,
    })
}

/// `usage_tap`, which budgets and `add_stream_usage` need on.
fn tap(raw: &RawConfig, budgeted: bool, found: &mut Problems) -> Result<bool, Reported> {
    let tap = match raw.usage_tap.trim() {
        "on" => true,
        "off" => false,
        other => {
            found.report("usage_tap", format!("{other:?} is not one of: on, off"));
            return Err(Reported);
        }
    };
    if !tap && budgeted {
        found.report(
            "usage_tap",
            "is off, but token budgets are set: nothing would be charged to them; turn the tap on or remove the budgets",
        );
    }
    let adds_usage =
        raw.add_stream_usage.on() || raw.routes.iter().any(routes::RawRoute::adds_stream_usage);
    if !tap && adds_usage {
        found.report(
            "add_stream_usage",
            "asks streams for usage that nothing would read: usage_tap is off",
        );
    }
    Ok(tap)
}

/// `usage_store`: `local` (`None`) or a Redis, which only budgets use and
/// which makes `usage_state_file` pointless.
fn store(
    raw: &RawConfig,
    budgeted: bool,
    state_file: bool,
    found: &mut Problems,
) -> Result<Option<RedisAddress>, Reported> {
    let redis = match raw.usage_store.trim() {
        "" | "local" => return Ok(None),
        url => RedisAddress::parse(url).map_err(|message| found.refuse("usage_store", message))?,
    };
    if !budgeted {
        found.report(
            "usage_store",
            "names Redis but no token budget is set (token_budget, access_token_budget), so nothing would be stored",
        );
    }
    if state_file {
        found.report(
            "usage_state_file",
            "is for the local usage_store; with Redis the counts already outlive a restart",
        );
    }
    Ok(Some(redis))
}

//! A route's request rules: what a budgeted request reserves, what happens
//! to one keyrelay cannot read, and the request caps. Inherited like the
//! rest of the route policy ([`super::policy`]); checked here.

use super::policy::{Policy, Source};
use super::Scope;
use crate::config::check::Problems;
use crate::usage::inspect::{OverCap, RequestCaps, Unparsed};

/// How a route reads requests: budget reservations and request caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRules {
    /// Output tokens a budgeted request reserves when it names no limit.
    pub budget_reserve: u64,
    /// What happens to a budgeted request keyrelay cannot read.
    pub unparsed_budget_requests: Unparsed,
    /// `max_output_tokens`, `over_max_output_tokens`, `allowed_models`.
    pub caps: RequestCaps,
}

impl RequestRules {
    /// Validates the request rules in `policy`; `None` if one is wrong.
    /// Only the values the route sets itself are reported: an inherited
    /// one was checked (and reported) at the top level, where it is written.
    pub(super) fn check(policy: &Policy, scope: &Scope, found: &mut Problems) -> Option<Self> {
        let mut valid = true;
        let mut wrong = |from: Source, setting: &str, message: String| {
            if from == Source::Own {
                found.report(&scope.setting(setting), message);
            }
            valid = false;
        };
        let unparsed = &policy.unparsed_budget_requests;
        let unparsed_budget_requests = Unparsed::parse(&unparsed.value);
        if unparsed_budget_requests.is_none() {
            let text = &unparsed.value;
            let message = format!("{text:?} is not one of: forward, refuse");
            wrong(unparsed.from, "unparsed_budget_requests", message);
        }
        let over = &policy.over_max_output_tokens;
        let over_max_output_tokens = OverCap::parse(&over.value);
        if over_max_output_tokens.is_none() {
            let text = &over.value;
            let message = format!("{text:?} is not one of: refuse, clamp");
            wrong(over.from, "over_max_output_tokens", message);
        }
        let max = &policy.max_output_tokens;
        if max.value == Ok(Some(0)) {
            let message = "0 would refuse every request; leave it unset (off) for no cap";
            wrong(max.from, "max_output_tokens", message.to_owned());
        }
        let models = &policy.allowed_models;
        let allowed_models: Vec<String> = models
            .value
            .iter()
            .map(|model| model.trim().to_owned())
            .collect();
        if allowed_models.iter().any(String::is_empty) {
            let message = "an empty model name would match no request; remove it";
            wrong(models.from, "allowed_models", message.to_owned());
        }
        let reserve = &policy.budget_reserve;
        // "off" at the top level reserves nothing, like 0.
        if matches!(reserve.value, Ok(None | Some(0))) {
            let message =
                "must be at least 1: a request that reserves nothing is not held to its budget";
            wrong(reserve.from, "budget_reserve", message.to_owned());
        }
        let (Some(unparsed_budget_requests), Some(over_max_output_tokens)) =
            (unparsed_budget_requests, over_max_output_tokens)
        else {
            return None;
        };
        let (Ok(Some(budget_reserve)), Ok(max_output_tokens)) = (reserve.value, max.value) else {
            return None;
        };
        valid.then_some(Self {
            budget_reserve,
            unparsed_budget_requests,
            caps: RequestCaps {
                max_output_tokens,
                over_max_output_tokens,
                allowed_models,
            },
        })
    }
}

//! A route's retry policy: which upstream answers a request is tried again
//! for, how often, how long to wait, and which routes it may fail over to.
//! Inherited like the rest of the route policy ([`super::policy`]); checked
//! here. What the policy guarantees at run time (never after a response
//! byte reached the client) is `proxy/retry/`'s.

use std::time::Duration;

use http::Method;

use super::policy::{Inherit, Number, Policy, Source};
use super::Scope;
use crate::config::check::Problems;
use crate::config::parse::{parse_duration, parse_size};

/// The most extra attempts a route may ask for: enough for a list of
/// fallbacks, few enough that a request cannot multiply into a flood.
const MAX_RETRY_ATTEMPTS: u64 = 10;

/// The statuses `retry_on` may name: 429 and the 5xx a server answers when
/// it is overloaded or between replicas. Other 4xx are the request's fault
/// and would fail again.
const RETRYABLE_STATUSES: std::ops::RangeInclusive<u16> = 500..=599;

/// How a route retries; [`RetryPolicy::is_off`] when `retry_on` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Statuses that are tried again (before any body byte was relayed).
    pub statuses: Vec<u16>,
    /// Connection failures (refused, DNS, TLS, connect timeout) are tried
    /// again, for every method: the request never left keyrelay.
    pub connect: bool,
    /// Most extra attempts per request.
    pub attempts: u32,
    /// Methods tried again for a status.
    pub methods: Vec<Method>,
    /// Most retries as a percentage of the route's requests (10 s window).
    pub budget_percent: u32,
    /// Longest wait before an attempt.
    pub max_wait: Duration,
    /// Largest declared request body that is kept to send again.
    pub buffer: u64,
    /// Consecutive failed attempts before the route is skipped.
    pub eject_after: u32,
    /// How long a skipped route stays skipped before a probe.
    pub eject_for: Duration,
    /// Routes (by name) tried after this one, in order.
    pub fallback: Vec<String>,
}

impl RetryPolicy {
    /// True when nothing is retried.
    pub fn is_off(&self) -> bool {
        self.statuses.is_empty() && !self.connect
    }

    /// True when a `status` answer is tried again for `method`.
    pub fn retries_status(&self, method: &Method, status: u16) -> bool {
        self.statuses.contains(&status) && self.methods.contains(method)
    }

    /// Validates the retry settings in `policy` and the route's own
    /// `fallback` list (names are resolved once every route is known).
    /// Only the values the route sets itself are reported: an inherited one
    /// was checked at the top level, where it is written.
    pub(super) fn check(
        policy: &Policy,
        fallback: Option<&Vec<String>>,
        scope: &Scope,
        found: &mut Problems,
    ) -> Option<Self> {
        let mut valid = true;
        let mut wrong = |from: Source, setting: &str, message: String| {
            if from == Source::Own {
                found.report(&scope.setting(setting), message);
            }
            valid = false;
        };
        let (statuses, connect) = retry_on(&policy.retry_on, &mut wrong);
        let methods = methods(&policy.retry_methods, &mut wrong);
        let attempts = count(&policy.retry_attempts, "retry_attempts", &mut wrong);
        let eject_after = count(&policy.eject_after, "eject_after", &mut wrong);
        let budget_percent = percent(&policy.retry_budget, &mut wrong);
        let max_wait = duration(&policy.retry_max_wait, "retry_max_wait", &mut wrong);
        let eject_for = duration(&policy.eject_for, "eject_for", &mut wrong);
        let buffer = match parse_size(&policy.retry_buffer.value) {
            Ok(size) => size.unwrap_or(0),
            Err(message) => {
                wrong(policy.retry_buffer.from, "retry_buffer", message);
                0
            }
        };
        let fallback: Vec<String> = fallback
            .map(|names| names.iter().map(|name| name.trim().to_owned()).collect())
            .unwrap_or_default();
        if fallback.iter().any(String::is_empty) {
            let message = "an empty route name would match no route; remove it";
            wrong(Source::Own, "fallback", message.to_owned());
        }
        let off = statuses.is_empty() && !connect;
        if off {
            no_effect(policy, !fallback.is_empty(), &mut wrong);
        } else if statuses.is_empty() {
            // `connect` alone: retried for every method, whatever they say.
            if policy.retry_methods.from == Source::Own && !policy.is_default("retry_methods") {
                let message = "has no effect: retry_on names only connect, which is \
                               retried for every method";
                wrong(Source::Own, "retry_methods", message.to_owned());
            }
        } else if methods.is_empty() && policy.retry_methods.from == Source::Own {
            let message = "is empty, so the retry_on statuses are retried for no request; \
                           name the methods (POST for model APIs)";
            wrong(Source::Own, "retry_methods", message.to_owned());
        }
        let policy = Self {
            statuses,
            connect,
            attempts: attempts? as u32,
            methods,
            budget_percent: budget_percent?,
            max_wait: max_wait?,
            buffer,
            eject_after: eject_after? as u32,
            eject_for: eject_for?,
            fallback,
        };
        valid.then_some(policy)
    }
}

/// `retry_on`: statuses and `connect`.
fn retry_on(
    setting: &Inherit<Vec<String>>,
    wrong: &mut impl FnMut(Source, &str, String),
) -> (Vec<u16>, bool) {
    let mut statuses = Vec::new();
    let mut connect = false;
    for entry in &setting.value {
        let entry = entry.trim();
        if entry.eq_ignore_ascii_case("connect") {
            connect = true;
            continue;
        }
        match entry.parse::<u16>() {
            Ok(status) if status == 429 || RETRYABLE_STATUSES.contains(&status) => {
                if !statuses.contains(&status) {
                    statuses.push(status);
                }
            }
            Ok(status) if (100..=599).contains(&status) => wrong(
                setting.from,
                "retry_on",
                format!(
                    "{status} is the request's own fault and would fail again; \
                     retry 429, 500-599 or connect"
                ),
            ),
            _ => wrong(
                setting.from,
                "retry_on",
                format!("{entry:?} is not a status (429, 500-599) or connect"),
            ),
        }
    }
    (statuses, connect)
}

/// `retry_methods`: HTTP methods, as the client sends them (upper case).
fn methods(
    setting: &Inherit<Vec<String>>,
    wrong: &mut impl FnMut(Source, &str, String),
) -> Vec<Method> {
    let mut methods = Vec::new();
    for entry in &setting.value {
        let name = entry.trim().to_ascii_uppercase();
        match Method::from_bytes(name.as_bytes()) {
            Ok(method) if !name.is_empty() && method != Method::CONNECT => methods.push(method),
            _ => wrong(
                setting.from,
                "retry_methods",
                format!("{entry:?} is not an HTTP method keyrelay forwards"),
            ),
        }
    }
    methods
}

/// A count between 1 and [`MAX_RETRY_ATTEMPTS`] (`retry_attempts`) or at
/// least 1 (`eject_after`).
fn count(
    setting: &Inherit<Number>,
    key: &str,
    wrong: &mut impl FnMut(Source, &str, String),
) -> Option<u64> {
    let most = if key == "retry_attempts" {
        MAX_RETRY_ATTEMPTS
    } else {
        u64::from(u32::MAX)
    };
    match setting.value {
        Ok(Some(number)) if (1..=most).contains(&number) => Some(number),
        Ok(_) => {
            wrong(
                setting.from,
                key,
                format!("must be between 1 and {most}; leave retry_on empty for no retries"),
            );
            None
        }
        // The top level's unreadable text was reported where it was read.
        Err(_) => None,
    }
}

/// `retry_budget`: a percentage, `20%` or `20`.
fn percent(setting: &Inherit<String>, wrong: &mut impl FnMut(Source, &str, String)) -> Option<u32> {
    let text = setting.value.trim();
    match text.trim_end_matches('%').trim().parse::<u32>() {
        Ok(percent) if (1..=100).contains(&percent) => Some(percent),
        _ => {
            let message = format!("{text:?} is not a percentage from 1% to 100%");
            wrong(setting.from, "retry_budget", message);
            None
        }
    }
}

/// A duration that must be set (not `off`).
fn duration(
    setting: &Inherit<String>,
    key: &str,
    wrong: &mut impl FnMut(Source, &str, String),
) -> Option<Duration> {
    match parse_duration(&setting.value) {
        Ok(Some(duration)) => Some(duration),
        Ok(None) => {
            wrong(setting.from, key, "must be longer than 0".to_owned());
            None
        }
        Err(message) => {
            wrong(setting.from, key, message);
            None
        }
    }
}

/// Retry settings a route sets while it retries nothing: they would apply
/// to nothing, so they are refused.
fn no_effect(policy: &Policy, fallback: bool, wrong: &mut impl FnMut(Source, &str, String)) {
    let own = [
        ("retry_attempts", policy.retry_attempts.from),
        ("retry_methods", policy.retry_methods.from),
        ("retry_budget", policy.retry_budget.from),
        ("retry_max_wait", policy.retry_max_wait.from),
        ("retry_buffer", policy.retry_buffer.from),
        ("eject_after", policy.eject_after.from),
        ("eject_for", policy.eject_for.from),
    ];
    let message = "has no effect: retry_on is empty, so nothing is retried";
    for (setting, from) in own {
        if from == Source::Own && !policy.is_default(setting) {
            wrong(Source::Own, setting, message.to_owned());
        }
    }
    if fallback {
        let message = "has no effect: fallback routes are tried only for a retry_on match, \
                       and retry_on is empty";
        wrong(Source::Own, "fallback", message.to_owned());
    }
}

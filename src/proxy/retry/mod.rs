//! Retries and failover: a request whose upstream answered with a
//! `retry_on` status, or could not be reached, is sent again (to the same
//! route after a wait, or to the next of its `fallback` routes) while
//! nothing of the answer has reached the client.
//!
//! What makes this safe for streams is where it sits: the loop in
//! `proxy/mod.rs` decides on each response head before relaying it, so a
//! retry is never after the first response byte reached the client — once
//! a head is relayed, its body streams and no other attempt follows. The
//! rest is bounded:
//! - a request body is sent again only if keyrelay kept it whole
//!   ([`Replay`]: declared length within `retry_buffer`);
//! - a status is retried only for the route's `retry_methods`; connection
//!   failures, where nothing left keyrelay, for every method;
//! - `retry_attempts` per request, and a [`RetryBudget`] per route;
//! - waits are exponential backoff with jitter, or the upstream's longer
//!   `Retry-After`, and a wait beyond `retry_max_wait` relays the answer at
//!   once;
//! - a target failing `eject_after` times in a row is skipped for
//!   `eject_for` ([`TargetHealth`]).
//!
//! Each attempt is counted (`keyrelay_upstream_attempts_total`), and when
//! there was more than one, listed in `Server-Timing` and the access log.

mod budget;
mod health;
mod replay;

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};

pub(crate) use budget::RetryBudget;
pub(crate) use health::TargetHealth;
pub(crate) use replay::{Replay, ReplayCursor};

use crate::config::RetryPolicy;
use crate::proxy::methods;
use crate::proxy::request_body::RequestBody;
use crate::proxy::route_table::{Route, RouteTable};

/// The first retry waits up to this (with jitter); each next one twice as long.
const BACKOFF_BASE: Duration = Duration::from_millis(250);

/// What an attempt came to, as the retry policy reads it.
#[derive(Clone, Copy)]
pub(crate) enum AttemptResult<'a> {
    /// The upstream answered with this head.
    Answered(StatusCode, &'a HeaderMap),
    /// No answer: `never_sent` when no connection could be made (the
    /// request never left keyrelay); `kind` names the failure.
    Failed {
        never_sent: bool,
        kind: &'static str,
    },
}

/// What follows an attempt. (Made once per attempt and taken apart at
/// once: the size of `Again` costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Next<'r> {
    /// Relay this attempt's answer (or failure) to the client.
    Relay,
    /// Drop this attempt's answer, wait, and send again.
    Again {
        target: &'r Route,
        wait: Duration,
        parts: http::request::Parts,
        body: RequestBody,
    },
}

/// The request head as it goes upstream before the route's rewrite, kept
/// so that each attempt is built from it afresh (another route's attempt
/// must not carry the first route's credential).
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn parts(&self) -> http::request::Parts {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = self.headers.clone();
        parts
    }
}

/// A request body as keyrelay keeps it for attempts after the first.
enum KeptBody {
    /// Kept whole as it streams ([`Replay`]).
    Whole(Replay),
    /// There is none (a GET): each attempt sends an empty body, with no
    /// [`Replay`] to keep.
    Empty,
    /// Not kept (chunked, or over `retry_buffer`): never sent again.
    NotKept,
}

impl KeptBody {
    /// The body for the next attempt on `route`, if it can be sent again.
    fn again(&self, route: &Route) -> Option<RequestBody> {
        match self {
            Self::Whole(replay) => replay.again(),
            Self::Empty => Some(RequestBody::nothing(route.metrics.clone())),
            Self::NotKept => None,
        }
    }
}

/// One request's attempts under its route's [`RetryPolicy`].
pub(crate) struct Attempts<'r> {
    route: &'r Route,
    policy: &'r RetryPolicy,
    head: Head,
    /// The body as later attempts get it.
    body: KeptBody,
    /// Attempts made so far.
    made: u32,
    /// When the current attempt was sent.
    started: tokio::time::Instant,
    /// Per target (the route, then its fallbacks), no attempt before then:
    /// its `Retry-After` or backoff. Made on the first retry.
    not_before: Vec<Option<tokio::time::Instant>>,
    /// A `Server-Timing` entry per attempt that did not answer the client.
    timings: Vec<HeaderValue>,
}

impl<'r> Attempts<'r> {
    /// True when something about a `method` request on `route` could be
    /// retried: the route has a policy that covers it, and it is no upgrade
    /// (which is never sent twice). Checked first, so that a request that
    /// cannot be retried pays for nothing else here.
    #[inline]
    pub(crate) fn apply(route: &Route, method: &Method, upgrading: bool) -> bool {
        let policy = &route.retry;
        !upgrading
            && (policy.connect || (!policy.statuses.is_empty() && policy.methods.contains(method)))
    }

    /// The attempts of a request on `route` that [`Attempts::apply`] to it,
    /// and the body its first attempt sends. Boxed: it is large, and most
    /// requests' futures do without it.
    pub(crate) fn start(
        route: &'r Route,
        parts: &http::request::Parts,
        body: RequestBody,
    ) -> (Box<Self>, RequestBody) {
        let policy = &route.retry;
        let now = tokio::time::Instant::now();
        route.retry_budget.request(now);
        let (kept, body) = if hyper::body::Body::is_end_stream(&body) {
            (KeptBody::Empty, body)
        } else {
            match Replay::keep(body, policy.buffer) {
                (Some(replay), body) => (KeptBody::Whole(replay), body),
                (None, body) => (KeptBody::NotKept, body),
            }
        };
        let attempts = Self {
            route,
            policy,
            head: Head {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
            },
            body: kept,
            made: 0,
            started: now,
            not_before: Vec::new(),
            timings: Vec::new(),
        };
        (Box::new(attempts), body)
    }

    /// The target of the first attempt: the route, unless it is ejected
    /// (and this request is not the one that probes it after the
    /// cool-down) and a fallback is not.
    pub(crate) fn first_target(&mut self, routes: &'r RouteTable) -> &'r Route {
        self.made = 1;
        let candidates = self.candidates();
        if candidates > 1 && !self.usable(routes, 0) {
            let open = |&at: &usize| self.admits(routes, at) && self.usable(routes, at);
            if let Some(at) = (1..candidates).find(open) {
                return self.target(routes, at);
            }
        }
        self.route
    }

    /// Decides what follows an attempt on `target` that came to `result`.
    pub(crate) fn after(
        &mut self,
        target: &'r Route,
        result: AttemptResult<'_>,
        routes: &'r RouteTable,
    ) -> Next<'r> {
        let elapsed = self.started.elapsed();
        let retryable = match result {
            AttemptResult::Answered(status, _) => self
                .policy
                .retries_status(&self.head.method, status.as_u16()),
            AttemptResult::Failed { never_sent, .. } => never_sent && self.policy.connect,
        };
        if !retryable {
            if matches!(result, AttemptResult::Answered(..)) {
                target.health.succeeded();
            }
            return self.relay(&result, target, elapsed, "relayed");
        }
        target
            .health
            .failed(self.policy.eject_after, self.policy.eject_for);
        let retry_after = match result {
            AttemptResult::Answered(_, headers) => retry_after(headers),
            AttemptResult::Failed { .. } => None,
        };
        let planned = self
            .plan(target, retry_after, routes)
            .and_then(|(next, wait)| {
                let body = self.body.again(self.route).ok_or("body_not_kept")?;
                Ok((next, wait, body))
            });
        let (next, wait, body) = match planned {
            Ok(planned) => planned,
            Err(why) => return self.relay(&result, target, elapsed, why),
        };
        self.route.metrics.upstream_attempt(&target.name, "retried");
        self.timings.push(timing(&result, target, elapsed));
        self.made += 1;
        self.started = tokio::time::Instant::now() + wait;
        Next::Again {
            target: next,
            wait,
            parts: self.head.parts(),
            body,
        }
    }

    /// Where and after what wait the next attempt goes, or why none does
    /// (the outcome the attempt is counted under).
    fn plan(
        &mut self,
        target: &'r Route,
        retry_after: Option<Duration>,
        routes: &'r RouteTable,
    ) -> Result<(&'r Route, Duration), &'static str> {
        if self.made > self.policy.attempts {
            return Err("attempts_used");
        }
        if matches!(self.body, KeptBody::NotKept) {
            return Err("body_not_kept");
        }
        let candidates = self.candidates();
        if self.not_before.is_empty() {
            self.not_before = vec![None; candidates];
        }
        let now = tokio::time::Instant::now();
        let at = self.position(target);
        // This target's own wait: the backoff, or longer if it asked for
        // longer. (A backoff is cut to the cap; a Retry-After beyond it is
        // the upstream's word, and is not waited out. A shorter one, down
        // to `Retry-After: 0` on every answer, does not make keyrelay
        // hammer it back to back.)
        let floor = backoff(self.made).min(self.policy.max_wait);
        let own_wait = retry_after.map_or(floor, |asked| asked.max(floor));
        self.not_before[at] = Some(now + own_wait);
        // Along the list, skipping targets whose path policy refuses the
        // request, and ejected targets unless all are. (The route itself
        // admitted it: the list is never empty.)
        let admitted: Vec<usize> = (1..=candidates)
            .map(|step| (at + step) % candidates)
            .filter(|&next| self.admits(routes, next))
            .collect();
        let next = (admitted.iter().copied())
            .find(|&next| self.usable(routes, next))
            .unwrap_or(admitted[0]);
        let wait = self.not_before[next].map_or(Duration::ZERO, |until| until - now);
        if wait > self.policy.max_wait {
            return Err("wait_over_cap");
        }
        if !self.route.retry_budget.try_retry() {
            return Err("budget_exhausted");
        }
        Ok((self.target(routes, next), wait))
    }

    /// This attempt's answer (or failure) goes to the client, counted under
    /// `outcome`.
    fn relay(
        &mut self,
        result: &AttemptResult<'_>,
        target: &Route,
        elapsed: Duration,
        outcome: &'static str,
    ) -> Next<'r> {
        self.route.metrics.upstream_attempt(&target.name, outcome);
        self.finish(result, target, elapsed);
        Next::Relay
    }

    /// No attempt follows: the kept body is let go, and the last attempt
    /// joins the `Server-Timing` list if there were others.
    fn finish(&mut self, result: &AttemptResult<'_>, target: &Route, elapsed: Duration) {
        if let KeptBody::Whole(replay) = &self.body {
            replay.finish();
        }
        if !self.timings.is_empty() {
            self.timings.push(timing(result, target, elapsed));
        }
    }

    /// The `Server-Timing` entries of the attempts, when there was more
    /// than one.
    pub(crate) fn take_timings(&mut self) -> Vec<HeaderValue> {
        std::mem::take(&mut self.timings)
    }

    /// The route and its fallbacks.
    fn candidates(&self) -> usize {
        1 + self.route.fallback.len()
    }

    fn target(&self, routes: &'r RouteTable, at: usize) -> &'r Route {
        match at {
            0 => self.route,
            at => routes.at(self.route.fallback[at - 1]),
        }
    }

    fn position(&self, target: &Route) -> usize {
        self.route
            .fallback
            .iter()
            .position(|&index| index == target.index)
            .map_or(0, |at| at + 1)
    }

    /// True when the target at `at` can take the request: it maps it to
    /// an upstream URI (a Baseten regional host takes no staged path, and
    /// the client must not get a 400 for a fallback's limits), and its path
    /// policy (`allowed_paths`, method overrides, TRACE) lets it through as
    /// it would if the request had arrived on it: its key is for those
    /// paths only.
    fn admits(&self, routes: &'r RouteTable, at: usize) -> bool {
        let target = self.target(routes, at);
        if at == 0 {
            return true;
        }
        if target.upstream_uri_for(self.route, &self.head.uri).is_err() {
            return false;
        }
        // Also without rules: a route refuses TRACE unless its rules name it.
        let path = target.local_path_for(self.route, self.head.uri.path());
        methods::check_path(target, &self.head.method, &self.head.headers, &path).is_ok()
    }

    fn usable(&self, routes: &'r RouteTable, at: usize) -> bool {
        self.target(routes, at)
            .health
            .try_use(self.policy.eject_for)
    }
}

/// The longest `Retry-After` read as given: anything longer is as good as
/// "not now" (over any `retry_max_wait`), and a bound keeps the arithmetic
/// on instants from overflowing on an upstream's `Retry-After: 1e19`.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The upstream's `Retry-After`: seconds, or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let when = httpdate::parse_http_date(text).ok()?;
            when.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(LONGEST_RETRY_AFTER))
}

/// The wait before retry `made` (1 for the first): exponential, with
/// jitter over its upper half, so that clients failed together do not
/// come back together.
fn backoff(made: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1 << made.saturating_sub(1).min(16));
    let half = ceiling / 2;
    half + half.mul_f64(jitter())
}

/// A number in [0, 1), different per call; randomness enough for spreading
/// retries, from the standard library's per-process random hash keys.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    hasher.write_u128(now.unwrap_or_default().as_nanos());
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The `Server-Timing` entry of one attempt:
/// `attempt;desc="503 from model-a";dur=12.3`.
fn timing(result: &AttemptResult<'_>, target: &Route, elapsed: Duration) -> HeaderValue {
    let what = match result {
        AttemptResult::Answered(status, _) => status.as_u16().to_string(),
        AttemptResult::Failed { kind, .. } => (*kind).to_owned(),
    };
    let name: String = target
        .name
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect();
    let millis = elapsed.as_secs_f64() * 1e3;
    HeaderValue::try_from(format!(
        "attempt;desc=\"{what} from {name}\";dur={millis:.1}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attempt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        headers.insert(http::header::RETRY_AFTER, date.parse().expect("date"));
        let wait = retry_after(&headers).expect("a date");
        assert!(wait > Duration::from_secs(110) && wait <= Duration::from_secs(120));
        // A date in the past: at once.
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
        // Bounded, so that adding it to an instant cannot overflow.
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(retry_after(&headers), Some(LONGEST_RETRY_AFTER));
        let _ = tokio::time::Instant::now() + LONGEST_RETRY_AFTER;
    }

    #[test]
    fn backoff_doubles_within_jitter() {
        for made in 1..=4 {
            let ceiling = BACKOFF_BASE * (1 << (made - 1));
            let wait = backoff(made);
            assert!(wait >= ceiling / 2 && wait <= ceiling, "{made}: {wait:?}");
        }
        assert!(backoff(u32::MAX) <= BACKOFF_BASE * (1 << 16));
    }
}

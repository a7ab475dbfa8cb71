//! A route's credential as the data path reads it: one header value with
//! an optional expiry, whatever its source.
//!
//! The sources: `key_env` (read once, never expires), `key_file` (re-read
//! by [`crate::secrets::secret_file::watch`], never expires) and
//! `key_command` (run again before expiry by
//! [`crate::secrets::refresh::keep_fresh`]). Every serving thread reads the
//! same [`LiveCredential`]; only its source's one task writes it.
//!
//! A value past its expiry is never sent: [`LiveCredential::usable`]
//! answers [`Unavailable`] instead (503 `credential_unavailable`), and
//! `/readyz` fails while any route's is.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use tokio::sync::Notify;

/// The shortest `Retry-After` of an unavailable credential.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The credential header value in use, swapped by its source's task.
#[derive(Debug)]
pub struct LiveCredential {
    state: RwLock<State>,
    /// Whether the source can fetch a new value on demand (`key_command`).
    refreshable: bool,
    /// An upstream's 401 or 403, for the refresher.
    rejected: Notify,
}

#[derive(Debug)]
struct State {
    value: HeaderValue,
    /// `None`: the value does not expire.
    expires: Option<Instant>,
    /// When the source tries again after a failure, for `Retry-After`.
    next_attempt: Option<Instant>,
}

/// The route's credential has expired and no new one could be had yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    /// When to try again (the source's next attempt), at least a second.
    pub retry_after: Duration,
}

impl LiveCredential {
    /// A value that does not expire (`key_env`, `key_file`).
    pub fn new(value: HeaderValue) -> Self {
        Self::with_expiry(value, None)
    }

    /// A value valid until `expires`, when given; one with an expiry comes
    /// from a source that refreshes it, which an upstream 401 or 403 nudges.
    pub fn with_expiry(value: HeaderValue, expires: Option<Instant>) -> Self {
        Self {
            state: RwLock::new(State {
                value,
                expires,
                next_attempt: None,
            }),
            refreshable: expires.is_some(),
            rejected: Notify::new(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value in use, expired or not (the key-file watcher compares it).
    pub fn current(&self) -> HeaderValue {
        self.read().value.clone()
    }

    /// The value to inject into the next request, unless it has expired.
    pub fn usable(&self) -> Result<HeaderValue, Unavailable> {
        let state = self.read();
        let now = Instant::now();
        match state.expires {
            Some(expires) if now >= expires => Err(Unavailable {
                retry_after: state
                    .next_attempt
                    .map_or(MIN_RETRY_AFTER, |at| at.saturating_duration_since(now))
                    .max(MIN_RETRY_AFTER),
            }),
            _ => Ok(state.value.clone()),
        }
    }

    /// True while the value may be sent (readiness).
    pub fn is_valid(&self) -> bool {
        self.usable().is_ok()
    }

    /// Seconds until the value expires (negative once it has); `None` when
    /// it does not expire.
    pub fn seconds_left(&self) -> Option<f64> {
        let expires = self.read().expires?;
        let now = Instant::now();
        Some(if expires >= now {
            expires.duration_since(now).as_secs_f64()
        } else {
            -now.duration_since(expires).as_secs_f64()
        })
    }

    /// Replaces the value, keeping its expiry (a reloaded key file).
    pub(crate) fn replace(&self, value: HeaderValue) {
        self.write().value = value;
    }

    /// A fresh value from the source, valid until `expires`.
    pub(crate) fn renew(&self, value: HeaderValue, expires: Instant) {
        let mut state = self.write();
        state.value = value;
        state.expires = Some(expires);
        state.next_attempt = None;
    }

    /// The source failed and tries again at `at`.
    pub(crate) fn retry_at(&self, at: Instant) {
        self.write().next_attempt = Some(at);
    }

    /// The upstream answered a request sent with this credential: a 401 or
    /// 403 asks a refreshable source for a new value (the source limits how
    /// often it obliges).
    pub fn answered(&self, status: StatusCode) {
        if self.refreshable
            && (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
        {
            // Kept if the refresher is busy: one wake-up, however many 401s.
            self.rejected.notify_one();
        }
    }

    /// Resolves at the next upstream 401 or 403 (see [`Self::answered`]).
    pub(crate) async fn rejected(&self) {
        self.rejected.notified().await;
    }
}

/// Every route's credential, by route name, for readiness and metrics.
#[derive(Debug, Clone, Default)]
pub struct RouteCredentials(Arc<Vec<(String, Arc<LiveCredential>)>>);

impl RouteCredentials {
    /// From `(route name, credential)` pairs.
    pub fn new(routes: Vec<(String, Arc<LiveCredential>)>) -> Self {
        Self(Arc::new(routes))
    }

    /// The routes whose credential has expired.
    pub fn unavailable(&self) -> Vec<&str> {
        (self.0.iter())
            .filter(|(_, live)| !live.is_valid())
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Each route with an expiring credential and its seconds left.
    pub fn expiries(&self) -> impl Iterator<Item = (&str, f64)> {
        (self.0.iter()).filter_map(|(name, live)| Some((name.as_str(), live.seconds_left()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &'static str) -> HeaderValue {
        HeaderValue::from_static(text)
    }

    #[test]
    fn a_static_value_is_always_usable_and_ignores_401s() {
        let live = LiveCredential::new(value("a"));
        assert_eq!(live.usable(), Ok(value("a")));
        assert_eq!(live.seconds_left(), None);
        live.answered(StatusCode::UNAUTHORIZED);
        assert!(!live.refreshable);
    }

    #[test]
    fn an_expired_value_is_never_handed_out() {
        let now = Instant::now();
        let live = LiveCredential::with_expiry(value("a"), Some(now + Duration::from_secs(60)));
        assert_eq!(live.usable(), Ok(value("a")));
        assert!(live.seconds_left().is_some_and(|left| left > 59.0));

        live.renew(value("b"), now);
        let unavailable = live.usable().expect_err("expired");
        assert_eq!(unavailable.retry_after, MIN_RETRY_AFTER);
        assert!(!live.is_valid());
        live.retry_at(Instant::now() + Duration::from_secs(7));
        let wait = live.usable().expect_err("expired").retry_after;
        assert!(wait > Duration::from_secs(6) && wait <= Duration::from_secs(7));
        assert!(live.seconds_left().is_some_and(|left| left <= 0.0));

        live.renew(value("c"), Instant::now() + Duration::from_secs(60));
        assert_eq!(live.usable(), Ok(value("c")));
    }

    #[test]
    fn readiness_names_the_routes_without_a_credential() {
        let expired = Arc::new(LiveCredential::with_expiry(
            value("a"),
            Some(Instant::now()),
        ));
        let fine = Arc::new(LiveCredential::new(value("b")));
        let routes = RouteCredentials::new(vec![("gone".into(), expired), ("ok".into(), fine)]);
        assert_eq!(routes.unavailable(), ["gone"]);
        assert_eq!(
            routes.expiries().map(|(name, _)| name).collect::<Vec<_>>(),
            ["gone"]
        );
    }
}

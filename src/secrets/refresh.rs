//! Keeps an expiring credential fresh (a `key_command` helper, an OAuth2
//! token endpoint or Google's credentials, a [`Source`]): one task per
//! route asks the source, so however many serving threads and requests
//! there are, one
//! run is in flight at a time (single flight) and no request ever waits on
//! one.
//!
//! - A value is refreshed at [`REFRESH_AT`] of its lifetime, so the next one
//!   is in place long before it expires; earlier when the helper's last run
//!   took more than a third of what would be left.
//! - A failed run is tried again after a backoff (1 s doubling to
//!   [`MAX_BACKOFF`]) while the current value stays in use until it
//!   expires; after that the route answers 503 `credential_unavailable`
//!   with `Retry-After` naming the next attempt, and `/readyz` fails.
//! - An upstream 401 or 403 asks for a run now, at most once per
//!   [`REJECTION_INTERVAL`]: a key revoked early is replaced without waiting
//!   for its expiry, and an upstream that rejects everything does not turn
//!   into a helper run per request.
//!
//! Runs happen on the blocking pool, each bounded by `key_command_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::secrets::credential::LiveCredential;
use crate::secrets::google::GoogleCredentials;
use crate::secrets::key_command::{Fetched, KeyCommand, Lifetime};
use crate::secrets::oauth::OAuthClient;
use crate::secrets::secret_file;

/// Where an expiring credential comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `key_command`: a helper program.
    Command(KeyCommand),
    /// `oauth_token_url`: OAuth2 client credentials.
    OAuth(OAuthClient),
    /// `google_credentials_file` or the metadata server: Google access tokens.
    Google(GoogleCredentials),
}

impl Source {
    /// Fetches a value, blocking (a helper run, a token request).
    pub fn run(&self) -> Result<Fetched, String> {
        match self {
            Self::Command(command) => command.run(),
            Self::OAuth(client) => client.run(),
            Self::Google(google) => google.run(),
        }
    }

    /// The setting that names the source, for messages.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::Command(_) => "key_command",
            Self::OAuth(_) => "oauth_token_url",
            Self::Google(google) => google.setting(),
        }
    }

    /// What the source is, for the log: a command by its program (its
    /// arguments may be private), an endpoint by its URL.
    pub fn describe(&self) -> String {
        match self {
            Self::Command(command) => format!("command {}", command.program()),
            Self::OAuth(client) => format!("oauth2 {}", client.token_url),
            Self::Google(google) => google.describe(),
        }
    }
}

/// The share of a value's lifetime after which it is refreshed.
pub const REFRESH_AT: f64 = 0.8;

/// The longest wait between two attempts after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The wait after the first failure; it doubles with each one after.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The least time between two refreshes asked for by upstream 401/403s.
pub const REJECTION_INTERVAL: Duration = Duration::from_secs(10);

/// One route's refresher: what to run, how to render what it prints, where
/// to put it and what to count.
pub struct Refresher {
    /// The route, for the log.
    pub route: String,
    /// The helper or token endpoint.
    pub source: Source,
    /// The route's `auth_template`.
    pub template: String,
    /// The value every serving thread reads.
    pub live: Arc<LiveCredential>,
    /// `credential_refreshes_total{result="ok"}`.
    pub succeeded: Counter,
    /// `credential_refreshes_total{result="error"}`.
    pub failed: Counter,
}

/// How many of the last run's durations before expiry a refresh starts at
/// the latest, for a helper whose runs take longer than a fifth of its
/// values' lifetime (python starting on a loaded machine, 1 s tokens).
const RUNS_OF_LEAD: u32 = 3;

/// When a value with `lifetime` is refreshed: at [`REFRESH_AT`] of its
/// lifetime, or earlier when the run that fetched it took so long that
/// the next might not finish before expiry.
fn refresh_time(lifetime: Lifetime) -> Instant {
    let Lifetime {
        started,
        took,
        expires,
    } = lifetime;
    let share = started
        + expires
            .saturating_duration_since(started)
            .mul_f64(REFRESH_AT);
    let lead = expires
        .checked_sub(took.saturating_mul(RUNS_OF_LEAD))
        .unwrap_or(started);
    share.min(lead).max(started)
}

/// The wait after `failures` failed runs in a row (at least one).
fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// Runs the refresher until dropped. `first` is the lifetime of the value
/// fetched at startup (already in `live`). Its SIGHUP handler is installed
/// now, not when the task first runs, so a SIGHUP right after startup is
/// not lost.
pub fn keep_fresh(refresher: Refresher, first: Lifetime) -> impl std::future::Future<Output = ()> {
    // An operator's SIGHUP fetches a new value now, as it re-reads key files.
    let hangups = secret_file::hangups();
    refresh_loop(refresher, first, hangups)
}

async fn refresh_loop(
    refresher: Refresher,
    first: Lifetime,
    mut hangups: Option<secret_file::Hangups>,
) {
    let Refresher {
        route,
        source,
        template,
        live,
        succeeded,
        failed,
    } = refresher;
    let mut next = refresh_time(first);
    let mut failures = 0u32;
    let mut last_forced: Option<Instant> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            Some(()) = async { hangups.as_mut()?.recv().await } => {
                tracing::info!(%route, source = source.setting(), "SIGHUP: refreshing the credential now");
            }
            () = live.rejected() => {
                if last_forced.is_some_and(|at| at.elapsed() < REJECTION_INTERVAL) {
                    continue;
                }
                last_forced = Some(Instant::now());
                tracing::info!(%route, source = source.setting(), "the upstream rejected the credential (401/403): refreshing it now");
            }
        }
        let run = source.clone();
        let fetched = tokio::task::spawn_blocking(move || run.run())
            .await
            .unwrap_or_else(|_| Err("the credential refresh panicked".to_owned()))
            .and_then(|fetched| {
                let value = fetched.key.header_value(&template).map_err(|err| {
                    format!(
                        "the key from {} (as rendered by auth_template) {err}",
                        source.describe()
                    )
                })?;
                Ok((value, fetched))
            });
        match fetched {
            Ok((value, fetched)) => {
                let Fetched {
                    lifetime, stderr, ..
                } = fetched;
                let expires = lifetime.expires;
                live.renew(value, expires);
                succeeded.inc();
                failures = 0;
                next = refresh_time(lifetime);
                tracing::info!(
                    %route,
                    expires_in_secs = expires.saturating_duration_since(Instant::now()).as_secs(),
                    source = source.setting(),
                    "credential refreshed; new requests use it"
                );
                if !stderr.trim().is_empty() {
                    tracing::debug!(%route, stderr = %stderr.trim(), "key_command stderr");
                }
            }
            Err(problem) => {
                failed.inc();
                failures = failures.saturating_add(1);
                next = Instant::now() + backoff(failures);
                live.retry_at(next);
                let retry_in_secs = backoff(failures).as_secs();
                match live.seconds_left() {
                    Some(left) if left > 0.0 => tracing::warn!(
                        %route, source = source.setting(), %problem, retry_in_secs, valid_for_secs = left as u64,
                        "refreshing the credential failed; the current credential stays in use until it expires"
                    ),
                    _ => tracing::error!(
                        %route, source = source.setting(), %problem, retry_in_secs,
                        "refreshing the credential failed and it has expired: requests on this route get 503 credential_unavailable"
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_at_four_fifths_of_the_lifetime() {
        let start = Instant::now();
        let at = refresh_time(Lifetime {
            started: start,
            took: Duration::from_millis(50),
            expires: start + Duration::from_secs(100),
        });
        assert_eq!(at.duration_since(start), Duration::from_secs(80));
    }

    #[test]
    fn a_slow_helper_is_started_earlier() {
        let start = Instant::now();
        let lifetime = |took| Lifetime {
            started: start,
            took,
            expires: start + Duration::from_secs(2),
        };
        // 80% would leave 400 ms; a run of 300 ms gets three times that.
        let at = refresh_time(lifetime(Duration::from_millis(300)));
        assert_eq!(at.duration_since(start), Duration::from_millis(1100));
        // Runs as long as the lifetime: refresh at once, never before the start.
        assert_eq!(refresh_time(lifetime(Duration::from_secs(2))), start);
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}

//! Local access tokens: who may use keyrelay at all, and how fast.
//!
//! Optional. When configured, every request must present one of the tokens as
//! `Authorization: Bearer <token>` (so an OpenAI SDK's `api_key` can carry it)
//! or in the `X-Keyrelay-Token` header. Tokens are compared in constant time
//! against every configured token, and removed before forwarding (the
//! credential scrub drops `Authorization`; this drops the dedicated header).
//! Logs name the token, never its value. Each token can have a request-rate
//! limit, a token bucket, so a leaked local token cannot drain the account.
//! Tokens read from files are re-read like the key file (see
//! [`crate::secrets::secret_file`]), so a rotated Secret applies without a restart. Unlike
//! the key, a token file that becomes unusable (deleted, emptied, invalid)
//! disables its token: emptying the file is how an operator revokes a leaked
//! token, so that must not leave the old value working.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::secrets::key::MASK;

/// The dedicated header a client may put its token in.
pub(crate) const TOKEN_HEADER: &str = "x-keyrelay-token";
const TOKEN_HEADER_NAME: HeaderName = HeaderName::from_static(TOKEN_HEADER);

/// Shortest token accepted, at startup and on reload: tokens must be random
/// strings, not passwords a person picked.
pub(crate) const MIN_TOKEN_LEN: usize = 16;

/// Why `value` cannot be token `name`: too short, or holding characters a
/// client cannot send as-is in a header (spaces, line breaks, control bytes),
/// which would make a token nobody can present.
pub(crate) fn check_value(name: &str, value: &str) -> Result<(), String> {
    if value.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "token {name} is shorter than {MIN_TOKEN_LEN} characters; use a random one"
        ));
    }
    if !value.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(format!(
            "token {name} contains spaces, line breaks or non-ASCII characters"
        ));
    }
    Ok(())
}

/// A named local access token.
#[derive(Clone)]
pub struct AccessToken {
    name: String,
    value: Zeroizing<Vec<u8>>,
    /// The file it was read from, re-read while keyrelay runs.
    file: Option<PathBuf>,
}

impl AccessToken {
    /// A token called `name` (shown in logs) with the secret `value`.
    pub fn new(name: String, value: String) -> Self {
        Self {
            name,
            value: Zeroizing::new(value.into_bytes()),
            file: None,
        }
    }

    /// The token's name (never its value).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A token read from `file`, which keyrelay keeps watching.
    pub fn from_file(name: String, value: String, file: PathBuf) -> Self {
        Self {
            file: Some(file),
            ..Self::new(name, value)
        }
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessToken({}: {MASK})", self.name)
    }
}

/// A request rate: `requests` per `per`, with bursts up to `requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Bucket size and refill amount per `per`.
    pub requests: u32,
    /// The refill period.
    pub per: Duration,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    /// No token, or none that matches.
    Unauthorized,
    /// The token's rate is used up; retry after this long.
    RateLimited(Duration),
}

/// The configured tokens and their rate limit.
#[derive(Debug, Default)]
pub struct AccessTokens {
    tokens: Vec<LiveToken>,
    rate: Option<Rate>,
}

/// A token whose value can be replaced when its file changes.
struct LiveToken {
    name: String,
    file: Option<PathBuf>,
    /// `None` while the token's file is unusable: nothing matches it then.
    value: RwLock<Option<Zeroizing<Vec<u8>>>>,
    bucket: Mutex<Bucket>,
}

impl fmt::Debug for LiveToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveToken({}: {MASK})", self.name)
    }
}

impl AccessTokens {
    /// `tokens` with an optional per-token `rate`.
    pub fn new(tokens: Vec<AccessToken>, rate: Option<Rate>) -> Self {
        let tokens = tokens
            .into_iter()
            .map(|token| LiveToken {
                name: token.name,
                file: token.file,
                value: RwLock::new(Some(token.value)),
                bucket: Mutex::new(Bucket::full(rate)),
            })
            .collect();
        Self { tokens, rate }
    }

    /// The tokens read from files, by index, for the watchers.
    pub fn files(&self) -> impl Iterator<Item = (usize, &Path)> {
        self.tokens
            .iter()
            .enumerate()
            .filter_map(|(index, token)| Some((index, token.file.as_deref()?)))
    }

    /// Applies a re-read of token `index`'s file: a valid value replaces the
    /// token (answering whether it changed); a read error or an invalid value
    /// disables the token until the file holds a valid one, and says why.
    pub fn update(&self, index: usize, read: Result<String, String>) -> Result<bool, String> {
        let token = &self.tokens[index];
        let checked = read.and_then(|value| {
            check_value(&token.name, &value)?;
            Ok(Zeroizing::new(value.into_bytes()))
        });
        let mut current = token
            .value
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match checked {
            Ok(value) if current.as_ref() == Some(&value) => Ok(false),
            Ok(value) => {
                *current = Some(value);
                Ok(true)
            }
            Err(problem) => {
                *current = None;
                Err(format!(
                    "{problem}; token {} is refused until its file holds a valid one",
                    token.name
                ))
            }
        }
    }

    /// True when requests must present a token.
    pub fn required(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks and removes the client's token; returns the token's name.
    pub fn authenticate(&self, headers: &mut HeaderMap) -> Result<Option<&str>, TokenRejection> {
        if !self.required() {
            return Ok(None);
        }
        // Compared where they lie in the headers: a copy would not make the
        // request's own bytes any less present.
        let found = match headers.remove(TOKEN_HEADER_NAME) {
            Some(value) => self.find(value.as_bytes()),
            None => {
                let found = headers
                    .get(AUTHORIZATION)
                    .and_then(|value| bearer(value.as_bytes()))
                    .map(|token| self.find(token));
                // Removed here rather than left to the credential scrub, which
                // is configurable: a token must never reach the upstream.
                if found.is_some() {
                    headers.remove(AUTHORIZATION);
                }
                found.flatten()
            }
        };
        let index = found.ok_or(TokenRejection::Unauthorized)?;
        if let Some(rate) = self.rate {
            let mut bucket = self.tokens[index]
                .bucket
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            bucket.take(rate, Instant::now())?;
        }
        Ok(Some(&self.tokens[index].name))
    }

    /// Compares against every token without stopping early, so timing does
    /// not reveal how much of a guess was right or which token it was near.
    fn find(&self, presented: &[u8]) -> Option<usize> {
        let mut found = None;
        for (index, token) in self.tokens.iter().enumerate() {
            let value = token
                .value
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let matches = value
                .as_ref()
                .is_some_and(|value| bool::from(value.as_slice().ct_eq(presented)));
            if matches {
                found = Some(index);
            }
        }
        found
    }
}

/// The token in an `Authorization: Bearer <token>` value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    (value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme))
        .then(|| value[scheme.len()..].trim_ascii())
}

/// A token bucket: holds up to `rate.requests`, refilled continuously.
#[derive(Debug)]
struct Bucket {
    available: f64,
    updated: Instant,
}

impl Bucket {
    fn full(rate: Option<Rate>) -> Self {
        Self {
            available: rate.map_or(0.0, |r| f64::from(r.requests)),
            updated: Instant::now(),
        }
    }

    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), TokenRejection> {
        let capacity = f64::from(rate.requests);
        let per_second = capacity / rate.per.as_secs_f64();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.available = (self.available + elapsed * per_second).min(capacity);
        self.updated = now;
        if self.available >= 1.0 {
            self.available -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.available) / per_second;
            Err(TokenRejection::RateLimited(Duration::from_secs_f64(wait)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn tokens(rate: Option<Rate>) -> AccessTokens {
        AccessTokens::new(
            vec![
                AccessToken::new("frontend".into(), "tok-front-123".into()),
                AccessToken::new("batch".into(), "tok-batch-456".into()),
            ],
            rate,
        )
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn bearer_or_dedicated_header_is_accepted_and_removed() {
        let tokens = tokens(None);
        let mut h = headers(&[("authorization", "Bearer tok-batch-456")]);
        assert_eq!(tokens.authenticate(&mut h), Ok(Some("batch")));
        assert!(h.get(AUTHORIZATION).is_none());
        let mut h = headers(&[(TOKEN_HEADER, "tok-front-123")]);
        assert_eq!(tokens.authenticate(&mut h), Ok(Some("frontend")));
        assert!(h.get(TOKEN_HEADER).is_none());
    }

    #[test]
    fn wrong_partial_or_missing_tokens_are_refused() {
        let tokens = tokens(None);
        for pairs in [
            &[][..],
            &[("authorization", "Bearer tok-front-12")][..],
            &[("authorization", "Bearer tok-front-1234")][..],
            &[("authorization", "tok-front-123")][..],
            &[(TOKEN_HEADER, "")][..],
        ] {
            assert_eq!(
                tokens.authenticate(&mut headers(pairs)),
                Err(TokenRejection::Unauthorized),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn no_tokens_configured_means_open() {
        assert_eq!(
            AccessTokens::default().authenticate(&mut HeaderMap::new()),
            Ok(None)
        );
    }

    #[test]
    fn bucket_allows_a_burst_then_refuses_with_a_wait() {
        let rate = Rate {
            requests: 3,
            per: Duration::from_secs(60),
        };
        let mut bucket = Bucket::full(Some(rate));
        let now = bucket.updated;
        for _ in 0..3 {
            assert_eq!(bucket.take(rate, now), Ok(()));
        }
        let Err(TokenRejection::RateLimited(wait)) = bucket.take(rate, now) else {
            panic!("fourth request within the minute must be limited");
        };
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(bucket.take(rate, now + Duration::from_secs(20)), Ok(()));
    }

    #[test]
    fn debug_hides_token_values() {
        let tokens = tokens(None);
        let text = format!("{tokens:?}");
        assert!(!text.contains("tok-front-123") && text.contains("frontend"));
    }

    #[test]
    fn reloaded_tokens_take_effect_and_unusable_files_disable_the_token() {
        let tokens = tokens(None);
        let present = |token: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).expect("value"),
            );
            tokens.authenticate(&mut h)
        };
        assert_eq!(
            tokens.update(0, Ok("tok-front-rotated-789".into())),
            Ok(true)
        );
        assert_eq!(
            tokens.update(0, Ok("tok-front-rotated-789".into())),
            Ok(false)
        );
        assert_eq!(present("tok-front-123"), Err(TokenRejection::Unauthorized));
        assert_eq!(present("tok-front-rotated-789"), Ok(Some("frontend")));
        assert!(
            !format!("{tokens:?}").contains("rotated"),
            "Debug shows a token"
        );

        for unusable in [
            Ok("too-short".to_owned()),
            Ok("tok-front two-words-000".to_owned()),
            Err("cannot read frontend: not found".to_owned()),
        ] {
            assert!(tokens.update(0, Ok("tok-front-rotated-789".into())).is_ok());
            let problem = tokens.update(0, unusable).expect_err("unusable");
            assert!(problem.contains("refused"), "{problem}");
            assert_eq!(
                present("tok-front-rotated-789"),
                Err(TokenRejection::Unauthorized),
                "{problem}"
            );
            // An empty bearer never matches a disabled token.
            assert_eq!(present(""), Err(TokenRejection::Unauthorized));
        }
        assert_eq!(present("tok-batch-456"), Ok(Some("batch")));
    }
}

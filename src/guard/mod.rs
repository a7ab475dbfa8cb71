//! Admission: what a request must pass before keyrelay spends the key on it.
//!
//! The checks run in this order, each a small module of its own:
//! 1. [`host`]: the `Host` must be a loopback name or a configured one (DNS rebinding);
//! 2. [`cors`]: a request with an `Origin` must come from an allowed origin;
//!    preflights from allowed origins are answered here and never forwarded;
//! 3. [`tokens`]: when local access tokens are configured, one must be presented
//!    (and its rate limit must allow the request);
//!
//! The per-route path policy ([`paths`]) is checked once the route is known.
//! The host check comes first because requests without `Origin` pass CORS.

pub(crate) mod cors;
pub mod host;
pub mod paths;
pub(crate) mod tokens;

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderMap, HeaderValue};

use crate::config::AccessSettings;
use crate::proxy::error::Refusal;
use cors::{CorsPolicy, OriginVerdict};
use host::HostPolicy;
use tokens::{AccessTokens, TokenRejection};

/// All admission policy, built once from the config.
#[derive(Debug, Default)]
pub struct Guard {
    /// Accepted `Host` names.
    pub hosts: HostPolicy,
    /// Allowed browser origins.
    pub cors: CorsPolicy,
    /// Local access tokens and their rate limit (shared with the token-file watchers).
    pub tokens: Arc<AccessTokens>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Admission {
    /// Forward it; add CORS headers for this origin to the response, if any.
    Forward {
        /// The allowed origin to echo back.
        origin: Option<HeaderValue>,
        /// The access token's name, for logs.
        token: Option<String>,
    },
    /// Answer this CORS preflight with these headers (204), without forwarding.
    Preflight(HeaderMap),
    /// Refuse it. An allowed origin is echoed on the refusal so the page can
    /// read why (a 401 or a 429's `Retry-After`).
    Reject {
        /// Why.
        error: Refusal,
        /// The allowed origin to echo back, if the origin check had passed.
        origin: Option<HeaderValue>,
    },
}

impl Guard {
    /// Builds the checks from validated settings.
    pub fn new(settings: &AccessSettings) -> Self {
        Self {
            hosts: settings.hosts.clone(),
            cors: settings.cors.clone(),
            tokens: Arc::new(AccessTokens::new(
                settings.tokens.clone(),
                settings.token_rate,
            )),
        }
    }

    /// Runs every check on the request, removing the access token it carries.
    pub fn admit(&self, request: &mut Parts) -> Admission {
        let reject = |error, origin| Admission::Reject { error, origin };
        if !self.hosts.allows(&request.uri, &request.headers) {
            return reject(Refusal::HostNotAllowed, None);
        }
        let origin = match self.cors.verdict(&request.headers) {
            OriginVerdict::Absent => None,
            OriginVerdict::Allowed(origin) => Some(origin),
            OriginVerdict::Denied => return reject(Refusal::OriginNotAllowed, None),
        };
        if let Some(origin) = &origin {
            if cors::is_preflight(&request.method, &request.headers) {
                return Admission::Preflight(cors::preflight_headers(origin, &request.headers));
            }
        }
        let token = match self.tokens.authenticate(&mut request.headers) {
            Ok(name) => name.map(str::to_owned),
            Err(TokenRejection::Unauthorized) => return reject(Refusal::Unauthorized, origin),
            Err(TokenRejection::RateLimited(wait)) => {
                return reject(Refusal::RateLimited(wait), origin)
            }
        };
        Admission::Forward { origin, token }
    }
}

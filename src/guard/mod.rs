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
pub(crate) mod origin;
pub mod paths;
pub(crate) mod tokens;

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, HeaderValue};

use crate::config::AccessSettings;
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

/// Why admission refused a request; the data path turns it into its
/// JSON error (`proxy::error::Refusal`), so the guard names nothing above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The `Host` is not a loopback or configured name (DNS rebinding).
    HostNotAllowed,
    /// The request's `Origin` is not allowed.
    OriginNotAllowed,
    /// An access token is required and none (or a wrong one) was presented.
    Unauthorized,
    /// The access token's rate limit is used up; retry after this long.
    RateLimited(Duration),
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
        error: Denied,
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
        // The origin is classified first only so that a refusal for another
        // reason can tell an allowed page why; the host still decides first.
        let verdict = self.cors.verdict(&request.headers);
        let allowed = match &verdict {
            OriginVerdict::Allowed(origin) => Some(origin.clone()),
            OriginVerdict::Absent | OriginVerdict::Denied => None,
        };
        if !self.hosts.allows(&request.uri, &request.headers) {
            return reject(Denied::HostNotAllowed, allowed);
        }
        if verdict == OriginVerdict::Denied {
            return reject(Denied::OriginNotAllowed, None);
        }
        let origin = allowed;
        if let Some(origin) = &origin {
            if cors::is_preflight(&request.method, &request.headers) {
                return Admission::Preflight(self.cors.preflight_headers(origin, &request.headers));
            }
        }
        let token = match self.tokens.authenticate(&mut request.headers) {
            Ok(name) => name.map(str::to_owned),
            Err(TokenRejection::Unauthorized) => return reject(Denied::Unauthorized, origin),
            Err(TokenRejection::RateLimited(wait)) => {
                return reject(Denied::RateLimited(wait), origin)
            }
        };
        Admission::Forward { origin, token }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::tests::sources;

    const TOKEN: &str = "a-local-token-0123456789";

    /// A guard allowing one origin and requiring the token in `APP_TOKEN`.
    fn guard() -> Guard {
        let config = crate::config::load(&sources(&[
            ("BASETEN_API_KEY", "k-123"),
            ("KEYRELAY_UPSTREAM", "https://example.test"),
            ("KEYRELAY_ALLOWED_ORIGINS", "http://localhost:5173"),
            ("KEYRELAY_ACCESS_TOKEN_ENV", "APP_TOKEN"),
            ("APP_TOKEN", TOKEN),
        ]))
        .expect("valid config");
        Guard::new(&config.access)
    }

    fn parts(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = http::Request::builder()
            .method(method)
            .uri("/v1/chat/completions");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("request").into_parts().0
    }

    fn refusal(admission: Admission) -> (Denied, Option<HeaderValue>) {
        match admission {
            Admission::Reject { error, origin } => (error, origin),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const GOOD_HOST: (&str, &str) = ("host", "127.0.0.1:8080");
    const BAD_HOST: (&str, &str) = ("host", "attacker.test");
    const GOOD_ORIGIN: (&str, &str) = ("origin", "http://localhost:5173");
    const BAD_ORIGIN: (&str, &str) = ("origin", "https://evil.test");
    const PREFLIGHT: (&str, &str) = ("access-control-request-method", "POST");
    const BEARER: (&str, &str) = ("authorization", "Bearer a-local-token-0123456789");

    #[test]
    fn admission_checks_host_then_origin_then_preflight_then_token() {
        let guard = guard();

        // The host comes first: a rebinding page is refused whatever else it sends.
        let (error, origin) = refusal(guard.admit(&mut parts("POST", &[BAD_HOST, BAD_ORIGIN])));
        assert_eq!(error, Denied::HostNotAllowed);
        assert!(origin.is_none());

        // An allowed page that used a name keyrelay does not accept may read why.
        let (error, origin) = refusal(guard.admit(&mut parts("POST", &[BAD_HOST, GOOD_ORIGIN])));
        assert_eq!(error, Denied::HostNotAllowed);
        assert!(origin.is_some(), "an allowed origin is told why");

        // Then the origin, before any token is looked at.
        let (error, origin) = refusal(guard.admit(&mut parts("POST", &[GOOD_HOST, BAD_ORIGIN])));
        assert_eq!(error, Denied::OriginNotAllowed);
        assert!(origin.is_none(), "a disallowed origin is told nothing");

        // An allowed origin's preflight is answered without a token (browsers send none).
        let mut preflight = parts("OPTIONS", &[GOOD_HOST, GOOD_ORIGIN, PREFLIGHT]);
        assert!(matches!(
            guard.admit(&mut preflight),
            Admission::Preflight(_)
        ));

        // Its real request still needs the token, and the refusal carries the
        // origin so the page can read why.
        let (error, origin) = refusal(guard.admit(&mut parts("POST", &[GOOD_HOST, GOOD_ORIGIN])));
        assert_eq!(error, Denied::Unauthorized);
        assert_eq!(
            origin.as_ref().map(HeaderValue::as_bytes),
            Some(&b"http://localhost:5173"[..])
        );

        // With the token it is forwarded, named, and the token is taken off the request.
        let mut admitted = parts("POST", &[GOOD_HOST, GOOD_ORIGIN, BEARER]);
        match guard.admit(&mut admitted) {
            Admission::Forward { origin, token } => {
                assert!(origin.is_some());
                assert_eq!(token.as_deref(), Some("APP_TOKEN"));
            }
            other => panic!("expected Forward, got {other:?}"),
        }
        assert!(admitted.headers.get("authorization").is_none());
    }
}

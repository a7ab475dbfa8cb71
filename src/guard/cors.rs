//! Origin check and CORS, answered by keyrelay itself.
//!
//! Any request carrying an `Origin` that is not on the allowlist is refused,
//! whatever its method or content type: a "simple" cross-site POST needs no
//! preflight, so CORS headers alone would not stop a hostile page from
//! spending the user's key. No origin is allowed by default. Requests without
//! `Origin` (curl, SDKs, servers) are not affected by this check; the host
//! check and access tokens cover them.
//!
//! For allowed origins keyrelay answers preflights locally (never upstream),
//! echoing the exact origin (never `*`) with `Vary: Origin`, and says yes to
//! the Private Network Access question older Chromes ask. Every answer to an
//! allowed origin, refusals included, carries the CORS headers, so the page
//! can read keyrelay's JSON reason; a disallowed origin is told nothing.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::origin::AllowedOrigin;

/// Methods offered to allowed origins.
const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";

/// Request headers offered when a preflight does not list any.
const DEFAULT_ALLOWED_HEADERS: &str = "authorization, content-type, accept, x-keyrelay-token";

/// Response headers browsers may read: the ones model clients care about.
const EXPOSED_HEADERS: &str =
    "x-baseten-request-id, x-request-id, x-baseten-model-prediction-attempts, \
     x-baseten-error-source, x-baseten-error-code, retry-after, server-timing";

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// Fetch metadata: where a browser request comes from, sent even without Origin.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Chrome's Private Network Access preflight question and answer. Chromium
/// replaced it with Local Network Access (a user permission, no header) and
/// no longer asks; older versions still do.
const PNA_REQUEST: &str = "access-control-request-private-network";
const PNA_ALLOW: &str = "access-control-allow-private-network";

/// Lets the page read `Server-Timing` and the detailed resource timing of
/// keyrelay's answers (`PerformanceResourceTiming`), which browsers hide
/// from cross-origin pages without it.
const TIMING_ALLOW_ORIGIN: HeaderName = HeaderName::from_static("timing-allow-origin");

/// What the request's `Origin` means for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginVerdict {
    /// No `Origin` header: not a cross-origin browser request.
    Absent,
    /// An allowed origin; responses must carry it back.
    Allowed(HeaderValue),
    /// An origin not on the allowlist (or a malformed one).
    Denied,
}

/// The configured origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsPolicy {
    origins: Vec<AllowedOrigin>,
    /// `allow_credentials`: pages may send cookies and HTTP auth
    /// (`credentials: "include"`, axios `withCredentials`). Config checks
    /// keep it to exact origins.
    allow_credentials: bool,
}

impl CorsPolicy {
    /// Allows `origins` (checked entries, see [`AllowedOrigin::parse`]).
    pub fn new(origins: Vec<AllowedOrigin>, allow_credentials: bool) -> Self {
        Self {
            origins,
            allow_credentials,
        }
    }

    /// Also allows `origin` (the demo allows its own page this way).
    pub fn allow(&mut self, origin: AllowedOrigin) {
        self.origins.push(origin);
    }

    /// Classifies the request's `Origin` header(s).
    pub fn verdict(&self, headers: &HeaderMap) -> OriginVerdict {
        let mut values = headers.get_all(ORIGIN).iter();
        let Some(origin) = values.next() else {
            // Browsers omit Origin on no-cors GETs (`<img src>`, `<script src>`,
            // navigations) but mark them with Sec-Fetch-Site; another site's
            // page must not be able to spend the key that way either.
            return match headers.get(SEC_FETCH_SITE).map(HeaderValue::as_bytes) {
                Some(b"cross-site" | b"same-site") => OriginVerdict::Denied,
                _ => OriginVerdict::Absent,
            };
        };
        if values.next().is_some() {
            return OriginVerdict::Denied;
        }
        let allowed = self.origins.iter().any(|o| o.matches(origin.as_bytes()));
        if allowed {
            OriginVerdict::Allowed(origin.clone())
        } else {
            OriginVerdict::Denied
        }
    }

    /// Headers answering a preflight from the allowed `origin`.
    pub fn preflight_headers(&self, origin: &HeaderValue, request: &HeaderMap) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.add_origin_headers(&mut headers, origin);
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        // The origin is trusted, so the headers it asks for (SDKs send
        // x-stainless-* and others that change between versions) are granted.
        let asked = request
            .get(ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_ALLOWED_HEADERS));
        headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked);
        headers.insert(
            ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECS),
        );
        let asks_private_network = request
            .get(PNA_REQUEST)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        if asks_private_network {
            headers.insert(
                HeaderName::from_static(PNA_ALLOW),
                HeaderValue::from_static("true"),
            );
        }
        headers
    }

    /// Adds the CORS headers every answer to the allowed `origin` carries,
    /// replacing any the upstream sent: keyrelay decides what the browser
    /// may read, and an upstream's `Access-Control-Allow-Credentials` must
    /// not grant what `allow_credentials` does not.
    pub fn add_origin_headers(&self, headers: &mut HeaderMap, origin: &HeaderValue) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.append(VARY, HeaderValue::from_static("origin"));
        headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
        headers.insert(TIMING_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        } else {
            headers.remove(ACCESS_CONTROL_ALLOW_CREDENTIALS);
        }
    }
}

/// True for a CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`.
pub(crate) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], allow_credentials: bool) -> CorsPolicy {
        let origins = origins
            .iter()
            .map(|o| AllowedOrigin::parse(o).expect("valid origin"))
            .collect();
        CorsPolicy::new(origins, allow_credentials)
    }

    fn with_origin(origin: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, HeaderValue::from_str(origin).expect("value"));
        headers
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let policy = CorsPolicy::default();
        assert_eq!(policy.verdict(&HeaderMap::new()), OriginVerdict::Absent);
        assert_eq!(
            policy.verdict(&with_origin("http://localhost:3000")),
            OriginVerdict::Denied
        );
        assert_eq!(policy.verdict(&with_origin("null")), OriginVerdict::Denied);
    }

    #[test]
    fn cross_site_browser_requests_without_origin_are_denied() {
        let policy = CorsPolicy::default();
        for site in ["cross-site", "same-site"] {
            let mut headers = HeaderMap::new();
            headers.insert(SEC_FETCH_SITE, HeaderValue::from_static(site));
            assert_eq!(policy.verdict(&headers), OriginVerdict::Denied, "{site}");
        }
        for site in ["same-origin", "none"] {
            let mut headers = HeaderMap::new();
            headers.insert(SEC_FETCH_SITE, HeaderValue::from_static(site));
            assert_eq!(policy.verdict(&headers), OriginVerdict::Absent, "{site}");
        }
    }

    #[test]
    fn configured_origins_match_exactly() {
        let policy = policy(&["http://localhost:3000/"], false);
        assert!(matches!(
            policy.verdict(&with_origin("http://LOCALHOST:3000")),
            OriginVerdict::Allowed(_)
        ));
        for other in [
            "http://localhost:3001",
            "https://localhost:3000",
            "http://localhost:3000.evil",
        ] {
            assert_eq!(
                policy.verdict(&with_origin(other)),
                OriginVerdict::Denied,
                "{other}"
            );
        }
    }

    #[test]
    fn a_loopback_port_wildcard_allows_any_dev_server_port() {
        let policy = policy(&["http://localhost:*", "http://127.0.0.1:3000"], false);
        for allowed in [
            "http://localhost:5173",
            "http://localhost:3001",
            "http://127.0.0.1:3000",
        ] {
            assert!(
                matches!(policy.verdict(&with_origin(allowed)), OriginVerdict::Allowed(ref o) if o == allowed),
                "{allowed}"
            );
        }
        for denied in [
            "http://127.0.0.1:5173",
            "https://localhost:5173",
            "http://localhost.evil:1",
        ] {
            assert_eq!(
                policy.verdict(&with_origin(denied)),
                OriginVerdict::Denied,
                "{denied}"
            );
        }
    }

    #[test]
    fn answers_let_the_page_read_timing_and_credentials_only_when_allowed() {
        let origin = HeaderValue::from_static("http://localhost:3000");
        let mut upstream = HeaderMap::new();
        upstream.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        upstream.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );

        let mut headers = upstream.clone();
        policy(&["http://localhost:3000"], false).add_origin_headers(&mut headers, &origin);
        assert_eq!(
            headers[ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://localhost:3000"
        );
        assert_eq!(headers[TIMING_ALLOW_ORIGIN], "http://localhost:3000");
        assert!(
            headers.get(ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none(),
            "the upstream's grant is not relayed"
        );

        let mut headers = upstream;
        policy(&["http://localhost:3000"], true).add_origin_headers(&mut headers, &origin);
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        let preflight = policy(&["http://localhost:3000"], true)
            .preflight_headers(&origin, &with_origin("http://localhost:3000"));
        assert_eq!(preflight[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    }

    #[test]
    fn preflight_echoes_origin_and_answers_private_network() {
        let origin = HeaderValue::from_static("http://localhost:3000");
        let mut request = with_origin("http://localhost:3000");
        request.insert(
            ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        request.insert(
            ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("authorization, x-stainless-os"),
        );
        request.insert(PNA_REQUEST, HeaderValue::from_static("true"));
        assert!(is_preflight(&Method::OPTIONS, &request));
        let answer = policy(&["http://localhost:3000"], false).preflight_headers(&origin, &request);
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_ORIGIN], "http://localhost:3000");
        assert_eq!(
            answer[ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, x-stainless-os"
        );
        assert_eq!(answer[VARY], "origin");
        assert_eq!(answer[PNA_ALLOW], "true");
    }
}

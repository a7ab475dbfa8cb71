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
//! Chrome's Private Network Access question.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

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

/// Chrome's Private Network Access preflight question and answer.
const PNA_REQUEST: &str = "access-control-request-private-network";
const PNA_ALLOW: &str = "access-control-allow-private-network";

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
    origins: Vec<String>,
}

impl CorsPolicy {
    /// Allows exactly `origins` (e.g. `http://localhost:3000`), compared
    /// case-insensitively and without a trailing slash.
    pub fn new(origins: &[String]) -> Self {
        Self {
            origins: origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        }
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
        let allowed = origin
            .to_str()
            .is_ok_and(|text| self.origins.iter().any(|o| o.eq_ignore_ascii_case(text)));
        if allowed {
            OriginVerdict::Allowed(origin.clone())
        } else {
            OriginVerdict::Denied
        }
    }
}

/// True for a CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// Headers answering a preflight from the allowed `origin`.
pub fn preflight_headers(origin: &HeaderValue, request: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    add_origin_headers(&mut headers, origin);
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

/// Adds the CORS headers an actual response to `origin` carries.
pub fn add_origin_headers(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.append(VARY, HeaderValue::from_static("origin"));
    headers.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED_HEADERS),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let policy = CorsPolicy::new(&["http://localhost:3000/".to_owned()]);
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
        let answer = preflight_headers(&origin, &request);
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_ORIGIN], "http://localhost:3000");
        assert_eq!(
            answer[ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, x-stainless-os"
        );
        assert_eq!(answer[VARY], "origin");
        assert_eq!(answer[PNA_ALLOW], "true");
    }
}

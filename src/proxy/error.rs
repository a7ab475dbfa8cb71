//! Proxy failures, grouped by source, each mapped to a status code and a short JSON body.
//!
//! Clients get `{"error": "...", "type": "...", "source": "keyrelay"}`: the
//! `error` string matches the shape of Baseten's own error bodies, `type` is
//! stable for programs to branch on, and `source` tells a keyrelay failure
//! apart from an error the upstream returned (those are passed through as is).
//! Nothing here ever includes a credential.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::guard::Denied;
use crate::proxy::upstream::{Cause, SendError};
use crate::secrets::credential::Unavailable;
use crate::telemetry::record::Outcome;
use crate::usage::budget::Exhausted;

/// Why keyrelay could not relay a request, grouped by where the failure came
/// from: the status class, the metric, the outcome and "is it upstream's
/// fault" follow from the group, so a new variant cannot be forgotten in one
/// of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    /// keyrelay's own policy said no: admission, limits, routing (4xx, 503).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The client's request cannot be forwarded as sent (4xx, 501).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The upstream, or the way to it, failed (502, 504).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// The `Allow` header of a 405: the standard methods keyrelay relays
/// (CONNECT, TRACE and TRACK are answered here).
const RELAYED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Requests keyrelay turns away by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The `Host` is not a loopback or configured name (DNS rebinding defence).
    #[error(
        "the Host header is not a loopback name or one in allowed_hosts \
         (keyrelay refuses other names to defeat DNS rebinding)"
    )]
    HostNotAllowed,
    /// The request carries an `Origin` that is not allowed.
    #[error("requests from this Origin are not allowed; add it to allowed_origins")]
    OriginNotAllowed,
    /// Access tokens are required and none (or a wrong one) was presented.
    #[error(
        "a local access token is required: send it as `Authorization: Bearer <token>` \
         or in the X-Keyrelay-Token header"
    )]
    Unauthorized,
    /// The access token's request rate is used up; retry after this long.
    #[error("this access token's request rate is used up; retry in {}s", retry_after_secs(*.0))]
    RateLimited(Duration),
    /// A token budget of the request is used up in its current window.
    #[error(
        "the token budget {} is used up; retry in {}s",
        .0.budget,
        retry_after_secs(.0.retry_after)
    )]
    BudgetExhausted(Exhausted),
    /// The route's credential has expired and its source (key_command,
    /// OAuth2) has not produced a new one; it tries again in this long.
    #[error(
        "this route's upstream credential has expired and its source (key_command or the \
         OAuth2 token endpoint) has not produced a new one yet (keyrelay never sends an expired credential); retry in {}s",
        retry_after_secs(*.0)
    )]
    CredentialUnavailable(Duration),
    /// The shared usage_store is unreachable and usage_store_unavailable is deny.
    #[error("the usage_store (Redis) that counts token budgets is unreachable; retry shortly")]
    UsageStoreUnavailable,
    /// The path policy does not allow this method and path.
    #[error("this method and path are not in keyrelay's allowed_paths")]
    PathNotAllowed,
    /// TRACE or TRACK, which echo the request (credential included) back:
    /// answered here unless the route's allowed_paths names the method.
    #[error(
        "{0} is not forwarded: it would echo the request, with the key keyrelay adds, \
         back to the client; a route's allowed_paths can allow it by naming it"
    )]
    MethodNotAllowed(&'static str),
    /// No route's prefix matches the path; these are the configured prefixes.
    #[error("no route matches this path; configured prefixes: {}", .0.join(", "))]
    NoRoute(Vec<String>),
    /// `max_concurrent_requests` are already in flight.
    #[error("keyrelay is at max_concurrent_requests; retry shortly")]
    Overloaded,
    /// The request body is larger than `max_request_body` (the limit in bytes).
    #[error("request body larger than max_request_body ({0} bytes)")]
    PayloadTooLarge(u64),
    /// The request names a model the route's `allowed_models` leaves out.
    #[error(
        "the model this request names (or its lack of one) is not in this route's allowed_models"
    )]
    ModelNotAllowed,
    /// The request asks for more output tokens than `max_output_tokens`.
    #[error(
        "the request asks for {asked} output tokens; this route's max_output_tokens \
         (or access_token_max_output_tokens) is {cap} (over_max_output_tokens = \"refuse\")"
    )]
    OutputTokensOverCap { asked: u64, cap: u64 },
}

impl From<Unavailable> for ProxyError {
    fn from(unavailable: Unavailable) -> Self {
        Refusal::CredentialUnavailable(unavailable.retry_after).into()
    }
}

impl From<Denied> for Refusal {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::HostNotAllowed => Self::HostNotAllowed,
            Denied::OriginNotAllowed => Self::OriginNotAllowed,
            Denied::Unauthorized => Self::Unauthorized,
            Denied::RateLimited(wait) => Self::RateLimited(wait),
        }
    }
}

/// Requests that cannot be forwarded as the client sent them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The client used CONNECT; keyrelay only forwards to its one upstream.
    #[error("CONNECT is not supported: keyrelay forwards only to its configured upstream")]
    ConnectNotSupported,
    /// The request target is not a path (e.g. `OPTIONS *`).
    #[error("the request target must be a path such as /v1/chat/completions")]
    BadRequestTarget,
    /// A stage prefix (`/environments/...`) on a route to a regional host.
    #[error(
        "this route calls a regional Baseten host (model-ID-ENV.api.baseten.co), which \
         names the environment itself and takes bare paths such as /predict or \
         /v1/chat/completions; drop the stage prefix"
    )]
    StagedPathOnRegionalHost,
    /// The client's request body was malformed.
    #[error("the request body is malformed (bad chunk framing)")]
    BadRequestBody,
    /// The client went away before its request body ended. Nobody reads
    /// the answer; the access log and metrics count it as cancelled.
    #[error(
        "the client closed the connection (or cancelled the stream) before the end of \
         the announced request body"
    )]
    ClientClosedRequest,
    /// A rule of the route needs the body read and it cannot be.
    #[error(
        "this route's request rules (allowed_models, max_output_tokens, their \
         access_token_* variants, or unparsed_budget_requests = \"refuse\") need the request body to be one JSON \
         object of at most 1 MiB with numeric token limits, naming each key once and the keys \
         keyrelay reads (model, stream, max_tokens, n...) in lower case; this one is not"
    )]
    UnreadableBody,
    /// The client paused its request body longer than `request_body_timeout`.
    #[error("the request body stopped arriving: nothing came for request_body_timeout ({0:?})")]
    RequestBodyTimeout(Duration),
    /// The request uses a transfer coding other than chunked (e.g. gzip).
    #[error(
        "only the chunked transfer coding is supported; keyrelay would otherwise \
         forward coded bytes the upstream could not tell were coded"
    )]
    UnsupportedTransferCoding,
    /// With `allowed_paths` set, a path servers could resolve differently
    /// (a dot segment, `;`, an encoded `%`, ...; the text says which).
    #[error(
        "the path has {0}; with allowed_paths set, keyrelay refuses paths that servers \
         resolve differently rather than guess which one the upstream would serve"
    )]
    AmbiguousPath(&'static str),
}

/// Failures of the upstream or of the way to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The upstream's host name did not resolve.
    #[error("upstream host name did not resolve (DNS failure)")]
    Dns,
    /// The upstream refused the TCP connection.
    #[error("upstream refused the connection")]
    Refused,
    /// DNS + TCP + TLS did not complete within `connect_timeout`.
    #[error("connecting to the upstream took longer than connect_timeout ({0:?})")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed; the text says why (untrusted, wrong name, ...).
    #[error("TLS handshake with the upstream failed: {0}")]
    Tls(String),
    /// Any other failure to connect.
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    /// The upstream closed the connection before sending response headers.
    #[error("upstream closed the connection before sending a response")]
    Closed,
    /// The upstream answered with something that is not valid HTTP.
    #[error("upstream sent an invalid response: {0}")]
    Protocol(String),
    /// No response headers within `response_header_timeout`.
    #[error("upstream sent no response headers within response_header_timeout ({0:?})")]
    HeaderTimeout(Duration),
    /// The upstream switched protocols (101) on a request that asked for no upgrade.
    #[error("upstream answered 101 Switching Protocols to a request that asked for no upgrade")]
    UnrequestedUpgrade,
}

impl ProxyError {
    /// The status code the client receives.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Refused(refusal) => refusal.status(),
            Self::Client(error) => error.status(),
            Self::Upstream(error) => error.status(),
        }
    }

    /// The upstream's failure, when it was the upstream (or the way to it)
    /// that failed, as opposed to keyrelay refusing the request.
    pub(crate) fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            Self::Upstream(error) => Some(error),
            Self::Refused(_) | Self::Client(_) => None,
        }
    }

    /// How the request ended, for the per-request record.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Self::Upstream(error) if error.is_timeout() => Outcome::Timeout,
            Self::Upstream(_) => Outcome::UpstreamError,
            Self::Client(ClientError::ClientClosedRequest) => Outcome::ClientCancelled,
            Self::Refused(_) | Self::Client(_) => Outcome::Rejected,
        }
    }

    /// A stable machine-readable name, also used in logs and metric labels.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Refused(refusal) => refusal.kind(),
            Self::Client(error) => error.kind(),
            Self::Upstream(error) => error.kind(),
        }
    }

    /// The JSON error response for this failure; `upstream` (host and port,
    /// never a credential) tells the client which endpoint keyrelay was trying.
    pub(crate) fn to_response(&self, upstream: Option<&str>) -> Response<Full<Bytes>> {
        let mut body = serde_json::json!({
            "error": self.to_string(),
            "type": self.kind(),
            "source": "keyrelay",
        });
        if let Some(upstream) = upstream {
            body["upstream"] = upstream.into();
        }
        if let Self::Refused(Refusal::NoRoute(prefixes)) = self {
            body["routes"] = prefixes.clone().into();
        }
        if let Self::Refused(Refusal::BudgetExhausted(exhausted)) = self {
            body["budget"] = exhausted.budget.clone().into();
        }
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Self::Refused(Refusal::RateLimited(wait) | Refusal::CredentialUnavailable(wait)) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(*wait)));
            }
            Self::Refused(Refusal::BudgetExhausted(exhausted)) => {
                headers.insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(exhausted.retry_after)),
                );
            }
            Self::Refused(Refusal::MethodNotAllowed(_)) => {
                // The methods keyrelay relays; the upstream decides the rest.
                headers.insert(ALLOW, HeaderValue::from_static(RELAYED_METHODS));
            }
            Self::Refused(Refusal::Unauthorized) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Refused(Refusal::Overloaded | Refusal::UsageStoreUnavailable) => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }

    /// The answer for a request that failed on its way upstream: the one
    /// place a [`SendError`]'s cause becomes what the client sees. Most
    /// causes are the upstream's (or the way to it), but the client's own
    /// body fails there too as it is streamed (malformed, too slow, or over
    /// `max_request_body`), and those are the client's.
    pub(crate) fn from_send_error(err: &SendError, connect_timeout: Duration) -> Self {
        match err.cause() {
            Cause::BodyTooLarge(limit) => Refusal::PayloadTooLarge(*limit).into(),
            Cause::BodyTimeout(limit) => ClientError::RequestBodyTimeout(*limit).into(),
            Cause::BadBody => ClientError::BadRequestBody.into(),
            Cause::ClientGone => ClientError::ClientClosedRequest.into(),
            Cause::Tls(tls) => UpstreamError::Tls(describe_tls(tls)).into(),
            Cause::Dns => UpstreamError::Dns.into(),
            Cause::Refused => UpstreamError::Refused.into(),
            Cause::ConnectTimeout => UpstreamError::ConnectTimeout(connect_timeout).into(),
            Cause::Connect => UpstreamError::Connect(err.detail()).into(),
            Cause::Closed => UpstreamError::Closed.into(),
            Cause::Protocol => UpstreamError::Protocol(err.detail()).into(),
        }
    }
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::HostNotAllowed
            | Self::OriginNotAllowed
            | Self::PathNotAllowed
            | Self::ModelNotAllowed
            | Self::OutputTokensOverCap { .. } => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::RateLimited(_) | Self::BudgetExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Overloaded | Self::UsageStoreUnavailable | Self::CredentialUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::HostNotAllowed => "host_not_allowed",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited(_) => "rate_limited",
            Self::BudgetExhausted(_) => "token_budget_exhausted",
            Self::UsageStoreUnavailable => "usage_store_unavailable",
            Self::CredentialUnavailable(_) => "credential_unavailable",
            Self::PathNotAllowed => "path_not_allowed",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::NoRoute(_) => "no_route",
            Self::Overloaded => "overloaded",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::ModelNotAllowed => "model_not_allowed",
            Self::OutputTokensOverCap { .. } => "max_output_tokens_exceeded",
        }
    }
}

impl ClientError {
    fn status(&self) -> StatusCode {
        match self {
            Self::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadRequestTarget
            | Self::BadRequestBody
            | Self::ClientClosedRequest
            | Self::StagedPathOnRegionalHost
            | Self::UnreadableBody
            | Self::AmbiguousPath(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Self::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::ConnectNotSupported => "connect_not_supported",
            Self::BadRequestTarget => "bad_request_target",
            Self::BadRequestBody => "bad_request_body",
            Self::ClientClosedRequest => "client_closed_request",
            Self::StagedPathOnRegionalHost => "staged_path_on_regional_host",
            Self::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Self::UnreadableBody => "unreadable_request_body",
            Self::AmbiguousPath(_) => "ambiguous_path",
            Self::RequestBodyTimeout(_) => "request_body_timeout",
        }
    }
}

impl UpstreamError {
    /// Timeouts answer 504 and count as the `timeout` outcome.
    fn is_timeout(&self) -> bool {
        matches!(self, Self::ConnectTimeout(_) | Self::HeaderTimeout(_))
    }

    fn status(&self) -> StatusCode {
        if self.is_timeout() {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        }
    }

    /// The metric label and the JSON `type`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Dns => "upstream_dns",
            Self::Refused => "upstream_refused",
            Self::ConnectTimeout(_) => "upstream_connect_timeout",
            Self::Tls(_) => "upstream_tls",
            Self::Connect(_) => "upstream_connect",
            Self::Closed => "upstream_closed",
            Self::Protocol(_) => "upstream_protocol",
            Self::HeaderTimeout(_) => "upstream_header_timeout",
            Self::UnrequestedUpgrade => "upstream_unrequested_upgrade",
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up so a client never retries too early.
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// Says in plain words why the upstream's certificate was refused.
fn describe_tls(err: &rustls::Error) -> String {
    use rustls::CertificateError as Cert;
    match err {
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => {
            "the upstream's certificate is not signed by a trusted CA (unknown issuer); \
             add the CA with ca_file if this upstream is private"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => "the upstream's certificate is not valid for its host name (wrong name)".to_owned(),
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the upstream's certificate has expired".to_owned()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_gateway_conventions() {
        let refused = ProxyError::from(UpstreamError::Refused);
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(refused.outcome(), Outcome::UpstreamError);
        let slow = ProxyError::from(UpstreamError::HeaderTimeout(Duration::from_secs(1)));
        assert_eq!(slow.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(slow.outcome(), Outcome::Timeout);
        let connect = ProxyError::from(ClientError::ConnectNotSupported);
        assert_eq!(connect.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(connect.outcome(), Outcome::Rejected);
        assert!(connect.upstream().is_none());
    }

    #[test]
    fn messages_and_kinds_stay_as_clients_see_them() {
        let wait = ProxyError::from(Refusal::RateLimited(Duration::from_millis(1_500)));
        assert_eq!(
            wait.to_string(),
            "this access token's request rate is used up; retry in 2s"
        );
        assert_eq!(wait.kind(), "rate_limited");
        let no_route = ProxyError::from(Refusal::NoRoute(vec!["/a".into(), "/b".into()]));
        assert_eq!(
            no_route.to_string(),
            "no route matches this path; configured prefixes: /a, /b"
        );
        let tls = ProxyError::from(UpstreamError::Tls("wrong name".into()));
        assert_eq!(
            tls.to_string(),
            "TLS handshake with the upstream failed: wrong name"
        );
        assert_eq!(tls.kind(), "upstream_tls");
        let expired = ProxyError::from(Unavailable {
            retry_after: Duration::from_millis(2_500),
        });
        assert_eq!(expired.kind(), "credential_unavailable");
        assert_eq!(expired.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = expired.to_response(None);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
    }

    #[test]
    fn tls_reasons_are_named() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(describe_tls(&unknown).contains("unknown issuer"));
        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert!(describe_tls(&name).contains("wrong name"));
    }
}

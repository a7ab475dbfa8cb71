//! Proxy failures, each mapped to a status code and a short JSON body.
//!
//! Clients get `{"error": "...", "type": "...", "source": "keyrelay"}`: the
//! `error` string matches the shape of Baseten's own error bodies, `type` is
//! stable for programs to branch on, and `source` tells a keyrelay failure
//! apart from an error the upstream returned (those are passed through as is).
//! Nothing here ever includes a credential.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Why keyrelay could not relay a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The client used CONNECT; keyrelay only forwards to its one upstream.
    ConnectNotSupported,
    /// The request target is not a path (e.g. `OPTIONS *`).
    BadRequestTarget,
    /// The client's request body was malformed or cut short.
    BadRequestBody,
    /// The request uses a transfer coding other than chunked (e.g. gzip).
    UnsupportedTransferCoding,
    /// The `Host` is not a loopback or configured name (DNS rebinding defence).
    HostNotAllowed,
    /// The request carries an `Origin` that is not allowed.
    OriginNotAllowed,
    /// Access tokens are required and none (or a wrong one) was presented.
    Unauthorized,
    /// The access token's request rate is used up; retry after this long.
    RateLimited(Duration),
    /// The path policy does not allow this method and path.
    PathNotAllowed,
    /// No route's prefix matches the path; these are the configured prefixes.
    NoRoute(Vec<String>),
    /// `max_concurrent_requests` are already in flight.
    Overloaded,
    /// The request body is larger than `max_request_body` (the limit in bytes).
    PayloadTooLarge(u64),
    /// The upstream's host name did not resolve.
    UpstreamDns,
    /// The upstream refused the TCP connection.
    UpstreamRefused,
    /// DNS + TCP + TLS did not complete within `connect_timeout`.
    UpstreamConnectTimeout(Duration),
    /// The TLS handshake failed; the text says why (untrusted, wrong name, ...).
    UpstreamTls(String),
    /// Any other failure to connect.
    UpstreamConnect(String),
    /// The upstream closed the connection before sending response headers.
    UpstreamClosed,
    /// The upstream answered with something that is not valid HTTP.
    UpstreamProtocol(String),
    /// No response headers within `response_header_timeout`.
    ResponseHeaderTimeout(Duration),
}

impl ProxyError {
    /// The status code the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadRequestTarget | Self::BadRequestBody => StatusCode::BAD_REQUEST,
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Self::HostNotAllowed | Self::OriginNotAllowed | Self::PathNotAllowed => {
                StatusCode::FORBIDDEN
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamConnectTimeout(_) | Self::ResponseHeaderTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::UpstreamDns
            | Self::UpstreamRefused
            | Self::UpstreamTls(_)
            | Self::UpstreamConnect(_)
            | Self::UpstreamClosed
            | Self::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// True when the upstream (or the way to it) failed, as opposed to
    /// keyrelay refusing the request itself.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Self::UpstreamDns
                | Self::UpstreamRefused
                | Self::UpstreamConnectTimeout(_)
                | Self::UpstreamTls(_)
                | Self::UpstreamConnect(_)
                | Self::UpstreamClosed
                | Self::UpstreamProtocol(_)
                | Self::ResponseHeaderTimeout(_)
        )
    }

    /// A stable machine-readable name, also used in logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConnectNotSupported => "connect_not_supported",
            Self::BadRequestTarget => "bad_request_target",
            Self::BadRequestBody => "bad_request_body",
            Self::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Self::HostNotAllowed => "host_not_allowed",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited(_) => "rate_limited",
            Self::PathNotAllowed => "path_not_allowed",
            Self::NoRoute(_) => "no_route",
            Self::Overloaded => "overloaded",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UpstreamDns => "upstream_dns",
            Self::UpstreamRefused => "upstream_refused",
            Self::UpstreamConnectTimeout(_) => "upstream_connect_timeout",
            Self::UpstreamTls(_) => "upstream_tls",
            Self::UpstreamConnect(_) => "upstream_connect",
            Self::UpstreamClosed => "upstream_closed",
            Self::UpstreamProtocol(_) => "upstream_protocol",
            Self::ResponseHeaderTimeout(_) => "upstream_header_timeout",
        }
    }

    /// The JSON error response for this failure; `upstream` (host and port,
    /// never a credential) tells the client which endpoint keyrelay was trying.
    pub fn to_response(&self, upstream: Option<&str>) -> Response<Full<Bytes>> {
        let mut body = serde_json::json!({
            "error": self.to_string(),
            "type": self.kind(),
            "source": "keyrelay",
        });
        if let Some(upstream) = upstream {
            body["upstream"] = upstream.into();
        }
        if let Self::NoRoute(prefixes) = self {
            body["routes"] = prefixes.clone().into();
        }
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Self::RateLimited(wait) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(*wait)));
            }
            Self::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Overloaded => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }

    /// Maps a failed upstream request to the most specific cause in its error chain.
    pub fn from_upstream(
        err: &hyper_util::client::legacy::Error,
        connect_timeout: Duration,
    ) -> Self {
        let mut cause = Cause::default();
        let mut current: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(err) = current {
            cause.inspect(err);
            // io::Error::source() skips the error it wraps, and TLS errors come
            // wrapped in more than one io::Error, so unwrap each layer too.
            let mut wrapped = io_inner(err);
            while let Some(inner) = wrapped {
                cause.inspect(inner);
                wrapped = io_inner(inner);
            }
            current = err.source();
        }

        if let Some(limit) = cause.body_too_large {
            Self::PayloadTooLarge(limit)
        } else if cause.client_body {
            Self::BadRequestBody
        } else if let Some(tls) = cause.tls {
            Self::UpstreamTls(describe_tls(&tls))
        } else if cause.dns {
            Self::UpstreamDns
        } else if cause.refused {
            Self::UpstreamRefused
        } else if cause.timed_out && err.is_connect() {
            Self::UpstreamConnectTimeout(connect_timeout)
        } else if err.is_connect() {
            Self::UpstreamConnect(cause.innermost)
        } else if cause.closed {
            Self::UpstreamClosed
        } else {
            Self::UpstreamProtocol(cause.innermost)
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectNotSupported => f.write_str(
                "CONNECT is not supported: keyrelay forwards only to its configured upstream",
            ),
            Self::UnsupportedTransferCoding => f.write_str(
                "only the chunked transfer coding is supported; keyrelay would otherwise \
                 forward coded bytes the upstream could not tell were coded",
            ),
            Self::BadRequestBody => f.write_str(
                "the request body is malformed or ended early (bad chunk framing, or the \
                 connection closed before the announced length)",
            ),
            Self::BadRequestTarget => {
                f.write_str("the request target must be a path such as /v1/chat/completions")
            }
            Self::HostNotAllowed => f.write_str(
                "the Host header is not a loopback name or one in allowed_hosts \
                 (keyrelay refuses other names to defeat DNS rebinding)",
            ),
            Self::OriginNotAllowed => {
                f.write_str("requests from this Origin are not allowed; add it to allowed_origins")
            }
            Self::Unauthorized => f.write_str(
                "a local access token is required: send it as `Authorization: Bearer <token>` \
                 or in the X-Keyrelay-Token header",
            ),
            Self::RateLimited(wait) => write!(
                f,
                "this access token's request rate is used up; retry in {}s",
                retry_after_secs(*wait)
            ),
            Self::NoRoute(prefixes) => write!(
                f,
                "no route matches this path; configured prefixes: {}",
                prefixes.join(", ")
            ),
            Self::PathNotAllowed => {
                f.write_str("this method and path are not in keyrelay's allowed_paths")
            }
            Self::Overloaded => {
                f.write_str("keyrelay is at max_concurrent_requests; retry shortly")
            }
            Self::PayloadTooLarge(limit) => {
                write!(
                    f,
                    "request body larger than max_request_body ({limit} bytes)"
                )
            }
            Self::UpstreamDns => f.write_str("upstream host name did not resolve (DNS failure)"),
            Self::UpstreamRefused => f.write_str("upstream refused the connection"),
            Self::UpstreamConnectTimeout(limit) => {
                write!(
                    f,
                    "connecting to the upstream took longer than connect_timeout ({limit:?})"
                )
            }
            Self::UpstreamTls(why) => write!(f, "TLS handshake with the upstream failed: {why}"),
            Self::UpstreamConnect(why) => write!(f, "could not connect to the upstream: {why}"),
            Self::UpstreamClosed => {
                f.write_str("upstream closed the connection before sending a response")
            }
            Self::UpstreamProtocol(why) => write!(f, "upstream sent an invalid response: {why}"),
            Self::ResponseHeaderTimeout(limit) => write!(
                f,
                "upstream sent no response headers within response_header_timeout ({limit:?})"
            ),
        }
    }
}

impl StdError for ProxyError {}

/// What the error chain of a failed upstream request revealed.
#[derive(Default)]
struct Cause {
    tls: Option<rustls::Error>,
    body_too_large: Option<u64>,
    client_body: bool,
    dns: bool,
    refused: bool,
    timed_out: bool,
    closed: bool,
    innermost: String,
}

impl Cause {
    fn inspect(&mut self, err: &(dyn StdError + 'static)) {
        self.innermost = err.to_string();
        self.client_body |= err.is::<crate::proxy::request_body::ClientBodyError>();
        if let Some(too_large) = err.downcast_ref::<crate::proxy::request_body::BodyTooLarge>() {
            self.body_too_large = Some(too_large.0);
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            self.tls.get_or_insert_with(|| tls.clone());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => self.refused = true,
                std::io::ErrorKind::TimedOut => self.timed_out = true,
                _ => {}
            }
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            self.closed |=
                hyper.is_incomplete_message() || hyper.is_closed() || hyper.is_canceled();
        }
        // hyper-util's connector reports resolver failures with this exact text
        // and does not export a type for them.
        self.dns |= err.to_string() == "dns error";
    }
}

/// Whole seconds for `Retry-After`, rounded up so a client never retries too early.
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The error an `io::Error` wraps, if `err` is one.
fn io_inner<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    err.downcast_ref::<std::io::Error>()?
        .get_ref()
        .map(|inner| inner as _)
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
        assert_eq!(
            ProxyError::UpstreamRefused.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ProxyError::ResponseHeaderTimeout(Duration::from_secs(1)).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ProxyError::ConnectNotSupported.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn tls_reasons_are_named() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(describe_tls(&unknown).contains("unknown issuer"));
        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert!(describe_tls(&name).contains("wrong name"));
    }
}

//! The forwarding service: rewrite the target, fix the headers, relay the bodies.
//!
//! This is the whole data path. The request body goes to the upstream frame by
//! frame (a [`RequestBody`] only counts it and enforces `max_request_body`),
//! and the upstream's body comes back wrapped in a [`RelayBody`] that hands
//! each frame on as it arrives. Nothing is collected.
//!
//! The request target is always rebuilt from the configured upstream plus the
//! client's path and query (byte for byte), so an absolute-form request such as
//! `GET http://elsewhere/ HTTP/1.1` can never make keyrelay contact another host.

pub(crate) mod error;
pub mod headers;
pub(crate) mod request_body;
pub(crate) mod response_body;
pub mod route_table;
pub(crate) mod tunnel;
pub(crate) mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::config::{Config, Timeouts};
use crate::guard::tokens::AccessTokens;
use crate::guard::{cors, Admission, Guard};
use crate::ops::metrics::{Metrics, RouteMetrics};
use crate::ops::request_record::{Outcome, RequestLog};
use crate::proxy::error::ProxyError;
use crate::proxy::request_body::RequestBody;
use crate::proxy::response_body::RelayBody;
use crate::proxy::route_table::{Route, RouteTable};
use crate::proxy::tunnel::Tunnels;
use crate::proxy::upstream::{build_client, UpstreamClient};

/// The route label of requests that match no route.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Baseten's id for a prediction, preferred in logs when the upstream sends it.
const BASETEN_REQUEST_ID: HeaderName = HeaderName::from_static("x-baseten-request-id");

/// The request id keyrelay sends upstream and back when Baseten's is absent.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Tells developers (browser devtools, curl -v) how long keyrelay itself took.
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

fn server_timing(overhead: std::time::Duration) -> HeaderValue {
    let micros = overhead.as_micros().min(u128::from(u64::MAX)) as u64;
    let fraction = micros % 1000;
    let mut value = ShortValue::default();
    value
        .text("keyrelay;desc=\"proxy overhead\";dur=")
        .decimal(micros / 1000)
        .text(".")
        .decimal_padded(fraction, 3);
    value.finish()
}

/// Writes a short header value (a request id, a timing) on the stack, so it
/// costs one allocation and no `fmt` machinery: both run on every request,
/// and `format!` showed up in the profiles.
struct ShortValue {
    bytes: [u8; 64],
    len: usize,
}

impl Default for ShortValue {
    fn default() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }
}

impl ShortValue {
    fn text(&mut self, text: &str) -> &mut Self {
        for &byte in text.as_bytes() {
            self.push(byte);
        }
        self
    }

    fn decimal(&mut self, number: u64) -> &mut Self {
        let digits = number.checked_ilog10().unwrap_or(0) + 1;
        self.decimal_padded(number, digits)
    }

    /// `number` in exactly `digits` digits, zero-padded on the left.
    fn decimal_padded(&mut self, number: u64, digits: u32) -> &mut Self {
        for place in (0..digits).rev() {
            let digit = (number / 10u64.pow(place)) % 10;
            self.push(b'0' + digit as u8);
        }
        self
    }

    /// Values here are far shorter than the buffer; a longer one is cut.
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn finish(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.bytes[..self.len])
            .unwrap_or_else(|_| HeaderValue::from_static("keyrelay"))
    }
}

/// A random prefix so request ids from different processes do not collide.
fn request_id_prefix() -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{:08x}", random as u32)
}

/// What the proxy answers with: a relayed upstream body, or keyrelay's own JSON error.
pub type ResponseBody = Either<RelayBody, Full<Bytes>>;

/// The proxy as a `tower::Service`; cloning it is cheap (one `Arc`).
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    http1: UpstreamClient,
    /// Built only when a route speaks HTTP/2 to its upstream.
    http2: Option<UpstreamClient>,
    routes: RouteTable,
    /// Metrics for requests that match no route.
    unmatched: RouteMetrics,
    concurrency: Option<Arc<Semaphore>>,
    max_request_body: Option<u64>,
    /// Random per-process prefix of generated request ids.
    id_prefix: String,
    guard: Guard,
    tunnels: Arc<Tunnels>,
    timeouts: Timeouts,
    next_request_id: AtomicU64,
}

impl Proxy {
    /// Builds the proxy and its upstream client from a validated config.
    pub fn new(
        config: &Config,
        metrics: &Arc<Metrics>,
        tunnels: Arc<Tunnels>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                http1: build_client(config, false)?,
                http2: if config.routes.iter().any(|r| r.http2) {
                    Some(build_client(config, true)?)
                } else {
                    None
                },
                routes: RouteTable::new(&config.routes, metrics),
                unmatched: metrics.route(UNMATCHED_ROUTE),
                concurrency: config
                    .limits
                    .max_concurrent_requests
                    .map(|n| Arc::new(Semaphore::new(n))),
                max_request_body: config.limits.max_request_body,
                id_prefix: request_id_prefix(),
                guard: Guard::new(&config.access),
                tunnels,
                timeouts: config.timeouts,
                next_request_id: AtomicU64::new(1),
            }),
        })
    }

    /// The routes, for the key-file watchers and the startup log.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.shared.routes.iter()
    }

    /// The local access tokens, for the token-file watchers.
    pub fn access_tokens(&self) -> &Arc<AccessTokens> {
        &self.shared.guard.tokens
    }

    async fn forward(self, request: Request<Incoming>) -> Response<ResponseBody> {
        let shared = &self.shared;
        let id = shared.next_request_id.fetch_add(1, Ordering::Relaxed);
        let route = shared.routes.find(request.uri().path());
        let metrics = route.map_or(&shared.unmatched, |route| &route.metrics);
        let mut log = RequestLog::start(
            id,
            request.method().clone(),
            request.uri().clone(),
            metrics.clone(),
        );
        let (mut parts, body) = request.into_parts();

        let origin = match shared.guard.admit(&mut parts) {
            Admission::Forward { origin, token } => {
                log.set_token(token);
                origin
            }
            Admission::Preflight(headers) => {
                log.set_status(StatusCode::NO_CONTENT.as_u16());
                log.finish(Outcome::Ok);
                let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
                *response.status_mut() = StatusCode::NO_CONTENT;
                *response.headers_mut() = headers;
                return response;
            }
            Admission::Reject { error, origin } => {
                return shared.fail(&error, &mut log, None, origin.as_ref());
            }
        };
        let Some(route) = route else {
            let error = ProxyError::NoRoute(shared.routes.prefixes());
            return shared.fail(&error, &mut log, None, origin.as_ref());
        };
        if headers::has_unsupported_transfer_coding(&parts.headers) {
            let error = ProxyError::UnsupportedTransferCoding;
            return shared.fail(&error, &mut log, Some(route), origin.as_ref());
        }
        if !route.paths.allows(&parts.method, parts.uri.path()) {
            return shared.fail(
                &ProxyError::PathNotAllowed,
                &mut log,
                Some(route),
                origin.as_ref(),
            );
        }

        if let Some(semaphore) = &shared.concurrency {
            match Arc::clone(semaphore).try_acquire_owned() {
                Ok(permit) => log.hold(permit),
                Err(_) => {
                    let error = ProxyError::Overloaded;
                    return shared.fail(&error, &mut log, Some(route), origin.as_ref());
                }
            }
        }
        if let Some(limit) = shared.max_request_body {
            // hyper has parsed (and checked) Content-Length already.
            let declared = hyper::body::Body::size_hint(&body).exact();
            if declared.is_some_and(|length| length > limit) {
                let error = ProxyError::PayloadTooLarge(limit);
                return shared.fail(&error, &mut log, Some(route), origin.as_ref());
            }
        }
        let request_id = shared.request_id(&mut parts.headers, id);
        log.set_request_id(request_id.clone());

        // An upgrade (WebSocket) is forwarded deliberately, only over HTTP/1.1
        // on both sides, where the protocol switch exists.
        let upgrade = headers::requested_upgrade(&parts.headers)
            .filter(|_| parts.version == Version::HTTP_11 && route.version == Version::HTTP_11);
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<OnUpgrade>());

        let span = tracing::debug_span!("request", request_id = id);
        let result = async {
            let body = RequestBody::new(body, shared.max_request_body, route.metrics.clone());
            let upstream_request = upstream_request(route, parts, body, upgrade)?;
            // The path only: queries can carry secrets of their own.
            tracing::debug!(path = upstream_request.uri().path(), "forwarding");
            let overhead = log.elapsed();
            log.metrics().overhead(overhead.as_secs_f64());
            shared
                .send(route, upstream_request)
                .await
                .map(|r| (r, overhead))
        }
        .instrument(span)
        .await;

        let mut response = match result {
            Ok((mut response, overhead)) => match client_upgrade {
                Some(client) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    switch_protocols(&shared.tunnels, client, &mut response, log)
                }
                _ => {
                    let (mut parts, body) = response.into_parts();
                    headers::prepare_response(&mut parts.headers);
                    match parts.headers.get(BASETEN_REQUEST_ID) {
                        Some(upstream_id) => log.set_request_id(upstream_id.clone()),
                        None => {
                            parts.headers.entry(X_REQUEST_ID).or_insert(request_id);
                        }
                    }
                    parts.headers.append(SERVER_TIMING, server_timing(overhead));
                    log.set_status(parts.status.as_u16());
                    let body = RelayBody::new(body, shared.timeouts.idle, log);
                    Response::from_parts(parts, Either::Left(body))
                }
            },
            Err(err) => return shared.fail(&err, &mut log, Some(route), origin.as_ref()),
        };
        // Allowed browser origins may read keyrelay's answers.
        if let Some(origin) = origin {
            cors::add_origin_headers(response.headers_mut(), &origin);
        }
        response
    }
}

/// Answers the client's upgrade with the upstream's `101` and splices the two
/// connections once both have switched.
fn switch_protocols(
    tunnels: &Arc<Tunnels>,
    client: OnUpgrade,
    upstream: &mut Response<Incoming>,
    mut log: RequestLog,
) -> Response<ResponseBody> {
    let upstream_upgrade = hyper::upgrade::on(&mut *upstream);
    let mut headers = std::mem::take(upstream.headers_mut());
    let protocol = headers.get(http::header::UPGRADE).cloned();
    headers::prepare_response(&mut headers);
    if let Some(protocol) = protocol {
        headers::restore_upgrade(&mut headers, protocol);
    }
    log.set_status(StatusCode::SWITCHING_PROTOCOLS.as_u16());
    tunnels.spawn(client, upstream_upgrade, log);
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}

/// Turns the client's request into the upstream's: new target, scrubbed
/// headers, injected credential, same method and body.
fn upstream_request(
    route: &Route,
    mut parts: http::request::Parts,
    body: RequestBody,
    upgrade: Option<HeaderValue>,
) -> Result<Request<RequestBody>, ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::ConnectNotSupported);
    }
    parts.uri = route.upstream_uri(&parts.uri)?;
    parts.version = route.version;
    headers::prepare_request(
        &mut parts.headers,
        &route.credential.strip,
        &route.credential.header,
        route.live.current(),
    );
    if let Some(host) = &route.host {
        parts.headers.insert(http::header::HOST, host.clone());
    }
    if let Some(protocol) = upgrade {
        headers::restore_upgrade(&mut parts.headers, protocol);
    }
    Ok(Request::from_parts(parts, body))
}

impl Shared {
    /// The client's `X-Request-Id`, or a new one set on the request.
    fn request_id(&self, headers: &mut http::HeaderMap, id: u64) -> HeaderValue {
        if let Some(existing) = headers.get(X_REQUEST_ID) {
            return existing.clone();
        }
        let generated = ShortValue::default()
            .text("kr-")
            .text(&self.id_prefix)
            .text("-")
            .decimal(id)
            .finish();
        headers.insert(X_REQUEST_ID, generated.clone());
        generated
    }

    /// keyrelay's own JSON error response, logged, with CORS headers for an
    /// allowed origin so the page can read why.
    fn fail(
        &self,
        err: &ProxyError,
        log: &mut RequestLog,
        route: Option<&Route>,
        origin: Option<&HeaderValue>,
    ) -> Response<ResponseBody> {
        if err.is_upstream() {
            log.metrics().upstream_error(err.kind());
        }
        log.set_status(err.status().as_u16());
        log.finish(match err {
            ProxyError::ResponseHeaderTimeout(_) | ProxyError::UpstreamConnectTimeout(_) => {
                Outcome::Timeout
            }
            err if err.is_upstream() => Outcome::UpstreamError,
            // keyrelay refused it itself (admission, limits, no route).
            _ => Outcome::Rejected,
        });
        tracing::warn!(request_id = log.id(), kind = err.kind(), error = %err, "request failed");
        let upstream = route.map(|route| route.upstream.authority.as_str());
        let mut response = err.to_response(upstream).map(Either::Right);
        if let Some(origin) = origin {
            cors::add_origin_headers(response.headers_mut(), origin);
        }
        response
    }

    /// Sends upstream over the route's client, applying the response-header
    /// timeout when one is set.
    async fn send(
        &self,
        route: &Route,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let client = match (route.version, &self.http2) {
            (Version::HTTP_2, Some(http2)) => http2,
            _ => &self.http1,
        };
        let pending = client.request(request);
        let result = match self.timeouts.response_headers {
            Some(limit) => tokio::time::timeout(limit, pending)
                .await
                .map_err(|_| ProxyError::ResponseHeaderTimeout(limit))?,
            None => pending.await,
        };
        result.map_err(|err| {
            tracing::debug!(error = ?err, "upstream request failed");
            ProxyError::from_upstream(&err, self.timeouts.connect)
        })
    }
}

impl tower::Service<Request<Incoming>> for Proxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move { Ok(proxy.forward(request).await) })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{server_timing, ShortValue};

    #[test]
    fn short_values_write_decimals_without_fmt() {
        let mut value = ShortValue::default();
        value.text("kr-").decimal(0).text("-").decimal(1_234_567);
        assert_eq!(value.finish(), "kr-0-1234567");

        let mut value = ShortValue::default();
        value.decimal(u64::MAX).text(" ").decimal_padded(7, 3);
        assert_eq!(value.finish(), "18446744073709551615 007");
    }

    #[test]
    fn short_values_are_cut_at_the_buffer() {
        let mut value = ShortValue::default();
        value.text(&"x".repeat(100));
        assert_eq!(value.finish().len(), 64);
    }

    #[test]
    fn server_timing_is_milliseconds_with_three_decimals() {
        assert_eq!(
            server_timing(Duration::from_micros(1_234)),
            "keyrelay;desc=\"proxy overhead\";dur=1.234"
        );
        assert_eq!(
            server_timing(Duration::from_nanos(5_999)),
            "keyrelay;desc=\"proxy overhead\";dur=0.005"
        );
    }
}

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

mod auth_query;
pub(crate) mod context;
pub(crate) mod error;
pub mod headers;
mod methods;
pub(crate) mod request_body;
pub(crate) mod request_id;
mod request_inspection;
pub(crate) mod response_body;
pub(crate) mod retry;
pub mod route_table;
pub(crate) mod tunnel;
pub(crate) mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::config::{Config, Timeouts};
use crate::guard::tokens::AccessTokens;
use crate::guard::{Admission, Guard};
use crate::proxy::context::{RequestContext, Settlement};
use crate::proxy::request_body::RequestBody;
use crate::proxy::request_inspection::identity_encoding;
use crate::proxy::response_body::RelayBody;
use crate::proxy::route_table::{Route, RouteTable};
use crate::proxy::tunnel::Tunnels;
use crate::proxy::upstream::{Keeper, Lease, Upstreams, Via};
use crate::telemetry::metrics::{Metrics, RouteMetrics};
use crate::telemetry::record::{AccessRecord, Metered, Outcome};
use crate::telemetry::trace::span::{Attribute, Value};
use crate::telemetry::trace::Tracer;
use crate::usage::inspect::{self, RequestCaps};
use crate::usage::stream_usage::UsageEventStrip;
use crate::usage::{Budgets, UsageTap};
use error::{ClientError, ProxyError, Refusal, UpstreamError};
use request_id::{server_timing, RequestIds, BASETEN_REQUEST_ID, SERVER_TIMING, X_REQUEST_ID};
use retry::{AttemptResult, Attempts, Next};

/// The response header naming the route whose upstream answered
/// (`upstream_name_header`).
const X_KEYRELAY_UPSTREAM: &str = "x-keyrelay-upstream";

/// The route label of requests that match no route.
const UNMATCHED_ROUTE: &str = "unmatched";

/// What the proxy answers with: a relayed upstream body, or keyrelay's own JSON error.
pub type ResponseBody = Either<RelayBody, Full<Bytes>>;

/// The proxy as a `tower::Service`, as one serving thread runs it; cloning
/// it is cheap (one `Arc`, touched by that thread only).
#[derive(Clone)]
pub struct Proxy {
    worker: Arc<Worker>,
}

/// What one serving thread owns: its upstream connections and its run of
/// request numbers.
struct Worker {
    shared: Arc<Shared>,
    upstreams: Upstreams,
    ids: RequestIds,
}

/// What every serving thread shares: routes, admission, limits, tunnels.
struct Shared {
    routes: RouteTable,
    /// Metrics for requests that match no route.
    unmatched: RouteMetrics,
    concurrency: Option<Arc<Semaphore>>,
    max_request_body: Option<u64>,
    /// Longest pause between two parts of a request body.
    request_body_timeout: Option<std::time::Duration>,
    guard: Guard,
    tunnels: Arc<Tunnels>,
    timeouts: Timeouts,
    /// Read token usage off responses (`usage_tap`).
    usage_tap: bool,
    /// Token budgets, shared with the admin port and the state file.
    budgets: Arc<Budgets>,
    /// Request caps of requests that present an access token.
    token_caps: RequestCaps,
    /// Name the answering route in `x-keyrelay-upstream`.
    upstream_name_header: bool,
    /// Starts request spans, when traces are exported.
    tracer: Option<Arc<Tracer>>,
}

/// What is known of a request when it fails, for the error answer: the
/// allowed origin (so a page can read why) and the route (whose upstream the
/// body names). Each phase fills in what it learns.
#[derive(Default)]
struct FailureContext<'a> {
    origin: Option<HeaderValue>,
    route: Option<&'a Route>,
    /// The attempts upstream, when the failure is the last of several.
    attempts: Option<Box<AttemptHeaders>>,
}

/// How a request that passed every phase is answered.
enum Answer {
    /// A CORS preflight, answered by keyrelay itself.
    Preflight(http::HeaderMap),
    /// The upstream's response, to relay.
    Relay(Sent),
}

/// A request the upstream has answered.
struct Sent {
    response: Response<Incoming>,
    request_id: HeaderValue,
    /// keyrelay's own time before the request left, for `Server-Timing`.
    overhead: std::time::Duration,
    /// The client's side of a WebSocket upgrade, if it asked for one.
    client_upgrade: Option<OnUpgrade>,
    /// Its hold on the upstream connection.
    lease: Lease,
    /// What the client is told of the attempts, when there is anything
    /// to tell (boxed: most requests have none).
    attempts: Option<Box<AttemptHeaders>>,
}

/// Response headers about the attempts upstream.
struct AttemptHeaders {
    /// `Server-Timing` entries of each attempt, when there was more than one.
    timings: Vec<HeaderValue>,
    /// The answering route's name, for `x-keyrelay-upstream` (when on).
    answered_by: Option<HeaderValue>,
}

/// An attempt that got no answer.
struct SendFailure {
    error: ProxyError,
    /// No connection could be made: the request never left keyrelay.
    never_sent: bool,
}

impl Proxy {
    /// Builds the proxy from a validated config, as the first of
    /// `config.workers` serving threads runs it ([`Proxy::for_worker`] makes
    /// the others).
    pub fn new(
        config: &Config,
        metrics: &Arc<Metrics>,
        tunnels: Arc<Tunnels>,
        budgets: Arc<Budgets>,
        tracer: Option<Arc<Tracer>>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            routes: RouteTable::new(&config.routes, metrics),
            unmatched: metrics.route(UNMATCHED_ROUTE),
            concurrency: config
                .limits
                .max_concurrent_requests
                .map(|n| Arc::new(Semaphore::new(n))),
            max_request_body: config.limits.max_request_body,
            request_body_timeout: config.limits.request_body_timeout,
            guard: Guard::new(&config.access),
            tunnels,
            timeouts: config.timeouts,
            usage_tap: config.usage_tap,
            budgets,
            token_caps: config.access.token_caps.clone(),
            upstream_name_header: config.upstream_name_header,
            tracer,
        });
        Ok(Self {
            worker: Arc::new(Worker {
                shared,
                upstreams: Upstreams::new(config)?,
                ids: RequestIds::new(0, config.workers),
            }),
        })
    }

    /// The proxy for serving thread `index` of `config.workers`: the same
    /// routes, guard and limits, its own upstream clients.
    pub fn for_worker(&self, config: &Config, index: usize) -> std::io::Result<Self> {
        Ok(Self {
            worker: Arc::new(Worker {
                shared: Arc::clone(&self.worker.shared),
                upstreams: Upstreams::new(config)?,
                ids: self.worker.ids.for_worker(index, config.workers),
            }),
        })
    }

    /// The routes, for the key-file watchers and the startup log.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.worker.shared.routes.iter()
    }

    /// The tasks that keep this thread's warm upstream connections open,
    /// for the thread to spawn.
    pub fn warm_keepers(&self) -> Vec<Keeper> {
        self.worker.upstreams.warm_keepers()
    }

    /// The local access tokens, for the token-file watchers.
    pub fn access_tokens(&self) -> &Arc<AccessTokens> {
        &self.worker.shared.guard.tokens
    }

    /// One request, start to end: the phases run in [`Shared::admit_and_send`],
    /// and every failure leaves through [`Shared::fail`].
    async fn forward(self, request: Request<Incoming>) -> Response<ResponseBody> {
        let worker = &*self.worker;
        let shared = &*worker.shared;
        let number = worker.ids.next();
        let (parts, body) = request.into_parts();
        let matched = shared.routes.find(parts.uri.path());
        let metrics = matched.map_or(&shared.unmatched, |route| &route.metrics);
        let mut request = Settlement::new(AccessRecord::start(
            number,
            parts.method.clone(),
            &parts.uri,
            metrics.clone(),
        ));
        if let Some(tracer) = &shared.tracer {
            let route = matched.map(|route| route.name.as_str());
            request.record.trace(tracer, &parts.headers, route);
            // The model where the path names it (Gemini, Vertex, Azure
            // deployments, Bedrock); one named only in the body is
            // reported by the response (gen_ai.response.model).
            let path = parts.uri.path();
            // Most paths name no model: skip the decoding that finds one.
            let may_name_model = memchr::memmem::find(path.as_bytes(), b"odel").is_some()
                || memchr::memmem::find(path.as_bytes(), b"eployments").is_some()
                || path.contains('%');
            if let Some(span) = request.record.span().filter(|span| span.sampled()) {
                if let Some(model) = may_name_model.then(|| inspect::path_model(path)).flatten() {
                    span.set("gen_ai.request.model", model.as_str());
                }
            }
        }
        let mut failure = FailureContext::default();

        let answer = shared
            .admit_and_send(worker, parts, body, matched, &mut request, &mut failure)
            .instrument(tracing::debug_span!("request", request_id = number))
            .await;
        let mut response = match answer {
            Ok(Answer::Preflight(headers)) => return preflight(headers, request),
            Ok(Answer::Relay(sent)) => shared.relay(sent, request),
            Err(error) => return shared.fail(&error, request, &failure),
        };
        // Allowed browser origins may read keyrelay's answers.
        if let Some(origin) = &failure.origin {
            shared
                .guard
                .cors
                .add_origin_headers(response.headers_mut(), origin);
        }
        response
    }
}

impl Shared {
    /// The phases up to the upstream's response headers: admit, route, build
    /// the upstream request, send.
    async fn admit_and_send<'a>(
        &'a self,
        worker: &Worker,
        mut parts: http::request::Parts,
        body: Incoming,
        matched: Option<&'a Route>,
        request: &mut Settlement,
        failure: &mut FailureContext<'a>,
    ) -> Result<Answer, ProxyError> {
        // The phases share the request's context and fill its access record.
        let Settlement { context, record } = request;
        // 1. Admit: host, origin, preflight, access token (guard/).
        match self.guard.admit(&mut parts) {
            Admission::Forward { origin, token } => {
                failure.origin = origin;
                context.token = token;
            }
            Admission::Preflight(headers) => return Ok(Answer::Preflight(headers)),
            Admission::Reject { error, origin } => {
                failure.origin = origin;
                return Err(Refusal::from(error).into());
            }
        }

        // 2. Route, and the route's limits.
        let route = matched.ok_or_else(|| Refusal::NoRoute(self.routes.prefixes()))?;
        failure.route = Some(route);
        self.check_limits(route, &parts, &body, context)?;
        let budgeted = !self.budgets.is_empty()
            && self
                .budgets
                .applies_to(route.index, context.token.as_deref());
        if budgeted {
            // The tap cannot read a compressed body, and a budget must
            // not be escaped by asking for one.
            identity_encoding(&mut parts.headers);
        }
        // The body, where the route needs what it asks for
        // (request_inspection.rs); otherwise it goes up frame by frame.
        let (body, estimate) = self
            .read_request(route, &mut parts, body, budgeted, context)
            .await?;
        if budgeted {
            self.reserve(route, estimate, context).await?;
        }

        // 3. Build the upstream request.
        let request_id = worker.ids.assign(&mut parts.headers, record.id());
        record.set_request_id(request_id.clone());
        if let Some(span) = record.span() {
            // The upstream's spans become children of this request's.
            span.propagate(&mut parts.headers);
        }
        // An upgrade (WebSocket) is forwarded deliberately, only over HTTP/1.1
        // on both sides, where the protocol switch exists.
        let mut upgrade = headers::requested_upgrade(&parts.headers).filter(|_| {
            parts.version == Version::HTTP_11 && worker.upstreams.of(route).can_upgrade()
        });
        let upgrading = upgrade.is_some();
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<OnUpgrade>());
        // What later attempts need, where the route retries (retry/).
        let (mut attempts, mut body) = if Attempts::apply(route, &parts.method, upgrading) {
            let (attempts, body) = Attempts::start(route, &parts, body);
            (Some(attempts), body)
        } else {
            (None, body)
        };
        let overhead = record.elapsed();
        record.metrics().overhead(overhead.as_secs_f64());

        // 4. Send, and send again while the route's retry policy says so:
        // each answer is decided on before any of it is relayed.
        let mut target = match &mut attempts {
            Some(attempts) => attempts.first_target(&self.routes),
            None => route,
        };
        // The credential the answer was asked with: the one to keep out of
        // it, though the route's may have rotated while the upstream thought.
        let mut sent_credential;
        let (mut response, lease) = loop {
            let request;
            (request, sent_credential) =
                upstream_request(route, target, parts, body, upgrade.take())?;
            let sent = self
                .send_to(worker, target, request, upgrading, record)
                .await;
            if let Ok((response, _)) = &sent {
                // A 401 or 403 asks an expiring credential's source for a
                // new value; the answer itself is relayed as usual.
                target.live.answered(response.status());
            }
            let Some(retrying) = attempts.as_mut() else {
                break sent.map_err(|failure| failure.error)?;
            };
            let result = match &sent {
                Ok((response, _)) => AttemptResult::Answered(response.status(), response.headers()),
                Err(failure) => AttemptResult::Failed {
                    never_sent: failure.never_sent,
                    kind: failure.error.kind(),
                },
            };
            match retrying.after(target, result, &self.routes) {
                Next::Relay => match sent {
                    Ok(sent) => break sent,
                    Err(last) => {
                        failure.attempts = attempt_headers(Some(&mut **retrying), None);
                        // The error names the upstream that failed last.
                        failure.route = Some(target);
                        return Err(last.error);
                    }
                },
                Next::Again {
                    target: next,
                    wait,
                    parts: again,
                    body: replayed,
                } => {
                    record.trace_event("retry", || retry_event(target, &sent, next, wait));
                    // The answer is dropped unread: an HTTP/1.1 connection
                    // closes with it, an HTTP/2 stream is reset.
                    drop(sent);
                    tokio::time::sleep(wait).await;
                    (target, parts, body) = (next, again, replayed);
                }
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_none() {
            // Relayed, a bare 101 would end the client's connection and the
            // requests pipelined on it. The upstream connection has switched
            // too: the lease drops it (it is never reusable after a 101).
            return Err(UpstreamError::UnrequestedUpgrade.into());
        }
        if let Some(name) = &target.credential.query {
            auth_query::scrub_response(response.headers_mut(), name, sent_credential.as_bytes());
        }
        if target.index != route.index {
            record.set_upstream(&target.name);
        }
        if let Some(span) = record.span() {
            // Not server.address: on a SERVER span the conventions give
            // that to keyrelay itself; the upstream is its peer.
            span.set(
                "keyrelay.upstream.address",
                target.upstream.authority.host(),
            );
            if let Some(port) = target.upstream.authority.port_u16() {
                span.set("keyrelay.upstream.port", i64::from(port));
            }
        }
        let answered_by = self
            .upstream_name_header
            .then(|| HeaderValue::try_from(target.name.as_str()).ok())
            .flatten();
        Ok(Answer::Relay(Sent {
            response,
            request_id,
            overhead,
            client_upgrade,
            lease,
            attempts: attempt_headers(attempts.as_deref_mut(), answered_by),
        }))
    }

    /// The route's own refusals and the process-wide limits, before any
    /// upstream work: transfer coding, path policy, concurrency, body size.
    fn check_limits(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        body: &Incoming,
        context: &mut RequestContext,
    ) -> Result<(), ProxyError> {
        if headers::has_unsupported_transfer_coding(&parts.headers) {
            return Err(ClientError::UnsupportedTransferCoding.into());
        }
        methods::check(route, parts)?;
        if let Some(semaphore) = &self.concurrency {
            let permit = Arc::clone(semaphore)
                .try_acquire_owned()
                .map_err(|_| Refusal::Overloaded)?;
            context.permit = Some(permit);
        }
        if let Some(limit) = self.max_request_body {
            // hyper has parsed (and checked) Content-Length already.
            let declared = hyper::body::Body::size_hint(body).exact();
            if declared.is_some_and(|length| length > limit) {
                return Err(Refusal::PayloadTooLarge(limit).into());
            }
        }
        Ok(())
    }

    /// The error answer for a request that could not be sent upstream.
    fn send_failure(&self, err: &upstream::SendError) -> ProxyError {
        tracing::debug!(error = ?err, "upstream request failed");
        ProxyError::from_send_error(err, self.timeouts.connect)
    }

    /// One attempt: the request goes to `target`'s upstream over its HTTP
    /// version (an `auto` route's first request finds out which the server
    /// speaks), within the response-header timeout when one is set.
    async fn send_to(
        &self,
        worker: &Worker,
        target: &Route,
        mut request: Request<RequestBody>,
        upgrading: bool,
        record: &mut AccessRecord,
    ) -> Result<(Response<Incoming>, Lease), SendFailure> {
        // The path only: queries can carry secrets of their own; and without
        // the upstream URL's base path, which is configuration never printed.
        tracing::debug!(
            path = request
                .uri()
                .path()
                .strip_prefix(target.upstream.base_path.as_str())
                .unwrap_or_default(),
            "forwarding"
        );
        let failed = |err: &upstream::SendError| SendFailure {
            error: self.send_failure(err),
            never_sent: err.never_sent(),
        };
        let upstreams = &worker.upstreams;
        let via = (upstreams.of(target).via(upgrading).await).map_err(|err| failed(&err))?;
        set_version(&mut request, &via, target.host.as_ref());
        record.set_forwarded();
        let pending = async {
            match via {
                Via::Http2(pool) => (pool.send(request).await)
                    .map(|(response, slot)| (response, Lease::Http2(slot))),
                Via::Http1 => (upstreams.http1.send(request, &target.origin).await)
                    .map(|(response, lease)| (response, Lease::Http1(lease))),
            }
            .map_err(|err| failed(&err))
        };
        match self.timeouts.response_headers {
            Some(limit) => match tokio::time::timeout(limit, pending).await {
                Ok(sent) => sent,
                Err(_) => Err(SendFailure {
                    error: UpstreamError::HeaderTimeout(limit).into(),
                    never_sent: false,
                }),
            },
            None => pending.await,
        }
    }

    /// Phase 5, relay: the upstream's response to the client, frame by frame, or
    /// the tunnel when both sides switched protocols.
    fn relay(&self, sent: Sent, mut request: Settlement) -> Response<ResponseBody> {
        let Sent {
            mut response,
            request_id,
            overhead,
            client_upgrade,
            lease,
            attempts,
        } = sent;
        if let Some(client) = client_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                return switch_protocols(&self.tunnels, client, &mut response, request);
            }
        }
        let (mut parts, body) = response.into_parts();
        headers::prepare_response(&mut parts.headers);
        match parts.headers.get(BASETEN_REQUEST_ID) {
            Some(upstream_id) => request
                .record
                .set_request_id(request_id::detached(upstream_id)),
            None => {
                parts.headers.entry(X_REQUEST_ID).or_insert(request_id);
            }
        }
        parts.headers.append(SERVER_TIMING, server_timing(overhead));
        if let Some(attempts) = attempts {
            for attempt in attempts.timings {
                parts.headers.append(SERVER_TIMING, attempt);
            }
            if let Some(name) = attempts.answered_by {
                parts.headers.insert(X_KEYRELAY_UPSTREAM, name);
            }
        }
        request.record.set_status(parts.status.as_u16());
        if let Some(metered) = metered(parts.status, &parts.headers) {
            request.record.set_metered(metered);
        }
        let tap = if self.usage_tap {
            let mut tap = UsageTap::for_response(parts.status, &parts.headers);
            if let (Some(tap), Some(true)) = (&mut tap, request.record.span().map(|s| s.sampled()))
            {
                tap.read_model();
            }
            // A tap means the body is readable; only an answer without one
            // can be one that carries usage unreadably.
            if let Some(why) = tap
                .is_none()
                .then(|| UsageTap::unreadable(parts.status, &parts.headers))
                .flatten()
            {
                request.record.metrics().usage_unread(why);
            }
            tap
        } else {
            None
        };
        // The usage event keyrelay asked for is its own, not the client's.
        let strip = strips_usage_event(&request.context, tap.as_ref()).then(|| {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            UsageEventStrip::default()
        });
        let body = RelayBody::new(body, self.timeouts.idle, request, lease, tap, strip);
        Response::from_parts(parts, Either::Left(body))
    }

    /// The failure exit: keyrelay's own JSON error response, logged and
    /// counted, with CORS headers for an allowed origin so the page can
    /// read why. The request ends here, so it settles here.
    fn fail(
        &self,
        err: &ProxyError,
        mut request: Settlement,
        failure: &FailureContext<'_>,
    ) -> Response<ResponseBody> {
        let record = &mut request.record;
        if let Some(upstream) = err.upstream() {
            record.metrics().upstream_error(upstream.kind());
        }
        record.set_status(err.status().as_u16());
        record.finish(err.outcome());
        tracing::warn!(request_id = record.id(), kind = err.kind(), error = %err, "request failed");
        request.settle();
        let upstream = failure.route.map(|route| route.upstream.authority.as_str());
        let mut response = err.to_response(upstream).map(Either::Right);
        if let Some(attempts) = &failure.attempts {
            for attempt in &attempts.timings {
                response
                    .headers_mut()
                    .append(SERVER_TIMING, attempt.clone());
            }
        }
        if let Some(origin) = &failure.origin {
            self.guard
                .cors
                .add_origin_headers(response.headers_mut(), origin);
        }
        response
    }
}

/// The headers that tell the client about the attempts, if any do.
fn attempt_headers(
    attempts: Option<&mut Attempts<'_>>,
    answered_by: Option<HeaderValue>,
) -> Option<Box<AttemptHeaders>> {
    let timings = attempts.map(Attempts::take_timings).unwrap_or_default();
    (!timings.is_empty() || answered_by.is_some()).then(|| {
        Box::new(AttemptHeaders {
            timings,
            answered_by,
        })
    })
}

/// What kind of metered answer a response is: a successful SSE stream or
/// JSON answer, which budgets charge even when it reports no usage.
fn metered(status: StatusCode, headers: &http::HeaderMap) -> Option<Metered> {
    if !status.is_success() {
        return None;
    }
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else {
        // Text a server did not label is still generated text.
        return Some(Metered::Json);
    };
    let media = content_type.to_str().ok()?.split(';').next()?.trim();
    // Compared without case, in place: no lowercased copy per response.
    let is = |name: &str| media.eq_ignore_ascii_case(name);
    if is("text/event-stream") {
        Some(Metered::Sse)
    } else if LINE_MEDIA_TYPES.iter().any(|name| is(name)) {
        Some(Metered::Lines)
    } else if is("application/json")
        || media
            .get(..5)
            .is_some_and(|start| start.eq_ignore_ascii_case("text/"))
        || media
            .len()
            .checked_sub(5)
            .and_then(|at| media.get(at..))
            .is_some_and(|end| end.eq_ignore_ascii_case("+json"))
    {
        Some(Metered::Json)
    } else {
        // Audio, images, binary: not metered (see the README).
        None
    }
}

/// Media types of streams of JSON documents, one per line.
const LINE_MEDIA_TYPES: [&str; 8] = [
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
    "application/json-seq",
    "application/stream+json",
    "application/x-json-stream",
];

/// True when keyrelay added `include_usage` to the request and the answer
/// is a stream: the usage event it carries was not the client's to see.
fn strips_usage_event(context: &RequestContext, tap: Option<&UsageTap>) -> bool {
    context.added_usage && tap.is_some_and(UsageTap::is_sse)
}

/// keyrelay's answer to a CORS preflight: 204 with the allow headers.
fn preflight(headers: http::HeaderMap, mut request: Settlement) -> Response<ResponseBody> {
    request.record.set_status(StatusCode::NO_CONTENT.as_u16());
    request.record.finish(Outcome::Ok);
    request.settle();
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::NO_CONTENT;
    *response.headers_mut() = headers;
    response
}

/// Answers the client's upgrade with the upstream's `101` and splices the two
/// connections once both have switched.
fn switch_protocols(
    tunnels: &Arc<Tunnels>,
    client: OnUpgrade,
    upstream: &mut Response<Incoming>,
    mut request: Settlement,
) -> Response<ResponseBody> {
    let upstream_upgrade = hyper::upgrade::on(&mut *upstream);
    let mut headers = std::mem::take(upstream.headers_mut());
    let protocol = headers.get(http::header::UPGRADE).cloned();
    headers::prepare_response(&mut headers);
    if let Some(protocol) = protocol {
        headers::restore_upgrade(&mut headers, protocol);
    }
    request
        .record
        .set_status(StatusCode::SWITCHING_PROTOCOLS.as_u16());
    tunnels.spawn(client, upstream_upgrade, request);
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}

/// Turns the client's request on route `matched` into the upstream's on
/// route `target` (the same route, or a fallback of it): new target,
/// scrubbed headers, `target`'s credential and static headers, same
/// method and body; with the credential it carries.
/// The HTTP version and `Host` are set once the route has chosen the
/// version ([`set_version`]).
fn upstream_request(
    matched: &Route,
    target: &Route,
    mut parts: http::request::Parts,
    body: RequestBody,
    upgrade: Option<HeaderValue>,
) -> Result<(Request<RequestBody>, HeaderValue), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ClientError::ConnectNotSupported.into());
    }
    parts.uri = target.upstream_uri_for(matched, &parts.uri)?;
    // An expired credential is never sent: 503 credential_unavailable.
    let value = target.live.usable()?;
    let header = match &target.credential.query {
        Some(name) => {
            parts.uri = auth_query::place(parts.uri, name, value.as_bytes())?;
            None
        }
        None => Some((&target.credential.header, value.clone())),
    };
    headers::prepare_request(&mut parts.headers, &target.credential.strip, header);
    for (name, value) in &target.set_headers {
        parts.headers.insert(name, value.clone());
    }
    if let Some(protocol) = upgrade {
        headers::restore_upgrade(&mut parts.headers, protocol);
    }
    Ok((Request::from_parts(parts, body), value))
}

/// The HTTP version the request goes with, and its `Host`: the one place
/// that decides the host the upstream sees (the client's `Host` is left in
/// the headers until here, and replaced or removed here).
///
/// - HTTP/1.1: the route's `host` (the upstream's authority without a
///   default port), replacing every `Host` the client sent; the upstream
///   URI's authority if the route has none.
/// - HTTP/2: no `Host` at all; hyper sends the upstream URI's authority as
///   `:authority`.
fn set_version(request: &mut Request<RequestBody>, via: &Via<'_>, host: Option<&HeaderValue>) {
    *request.version_mut() = via.version();
    let host = match via {
        Via::Http1 => host.cloned().or_else(|| {
            let authority = request.uri().authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        }),
        Via::Http2(_) => None,
    };
    match host {
        Some(host) => {
            request.headers_mut().insert(http::header::HOST, host);
        }
        None => {
            request.headers_mut().remove(http::header::HOST);
        }
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

/// The span event of an attempt that is followed by another: what it got,
/// where the next goes, and after how long.
fn retry_event(
    target: &Route,
    sent: &Result<(Response<Incoming>, Lease), SendFailure>,
    next: &Route,
    wait: std::time::Duration,
) -> Vec<Attribute> {
    let got = match sent {
        Ok((response, _)) => Attribute::new(
            "http.response.status_code",
            i64::from(response.status().as_u16()),
        ),
        Err(failure) => Attribute::new("error.type", Value::Static(failure.error.kind())),
    };
    vec![
        Attribute::new("keyrelay.route", target.name.as_str()),
        got,
        Attribute::new("keyrelay.next_route", next.name.as_str()),
        Attribute::new("keyrelay.wait", Value::Float(wait.as_secs_f64())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metered_as(content_type: Option<&'static str>) -> Option<Metered> {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = content_type {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(value),
            );
        }
        metered(StatusCode::OK, &headers)
    }

    /// Budgets charge what `metered` names: an upstream's spelling of a
    /// media type (case, parameters, spaces) must not turn a charged answer
    /// into an uncharged one.
    #[test]
    fn media_types_are_metered_however_they_are_spelled() {
        for (content_type, expected) in [
            (Some("text/event-stream"), Some(Metered::Sse)),
            (Some("TEXT/Event-Stream; charset=utf-8"), Some(Metered::Sse)),
            (Some("  text/event-stream  ;x=1"), Some(Metered::Sse)),
            (Some("Application/X-NDJSON"), Some(Metered::Lines)),
            (Some("application/jsonl"), Some(Metered::Lines)),
            (Some("APPLICATION/JSON"), Some(Metered::Json)),
            (Some("application/vnd.api+JSON"), Some(Metered::Json)),
            (Some("Text/Plain"), Some(Metered::Json)),
            (None, Some(Metered::Json)),
            (Some("text"), None),
            (Some("+json"), Some(Metered::Json)), // charged: the safe side
            (Some("image/png"), None),
            (Some("application/octet-stream"), None),
        ] {
            assert_eq!(metered_as(content_type), expected, "{content_type:?}");
        }
        assert_eq!(
            metered(StatusCode::BAD_GATEWAY, &http::HeaderMap::new()),
            None
        );
    }
}

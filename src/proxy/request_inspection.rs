//! Phase 2's look inside the request body, where the route needs it: a
//! budget (what to reserve), a request cap (model, output tokens) or
//! `add_stream_usage` (ask a completions stream for its usage). The one place
//! on the data path a body is read before it goes on: opt-in and bounded
//! ([`inspect::MAX_BODY`]); every other body goes up frame by frame.

use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::Incoming;

use crate::proxy::context::RequestContext;
use crate::proxy::error::{ClientError, ProxyError, Refusal};
use crate::proxy::request_body::{ClientBodyError, RequestBody};
use crate::proxy::route_table::Route;
use crate::proxy::Shared;
use crate::telemetry::metrics::RouteMetrics;
use crate::usage::budget::Refused;
use crate::usage::inspect::{self, Broken, ReadBody, ReadFailed, Unparsed};
use crate::usage::stream_usage;
use crate::usage::Estimate;

impl Shared {
    /// Reads what the request asks for from its body where the route needs
    /// it (a budget, a request cap, `add_stream_usage` on a completions
    /// path): at most [`inspect::MAX_BODY`] bytes, whatever the content
    /// type (multipart aside) or framing. Checks the caps, rewrites the
    /// body (a clamp, `include_usage`), and estimates what a budget should
    /// reserve. Returns the body to send.
    pub(super) async fn read_request(
        &self,
        route: &Route,
        parts: &mut http::request::Parts,
        body: Incoming,
        budgeted: bool,
        context: &mut RequestContext,
    ) -> Result<(RequestBody, Estimate), ProxyError> {
        let rules = &route.rules;
        let metrics = route.metrics.clone();
        let declared = hyper::body::Body::size_hint(&body).exact();
        let add_usage = route.add_stream_usage && inspect::is_completions_path(parts.uri.path());
        let has_body = !hyper::body::Body::is_end_stream(&body);
        let token_caps = context
            .token
            .is_some()
            .then_some(&self.token_caps)
            .filter(|caps| caps.is_set());
        let capped = rules.caps.is_set() || token_caps.is_some();
        let wanted = budgeted || capped || add_usage;
        let mut estimate = Estimate {
            prompt: inspect::prompt_estimate(declared.unwrap_or(0)),
            output: rules.budget_reserve,
        };
        if capped && !has_body {
            // A model named by the target alone (a WebSocket to
            // `/v1/realtime?model=`) is checked too.
            rules
                .caps
                .check_target(token_caps, &parts.uri)
                .map_err(|_| Refusal::ModelNotAllowed)?;
        }
        // Most requests: nothing wants the body, or there is none.
        let readable = || capped || inspect::may_be_json(&parts.headers);
        if !(wanted && has_body && readable()) {
            if has_body && budgeted && rules.unparsed_budget_requests == Unparsed::Refuse {
                return Err(ClientError::UnreadableBody.into());
            }
            let body = RequestBody::new(body, self.max_request_body, metrics)
                .with_frame_timeout(self.request_body_timeout);
            return Ok((body, estimate));
        }
        let too_large = |length: usize| {
            self.max_request_body
                .filter(|limit| length as u64 > *limit)
                .map(|limit| ProxyError::from(Refusal::PayloadTooLarge(limit)))
        };
        let bytes = match inspect::read(body).await {
            // A client that went away is not one that sent a bad body.
            Err(ReadFailed::Malformed(err)) => {
                return Err(match ClientBodyError(err).client_gone() {
                    true => ClientError::ClientClosedRequest.into(),
                    false => ClientError::BadRequestBody.into(),
                });
            }
            Err(ReadFailed::TooSlow) => return Err(ClientError::BadRequestBody.into()),
            Ok(ReadBody::Longer { head, rest }) => {
                if let Some(refused) = too_large(head.len()) {
                    return Err(refused);
                }
                if capped || (budgeted && rules.unparsed_budget_requests == Unparsed::Refuse) {
                    return Err(ClientError::UnreadableBody.into());
                }
                estimate.prompt = inspect::prompt_estimate(declared.unwrap_or(head.len() as u64));
                let body = RequestBody::read_ahead(head, rest, self.max_request_body, metrics)
                    .with_frame_timeout(self.request_body_timeout);
                return Ok((body, estimate));
            }
            Ok(ReadBody::Whole(bytes)) => bytes,
        };
        if let Some(refused) = too_large(bytes.len()) {
            return Err(refused);
        }
        estimate.prompt = inspect::prompt_estimate(bytes.len() as u64);
        let Some(mut request) = inspect::parse(&bytes) else {
            // An access token's caps hold as the route's do.
            if capped || (budgeted && rules.unparsed_budget_requests == Unparsed::Refuse) {
                return Err(ClientError::UnreadableBody.into());
            }
            return Ok((self.read_body(parts, bytes, metrics), estimate));
        };
        let clamped = rules
            .caps
            .apply(token_caps, &mut request, &parts.uri)
            .map_err(|broken| -> ProxyError {
                match broken {
                    Broken::Model => Refusal::ModelNotAllowed.into(),
                    Broken::Output { asked, cap } => {
                        Refusal::OutputTokensOverCap { asked, cap }.into()
                    }
                    Broken::Unreadable => ClientError::UnreadableBody.into(),
                }
            })?;
        if let Ok(Some(output)) = inspect::max_output(&request) {
            estimate.output = output.saturating_mul(inspect::choices(&request));
        }
        let adds_usage = add_usage && stream_usage::lacks_usage(&request);
        let rewritten = if clamped {
            if adds_usage {
                stream_usage::set_include_usage(&mut request);
            }
            serde_json::to_vec(&request).ok()
        } else if adds_usage {
            stream_usage::with_include_usage(&bytes, &request)
        } else {
            None
        };
        let added = adds_usage && rewritten.is_some();
        context.added_usage = added;
        if added {
            // The usage event must be readable to be cut out.
            identity_encoding(&mut parts.headers);
        }
        let bytes = rewritten.map_or(bytes, Bytes::from);
        Ok((self.read_body(parts, bytes, metrics), estimate))
    }

    /// A body read whole, sent with its length.
    fn read_body(
        &self,
        parts: &mut http::request::Parts,
        bytes: Bytes,
        metrics: RouteMetrics,
    ) -> RequestBody {
        parts.headers.remove(http::header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        RequestBody::buffered(bytes, self.max_request_body, metrics)
    }
    /// Reserves what the request may spend from the budgets that apply to
    /// it, held in its context until the request ends, then replaced by what
    /// it spent. One round trip to a shared usage_store, none locally.
    pub(super) async fn reserve(
        &self,
        route: &Route,
        estimate: Estimate,
        context: &mut RequestContext,
    ) -> Result<(), ProxyError> {
        let reservation = self
            .budgets
            .reserve(
                route.index,
                context.token.as_deref(),
                estimate,
                SystemTime::now(),
            )
            .await
            .map_err(|refused| match refused {
                Refused::Exhausted(exhausted) => Refusal::BudgetExhausted(exhausted),
                Refused::StoreUnavailable => Refusal::UsageStoreUnavailable,
            })?;
        context.reservation = reservation;
        Ok(())
    }
}

/// Asks the upstream for an uncompressed response, which the usage tap can read.
pub(super) fn identity_encoding(headers: &mut http::HeaderMap) {
    headers.insert(
        http::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

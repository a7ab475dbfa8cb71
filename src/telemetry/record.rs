//! The per-request access record: what one access-log event and the
//! request's metrics say, emitted when the request ends.
//!
//! An [`AccessRecord`] travels with the request and then with its response
//! body, collecting timings, byte counts and the usage read off the
//! response. It emits its event and metrics when dropped, so a stream that
//! ends in any way (finished, failed, or abandoned by the client) is
//! counted exactly once. Only the method and path are logged: never
//! headers, queries or bodies, which can carry secrets.
//!
//! It holds nothing the request acts on (the concurrency permit, the
//! budget reservation): those are the data path's request context, which
//! fills this record and reads it back to settle the budgets
//! ([`AccessRecord::spent`]).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Uri};
use tokio::time::Instant;

use crate::telemetry::access_log::AccessLine;
use crate::telemetry::metrics::RouteMetrics;
use crate::telemetry::tokens::{TokenFigures, UsageReport};
use crate::telemetry::trace::span::{ActiveSpan, Attribute};
use crate::telemetry::trace::Tracer;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response reached the client.
    Ok,
    /// The client went away before the response ended.
    ClientCancelled,
    /// The upstream failed, before or during the response.
    UpstreamError,
    /// A timeout (response headers or idle between frames) ended the request.
    Timeout,
    /// keyrelay refused the request itself (e.g. CONNECT).
    Rejected,
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` indexes it).
    pub const ALL: [Outcome; 5] = [
        Self::Ok,
        Self::ClientCancelled,
        Self::UpstreamError,
        Self::Timeout,
        Self::Rejected,
    ];

    /// The name used in log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientCancelled => "client_cancelled",
            Self::UpstreamError => "upstream_error",
            Self::Timeout => "timeout",
            Self::Rejected => "rejected",
        }
    }
}

/// Everything the access-log event reports about one request.
#[derive(Debug)]
pub struct AccessRecord {
    id: u64,
    request_id: Option<HeaderValue>,
    metrics: RouteMetrics,
    last_frame: Option<Instant>,
    method: Method,
    /// The request's path, copied: hyper's `Uri` is a slice of the
    /// connection's read buffer and would pin that buffer (8 KiB) for the
    /// whole of a held stream, making hyper allocate another one for its
    /// next read (issue 29).
    path: Box<str>,
    started: Instant,
    status: Option<u16>,
    token: Option<String>,
    first_byte: Option<Duration>,
    bytes: u64,
    outcome: Option<Outcome>,
    /// The token usage read off the response, if it was tapped.
    usage: Option<UsageReport>,
    /// The response could carry usage: a successful SSE stream or JSON answer.
    metered: Option<Metered>,
    /// Line ends relayed of a [`Metered::Lines`] response.
    lines: u64,
    /// The request was handed to the upstream client.
    forwarded: bool,
    /// Attempts upstream (0 until the first is sent).
    attempts: u32,
    /// The route that answered, when a fallback did.
    upstream: Option<String>,
    /// The request's span, when traces are exported (boxed: none is the
    /// common case, and the record lives as long as the stream).
    span: Option<Box<ActiveSpan>>,
}

impl AccessRecord {
    /// Starts the record when the request arrives.
    pub fn start(id: u64, method: Method, uri: &Uri, metrics: RouteMetrics) -> Self {
        metrics.started();
        Self {
            id,
            request_id: None,
            metrics,
            last_frame: None,
            method,
            path: uri.path().into(),
            started: Instant::now(),
            status: None,
            token: None,
            first_byte: None,
            bytes: 0,
            outcome: None,
            usage: None,
            metered: None,
            lines: 0,
            forwarded: false,
            attempts: 0,
            upstream: None,
            span: None,
        }
    }

    /// Starts the request's span, from the caller's trace context in
    /// `headers`, and names the route in it.
    pub fn trace(&mut self, tracer: &Arc<Tracer>, headers: &HeaderMap, route: Option<&str>) {
        let mut span = tracer.start(headers, self.started);
        if span.sampled() {
            if let Some(route) = route {
                span.set("keyrelay.route", route);
            }
            span.describe_request(&self.path);
        }
        self.span = Some(span);
    }

    /// The request's span, if it has one.
    pub fn span(&mut self) -> Option<&mut ActiveSpan> {
        self.span.as_deref_mut()
    }

    /// Records an event in the request's span, if it has a sampled one;
    /// `attributes` is only called then.
    pub fn trace_event(&mut self, name: &'static str, attributes: impl FnOnce() -> Vec<Attribute>) {
        if let Some(span) = self.span.as_deref_mut().filter(|span| span.sampled()) {
            span.event(Instant::now(), name, attributes());
        }
    }

    /// The request id, shared with the request's tracing span.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The request's metric handles.
    pub fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    /// Records the request id reported in the log (the upstream's
    /// `X-Baseten-Request-Id` when it sent one, else keyrelay's `X-Request-Id`).
    pub fn set_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(id);
    }

    /// Records that the request is being sent upstream: from here on a
    /// client that leaves before the answer still pays for its prompt.
    pub fn set_forwarded(&mut self) {
        self.forwarded = true;
        self.attempts += 1;
    }

    /// Records that route `name`, a fallback of the request's route,
    /// answered the request.
    pub fn set_upstream(&mut self, name: &str) {
        self.upstream = Some(name.to_owned());
    }

    /// Records that the response is a successful stream or JSON answer,
    /// which a budget charges even when it reports no usage.
    pub fn set_metered(&mut self, metered: Metered) {
        self.metered = Some(metered);
    }

    /// Records which local access token the request used (its name, never its value).
    pub fn set_token(&mut self, name: Option<String>) {
        self.token = name;
    }

    /// Records the status sent to the client.
    pub fn set_status(&mut self, status: u16) {
        self.status = Some(status);
    }

    /// Counts the line ends of a data frame of a [`Metered::Lines`]
    /// response (one generated chunk each).
    pub fn count_lines(&mut self, data: &[u8]) {
        if self.metered == Some(Metered::Lines) {
            self.lines += memchr::memchr_iter(b'\n', data).count() as u64;
        }
    }

    /// Counts a data frame relayed to the client.
    pub fn add_bytes(&mut self, len: usize, now: Instant) {
        self.first_byte
            .get_or_insert_with(|| now.duration_since(self.started));
        self.bytes += len as u64;
        let gap = self
            .last_frame
            .replace(now)
            .map(|previous| now.duration_since(previous).as_secs_f64());
        self.metrics.frame(len, gap);
    }

    /// Records the bytes an upgraded connection relayed to the client.
    pub fn set_tunnelled_bytes(&mut self, bytes: u64) {
        self.bytes = bytes;
    }

    /// Records the token usage read off the response.
    pub fn set_usage(&mut self, report: UsageReport) {
        self.usage = Some(report);
    }

    /// Records how the request ended; the first outcome recorded wins.
    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::ClientCancelled);
        let duration = self.started.elapsed();
        let status = self.status.unwrap_or(0);
        let tokens = self.usage.map(|report| self.token_figures(report));
        if let (Some(report), Some(figures)) = (self.usage, tokens) {
            self.metrics.usage(self.token.as_deref(), &report, &figures);
        }
        self.metrics.finished(
            status,
            outcome,
            duration.as_secs_f64(),
            self.first_byte.map(|d| d.as_secs_f64()),
        );
        let line = AccessLine {
            request_id: self.request_id.as_ref().and_then(|v| v.to_str().ok()),
            method: self.method.as_str(),
            path: &self.path,
            status: self.status,
            token: self.token.as_deref(),
            ttfb: self.first_byte,
            duration,
            bytes: self.bytes,
            outcome: outcome.as_str(),
            usage: self.usage.map(|report| report.usage).unwrap_or_default(),
            ttft: tokens.and_then(|figures| figures.time_to_first_token),
            tokens_per_second: tokens.and_then(|figures| figures.tokens_per_second),
            attempts: (self.attempts > 1).then_some(self.attempts),
            upstream: self.upstream.as_deref(),
        };
        line.emit();
        if let Some(span) = self.span.take() {
            let failed = matches!(outcome, Outcome::UpstreamError | Outcome::Timeout);
            span.finish(&line, failed);
        }
    }
}

/// A response a budget charges: what kind of body it relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// Server-Sent Events.
    Sse,
    /// A JSON answer, or another text body (plain text, `+json`, none
    /// named): charged by its bytes.
    Json,
    /// A stream of JSON lines (Ollama's `application/x-ndjson`): one
    /// generated chunk per line.
    Lines,
}

impl AccessRecord {
    /// The tokens the request is charged: what the upstream reported, and
    /// for what it did not report of a successful stream or JSON answer
    /// to a request that can generate (not GET or HEAD) and relayed a
    /// byte, a lower bound from what passed: `prompt_estimate` (the
    /// request body's bytes / 4) for the prompt, one token per generated
    /// chunk (`"delta"` event) of a stream, or the bytes relayed / 4 of a
    /// JSON answer. Never 0 for a served response. A request the client
    /// abandoned after it was sent upstream, before the response head, is
    /// charged its prompt estimate (the upstream may have read it); one
    /// that failed or was refused before a byte, nothing.
    pub fn spent(&self, prompt_estimate: u64) -> u64 {
        let usage = self.usage.map(|report| report.usage).unwrap_or_default();
        if self.forwarded && self.status.is_none() && self.outcome.is_none() {
            return prompt_estimate.max(1);
        }
        let served = self.metered.is_some()
            && self.bytes > 0
            && self.method != Method::GET
            && self.method != Method::HEAD;
        if !served {
            return usage
                .prompt
                .unwrap_or(0)
                .saturating_add(usage.completion.unwrap_or(0));
        }
        let output_floor = match self.metered {
            Some(Metered::Sse) => self.usage.map_or(0, |report| report.deltas),
            Some(Metered::Lines) => self.lines,
            _ => self.bytes / 4,
        }
        .max(1);
        usage
            .prompt
            .unwrap_or(prompt_estimate)
            .saturating_add(usage.completion.unwrap_or(output_floor))
    }

    fn token_figures(&self, report: UsageReport) -> TokenFigures {
        let first = report.first_content;
        let generating = first
            .zip(self.last_frame)
            .map(|(first, last)| last.duration_since(first));
        let tokens_per_second = report
            .usage
            .completion
            .zip(generating)
            // One token, or all in one frame, gives no rate.
            .filter(|&(tokens, time)| tokens > 1 && !time.is_zero())
            .map(|(tokens, time)| (tokens - 1) as f64 / time.as_secs_f64());
        TokenFigures {
            time_to_first_token: first.map(|first| first.duration_since(self.started)),
            tokens_per_second,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn outcome_all_is_indexed_by_discriminant() {
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index, "{}", outcome.as_str());
        }
    }
}

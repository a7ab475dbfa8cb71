//! A request's span: started when the request arrives (ids from its
//! `traceparent`), given events as the request goes (retries, the first
//! token), and finished from the same figures as the access-log line, then
//! queued for export.
//!
//! What goes in: the method, the path (never the query, which can hold a
//! key), the route, the status, the upstream's host, the access token's
//! name, the GenAI usage the tap read. Never a header value.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::telemetry::access_log::AccessLine;
use crate::telemetry::trace::context::{self, Parent, SpanId, TraceId};
use crate::telemetry::trace::Tracer;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(Box<str>),
    Static(&'static str),
    Int(i64),
    Float(f64),
}

/// Longest text attribute, in bytes: paths, ids and model names come from
/// clients, and a queue of spans must not hold 2,048 copies of a 64 KiB
/// path (`OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT` in the SDKs, unlimited there).
pub const MAX_TEXT: usize = 1024;

/// Longest `tracestate` kept: the W3C recommendation asks vendors to
/// propagate at least 512 characters; a longer one is not recorded.
pub const MAX_TRACE_STATE: usize = 512;

impl From<&str> for Value {
    fn from(text: &str) -> Self {
        Self::Text(truncated(text, MAX_TEXT).into())
    }
}

/// `text` cut to at most `limit` bytes, at a character boundary.
fn truncated(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One attribute: a key from the semantic conventions (or `keyrelay.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub key: &'static str,
    pub value: Value,
}

impl Attribute {
    pub fn new(key: &'static str, value: impl Into<Value>) -> Self {
        Self {
            key,
            value: value.into(),
        }
    }
}

impl From<i64> for Value {
    fn from(number: i64) -> Self {
        Self::Int(number)
    }
}

/// Something that happened during the span, at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub time_unix_nano: u64,
    pub name: &'static str,
    pub attributes: Vec<Attribute>,
}

/// The span's status: unset for answers the client got, an error with a
/// type for what failed upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Unset,
    Error(&'static str),
}

/// A finished span, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanData {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub trace_state: Option<Box<str>>,
    pub name: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<Attribute>,
    pub events: Vec<Event>,
    pub status: Status,
    /// The W3C trace flags, and whether the parent was remote (OTLP's
    /// `SpanFlags`).
    pub flags: u32,
}

/// A request's span while the request runs.
#[derive(Debug)]
pub struct ActiveSpan {
    tracer: Arc<Tracer>,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    sampled: bool,
    trace_state: Option<HeaderValue>,
    started: Instant,
    start_unix_nano: u64,
    attributes: Vec<Attribute>,
    events: Vec<Event>,
}

impl ActiveSpan {
    /// Starts the span of a request with `headers`: a child of the
    /// caller's span when it sent a valid `traceparent`, else the root of
    /// a new trace.
    pub(crate) fn start(tracer: &Arc<Tracer>, headers: &HeaderMap, started: Instant) -> Self {
        let mut parents = headers.get_all(TRACEPARENT).iter();
        // Two traceparent headers are as invalid as a malformed one.
        let parent = match (parents.next(), parents.next()) {
            (Some(value), None) => Parent::parse(value.as_bytes()),
            _ => None,
        };
        let trace_id = parent.map_or_else(TraceId::random, |parent| parent.trace_id);
        // The caller's vendors' state travels on only within its trace.
        let trace_state = parent.and_then(|_| joined(headers.get_all(TRACESTATE)));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            tracer: Arc::clone(tracer),
            trace_id,
            span_id: SpanId::random(),
            parent: parent.map(|parent| parent.span_id),
            sampled: tracer
                .sampler
                .sampled(&trace_id.0, parent.map(|parent| parent.sampled())),
            trace_state,
            started,
            start_unix_nano: now.as_nanos() as u64,
            attributes: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Puts this span's context on the upstream request, replacing the
    /// caller's: the model side's spans become children of keyrelay's.
    pub(crate) fn propagate(&self, headers: &mut HeaderMap) {
        let value = context::traceparent(self.trace_id, self.span_id, self.sampled);
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(TRACEPARENT, value);
        }
        match &self.trace_state {
            Some(state) => {
                headers.insert(TRACESTATE, state.clone());
            }
            // A new trace: state from a trace it is not part of is dropped.
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// True if the span will be exported.
    pub(crate) fn sampled(&self) -> bool {
        self.sampled
    }

    /// Adds an attribute known during the request (route, upstream host).
    pub(crate) fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if self.sampled {
            self.attributes.push(Attribute::new(key, value));
        }
    }

    /// The GenAI operation the request's path asks for
    /// (`gen_ai.operation.name`), where it names one.
    pub(crate) fn describe_request(&mut self, path: &str) {
        if let Some(operation) = operation(path) {
            self.set("gen_ai.operation.name", Value::Static(operation));
        }
    }

    /// Records an event at `at`.
    pub(crate) fn event(&mut self, at: Instant, name: &'static str, attributes: Vec<Attribute>) {
        if self.sampled {
            let time_unix_nano = self.unix_nano(at);
            self.events.push(Event {
                time_unix_nano,
                name,
                attributes,
            });
        }
    }

    fn unix_nano(&self, at: Instant) -> u64 {
        let since_start = at.saturating_duration_since(self.started);
        self.start_unix_nano
            .saturating_add(since_start.as_nanos() as u64)
    }

    /// Ends the span with what the access-log line says, and queues it.
    pub(crate) fn finish(mut self, line: &AccessLine<'_>, failed: bool) {
        if !self.sampled {
            return;
        }
        let mut attributes = std::mem::take(&mut self.attributes);
        attributes.reserve(20);
        attributes.push(Attribute::new("http.request.method", method(line.method)));
        attributes.push(Attribute::new("url.path", line.path));
        // keyrelay's listeners speak plain HTTP (TCP or a Unix socket).
        attributes.push(Attribute::new("url.scheme", Value::Static("http")));
        if let Some(status) = line.status {
            attributes.push(Attribute::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        attributes.push(Attribute::new("http.response.body.size", line.bytes as i64));
        attributes.push(Attribute::new(
            "keyrelay.outcome",
            Value::Static(line.outcome),
        ));
        if let Some(id) = line.request_id {
            attributes.push(Attribute::new("keyrelay.request_id", id));
        }
        if let Some(token) = line.token {
            attributes.push(Attribute::new("keyrelay.access_token", token));
        }
        if let Some(attempts) = line.attempts {
            attributes.push(Attribute::new("keyrelay.attempts", i64::from(attempts)));
        }
        if let Some(upstream) = line.upstream {
            attributes.push(Attribute::new("keyrelay.upstream.route", upstream));
        }
        if let Some(prompt) = line.usage.prompt {
            attributes.push(Attribute::new("gen_ai.usage.input_tokens", prompt as i64));
        }
        if let Some(completion) = line.usage.completion {
            attributes.push(Attribute::new(
                "gen_ai.usage.output_tokens",
                completion as i64,
            ));
        }
        if let Some(cached) = line.usage.cached {
            attributes.push(Attribute::new(
                "gen_ai.usage.cache_read.input_tokens",
                cached as i64,
            ));
        }
        if let Some(ttft) = line.ttft {
            attributes.push(Attribute::new(
                "keyrelay.time_to_first_token",
                Value::Float(ttft.as_secs_f64()),
            ));
            self.event_after(ttft, "first_token");
        }
        if let Some(rate) = line.tokens_per_second {
            attributes.push(Attribute::new(
                "keyrelay.output_tokens_per_second",
                Value::Float(rate),
            ));
        }
        if let Some(ttfb) = line.ttfb {
            self.event_after(ttfb, "first_byte");
        }
        let status = if failed {
            attributes.push(Attribute::new("error.type", Value::Static(line.outcome)));
            Status::Error(line.outcome)
        } else {
            match line.status {
                Some(code) if code >= 500 => {
                    attributes.push(Attribute::new(
                        "error.type",
                        Value::Text(code.to_string().into()),
                    ));
                    Status::Error("upstream answered with a server error")
                }
                _ => Status::Unset,
            }
        };
        // Events recorded during the request come first in time.
        self.events.sort_by_key(|event| event.time_unix_nano);
        let name = match self.attributes_route(&attributes) {
            Some(route) => format!("{} {route}", line.method),
            None => line.method.to_owned(),
        };
        let span = SpanData {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id: self.parent,
            trace_state: self
                .trace_state
                .as_ref()
                .and_then(|state| state.to_str().ok())
                .filter(|state| state.len() <= MAX_TRACE_STATE)
                .map(Into::into),
            name,
            start_unix_nano: self.start_unix_nano,
            end_unix_nano: self.start_unix_nano + line.duration.as_nanos() as u64,
            attributes,
            events: std::mem::take(&mut self.events),
            status,
            flags: span_flags(self.sampled, self.parent.is_some()),
        };
        self.tracer.queue(span);
    }

    fn event_after(&mut self, after: Duration, name: &'static str) {
        self.event(self.started + after, name, Vec::new());
    }

    fn attributes_route<'a>(&self, attributes: &'a [Attribute]) -> Option<&'a str> {
        attributes
            .iter()
            .find_map(|attribute| match (&attribute.key, &attribute.value) {
                (&"keyrelay.route", Value::Text(route)) => Some(&**route),
                _ => None,
            })
    }
}

/// Several `tracestate` headers are one list (W3C: combined as fields
/// of one header are), so the upstream gets every vendor's entry.
fn joined(values: http::header::GetAll<'_, HeaderValue>) -> Option<HeaderValue> {
    let mut values = values.iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(first.clone());
    };
    let mut all = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        all.push(b',');
        all.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&all).ok()
}

/// A method as an attribute value: the common ones without a copy.
fn method(name: &str) -> Value {
    const KNOWN: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    match KNOWN.iter().find(|known| **known == name) {
        Some(known) => Value::Static(known),
        None => Value::from(name),
    }
}

/// OTLP's `Span.flags`: the W3C flags in the low byte, then "whether the
/// parent is remote is known" and "it is".
fn span_flags(sampled: bool, remote_parent: bool) -> u32 {
    let mut flags = u32::from(sampled) | 0x100;
    if remote_parent {
        flags |= 0x200;
    }
    flags
}

/// The GenAI operation a path asks for, by its last segment (Gemini's
/// `models/x:generateContent` by its method).
fn operation(path: &str) -> Option<&'static str> {
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    let method = last.rsplit_once(':').map_or(last, |(_, method)| method);
    Some(match method {
        "completions" if path.contains("/chat/") => "chat",
        "completions" => "text_completion",
        "messages"
        | "generateContent"
        | "streamGenerateContent"
        | "converse"
        | "converse-stream" => "chat",
        "responses" => "chat",
        "embeddings" | "embedContent" | "batchEmbedContents" => "embeddings",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::{operation, truncated, Value, MAX_TEXT};

    #[test]
    fn client_texts_are_bounded_at_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let Value::Text(kept) = Value::from(long.as_str()) else {
            panic!("text");
        };
        assert!(kept.len() <= MAX_TEXT && kept.len() >= MAX_TEXT - 1);
        assert_eq!(truncated("short", 3), "sho");
    }

    #[test]
    fn operations_by_path() {
        for (path, expected) in [
            ("/v1/chat/completions", Some("chat")),
            ("/v1/completions", Some("text_completion")),
            ("/v1/messages", Some("chat")),
            (
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                Some("chat"),
            ),
            ("/v1/embeddings/", Some("embeddings")),
            ("/v1/models", None),
        ] {
            assert_eq!(operation(path), expected, "{path}");
        }
    }
}

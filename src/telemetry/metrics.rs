//! Prometheus metrics, labelled by route, served on the admin listener.
//!
//! Handles for one route are resolved once, when the route table is built at
//! startup ([`RouteMetrics`]), so the per-request work is a few atomic
//! increments and the per-frame work one histogram observation.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::telemetry::logging;
use crate::telemetry::record::Outcome;
use crate::telemetry::tokens::{Account, GaveUp, Overshoot, TokenFigures, UsageReport};

/// Latency buckets in seconds, 1 ms to 20 minutes (cold starts and long generations).
const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0,
];

/// Buckets in seconds for keyrelay's own overhead and the gaps between frames.
const FINE_BUCKETS: [f64; 14] = [
    0.000_01, 0.000_05, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0,
];

/// Output tokens per second of one stream: a slow reasoning model to a fast
/// small one.
const RATE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

fn rate_histogram() -> Histogram {
    Histogram::new(RATE_BUCKETS)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn fine_histogram() -> Histogram {
    Histogram::new(FINE_BUCKETS)
}

/// A route name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route's name ("default" for the single-upstream configuration).
    pub route: String,
}

/// Status classes, indexed by [`status_class_index`]. `none` is a request
/// that ended before any status was sent (the client went away while the
/// upstream had not answered): counting it as 5xx would blame a server.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Where `status`'s class ("2xx", ...) is in [`STATUS_CLASSES`]; grouping by
/// class keeps the series count small. 0 means no status was sent.
fn status_class_index(status: u16) -> usize {
    match status {
        0 => 5,
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route.
    pub route: String,
    /// The status class sent to the client.
    pub status: &'static str,
    /// How the request ended (ok, client_cancelled, upstream_error, timeout, rejected).
    pub outcome: &'static str,
}

/// Labels of the upstream error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The route.
    pub route: String,
    /// What failed: the error `type` (upstream_tls, upstream_connect_timeout, ...),
    /// `reset_mid_stream` or `idle_timeout`.
    pub kind: &'static str,
}

/// Labels of the upstream retry counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// The route.
    pub route: String,
    /// Why the request went again: `unsent` (a pooled connection closed
    /// before the request was written) or `stale_connection` (a bodiless
    /// idempotent request written on a reused connection that closed before
    /// any response byte).
    pub reason: &'static str,
}

/// Labels of the span counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    /// `exported`, `dropped` (the export queue was full) or `failed` (the
    /// collector could not be reached or refused them).
    pub result: &'static str,
}

/// Labels of the credential refresh counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// The route.
    pub route: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of the upstream attempt counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The request's route.
    pub route: String,
    /// The route whose upstream the attempt went to (the route itself, or
    /// one of its `fallback` routes).
    pub target: String,
    /// `relayed` (its answer went to the client), `retried` (another
    /// attempt followed), or, for an attempt whose answer was relayed
    /// although `retry_on` matched it, why no other followed:
    /// `attempts_used`, `budget_exhausted`, `wait_over_cap` or
    /// `body_not_kept`.
    pub outcome: &'static str,
}

/// Labels of the LLM token counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// The route.
    pub route: String,
    /// The local access token's name (never its value); empty without one.
    pub access_token: String,
    /// `prompt`, `completion` or `cached` (cached tokens are also prompt tokens).
    pub kind: &'static str,
}

/// Labels of the counter of responses whose usage could not be read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnreadLabels {
    /// The route.
    pub route: String,
    /// `overlong_line` or `overlong_json`.
    pub reason: &'static str,
}

/// Labels of the budget overshoot counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `route` or `access_token`.
    pub scope: &'static str,
    /// The route's or the access token's name.
    pub name: String,
}

/// Every metric keyrelay exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabel, Histogram>,
    first_byte: Family<RouteLabel, Histogram>,
    frame_gap: Family<RouteLabel, Histogram>,
    overhead: Family<RouteLabel, Histogram>,
    active: Family<RouteLabel, Gauge>,
    bytes_in: Family<RouteLabel, Counter>,
    bytes_out: Family<RouteLabel, Counter>,
    upstream_errors: Family<ErrorLabels, Counter>,
    upstream_retries: Family<RetryLabels, Counter>,
    upstream_attempts: Family<AttemptLabels, Counter>,
    llm_tokens: Family<TokenLabels, Counter>,
    usage_unread: Family<UnreadLabels, Counter>,
    time_to_first_token: Family<RouteLabel, Histogram>,
    output_rate: Family<RouteLabel, Histogram>,
    budget_overshoot: Family<BudgetLabels, Counter>,
    usage_store_errors: Counter,
    credential_reloads: Counter,
    credential_refreshes: Family<RefreshLabels, Counter>,
    credential_expiry: Family<RouteLabel, Gauge<f64, AtomicU64>>,
    trace_spans: Family<SpanLabels, Counter>,
    /// Mirrors [`logging::dropped_lines`], brought up to date on each scrape;
    /// the lock keeps two concurrent scrapes from adding the same lines twice.
    log_lines_dropped: std::sync::Mutex<Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyrelay");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let first_byte = Family::<RouteLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let frame_gap = Family::<RouteLabel, Histogram>::new_with_constructor(
            fine_histogram as fn() -> Histogram,
        );
        let overhead = Family::<RouteLabel, Histogram>::new_with_constructor(
            fine_histogram as fn() -> Histogram,
        );
        let active = Family::<RouteLabel, Gauge>::default();
        let bytes_in = Family::<RouteLabel, Counter>::default();
        let bytes_out = Family::<RouteLabel, Counter>::default();
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        let upstream_retries = Family::<RetryLabels, Counter>::default();
        let upstream_attempts = Family::<AttemptLabels, Counter>::default();
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        let usage_unread = Family::<UnreadLabels, Counter>::default();
        let time_to_first_token = Family::<RouteLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let output_rate = Family::<RouteLabel, Histogram>::new_with_constructor(
            rate_histogram as fn() -> Histogram,
        );
        let budget_overshoot = Family::<BudgetLabels, Counter>::default();
        let usage_store_errors = Counter::default();
        let credential_reloads = Counter::default();
        let credential_refreshes = Family::<RefreshLabels, Counter>::default();
        let credential_expiry = Family::<RouteLabel, Gauge<f64, AtomicU64>>::default();

        registry.register(
            "requests",
            "Requests finished, by route, status class and outcome (client_cancelled counts cancellations)",
            requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from request arrival to the end of the response",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register_with_unit(
            "time_to_first_byte",
            "Time from request arrival to the first response body byte",
            Unit::Seconds,
            first_byte.clone(),
        );
        registry.register_with_unit(
            "frame_gap",
            "Time between consecutive response body frames (stream smoothness)",
            Unit::Seconds,
            frame_gap.clone(),
        );
        registry.register_with_unit(
            "overhead",
            "keyrelay's own time: from request arrival to the upstream request being sent",
            Unit::Seconds,
            overhead.clone(),
        );
        registry.register(
            "active_requests",
            "Requests and streams in flight",
            active.clone(),
        );
        registry.register_with_unit(
            "request_body",
            "Request body bytes relayed to the upstream",
            Unit::Bytes,
            bytes_in.clone(),
        );
        registry.register_with_unit(
            "response_body",
            "Response body bytes relayed to clients",
            Unit::Bytes,
            bytes_out.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by kind (connect, TLS, timeouts, resets mid-stream)",
            upstream_errors.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests sent upstream a second time, by reason (unsent: a pooled connection closed before the request was written; stale_connection: a bodiless GET, HEAD, OPTIONS or DELETE on a reused connection that closed before any response byte)",
            upstream_retries.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Attempts upstream by routes with a retry policy, by route, target route and outcome (relayed, retried, or why a retry_on match was relayed: attempts_used, budget_exhausted, wait_over_cap, body_not_kept)",
            upstream_attempts.clone(),
        );
        registry.register(
            "llm_tokens",
            "LLM tokens the upstream reported using, by route, access token and kind (prompt, completion, cached)",
            llm_tokens.clone(),
        );
        registry.register(
            "llm_usage_unread",
            "Responses whose token usage the tap stopped reading (an SSE line or JSON body beyond its bound)",
            usage_unread.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Time from request arrival to the first generated content (not the first byte)",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        registry.register(
            "output_tokens_per_second",
            "Output tokens per second of each stream, after its first token",
            output_rate.clone(),
        );
        registry.register(
            "llm_budget_overshoot_tokens",
            "Tokens spent beyond a token budget by responses admitted before it ran out",
            budget_overshoot.clone(),
        );
        registry.register(
            "usage_store_errors",
            "Exchanges with the Redis usage_store that failed (the request was then served or refused as usage_store_unavailable says)",
            usage_store_errors.clone(),
        );
        registry.register(
            "credential_reloads",
            "Times the upstream key was reloaded from key_file",
            credential_reloads.clone(),
        );
        registry.register(
            "credential_refreshes",
            "Fetches of a route's expiring credential (key_command runs, OAuth2 token requests), the one at startup included, by result (ok, error)",
            credential_refreshes.clone(),
        );
        registry.register_with_unit(
            "credential_expiry",
            "Time left before a route's expiring credential (key_command, OAuth2) may no longer be sent; negative once it has expired",
            Unit::Seconds,
            credential_expiry.clone(),
        );
        let trace_spans = Family::<SpanLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Request spans sampled for OTLP export, by result (exported, dropped: the export queue was full, failed: the collector could not be reached or refused them)",
            trace_spans.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log writer fell behind (requests never wait on it)",
            log_lines_dropped.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            first_byte,
            frame_gap,
            overhead,
            active,
            bytes_in,
            bytes_out,
            upstream_errors,
            upstream_retries,
            upstream_attempts,
            llm_tokens,
            usage_unread,
            time_to_first_token,
            output_rate,
            budget_overshoot,
            usage_store_errors,
            credential_reloads,
            credential_refreshes,
            credential_expiry,
            trace_spans,
            log_lines_dropped: std::sync::Mutex::new(log_lines_dropped),
        }
    }

    /// The handles for one route, resolved once when the route table is built.
    pub fn route(self: &Arc<Self>, route: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        // Every status class and outcome up front: no lookup per request, and
        // the series exist (at zero) from startup, which alerting rules like.
        let requests = STATUS_CLASSES.map(|status| {
            Outcome::ALL.map(|outcome| {
                self.requests.get_or_create_owned(&RequestLabels {
                    route: label.route.clone(),
                    status,
                    outcome: outcome.as_str(),
                })
            })
        });
        RouteMetrics(Arc::new(RouteHandles {
            requests,
            first_byte: self.first_byte.get_or_create_owned(&label),
            duration: self.duration.get_or_create_owned(&label),
            frame_gap: self.frame_gap.get_or_create_owned(&label),
            overhead: self.overhead.get_or_create_owned(&label),
            active: self.active.get_or_create_owned(&label),
            bytes_in: self.bytes_in.get_or_create_owned(&label),
            bytes_out: self.bytes_out.get_or_create_owned(&label),
            time_to_first_token: self.time_to_first_token.get_or_create_owned(&label),
            output_rate: self.output_rate.get_or_create_owned(&label),
            relayed_here: std::sync::OnceLock::new(),
            all: Arc::clone(self),
            route: label.route,
        }))
    }

    /// The LLM tokens of `kind` counted so far on `route` for requests
    /// without an access token (the demo prints it).
    pub fn llm_tokens(&self, route: &str, kind: &'static str) -> u64 {
        self.llm_tokens
            .get_or_create(&TokenLabels {
                route: route.to_owned(),
                access_token: String::new(),
                kind,
            })
            .get()
    }

    /// The counter of failed exchanges with the Redis usage_store.
    pub fn usage_store_errors(&self) -> Counter {
        self.usage_store_errors.clone()
    }

    /// The counter of key-file reloads, for the key-file watchers.
    pub fn credential_reloads(&self) -> Counter {
        self.credential_reloads.clone()
    }

    /// The counter of `route`'s key_command runs ending in `result` (`ok`
    /// or `error`), for its refresher.
    pub fn credential_refreshes(&self, route: &str, result: &'static str) -> Counter {
        self.credential_refreshes
            .get_or_create_owned(&RefreshLabels {
                route: route.to_owned(),
                result,
            })
    }

    /// The counter of sampled spans that ended in `result`.
    pub fn trace_spans(&self, result: &'static str) -> Counter {
        self.trace_spans.get_or_create_owned(&SpanLabels { result })
    }

    /// Sets the seconds left before `route`'s credential expires (brought
    /// up to date on each scrape).
    pub fn set_credential_expiry(&self, route: &str, seconds: f64) {
        self.credential_expiry
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .set(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        if let Ok(counter) = self.log_lines_dropped.lock() {
            let behind = logging::dropped_lines().saturating_sub(counter.get());
            counter.inc_by(behind);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// One route's metric handles; cloning is one reference count.
#[derive(Clone)]
pub struct RouteMetrics(Arc<RouteHandles>);

struct RouteHandles {
    all: Arc<Metrics>,
    route: String,
    requests: [[Counter; Outcome::ALL.len()]; STATUS_CLASSES.len()],
    first_byte: Histogram,
    duration: Histogram,
    frame_gap: Histogram,
    overhead: Histogram,
    active: Gauge,
    bytes_in: Counter,
    bytes_out: Counter,
    time_to_first_token: Histogram,
    output_rate: Histogram,
    /// `upstream_attempts{target=route, outcome=relayed}`, the count every
    /// retried route's successful requests add to, found once.
    relayed_here: std::sync::OnceLock<Counter>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteMetrics({})", self.0.route)
    }
}

impl RouteMetrics {
    /// A request started.
    pub fn started(&self) {
        self.0.active.inc();
    }

    /// keyrelay's own time before the upstream request went out.
    pub fn overhead(&self, seconds: f64) {
        self.0.overhead.observe(seconds);
    }

    /// A response frame of `len` bytes, `gap` seconds after the previous one.
    pub fn frame(&self, len: usize, gap: Option<f64>) {
        self.0.bytes_out.inc_by(len as u64);
        if let Some(gap) = gap {
            self.0.frame_gap.observe(gap);
        }
    }

    /// Request body bytes relayed upstream.
    pub fn request_bytes(&self, len: usize) {
        self.0.bytes_in.inc_by(len as u64);
    }

    /// An upstream failure of `kind`.
    pub fn upstream_error(&self, kind: &'static str) {
        self.0
            .all
            .upstream_errors
            .get_or_create(&ErrorLabels {
                route: self.0.route.clone(),
                kind,
            })
            .inc();
    }

    /// A request sent upstream once more, and why.
    pub fn upstream_retry(&self, reason: &'static str) {
        self.0
            .all
            .upstream_retries
            .get_or_create(&RetryLabels {
                route: self.0.route.clone(),
                reason,
            })
            .inc();
    }

    /// One attempt upstream on route `target` for this route, and what
    /// became of it (see [`AttemptLabels`]).
    pub fn upstream_attempt(&self, target: &str, outcome: &'static str) {
        let counter = |outcome| {
            self.0
                .all
                .upstream_attempts
                .get_or_create_owned(&AttemptLabels {
                    route: self.0.route.clone(),
                    target: target.to_owned(),
                    outcome,
                })
        };
        if outcome == "relayed" && target == self.0.route {
            self.0.relayed_here.get_or_init(|| counter(outcome)).inc();
        } else {
            counter(outcome).inc();
        }
    }

    /// What the usage tap read off a response, for the access token named
    /// `token`. Counted once per response, when it ends.
    pub fn usage(&self, token: Option<&str>, report: &UsageReport, figures: &TokenFigures) {
        let handles = &self.0;
        if let Some(reason) = report.gave_up {
            self.usage_unread(reason);
        }
        let usage = report.usage;
        for (kind, tokens) in [
            ("prompt", usage.prompt),
            ("completion", usage.completion),
            ("cached", usage.cached),
        ] {
            let Some(tokens) = tokens else { continue };
            handles
                .all
                .llm_tokens
                .get_or_create(&TokenLabels {
                    route: handles.route.clone(),
                    access_token: token.unwrap_or_default().to_owned(),
                    kind,
                })
                .inc_by(tokens);
        }
        if let Some(ttft) = figures.time_to_first_token {
            handles.time_to_first_token.observe(ttft.as_secs_f64());
        }
        if let Some(rate) = figures.tokens_per_second {
            handles.output_rate.observe(rate);
        }
    }

    /// Tokens a response spent beyond one of its budgets (it was admitted
    /// before the budget ran out, and finished).
    pub fn budget_overshoot(&self, overshoot: &Overshoot) {
        let (scope, name) = match &overshoot.account {
            Account::Route(name) => ("route", name),
            Account::AccessToken(name) => ("access_token", name),
        };
        self.0
            .all
            .budget_overshoot
            .get_or_create(&BudgetLabels {
                scope,
                name: name.clone(),
            })
            .inc_by(overshoot.tokens);
    }

    /// A response whose usage could not be read, and why.
    pub fn usage_unread(&self, reason: GaveUp) {
        self.0
            .all
            .usage_unread
            .get_or_create(&UnreadLabels {
                route: self.0.route.clone(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A request finished.
    pub fn finished(&self, status: u16, outcome: Outcome, duration: f64, first_byte: Option<f64>) {
        let handles = &self.0;
        handles.active.dec();
        handles.duration.observe(duration);
        if let Some(first_byte) = first_byte {
            handles.first_byte.observe(first_byte);
        }
        let class = status_class_index(status);
        handles.requests[class][outcome as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_cancelled_before_any_status_has_its_own_class() {
        let metrics = Arc::new(Metrics::new());
        let route = metrics.route("default");
        route.started();
        route.finished(0, Outcome::ClientCancelled, 0.1, None);
        route.started();
        route.finished(502, Outcome::UpstreamError, 0.1, Some(0.05));
        let text = metrics.encode();
        let count = |status: &str, outcome: &str| {
            let series = format!(
                "keyrelay_requests_total{{route=\"default\",status=\"{status}\",outcome=\"{outcome}\"}} "
            );
            text.lines()
                .find_map(|line| line.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
                .to_owned()
        };
        assert_eq!(count("none", "client_cancelled"), "1");
        assert_eq!(count("5xx", "client_cancelled"), "0");
        assert_eq!(count("5xx", "upstream_error"), "1");
    }
}

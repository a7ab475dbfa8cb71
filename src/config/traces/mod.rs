//! The trace export settings: where request spans go (`otlp_endpoint`,
//! `otlp_protocol`, or the standard `OTEL_EXPORTER_OTLP_*` variables),
//! which requests are sampled (`OTEL_TRACES_SAMPLER`), what the resource
//! says (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) and how spans are
//! batched (`OTEL_BSP_*`). Checked in `check/traces.rs`.

pub mod sampler;

use std::fmt;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

pub use sampler::Sampler;

/// How spans are sent to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf`: a POST of the protobuf message to `/v1/traces`.
    HttpProtobuf,
    /// `grpc`: the `TraceService/Export` call over HTTP/2.
    Grpc,
}

impl OtlpProtocol {
    /// The name the settings and variables use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        }
    }
}

/// Everything trace export needs; `None` in [`super::Config`] when off.
#[derive(Clone)]
pub struct TraceSettings {
    /// Where each batch is sent: the full `/v1/traces` URL for
    /// `http/protobuf`, the collector's origin for `grpc`.
    pub endpoint: Uri,
    pub protocol: OtlpProtocol,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: often a collector's API key, so
    /// secret (never printed; see the `Debug` below).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub sampler: Sampler,
    /// `service.name` first, then the other resource attributes.
    pub resource: Vec<(String, String)>,
    /// How long one export may take.
    pub timeout: Duration,
    /// Longest time a span waits in the queue before its batch is sent.
    pub schedule_delay: Duration,
    /// Spans queued at most; more are dropped (and counted), never waited on.
    pub max_queue: usize,
    /// Spans sent in one export at most.
    pub max_batch: usize,
}

impl fmt::Debug for TraceSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("TraceSettings")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &header_names)
            .field("sampler", &self.sampler)
            .field("resource", &self.resource)
            .field("timeout", &self.timeout)
            .field("schedule_delay", &self.schedule_delay)
            .field("max_queue", &self.max_queue)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

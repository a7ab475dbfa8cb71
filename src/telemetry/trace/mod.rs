//! Request spans in the caller's trace, exported over OTLP.
//!
//! With `otlp_endpoint` unset nothing here runs: no [`Tracer`] exists, the
//! access record holds no span, and `traceparent` passes through untouched.
//! With it set, each request gets a span ([`span::ActiveSpan`]) that hands
//! its id upstream in `traceparent`, and is queued when the request ends;
//! the [`export::Exporter`] task sends the queue in batches. Requests never
//! wait on it: a full queue drops the span and counts it.

pub mod context;
pub mod export;
pub mod otlp;
pub mod span;

use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::traces::{Sampler, TraceSettings};
use crate::telemetry::metrics::Metrics;
use span::{ActiveSpan, SpanData};
use std::sync::Arc;

/// Starts request spans and queues the finished ones for export.
#[derive(Debug)]
pub struct Tracer {
    sampler: Sampler,
    queue: mpsc::Sender<SpanData>,
    /// Wakes the exporter when a batch is full; otherwise it wakes on its
    /// own schedule, so a span costs no cross-thread wake-up.
    batch_full: Arc<Notify>,
    max_batch: usize,
    dropped: Counter,
}

impl Tracer {
    /// The tracer, and the exporter task that must run for its spans to
    /// leave (see [`export::Exporter::run`]).
    pub fn new(
        settings: &TraceSettings,
        metrics: &Metrics,
        extra_ca_certs: &[rustls::pki_types::CertificateDer<'static>],
    ) -> std::io::Result<(Arc<Self>, export::Exporter)> {
        let (queue, queued) = mpsc::channel(settings.max_queue.max(1));
        let batch_full = Arc::new(Notify::new());
        let exporter = export::Exporter::new(
            settings,
            queued,
            Arc::clone(&batch_full),
            metrics,
            extra_ca_certs,
        )?;
        let tracer = Arc::new(Self {
            sampler: settings.sampler,
            queue,
            batch_full,
            max_batch: settings.max_batch.max(1),
            dropped: metrics.trace_spans("dropped"),
        });
        Ok((tracer, exporter))
    }

    /// The span of a request that arrived with `headers` at `started`.
    pub(crate) fn start(
        self: &Arc<Self>,
        headers: &HeaderMap,
        started: Instant,
    ) -> Box<ActiveSpan> {
        Box::new(ActiveSpan::start(self, headers, started))
    }

    /// Queues a finished span, or drops it when the queue is full.
    fn queue(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
            return;
        }
        let queued = self.queue.max_capacity() - self.queue.capacity();
        if queued >= self.max_batch {
            self.batch_full.notify_one();
        }
    }
}

//! The exporter task: takes finished spans off the queue and sends them to
//! the collector in batches, by OTLP over HTTP (protobuf) or gRPC.
//!
//! The queue is sent every `OTEL_BSP_SCHEDULE_DELAY`, in batches of at
//! most `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, and at once when a batch's worth
//! is waiting. The task is not woken per span: under load a wake-up per
//! request from every serving thread cost more than the span itself. A failed
//! export is tried once more after a second when the collector said so
//! (HTTP 429/502/503/504, gRPC UNAVAILABLE and the like) or could not be
//! reached; then its spans are counted as failed and let go, so a
//! collector that is down costs memory for one batch, not for its outage.
//! On shutdown, [`ExporterHandle::flush`] sends what is queued.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::traces::{OtlpProtocol, TraceSettings};
use crate::telemetry::logging;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::otlp::{self, Resource};
use crate::telemetry::trace::span::SpanData;

/// The gRPC method spans are exported with.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The most of a collector's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Sends queued spans to the collector; run it with [`Exporter::spawn`].
pub struct Exporter {
    queued: mpsc::Receiver<SpanData>,
    batch_full: Arc<Notify>,
    client: HttpsClient,
    url: Uri,
    protocol: OtlpProtocol,
    headers: Vec<(HeaderName, HeaderValue)>,
    resource: Resource,
    timeout: Duration,
    schedule_delay: Duration,
    max_batch: usize,
    exported: Counter,
    failed: Counter,
}

/// The running exporter, to flush and stop at shutdown.
#[derive(Debug)]
pub struct ExporterHandle {
    stop: oneshot::Sender<()>,
    done: JoinHandle<()>,
}

/// Why an export failed, and whether trying again may help.
struct Failed {
    reason: String,
    retry: bool,
}

impl Exporter {
    pub(super) fn new(
        settings: &TraceSettings,
        queued: mpsc::Receiver<SpanData>,
        batch_full: Arc<Notify>,
        metrics: &Metrics,
        extra_ca_certs: &[rustls::pki_types::CertificateDer<'static>],
    ) -> std::io::Result<Self> {
        let tls = crate::config::tls::client_config(extra_ca_certs)?;
        let mut tcp = HttpConnector::new();
        // The connector must accept https:// URIs; hyper-rustls does the TLS part.
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(settings.timeout));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(tcp);
        let grpc = settings.protocol == OtlpProtocol::Grpc;
        let client = Client::builder(TokioExecutor::new())
            // gRPC is HTTP/2 only; a plain http:// collector gets it with
            // prior knowledge, as gRPC clients do.
            .http2_only(grpc)
            .build(https);
        let url = if grpc {
            let origin = format!(
                "{}://{}{GRPC_EXPORT}",
                settings.endpoint.scheme_str().unwrap_or("http"),
                settings.endpoint.authority().map_or("", |a| a.as_str())
            );
            origin.parse().map_err(std::io::Error::other)?
        } else {
            settings.endpoint.clone()
        };
        Ok(Self {
            queued,
            batch_full,
            client,
            url,
            protocol: settings.protocol,
            headers: settings.headers.clone(),
            resource: Resource {
                attributes: settings.resource.clone(),
            },
            timeout: settings.timeout,
            schedule_delay: settings.schedule_delay,
            max_batch: settings.max_batch.max(1),
            exported: metrics.trace_spans("exported"),
            failed: metrics.trace_spans("failed"),
        })
    }

    /// Runs the exporter on the current runtime.
    pub fn spawn(self) -> ExporterHandle {
        let (stop, stopped) = oneshot::channel();
        let done = tokio::spawn(self.run(stopped));
        ExporterHandle { stop, done }
    }

    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                () = self.batch_full.notified() => {}
                () = tokio::time::sleep(self.schedule_delay) => {}
            }
            if !self.send_queued(&mut batch, true).await {
                // Every sender is gone: nothing more can come.
                return;
            }
        }
        // Shutdown: what is queued goes out, without retries.
        self.send_queued(&mut batch, false).await;
    }

    /// Sends everything queued now, a batch at a time; false once the
    /// queue is closed.
    async fn send_queued(&mut self, batch: &mut Vec<SpanData>, retry: bool) -> bool {
        let open = loop {
            match self.queued.try_recv() {
                Ok(span) => {
                    batch.push(span);
                    if batch.len() == self.max_batch {
                        self.export(batch, retry).await;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break true,
                Err(mpsc::error::TryRecvError::Disconnected) => break false,
            }
        };
        self.export(batch, retry).await;
        open
    }

    /// Sends `batch` and empties it.
    async fn export(&self, batch: &mut Vec<SpanData>, retry: bool) {
        if batch.is_empty() {
            return;
        }
        let message = Bytes::from(otlp::export_request(&self.resource, batch));
        let count = batch.len() as u64;
        batch.clear();
        let mut result = self.send(message.clone()).await;
        if let Err(Failed { retry: true, .. }) = &result {
            if retry {
                tokio::time::sleep(Duration::from_secs(1)).await;
                result = self.send(message).await;
            }
        }
        match result {
            Ok(()) => {
                self.exported.inc_by(count);
            }
            Err(failed) => {
                self.failed.inc_by(count);
                tracing::warn!(
                    collector = %self.url,
                    spans = count,
                    reason = %failed.reason,
                    "trace export failed; the spans are dropped"
                );
            }
        }
    }

    async fn send(&self, message: Bytes) -> Result<(), Failed> {
        let request = self.request(message).map_err(|err| Failed {
            reason: format!("cannot build the request: {err}"),
            retry: false,
        })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|err| Failed {
                reason: format!("cannot reach the collector: {}", logging::causes(&err)),
                retry: true,
            })?;
            match self.protocol {
                OtlpProtocol::HttpProtobuf => http_outcome(response.status()),
                OtlpProtocol::Grpc => grpc_outcome(response).await,
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Failed {
                    reason: format!("no answer within {:?}", self.timeout),
                    retry: true,
                })
            })
    }

    fn request(&self, message: Bytes) -> http::Result<Request<Full<Bytes>>> {
        let mut request = Request::post(self.url.clone());
        let body = match self.protocol {
            OtlpProtocol::HttpProtobuf => {
                request = request.header(CONTENT_TYPE, "application/x-protobuf");
                message
            }
            OtlpProtocol::Grpc => {
                request = request
                    .header(CONTENT_TYPE, "application/grpc")
                    .header(TE, "trailers");
                // The gRPC frame: not compressed, then the length.
                let mut framed = BytesMut::with_capacity(5 + message.len());
                framed.put_u8(0);
                framed.put_u32(message.len() as u32);
                framed.extend_from_slice(&message);
                framed.freeze()
            }
        };
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        request.body(Full::new(body))
    }
}

/// OTLP/HTTP: 2xx is success; 429, 502, 503 and 504 may be tried again.
fn http_outcome(status: StatusCode) -> Result<(), Failed> {
    if status.is_success() {
        return Ok(());
    }
    Err(Failed {
        reason: format!("the collector answered {status}"),
        retry: matches!(status.as_u16(), 429 | 502 | 503 | 504),
    })
}

/// gRPC: the `grpc-status` of the trailers (or of the headers, for an
/// answer without a body).
async fn grpc_outcome(response: http::Response<hyper::body::Incoming>) -> Result<(), Failed> {
    if response.status() != StatusCode::OK {
        return Err(http_outcome(response.status()).err().unwrap_or(Failed {
            reason: format!("the collector answered {}", response.status()),
            retry: false,
        }));
    }
    let in_headers = grpc_status(response.headers());
    let trailers = match in_headers {
        Some(_) => None,
        None => Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|err| Failed {
                reason: format!("reading the collector's answer failed: {err}"),
                retry: true,
            })?
            .trailers()
            .cloned(),
    };
    let status = in_headers.or_else(|| trailers.as_ref().and_then(grpc_status));
    match status {
        Some(0) => Ok(()),
        Some(code) => Err(Failed {
            reason: format!("the collector answered grpc-status {code}"),
            // The codes OTLP says are worth retrying.
            retry: matches!(code, 1 | 4 | 8 | 10 | 11 | 14 | 15),
        }),
        None => Err(Failed {
            reason: "the collector's answer has no grpc-status".to_owned(),
            retry: false,
        }),
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse().ok())
}

impl ExporterHandle {
    /// Sends what is queued and stops, waiting at most `within`.
    pub async fn flush(self, within: Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(within, self.done).await.is_err() {
            tracing::warn!(
                within = ?within,
                "trace export did not finish at shutdown; the spans still queued are dropped"
            );
        }
    }
}

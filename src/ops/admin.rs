//! The admin listener: health, readiness and metrics for operators, on a
//! separate (loopback by default) address. Never forwarded, never needs the key.
//!
//! - `GET /healthz`: 200 while the process serves (liveness);
//! - `GET /readyz`: 200 while accepting, 503 once draining (readiness);
//! - `GET /metrics`: Prometheus text format;
//! - `GET /usage`: the token budgets and what is spent in their current
//!   windows, as JSON;
//! - `POST /quitquitquit`: starts a graceful shutdown, so a Kubernetes Job can
//!   end its keyrelay sidecar when the main container is done (loopback
//!   callers only).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::ops::lifecycle::Lifecycle;
use crate::ops::metrics::Metrics;
use crate::usage::Budgets;

/// The encoder writes OpenMetrics text (`# EOF`, `# UNIT`), so say so:
/// Prometheus then keeps counter types instead of guessing.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    budgets: Arc<Budgets>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(crate::ops::server::ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let local_caller = peer.ip().is_loopback();
        let metrics = Arc::clone(&metrics);
        let lifecycle = Arc::clone(&lifecycle);
        let budgets = Arc::clone(&budgets);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let metrics = Arc::clone(&metrics);
                let lifecycle = Arc::clone(&lifecycle);
                let budgets = Arc::clone(&budgets);
                async move {
                    let state = Admin {
                        metrics: &metrics,
                        lifecycle: &lifecycle,
                        budgets: &budgets,
                    };
                    Ok::<_, Infallible>(state.answer(&request, local_caller).await)
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        });
    }
}

/// What the admin endpoints report on.
struct Admin<'a> {
    metrics: &'a Metrics,
    lifecycle: &'a Lifecycle,
    budgets: &'a Budgets,
}

impl Admin<'_> {
    async fn answer(
        &self,
        request: &Request<Incoming>,
        local_caller: bool,
    ) -> Response<Full<Bytes>> {
        let Self {
            metrics,
            lifecycle,
            budgets,
        } = self;
        match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, r#"{"status":"ok"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") if lifecycle.is_draining() => {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                json(StatusCode::OK, r#"{"status":"ready"}"#)
            }
            (&Method::GET, "/metrics") => {
                let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
                response
            }
            (&Method::GET, "/usage") => {
                let report = budgets
                    .report(std::time::SystemTime::now())
                    .await
                    .to_string();
                let mut response = json(StatusCode::OK, "");
                *response.body_mut() = Full::new(Bytes::from(report));
                response
            }
            // Unauthenticated, so only a process in the same pod or machine may
            // stop keyrelay, even when the admin port is open for scraping.
            (&Method::POST, "/quitquitquit") if !local_caller => json(
                StatusCode::FORBIDDEN,
                r#"{"error":"/quitquitquit is only accepted from loopback"}"#,
            ),
            (&Method::POST, "/quitquitquit") => {
                tracing::info!("quit requested on the admin listener");
                lifecycle.request_quit();
                json(StatusCode::OK, r#"{"status":"shutting down"}"#)
            }
            _ => json(
                StatusCode::NOT_FOUND,
                r#"{"error":"admin endpoints: GET /healthz, GET /readyz, GET /metrics, GET /usage, POST /quitquitquit"}"#,
            ),
        }
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

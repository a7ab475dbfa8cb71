//! The admin listener: health, readiness and metrics for operators, on a
//! separate (loopback by default) address. Never forwarded, never needs the key.
//!
//! - `GET /healthz`: 200 while the process serves (liveness);
//! - `GET /readyz`: 200 while accepting, 503 once draining or while a
//!   route's credential has expired (readiness);
//! - `GET /metrics`: Prometheus text format;
//! - `GET /usage`: the token budgets and what is spent in their current
//!   windows, as JSON;
//! - `POST /quitquitquit`: starts a graceful shutdown, so a Kubernetes Job can
//!   end its keyrelay sidecar when the main container is done (loopback
//!   callers only).
//!
//! It is not a browser target. Every request must name an accepted `Host`:
//! the main port's names (loopback, `allowed_hosts`) or the IP address the
//! connection arrived on (what kubelet probes and Prometheus send), so a
//! DNS-rebinding page is refused. A request with an `Origin`, or with
//! `Sec-Fetch-Site` other than `none` or `same-origin`, comes from a web
//! page and is refused too. `POST /quitquitquit` also refuses the body types
//! a page can send cross-site without a preflight (`text/plain`, forms),
//! for browsers that would send neither header: send it with no body
//! (`curl -X POST`) or a JSON one.

use std::convert::Infallible;
use std::sync::Arc;

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, ORIGIN};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::guard::host::HostPolicy;
use crate::ops::lifecycle::Lifecycle;
use crate::secrets::credential::RouteCredentials;
use crate::telemetry::metrics::Metrics;
use crate::usage::Budgets;

/// The encoder writes OpenMetrics text (`# EOF`, `# UNIT`), so say so:
/// Prometheus then keeps counter types instead of guessing.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the admin endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    hosts: HostPolicy,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    budgets: Arc<Budgets>,
    credentials: RouteCredentials,
) {
    let hosts = Arc::new(hosts);
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
        let caller = Caller {
            loopback: peer.ip().is_loopback(),
            // The address the caller dialled; unknown only if the socket is
            // already gone, and then no Host but a name can pass.
            local: stream.local_addr().ok().map(|addr| addr.ip()),
        };
        let hosts = Arc::clone(&hosts);
        let metrics = Arc::clone(&metrics);
        let lifecycle = Arc::clone(&lifecycle);
        let budgets = Arc::clone(&budgets);
        let credentials = credentials.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let hosts = Arc::clone(&hosts);
                let metrics = Arc::clone(&metrics);
                let lifecycle = Arc::clone(&lifecycle);
                let budgets = Arc::clone(&budgets);
                let credentials = credentials.clone();
                async move {
                    let state = Admin {
                        hosts: &hosts,
                        metrics: &metrics,
                        lifecycle: &lifecycle,
                        budgets: &budgets,
                        credentials: &credentials,
                    };
                    Ok::<_, Infallible>(state.answer(&request, caller).await)
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

/// Who is on the other end of an admin connection.
#[derive(Clone, Copy)]
struct Caller {
    /// The peer is on loopback (may stop keyrelay).
    loopback: bool,
    /// The local address the connection arrived on.
    local: Option<IpAddr>,
}

/// What the admin endpoints report on.
struct Admin<'a> {
    hosts: &'a HostPolicy,
    metrics: &'a Metrics,
    lifecycle: &'a Lifecycle,
    budgets: &'a Budgets,
    credentials: &'a RouteCredentials,
}

impl Admin<'_> {
    async fn answer(&self, request: &Request<Incoming>, caller: Caller) -> Response<Full<Bytes>> {
        let Self {
            hosts,
            metrics,
            lifecycle,
            budgets,
            credentials,
        } = self;
        if !hosts.allows_at(request.uri(), request.headers(), caller.local) {
            return json(
                StatusCode::FORBIDDEN,
                r#"{"error":"the Host header is not a loopback name, one in allowed_hosts or this listener's IP address (keyrelay refuses other names to defeat DNS rebinding)","type":"host_not_allowed","source":"keyrelay"}"#,
            );
        }
        if from_a_web_page(request.headers()) {
            return json(
                StatusCode::FORBIDDEN,
                r#"{"error":"the admin port does not answer web pages (a request with Origin, or Sec-Fetch-Site other than none or same-origin)","type":"cross_site_request","source":"keyrelay"}"#,
            );
        }
        match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, r#"{"status":"ok"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") if lifecycle.is_draining() => {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                let unavailable = credentials.unavailable();
                if unavailable.is_empty() {
                    json(StatusCode::OK, r#"{"status":"ready"}"#)
                } else {
                    let body = serde_json::json!({
                        "status": "credential_unavailable",
                        "routes": unavailable,
                    });
                    let mut response = json(StatusCode::SERVICE_UNAVAILABLE, "");
                    *response.body_mut() = Full::new(Bytes::from(body.to_string()));
                    response
                }
            }
            (&Method::GET, "/metrics") => {
                for (route, seconds) in credentials.expiries() {
                    metrics.set_credential_expiry(route, seconds);
                }
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
            (&Method::POST, "/quitquitquit") if !caller.loopback => json(
                StatusCode::FORBIDDEN,
                r#"{"error":"/quitquitquit is only accepted from loopback"}"#,
            ),
            (&Method::POST, "/quitquitquit") if has_simple_body_type(request.headers()) => json(
                StatusCode::FORBIDDEN,
                r#"{"error":"/quitquitquit refuses the body types a web page can send cross-site (text/plain, forms): send it with no body, as curl -X POST does","type":"cross_site_request","source":"keyrelay"}"#,
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

/// `Sec-Fetch-Site`, which browsers send on every request they make.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// True when a browser made the request for a web page: it carries an
/// `Origin` (any, even `null`), or a `Sec-Fetch-Site` other than `none`
/// (typed in the address bar) and `same-origin` (the admin port serves no
/// pages, so no page is of its origin; a rebinding page is, and meets the
/// Host check). `same-site` is refused: another port on localhost is the
/// same site.
fn from_a_web_page(headers: &HeaderMap) -> bool {
    headers.contains_key(ORIGIN)
        || headers.get_all(SEC_FETCH_SITE).iter().any(|site| {
            !(site.as_bytes().eq_ignore_ascii_case(b"none")
                || site.as_bytes().eq_ignore_ascii_case(b"same-origin"))
        })
}

/// True when a `Content-Type` is one a page may send cross-site with no
/// preflight (fetch's CORS-safelisted types), or is not one keyrelay can
/// read (refused rather than guessed at).
fn has_simple_body_type(headers: &HeaderMap) -> bool {
    headers.get_all(CONTENT_TYPE).iter().any(|value| {
        let Ok(text) = value.to_str() else {
            return true;
        };
        let essence = text.split(';').next().unwrap_or_default().trim();
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ]
        .iter()
        .any(|simple| essence.eq_ignore_ascii_case(simple))
    })
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

//! The upstream client: hyper-util's pooled client over rustls.
//!
//! HTTPS trusts the Mozilla web roots compiled into the binary (so a scratch
//! container needs no CA bundle) plus any `ca_file` certificates. Plain
//! `http://` upstreams work too, for local model servers and tests.
//!
//! Connections are pooled and reused; the pool's idle timeout is kept shorter
//! than common server keep-alives so keyrelay rarely picks a connection the
//! server is closing. When it does, hyper-util retries the request on a new
//! connection only if the old one failed before the request was written
//! (`retry_canceled_requests`): a request that may have reached the upstream is
//! never sent twice.

use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::{ClientConfig, RootCertStore};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use tower::Service;

use crate::config::Config;
use crate::proxy::request_body::RequestBody;

/// The client type the proxy forwards with: request bodies pass through frame by frame.
///
/// The whole connect (DNS, TCP, TLS handshake) runs under one `connect_timeout`:
/// hyper-util's own connect timeout covers only each TCP attempt, so a server
/// that accepts TCP but never finishes TLS would otherwise hang a request.
pub type UpstreamClient = Client<ConnectTimeout<HttpsConnector<HttpConnector>>, RequestBody>;

/// Builds an upstream client from the validated config; `http2` selects
/// HTTP/2 (with keepalive PINGs) instead of HTTP/1.1.
pub fn build_client(config: &Config, http2: bool) -> std::io::Result<UpstreamClient> {
    let tls = tls_config(config)?;

    let mut tcp = HttpConnector::new();
    // The connector must accept https:// URIs; hyper-rustls does the TLS part.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(config.timeouts.connect));

    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = if http2 {
        connector.enable_http2().wrap_connector(tcp)
    } else {
        connector.enable_http1().wrap_connector(tcp)
    };
    let connector = ConnectTimeout {
        inner: connector,
        limit: config.timeouts.connect,
    };

    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool.idle_timeout)
        .pool_max_idle_per_host(config.pool.max_idle_per_host)
        .retry_canceled_requests(true);
    if http2 {
        builder
            .http2_only(true)
            .http2_keep_alive_interval(config.http2_keepalive_interval)
            .http2_keep_alive_while_idle(true)
            .http2_adaptive_window(true);
    }
    Ok(builder.build(connector))
}

fn tls_config(config: &Config) -> std::io::Result<ClientConfig> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Each certificate was already parsed once during config validation.
    let (_added, _ignored) = roots.add_parsable_certificates(config.extra_ca_certs.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

/// A connector that fails with a timed-out error when connecting (DNS, TCP
/// and TLS together) takes longer than `limit`.
#[derive(Clone)]
pub struct ConnectTimeout<C> {
    inner: C,
    limit: Duration,
}

impl<C> Service<Uri> for ConnectTimeout<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = C::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to the upstream (DNS, TCP and TLS) timed out",
                )
                .into()),
            }
        })
    }
}

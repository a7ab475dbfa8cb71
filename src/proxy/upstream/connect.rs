//! Reaching the upstream: DNS, TCP and TLS under one connect timeout.
//!
//! A failure to connect leaves here as a [`SendError`] whose cause is typed
//! (DNS, refused, TLS, the timeout, anything else): the resolver's errors
//! are keyrelay's own [`DnsError`], so a DNS failure is known by its type.
//!
//! HTTPS trusts the Mozilla web roots compiled into the binary (so a scratch
//! container needs no CA bundle) plus any `ca_file` certificates. Plain
//! `http://` upstreams work too, for local model servers and tests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiFuture, GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;
use tower::Service;

use super::error::{DnsError, SendError};
use crate::config::Config;

/// The connector every upstream connection is made with.
pub(super) type Connector = ConnectTimeout<HttpsConnector<HttpConnector<Resolver>>>;

/// The HTTP version a connector offers in TLS's ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// `http/1.1` only.
    Http1,
    /// `h2` only: a server that does not accept it fails the connection.
    Http2,
    /// `h2`, then `http/1.1`: the server picks.
    Both,
}

/// A connector for `alpn`. The whole connect (DNS, TCP, TLS handshake) runs
/// under one `connect_timeout`: hyper-util's own connect timeout covers only
/// each TCP attempt, so a server that accepts TCP but never finishes TLS
/// would otherwise hang a request.
pub(crate) fn connector(config: &Config, alpn: Alpn) -> std::io::Result<Connector> {
    let tls = tls_config(config)?;

    let mut tcp = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
    // The connector must accept https:// URIs; hyper-rustls does the TLS part.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(config.timeouts.connect));

    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let inner = match alpn {
        Alpn::Http1 => builder.enable_http1().wrap_connector(tcp),
        Alpn::Http2 => builder.enable_http2().wrap_connector(tcp),
        Alpn::Both => builder.enable_all_versions().wrap_connector(tcp),
    };
    Ok(ConnectTimeout {
        inner,
        limit: config.timeouts.connect,
    })
}

fn tls_config(config: &Config) -> std::io::Result<ClientConfig> {
    crate::config::tls::client_config(&config.extra_ca_certs)
}

/// The system resolver (hyper-util's, `getaddrinfo` on a blocking thread),
/// its failures typed as [`DnsError`]. IP literals never reach it.
#[derive(Clone)]
pub(crate) struct Resolver(GaiResolver);

impl Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = DnsError;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DnsError>> {
        self.0.poll_ready(cx).map_err(DnsError)
    }

    fn call(&mut self, name: Name) -> Resolving {
        Resolving(self.0.call(name))
    }
}

/// A lookup under way.
pub(crate) struct Resolving(GaiFuture);

impl Future for Resolving {
    type Output = Result<GaiAddrs, DnsError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map_err(DnsError)
    }
}

/// A connector that fails with [`SendError`]s, typed by cause, and with a
/// connect timeout when connecting (DNS, TCP and TLS together) takes longer
/// than `limit`.
#[derive(Clone)]
pub(crate) struct ConnectTimeout<C> {
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
    type Error = SendError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, SendError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        self.inner.poll_ready(cx).map_err(SendError::connecting)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(result) => result.map_err(SendError::connecting),
                Err(_) => Err(SendError::connect_timeout()),
            }
        })
    }
}

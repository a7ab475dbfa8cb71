//! The upstream side of the data path: connections to the model endpoint.
//!
//! - HTTP/1.1 routes use hyper-util's pooled client ([`Http1Client`]).
//!   Connections are reused; the pool's idle timeout is kept shorter than
//!   common server keep-alives so keyrelay rarely picks a connection the
//!   server is closing. When it does, hyper-util retries the request on a new
//!   connection only if the old one failed before the request was written
//!   (`retry_canceled_requests`): a request that may have reached the
//!   upstream is never sent twice.
//! - HTTP/2 routes use keyrelay's own [`Http2Pool`]: several multiplexed
//!   connections per upstream, a new one opened when the others are at the
//!   server's `SETTINGS_MAX_CONCURRENT_STREAMS`, GOAWAY and dead connections
//!   handled without failing what the client sees.
//! - `upstream_http = "auto"` routes ([`RouteClient::Auto`]) offer both in
//!   TLS's ALPN and follow the server's choice: an HTTP/2 pool if it picks
//!   `h2`, the HTTP/1.1 client otherwise (and always for WebSocket
//!   upgrades, which exist only in HTTP/1.1 here).

mod connect;
mod http2_pool;
mod warm;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Config;
use crate::proxy::request_body::RequestBody;

pub use connect::{connector, Alpn};
pub use http2_pool::{Http2Pool, Negotiated, SendError, StreamSlot};
pub use warm::WarmConnector;

/// The HTTP/1.1 client: request bodies pass through frame by frame.
pub type Http1Client = Client<WarmConnector, RequestBody>;

/// Builds the HTTP/1.1 upstream client from the validated config, and the
/// connector that keeps its warm connections.
pub fn http1_client(config: &Config) -> std::io::Result<(Http1Client, WarmConnector)> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool.idle_timeout)
        .pool_max_idle_per_host(config.pool.max_idle_per_host)
        .retry_canceled_requests(true);
    let warm = WarmConnector::new(connector(config, Alpn::Http1)?);
    Ok((builder.build(warm.clone()), warm))
}

/// How one route reaches its upstream.
#[derive(Clone)]
pub enum RouteClient {
    /// HTTP/1.1, through the shared [`Http1Client`].
    Http1,
    /// HTTP/2, through this pool.
    Http2(Http2Pool),
    /// HTTP/2 through this pool if the server accepts it, else HTTP/1.1.
    Auto(Http2Pool),
}

/// The way one request goes upstream.
pub enum Via<'a> {
    /// Over the shared HTTP/1.1 client.
    Http1,
    /// On a stream of this pool.
    Http2(&'a Http2Pool),
}

impl RouteClient {
    /// True when a WebSocket upgrade can be forwarded (over HTTP/1.1).
    pub fn can_upgrade(&self) -> bool {
        !matches!(self, Self::Http2(_))
    }

    /// How a request goes upstream; `upgrade` requests need HTTP/1.1. For
    /// an `auto` route the first call finds out what the server speaks.
    pub async fn via(&self, upgrade: bool) -> Result<Via<'_>, SendError> {
        match self {
            Self::Http1 => Ok(Via::Http1),
            Self::Http2(pool) => Ok(Via::Http2(pool)),
            Self::Auto(_) if upgrade => Ok(Via::Http1),
            Self::Auto(pool) => Ok(match pool.negotiate().await? {
                Negotiated::Http2 => Via::Http2(pool),
                Negotiated::Http1 => Via::Http1,
            }),
        }
    }

    /// The pool to keep connections warm in, if the route has one.
    pub fn http2_pool(&self) -> Option<&Http2Pool> {
        match self {
            Self::Http1 => None,
            Self::Http2(pool) | Self::Auto(pool) => Some(pool),
        }
    }
}

impl Via<'_> {
    /// The HTTP version of the upstream request.
    pub fn version(&self) -> http::Version {
        match self {
            Self::Http1 => http::Version::HTTP_11,
            Self::Http2(_) => http::Version::HTTP_2,
        }
    }
}

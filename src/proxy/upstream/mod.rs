//! The upstream side of the data path: connections to the model endpoint.
//!
//! - HTTP/1.1 routes use keyrelay's own [`Http1Pool`] on hyper's
//!   `client::conn::http1`. Connections are reused; the pool's idle timeout
//!   is kept shorter than common server keep-alives so keyrelay rarely picks
//!   a connection the server is closing. When it does, the request is tried
//!   on another connection if hyper hands it back unwritten, or if it is a
//!   bodiless GET, HEAD, OPTIONS or DELETE that got no response byte before
//!   the reused connection closed (once, on a new connection); a request
//!   with a body that may have reached the upstream is never sent twice.
//! - HTTP/2 routes use keyrelay's own [`Http2Pool`]: several multiplexed
//!   connections per upstream, a new one opened when the others are at the
//!   server's `SETTINGS_MAX_CONCURRENT_STREAMS`, GOAWAY and dead connections
//!   handled without failing what the client sees.
//! - Each serving thread has its own [`Upstreams`]: the HTTP/1.1 client, the
//!   HTTP/2 pools and their connections belong to one thread, so a request
//!   never waits on another thread's connection task (thread per core, as
//!   nginx's workers keep their own upstream keepalive connections).
//! - `upstream_http = "auto"` routes ([`RouteClient::Auto`]) offer both in
//!   TLS's ALPN and follow the server's choice: an HTTP/2 pool if it picks
//!   `h2`, the HTTP/1.1 client otherwise (and always for WebSocket
//!   upgrades, which exist only in HTTP/1.1 here).
//! - Both pools and the connector fail with one [`SendError`], its
//!   [`Cause`] typed where the failure happened; `proxy/error.rs` turns it
//!   into the client's answer.

mod connect;
mod error;
mod http1_pool;
mod http2_pool;
mod warm;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::{Config, UpstreamHttp};
use crate::proxy::route_table::Route;

pub(crate) use connect::{connector, Alpn};
pub(crate) use error::{Cause, SendError};
pub(crate) use http1_pool::{Http1Lease, Http1Pool};
pub(crate) use http2_pool::{Http2Pool, Negotiated, StreamSlot};
pub(crate) use warm::WarmConnector;

/// A task that keeps warm connections open, for the serving thread to spawn.
pub(crate) type Keeper = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a response holds on its upstream connection until its body is done.
pub enum Lease {
    /// An HTTP/1.1 connection, back to the pool once the body was read whole.
    Http1(Http1Lease),
    /// A stream's place on an HTTP/2 connection.
    Http2(StreamSlot),
}

impl Lease {
    /// The response body was read to its end.
    pub fn body_finished(&mut self) {
        if let Self::Http1(lease) = self {
            lease.reusable();
        }
    }
}

/// One serving thread's way to every upstream: the HTTP/1.1 pool and each
/// route's [`RouteClient`], in route order.
pub(crate) struct Upstreams {
    /// The HTTP/1.1 pool; HTTP/2 routes carry their own pool.
    pub http1: Http1Pool,
    /// Its connector, which keeps the HTTP/1.1 routes' warm connections.
    http1_warm: WarmConnector,
    /// Each route's client and its upstream's origin, by route index.
    routes: Vec<(RouteClient, http::Uri)>,
    warm_connections: usize,
    /// The most age a warm HTTP/1.1 spare may have (`pool_idle_timeout`).
    pool_idle_timeout: Duration,
}

impl Upstreams {
    /// Clients for every route of a validated config; no connection opens
    /// until a request or a warm keeper needs one.
    pub(crate) fn new(config: &Config) -> std::io::Result<Self> {
        let http1_warm = WarmConnector::new(connector(config, Alpn::Http1)?);
        let http1 = Http1Pool::new(
            http1_warm.clone(),
            config.pool.idle_timeout,
            config.pool.max_idle_per_host,
        );
        let origins = config.routes.iter().map(|route| route.upstream.origin());
        Ok(Self {
            http1,
            http1_warm,
            routes: route_clients(config)?.into_iter().zip(origins).collect(),
            warm_connections: config.pool.warm_connections,
            pool_idle_timeout: config.pool.idle_timeout,
        })
    }

    /// How `route` reaches its upstream.
    pub(crate) fn of(&self, route: &Route) -> &RouteClient {
        &self.routes[route.index].0
    }

    /// The tasks that keep `warm_connections` open to each upstream (one
    /// per HTTP/1.1 origin and one per HTTP/2 pool).
    pub(crate) fn warm_keepers(&self) -> Vec<Keeper> {
        let mut keepers: Vec<Keeper> = Vec::new();
        if self.warm_connections == 0 {
            return keepers;
        }
        let count = self.warm_connections;
        let max_age = self.pool_idle_timeout;
        let mut http1_origins: Vec<&http::Uri> = Vec::new();
        let mut pools: Vec<&Http2Pool> = Vec::new();
        for (client, origin) in &self.routes {
            match client {
                RouteClient::Http1 => {
                    if !http1_origins.contains(&origin) {
                        http1_origins.push(origin);
                        keepers.push(Box::pin(self.http1_warm.keep_warm(
                            origin.clone(),
                            count,
                            max_age,
                        )));
                    }
                }
                RouteClient::Http2(pool) | RouteClient::Auto(pool)
                    if pools.iter().any(|seen| seen.is(pool)) => {}
                RouteClient::Http2(pool) => {
                    pools.push(pool);
                    keepers.push(Box::pin(pool.keep_warm()));
                }
                // Warm over HTTP/2 until the server turns out to choose
                // HTTP/1.1; then spares for the HTTP/1.1 client instead.
                RouteClient::Auto(pool) => {
                    pools.push(pool);
                    let pool_warm = pool.keep_warm();
                    let http1 = self.http1_warm.clone();
                    let origin = origin.clone();
                    keepers.push(Box::pin(async move {
                        pool_warm.await;
                        http1.keep_warm(origin, count, max_age).await;
                    }));
                }
            }
        }
        keepers
    }
}

/// How each route reaches its upstream, in route order. Routes to the same
/// origin with the same ALPN offer share one HTTP/2 pool.
fn route_clients(config: &Config) -> std::io::Result<Vec<RouteClient>> {
    let mut by_origin: Vec<(&crate::config::UpstreamUrl, Alpn, Http2Pool)> = Vec::new();
    let mut clients = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let upstream = &route.upstream;
        let alpn = match route.http {
            UpstreamHttp::Http1 => None,
            UpstreamHttp::Http2 => Some(Alpn::Http2),
            // Without TLS there is no ALPN to ask: HTTP/1.1, as for any
            // plain-text client that does not know the server speaks h2c.
            UpstreamHttp::Auto if upstream.scheme == http::uri::Scheme::HTTP => None,
            UpstreamHttp::Auto => Some(Alpn::Both),
        };
        let Some(alpn) = alpn else {
            clients.push(RouteClient::Http1);
            continue;
        };
        let shared = by_origin.iter().find(|(origin, offer, _)| {
            origin.scheme == upstream.scheme
                && origin.authority == upstream.authority
                && *offer == alpn
        });
        let pool = match shared {
            Some((_, _, pool)) => pool.clone(),
            None => {
                let pool = Http2Pool::new(config, upstream, alpn)?;
                by_origin.push((upstream, alpn, pool.clone()));
                pool
            }
        };
        clients.push(match alpn {
            Alpn::Both => RouteClient::Auto(pool),
            _ => RouteClient::Http2(pool),
        });
    }
    Ok(clients)
}

/// How one route reaches its upstream.
#[derive(Clone)]
pub(crate) enum RouteClient {
    /// HTTP/1.1, through the thread's [`Http1Pool`].
    Http1,
    /// HTTP/2, through this pool.
    Http2(Http2Pool),
    /// HTTP/2 through this pool if the server accepts it, else HTTP/1.1.
    Auto(Http2Pool),
}

/// The way one request goes upstream.
pub(crate) enum Via<'a> {
    /// Over the thread's HTTP/1.1 pool.
    Http1,
    /// On a stream of this pool.
    Http2(&'a Http2Pool),
}

impl RouteClient {
    /// True when a WebSocket upgrade can be forwarded (over HTTP/1.1).
    pub(crate) fn can_upgrade(&self) -> bool {
        !matches!(self, Self::Http2(_))
    }

    /// How a request goes upstream; `upgrade` requests need HTTP/1.1. For
    /// an `auto` route the first call finds out what the server speaks.
    pub(crate) async fn via(&self, upgrade: bool) -> Result<Via<'_>, SendError> {
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
}

impl Via<'_> {
    /// The HTTP version of the upstream request.
    pub(crate) fn version(&self) -> http::Version {
        match self {
            Self::Http1 => http::Version::HTTP_11,
            Self::Http2(_) => http::Version::HTTP_2,
        }
    }
}

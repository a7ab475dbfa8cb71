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

mod connect;
mod http2_pool;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Config;
use crate::proxy::request_body::RequestBody;

pub use connect::{connector, Alpn, Connector};
pub use http2_pool::{Http2Pool, SendError, StreamSlot};

/// The HTTP/1.1 client: request bodies pass through frame by frame.
pub type Http1Client = Client<Connector, RequestBody>;

/// Builds the HTTP/1.1 upstream client from the validated config.
pub fn http1_client(config: &Config) -> std::io::Result<Http1Client> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool.idle_timeout)
        .pool_max_idle_per_host(config.pool.max_idle_per_host)
        .retry_canceled_requests(true);
    Ok(builder.build(connector(config, Alpn::Http1)?))
}

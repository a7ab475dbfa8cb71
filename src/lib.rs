//! keyrelay: a local authenticating streaming proxy for hosted model endpoints.
//!
//! Apps call keyrelay on localhost with no credentials; keyrelay adds the API
//! key and forwards to the model endpoint, relaying the response as it is
//! produced. The map of the crate:
//!
//! - [`config`]: settings, layered defaults < file < env < flags, validated at once;
//! - [`secret`]: the API key type that cannot be logged by accident;
//! - [`server`]: accept loop and graceful shutdown;
//! - [`proxy`]: the forwarding service, the whole data path;
//! - [`headers`]: hop-by-hop removal and credential replacement;
//! - [`relay`]: the response body wrapper (frame by frame, idle timeout, abort on failure);
//! - [`upstream`]: the pooled HTTPS client;
//! - [`error`]: failures mapped to status codes and JSON bodies;
//! - [`access`]: one access-log event per request;
//! - [`demo`] and [`mock_model`]: the built-in demo with a local mock model endpoint.

pub mod access;
pub mod admin;
pub mod baseten;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod guard;
pub mod headers;
pub mod health;
pub mod key_file;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod mock_model;
pub mod proxy;
pub mod relay;
pub mod request_body;
pub mod routes;
pub mod secret;
pub mod server;
pub mod signals;
pub mod tunnel;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Runs the proxy on `listener` until `shutdown` resolves and open streams drain.
///
/// This is the seam tests use: they bind `127.0.0.1:0`, build a [`Config`] with
/// [`config::load`] and a swapped environment, and call this in a task.
///
/// Shutdown (from `shutdown` or `POST /quitquitquit`): readiness fails at
/// once, keyrelay keeps accepting for `shutdown_delay` (so Kubernetes can take
/// it out of endpoints), then stops accepting and lets streams finish for up
/// to `shutdown_grace`.
pub async fn run(
    config: Config,
    listener: impl Into<listener::Listener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = listener.into();
    let metrics = Arc::new(metrics::Metrics::new());
    let lifecycle = Arc::new(lifecycle::Lifecycle::default());
    let tunnels = Arc::new(tunnel::Tunnels::default());
    let proxy = proxy::Proxy::new(&config, &metrics, Arc::clone(&tunnels))?;

    // Background tasks: a JoinSet aborts them all when `run` returns.
    let mut background = tokio::task::JoinSet::new();
    for route in proxy.routes() {
        if let Some(path) = route.credential.key_file.clone() {
            background.spawn(key_file::watch(
                path,
                route.credential.template.clone(),
                Arc::clone(&route.live),
                Arc::clone(&metrics),
            ));
        }
    }
    let tokens = proxy.access_tokens();
    for (index, path) in tokens.files() {
        let tokens = Arc::clone(tokens);
        background.spawn(key_file::watch_secret(
            path.to_owned(),
            "access token",
            move |read| tokens.update(index, read),
        ));
    }
    let admin_addr = match config.admin_listen {
        Some(addr) => {
            let admin = TcpListener::bind(addr).await.map_err(|err| {
                std::io::Error::new(
                    err.kind(),
                    format!("admin_listen: cannot listen on {addr}: {err}"),
                )
            })?;
            let bound = admin.local_addr()?;
            background.spawn(admin::serve(
                admin,
                Arc::clone(&metrics),
                Arc::clone(&lifecycle),
            ));
            Some(bound)
        }
        None => None,
    };

    for route in proxy.routes() {
        tracing::info!(
            route = %route.name,
            upstream = %route.upstream,
            key_source = %key_source(&route.credential),
            header = %route.credential.header,
            "route"
        );
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            listen = %addr,
            admin = admin_addr.as_ref().map(tracing::field::display),
            routes = proxy.routes().count(),
            access_tokens = config.access.tokens.len(),
            "keyrelay ready"
        );
        let exposed = matches!(addr, config::ListenAddr::Tcp(tcp) if !tcp.ip().is_loopback());
        if exposed && config.access.tokens.is_empty() {
            tracing::warn!(
                listen = %addr,
                "listening on a non-loopback address: anyone who can reach it can spend the API key"
            );
        }
    }

    let draining = Arc::clone(&lifecycle);
    let shutdown_delay = config.shutdown_delay;
    let stop_accepting = async move {
        tokio::select! {
            () = shutdown => {}
            () = draining.quit_requested() => {}
        }
        draining.start_draining();
        if let Some(delay) = shutdown_delay {
            tracing::info!(delay = ?delay, "shutdown: readiness failing; still accepting during shutdown_delay");
            tokio::time::sleep(delay).await;
        }
    };
    server::serve(listener, proxy, tunnels, stop_accepting, &config).await
}

/// Where the key comes from, for the startup line (a name, never the key).
fn key_source(credential: &config::Credential) -> String {
    match &credential.key_file {
        Some(path) => format!("file {}", path.display()),
        None => format!("env {}", credential.key_env),
    }
}

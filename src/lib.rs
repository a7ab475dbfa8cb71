//! keyrelay: a local authenticating streaming proxy for hosted model endpoints.
//!
//! Apps call keyrelay on localhost with no credentials; keyrelay adds the API
//! key and forwards to the model endpoint, relaying the response as it is
//! produced. The folders are the architecture (`ARCHITECTURE.md` walks
//! through it):
//!
//! - [`config`]: what to do. The settings table, layering (defaults < file <
//!   env < flags), checks that report every problem at once, value parsers,
//!   the route table's settings, the command line and the Baseten shortcuts.
//! - [`secrets`]: the key as a type that cannot be logged, and the watcher that
//!   re-reads key and token files without a restart.
//! - [`guard`]: who may. Admission in order: host (DNS rebinding), origin and
//!   CORS, access tokens, path policy.
//! - [`usage`]: LLM token usage read off responses as they stream past,
//!   what a request asks for (request caps), and the budgets that charge it.
//! - [`telemetry`]: what keyrelay reports. Metrics, the per-request access
//!   record and its access-log line, logging and the log-writer thread, and
//!   the token figures they print. A leaf: it names only `config`.
//! - [`proxy`]: the data path. The `tower::Service` whose `forward` runs
//!   admit -> route -> build upstream request -> send -> relay, sharing the
//!   request's context and settling its budgets when it ends; the request
//!   and response bodies (frames in, frames out, nothing collected); header
//!   hygiene; WebSocket tunnels; the upstream client; the route table;
//!   request ids; errors grouped by where they came from.
//! - [`ops`]: what runs the data path. Listeners and the accept loop on the
//!   serving threads, graceful drain, signals, the admin listener (health,
//!   readiness, metrics), `keyrelay health`.
//! - [`demo`]: `keyrelay demo` and its local mock model endpoint.
//!
//! Imports point down that list's layers: `config` < `secrets`, `guard`,
//! `usage`, `telemetry` < `proxy` < `ops` (`tests/it/layering.rs` checks it).
//!
//! [`run`] ties them together; `src/main.rs` only parses the command line and
//! maps failures to exit codes.

// Module docs link the crate-private data path on purpose: `cargo doc`
// documents private items (.cargo/config.toml), so the links resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod config;
pub mod demo;
pub mod guard;
pub mod ops;
pub mod proxy;
pub mod secrets;
pub mod telemetry;
pub mod usage;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Runs the proxy on `listener` until `shutdown` resolves and open streams drain.
///
/// This is the seam tests use: they bind `127.0.0.1:0`, build a [`Config`] with
/// [`config::load()`] and a swapped environment, and call this in a task.
///
/// Connections are served on `config.workers` threads of their own
/// ([`ops::workers`]); the calling runtime keeps the control plane (admin
/// port, file watchers, shutdown).
///
/// Shutdown (from `shutdown` or `POST /quitquitquit`): readiness fails at
/// once, keyrelay keeps accepting for `shutdown_delay` (so Kubernetes can take
/// it out of endpoints), then stops accepting and lets streams finish for up
/// to `shutdown_grace`.
pub async fn run(
    config: Config,
    listener: impl Into<ops::listener::Listener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let metrics = Arc::new(telemetry::metrics::Metrics::new());
    run_with_metrics(config, listener, shutdown, metrics).await
}

/// [`run`], recording into `metrics`, which the caller keeps (the demo
/// reads back the tokens keyrelay counted).
pub async fn run_with_metrics(
    config: Config,
    listener: impl Into<ops::listener::Listener>,
    shutdown: impl Future<Output = ()>,
    metrics: Arc<telemetry::metrics::Metrics>,
) -> std::io::Result<()> {
    let listener = listener.into();
    let lifecycle = Arc::new(ops::lifecycle::Lifecycle::default());
    let tunnels = Arc::new(proxy::tunnel::Tunnels::default());
    let budgets = Arc::new(usage::Budgets::from_config(
        &config,
        metrics.usage_store_errors(),
    ));
    if let Some(path) = &config.usage_state_file {
        usage::state_file::load(path, &budgets);
    }
    // Request spans, when traces are exported: the exporter task runs on
    // this runtime and is flushed after the last stream has ended.
    let (tracer, exporter) = match &config.traces {
        Some(settings) => {
            let (tracer, exporter) =
                telemetry::trace::Tracer::new(settings, &metrics, &config.extra_ca_certs)?;
            tracing::info!(
                collector = %settings.endpoint,
                protocol = settings.protocol.as_str(),
                sampler = %settings.sampler.describe(),
                "traces: exporting request spans"
            );
            (Some(tracer), Some(exporter.spawn()))
        }
        None => (None, None),
    };
    let proxy = proxy::Proxy::new(
        &config,
        &metrics,
        Arc::clone(&tunnels),
        Arc::clone(&budgets),
        tracer,
    )?;

    // Background tasks: a JoinSet aborts them all when `run` returns.
    let mut background = tokio::task::JoinSet::new();
    for route in proxy.routes() {
        if let Some(path) = route.credential.key_file.clone() {
            background.spawn(secrets::secret_file::watch(
                path,
                route.credential.template.clone(),
                Arc::clone(&route.live),
                metrics.credential_reloads(),
            ));
        }
        let credential = &route.credential;
        if let (Some(source), Some(first)) = (&credential.source, credential.lifetime) {
            let succeeded = metrics.credential_refreshes(&route.name, "ok");
            // The run made while the configuration was checked.
            succeeded.inc();
            let refresher = secrets::refresh::Refresher {
                route: route.name.clone(),
                source: source.clone(),
                template: credential.template.clone(),
                live: Arc::clone(&route.live),
                succeeded,
                failed: metrics.credential_refreshes(&route.name, "error"),
            };
            background.spawn(secrets::refresh::keep_fresh(refresher, first));
        }
    }
    let credentials = secrets::credential::RouteCredentials::new(
        proxy
            .routes()
            .map(|route| (route.name.clone(), Arc::clone(&route.live)))
            .collect(),
    );
    background.spawn(telemetry::logging::report_dropped_lines());
    #[cfg(unix)]
    background.spawn(ops::signals::hangups_reload_only());
    if let Some(path) = config.usage_state_file.clone() {
        background.spawn(usage::state_file::keep_saved(path, Arc::clone(&budgets)));
    }
    let tokens = proxy.access_tokens();
    for (index, path) in tokens.files() {
        let tokens = Arc::clone(tokens);
        background.spawn(secrets::secret_file::watch_secret(
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
            background.spawn(ops::admin::serve(
                admin,
                config.access.hosts.clone(),
                Arc::clone(&metrics),
                Arc::clone(&lifecycle),
                Arc::clone(&budgets),
                credentials,
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
            // With auth_query the key goes in this query parameter, and
            // the header is only removed from clients' requests.
            query = route.credential.query.as_deref(),
            expires_in_secs = route.live.seconds_left().map(|left| left.max(0.0) as u64),
            "route"
        );
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            listen = %addr,
            admin = admin_addr.as_ref().map(tracing::field::display),
            routes = proxy.routes().count(),
            workers = config.workers,
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
    let served = ops::workers::serve(listener, proxy, tunnels, stop_accepting, &config).await;
    // Streams have finished (or were cut at the grace period) and charged
    // their budgets: keep what they spent.
    if let Some(path) = &config.usage_state_file {
        usage::state_file::save(path, &budgets);
    }
    // Their spans too: sent before exit, within the export timeout.
    if let (Some(exporter), Some(settings)) = (exporter, &config.traces) {
        exporter.flush(settings.timeout).await;
    }
    served
}

/// Where the key comes from, for the startup line (a name, never the key;
/// a command by its program, whose arguments may be private).
fn key_source(credential: &config::Credential) -> String {
    match (&credential.source, &credential.key_file) {
        (Some(source), _) => source.describe(),
        (None, Some(path)) => format!("file {}", path.display()),
        (None, None) => format!("env {}", credential.key_env),
    }
}

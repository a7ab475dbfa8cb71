//! Configuration: one flat table of settings, layered defaults < file < env < flags.
//!
//! - [`settings`]: the table of every setting, its default and help;
//! - [`load`](mod@load): layering the sources through the `config` crate;
//! - [`check`]: validation that reports every problem at once (exit 64);
//! - [`parse`]: the value parsers (durations, sizes, rates, URLs);
//! - [`routes`](RouteConfig): the `[[routes]]` table;
//! - [`cli`] and [`baseten`]: the command line and the Baseten shortcuts.
//!
//! This module holds the validated types the rest of keyrelay reads.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use self::parse::Switch;
use crate::guard::cors::CorsPolicy;
use crate::guard::host::HostPolicy;
use crate::guard::tokens::{AccessToken, Rate};
use crate::secrets::key_command::Lifetime;
use crate::secrets::refresh::Source;
use crate::usage::budget::Unavailable;
use crate::usage::redis_store::RedisAddress;
use crate::usage::BudgetLimit;

pub mod baseten;
pub mod check;
pub mod cli;
pub mod load;
pub mod parse;
pub mod providers;
mod request_headers;
mod routes;
pub mod settings;
pub(crate) mod tls;
pub mod traces;

pub use check::{ConfigError, Problem};
pub use load::{load, OverrideValue, Sources};
pub use routes::{RequestRules, RetryPolicy, RouteConfig};
pub use settings::{Kind, Setting, ENV_PREFIX, ROUTES_KEY, SETTINGS};

/// Validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: ListenAddr,
    /// Pending connections the kernel may queue on the listener.
    pub listen_backlog: u32,
    /// Serving threads (`workers`), at least one.
    pub workers: usize,
    /// Permissions of the socket file when listening on a Unix socket.
    pub unix_socket_mode: u32,
    /// Where requests go: at least one route, longest prefix first.
    pub routes: Vec<RouteConfig>,
    /// Who may use keyrelay, from where, and for what.
    pub access: AccessSettings,
    /// Extra roots trusted for the upstream's TLS certificate.
    pub extra_ca_certs: Vec<CertificateDer<'static>>,
    /// Connect, header and idle limits.
    pub timeouts: Timeouts,
    /// Upstream connection reuse.
    pub pool: PoolSettings,
    /// PING interval for HTTP/2 upstream connections.
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Time streams in flight get to finish on shutdown.
    pub shutdown_grace: Option<Duration>,
    /// Time keyrelay keeps accepting after a shutdown signal.
    pub shutdown_delay: Option<Duration>,
    /// Admin listener address, if enabled.
    pub admin_listen: Option<SocketAddr>,
    /// Resource limits.
    pub limits: Limits,
    /// Text or JSON logs.
    pub log_format: LogFormat,
    /// Read token usage off responses.
    pub usage_tap: bool,
    /// Name the route that answered in `x-keyrelay-upstream`.
    pub upstream_name_header: bool,
    /// Where the token budgets' spending is kept across restarts.
    pub usage_state_file: Option<PathBuf>,
    /// The Redis the budgets are counted in, shared by replicas; `None`
    /// counts them in this process.
    pub usage_store: Option<RedisAddress>,
    /// What to do when that Redis cannot be reached.
    pub usage_store_unavailable: Unavailable,
    /// Where request spans are exported, if anywhere.
    pub traces: Option<traces::TraceSettings>,
}

/// The HTTP version keyrelay speaks to an upstream (`upstream_http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamHttp {
    /// HTTP/1.1 (the default, as Baseten recommends for predict).
    Http1,
    /// HTTP/2: over TLS the server must accept `h2` in ALPN; a plain
    /// `http://` upstream gets HTTP/2 with prior knowledge (h2c).
    Http2,
    /// Whatever the server picks in TLS's ALPN (`h2` preferred); HTTP/1.1
    /// for plain `http://` upstreams and for WebSocket upgrades.
    Auto,
}

impl UpstreamHttp {
    /// Parses the setting's value: `1.1`, `2` or `auto`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "1.1" => Some(Self::Http1),
            "2" => Some(Self::Http2),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

impl fmt::Display for UpstreamHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http1 => "1.1",
            Self::Http2 => "2",
            Self::Auto => "auto",
        })
    }
}

/// The upstream base URL, split into the parts each request reuses.
///
/// Shown (`Display`, `Debug`) as `scheme://host:port` only: the base path
/// is the one part a pasted secret could still be in, so it is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port; also the `Host`/`:authority` sent upstream.
    pub authority: Authority,
    /// Path prefix with no trailing slash ("" for the root).
    pub base_path: String,
}

impl UpstreamUrl {
    /// `scheme://authority/`: what a connection is made to.
    pub fn origin(&self) -> http::Uri {
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .expect("a validated scheme and authority make a URI")
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamUrl")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field(
                "base_path",
                &format_args!("<{} bytes>", self.base_path.len()),
            )
            .finish()
    }
}

/// Admission policy settings (see [`crate::guard`]).
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// Accepted `Host` names.
    pub hosts: HostPolicy,
    /// Allowed browser origins.
    pub cors: CorsPolicy,
    /// Local access tokens; empty means none required.
    pub tokens: Vec<AccessToken>,
    /// Per-token request rate.
    pub token_rate: Option<Rate>,
    /// Token budgets every access token has.
    pub token_budgets: Vec<BudgetLimit>,
    /// Request caps for every request that presents an access token
    /// (`access_token_max_output_tokens`, `access_token_allowed_models`).
    pub token_caps: crate::usage::inspect::RequestCaps,
}

/// The credential keyrelay adds, and the client headers it removes first.
#[derive(Debug, Clone)]
pub struct Credential {
    /// Name of the environment variable the key came from (for messages).
    pub key_env: String,
    /// The file the key came from, watched for changes; overrides `key_env`.
    pub key_file: Option<PathBuf>,
    /// The helper or token endpoint the key came from, asked again before
    /// it expires; overrides `key_file` and `key_env`.
    pub source: Option<Source>,
    /// When the source's first value was fetched and when it expires.
    pub lifetime: Option<Lifetime>,
    /// The template the key is rendered with (kept to re-render a reloaded key).
    pub template: String,
    /// Header the credential goes into; with `query`, the header only
    /// removed from clients' requests.
    pub header: HeaderName,
    /// The query parameter the credential goes in instead of `header`
    /// (`auth_query`), a checked name.
    pub query: Option<String>,
    /// Rendered, sensitive header value as loaded (a reloaded key file
    /// changes the route's live copy, not this).
    pub value: HeaderValue,
    /// Client headers removed before forwarding; always includes `header`.
    pub strip: Vec<HeaderName>,
}

/// Limits on waiting for the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// DNS + TCP connect (the TLS handshake rides on the same connect future).
    pub connect: Duration,
    /// Time from sending the request to the response headers; `None` waits forever.
    pub response_headers: Option<Duration>,
    /// Silence allowed between response body frames; `None` waits forever.
    pub idle: Option<Duration>,
}

/// Upstream connection pool settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Idle connections older than this are closed rather than reused.
    pub idle_timeout: Duration,
    /// Cap on idle connections kept.
    pub max_idle_per_host: usize,
    /// Connections per upstream opened at startup and kept open.
    pub warm_connections: usize,
}

/// Why a `unix:` listen address is refused on Windows, which keyrelay serves
/// over TCP only.
pub const UNIX_LISTEN_UNSUPPORTED: &str = "Unix domain sockets are not supported on Windows; \
     listen on a loopback address such as 127.0.0.1:8080";

/// Where keyrelay listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket file.
    Unix(PathBuf),
}

/// Limits that keep clients from exhausting keyrelay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight at once; `None` is unlimited.
    pub max_concurrent_requests: Option<usize>,
    /// Largest request head, in bytes.
    pub max_request_header_size: usize,
    /// Largest request body, in bytes; `None` is unlimited.
    pub max_request_body: Option<u64>,
    /// Time allowed for an HTTP/1.1 request head.
    pub header_read_timeout: Option<Duration>,
    /// Longest a client connection may stay open with no request in flight.
    pub client_idle_timeout: Option<Duration>,
    /// Longest wait between two parts of a request body.
    pub request_body_timeout: Option<Duration>,
    /// Concurrent streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The settings as they arrive from the merged layers, before validation.
///
/// Every value is kept as text here (numbers too, and switches as
/// [`Switch`]), so that reading never fails on one: validation reports
/// every bad one at once with its setting's name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    upstream: Option<String>,
    model: Option<String>,
    chain: Option<String>,
    model_apis: Switch,
    environment: Option<String>,
    deployment: Option<String>,
    development: Switch,
    /// Named routes; only from the config file (`[[routes]]`).
    #[serde(default)]
    routes: Vec<routes::RawRoute>,
    provider: Option<String>,
    key_env: String,
    auth_header: String,
    auth_template: String,
    /// Off (empty) by default, which the loader does not set.
    #[serde(default)]
    auth_query: String,
    strip_request_headers: Vec<String>,
    key_file: Option<String>,
    key_command: Vec<String>,
    key_command_ttl: String,
    key_command_timeout: String,
    oauth_token_url: Option<String>,
    oauth_client_id: Option<String>,
    oauth_client_secret_env: Option<String>,
    oauth_client_secret_file: Option<String>,
    oauth_scope: Option<String>,
    oauth_audience: Option<String>,
    oauth_auth_method: Option<String>,
    google_credentials: Switch,
    google_credentials_file: Option<String>,
    google_scopes: Vec<String>,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    allow_credentials: Switch,
    access_token_env: Vec<String>,
    access_token_files: Vec<String>,
    token_rate_limit: String,
    allowed_paths: Vec<String>,
    allow_unauthenticated_network: Switch,
    allow_cleartext_upstream: Switch,
    ca_file: Option<String>,
    connect_timeout: String,
    response_header_timeout: String,
    idle_timeout: String,
    pool_idle_timeout: String,
    pool_max_idle_per_host: String,
    upstream_http: Option<String>,
    upstream_http2: Switch,
    grpc: Switch,
    regional: Switch,
    set_request_headers: Vec<String>,
    warm_connections: String,
    http2_keepalive_interval: String,
    http2_keepalive_timeout: String,
    shutdown_grace: String,
    admin_listen: String,
    listen_backlog: String,
    workers: String,
    unix_socket_mode: String,
    shutdown_delay: String,
    max_concurrent_requests: String,
    max_request_header_size: String,
    max_request_body: String,
    header_read_timeout: String,
    client_idle_timeout: String,
    request_body_timeout: String,
    http2_max_concurrent_streams: String,
    usage_tap: String,
    add_stream_usage: Switch,
    token_budget: Vec<String>,
    access_token_budget: Vec<String>,
    budget_reserve: String,
    unparsed_budget_requests: String,
    max_output_tokens: String,
    over_max_output_tokens: String,
    allowed_models: Vec<String>,
    access_token_max_output_tokens: String,
    access_token_allowed_models: Vec<String>,
    retry_on: Vec<String>,
    retry_attempts: String,
    retry_methods: Vec<String>,
    retry_budget: String,
    retry_max_wait: String,
    retry_buffer: String,
    eject_after: String,
    eject_for: String,
    upstream_name_header: Switch,
    usage_state_file: Option<String>,
    usage_store: String,
    usage_store_unavailable: String,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
    log_format: String,
}

//! Configuration: one flat table of settings, layered defaults < file < env < flags.
//!
//! Loading goes through the `config` crate so every layer is merged the same
//! way. The environment is passed in as a map rather than read from the
//! process, so tests (and the demo) can swap it without `set_var`.
//!
//! Validation never stops at the first mistake: every unknown key and every
//! bad value is collected and reported together, each naming its setting, so a
//! user fixes a config file in one pass. Secret values are never echoed.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Environment, File, FileFormat};
use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Uri};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::guard::cors::CorsPolicy;
use crate::guard::host::HostPolicy;
use crate::guard::tokens::{check_value, AccessToken, Rate};
use crate::secrets::secret_file;

pub mod baseten;
pub mod cli;
mod routes;
pub use routes::RouteConfig;

/// The config-file key of the route table (`[[routes]]`).
pub const ROUTES_KEY: &str = "routes";

/// Prefix of the environment variables that set keyrelay's own settings.
pub const ENV_PREFIX: &str = "KEYRELAY";

/// One setting: its key in the config file, how to set it elsewhere, its default.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Key in the TOML file; also the suffix of the `KEYRELAY_` variable.
    pub key: &'static str,
    /// Default value as a user would write it, or "" when there is none.
    pub default: &'static str,
    /// One line saying what the setting does.
    pub help: &'static str,
    /// How the value is written.
    pub kind: Kind,
}

/// The shape of a setting's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value.
    Text,
    /// A list: a TOML array, a comma-separated variable, or a repeatable flag.
    List,
    /// A boolean: `true`/`false`, or a flag without a value.
    Switch,
}

impl Setting {
    /// The environment variable that sets this setting, e.g. `KEYRELAY_LISTEN`.
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}_{}", self.key.to_ascii_uppercase())
    }

    /// The command-line flag that sets this setting, e.g. `--listen`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }
}

/// Every setting keyrelay knows. Anything else in a file or `KEYRELAY_*` is an error.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "listen",
        default: "127.0.0.1:8080",
        help: "Address the proxy listens on (HTTP/1.1 and h2c on the same port), or unix:/path for a Unix socket.",
        kind: Kind::Text,
    },
    Setting {
        key: "upstream",
        default: "",
        help: "Base URL of the model endpoint; request paths are appended to its path.",
        kind: Kind::Text,
    },
    Setting {
        key: "model",
        default: "",
        help: "Baseten shortcut: proxy the model with this id (https://model-ID.api.baseten.co); /predict and /v1/... map under its environment.",
        kind: Kind::Text,
    },
    Setting {
        key: "chain",
        default: "",
        help: "Baseten shortcut: proxy the chain with this id (https://chain-ID.api.baseten.co); /run_remote maps under its environment.",
        kind: Kind::Text,
    },
    Setting {
        key: "model_apis",
        default: "false",
        help: "Baseten shortcut: proxy the shared OpenAI-compatible Model APIs (https://inference.baseten.co).",
        kind: Kind::Switch,
    },
    Setting {
        key: "environment",
        default: "",
        help: "With model or chain: the environment to call (production when no stage is given).",
        kind: Kind::Text,
    },
    Setting {
        key: "deployment",
        default: "",
        help: "With model or chain: call this deployment id instead of an environment.",
        kind: Kind::Text,
    },
    Setting {
        key: "development",
        default: "false",
        help: "With model or chain: call the development deployment.",
        kind: Kind::Switch,
    },
    Setting {
        key: "key_env",
        default: "BASETEN_API_KEY",
        help: "Environment variable holding the upstream API key.",
        kind: Kind::Text,
    },
    Setting {
        key: "auth_header",
        default: "authorization",
        help: "Header the key is injected into.",
        kind: Kind::Text,
    },
    Setting {
        key: "auth_template",
        default: "Api-Key {key}",
        help: "Value of the injected header; {key} is replaced by the key.",
        kind: Kind::Text,
    },
    Setting {
        key: "strip_request_headers",
        default: "authorization,proxy-authorization,x-api-key",
        help: "Client credential headers removed before forwarding (comma list).",
        kind: Kind::List,
    },
    Setting {
        key: "key_file",
        default: "",
        help: "File holding the upstream API key (e.g. a mounted Secret); re-read on change and SIGHUP. Overrides key_env.",
        kind: Kind::Text,
    },
    Setting {
        key: "allowed_hosts",
        default: "",
        help: "Host names accepted besides localhost, 127.0.0.1 and [::1]; others get 403 (DNS-rebinding defence).",
        kind: Kind::List,
    },
    Setting {
        key: "allowed_origins",
        default: "",
        help: "Browser origins allowed to call keyrelay, exactly (e.g. http://localhost:3000); none by default.",
        kind: Kind::List,
    },
    Setting {
        key: "access_token_env",
        default: "",
        help: "Variables each holding a local access token clients must present (the variable names the token).",
        kind: Kind::List,
    },
    Setting {
        key: "access_token_files",
        default: "",
        help: "Files each holding a local access token clients must present (the file name names the token); re-read on change and SIGHUP.",
        kind: Kind::List,
    },
    Setting {
        key: "token_rate_limit",
        default: "off",
        help: "Requests allowed per access token, e.g. 60/m or 5/s (bursts up to the count); 429 beyond it.",
        kind: Kind::Text,
    },
    Setting {
        key: "allowed_paths",
        default: "",
        help: "If set, only these `METHOD /path` rules (a trailing * matches a prefix) are forwarded; others get 403.",
        kind: Kind::List,
    },
    Setting {
        key: "allow_unauthenticated_network",
        default: "false",
        help: "Allow a non-loopback listen address without access tokens: anyone who can reach it can spend the key.",
        kind: Kind::Switch,
    },
    Setting {
        key: "ca_file",
        default: "",
        help: "PEM bundle of extra CA certificates trusted for the upstream, beside the web roots.",
        kind: Kind::Text,
    },
    Setting {
        key: "connect_timeout",
        default: "10s",
        help: "Limit on DNS + TCP + TLS to the upstream (504 when exceeded).",
        kind: Kind::Text,
    },
    Setting {
        key: "response_header_timeout",
        default: "off",
        help: "Limit on waiting for the upstream's response headers (504); off by default for cold starts.",
        kind: Kind::Text,
    },
    Setting {
        key: "idle_timeout",
        default: "5m",
        help: "Longest silence between response body frames before the stream is aborted.",
        kind: Kind::Text,
    },
    Setting {
        key: "pool_idle_timeout",
        default: "20s",
        help: "How long an idle upstream connection is kept for reuse.",
        kind: Kind::Text,
    },
    Setting {
        key: "pool_max_idle_per_host",
        default: "1024",
        help: "Most idle upstream connections kept for reuse (high enough that bursts do not churn connections).",
        kind: Kind::Text,
    },
    Setting {
        key: "upstream_http2",
        default: "false",
        help: "Speak HTTP/2 to the upstream (with keepalive pings) instead of HTTP/1.1.",
        kind: Kind::Switch,
    },
    Setting {
        key: "http2_keepalive_interval",
        default: "20s",
        help: "Interval of HTTP/2 PING keepalives to the upstream when upstream_http2 is on.",
        kind: Kind::Text,
    },
    Setting {
        key: "shutdown_grace",
        default: "30s",
        help: "On SIGTERM/SIGINT, how long streams in flight may finish before they are cut (off: no limit).",
        kind: Kind::Text,
    },
    Setting {
        key: "unix_socket_mode",
        default: "0600",
        help: "Permissions (octal) of the socket file when listen is unix:/path.",
        kind: Kind::Text,
    },
    Setting {
        key: "admin_listen",
        default: "off",
        help: "Address of the admin listener (/healthz, /readyz, /metrics, POST /quitquitquit); off by default.",
        kind: Kind::Text,
    },
    Setting {
        key: "shutdown_delay",
        default: "off",
        help: "On SIGTERM/SIGINT, keep accepting this long (readiness already failing) before draining.",
        kind: Kind::Text,
    },
    Setting {
        key: "max_concurrent_requests",
        default: "off",
        help: "Most requests (streams included) in flight at once; beyond it 503 with Retry-After.",
        kind: Kind::Text,
    },
    Setting {
        key: "max_request_header_size",
        default: "64KiB",
        help: "Largest request head accepted (HTTP/1.1 431 beyond it; HTTP/2 header list limit).",
        kind: Kind::Text,
    },
    Setting {
        key: "max_request_body",
        default: "off",
        help: "Largest request body forwarded (e.g. 100MiB); 413 beyond it. Off by default.",
        kind: Kind::Text,
    },
    Setting {
        key: "header_read_timeout",
        default: "30s",
        help: "How long an HTTP/1.1 client may take to send its request head (slow-header defence).",
        kind: Kind::Text,
    },
    Setting {
        key: "http2_max_concurrent_streams",
        default: "256",
        help: "Most concurrent streams per HTTP/2 client connection.",
        kind: Kind::Text,
    },
    Setting {
        key: "log_format",
        default: "text",
        help: "Log output: text or json.",
        kind: Kind::Text,
    },
];

/// The settings as they arrive from the merged layers, before validation.
///
/// Values a user types (addresses, durations, URLs) are kept as strings here so
/// that validation can report every bad one at once with its setting's name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    upstream: Option<String>,
    model: Option<String>,
    chain: Option<String>,
    model_apis: bool,
    environment: Option<String>,
    deployment: Option<String>,
    development: bool,
    /// Named routes; only from the config file (`[[routes]]`).
    #[serde(default)]
    routes: Vec<routes::RawRoute>,
    key_env: String,
    auth_header: String,
    auth_template: String,
    strip_request_headers: Vec<String>,
    key_file: Option<String>,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    access_token_env: Vec<String>,
    access_token_files: Vec<String>,
    token_rate_limit: String,
    allowed_paths: Vec<String>,
    allow_unauthenticated_network: bool,
    ca_file: Option<String>,
    connect_timeout: String,
    response_header_timeout: String,
    idle_timeout: String,
    pool_idle_timeout: String,
    pool_max_idle_per_host: usize,
    upstream_http2: bool,
    http2_keepalive_interval: String,
    shutdown_grace: String,
    admin_listen: String,
    unix_socket_mode: String,
    shutdown_delay: String,
    max_concurrent_requests: String,
    max_request_header_size: String,
    max_request_body: String,
    header_read_timeout: String,
    http2_max_concurrent_streams: u32,
    log_format: String,
}

/// Validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: ListenAddr,
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
    /// HTTP/2 to the upstream instead of HTTP/1.1.
    pub upstream_http2: bool,
    /// PING interval for HTTP/2 upstream connections.
    pub http2_keepalive_interval: Duration,
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
}

/// The upstream base URL, split into the parts each request reuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port; also the `Host`/`:authority` sent upstream.
    pub authority: Authority,
    /// Path prefix with no trailing slash ("" for the root).
    pub base_path: String,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
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
}

/// The credential keyrelay adds, and the client headers it removes first.
#[derive(Debug, Clone)]
pub struct Credential {
    /// Name of the environment variable the key came from (for messages).
    pub key_env: String,
    /// The file the key came from, watched for changes; overrides `key_env`.
    pub key_file: Option<PathBuf>,
    /// The template the key is rendered with (kept to re-render a reloaded key).
    pub template: String,
    /// Header the credential goes into.
    pub header: HeaderName,
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
}

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

/// Where configuration comes from, besides the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Optional TOML file (`--config`).
    pub file: Option<PathBuf>,
    /// The environment: `KEYRELAY_*` settings and the key variable are read from here.
    pub env: HashMap<String, String>,
    /// Values from command-line flags, highest precedence, keyed by setting.
    pub overrides: Vec<(String, OverrideValue)>,
}

/// A command-line value for a setting.
#[derive(Debug, Clone)]
pub enum OverrideValue {
    /// A scalar, parsed like the file value would be.
    Text(String),
    /// A boolean switch.
    Bool(bool),
    /// A list (e.g. repeated flags).
    List(Vec<String>),
}

impl Sources {
    /// Sources with the process environment.
    pub fn from_process_env() -> Self {
        Self {
            env: std::env::vars().collect(),
            ..Self::default()
        }
    }

    /// Adds a flag value for `key`.
    pub fn set(&mut self, key: &str, value: OverrideValue) -> &mut Self {
        self.overrides.push((key.to_owned(), value));
        self
    }
}

/// One thing wrong with the configuration, naming the setting it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The setting (or source) at fault.
    pub setting: String,
    /// What is wrong and, where useful, how to fix it.
    pub message: String,
}

/// Everything wrong with the configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// At least one problem.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.problems {
            writeln!(f, "  - {}: {}", problem.setting, problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn single(setting: &str, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                setting: setting.to_owned(),
                message: message.into(),
            }],
        }
    }
}

/// Merges defaults, the file, `KEYRELAY_*` variables and flags, then validates.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let merged = merge(sources)?;
    let unknown = unknown_keys(&merged);
    if !unknown.is_empty() {
        return Err(ConfigError { problems: unknown });
    }
    let raw: RawConfig = merged
        .try_deserialize()
        .map_err(|err| ConfigError::single("config", err.to_string()))?;
    let mut found = Problems(Vec::new());
    match check(raw, &sources.env, &mut found) {
        Some(config) if found.0.is_empty() => Ok(config),
        _ => Err(ConfigError { problems: found.0 }),
    }
}

fn merge(sources: &Sources) -> Result<config::Config, ConfigError> {
    let mut builder = config::Config::builder();
    for setting in SETTINGS {
        let result = match setting.kind {
            Kind::List => builder.set_default(setting.key, split_list(setting.default)),
            _ if setting.default.is_empty() => continue,
            _ => builder.set_default(setting.key, setting.default),
        };
        builder = result.map_err(|err| ConfigError::single(setting.key, err.to_string()))?;
    }
    if let Some(path) = &sources.file {
        if !path.is_file() {
            return Err(ConfigError::single(
                "config",
                format!("file {} does not exist or is not a file", path.display()),
            ));
        }
        builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
    }
    // The config crate splits list variables only when it also guesses the
    // types of every other variable, so list settings are split here and
    // layered as the environment's values (below the flags, set after them).
    let mut env = sources.env.clone();
    // Kubernetes injects KEYRELAY_SERVICE_HOST, KEYRELAY_PORT, ... for a
    // Service named keyrelay; those are not settings, so they are not errors.
    env.retain(|name, _| !is_service_link(name));
    let mut env_lists = Vec::new();
    for setting in SETTINGS.iter().filter(|s| s.kind == Kind::List) {
        if let Some(value) = env.remove(&setting.env_var()) {
            env_lists.push((setting.key, split_list(&value)));
        }
    }
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .try_parsing(false)
            .source(Some(env.into_iter().collect())),
    );
    for (key, items) in env_lists {
        builder = builder
            .set_override(key, items)
            .map_err(|err| ConfigError::single(key, err.to_string()))?;
    }
    for (key, value) in &sources.overrides {
        let result = match value {
            OverrideValue::Text(text) => builder.set_override(key.as_str(), text.as_str()),
            OverrideValue::Bool(flag) => builder.set_override(key.as_str(), *flag),
            OverrideValue::List(items) => builder.set_override(key.as_str(), items.clone()),
        };
        builder = result.map_err(|err| ConfigError::single(key, err.to_string()))?;
    }
    builder
        .build()
        .map_err(|err| ConfigError::single("config", err.to_string()))
}

fn unknown_keys(merged: &config::Config) -> Vec<Problem> {
    let Ok(table) = merged
        .clone()
        .try_deserialize::<HashMap<String, config::Value>>()
    else {
        return Vec::new();
    };
    let mut unknown: Vec<Problem> = table
        .keys()
        .filter(|key| key.as_str() != ROUTES_KEY && !SETTINGS.iter().any(|s| s.key == key.as_str()))
        .map(|key| Problem {
            setting: key.clone(),
            message: format!(
                "unknown setting (from the config file or {ENV_PREFIX}_{}); known settings: {}",
                key.to_ascii_uppercase(),
                SETTINGS
                    .iter()
                    .map(|s| s.key)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
        .collect();
    unknown.sort_by(|a, b| a.setting.cmp(&b.setting));
    unknown
}

/// Collects problems while validating, so all of them are reported together.
struct Problems(Vec<Problem>);

impl Problems {
    fn report(&mut self, setting: &str, message: impl Into<String>) {
        self.0.push(Problem {
            setting: setting.to_owned(),
            message: message.into(),
        });
    }

    /// A duration that may be "off".
    fn optional_duration(&mut self, setting: &str, text: &str) -> Option<Option<Duration>> {
        parse_duration(text)
            .map_err(|message| self.report(setting, message))
            .ok()
    }

    /// A value parsed from `text`, or `None` for "off" (or empty); `what`
    /// describes a valid value in the message.
    fn optional<T: std::str::FromStr>(
        &mut self,
        setting: &str,
        text: &str,
        what: &str,
    ) -> Option<Option<T>> {
        match text.trim() {
            "" | "off" => Some(None),
            text => match text.parse::<T>() {
                Ok(value) => Some(Some(value)),
                Err(_) => {
                    self.report(setting, format!("{text:?} is not {what} or off"));
                    None
                }
            },
        }
    }

    /// A duration that must be set; `why` says what "off" would break.
    fn duration(&mut self, setting: &str, text: &str, why: &str) -> Option<Duration> {
        match self.optional_duration(setting, text)? {
            Some(duration) => Some(duration),
            None => {
                self.report(setting, format!("cannot be off: {why}"));
                None
            }
        }
    }
}

fn check(raw: RawConfig, env: &HashMap<String, String>, found: &mut Problems) -> Option<Config> {
    let listen = match raw.listen.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') => Some(ListenAddr::Unix(PathBuf::from(path))),
        Some(_) => None,
        None => raw.listen.parse::<SocketAddr>().ok().map(ListenAddr::Tcp),
    };
    if listen.is_none() {
        found.report(
            "listen",
            format!(
                "{:?} is not an IP:port address or unix:/absolute/path",
                raw.listen
            ),
        );
    }
    let unix_socket_mode = u32::from_str_radix(raw.unix_socket_mode.trim(), 8)
        .ok()
        .filter(|mode| *mode <= 0o777);
    if unix_socket_mode.is_none() {
        found.report(
            "unix_socket_mode",
            format!(
                "{:?} is not an octal mode such as 0600",
                raw.unix_socket_mode
            ),
        );
    }

    let routes = routes::check(&raw, env, found);
    let tcp_listen = match &listen {
        Some(ListenAddr::Tcp(addr)) => Some(*addr),
        _ => None,
    };
    let access = check_access(&raw, env, tcp_listen, found);

    let extra_ca_certs = match raw.ca_file.as_deref() {
        None | Some("") => Some(Vec::new()),
        Some(path) => load_ca_file(Path::new(path))
            .map_err(|message| found.report("ca_file", message))
            .ok(),
    };

    let connect = found.duration(
        "connect_timeout",
        &raw.connect_timeout,
        "a dead upstream would hang requests forever",
    );
    let response_headers =
        found.optional_duration("response_header_timeout", &raw.response_header_timeout);
    let idle = found.optional_duration("idle_timeout", &raw.idle_timeout);
    let pool_idle = found.duration(
        "pool_idle_timeout",
        &raw.pool_idle_timeout,
        "keep it shorter than the upstream's keep-alive so stale connections are not reused",
    );
    let keepalive = found.duration(
        "http2_keepalive_interval",
        &raw.http2_keepalive_interval,
        "long HTTP/2 streams need keepalive pings",
    );
    let shutdown_grace = found.optional_duration("shutdown_grace", &raw.shutdown_grace);

    let shutdown_delay = found.optional_duration("shutdown_delay", &raw.shutdown_delay);
    let header_read_timeout =
        found.optional_duration("header_read_timeout", &raw.header_read_timeout);
    let admin_listen =
        found.optional::<SocketAddr>("admin_listen", &raw.admin_listen, "an IP:port address");
    let max_concurrent_requests = found
        .optional::<usize>(
            "max_concurrent_requests",
            &raw.max_concurrent_requests,
            "a whole number",
        )
        .map(|limit| limit.filter(|count| *count > 0));
    let max_request_header_size = parse_size(&raw.max_request_header_size)
        .map_err(|message| found.report("max_request_header_size", message))
        .ok()
        .and_then(|size| {
            let size = size.and_then(|s| usize::try_from(s).ok());
            if size.is_none_or(|s| s < MIN_HEADER_LIMIT) {
                found.report(
                    "max_request_header_size",
                    format!("must be at least {MIN_HEADER_LIMIT} bytes"),
                );
            }
            size
        });
    let max_request_body = parse_size(&raw.max_request_body)
        .map_err(|message| found.report("max_request_body", message))
        .ok();

    let log_format = match raw.log_format.as_str() {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        other => {
            found.report("log_format", format!("{other:?} is not one of: text, json"));
            None
        }
    };

    Some(Config {
        listen: listen?,
        unix_socket_mode: unix_socket_mode?,
        access: access?,
        routes: routes?,
        extra_ca_certs: extra_ca_certs?,
        timeouts: Timeouts {
            connect: connect?,
            response_headers: response_headers?,
            idle: idle?,
        },
        pool: PoolSettings {
            idle_timeout: pool_idle?,
            max_idle_per_host: raw.pool_max_idle_per_host,
        },
        upstream_http2: raw.upstream_http2,
        http2_keepalive_interval: keepalive?,
        shutdown_grace: shutdown_grace?,
        shutdown_delay: shutdown_delay?,
        admin_listen: admin_listen?,
        limits: Limits {
            max_concurrent_requests: max_concurrent_requests?,
            max_request_header_size: max_request_header_size?,
            max_request_body: max_request_body?,
            header_read_timeout: header_read_timeout?,
            http2_max_concurrent_streams: raw.http2_max_concurrent_streams,
        },
        log_format: log_format?,
    })
}

/// Validates the admission settings: hosts, origins, tokens, rate, paths, and
/// that a non-loopback listener is not left open to the network.
fn check_access(
    raw: &RawConfig,
    env: &HashMap<String, String>,
    listen: Option<SocketAddr>,
    found: &mut Problems,
) -> Option<AccessSettings> {
    // Each token is checked where its setting is known, so a problem names it.
    let mut tokens = Vec::new();
    let mut add = |setting, name: String, read: Result<String, String>, file| match read
        .and_then(|value| check_value(&name, &value).map(|()| value))
    {
        Ok(value) => tokens.push((name, value, file)),
        Err(problem) => found.report(setting, problem),
    };
    for name in raw.access_token_env.iter().filter(|n| !n.is_empty()) {
        let read = env
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("environment variable {name} is not set or is empty"));
        add("access_token_env", name.clone(), read, None);
    }
    for path in raw.access_token_files.iter().filter(|p| !p.is_empty()) {
        let path = Path::new(path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let read = secret_file::read_secret(path);
        add("access_token_files", name, read, Some(path.to_owned()));
    }

    let token_rate = parse_rate(&raw.token_rate_limit)
        .map_err(|message| found.report("token_rate_limit", message))
        .ok();
    for host in &raw.allowed_hosts {
        if !HostPolicy::is_valid_name(host) {
            found.report(
                "allowed_hosts",
                format!("{host:?} is not a host name (no scheme, path or named port)"),
            );
        }
    }
    for origin in &raw.allowed_origins {
        let rest = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let has_path = rest.is_some_and(|rest| rest.trim_end_matches('/').contains('/'));
        if origin == "*" || rest.is_none() || has_path {
            found.report(
                "allowed_origins",
                format!("{origin:?} must be an exact origin such as http://localhost:3000 (no wildcards)"),
            );
        }
    }

    let exposed = listen.is_some_and(|addr| !addr.ip().is_loopback());
    if exposed && tokens.is_empty() && !raw.allow_unauthenticated_network {
        found.report(
            "listen",
            format!(
                "{} is reachable from other machines, so keyrelay requires local access tokens there: \
                 set access_token_env or access_token_files, or pass --allow-unauthenticated-network \
                 if something else already restricts who can connect",
                raw.listen
            ),
        );
    }

    Some(AccessSettings {
        hosts: HostPolicy::new(&raw.allowed_hosts),
        cors: CorsPolicy::new(&raw.allowed_origins),
        tokens: tokens
            .into_iter()
            .map(|(name, value, file)| match file {
                Some(file) => AccessToken::from_file(name, value, file),
                None => AccessToken::new(name, value),
            })
            .collect(),
        token_rate: token_rate?,
    })
}

/// Parses "60/m", "5/s", "1000/h", or "off" (no limit).
pub fn parse_rate(text: &str) -> Result<Option<Rate>, String> {
    let text = text.trim();
    if matches!(text, "off" | "none" | "") {
        return Ok(None);
    }
    let usage = || format!("{text:?} is not a rate (examples: 60/m, 5/s, 1000/h, off)");
    let (count, unit) = text.split_once('/').ok_or_else(usage)?;
    let requests: u32 = count.trim().parse().map_err(|_| usage())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(usage()),
    };
    if requests == 0 {
        return Err(format!(
            "{text:?} allows nothing; use off to disable the limit"
        ));
    }
    Ok(Some(Rate { requests, per }))
}

/// True for the variables Kubernetes service links define for a Service
/// named `keyrelay` (`KEYRELAY_SERVICE_HOST`, `KEYRELAY_PORT_8080_TCP`, ...).
fn is_service_link(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| {
        rest == "_PORT" || rest.starts_with("_PORT_") || rest.starts_with("_SERVICE_")
    })
}

/// Smallest request-head limit: hyper needs room for an ordinary request.
const MIN_HEADER_LIMIT: usize = 8192;

/// Splits "250ms" into (250, "ms"); `what` names a valid value in the error.
fn amount_and_unit<'a>(text: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let amount = digits
        .parse()
        .map_err(|_| format!("{text:?} is not {what}"))?;
    Ok((amount, unit))
}

/// Parses "65536", "64KiB", "10MiB", "1GiB" (also KB/MB/GB as powers of 1024), or "off".
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if matches!(text, "off" | "none") {
        return Ok(None);
    }
    let (amount, unit) = amount_and_unit(text, "a size (examples: 65536, 64KiB, 10MiB, off)")?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use KiB, MiB or GiB)"
            ))
        }
    };
    amount
        .checked_mul(factor)
        .map(Some)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Splits a comma-separated list, dropping blanks.
fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses an upstream base URL: http(s), a host, an optional path, nothing else.
pub fn parse_upstream(text: &str) -> Result<UpstreamUrl, String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a valid URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(format!("{text:?} must start with https:// or http://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry user:password; keyrelay injects the credential itself".to_owned(),
        );
    }
    if authority.host().is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{text:?} must not have a query string; clients send their own"
        ));
    }
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// Parses "250ms", "10s", "5m", "1h", a bare number of seconds, or "off" (None).
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if matches!(text, "off" | "none" | "0") {
        return Ok(None);
    }
    let (amount, unit) = amount_and_unit(text, "a duration (examples: 250ms, 10s, 5m, 1h, off)")?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(amount),
        "" | "s" => Duration::from_secs(amount),
        "m" => Duration::from_secs(amount.saturating_mul(60)),
        "h" => Duration::from_secs(amount.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use ms, s, m or h, or off)"
            ))
        }
    };
    Ok((!duration.is_zero()).then_some(duration))
}

fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{} is not a valid PEM bundle: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificates", path.display()));
    }
    let mut store = rustls::RootCertStore::empty();
    for (index, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|err| {
            format!(
                "certificate #{} in {} is not a usable CA certificate: {err}",
                index + 1,
                path.display()
            )
        })?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn durations_parse_with_units_and_off() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(parse_duration("10s"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse_duration("7"), Ok(Some(Duration::from_secs(7))));
        assert_eq!(parse_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("off"), Ok(None));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10d").is_err());
    }

    #[test]
    fn upstream_url_keeps_base_path_without_trailing_slash() {
        let url = parse_upstream("https://model-abc.api.baseten.co/environments/production/")
            .expect("valid");
        assert_eq!(url.scheme, Scheme::HTTPS);
        assert_eq!(url.authority.as_str(), "model-abc.api.baseten.co");
        assert_eq!(url.base_path, "/environments/production");
        assert_eq!(
            parse_upstream("http://h:8080").expect("valid").base_path,
            ""
        );
    }

    #[test]
    fn upstream_url_rejects_other_schemes_userinfo_and_queries() {
        assert!(parse_upstream("ftp://h").is_err());
        assert!(parse_upstream("h:80").is_err());
        assert!(parse_upstream("https://u:p@h").is_err());
        assert!(parse_upstream("https://h/?a=b").is_err());
    }

    #[test]
    fn defaults_plus_env_give_a_working_config() {
        let config = load(&sources(&[
            ("BASETEN_API_KEY", "k-123"),
            ("KEYRELAY_UPSTREAM", "https://example.test/base"),
            ("KEYRELAY_IDLE_TIMEOUT", "2s"),
        ]))
        .expect("valid");
        assert_eq!(
            config.listen,
            ListenAddr::Tcp("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(config.timeouts.idle, Some(Duration::from_secs(2)));
        assert_eq!(config.timeouts.response_headers, None);
        assert_eq!(
            config.routes[0].credential.value.as_bytes(),
            b"Api-Key k-123"
        );
        assert!(config.routes[0]
            .credential
            .strip
            .iter()
            .any(|h| h == "x-api-key"));
        assert!(!format!("{config:?}").contains("k-123"));
    }

    #[test]
    fn list_settings_come_from_comma_separated_variables() {
        let config = load(&sources(&[
            ("BASETEN_API_KEY", "k"),
            ("KEYRELAY_UPSTREAM", "https://a.test"),
            ("KEYRELAY_STRIP_REQUEST_HEADERS", "x-api-key, x-other"),
            ("KEYRELAY_ALLOWED_PATHS", "/v1/*,POST /predict"),
        ]))
        .expect("valid");
        let strip: Vec<&str> = config.routes[0]
            .credential
            .strip
            .iter()
            .map(|h| h.as_str())
            .collect();
        assert_eq!(strip, ["x-api-key", "x-other", "authorization"]);
        assert!(config.routes[0]
            .paths
            .allows(&http::Method::POST, "/predict"));
        assert!(!config.routes[0]
            .paths
            .allows(&http::Method::GET, "/predict"));
    }

    #[test]
    fn list_flags_override_list_variables() {
        let mut src = sources(&[
            ("BASETEN_API_KEY", "k"),
            ("KEYRELAY_UPSTREAM", "https://a.test"),
            ("KEYRELAY_STRIP_REQUEST_HEADERS", "x-from-env"),
        ]);
        src.set(
            "strip_request_headers",
            OverrideValue::List(vec!["x-from-flag".into()]),
        );
        let config = load(&src).expect("valid");
        assert_eq!(config.routes[0].credential.strip[0].as_str(), "x-from-flag");
    }

    #[test]
    fn kubernetes_service_link_variables_are_not_settings() {
        let config = load(&sources(&[
            ("BASETEN_API_KEY", "k"),
            ("KEYRELAY_UPSTREAM", "https://a.test"),
            ("KEYRELAY_PORT", "tcp://10.0.0.1:8080"),
            ("KEYRELAY_PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("KEYRELAY_SERVICE_HOST", "10.0.0.1"),
            ("KEYRELAY_SERVICE_PORT", "8080"),
        ]));
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn flags_override_env() {
        let mut src = sources(&[
            ("BASETEN_API_KEY", "k"),
            ("KEYRELAY_UPSTREAM", "https://a.test"),
        ]);
        src.set("upstream", OverrideValue::Text("https://b.test".into()));
        assert_eq!(
            load(&src).expect("valid").routes[0]
                .upstream
                .authority
                .as_str(),
            "b.test"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(&sources(&[
            ("KEYRELAY_LISTEN", "nowhere"),
            ("KEYRELAY_CONNECT_TIMEOUT", "soon"),
            ("KEYRELAY_AUTH_TEMPLATE", "Bearer"),
        ]))
        .expect_err("invalid");
        let settings: Vec<&str> = err.problems.iter().map(|p| p.setting.as_str()).collect();
        for expected in [
            "listen",
            "upstream",
            "auth_template",
            "key_env",
            "connect_timeout",
        ] {
            assert!(
                settings.contains(&expected),
                "{expected} missing from {settings:?}"
            );
        }
    }

    #[test]
    fn a_bad_token_names_the_setting_it_came_from() {
        let dir = std::env::temp_dir().join(format!("kr-token-blame-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // A file token named like an env token: the problem is the file's.
        let file = dir.join("team");
        std::fs::write(&file, "two words-0123456789\n").expect("token file");
        let err = load(&sources(&[
            ("BASETEN_API_KEY", "k"),
            ("KEYRELAY_UPSTREAM", "https://example.test"),
            ("KEYRELAY_ACCESS_TOKEN_ENV", "team"),
            ("team", "good-token-0123456789"),
            ("KEYRELAY_ACCESS_TOKEN_FILES", file.to_str().expect("UTF-8")),
        ]))
        .expect_err("invalid token");
        std::fs::remove_dir_all(&dir).expect("clean up");
        let settings: Vec<&str> = err.problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(settings, ["access_token_files"], "{err}");
    }

    #[test]
    fn unknown_keys_are_all_named() {
        let err = load(&sources(&[
            ("KEYRELAY_LISTN", "x"),
            ("KEYRELAY_UPSTRAEM", "y"),
        ]))
        .expect_err("unknown keys");
        let settings: Vec<&str> = err.problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(settings, ["listn", "upstraem"]);
    }

    #[test]
    fn missing_key_names_the_variable() {
        let err = load(&sources(&[("KEYRELAY_UPSTREAM", "https://a.test")])).expect_err("no key");
        assert!(err.to_string().contains("BASETEN_API_KEY"));
    }
}

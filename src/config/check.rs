//! Checking: turns the merged raw settings into a [`Config`], collecting
//! every problem instead of stopping at the first, each naming its setting
//! and never echoing a secret value.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::parse::{parse_duration, parse_rate, parse_size};
use super::{
    routes, AccessSettings, Config, Limits, ListenAddr, LogFormat, PoolSettings, RawConfig,
    Timeouts,
};
use crate::guard::cors::CorsPolicy;
use crate::guard::host::HostPolicy;
use crate::guard::origin::AllowedOrigin;
use crate::guard::tokens::{check_value, AccessToken};
use crate::secrets::secret_file;
use crate::usage::budget::Unavailable;
use crate::usage::redis_store::RedisAddress;
use crate::usage::BudgetLimit;

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
    pub(super) fn single(setting: &str, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                setting: setting.to_owned(),
                message: message.into(),
            }],
        }
    }
}

/// Collects problems while validating, so all of them are reported together.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn report(&mut self, setting: &str, message: impl Into<String>) {
        self.0.push(Problem {
            setting: setting.to_owned(),
            message: message.into(),
        });
    }

    /// A duration that may be "off" (`Ok(None)`).
    pub(super) fn optional_duration(
        &mut self,
        setting: &str,
        text: &str,
    ) -> Result<Option<Duration>, Reported> {
        parse_duration(text).map_err(|message| self.report(setting, message).into())
    }

    /// A value parsed from `text`, or `Ok(None)` for "off" (or empty);
    /// `what` describes a valid value in the message.
    pub(super) fn optional<T: std::str::FromStr>(
        &mut self,
        setting: &str,
        text: &str,
        what: &str,
    ) -> Result<Option<T>, Reported> {
        match text.trim() {
            "" | "off" => Ok(None),
            text => match text.parse::<T>() {
                Ok(value) => Ok(Some(value)),
                Err(_) => {
                    self.report(setting, format!("{text:?} is not {what} or off"));
                    Err(Reported)
                }
            },
        }
    }

    /// A duration that must be set; `why` says what "off" would break.
    pub(super) fn duration(
        &mut self,
        setting: &str,
        text: &str,
        why: &str,
    ) -> Result<Duration, Reported> {
        match self.optional_duration(setting, text)? {
            Some(duration) => Ok(duration),
            None => {
                self.report(setting, format!("cannot be off: {why}"));
                Err(Reported)
            }
        }
    }
}

/// A problem that was reported to [`Problems`] where the value is written;
/// what carries it is unusable, and nothing more needs saying about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reported;

impl From<()> for Reported {
    fn from((): ()) -> Self {
        Reported
    }
}

pub(super) fn validate(
    raw: RawConfig,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<Config> {
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
    let listen_backlog = raw
        .listen_backlog
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|backlog| (1..=MAX_LISTEN_BACKLOG).contains(backlog));
    if listen_backlog.is_none() {
        found.report(
            "listen_backlog",
            format!(
                "{:?} is not a number of connections from 1 to {MAX_LISTEN_BACKLOG}",
                raw.listen_backlog
            ),
        );
    }
    let workers = parse_workers(&raw.workers);
    if workers.is_none() {
        found.report(
            "workers",
            format!(
                "{:?} is not auto or a number of threads from 1 to {MAX_WORKERS}",
                raw.workers
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
    let warm_connections = raw
        .warm_connections
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|count| *count <= MAX_WARM_CONNECTIONS);
    if warm_connections.is_none() {
        found.report(
            "warm_connections",
            format!(
                "{:?} is not a number of connections from 0 to {MAX_WARM_CONNECTIONS}",
                raw.warm_connections
            ),
        );
    }
    let keepalive = found.duration(
        "http2_keepalive_interval",
        &raw.http2_keepalive_interval,
        "long HTTP/2 streams need keepalive pings",
    );
    let keepalive_timeout = found.duration(
        "http2_keepalive_timeout",
        &raw.http2_keepalive_timeout,
        "a dead HTTP/2 connection is found only when a PING goes unanswered",
    );
    let shutdown_grace = found.optional_duration("shutdown_grace", &raw.shutdown_grace);

    let shutdown_delay = found.optional_duration("shutdown_delay", &raw.shutdown_delay);
    let header_read_timeout =
        found.optional_duration("header_read_timeout", &raw.header_read_timeout);
    let client_idle_timeout =
        found.optional_duration("client_idle_timeout", &raw.client_idle_timeout);
    let request_body_timeout =
        found.optional_duration("request_body_timeout", &raw.request_body_timeout);
    let admin_listen =
        found.optional::<SocketAddr>("admin_listen", &raw.admin_listen, "an IP:port address");
    if let Ok(Some(admin)) = admin_listen {
        check_admin_exposure(&raw, admin, tcp_listen, found);
    }
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

    let usage_tap = match raw.usage_tap.trim() {
        "on" => Some(true),
        "off" => Some(false),
        other => {
            found.report("usage_tap", format!("{other:?} is not one of: on, off"));
            None
        }
    };
    let budgeted = !raw.access_token_budget.is_empty()
        || !raw.token_budget.is_empty()
        || raw.routes.iter().any(routes::RawRoute::has_budget);
    if usage_tap == Some(false) && budgeted {
        found.report(
            "usage_tap",
            "is off, but token budgets are set: nothing would be charged to them; turn the tap on or remove the budgets",
        );
    }
    let adds_usage =
        raw.add_stream_usage || raw.routes.iter().any(routes::RawRoute::adds_stream_usage);
    if usage_tap == Some(false) && adds_usage {
        found.report(
            "add_stream_usage",
            "asks streams for usage that nothing would read: usage_tap is off",
        );
    }
    let usage_state_file = raw
        .usage_state_file
        .as_deref()
        .map(str::trim)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from);
    if usage_state_file.is_some() && !budgeted {
        found.report(
            "usage_state_file",
            "is set but no token budget is (token_budget, access_token_budget), so there is nothing to keep",
        );
    }
    let usage_store = match raw.usage_store.trim() {
        "" | "local" => Some(None),
        url => RedisAddress::parse(url)
            .map(Some)
            .map_err(|message| found.report("usage_store", message))
            .ok(),
    };
    if let Some(Some(_)) = &usage_store {
        if !budgeted {
            found.report(
                "usage_store",
                "names Redis but no token budget is set (token_budget, access_token_budget), so nothing would be stored",
            );
        }
        if usage_state_file.is_some() {
            found.report(
                "usage_state_file",
                "is for the local usage_store; with Redis the counts already outlive a restart",
            );
        }
    }
    let usage_store_unavailable = match raw.usage_store_unavailable.trim() {
        "allow" => Some(Unavailable::Allow),
        "deny" => Some(Unavailable::Deny),
        other => {
            found.report(
                "usage_store_unavailable",
                format!("{other:?} is not one of: allow, deny"),
            );
            None
        }
    };

    Some(Config {
        listen: listen?,
        listen_backlog: listen_backlog?,
        workers: workers?,
        unix_socket_mode: unix_socket_mode?,
        access: access?,
        routes: routes?,
        extra_ca_certs: extra_ca_certs?,
        timeouts: Timeouts {
            connect: connect.ok()?,
            response_headers: response_headers.ok()?,
            idle: idle.ok()?,
        },
        pool: PoolSettings {
            idle_timeout: pool_idle.ok()?,
            max_idle_per_host: raw.pool_max_idle_per_host,
            warm_connections: warm_connections?,
        },
        http2_keepalive_interval: keepalive.ok()?,
        http2_keepalive_timeout: keepalive_timeout.ok()?,
        shutdown_grace: shutdown_grace.ok()?,
        shutdown_delay: shutdown_delay.ok()?,
        admin_listen: admin_listen.ok()?,
        limits: Limits {
            max_concurrent_requests: max_concurrent_requests.ok()?,
            max_request_header_size: max_request_header_size?,
            max_request_body: max_request_body?,
            header_read_timeout: header_read_timeout.ok()?,
            client_idle_timeout: client_idle_timeout.ok()?,
            request_body_timeout: request_body_timeout.ok()?,
            http2_max_concurrent_streams: raw.http2_max_concurrent_streams,
        },
        log_format: log_format?,
        usage_tap: usage_tap?,
        usage_state_file,
        usage_store: usage_store?,
        usage_store_unavailable: usage_store_unavailable?,
    })
}

/// `token_budget` / `access_token_budget` entries for `setting`; `None` if
/// one is wrong (each reported), or if two share a window (which one would
/// apply is not obvious, so it is a mistake).
pub(super) fn parse_budgets(
    entries: &[String],
    setting: &str,
    found: &mut Problems,
) -> Option<Vec<BudgetLimit>> {
    let mut budgets: Vec<BudgetLimit> = Vec::new();
    let mut valid = true;
    for entry in entries.iter().filter(|entry| !entry.trim().is_empty()) {
        match BudgetLimit::parse(entry) {
            Ok(budget) if budgets.iter().any(|b| b.window == budget.window) => {
                found.report(
                    setting,
                    format!("{entry:?}: another budget already has this window; give each window one budget"),
                );
                valid = false;
            }
            Ok(budget) => budgets.push(budget),
            Err(message) => {
                found.report(setting, message);
                valid = false;
            }
        }
    }
    valid.then_some(budgets)
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
    // A token's name is what budgets, metrics and logs know it by, so two
    // tokens of one name would share them: refused, naming the second.
    let mut names: Vec<String> = Vec::new();
    let mut add = |setting, name: String, read: Result<String, String>, file| {
        if names.contains(&name) {
            found.report(
                setting,
                format!(
                    "two access tokens are named {name:?} (a token is named by its variable, \
                     or by its file's name without the folder); give each a unique name"
                ),
            );
            return;
        }
        names.push(name.clone());
        match read.and_then(|value| check_value(&name, &value).map(|()| value)) {
            Ok(value) => tokens.push((name, value, file)),
            Err(problem) => found.report(setting, problem),
        }
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
    let token_budgets = parse_budgets(&raw.access_token_budget, "access_token_budget", found);
    let no_tokens = raw.access_token_env.iter().all(|n| n.is_empty())
        && raw.access_token_files.iter().all(|p| p.is_empty());
    if no_tokens && token_budgets.as_ref().is_some_and(|b| !b.is_empty()) {
        found.report(
            "access_token_budget",
            "is set but no access tokens are (access_token_env, access_token_files), so it would never apply; \
             use token_budget for a budget everyone shares",
        );
    }
    let token_max_output = found
        .optional::<u64>(
            "access_token_max_output_tokens",
            &raw.access_token_max_output_tokens,
            "a whole number",
        )
        .and_then(|cap| {
            if cap == Some(0) {
                found.report(
                    "access_token_max_output_tokens",
                    "0 would refuse every request; leave it off for no cap",
                );
                return Err(Reported);
            }
            Ok(cap)
        });
    let token_models: Vec<String> = raw
        .access_token_allowed_models
        .iter()
        .map(|model| model.trim().to_owned())
        .collect();
    if token_models.iter().any(String::is_empty) {
        found.report(
            "access_token_allowed_models",
            "an empty model name would match no request; remove it",
        );
    }
    for (setting, set) in [
        (
            "access_token_max_output_tokens",
            token_max_output.is_ok_and(|cap| cap.is_some()),
        ),
        ("access_token_allowed_models", !token_models.is_empty()),
    ] {
        if no_tokens && set {
            found.report(
                setting,
                "is set but no access tokens are (access_token_env, access_token_files), so it would never apply",
            );
        }
    }
    for host in &raw.allowed_hosts {
        if !HostPolicy::is_valid_name(host) {
            found.report(
                "allowed_hosts",
                format!("{host:?} is not a host name (no scheme, path or named port)"),
            );
        }
    }
    let origins: Vec<AllowedOrigin> = raw
        .allowed_origins
        .iter()
        .filter_map(|entry| {
            AllowedOrigin::parse(entry)
                .map_err(|message| found.report("allowed_origins", message))
                .ok()
        })
        .collect();
    if raw.allow_credentials {
        if raw.allowed_origins.is_empty() {
            found.report(
                "allow_credentials",
                "is set but allowed_origins is empty, so no page could use it: list the origins that may send credentials",
            );
        }
        for wildcard in origins.iter().filter(|o| o.is_wildcard()) {
            found.report(
                "allow_credentials",
                format!(
                    "cannot be used with the wildcard origin {wildcard}: list each origin that may send \
                     credentials exactly (a page on any local port could otherwise act with the user's cookies)"
                ),
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
        cors: CorsPolicy::new(origins, raw.allow_credentials),
        tokens: tokens
            .into_iter()
            .map(|(name, value, file)| match file {
                Some(file) => AccessToken::from_file(name, value, file),
                None => AccessToken::new(name, value),
            })
            .collect(),
        token_rate: token_rate?,
        token_budgets: token_budgets?,
        token_caps: crate::usage::inspect::RequestCaps {
            max_output_tokens: token_max_output.ok()?,
            // The route's over_max_output_tokens decides refuse or clamp.
            over_max_output_tokens: Default::default(),
            allowed_models: token_models,
        },
    })
}

/// The admin port takes no access token, so tokens cannot be what lets it
/// onto the network by themselves: beyond loopback it needs
/// `allow_unauthenticated_network`, or a main listener that is itself on
/// the network behind access tokens (a deployment meant for other machines,
/// as deploy/kubernetes/shared.yaml, where a NetworkPolicy guards the admin
/// port). `/quitquitquit` stays loopback-only either way.
fn check_admin_exposure(
    raw: &RawConfig,
    admin: SocketAddr,
    listen: Option<SocketAddr>,
    found: &mut Problems,
) {
    if admin.ip().is_loopback() || raw.allow_unauthenticated_network {
        return;
    }
    let tokens = raw.access_token_env.iter().any(|n| !n.is_empty())
        || raw.access_token_files.iter().any(|p| !p.is_empty());
    let networked = listen.is_some_and(|addr| !addr.ip().is_loopback());
    if tokens && networked {
        return;
    }
    found.report(
        "admin_listen",
        format!(
            "{admin} is reachable from other machines, and the admin port takes no access token \
             (its /metrics and /usage would be open to them): keep it on loopback \
             (127.0.0.1:9901), or pass --allow-unauthenticated-network if something else \
             (a NetworkPolicy, a firewall) already restricts who can connect"
        ),
    );
}

/// Largest accepted `listen_backlog`: the kernel keeps the backlog in a
/// 16-bit field on some systems, and more than this is never useful.
const MAX_LISTEN_BACKLOG: u32 = 65_535;

/// Most serving threads: far beyond any core count keyrelay is run on, and
/// each thread holds its own upstream connections.
const MAX_WORKERS: usize = 256;

/// `workers`: `auto` is the CPUs this process may run on, which
/// `available_parallelism` reads from the affinity mask and the cgroup
/// quota (a pod limited to 2 CPUs on a 64-core node gets 2).
fn parse_workers(raw: &str) -> Option<usize> {
    match raw.trim() {
        "auto" => Some(
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(MAX_WORKERS),
        ),
        number => number
            .parse::<usize>()
            .ok()
            .filter(|workers| (1..=MAX_WORKERS).contains(workers)),
    }
}

/// Most warm connections per upstream: spares beyond a few only hold
/// sockets the server has to keep open.
const MAX_WARM_CONNECTIONS: usize = 64;

/// Smallest request-head limit: hyper needs room for an ordinary request.
const MIN_HEADER_LIMIT: usize = 8192;

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
    use crate::config::load;
    use crate::config::load::tests::sources;

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(&sources(&[
            ("KEYRELAY_LISTEN", "nowhere"),
            ("KEYRELAY_CONNECT_TIMEOUT", "soon"),
            ("KEYRELAY_AUTH_TEMPLATE", "Bearer"),
            ("KEYRELAY_LISTEN_BACKLOG", "0"),
            ("KEYRELAY_WORKERS", "0"),
        ]))
        .expect_err("invalid");
        let settings: Vec<&str> = err.problems.iter().map(|p| p.setting.as_str()).collect();
        for expected in [
            "listen",
            "listen_backlog",
            "workers",
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
    fn missing_key_names_the_variable() {
        let err = load(&sources(&[("KEYRELAY_UPSTREAM", "https://a.test")])).expect_err("no key");
        assert!(err.to_string().contains("BASETEN_API_KEY"));
    }
}

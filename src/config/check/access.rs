//! Who may use keyrelay: the local access tokens and what they may spend,
//! the hosts and browser origins it answers, and that a listener on the
//! network is not left open to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{parse_budgets, Problems, Reported};
use crate::config::parse::parse_rate;
use crate::config::{AccessSettings, RawConfig};
use crate::guard::cors::CorsPolicy;
use crate::guard::host::HostPolicy;
use crate::guard::origin::AllowedOrigin;
use crate::guard::tokens::{check_value, AccessToken};
use crate::secrets::secret_file;
use crate::usage::inspect::RequestCaps;

/// Validates the admission settings: tokens, their rate, budgets and caps,
/// hosts, origins, and that a non-loopback listener is not left open to
/// the network.
pub(super) fn check(
    raw: &RawConfig,
    env: &HashMap<String, String>,
    listen: Option<SocketAddr>,
    found: &mut Problems,
) -> Result<AccessSettings, Reported> {
    let tokens = tokens(raw, env, found);
    let no_tokens = raw.access_token_env.iter().all(|n| n.is_empty())
        && raw.access_token_files.iter().all(|p| p.is_empty());
    let token_rate = parse_rate(&raw.token_rate_limit)
        .map_err(|message| found.refuse("token_rate_limit", message));
    let token_budgets = parse_budgets(&raw.access_token_budget, "access_token_budget", found);
    if no_tokens && token_budgets.as_ref().is_some_and(|b| !b.is_empty()) {
        found.report(
            "access_token_budget",
            "is set but no access tokens are (access_token_env, access_token_files), so it would never apply; \
             use token_budget for a budget everyone shares",
        );
    }
    let token_caps = token_caps(raw, no_tokens, found);
    check_hosts(&raw.allowed_hosts, found);
    let cors = cors(raw, found);
    let exposed = listen.is_some_and(|addr| !addr.ip().is_loopback());
    if exposed && tokens.is_empty() && !raw.allow_unauthenticated_network.on() {
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
    Ok(AccessSettings {
        hosts: HostPolicy::new(&raw.allowed_hosts),
        cors,
        tokens,
        token_rate: token_rate?,
        token_budgets: token_budgets.ok_or(Reported)?,
        token_caps: token_caps?,
    })
}

/// The tokens of `access_token_env` and `access_token_files`, each checked
/// where its setting is known, so a problem names it. A token's name is
/// what budgets, metrics and logs know it by, so two tokens of one name
/// would share them: refused, naming the second.
fn tokens(
    raw: &RawConfig,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Vec<AccessToken> {
    let mut tokens = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut add = |setting, name: String, read: Result<String, String>, file: Option<PathBuf>| {
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
            Ok(value) => tokens.push(match file {
                Some(file) => AccessToken::from_file(name, value, file),
                None => AccessToken::new(name, value),
            }),
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
    tokens
}

/// `access_token_max_output_tokens` and `access_token_allowed_models`,
/// which need access tokens to apply to.
fn token_caps(
    raw: &RawConfig,
    no_tokens: bool,
    found: &mut Problems,
) -> Result<RequestCaps, Reported> {
    let max_output = found
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
    let models: Vec<String> = raw
        .access_token_allowed_models
        .iter()
        .map(|model| model.trim().to_owned())
        .collect();
    if models.iter().any(String::is_empty) {
        found.report(
            "access_token_allowed_models",
            "an empty model name would match no request; remove it",
        );
    }
    for (setting, set) in [
        (
            "access_token_max_output_tokens",
            max_output.is_ok_and(|cap| cap.is_some()),
        ),
        ("access_token_allowed_models", !models.is_empty()),
    ] {
        if no_tokens && set {
            found.report(
                setting,
                "is set but no access tokens are (access_token_env, access_token_files), so it would never apply",
            );
        }
    }
    Ok(RequestCaps {
        max_output_tokens: max_output?,
        // The route's over_max_output_tokens decides refuse or clamp.
        over_max_output_tokens: Default::default(),
        allowed_models: models,
    })
}

/// `allowed_hosts`: names only.
fn check_hosts(hosts: &[String], found: &mut Problems) {
    for host in hosts {
        if !HostPolicy::is_valid_name(host) {
            found.report(
                "allowed_hosts",
                format!("{host:?} is not a host name (no scheme, path or named port)"),
            );
        }
    }
}

/// `allowed_origins` and `allow_credentials`, which needs exact origins.
fn cors(raw: &RawConfig, found: &mut Problems) -> CorsPolicy {
    let origins: Vec<AllowedOrigin> = raw
        .allowed_origins
        .iter()
        .filter_map(|entry| {
            AllowedOrigin::parse(entry)
                .map_err(|message| found.report("allowed_origins", message))
                .ok()
        })
        .collect();
    if raw.allow_credentials.on() {
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
    CorsPolicy::new(origins, raw.allow_credentials.on())
}

//! Loading: defaults < file < `KEYRELAY_*` variables < flags, merged by the
//! `config` crate so every layer is handled the same way, then checked.
//!
//! The environment is passed in as a map ([`Sources::env`]) rather than read
//! from the process, so tests and the demo swap it without `set_var`.

use std::collections::HashMap;
use std::path::PathBuf;

use config::{Environment, File, FileFormat};

use super::check::{validate, ConfigError, Problem, Problems};
use super::parse::split_list;
use super::settings::{Kind, ENV_PREFIX, ROUTES_KEY, SETTINGS};
use super::{Config, RawConfig};

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
    match validate(raw, &sources.env, &mut found) {
        Ok(config) if found.0.is_empty() => Ok(config),
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

/// True for the variables Kubernetes service links define for a Service
/// named `keyrelay` (`KEYRELAY_SERVICE_HOST`, `KEYRELAY_PORT_8080_TCP`, ...).
fn is_service_link(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX).is_some_and(|rest| {
        rest == "_PORT" || rest.starts_with("_PORT_") || rest.starts_with("_SERVICE_")
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ListenAddr;

    /// Sources with only these environment variables (no file, no flags).
    pub(crate) fn sources(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        }
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
    fn unknown_keys_are_all_named() {
        let err = load(&sources(&[
            ("KEYRELAY_LISTN", "x"),
            ("KEYRELAY_UPSTRAEM", "y"),
        ]))
        .expect_err("unknown keys");
        let settings: Vec<&str> = err.problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(settings, ["listn", "upstraem"]);
    }
}

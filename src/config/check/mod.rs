//! Checking: turns the merged raw settings into a [`Config`], collecting
//! every problem instead of stopping at the first, each naming its setting
//! and never echoing a secret value.
//!
//! One file per concern, each reading its settings as text and reporting
//! to [`Problems`]: [`listener`] (where and how keyrelay listens, the admin
//! port), [`access`] (who may use it), [`upstream`] (TLS roots, timeouts,
//! the connection pool), [`limits`] (what one client may use), [`usage`]
//! (the token tap and budget storage). The routes are checked in
//! [`super::routes`].

mod access;
mod limits;
mod listener;
mod traces;
mod upstream;
mod usage;

use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::parse::parse_duration;
use super::routes::oauth::Outbound;
use super::{routes, Config, LogFormat, RawConfig};
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

    /// Reports a problem with `setting`, returning the mark that it was
    /// reported (for `map_err`).
    pub(super) fn refuse(&mut self, setting: &str, message: impl Into<String>) -> Reported {
        self.report(setting, message);
        Reported
    }

    /// A duration that may be "off" (`Ok(None)`).
    pub(super) fn optional_duration(
        &mut self,
        setting: &str,
        text: &str,
    ) -> Result<Option<Duration>, Reported> {
        parse_duration(text).map_err(|message| self.refuse(setting, message))
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

    /// A whole number in `range`; `what` says what it counts ("a number
    /// of connections"), and the message gives the range.
    pub(super) fn number<T>(
        &mut self,
        setting: &str,
        text: &str,
        range: RangeInclusive<T>,
        what: &str,
    ) -> Result<T, Reported>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        in_range(text, &range).ok_or_else(|| {
            let (low, high) = range.into_inner();
            self.refuse(
                setting,
                format!("{text:?} is not {what} from {low} to {high}"),
            )
        })
    }

    /// Like [`Problems::number`], or `Ok(None)` for "off" (or empty).
    pub(super) fn optional_number<T>(
        &mut self,
        setting: &str,
        text: &str,
        range: RangeInclusive<T>,
        what: &str,
    ) -> Result<Option<T>, Reported>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        if matches!(text.trim(), "" | "off") {
            return Ok(None);
        }
        in_range(text, &range).map(Some).ok_or_else(|| {
            let (low, high) = range.into_inner();
            let message = format!("{text:?} is not {what} from {low} to {high}, or off");
            self.refuse(setting, message)
        })
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

/// `text` as a number, if it is one within `range`.
fn in_range<T: FromStr + PartialOrd>(text: &str, range: &RangeInclusive<T>) -> Option<T> {
    text.trim()
        .parse::<T>()
        .ok()
        .filter(|number| range.contains(number))
}

/// A problem that was reported to [`Problems`] where the value is written;
/// what carries it is unusable, and nothing more needs saying about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reported;

/// Checks every setting, each concern in turn, and builds the [`Config`];
/// `Err` if anything was wrong (every problem reported to `found`).
pub(super) fn validate(
    raw: RawConfig,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Result<Config, Reported> {
    check_switches(&raw, found);
    let listen = listener::listen_addr(&raw, found);
    let tcp_listen = listen.as_ref().ok().and_then(listener::tcp);
    let serving = listener::serving(&raw, found);
    let upstream = upstream::check(&raw, found);
    // Token requests made while the routes are checked trust what upstream
    // connections do.
    let outbound = Outbound {
        allow_cleartext: raw.allow_cleartext_upstream.on(),
        extra_ca_certs: Arc::new(
            upstream
                .as_ref()
                .map(|upstream| upstream.extra_ca_certs.clone())
                .unwrap_or_default(),
        ),
    };
    let routes = routes::check(&raw, env, &outbound, found).ok_or(Reported);
    let access = access::check(&raw, env, tcp_listen, found);
    let admin_listen = listener::admin_listen(&raw, tcp_listen, found);
    let limits = limits::check(&raw, found);
    let log_format = log_format(&raw.log_format, found);
    let usage = usage::check(&raw, found);
    let traces = traces::check(&raw, env, found);

    let serving = serving?;
    let upstream = upstream?;
    let usage = usage?;
    Ok(Config {
        listen: listen?,
        listen_backlog: serving.backlog,
        workers: serving.workers,
        unix_socket_mode: serving.unix_socket_mode,
        access: access?,
        routes: routes?,
        extra_ca_certs: upstream.extra_ca_certs,
        timeouts: upstream.timeouts,
        pool: upstream.pool,
        http2_keepalive_interval: upstream.http2_keepalive_interval,
        http2_keepalive_timeout: upstream.http2_keepalive_timeout,
        shutdown_grace: serving.shutdown_grace,
        shutdown_delay: serving.shutdown_delay,
        admin_listen: admin_listen?,
        limits: limits?,
        log_format: log_format?,
        usage_tap: usage.tap,
        upstream_name_header: raw.upstream_name_header.on(),
        usage_state_file: usage.state_file,
        usage_store: usage.store,
        usage_store_unavailable: usage.store_unavailable,
        traces: traces?,
    })
}

/// Every switch is read as text ([`super::parse::Switch`]); one that is
/// neither on nor off is reported here.
fn check_switches(raw: &RawConfig, found: &mut Problems) {
    let switches = [
        ("model_apis", &raw.model_apis),
        ("development", &raw.development),
        ("grpc", &raw.grpc),
        ("regional", &raw.regional),
        ("allow_credentials", &raw.allow_credentials),
        (
            "allow_unauthenticated_network",
            &raw.allow_unauthenticated_network,
        ),
        ("allow_cleartext_upstream", &raw.allow_cleartext_upstream),
        ("upstream_http2", &raw.upstream_http2),
        ("add_stream_usage", &raw.add_stream_usage),
        ("upstream_name_header", &raw.upstream_name_header),
        ("google_credentials", &raw.google_credentials),
    ];
    for (setting, switch) in switches {
        if let Some(message) = switch.invalid() {
            found.report(setting, message);
        }
    }
}

fn log_format(text: &str, found: &mut Problems) -> Result<LogFormat, Reported> {
    match text {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => {
            found.report("log_format", format!("{other:?} is not one of: text, json"));
            Err(Reported)
        }
    }
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

#[cfg(test)]
mod tests {
    use crate::config::load;
    use crate::config::load::tests::sources;
    use crate::config::{Kind, Setting, SETTINGS};

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
    fn every_switch_is_read_as_text_and_a_bad_one_named() {
        let switches: Vec<&Setting> = SETTINGS
            .iter()
            .filter(|setting| setting.kind == Kind::Switch)
            .collect();
        let env: Vec<(String, &str)> = switches
            .iter()
            .map(|setting| (setting.env_var(), "maybe"))
            .collect();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let err = load(&sources(&pairs)).expect_err("invalid switches");
        for setting in switches {
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.setting == setting.key && p.message.contains("\"maybe\"")),
                "{} not named: {err}",
                setting.key
            );
        }
    }

    #[test]
    fn missing_key_names_the_variable() {
        let err = load(&sources(&[("KEYRELAY_UPSTREAM", "https://a.test")])).expect_err("no key");
        assert!(err.to_string().contains("BASETEN_API_KEY"));
    }
}

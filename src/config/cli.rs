//! The command line: one flag per setting, generated from [`crate::config::SETTINGS`].
//!
//! Generating the flags from the settings table keeps `--help`, the config
//! file, the `KEYRELAY_*` variables and the README table naming the same
//! things. Flags only override; defaults and validation live in [`config`].

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::{Kind, OverrideValue, Sources, SETTINGS};

/// What the user asked keyrelay to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the proxy.
    Proxy,
    /// Run the built-in demo: a mock model endpoint behind keyrelay.
    Demo,
    /// Check a running keyrelay's admin `/healthz` at this URL.
    Health(String),
}

const ABOUT: &str = "Local authenticating streaming proxy for hosted model endpoints.\n\n\
Apps call http://127.0.0.1:PORT/... with no credentials; keyrelay adds the API key \
(from BASETEN_API_KEY by default, sent as `Authorization: Api-Key <key>`), forwards to \
the upstream over HTTPS and relays the response as it is produced, token by token.\n\n\
Every option can also be set in the --config TOML file (same name, with underscores) \
or as a KEYRELAY_<NAME> environment variable; flags win over the environment, which \
wins over the file.";

const EXAMPLES: &str = "Examples:
  # A dedicated Baseten model; apps then POST to http://127.0.0.1:8080/predict
  # and point OpenAI SDKs at http://127.0.0.1:8080/v1
  BASETEN_API_KEY=... keyrelay --model abc123
  keyrelay --model abc123 --environment staging
  keyrelay --model abc123 --deployment q4lx9z3
  keyrelay --model abc123 --development

  # A chain (POST /run_remote) and Baseten Model APIs (/v1/chat/completions)
  keyrelay --chain xyz789
  keyrelay --model-apis

  # Any URL: request paths are appended to its path
  keyrelay --upstream https://model-abc123.api.baseten.co

  # Any HTTP API with a static bearer key
  MY_KEY=... keyrelay --upstream https://api.example.com --key-env MY_KEY --auth-template 'Bearer {key}'

  # Several models on one port, from a file (see config/)
  keyrelay --config config/two-models.toml

  # Health check for containers, against --admin-listen 127.0.0.1:9901
  keyrelay health

  # No key, no network: a local mock model streaming through keyrelay
  keyrelay demo";

/// The clap command with every setting as a global flag.
pub fn command() -> Command {
    let mut command = Command::new("keyrelay")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Local authenticating streaming proxy for hosted model endpoints")
        .long_about(ABOUT)
        .after_help(EXAMPLES)
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("PATH")
                .global(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML file with settings (keys as below, with underscores)"),
        )
        .subcommand(
            Command::new("health")
                .about("Exit 0 if a running keyrelay's admin /healthz answers 200 (for HEALTHCHECK and exec probes)")
                .arg(
                    Arg::new("url")
                        .long("url")
                        .value_name("URL")
                        .default_value(crate::ops::health::DEFAULT_URL)
                        .help("The /healthz URL of the admin listener"),
                ),
        )
        .subcommand(Command::new("demo").about(
            "Run a local mock model endpoint behind keyrelay and stream one request through it \
             (no network, no real key)",
        ));
    for setting in SETTINGS {
        let mut help = format!("{} [env: {}]", setting.help, setting.env_var());
        if !setting.default.is_empty() {
            help.push_str(&format!(" [default: {}]", setting.default));
        }
        let mut arg = Arg::new(setting.key)
            .long(setting.flag().trim_start_matches("--").to_owned())
            .global(true)
            .help(help);
        arg = match setting.kind {
            Kind::Switch => arg.action(ArgAction::SetTrue),
            Kind::List => arg
                .value_name("ITEM,...")
                .value_delimiter(',')
                .action(ArgAction::Append),
            Kind::Text => arg.value_name(setting.key.to_ascii_uppercase()),
        };
        command = command.arg(arg);
    }
    command
}

/// Reads parsed flags into the action and the config sources (over `sources`).
pub fn interpret(matches: &ArgMatches, mut sources: Sources) -> (Action, Sources) {
    let action = match matches.subcommand() {
        Some(("demo", _)) => Action::Demo,
        Some(("health", sub)) => Action::Health(
            sub.get_one::<String>("url")
                .cloned()
                .unwrap_or_else(|| crate::ops::health::DEFAULT_URL.to_owned()),
        ),
        _ => Action::Proxy,
    };
    // Global flags given after the subcommand land in the subcommand's matches.
    let matches = matches.subcommand().map(|(_, sub)| sub).unwrap_or(matches);
    if let Some(path) = matches.get_one::<PathBuf>("config") {
        sources.file = Some(path.clone());
    }
    for setting in SETTINGS {
        let value = match setting.kind {
            Kind::Switch => matches
                .get_flag(setting.key)
                .then_some(OverrideValue::Bool(true)),
            Kind::List => matches
                .get_many::<String>(setting.key)
                .map(|items| OverrideValue::List(items.cloned().collect())),
            Kind::Text => matches
                .get_one::<String>(setting.key)
                .map(|text| OverrideValue::Text(text.clone())),
        };
        if let Some(value) = value {
            sources.set(setting.key, value);
        }
    }
    (action, sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn flags_become_overrides() {
        let matches = command()
            .try_get_matches_from([
                "keyrelay",
                "--upstream",
                "https://a.test",
                "--upstream-http2",
                "--strip-request-headers",
                "a,b",
            ])
            .expect("parses");
        let (action, sources) = interpret(&matches, Sources::default());
        assert_eq!(action, Action::Proxy);
        let mut keys: Vec<&str> = sources.overrides.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["strip_request_headers", "upstream", "upstream_http2"]
        );
    }

    #[test]
    fn flags_after_demo_still_apply() {
        let matches = command()
            .try_get_matches_from(["keyrelay", "demo", "--listen", "127.0.0.1:0"])
            .expect("parses");
        let (action, sources) = interpret(&matches, Sources::default());
        assert_eq!(action, Action::Demo);
        assert_eq!(sources.overrides.len(), 1);
    }
}

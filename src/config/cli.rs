//! The command line: one flag per setting, generated from [`crate::config::SETTINGS`].
//!
//! Generating the flags from the settings table keeps `--help`, the config
//! file, the `KEYRELAY_*` variables and the README table naming the same
//! things. Flags only override; defaults and validation live in [`config`].
//! The shell completions and the man page are rendered from the same
//! [`command`], so they cannot list a flag the binary does not have.

use std::io;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};
use clap_complete::Shell;
use roff::{bold, italic, roman, Roff};

use crate::config::{Kind, OverrideValue, Sources, SETTINGS};

/// Where `keyrelay health` looks by default (the admin address the
/// container image uses). Here, with the command line, so that `config`
/// names nothing of `ops`, which runs the check.
pub const DEFAULT_HEALTH_URL: &str = "http://127.0.0.1:9901/healthz";

/// What the user asked keyrelay to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the proxy.
    Proxy,
    /// Run the built-in demo: a mock model endpoint behind keyrelay.
    Demo,
    /// Check a running keyrelay's admin `/healthz` at this URL.
    Health(String),
    /// Print the completion script for this shell.
    Completions(Shell),
    /// Print the man page.
    Man,
}

const ABOUT: &str = "Local authenticating streaming proxy for hosted model endpoints.\n\n\
Apps call http://127.0.0.1:PORT/... with no credentials; keyrelay adds the API key \
(from BASETEN_API_KEY by default, sent as `Authorization: Api-Key <key>`), forwards to \
the upstream over HTTPS and relays the response as it is produced, token by token.\n\n\
Every option can also be set in the --config TOML file (same name, with underscores) \
or as a KEYRELAY_<NAME> environment variable; flags win over the environment, which \
wins over the file.";

const COMPLETIONS_ABOUT: &str = "Print a shell completion script to stdout, e.g.

  keyrelay completions bash > ~/.local/share/bash-completion/completions/keyrelay
  keyrelay completions zsh > ~/.zfunc/_keyrelay    # with fpath+=~/.zfunc before compinit
  keyrelay completions fish > ~/.config/fish/completions/keyrelay.fish";

/// Shown after `--help` under "Examples:" and in the man page's EXAMPLES.
const EXAMPLES: &str = "  # A dedicated Baseten model; apps then POST to http://127.0.0.1:8080/predict
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
        .after_help(format!("Examples:\n{EXAMPLES}"))
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
                        .default_value(DEFAULT_HEALTH_URL)
                        .help("The /healthz URL of the admin listener"),
                ),
        )
        .subcommand(Command::new("demo").about(
            "Run a local mock model endpoint behind keyrelay and stream one request through it \
             (no network, no real key)",
        ))
        .subcommand(
            Command::new("completions")
                .about("Print a shell completion script (bash, zsh, fish, elvish, powershell)")
                .long_about(COMPLETIONS_ABOUT)
                .arg(
                    Arg::new("shell")
                        .value_name("SHELL")
                        .required(true)
                        .value_parser(clap::value_parser!(Shell))
                        .help("The shell to complete for"),
                ),
        )
        .subcommand(
            Command::new("man")
                .about("Print the man page (roff), e.g. keyrelay man > keyrelay.1; man -l keyrelay.1"),
        );
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
                .unwrap_or_else(|| DEFAULT_HEALTH_URL.to_owned()),
        ),
        Some(("completions", sub)) => Action::Completions(
            *sub.get_one::<Shell>("shell")
                .expect("clap refuses `completions` without SHELL"),
        ),
        Some(("man", _)) => Action::Man,
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

/// The completion script for `shell`, covering every subcommand and flag.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut command = command();
    let name = command.get_name().to_owned();
    // Rendered into memory: clap_complete panics on a failed write (a closed
    // pipe), and the caller should report that instead.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    script
}

/// Exit statuses, for the man page (main.rs returns them).
const EXIT_STATUSES: &[(&str, &str)] = &[
    ("0", "clean shutdown; for health, /healthz answered 200"),
    (
        "1",
        "a runtime failure; for health, /healthz did not answer 200",
    ),
    (
        "64",
        "a configuration or usage error (every problem is reported at once)",
    ),
    ("69", "the listen address cannot be bound"),
    ("143", "a second SIGTERM or SIGINT cut the drain short"),
];

/// The man page (section 1, roff), rendered from [`command`].
///
/// clap_mangen renders the name, synopsis, description and options; the
/// subcommands are listed here with their own arguments instead of as
/// `keyrelay-demo(1)` pages that are not installed, and the examples keep
/// their layout.
pub fn man_page() -> io::Result<Vec<u8>> {
    let command = command();
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;

    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in command.get_subcommands() {
        let mut synopsis = vec![bold(format!("{} {}", command.get_name(), sub.get_name()))];
        // Before clap builds the command, a subcommand lists only its own
        // arguments, not the global settings.
        for arg in sub.get_arguments() {
            let value = arg
                .get_value_names()
                .and_then(|names| names.first())
                .map_or_else(|| arg.get_id().to_string(), ToString::to_string);
            synopsis.push(roman(" "));
            match arg.get_long() {
                Some(long) => {
                    synopsis.push(roman("["));
                    synopsis.push(bold(format!("--{long}")));
                    synopsis.push(roman(" "));
                    synopsis.push(italic(value));
                    synopsis.push(roman("]"));
                }
                None => synopsis.push(italic(value)),
            }
        }
        roff.control("TP", []).text(synopsis);
        let about = sub.get_about().map(ToString::to_string);
        roff.text([roman(about.unwrap_or_default())]);
    }
    roff.control("SH", ["EXAMPLES"]).control("nf", []);
    for line in EXAMPLES.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff.control("SH", ["EXIT STATUS"]);
    for (status, meaning) in EXIT_STATUSES {
        roff.control("TP", [])
            .text([bold(*status)])
            .text([roman(*meaning)]);
    }
    roff.to_writer(&mut page)?;
    man.render_version_section(&mut page)?;
    Ok(page)
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

    #[test]
    fn completions_and_man_are_actions() {
        let action = |args: &[&str]| {
            let matches = command().try_get_matches_from(args).expect("parses");
            interpret(&matches, Sources::default()).0
        };
        assert_eq!(
            action(&["keyrelay", "completions", "zsh"]),
            Action::Completions(Shell::Zsh)
        );
        assert_eq!(action(&["keyrelay", "man"]), Action::Man);
        assert!(command()
            .try_get_matches_from(["keyrelay", "completions"])
            .is_err());
    }
}

//! Configuration mistakes stop startup with exit status 64 and a message that
//! names every bad setting at once, and never prints a secret. Drives the real
//! binary, as a user or an init system would.

use crate::support;

use std::path::PathBuf;
use std::process::Output;

use support::*;

/// EX_USAGE: what keyrelay exits with on any configuration mistake.
const EX_USAGE: i32 = 64;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = binary();
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run keyrelay")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_usage_error(output: &Output, mentions: &[&str]) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(EX_USAGE), "stderr: {text}");
    for needle in mentions {
        assert!(
            text.contains(needle),
            "stderr should mention {needle:?}: {text}"
        );
    }
    assert!(!text.contains(KEY), "stderr leaked the key: {text}");
}

/// Writes `contents` to a fresh file under the temp dir and returns its path.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = support::unique_temp_path("test", name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

#[test]
fn missing_key_names_the_variable_and_exits_64() {
    let output = run(&["--upstream", "https://model-abc.api.baseten.co"], &[]);
    assert_usage_error(&output, &["key_env", "BASETEN_API_KEY"]);
}

#[test]
fn empty_key_counts_as_missing() {
    let output = run(
        &["--upstream", "https://model-abc.api.baseten.co"],
        &[("BASETEN_API_KEY", "   ")],
    );
    assert_usage_error(&output, &["BASETEN_API_KEY"]);
}

#[test]
fn custom_key_variable_is_named_when_missing() {
    let output = run(
        &["--upstream", "https://a.test", "--key-env", "MY_MODEL_KEY"],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["MY_MODEL_KEY"]);
}

#[test]
fn bad_upstream_url_is_named() {
    let output = run(&["--upstream", "ftp://nope"], &[("BASETEN_API_KEY", KEY)]);
    assert_usage_error(&output, &["upstream", "https://"]);
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let output = run(
        &[
            "--listen",
            "not-an-address",
            "--connect-timeout",
            "soon",
            "--auth-template",
            "Bearer",
            "--log-format",
            "xml",
        ],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(
        &output,
        &[
            "listen",
            "upstream",
            "connect_timeout",
            "auth_template",
            "log_format",
        ],
    );
}

#[test]
fn budget_and_cap_settings_that_are_wrong_or_apply_to_nothing_are_named() {
    let output = run(
        &[
            "--upstream",
            "https://example.test",
            "--budget-reserve",
            "0",
            "--unparsed-budget-requests",
            "drop",
            "--max-output-tokens",
            "many",
            "--over-max-output-tokens",
            "trim",
            "--access-token-max-output-tokens",
            "100",
            "--access-token-allowed-models",
            "small",
        ],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(
        &output,
        &[
            "budget_reserve: must be at least 1",
            "unparsed_budget_requests: \"drop\" is not one of: forward, refuse",
            "max_output_tokens: \"many\" is not a whole number",
            "over_max_output_tokens: \"trim\" is not one of: refuse, clamp",
            "access_token_max_output_tokens: is set but no access tokens are",
            "access_token_allowed_models: is set but no access tokens are",
        ],
    );
}

#[test]
fn unknown_key_in_file_is_an_error_naming_it() {
    let file = temp_file(
        "unknown.toml",
        "upstream = \"https://a.test\"\nconect_timeout = \"5s\"\nidle_timout = \"1s\"\n",
    );
    let output = run(
        &["--config", file.to_str().expect("utf-8 path")],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(
        &output,
        &["conect_timeout", "idle_timout", "unknown setting"],
    );
}

#[test]
fn unknown_keyrelay_variable_is_an_error_naming_it() {
    let output = run(
        &["--upstream", "https://a.test"],
        &[
            ("BASETEN_API_KEY", KEY),
            ("KEYRELAY_UPSTREEM", "https://b.test"),
        ],
    );
    assert_usage_error(&output, &["upstreem", "KEYRELAY_UPSTREEM"]);
}

#[test]
fn missing_config_file_is_named() {
    let output = run(
        &["--config", "/nonexistent/keyrelay.toml"],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["/nonexistent/keyrelay.toml"]);
}

#[test]
fn unreadable_ca_file_is_named() {
    let file = temp_file("not-a-ca.pem", "this is not PEM\n");
    let output = run(
        &[
            "--upstream",
            "https://a.test",
            "--ca-file",
            file.to_str().expect("utf-8"),
        ],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["ca_file"]);
}

#[test]
fn key_with_invalid_header_bytes_is_rejected_without_echoing_it() {
    let bad = "kr-test-KEY-with\u{7f}control";
    let output = run(
        &["--upstream", "https://a.test"],
        &[("BASETEN_API_KEY", bad)],
    );
    assert_usage_error(&output, &["BASETEN_API_KEY"]);
    assert!(!stderr(&output).contains("kr-test-KEY-with"));
}

#[test]
fn unknown_flag_exits_64() {
    let output = run(&["--no-such-flag"], &[]);
    assert_eq!(output.status.code(), Some(EX_USAGE));
}

#[test]
fn help_documents_every_setting_and_version_works() {
    let help = run(&["--help"], &[]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for setting in keyrelay::config::SETTINGS {
        assert!(
            text.contains(&setting.flag()),
            "--help lacks {}",
            setting.flag()
        );
        assert!(
            text.contains(&setting.env_var()),
            "--help lacks {}",
            setting.env_var()
        );
    }
    assert!(
        text.contains("keyrelay demo"),
        "--help shows the demo example"
    );

    let version = run(&["--version"], &[]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn readme_and_example_config_list_every_setting() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let example = std::fs::read_to_string(format!("{root}/config/keyrelay.toml")).expect("example");
    for setting in keyrelay::config::SETTINGS {
        assert!(
            readme.contains(&format!("| `{}`", setting.key)),
            "README settings table lacks {}",
            setting.key
        );
        assert!(
            readme.contains(&setting.env_var()),
            "README lacks {}",
            setting.env_var()
        );
        assert!(
            example.contains(&format!("{} =", setting.key)),
            "config/keyrelay.toml lacks {}",
            setting.key
        );
    }
}

#[test]
fn example_config_file_is_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut sources = sources("https://model-abc123.api.baseten.co", &[]);
    sources.file = Some(format!("{root}/config/keyrelay.toml").into());
    // The flags set by `sources` win over the file, as they would for a user.
    keyrelay::config::load(&sources).expect("config/keyrelay.toml is valid");
}

#[test]
fn every_example_config_in_config_dir_is_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("{root}/config")).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // Every key variable the examples name, set to a test key.
        let env = [
            "BASETEN_API_KEY",
            "LLAMA_KEY",
            "WHISPER_KEY",
            "OPENAI_COMPAT_KEY",
        ]
        .map(|name| (name.to_owned(), KEY.to_owned()));
        let sources = keyrelay::config::Sources {
            file: Some(path.clone()),
            env: env.into_iter().collect(),
            ..Default::default()
        };
        if let Err(err) = keyrelay::config::load(&sources) {
            panic!("{} is invalid:\n{err}", path.display());
        }
        checked += 1;
    }
    assert!(
        checked >= 5,
        "expected the annotated example and four route examples"
    );
}

#[test]
fn invalid_route_tables_are_reported_naming_the_route() {
    let file = temp_file(
        "routes.toml",
        r#"
[[routes]]
name = "a"
prefix = "/x"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "b"
prefix = "/x/"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "nokey"
prefix = "/nokey"
upstream = "https://c.test"

[[routes]]
name = "badtemplate"
prefix = "/t"
upstream = "https://d.test"
key_env = "BASETEN_API_KEY"
auth_template = "Bearer"
"#,
    );
    let output = run(
        &["--config", file.to_str().expect("utf-8 path")],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(
        &output,
        &[
            "routes \"a\" and \"b\"",
            "routes[2] \"nokey\".key_env",
            "no credential source",
            "routes[3] \"badtemplate\".auth_template",
        ],
    );
}

#[test]
fn origins_a_browser_never_sends_stop_startup_naming_the_setting() {
    for (origin, reason) in [
        ("*", "list each origin"),
        ("https://*.example.com", "wildcard in the host"),
        ("https://app.example.com:*", "only for loopback"),
        ("localhost:3000", "http://"),
        ("http://localhost:3000/app", "no path"),
        ("http://localhost:30*", "invalid port"),
    ] {
        let output = run(
            &["--upstream", "https://a.test", "--allowed-origins", origin],
            &[("BASETEN_API_KEY", KEY)],
        );
        assert_usage_error(&output, &["allowed_origins", reason]);
    }
}

#[test]
fn credentials_need_exact_origins() {
    let output = run(
        &[
            "--upstream",
            "https://a.test",
            "--allowed-origins",
            "http://localhost:3000,http://localhost:*",
            "--allow-credentials",
        ],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["allow_credentials", "http://localhost:*"]);
    let output = run(
        &["--upstream", "https://a.test", "--allow-credentials"],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["allow_credentials", "allowed_origins is empty"]);
}

#[test]
fn token_budgets_that_could_never_apply_stop_startup() {
    let upstream = ["--upstream", "https://a.test"];
    let key = [("BASETEN_API_KEY", KEY)];
    let with = |extra: &[&str]| run(&[&upstream[..], extra].concat(), &key);
    assert_usage_error(
        &with(&["--token-budget", "2000000/week"]),
        &["token_budget", "minute, hour, day"],
    );
    assert_usage_error(
        &with(&["--token-budget", "100/day,200/day"]),
        &["token_budget", "this window"],
    );
    assert_usage_error(
        &with(&["--access-token-budget", "1000/day"]),
        &["access_token_budget", "no access tokens"],
    );
    assert_usage_error(
        &with(&["--token-budget", "1000/day", "--usage-tap", "off"]),
        &["usage_tap", "nothing would be charged"],
    );
    assert_usage_error(
        &with(&["--usage-state-file", "/tmp/usage.json"]),
        &["usage_state_file", "nothing to keep"],
    );
    let budget = ["--token-budget", "1000/day"];
    assert_usage_error(
        &with(&[&budget[..], &["--usage-store", "memcached://cache:11211"]].concat()),
        &["usage_store", "redis://HOST:PORT/DB"],
    );
    assert_usage_error(
        &with(
            &[
                &budget[..],
                &["--usage-store", "redis://:secret@redis:6379"],
            ]
            .concat(),
        ),
        &["usage_store", "AUTH is not supported"],
    );
    assert_usage_error(
        &with(&["--usage-store", "redis://redis:6379"]),
        &["usage_store", "nothing would be stored"],
    );
    assert_usage_error(
        &with(
            &[
                &budget[..],
                &[
                    "--usage-store",
                    "redis://redis:6379",
                    "--usage-state-file",
                    "/tmp/u.json",
                ],
            ]
            .concat(),
        ),
        &["usage_state_file", "outlive a restart"],
    );
    assert_usage_error(
        &with(&[&budget[..], &["--usage-store-unavailable", "maybe"]].concat()),
        &["usage_store_unavailable", "allow, deny"],
    );
    assert_usage_error(
        &with(&["--add-stream-usage", "--usage-tap", "off"]),
        &["add_stream_usage", "usage_tap is off"],
    );
}

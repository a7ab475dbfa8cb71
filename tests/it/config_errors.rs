//! Configuration mistakes stop startup with exit status 64 and a message that
//! names every bad setting at once, and never prints a secret. Drives the real
//! binary, as a user or an init system would.

use crate::support;

use std::process::Output;

use support::*;

/// EX_USAGE: what keyrelay exits with on any configuration mistake.
const EX_USAGE: i32 = 64;

/// Runs keyrelay to its exit; one that starts serving instead (a mistake
/// it did not catch) is stopped after a few seconds, so the test fails on
/// its exit status rather than hanging.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = binary();
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("run keyrelay");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if child.try_wait().expect("wait").is_none() {
        child.kill().expect("stop keyrelay");
    }
    child.wait_with_output().expect("keyrelay output")
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

/// Prints an issue 23 row for RELIABILITY.md: the exit status and the
/// first line of stderr that mentions `needle`.
fn report_refusal(attack: &str, output: &Output, needle: &str) {
    let text = stderr(output);
    let line = text
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or("(no line names it)")
        .trim()
        .trim_start_matches("- ");
    // Long messages shortened for the table.
    let line = match line.char_indices().nth(140) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    };
    support::reliability::report(
        "issue23",
        &[
            attack,
            &format!("exit {}: {line}", output.status.code().unwrap_or(-1)),
        ],
    );
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
        "test",
        "unknown.toml",
        "upstream = \"https://a.test\"\nconect_timeout = \"5s\"\nidle_timout = \"1s\"\n",
    );
    let output = run(&["--config", file.path()], &[("BASETEN_API_KEY", KEY)]);
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
    let file = temp_file("test", "not-a-ca.pem", "this is not PEM\n");
    let output = run(
        &["--upstream", "https://a.test", "--ca-file", file.path()],
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
        "test",
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
    let output = run(&["--config", file.path()], &[("BASETEN_API_KEY", KEY)]);
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

#[test]
fn top_level_route_policy_that_no_route_could_use_stops_startup() {
    let route = |extra: &str| {
        format!(
            "[[routes]]\nname = \"llama\"\nprefix = \"/llama\"\nupstream = \"https://a.test\"\n\
             key_env = \"BASETEN_API_KEY\"\n{extra}\n"
        )
    };
    let cases = [
        // Inherited rules of which none can match under the route's prefix:
        // the route would refuse everything, or (before) ignore them.
        (
            format!("allowed_paths = [\"POST /v1/*\"]\n{}", route("")),
            vec![
                r#"routes[0] "llama".allowed_paths"#,
                "inherits the top-level allowed_paths",
            ],
        ),
        // A route's own rule outside its prefix never matches.
        (
            route("allowed_paths = [\"POST /predict\", \"POST /llama/predict\"]"),
            vec![
                r#"routes[0] "llama".allowed_paths"#,
                "\"POST /predict\" can never match",
            ],
        ),
        // A route named "default" with its own budget, beside one that
        // inherits the top-level budget (counted as "default" too).
        (
            format!(
                "token_budget = [\"10/day\"]\n{}\n[[routes]]\nname = \"default\"\n\
                 prefix = \"/d\"\nupstream = \"https://d.test\"\nkey_env = \"BASETEN_API_KEY\"\n\
                 token_budget = [\"99/day\"]\n",
                route("")
            ),
            vec!["both budgets would be counted as \"default\""],
        ),
        // Top-level policy every route overrides, with no default route.
        (
            format!(
                "set_request_headers = [\"x-team: a\"]\nadd_stream_usage = true\n{}",
                route("set_request_headers = []\nadd_stream_usage = false")
            ),
            vec![
                "set_request_headers: is set at the top level",
                "add_stream_usage: is set",
            ],
        ),
        // A top-level key_file with no default route is used by nothing.
        (
            format!("key_file = \"/run/secrets/key\"\n{}", route("")),
            vec!["key_file", "no route would use it"],
        ),
    ];
    for (toml, mentions) in cases {
        let file = temp_file("test", "policy.toml", &toml);
        let output = run(&["--config", file.path()], &[("BASETEN_API_KEY", KEY)]);
        assert_usage_error(&output, &mentions);
    }
}

#[test]
fn an_auth_header_that_frames_or_routes_the_message_stops_startup() {
    for name in [
        "host",
        "Content-Length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        ":authority",
        ":path",
    ] {
        let output = run(
            &["--upstream", "https://a.test", "--auth-header", name],
            &[("BASETEN_API_KEY", KEY)],
        );
        assert_usage_error(&output, &["auth_header", name]);
        report_refusal(&format!("--auth-header {name}"), &output, "auth_header");
    }
    // On a route too, inherited or its own.
    let file = temp_file(
        "test",
        "auth-header.toml",
        "auth_header = \"transfer-encoding\"\n\n[[routes]]\nname = \"a\"\nprefix = \"/a\"\n\
         upstream = \"https://a.test\"\nkey_env = \"BASETEN_API_KEY\"\n\n[[routes]]\nname = \"b\"\n\
         prefix = \"/b\"\nupstream = \"https://b.test\"\nkey_env = \"BASETEN_API_KEY\"\n\
         auth_header = \"host\"\n",
    );
    let output = run(&["--config", file.path()], &[("BASETEN_API_KEY", KEY)]);
    assert_usage_error(
        &output,
        &[
            r#"routes[0] "a".auth_header"#,
            r#"routes[1] "b".auth_header"#,
        ],
    );
}

#[test]
fn an_upstream_url_is_parsed_strictly_and_never_echoed() {
    const SECRET: &str = "sk-live-pasted-4f9e2a";
    for url in [
        format!("https://a.test:{SECRET}"),
        format!("https://a.test:{SECRET}/v1"),
        format!("https://{SECRET}@a.test"),
        format!("https://user:{SECRET}@a.test"),
        format!("https://a.test/v1?key={SECRET}"),
        format!("https://a.test/v1#{SECRET}"),
        "https://a.test:99999".to_owned(),
        "https://a.test:0".to_owned(),
    ] {
        let output = run(&["--upstream", &url], &[("BASETEN_API_KEY", KEY)]);
        assert_usage_error(&output, &["upstream"]);
        assert!(!stderr(&output).contains(SECRET), "{}", stderr(&output));
        report_refusal(
            &format!("--upstream {}", url.replace(SECRET, "SECRET")),
            &output,
            "upstream",
        );
    }
}

#[test]
fn a_cleartext_upstream_beyond_loopback_needs_the_opt_in() {
    let key = [("BASETEN_API_KEY", KEY)];
    for url in [
        "http://model.internal:8080",
        "http://10.0.0.7",
        "http://[2001:db8::1]:80",
        "HTTP://example.com",
    ] {
        let output = run(&["--upstream", url], &key);
        assert_usage_error(
            &output,
            &["upstream", "clear text", "allow_cleartext_upstream"],
        );
        report_refusal(
            &format!("--upstream {url} (cleartext, not loopback)"),
            &output,
            "allow_cleartext_upstream",
        );
        assert_usage_error(
            &run(&[], &[key[0], ("KEYRELAY_UPSTREAM", url)]),
            &["upstream", "allow_cleartext_upstream"],
        );
    }
    let file = temp_file(
        "test",
        "cleartext.toml",
        "[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"http://model.internal\"\n\
         key_env = \"BASETEN_API_KEY\"\n",
    );
    assert_usage_error(
        &run(&["--config", file.path()], &key),
        &[r#"routes[0] "a".upstream"#, "allow_cleartext_upstream"],
    );
    // Loopback needs nothing; beyond it, the opt-in (flag, variable or file).
    let load =
        |url: &str, settings: &[(&str, &str)]| keyrelay::config::load(&sources(url, settings));
    for url in [
        "http://127.0.0.1:8000",
        "http://127.8.9.10",
        "http://[::1]:8000",
        "http://localhost:8000",
        "https://model.internal",
    ] {
        load(url, &[]).unwrap_or_else(|err| panic!("{url}: {err}"));
    }
    load(
        "http://model.internal:8080",
        &[("allow_cleartext_upstream", "true")],
    )
    .expect("opted in");
}

#[test]
fn two_access_tokens_of_one_name_stop_startup() {
    let dir = support::unique_temp_path("test", "tokens");
    for sub in ["a", "b"] {
        std::fs::create_dir_all(dir.join(sub)).expect("dir");
        std::fs::write(
            dir.join(sub).join("token"),
            format!("tok-{sub}-0123456789abcdef"),
        )
        .expect("token file");
    }
    let files = format!(
        "{},{}",
        dir.join("a/token").display(),
        dir.join("b/token").display()
    );
    let output = run(
        &[
            "--upstream",
            "https://a.test",
            "--access-token-files",
            &files,
        ],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["access_token_files", "\"token\"", "unique"]);
    report_refusal(
        "--access-token-files a/token,b/token (two tokens named \"token\")",
        &output,
        "access_token_files",
    );
    // A variable and a file of the same name.
    let output = run(
        &[
            "--upstream",
            "https://a.test",
            "--access-token-env",
            "token",
            "--access-token-files",
            &dir.join("a/token").display().to_string(),
        ],
        &[
            ("BASETEN_API_KEY", KEY),
            ("token", "tok-env-0123456789abcdef"),
        ],
    );
    assert_usage_error(&output, &["access_token_files", "\"token\""]);
    report_refusal(
        "--access-token-env token beside --access-token-files a/token",
        &output,
        "access_token_files",
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn numbers_and_switches_are_read_as_text_so_every_problem_is_reported_together() {
    // Each of these failed the whole read on its own, hiding the rest.
    let output = run(
        &["--upstream", "https://a.test"],
        &[
            ("BASETEN_API_KEY", KEY),
            ("KEYRELAY_POOL_MAX_IDLE_PER_HOST", "abc"),
            ("KEYRELAY_HTTP2_MAX_CONCURRENT_STREAMS", "many"),
            ("KEYRELAY_DEVELOPMENT", "maybe"),
            ("KEYRELAY_ALLOW_CREDENTIALS", "sometimes"),
            ("KEYRELAY_LISTEN", "bogus"),
        ],
    );
    assert_usage_error(
        &output,
        &[
            "pool_max_idle_per_host: \"abc\" is not a number of connections from 0 to 65535",
            "http2_max_concurrent_streams: \"many\" is not a number of streams from 1 to 65535",
            "development: \"maybe\" is not one of: true, false",
            "allow_credentials: \"sometimes\" is not one of: true, false",
            "listen: \"bogus\" is not an IP:port address",
        ],
    );
    // The file's typed values still read as before.
    let file = temp_file(
        "test",
        "typed.toml",
        "upstream = \"https://a.test\"\npool_max_idle_per_host = 16\n\
         http2_max_concurrent_streams = 8\nallow_credentials = \"yes\"\n",
    );
    let output = run(&["--config", file.path()], &[("BASETEN_API_KEY", KEY)]);
    assert_usage_error(
        &output,
        &["allow_credentials: is set but allowed_origins is empty"],
    );
    assert!(!stderr(&output).contains("pool_max_idle_per_host"));
}

#[test]
fn numeric_settings_out_of_range_stop_startup_naming_the_range() {
    let output = run(
        &["--upstream", "https://a.test"],
        &[
            ("BASETEN_API_KEY", KEY),
            // No HTTP/2 client could open a stream; it started "ready".
            ("KEYRELAY_HTTP2_MAX_CONCURRENT_STREAMS", "0"),
            ("KEYRELAY_POOL_MAX_IDLE_PER_HOST", "100000"),
            // 0 meant no limit at all; far beyond any host panicked.
            ("KEYRELAY_MAX_CONCURRENT_REQUESTS", "0"),
            ("KEYRELAY_MAX_REQUEST_HEADER_SIZE", "1GiB"),
            ("KEYRELAY_MAX_REQUEST_BODY", "0"),
        ],
    );
    assert_usage_error(
        &output,
        &[
            "http2_max_concurrent_streams: \"0\" is not a number of streams from 1 to 65535",
            "pool_max_idle_per_host: \"100000\" is not a number of connections from 0 to 65535",
            "max_concurrent_requests: \"0\" is not a number of requests from 1 to 1000000, or off",
            "max_request_header_size: \"1GiB\" is more than any request head needs",
            "max_request_body: 0 would refuse every request with a body; use off",
        ],
    );
    let output = run(
        &["--upstream", "https://a.test"],
        &[
            ("BASETEN_API_KEY", KEY),
            ("KEYRELAY_MAX_CONCURRENT_REQUESTS", "18446744073709551615"),
            ("KEYRELAY_HTTP2_MAX_CONCURRENT_STREAMS", "4294967295"),
        ],
    );
    assert_usage_error(
        &output,
        &[
            "max_concurrent_requests: \"18446744073709551615\" is not a number of requests from 1 to 1000000",
            "http2_max_concurrent_streams: \"4294967295\" is not a number of streams from 1 to 65535",
        ],
    );
}

#[test]
fn a_routes_numbers_and_switches_are_read_as_text_too() {
    let file = temp_file(
        "test",
        "typed-routes.toml",
        r#"
token_budget = ["1000/day"]

[[routes]]
name = "r"
prefix = "/r"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"
budget_reserve = "lots"
max_output_tokens = -1
grpc = "maybe"
strip_prefix = "perhaps"
add_stream_usage = "sometimes"

[[routes]]
name = "ok"
prefix = "nowhere"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
budget_reserve = 64
strip_prefix = false
"#,
    );
    let output = run(&["--config", file.path()], &[("BASETEN_API_KEY", KEY)]);
    assert_usage_error(
        &output,
        &[
            "routes[0] \"r\".budget_reserve: \"lots\" is not a whole number",
            "routes[0] \"r\".max_output_tokens: \"-1\" is not a whole number",
            "routes[0] \"r\".grpc: \"maybe\" is not one of: true, false",
            "routes[0] \"r\".strip_prefix: \"perhaps\" is not one of: true, false",
            "routes[0] \"r\".add_stream_usage: \"sometimes\" is not one of: true, false",
            "routes[1] \"ok\".prefix: \"nowhere\" must be a path",
        ],
    );
}

#[test]
fn an_auth_query_that_is_no_plain_parameter_name_exits_64() {
    for name in ["a&b", "key=x", "k y"] {
        let output = run(
            &["--upstream", "https://a.test", "--auth-query", name],
            &[("BASETEN_API_KEY", KEY)],
        );
        assert_usage_error(&output, &["auth_query", "not a plain query parameter name"]);
    }
    let output = run(
        &[
            "--upstream",
            "https://a.test",
            "--auth-query",
            "key",
            "--auth-header",
            "x-goog-api-key",
        ],
        &[("BASETEN_API_KEY", KEY)],
    );
    assert_usage_error(&output, &["auth_header", "auth_query"]);
}

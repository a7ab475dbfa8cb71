//! `key_command`: credentials that expire, fetched by a helper program.
//!
//! The helper is a small Python script written at test time: each run
//! prints a new token (`kc-secret-<run>-<expiry in ms>`) as JSON with an
//! `expires_at`, unless a `fail` file sits in its state directory. The
//! upstream here rejects any request whose token has expired, by the time
//! written into the token itself, and counts what it saw.
//!
//! What is shown: a stream stays open across two rotations and completes
//! untouched; hundreds of requests spread across rotations never carry an
//! expired token; after expiry with a failing helper, requests get 503
//! `credential_unavailable`, nothing is forwarded and `/readyz` fails, until
//! the helper works again; an upstream 401 makes the helper run once more
//! (rate-limited); a helper failing at startup stops keyrelay with exit 64;
//! and no token, nor the helper's stdout, ever appears in a trace-level log.

use std::path::PathBuf;

use crate::support::expiring::{
    expired_means_503_and_nothing_forwarded, get, one_fetch_for_401s, recovered_then_log,
    rotations_beside_a_stream, CheckingUpstream,
};
use crate::support::ops::{self, AdminRelay};
use crate::support::*;

/// What every token starts with; a log scan looks for it.
const TOKEN_PREFIX: &str = "kc-secret-";

/// The helper: counts its runs in `STATE/runs`, fails while `STATE/fail`
/// exists (saying so on stderr), else prints a token that lives LIFETIME
/// seconds.
const HELPER: &str = r#"
import datetime, json, os, sys, time
state, lifetime = sys.argv[1], float(sys.argv[2])
runs = os.path.join(state, "runs")
n = int(open(runs).read()) + 1 if os.path.exists(runs) else 1
open(runs, "w").write(str(n))
if os.path.exists(os.path.join(state, "fail")):
    print(f"helper: vault sealed (run {n})", file=sys.stderr)
    sys.exit(1)
expires = time.time() + lifetime
token = f"kc-secret-{n}-{int(expires * 1000)}"
print(f"helper: issued token number {n}", file=sys.stderr)
at = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).isoformat()
print(json.dumps({"token": token, "expires_at": at}))
"#;

/// The helper script and its state directory, removed when dropped.
struct Helper {
    dir: PathBuf,
    lifetime: f64,
}

impl Helper {
    fn new(lifetime: f64) -> Self {
        let dir = unique_temp_path("key-command", "helper");
        std::fs::create_dir_all(&dir).expect("helper dir");
        std::fs::write(dir.join("helper.py"), HELPER).expect("write helper");
        Self { dir, lifetime }
    }

    /// The `key_command` argv.
    fn argv(&self) -> Vec<String> {
        vec![
            "python3".to_owned(),
            self.dir.join("helper.py").display().to_string(),
            self.dir.display().to_string(),
            self.lifetime.to_string(),
        ]
    }

    /// How many times the helper has run.
    fn runs(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("runs"))
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn fail(&self, failing: bool) {
        let flag = self.dir.join("fail");
        if failing {
            std::fs::write(flag, "").expect("fail flag");
        } else {
            std::fs::remove_file(flag).expect("remove fail flag");
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sources of an in-process keyrelay whose key comes from `helper`.
fn helper_sources(upstream: &str, helper: &Helper) -> keyrelay::config::Sources {
    let mut sources = sources(upstream, &[("auth_template", "Bearer {key}")]);
    sources.set(
        "key_command",
        keyrelay::config::OverrideValue::List(helper.argv()),
    );
    sources
}

#[tokio::test]
async fn a_stream_outlives_two_rotations_and_no_request_carries_an_expired_token() {
    let mut upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    // 2 s tokens: refreshed every 1.6 s, or sooner when python starts slowly.
    let helper = Helper::new(2.0);
    let relay = Relay::from_sources(&helper_sources(&upstream.url, &helper)).await;
    rotations_beside_a_stream(&mut upstream, &relay, || helper.runs()).await;
    relay.stop().await;
}

#[tokio::test]
async fn after_expiry_a_failing_helper_means_503_and_not_ready_until_it_recovers() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let helper = Helper::new(1.5);
    let mut command = ops::command(&upstream.url);
    command
        .args(["--auth-template", "Bearer {key}"])
        .env("KEYRELAY_KEY_COMMAND", helper.argv().join(","))
        .env("RUST_LOG", "trace");
    let mut relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    assert_eq!(get(&client, relay.url("/v1/models")).await.status(), 200);
    relay.wait_for_readyz(200).await;

    helper.fail(true);
    expired_means_503_and_nothing_forwarded(&upstream, &relay).await;

    helper.fail(false);
    let log = recovered_then_log(&upstream, &mut relay).await;
    assert!(
        log.contains("issued token number"),
        "the helper's stderr is logged when it succeeds too:\n{log}"
    );
    assert!(
        log.contains("vault sealed"),
        "the helper's stderr is logged:\n{log}"
    );
    assert!(
        log.contains("command python3"),
        "the source kind is named:\n{log}"
    );
    assert!(
        !log.contains(TOKEN_PREFIX) && !log.contains("expires_at"),
        "a token or the helper's stdout reached the log:\n{log}"
    );
}

#[tokio::test]
async fn an_upstream_401_runs_the_helper_once_more_and_passes_through() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let helper = Helper::new(3600.0);
    let relay = Relay::from_sources(&helper_sources(&upstream.url, &helper)).await;
    one_fetch_for_401s(&upstream, &relay, || helper.runs()).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_helper_failing_at_startup_stops_keyrelay_with_64_naming_key_command() {
    let printed = format!("{TOKEN_PREFIX}printed-then-failed");
    let output = binary()
        .args([
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
        ])
        .env(
            "KEYRELAY_KEY_COMMAND",
            format!("sh,-c,echo {printed}; echo helper is unhappy >&2; exit 3"),
        )
        .output()
        .expect("run keyrelay");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("key_command"), "{stderr}");
    assert!(stderr.contains("exited with status 3"), "{stderr}");
    assert!(stderr.contains("helper is unhappy"), "{stderr}");
    assert!(!stderr.contains(&printed), "stdout was quoted: {stderr}");
}

#[tokio::test]
async fn key_command_beside_key_file_is_refused() {
    let helper = Helper::new(60.0);
    let file = temp_file("key-command", "key", KEY);
    let mut sources = helper_sources("http://127.0.0.1:9", &helper);
    sources.set(
        "key_file",
        keyrelay::config::OverrideValue::Text(file.path().to_owned()),
    );
    let err = keyrelay::config::load(&sources).expect_err("two sources");
    assert!(
        err.to_string().contains("key_command: key_file is set too"),
        "{err}"
    );
}

/// The README's Credentials configs are valid settings (their helpers,
/// `op`, `vault`, `gcloud`, are replaced by one that prints a key: the
/// flags win over the file, as they would for a user).
#[test]
fn the_readme_credential_configs_load() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("## Credentials")
        .expect("a Credentials section");
    let section = &readme[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        // The OAuth2 ones load against a token endpoint (tests/it/oauth.rs),
        // the provider ones with their keys (tests/it/providers.rs).
        .filter(|block| !block.contains("oauth_token_url") && !block.contains("provider = "))
        .collect();
    assert!(blocks.len() >= 5, "{} toml blocks", blocks.len());
    for block in blocks {
        let file = temp_file("key-command", "readme.toml", block);
        let mut sources = sources("http://127.0.0.1:9", &[]);
        sources.file = Some(file.0.clone());
        sources.set(
            "key_command",
            keyrelay::config::OverrideValue::List(vec!["echo".into(), "k".into()]),
        );
        if let Err(err) = keyrelay::config::load(&sources) {
            panic!("README config does not load: {err}\n{block}");
        }
    }
}

#[tokio::test]
async fn sighup_runs_the_helper_now_as_it_rereads_key_files() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    // An hour's token: nothing but the signal would run the helper again.
    let helper = Helper::new(3600.0);
    let mut command = ops::command(&upstream.url);
    command
        .args(["--auth-template", "Bearer {key}"])
        .env("KEYRELAY_KEY_COMMAND", helper.argv().join(","));
    let relay = AdminRelay::spawn(command).await;
    relay.wait_for_sigterm_handler().await;
    assert_eq!(helper.runs(), 1, "the run at startup");
    relay.signal("HUP").await;
    ops::eventually("the helper to run again", || async {
        (helper.runs() == 2).then_some(())
    })
    .await;
    relay
        .wait_for_log("SIGHUP: refreshing the credential now", 1)
        .await;
    // The new token is sent once it is in place (the helper has printed it).
    let client = http1_client();
    ops::eventually("the second token upstream", || async {
        assert_eq!(get(&client, relay.url("/v1/models")).await.status(), 200);
        upstream.runs_seen().contains(&2).then_some(())
    })
    .await;
    assert!(upstream.rejected().is_empty(), "{:?}", upstream.rejected());
}

/// Whether process `pid` still runs (a zombie waiting for its reaper
/// counts as gone).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Whether process `pid` stops within a few seconds.
fn stops(pid: &str) -> bool {
    (0..300).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        !running(pid)
    })
}

/// Loads a configuration whose `key_command` is `sh -c script` (with
/// `key_command_timeout` = `timeout`): the outcome and how long it took.
fn load_with_script(
    script: &str,
    timeout: &str,
) -> (
    Result<keyrelay::config::Config, String>,
    std::time::Duration,
) {
    let mut sources = sources("http://127.0.0.1:9", &[("key_command_timeout", timeout)]);
    sources.set(
        "key_command",
        keyrelay::config::OverrideValue::List(vec!["sh".into(), "-c".into(), script.into()]),
    );
    let started = std::time::Instant::now();
    let loaded = keyrelay::config::load(&sources).map_err(|err| err.to_string());
    (loaded, started.elapsed())
}

/// A helper that hangs is killed at `key_command_timeout` with what it
/// started (`sh -c` runs its commands as children): nothing is left
/// running per attempt, however often the refresher tries again. One whose
/// leftover holds its stdout fails at the timeout, not at twice it, and
/// the leftover is stopped too.
#[cfg(target_os = "linux")]
#[test]
fn a_helper_is_stopped_with_everything_it_started() {
    let dir = unique_temp_path("key-command", "group");
    std::fs::create_dir_all(&dir).expect("dir");
    let pid_file = dir.join("pid");
    let pid_file = pid_file.to_str().expect("UTF-8 path");

    let (loaded, took) = load_with_script(&format!("sleep 300 & echo $! > {pid_file}; wait"), "1s");
    let err = loaded.expect_err("a hung helper");
    assert!(
        err.contains("did not finish within key_command_timeout"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    let pid = std::fs::read_to_string(pid_file)
        .expect("pid")
        .trim()
        .to_owned();
    assert!(stops(&pid), "the helper's child {pid} still runs");

    let (loaded, took) = load_with_script(
        &format!("echo {TOKEN_PREFIX}held; sleep 300 & echo $! > {pid_file}"),
        "1s",
    );
    let err = loaded.expect_err("stdout held open");
    assert!(err.contains("stdout stayed open"), "{err}");
    assert!(!err.contains(TOKEN_PREFIX), "{err}");
    assert!(took < std::time::Duration::from_millis(1900), "{took:?}");
    let pid = std::fs::read_to_string(pid_file)
        .expect("pid")
        .trim()
        .to_owned();
    assert!(stops(&pid), "the helper's child {pid} still runs");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A helper that leaves an agent running with its stderr (stdout closed)
/// has printed its key: the run succeeds at once, not at the timeout
/// (stderr is only for the log).
#[test]
fn a_leftover_holding_only_stderr_does_not_hold_up_the_run() {
    let (loaded, took) = load_with_script(
        &format!("echo {TOKEN_PREFIX}fine; sleep 5 > /dev/null &"),
        "5s",
    );
    loaded.expect("the key was printed");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
}

/// Asserts that a helper printing what `script` prints stops keyrelay
/// (exit 64) with a message holding each of `expected`, never quoting
/// what it printed.
fn assert_refused(script: &str, expected: &[&str]) {
    let (loaded, _) = load_with_script(script, "5s");
    let err = loaded.expect_err(script);
    assert!(
        expected.iter().all(|part| err.contains(part)),
        "{script}: {err}"
    );
    assert!(!err.contains(TOKEN_PREFIX), "{err}");
}

/// What a helper prints is checked before it goes in a header: a line
/// break or NUL (header injection) and non-ASCII (which `http` would send
/// as obs-text) alike stop keyrelay with exit 64 naming key_command, the
/// value never quoted.
#[test]
fn a_token_no_header_can_carry_is_refused_without_quoting_it() {
    for printed in [
        format!(r"printf '{TOKEN_PREFIX}a\r\nx-injected: 1'"),
        format!(r"printf '{TOKEN_PREFIX}a\000b'"),
        format!("printf '{TOKEN_PREFIX}caf\u{e9}'"),
        format!(r#"printf '{{"token": "{TOKEN_PREFIX}\u00e9"}}'"#),
    ] {
        let expected = [
            "key_command: the key from command sh",
            "not allowed in an HTTP header value",
        ];
        assert_refused(&printed, &expected);
    }
}

/// A value that expires within a second of being fetched is a failed
/// run (tried again after a backoff), not one refreshed as fast as the
/// helper answers: at startup, exit 64 naming key_command.
#[test]
fn a_token_that_lives_less_than_a_second_is_a_failed_run() {
    for expires_in in ["0.5", "0"] {
        let printed =
            format!(r#"echo '{{"token": "{TOKEN_PREFIX}short", "expires_in": {expires_in}}}'"#);
        let expected = [
            "key_command: its first run failed",
            "expires within a second",
        ];
        assert_refused(&printed, &expected);
    }
}

/// `jq .token` without `-r` prints the token in quotes: not sent quoted
/// (the upstream's 401 would be all the user saw) but reported.
#[test]
fn a_quoted_token_is_reported_not_sent_with_its_quotes() {
    for printed in [
        format!(r#"echo '"{TOKEN_PREFIX}quoted"'"#),
        format!(r#"echo '["{TOKEN_PREFIX}listed"]'"#),
    ] {
        assert_refused(&printed, &["key_command: its first run failed", "jq -r"]);
    }
}

//! The upstream key read from a file, rotated under load: new requests pick
//! up the new key (by polling and on SIGHUP) while a stream in flight keeps
//! going, an empty or broken file never replaces a working key, and a missing
//! or empty file at startup is a configuration error. Access-token files
//! rotate the same way, except that an unusable token file revokes its token.
//!
//! The watcher re-reads the file every `key_file::POLL_INTERVAL`. Where a
//! test shows that a bad file leaves the key alone, it first waits for the
//! watcher's log line saying it re-read that file and kept the previous key:
//! without it, "the old key is still in use" would also pass if the file had
//! never been read again.

use crate::support;

use crate::support::guard_util;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use guard_util::TempDir;
use http::Request;
use keyrelay::secrets::secret_file::POLL_INTERVAL;
use support::ops::AdminRelay;
use support::*;
use tokio::time::Instant;

/// Distinctive keys, so a leak scan can look for them.
const KEY_ONE: &str = "kr-file-key-one-51c9e2d7";
const KEY_TWO: &str = "kr-file-key-two-8a04f3b6";
const KEY_THREE: &str = "kr-file-key-three-2e7d90c1";

/// How long a rotation may take to show: a few poll intervals.
const ROTATION_LIMIT: Duration = Duration::from_secs(5);

/// Long enough for the watcher to have re-read the file at least twice.
fn over_two_polls() -> Duration {
    POLL_INTERVAL * 5 / 2
}

fn api_key(key: &str) -> String {
    format!("Api-Key {key}")
}

/// keyrelay (the binary, for its log) reading its key from `key_file`.
/// `BASETEN_API_KEY` is set too: the file must win over it.
async fn key_file_relay(upstream: &MockUpstream, key_file: &Path) -> AdminRelay {
    let mut command = support::ops::command(&upstream.url());
    command.arg("--key-file").arg(key_file);
    AdminRelay::spawn(command).await
}

/// Sends one request through keyrelay and returns the credential the upstream saw.
async fn injected(upstream: &mut MockUpstream, addr: SocketAddr) -> String {
    let request = Request::get(format!("http://{addr}/v1/models"))
        .body(empty())
        .expect("request");
    let (seen, response) = round_trip(&http1_client(), upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    let seen = header_values(&seen, "authorization");
    assert_eq!(seen.len(), 1, "exactly one credential: {seen:?}");
    seen[0].to_owned()
}

/// Sends requests until the upstream sees `new` (bounded by [`ROTATION_LIMIT`]);
/// until then every request must carry `old`, never anything else.
async fn wait_for_key(upstream: &mut MockUpstream, addr: SocketAddr, old: &str, new: &str) {
    let started = Instant::now();
    // Bounded: fails once ROTATION_LIMIT has passed.
    loop {
        let seen = injected(upstream, addr).await;
        if seen == api_key(new) {
            return;
        }
        assert_eq!(seen, api_key(old), "neither the old nor the new key");
        assert!(
            started.elapsed() < ROTATION_LIMIT,
            "the upstream still saw the old key {:?} after the file changed",
            started.elapsed()
        );
        // The change shows on the watcher's next poll (the behaviour under
        // test); space the probes out rather than spin.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `spoil` (which makes the key file unusable) and waits until keyrelay
/// logs that it re-read the file, found `problem` and kept the previous key:
/// the proof that what the test checks next follows a re-read.
///
/// The watcher logs a problem once, not again while it persists, so two
/// calls in a row must name different problems.
async fn kept_after_reread(relay: &AdminRelay, problem: &str, spoil: impl FnOnce()) {
    let line = format!("{problem}; keeping the previous key");
    let before = relay.process.log().matches(&line).count();
    spoil();
    relay.wait_for_log(&line, before + 1).await;
}

/// Replaces `path` atomically, as Kubernetes does when a Secret rotates.
fn replace_atomically(path: &Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).expect("write staged key");
    std::fs::rename(&staged, path).expect("rename over the key file");
}

async fn send_and_receive<B>(
    tx: &mut http_body_util::channel::Sender<Bytes, Box<dyn std::error::Error + Send + Sync>>,
    body: &mut B,
    frame: &'static str,
) where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    within(
        "the upstream to send a frame",
        tx.send_data(Bytes::from(frame)),
    )
    .await
    .expect("send frame");
    let got = next_data(body)
        .await
        .expect("a frame, not the end")
        .expect("data");
    assert_eq!(got, frame);
}

#[tokio::test]
async fn rotated_key_applies_to_new_requests_while_a_stream_keeps_going() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("key-rotation");
    let key_file = dir.write("api-key", &format!("{KEY_ONE}\n"));
    let relay = key_file_relay(&upstream, &key_file).await;

    // A stream opened with the first key.
    let client = http1_client();
    let pending = tokio::spawn(
        client.request(
            Request::post(relay.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(full(r#"{"stream":true}"#))
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    assert_eq!(
        exchange.request.headers()["authorization"],
        api_key(KEY_ONE).as_str(),
        "the file's key (newline trimmed), not BASETEN_API_KEY"
    );
    let (mut tx, mut dropped) = exchange.respond_streaming_with(
        http::Response::builder().header("content-type", "text/event-stream"),
    );
    let response = within("the stream's head", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    send_and_receive(&mut tx, &mut body, "data: one\n\n").await;

    // Rotate (a plain rewrite: the watcher may catch it half-written, which
    // must not matter) and wait for new requests to carry the new key.
    std::fs::write(&key_file, KEY_TWO).expect("rewrite key file");
    wait_for_key(&mut upstream, relay.addr(), KEY_ONE, KEY_TWO).await;

    // The first stream never noticed.
    assert!(!dropped.happened(), "rotation cut the stream in flight");
    send_and_receive(&mut tx, &mut body, "data: two\n\n").await;
    send_and_receive(&mut tx, &mut body, "data: three\n\n").await;
    drop(tx);
    let end = next_data(&mut body).await;
    assert!(end.is_none(), "stream should end cleanly, got {end:?}");

    // An empty file is a mistake, not a new key: keep using the last good one.
    kept_after_reread(&relay, "is empty", || {
        std::fs::write(&key_file, "").expect("empty the key file");
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            injected(&mut upstream, relay.addr()).await,
            api_key(KEY_TWO)
        );
    }
}

#[tokio::test]
async fn unusable_key_files_keep_the_previous_key_until_a_good_one_appears() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("key-unusable");
    let key_file = dir.write("api-key", &format!("{KEY_ONE}\n"));
    let relay = key_file_relay(&upstream, &key_file).await;
    assert_eq!(
        injected(&mut upstream, relay.addr()).await,
        api_key(KEY_ONE)
    );

    // Ordered so that no two cases in a row share a problem (see
    // kept_after_reread).
    const NOT_A_HEADER: &str = "contains characters that are not allowed in an HTTP header value \
                                (line breaks, control characters or non-ASCII)";
    for (what, contents, problem) in [
        ("whitespace only", Some(" \n\t\n"), "is empty"),
        (
            "two keys on two lines",
            Some("kr-a-key\nkr-b-key\n"),
            NOT_A_HEADER,
        ),
        ("deleted", None, "No such file or directory (os error 2)"),
        ("a control character", Some("kr-bad\u{7f}key"), NOT_A_HEADER),
    ] {
        kept_after_reread(&relay, problem, || match contents {
            Some(text) => std::fs::write(&key_file, text).expect("write key file"),
            None => std::fs::remove_file(&key_file).expect("remove key file"),
        })
        .await;
        assert_eq!(
            injected(&mut upstream, relay.addr()).await,
            api_key(KEY_ONE),
            "key file {what}: the previous key must stay in use"
        );
    }

    // The Kubernetes way: a new file renamed into place.
    replace_atomically(&key_file, &format!("{KEY_THREE}\n"));
    wait_for_key(&mut upstream, relay.addr(), KEY_ONE, KEY_THREE).await;
}

#[tokio::test]
async fn sighup_rereads_the_key_file_at_once() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("key-sighup");
    let key_file = dir.write("api-key", &format!("{KEY_ONE}\n"));
    let mut command = binary();
    // No BASETEN_API_KEY: the file alone is enough.
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.url()])
        .arg("--key-file")
        .arg(&key_file);
    let mut relay = RelayProcess::spawn(command).await;
    assert_eq!(injected(&mut upstream, relay.addr).await, api_key(KEY_ONE));

    // The once-a-second poll can see the new file between the write and the
    // SIGHUP on a loaded machine; then this round proves nothing about the
    // signal, so it goes again with the other key. A SIGHUP that does not
    // re-read loses every round.
    let pid = relay.child.id().expect("running").to_string();
    let mut by_signal = false;
    for (round, key) in [KEY_TWO, KEY_ONE, KEY_TWO, KEY_ONE].into_iter().enumerate() {
        std::fs::write(&key_file, key).expect("rewrite key file");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {pid} failed");

        let log = relay.wait_for_log("upstream key reloaded", round + 1).await;
        let hangup = log
            .match_indices("SIGHUP: re-reading the upstream key file")
            .nth(round)
            .map(|(at, _)| at);
        let reloaded = log
            .match_indices("upstream key reloaded")
            .nth(round)
            .map(|(at, _)| at)
            .expect("waited for above");
        assert_eq!(injected(&mut upstream, relay.addr).await, api_key(key));
        if hangup.is_some_and(|hangup| hangup < reloaded) {
            by_signal = true;
            break;
        }
        // The poll won this round: wait for the signal's own log line, so
        // the next round counts from a settled log.
        relay
            .wait_for_log("SIGHUP: re-reading the upstream key file", round + 1)
            .await;
    }
    assert!(
        by_signal,
        "in four rounds no reload followed its SIGHUP before a poll:\n{}",
        relay.log()
    );
    assert!(
        relay.child.try_wait().expect("try_wait").is_none(),
        "SIGHUP must not stop keyrelay"
    );

    relay.child.start_kill().expect("kill");
    let _ = relay.child.wait().await;
    let log = relay.log();
    for key in [KEY_ONE, KEY_TWO] {
        assert!(!log.contains(key), "a key appeared in the log:\n{log}");
    }
}

#[test]
fn missing_or_empty_key_file_at_startup_exits_64_naming_key_file() {
    let dir = TempDir::new("key-startup");
    let missing = dir.path().join("no-such-key");
    let empty = dir.write("empty-key", "");
    let blank = dir.write("blank-key", "\n  \n");
    for path in [&missing, &empty, &blank] {
        // BASETEN_API_KEY is set, but a configured key file must not fall back to it.
        let output = binary()
            .args(["--listen", "127.0.0.1:0", "--upstream", "https://a.test"])
            .arg("--key-file")
            .arg(path)
            .env("BASETEN_API_KEY", KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run keyrelay");
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{}: stderr {text}",
            path.display()
        );
        assert!(text.contains("key_file"), "{}: {text}", path.display());
        assert!(!text.contains(KEY), "{text}");
    }
}

// ---------------------------------------------------------------------------
// Access-token files rotate the same way
// ---------------------------------------------------------------------------

const TOKEN_ONE: &str = "kr-token-one-5d1f0a9c7e";
const TOKEN_TWO: &str = "kr-token-two-3b8e6c2f41";

/// Sends one request with `Authorization: Bearer token`; returns the status
/// the client got, answering for the upstream when the request reached it.
async fn status_with_token(upstream: &mut MockUpstream, addr: SocketAddr, token: &str) -> u16 {
    let client = http1_client();
    let mut pending = tokio::spawn(
        client.request(
            Request::get(format!("http://{addr}/v1/models"))
                .header("authorization", format!("Bearer {token}"))
                .body(empty())
                .expect("request"),
        ),
    );
    let response = tokio::select! {
        response = &mut pending => response,
        exchange = upstream.next() => {
            let seen = exchange.request.headers()["authorization"].clone();
            assert_eq!(seen, api_key(KEY).as_str(), "the token must not reach the upstream");
            exchange.respond_full(200, "ok");
            within("the response", pending).await
        }
    };
    response.expect("join").expect("response").status().as_u16()
}

/// Sends requests until `old` is refused (bounded by [`ROTATION_LIMIT`]),
/// then checks that `new` is accepted. Until the reload `old` works; probing
/// it first leaves no window in which a reload between two probes could look
/// like a failure, since reloads only go one way.
async fn wait_for_token(upstream: &mut MockUpstream, addr: SocketAddr, old: &str, new: &str) {
    let started = Instant::now();
    // Bounded: fails once ROTATION_LIMIT has passed.
    while status_with_token(upstream, addr, old).await == 200 {
        assert!(
            started.elapsed() < ROTATION_LIMIT,
            "the old token still worked {:?} after the file changed",
            started.elapsed()
        );
        // The change shows on the watcher's next poll; space the probes out.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status_with_token(upstream, addr, new).await,
        200,
        "the old token is refused, so the new one must be accepted"
    );
}

#[tokio::test]
async fn rotated_access_token_file_applies_without_a_restart() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("token-rotation");
    let token_file = dir.write("frontend", &format!("{TOKEN_ONE}\n"));
    let relay = Relay::start(
        &upstream.url(),
        &[(
            "access_token_files",
            token_file.to_str().expect("UTF-8 path"),
        )],
    )
    .await;
    assert_eq!(
        status_with_token(&mut upstream, relay.addr, TOKEN_ONE).await,
        200
    );
    assert_eq!(
        status_with_token(&mut upstream, relay.addr, TOKEN_TWO).await,
        401
    );

    // The Kubernetes way: a new file renamed into place.
    replace_atomically(&token_file, &format!("{TOKEN_TWO}\n"));
    wait_for_token(&mut upstream, relay.addr, TOKEN_ONE, TOKEN_TWO).await;

    // Emptying or deleting the file revokes the token, and so does a value
    // that cannot be a token: a leaked token must not outlive its file.
    for (what, contents) in [
        ("too short", Some("short-token\n")),
        ("two words", Some("kr-token two-words-77\n")),
        ("empty", Some("")),
        ("deleted", None),
    ] {
        replace_atomically(&token_file, &format!("{TOKEN_TWO}\n"));
        wait_for_status(&mut upstream, relay.addr, TOKEN_TWO, 200).await;
        match contents {
            Some(text) => std::fs::write(&token_file, text).expect("write token file"),
            None => std::fs::remove_file(&token_file).expect("remove token file"),
        }
        wait_for_status(&mut upstream, relay.addr, TOKEN_TWO, 401).await;
        if let Some(text) = contents.filter(|text| !text.trim().is_empty()) {
            assert_eq!(
                status_with_token(&mut upstream, relay.addr, text.trim()).await,
                401,
                "token file {what}: its content must not become a token"
            );
        }
    }
    relay.stop().await;
}

/// Sends `token` until it gets `status` (bounded by [`ROTATION_LIMIT`]): the
/// watcher applies a file change on its next poll.
async fn wait_for_status(upstream: &mut MockUpstream, addr: SocketAddr, token: &str, status: u16) {
    let started = Instant::now();
    // Bounded: fails once ROTATION_LIMIT has passed.
    while status_with_token(upstream, addr, token).await != status {
        assert!(
            started.elapsed() < ROTATION_LIMIT,
            "token still not answered {status} {:?} after its file changed",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Files that are not regular files, and reads off the control thread
// ---------------------------------------------------------------------------

/// Makes a FIFO (named pipe) at `path`: opening it for reading blocks until
/// a writer comes, which none ever does here.
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[tokio::test]
async fn a_fifo_directory_or_device_as_a_secret_file_exits_64_at_once_naming_the_setting() {
    let dir = TempDir::new("key-special");
    let fifo = dir.path().join("key-fifo");
    mkfifo(&fifo);
    let directory = dir.path().join("key-dir");
    std::fs::create_dir(&directory).expect("dir");
    let device = Path::new("/dev/zero");
    let cases = [
        ("--key-file", "key_file", &fifo, "FIFO"),
        ("--key-file", "key_file", &directory, "directory"),
        ("--key-file", "key_file", &device.to_path_buf(), "device"),
        ("--access-token-files", "access_token_files", &fifo, "FIFO"),
    ];
    for (flag, setting, path, kind) in cases {
        let mut command = tokio::process::Command::from(binary());
        command
            .args(["--listen", "127.0.0.1:0", "--upstream", "https://a.test"])
            .arg(flag)
            .arg(path)
            .env("BASETEN_API_KEY", KEY)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let output = within("keyrelay to refuse the file", command.output())
            .await
            .expect("run keyrelay");
        let text = String::from_utf8_lossy(&output.stderr);
        let what = format!("{setting} = {}", path.display());
        assert_eq!(output.status.code(), Some(64), "{what}: stderr {text}");
        assert!(
            text.contains(setting) && text.contains("not a regular file") && text.contains(kind),
            "{what}: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: refused at once, not after a blocked read: {:?}",
            started.elapsed()
        );
        support::reliability::report(
            "issue23",
            &[
                &format!("a {kind} as {setting} at startup"),
                &format!(
                    "exit 64 in {} ms naming {setting}",
                    started.elapsed().as_millis()
                ),
            ],
        );
    }
}

#[tokio::test]
async fn a_key_file_swapped_for_a_fifo_keeps_the_key_and_the_control_plane_answers() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("key-fifo-reload");
    let key_file = dir.write("api-key", &format!("{KEY_ONE}\n"));
    let relay = key_file_relay(&upstream, &key_file).await;
    assert_eq!(
        injected(&mut upstream, relay.addr()).await,
        api_key(KEY_ONE)
    );

    // A FIFO renamed over the key file: the next re-read must neither block
    // the thread that serves signals and the admin port nor drop the key.
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    std::fs::rename(&fifo, &key_file).expect("rename the FIFO into place");

    // Over two polls, the admin port answers at once every time.
    let until = Instant::now() + over_two_polls();
    while Instant::now() < until {
        let asked = Instant::now();
        let health = relay.admin("GET", "/healthz").await;
        assert_eq!(health.status(), 200);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "/healthz took {:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The watcher said why, and is not stuck in the FIFO.
    relay.wait_for_log("not a regular file", 1).await;
    let log = relay.wait_for_log("keeping the previous key", 1).await;
    assert!(log.contains("FIFO"), "{log}");
    assert_eq!(
        injected(&mut upstream, relay.addr()).await,
        api_key(KEY_ONE)
    );
    support::reliability::report(
        "issue23",
        &[
            "key_file replaced by a FIFO while running",
            "previous key kept; /healthz answered within 1 s throughout; SIGHUP handled",
        ],
    );

    // SIGHUP is still handled, and a good file is picked up again.
    relay.signal("HUP").await;
    relay
        .wait_for_log("SIGHUP: re-reading the upstream key file", 1)
        .await;
    replace_atomically(&key_file, &format!("{KEY_TWO}\n"));
    wait_for_key(&mut upstream, relay.addr(), KEY_ONE, KEY_TWO).await;
}

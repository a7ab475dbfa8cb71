//! systemd socket activation (deploy/systemd/keyrelay.socket): the binary
//! is started as systemd starts it, with a listening socket the test bound
//! as fd 3, `LISTEN_FDS=1` and `LISTEN_PID` set to its own pid, and serves
//! on that socket instead of binding `listen`.

use std::os::fd::OwnedFd;
use std::process::Stdio;

use crate::support::raw;
use crate::support::{binary, within, MockUpstream, RelayProcess, EXPECTED_AUTH, KEY};

/// `command` (from [`binary`]) run as systemd runs a socket-activated
/// service: the socket given to its standard input becomes fd 3, with
/// `LISTEN_FDS=1` and `LISTEN_PID` the pid of the process that runs keyrelay.
///
/// That pid is known only in the child, and std builds the child's
/// environment before it forks, so `sh` sets it (`$$` is the shell's pid,
/// which `exec` keeps) and moves the socket from stdin to fd 3: placing a
/// descriptor in the child from Rust would need `pre_exec`, which is unsafe,
/// and the crate forbids unsafe code.
fn activated(command: &std::process::Command) -> std::process::Command {
    let mut shell = std::process::Command::new("/bin/sh");
    shell
        .args([
            "-c",
            r#"exec 3<&0 0</dev/null; LISTEN_PID=$$ exec "$0" "$@""#,
        ])
        .arg(command.get_program())
        .args(command.get_args())
        .env_clear()
        .env("LISTEN_FDS", "1");
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            shell.env(name, value);
        }
    }
    shell
}

/// keyrelay's command line against `upstream`, told to listen on `listen`.
fn keyrelay(upstream: &MockUpstream, listen: &str) -> std::process::Command {
    let mut command = binary();
    command
        .args(["--listen", listen, "--upstream", &upstream.url()])
        .args(["--warm-connections", "0"])
        .env("BASETEN_API_KEY", KEY);
    command
}

/// `listen` names the very port the passed socket holds, so a keyrelay
/// that bound `listen` instead of taking fd 3 would fail at startup
/// ("address in use"): serving at all shows it took the socket.
#[tokio::test]
async fn serves_on_the_socket_systemd_passes_instead_of_binding_listen() {
    let mut upstream = MockUpstream::start().await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    let command = activated(&keyrelay(&upstream, &addr.to_string()));
    // Moved into the child: a copy left here could take queued connections.
    let stdin = Stdio::from(OwnedFd::from(socket));
    let relay = RelayProcess::spawn_with_stdin(command, stdin).await;
    assert_eq!(relay.addr, addr, "the ready line names the passed socket");
    relay.wait_for_log("socket activation", 1).await;

    let pending = tokio::spawn(raw::get(addr, "/v1/models"));
    let exchange = upstream.next().await;
    let auth = exchange.request.headers().get("authorization").cloned();
    exchange.respond_full(200, "models");
    let response = within("the answer", pending).await.expect("join");
    assert_eq!(response.status(), 200, "{}", response.describe());
    assert_eq!(
        auth.as_ref().and_then(|value| value.to_str().ok()),
        Some(EXPECTED_AUTH),
        "the key was added upstream"
    );
}

/// Variables inherited from a socket-activated parent name the parent's
/// pid, not this process's: they are not for it, and it binds `listen`.
#[tokio::test]
async fn listen_fds_meant_for_another_process_are_ignored() {
    let upstream = MockUpstream::start().await;
    let mut command = keyrelay(&upstream, "127.0.0.1:0");
    command.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let relay = RelayProcess::spawn(command).await;
    assert_ne!(relay.addr.port(), 0);
    let log = relay.wait_for_log("keyrelay ready", 1).await;
    assert!(!log.contains("socket activation"), "{log}");
}

/// Runs keyrelay activated with `socket` as fd 3, expects it to stop at
/// startup with exit status 64 (EX_USAGE), and returns its stderr.
async fn refused_at_startup(socket: OwnedFd) -> String {
    let upstream = MockUpstream::start().await;
    let activated = activated(&keyrelay(&upstream, "127.0.0.1:0"));
    let mut command = tokio::process::Command::from(activated);
    command.stdin(Stdio::from(socket));
    let output = within("keyrelay to refuse the socket", command.output())
        .await
        .expect("run keyrelay");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(64),
        "exit status; stderr: {stderr}"
    );
    stderr
}

/// `Accept=yes` or a `ListenStream=/path` passes something keyrelay cannot
/// serve on: startup stops and says what it got and what to change.
#[tokio::test]
async fn a_passed_socket_that_is_not_a_listening_tcp_socket_is_refused() {
    let path = crate::support::unique_temp_path("activation", "k.sock");
    let unix = std::os::unix::net::UnixListener::bind(&path).expect("bind unix");
    let stderr = refused_at_startup(OwnedFd::from(unix)).await;
    let _ = std::fs::remove_file(&path);
    assert!(
        stderr.contains("socket activation") && stderr.contains("not a TCP socket"),
        "the error says what was passed: {stderr}"
    );
}

/// A socket unit cannot put keyrelay on the network where `listen` could
/// not: a passed socket on every interface, with no access tokens, is
/// refused as `listen = "0.0.0.0:PORT"` would be.
#[tokio::test]
async fn a_passed_socket_beyond_loopback_needs_access_tokens_as_listen_does() {
    let socket = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let stderr = refused_at_startup(OwnedFd::from(socket)).await;
    assert!(
        stderr.contains("0.0.0.0:") && stderr.contains("reachable from other machines"),
        "the error names the passed socket's address: {stderr}"
    );
}

//! `--listen unix:/path`: keyrelay serves on a Unix domain socket with the
//! configured file mode, streams through it, and removes the file on exit.

use crate::support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Waits (bounded) until `path` is a socket: keyrelay has bound it.
async fn wait_for_socket(path: &std::path::Path) {
    within("the socket file", async {
        loop {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                return;
            }
            // Polling a file: there is no event to wait on from another process.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn streams_over_a_unix_socket_with_its_file_mode_and_cleans_up() {
    let mut upstream = MockUpstream::start().await;
    let dir = support::unique_temp_path("unix", "dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("keyrelay.sock");

    let mut command = tokio::process::Command::from(binary());
    command
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--unix-socket-mode", "0640", "--upstream", &upstream.url()])
        .env("BASETEN_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn keyrelay");
    wait_for_socket(&socket).await;
    let mode = std::fs::metadata(&socket)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "socket file mode");

    let mut client = UnixStream::connect(&socket).await.expect("connect");
    client
        .write_all(
            b"POST /production/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await
        .expect("write");
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.headers()["authorization"], EXPECTED_AUTH);
    let (mut tx, _dropped) = exchange.respond_streaming();

    // Lockstep through the socket: token k+1 only after token k arrived.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    for k in 0..5 {
        let token = format!("tok{k}");
        tx.send_data(Bytes::from(token.clone()))
            .await
            .expect("send");
        within("the token through the unix socket", async {
            while !String::from_utf8_lossy(&seen).contains(&token) {
                let n = client.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed early");
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await;
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(tx);
    drop(client);

    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = within("keyrelay to exit", child.wait())
        .await
        .expect("wait");
    assert!(exit.success(), "{exit}");
    assert!(!socket.exists(), "the socket file is removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// keyrelay on `unix:SOCKET` in front of `upstream`, its output discarded.
fn unix_keyrelay(socket: &std::path::Path, upstream: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(binary());
    command
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--upstream", upstream])
        .env("BASETEN_API_KEY", KEY)
        .kill_on_drop(true);
    command
}

/// Runs a keyrelay that must refuse to start; returns its exit code and stderr.
async fn refused(socket: &std::path::Path, upstream: &str) -> (Option<i32>, String) {
    let mut command = unix_keyrelay(socket, upstream);
    command.stdin(Stdio::null());
    let output = within("keyrelay to refuse the path", command.output())
        .await
        .expect("run keyrelay");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// One GET through the socket, answered by the mock upstream; the status.
async fn get_through(socket: &std::path::Path, upstream: &mut MockUpstream) -> String {
    let mut client = UnixStream::connect(socket).await.expect("connect");
    client
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    upstream.next().await.respond_full(200, "models");
    let mut answer = Vec::new();
    within("the answer", client.read_to_end(&mut answer))
        .await
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_second_keyrelay_on_a_live_unix_socket_exits_69_and_leaves_it_alone() {
    let mut upstream = MockUpstream::start().await;
    let dir = support::unique_temp_path("unix-live", "dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("keyrelay.sock");

    let mut first = unix_keyrelay(&socket, &upstream.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the first keyrelay");
    wait_for_socket(&socket).await;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&socket).expect("meta"));

    let (code, stderr) = refused(&socket, &upstream.url()).await;
    assert_eq!(
        code,
        Some(69),
        "EX_UNAVAILABLE, as a TCP port in use; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&socket.display().to_string()) && stderr.contains("listening"),
        "the message names the path and why: {stderr}"
    );

    // The first keyrelay keeps its socket and its clients.
    let same = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&socket).expect("meta"));
    assert_eq!(same, inode, "the socket file was not replaced");
    let answer = get_through(&socket, &mut upstream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    support::reliability::report(
        "issue23",
        &[
            "a second keyrelay on the same live unix: path",
            "exit 69 naming the path; the first keeps its socket and serves",
        ],
    );

    first.start_kill().expect("kill");
    let _ = within("the first keyrelay to exit", first.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let mut upstream = MockUpstream::start().await;
    let dir = support::unique_temp_path("unix-stale", "dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("keyrelay.sock");
    // A socket file nothing listens on: what a killed run leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a stale socket"));
    assert!(socket.exists());

    let mut relay = unix_keyrelay(&socket, &upstream.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keyrelay");
    within("keyrelay to serve on the replaced socket", async {
        loop {
            if let Ok(mut probe) = UnixStream::connect(&socket).await {
                drop(probe.shutdown().await);
                break;
            }
            // Polling a file another process creates: no event to wait on.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let answer = get_through(&socket, &mut upstream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    relay.start_kill().expect("kill");
    let _ = within("keyrelay to exit", relay.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_refused_and_kept() {
    let upstream = MockUpstream::start().await;
    let dir = support::unique_temp_path("unix-file", "dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("keyrelay.sock");
    std::fs::write(&socket, "not a socket").expect("write");

    let (code, stderr) = refused(&socket, &upstream.url()).await;
    assert_eq!(code, Some(69), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&socket.display().to_string()) && stderr.contains("not a socket"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&socket).expect("still there"),
        "not a socket"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn keyrelay_leaves_a_socket_another_process_put_at_its_path_on_exit() {
    let upstream = MockUpstream::start().await;
    let dir = support::unique_temp_path("unix-taken", "dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("keyrelay.sock");
    let mut relay = unix_keyrelay(&socket, &upstream.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keyrelay");
    wait_for_socket(&socket).await;

    // Another server renames its own socket over the path.
    let other_path = dir.join("other.sock");
    let other = std::os::unix::net::UnixListener::bind(&other_path).expect("bind other");
    std::fs::rename(&other_path, &socket).expect("rename over");

    let pid = relay.id().expect("running");
    support::ops::eventually("keyrelay to handle SIGTERM", || {
        let caught = support::catches_signal(pid, support::ops::SIGTERM);
        async move { caught.then_some(()) }
    })
    .await;
    let pid = pid.to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = within("keyrelay to exit", relay.wait())
        .await
        .expect("wait");
    assert!(exit.success(), "{exit}");
    assert!(
        socket.exists(),
        "keyrelay removed a socket file that was no longer its own"
    );
    // It is still the other server's, and it still answers.
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    drop(other);
    let _ = std::fs::remove_dir_all(&dir);
}

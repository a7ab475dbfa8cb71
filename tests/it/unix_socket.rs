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

//! WebSockets through keyrelay: the upgrade request carries the injected key
//! with `Upgrade: websocket` and `Connection: upgrade` kept on purpose, and
//! after `101` bytes flow both ways, in lockstep, until a side closes.
//! Raw sockets on both ends, so nothing but keyrelay touches the handshake.
//!
//! keyrelay forwards no other upgrade: `h2c` and the like lose their
//! `Upgrade` header as hop-by-hop (`requested_upgrade` in
//! src/proxy/headers.rs; `h2c_upgrade_is_not_forwarded_as_a_protocol_switch`
//! in security.rs).

use crate::support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const HANDSHAKE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Reads until the end of an HTTP head and returns it (lowercased for header checks).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    within("an HTTP head", async {
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read head");
            assert!(n == 1, "connection closed inside the head: {head:?}");
            head.push(byte[0]);
        }
    })
    .await;
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// A WebSocket-ish upstream: answers 101, then echoes each read uppercased.
/// Sends its received handshake head, then reports when the client side closed.
async fn echo_upstream() -> (String, oneshot::Receiver<String>, oneshot::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (head_tx, head_rx) = oneshot::channel();
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let head = read_head(&mut stream).await;
        let _ = head_tx.send(head);
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .await
            .expect("write 101");
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let upper = buf[..n].to_ascii_uppercase();
                    if stream.write_all(&upper).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = closed_tx.send(());
    });
    (url, head_rx, closed_rx)
}

#[tokio::test]
async fn websocket_upgrade_carries_the_key_and_splices_both_ways() {
    let (upstream, head, closed) = echo_upstream().await;
    let relay = Relay::start(&upstream, &[]).await;

    let mut client = TcpStream::connect(relay.addr).await.expect("connect");
    client
        .write_all(
            format!(
                "GET /environments/production/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                 Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\nSec-WebSocket-Version: 13\r\n\
                 Authorization: Bearer browser-placeholder\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write handshake");

    let upstream_head = within("the upgrade request upstream", head)
        .await
        .expect("head");
    assert!(upstream_head.starts_with("get /environments/production/websocket http/1.1"));
    assert!(upstream_head.contains(&format!(
        "authorization: {}",
        EXPECTED_AUTH.to_ascii_lowercase()
    )));
    assert!(!upstream_head.contains("placeholder"), "{upstream_head}");
    assert!(
        upstream_head.contains("upgrade: websocket"),
        "{upstream_head}"
    );
    assert!(
        upstream_head.contains("connection: upgrade"),
        "{upstream_head}"
    );
    assert!(
        upstream_head.contains(&HANDSHAKE_KEY.to_ascii_lowercase()),
        "{upstream_head}"
    );

    let response_head = read_head(&mut client).await;
    assert!(response_head.starts_with("http/1.1 101"), "{response_head}");
    assert!(
        response_head.contains("upgrade: websocket"),
        "{response_head}"
    );
    assert!(
        response_head.contains("connection: upgrade"),
        "{response_head}"
    );
    assert!(
        response_head.contains("sec-websocket-accept:"),
        "{response_head}"
    );

    // Lockstep: message k+1 is sent only after the echo of message k came back.
    let mut buf = [0u8; 64];
    for k in 0..5 {
        let message = format!("message {k}");
        client.write_all(message.as_bytes()).await.expect("send");
        let mut got = Vec::new();
        while got.len() < message.len() {
            let n = within("the echo", client.read(&mut buf))
                .await
                .expect("read");
            assert!(n > 0, "tunnel closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, message.to_ascii_uppercase().as_bytes());
    }

    // The client closing reaches the upstream, and the upstream's close comes back.
    client.shutdown().await.expect("shutdown");
    within("the upstream to see the close", closed)
        .await
        .expect("closed");
    let n = within("the tunnel to close", client.read(&mut buf))
        .await
        .expect("read");
    assert_eq!(n, 0, "the client sees the tunnel closed");
    relay.stop().await;
}

#[tokio::test]
async fn upgrade_refused_by_upstream_is_relayed_as_a_normal_response() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut client = TcpStream::connect(relay.addr).await.expect("connect");
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .expect("write");
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.headers()["upgrade"], "websocket");
    exchange.respond_full(426, r#"{"error": "websocket not enabled"}"#);
    let head = read_head(&mut client).await;
    assert!(head.starts_with("http/1.1 426"), "{head}");
    relay.stop().await;
}

#[tokio::test]
async fn open_websocket_is_cut_when_the_shutdown_grace_ends() {
    let (upstream, head, _closed) = echo_upstream().await;
    let relay = Relay::start(&upstream, &[("shutdown_grace", "300ms")]).await;
    let mut client = TcpStream::connect(relay.addr).await.expect("connect");
    client
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {HANDSHAKE_KEY}\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write handshake");
    within("the upgrade request upstream", head)
        .await
        .expect("head");
    assert!(read_head(&mut client).await.starts_with("http/1.1 101"));

    // The tunnel is idle but open; shutdown waits for it up to the grace
    // period (the behaviour under test), then cuts it instead of hanging.
    relay.stop().await;
    let mut buf = [0u8; 16];
    let n = within("the tunnel to be cut", client.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "the client sees the tunnel closed");
}

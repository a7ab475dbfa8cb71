//! A real WebSocket stack on both ends of keyrelay: the Python `websockets`
//! package as the client (connecting to
//! `ws://127.0.0.1:PORT/environments/production/websocket`, Baseten's path)
//! and as the upstream server, each a child process.
//!
//! The server accepts the upgrade only if its `Authorization` header is
//! exactly keyrelay's injected key, then echoes. The test drives the client
//! through its stdin in lockstep: it sends message k+1 only after the server
//! has printed message k and the client has printed its echo. The client then
//! closes with 1000, and both ends must see a clean close handshake. A
//! control test shows the server refuses the client when it skips keyrelay.

use crate::support;
use crate::support::python;

use python::Script;
use support::*;

const PATH: &str = "/environments/production/websocket";

/// Starts the Python WebSocket upstream and returns it with its URL.
async fn echo_server() -> (Script, u16) {
    let mut server = Script::spawn("ws_echo_server.py", &[EXPECTED_AUTH]);
    let port = server.started("port").await.parse().expect("a port number");
    (server, port)
}

#[tokio::test]
async fn websockets_client_exchanges_messages_in_lockstep_and_closes_cleanly() {
    let (mut server, port) = echo_server().await;
    let relay = Relay::start(&format!("http://127.0.0.1:{port}"), &[]).await;
    let mut client = Script::spawn(
        "ws_echo_client.py",
        &[&format!("ws://{}{PATH}", relay.addr)],
    );

    let accepted = format!("accepted {PATH}");
    client
        .while_running("the upgrade at the server", server.expect_line(&accepted))
        .await;
    client.expect_line("open").await;
    let messages = [
        "first token",
        "second token",
        "{\"json\": [1, 2, 3]}",
        "héllo wörld ✓",
        "last token",
    ];
    for message in messages {
        client.send_line(message).await;
        server.expect_line(&format!("received {message}")).await;
        client.expect_line(&format!("echo: {message}")).await;
    }

    // End of stdin: the client sends a close frame, 1000 "done".
    client.close_stdin();
    server.expect_line("closed 1000 done").await;
    client.expect_line("closed 1000").await;
    client.success().await;
    relay.stop().await;
}

/// Control: the server's credential check is not vacuous. The same client
/// connecting straight to the server, with its placeholder, is refused.
#[tokio::test]
async fn server_refuses_the_client_when_it_skips_keyrelay() {
    let (mut server, port) = echo_server().await;
    let mut client = Script::spawn(
        "ws_echo_client.py",
        &[&format!("ws://127.0.0.1:{port}{PATH}")],
    );

    client
        .while_running("the upgrade at the server", server.expect_line("rejected"))
        .await;
    client.expect_line("rejected 401").await;
    client.success().await;
}

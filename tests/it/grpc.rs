//! gRPC through keyrelay with `grpcio` on both ends, as the README's `grpc`
//! route describes: the client speaks plaintext HTTP/2 (h2c prior knowledge)
//! to keyrelay, which injects `baseten-authorization: Api-Key <key>` and
//! forwards over HTTP/2 + TLS to the upstream, trusting a test CA given as
//! `ca_file`.
//!
//! The upstream is a Python `grpcio` server with a certificate for
//! `localhost` from a per-test CA, serving one server-streaming method on raw
//! bytes. It sends each message only after the test writes a line to its
//! stdin, and the test writes line k+1 only after the client process has
//! printed message k: a proxy that buffered messages would stall the test.
//! The client must then see the call's trailers: its status (OK, or the code
//! the server aborted with) and trailing metadata.

use crate::support;
use crate::support::python;
use crate::support::tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use keyrelay::config::{self, Sources};
use python::Script;
use support::*;
use tls::{TempFile, TestCa};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A uniquely named temporary file holding `contents`, removed on drop.
fn temp_file(name: &str, contents: &[u8]) -> TempFile {
    let path = support::unique_temp_path("grpc", name);
    std::fs::write(&path, contents).expect("write temp file");
    TempFile(path)
}

/// The Python gRPC server over TLS, and the CA keyrelay must trust for it.
struct GrpcUpstream {
    server: Script,
    port: u16,
    ca_file: TempFile,
    _cert_and_key: [TempFile; 2],
}

impl GrpcUpstream {
    async fn start() -> Self {
        let ca = TestCa::new();
        let cert = ca.issue(&["localhost"]);
        let cert_file = temp_file("cert.der", &cert.chain[0]);
        let key_file = temp_file("key.der", cert.key.secret_der());
        let mut server = Script::spawn(
            "grpc_server.py",
            &[cert_file.path(), key_file.path(), EXPECTED_AUTH],
        );
        let port = server.started("port").await.parse().expect("a port number");
        Self {
            server,
            port,
            ca_file: ca.write_pem_file(),
            _cert_and_key: [cert_file, key_file],
        }
    }

    /// The route table: one HTTP/2 route at `/` with the key in `auth_header`.
    fn config(&self, auth_header: &str) -> String {
        format!(
            r#"
ca_file = "{ca_file}"

[[routes]]
name = "grpc"
prefix = "/"
upstream = "https://localhost:{port}"
http2 = true
key_env = "BASETEN_API_KEY"
auth_header = "{auth_header}"
auth_template = "Api-Key {{key}}"
"#,
            ca_file = self.ca_file.path(),
            port = self.port,
        )
    }
}

/// keyrelay started in-process from a TOML route table.
struct GrpcRelay {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _config: TempFile,
}

impl GrpcRelay {
    async fn start(toml: &str) -> Self {
        let file = temp_file("keyrelay.toml", toml.as_bytes());
        let sources = Sources {
            file: Some(PathBuf::from(file.path())),
            env: HashMap::from([("BASETEN_API_KEY".to_owned(), KEY.to_owned())]),
            ..Sources::default()
        };
        let config = config::load(&sources).expect("valid gRPC route table");
        assert!(config
            .routes
            .iter()
            .all(|route| route.http == keyrelay::config::UpstreamHttp::Http2));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(keyrelay::run(config, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
            _config: file,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("keyrelay to stop", &mut self.task)
            .await
            .expect("join")
            .expect("run");
    }
}

/// Starts the client calling keyrelay with `request` over h2c.
fn call_through(relay: &GrpcRelay, request: &str) -> Script {
    Script::spawn("grpc_client.py", &[&relay.addr.to_string(), request])
}

/// Releases `count` messages one at a time, each only after the client
/// printed the previous one.
async fn lockstep(upstream: &mut GrpcUpstream, client: &mut Script, count: usize) {
    for k in 0..count {
        upstream.server.send_line("next").await;
        client.expect_line(&format!("message token {k}")).await;
    }
}

/// Reads the client's `trailer KEY=VALUE` lines up to its `status ...` line.
async fn trailers_and_status(client: &mut Script) -> (Vec<String>, String) {
    let mut trailers = Vec::new();
    loop {
        let line = client.line("the call's trailers and status").await;
        match line.strip_prefix("trailer ") {
            Some(trailer) => trailers.push(trailer.to_owned()),
            None => return (trailers, line),
        }
    }
}

#[tokio::test]
async fn grpc_server_stream_arrives_message_by_message_with_ok_trailers() {
    let mut upstream = GrpcUpstream::start().await;
    let relay = GrpcRelay::start(&upstream.config("baseten-authorization")).await;
    let mut client = call_through(&relay, "stream 6");

    client
        .while_running(
            "the call at the server",
            upstream.server.expect_line("call stream 6"),
        )
        .await;
    lockstep(&mut upstream, &mut client, 6).await;
    let (trailers, status) = trailers_and_status(&mut client).await;
    assert_eq!(status, "status OK");
    assert_eq!(
        trailers,
        ["x-tokens-sent=6"],
        "the server's trailing metadata"
    );
    client.success().await;
    relay.stop().await;
}

#[tokio::test]
async fn grpc_error_status_after_messages_reaches_the_client() {
    let mut upstream = GrpcUpstream::start().await;
    let relay = GrpcRelay::start(&upstream.config("baseten-authorization")).await;
    let mut client = call_through(&relay, "abort-after 2 RESOURCE_EXHAUSTED");

    let call = upstream
        .server
        .expect_line("call abort-after 2 RESOURCE_EXHAUSTED");
    client.while_running("the call at the server", call).await;
    lockstep(&mut upstream, &mut client, 2).await;
    let (trailers, status) = trailers_and_status(&mut client).await;
    assert_eq!(status, "status RESOURCE_EXHAUSTED stopped by the test");
    assert_eq!(
        trailers,
        ["x-tokens-sent=2"],
        "the server's trailing metadata"
    );
    client.success().await;
    relay.stop().await;
}

/// The key in the wrong header: the server refuses the call before sending
/// anything (a "trailers-only" response, where grpc-status travels in the
/// only HEADERS frame), and the client must see exactly that status. This
/// also shows the server's credential check can fail.
#[tokio::test]
async fn grpc_trailers_only_rejection_reaches_the_client() {
    let mut upstream = GrpcUpstream::start().await;
    let relay = GrpcRelay::start(&upstream.config("authorization")).await;
    let mut client = call_through(&relay, "stream 1");

    let rejected = upstream.server.expect_line("rejected");
    client
        .while_running("the call at the server", rejected)
        .await;
    // A trailers-only response has one HEADERS frame, so the client reports
    // the response headers (date, x-request-id, ...) as trailing metadata.
    let (_headers, status) = trailers_and_status(&mut client).await;
    assert_eq!(
        status,
        "status UNAUTHENTICATED wrong or missing baseten-authorization"
    );
    client.success().await;
    relay.stop().await;
}

/// Control: the client calling the upstream directly over TLS (trusting the
/// test CA), with only its placeholder, is refused: the check is not vacuous.
#[tokio::test]
async fn grpc_server_refuses_the_client_when_it_skips_keyrelay() {
    let mut upstream = GrpcUpstream::start().await;
    let target = format!("localhost:{}", upstream.port);
    let mut client = Script::spawn(
        "grpc_client.py",
        &[&target, "stream 1", upstream.ca_file.path()],
    );

    let rejected = upstream.server.expect_line("rejected");
    client
        .while_running("the call at the server", rejected)
        .await;
    client
        .expect_line("status UNAUTHENTICATED wrong or missing baseten-authorization")
        .await;
    client.success().await;
}

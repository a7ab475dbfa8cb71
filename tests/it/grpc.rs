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
//!
//! The `grpc_shortcut_*` tests build keyrelay's config the way `--model ID
//! --grpc` does (settings `model`, `grpc`, and `environment` or
//! `deployment`), check that the route aims at
//! `https://model-ID.grpc.api.baseten.co`, then point that route at the local
//! server ([`aim_shortcut_at`], the one place these tests touch the route's
//! fields). The server then requires, per call, exactly one
//! `baseten-model-id: model-abc123` and the stage's header
//! (`x-baseten-environment` or `x-baseten-deployment`, and not the other),
//! besides the key. The server-stream and error-status tests run once per
//! [`Setup`]: the TOML route (the direct case) and the shortcut with each
//! stage. The shortcut alone has a unary call, 200 concurrent streams on one
//! channel, and a client that sends its own `baseten-model-id` (keyrelay must
//! replace it).

use crate::support;
use crate::support::python;
use crate::support::tls;

use std::collections::HashMap;
use std::path::PathBuf;

use keyrelay::config::parse::parse_upstream;
use keyrelay::config::{self, Config, OverrideValue, Sources};
use python::Script;
use support::*;
use tls::TestCa;

/// The Python gRPC server over TLS, and the CA keyrelay must trust for it.
struct GrpcUpstream {
    server: Script,
    port: u16,
    ca_file: TempFile,
    _cert_and_key: [TempFile; 2],
}

impl GrpcUpstream {
    /// The server checking only the key.
    async fn start() -> Self {
        Self::start_checking(&[]).await
    }

    /// The server checking the key and `checks` (its `--require NAME=VALUE`
    /// and `--absent NAME` arguments).
    async fn start_checking(checks: &[String]) -> Self {
        let ca = TestCa::new();
        let cert = ca.issue(&["localhost"]);
        let cert_file = temp_file("grpc", "cert.der", &cert.chain[0]);
        let key_file = temp_file("grpc", "key.der", cert.key.secret_der());
        let mut args = vec![cert_file.path(), key_file.path(), EXPECTED_AUTH];
        args.extend(checks.iter().map(String::as_str));
        let mut server = Script::spawn("grpc_server.py", &args);
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

/// keyrelay started in-process from a TOML route table or the Baseten gRPC
/// shortcut's settings, and the table's file while it runs.
struct GrpcRelay {
    relay: Relay,
    _config: Option<TempFile>,
}

/// The environment keyrelay reads the key from.
fn key_env() -> HashMap<String, String> {
    HashMap::from([("BASETEN_API_KEY".to_owned(), KEY.to_owned())])
}

impl GrpcRelay {
    async fn start(toml: &str) -> Self {
        let file = temp_file("grpc", "keyrelay.toml", toml);
        let sources = Sources {
            file: Some(PathBuf::from(file.path())),
            env: key_env(),
            ..Sources::default()
        };
        let config = config::load(&sources).expect("valid gRPC route table");
        assert!(config
            .routes
            .iter()
            .all(|route| route.http == keyrelay::config::UpstreamHttp::Http2));
        Self::serve(config, Some(file)).await
    }

    /// keyrelay configured as `--model abc123 --grpc` with `stage`, trusting
    /// the test CA (`--ca-file`), its route then aimed at `upstream`.
    async fn through_shortcut(upstream: &GrpcUpstream, stage: Stage) -> Self {
        let (stage_key, stage_value) = stage.setting();
        let mut sources = Sources {
            env: key_env(),
            ..Sources::default()
        };
        sources
            .set("model", OverrideValue::Text(MODEL.to_owned()))
            .set("grpc", OverrideValue::Bool(true))
            .set(stage_key, OverrideValue::Text(stage_value.to_owned()))
            .set(
                "ca_file",
                OverrideValue::Text(upstream.ca_file.path().to_owned()),
            );
        let mut config = config::load(&sources).expect("the Baseten gRPC shortcut's settings");
        aim_shortcut_at(&mut config, stage, upstream.port);
        Self::serve(config, None).await
    }

    async fn serve(config: Config, file: Option<TempFile>) -> Self {
        Self {
            relay: Relay::from_config(config).await,
            _config: file,
        }
    }

    async fn stop(self) {
        self.relay.stop().await;
    }
}

/// Starts the client calling keyrelay with `request` over h2c.
fn call_through(relay: &GrpcRelay, request: &str) -> Script {
    call_through_with(relay, request, &[])
}

/// Starts the client calling keyrelay with `request` over h2c, with `options`
/// (`--unary`, `--metadata NAME=VALUE`, `--concurrent N`).
fn call_through_with(relay: &GrpcRelay, request: &str, options: &[&str]) -> Script {
    let target = relay.relay.addr.to_string();
    let mut args = vec![target.as_str(), request];
    args.extend_from_slice(options);
    Script::spawn("grpc_client.py", &args)
}

/// Releases `count` messages one at a time, each only after the client
/// printed the previous one.
async fn lockstep(upstream: &mut GrpcUpstream, client: &mut Script, count: usize) {
    for k in 0..count {
        upstream.server.send_line("next").await;
        client.expect_line(&format!("message token {k}")).await;
    }
}

/// Makes the server-streaming call `request` through `relay`, releasing
/// `count` messages in lockstep, and returns its trailers and status once
/// the client has exited cleanly.
async fn stream_in_lockstep(
    upstream: &mut GrpcUpstream,
    relay: &GrpcRelay,
    request: &str,
    count: usize,
) -> (Vec<String>, String) {
    let mut client = call_through(relay, request);
    let call = format!("call {request}");
    let at_server = upstream.server.expect_line(&call);
    client
        .while_running("the call at the server", at_server)
        .await;
    lockstep(upstream, &mut client, count).await;
    let outcome = trailers_and_status(&mut client).await;
    client.success().await;
    outcome
}

/// Reads everything the client prints (replies, trailers) up to its
/// `status ...` line.
async fn lines_and_status(client: &mut Script) -> (Vec<String>, String) {
    let mut lines = Vec::new();
    loop {
        let line = client.line("the call's status").await;
        if line.starts_with("status ") {
            return (lines, line);
        }
        lines.push(line);
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

/// The key in the wrong header: the server refuses the call before sending
/// anything (a "trailers-only" response, where grpc-status travels in the
/// only HEADERS frame), and the client must see exactly that status. This
/// also shows the server's credential check can fail.
#[tokio::test]
async fn grpc_trailers_only_rejection_reaches_the_client() {
    let mut upstream = GrpcUpstream::start().await;
    let relay = GrpcRelay::start(&upstream.config("authorization")).await;
    let mut client = call_through(&relay, "stream 1");

    let rejected = upstream
        .server
        .expect_line("rejected wrong or missing baseten-authorization");
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

    let rejected = upstream
        .server
        .expect_line("rejected wrong or missing baseten-authorization");
    client
        .while_running("the call at the server", rejected)
        .await;
    client
        .expect_line("status UNAUTHENTICATED wrong or missing baseten-authorization")
        .await;
    client.success().await;
}

// ---------------------------------------------------------------------------
// Through the Baseten gRPC shortcut (`--model ID --grpc`)
// ---------------------------------------------------------------------------

/// The model the shortcut tests name, and what keyrelay makes of it.
const MODEL: &str = "abc123";
const MODEL_HOST: &str = "model-abc123.grpc.api.baseten.co";
const MODEL_ID_HEADER: &str = "baseten-model-id";
const MODEL_ID: &str = "model-abc123";

/// Which stage a shortcut test selects.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// `environment = "staging"`.
    Environment,
    /// `deployment = "dep42"`.
    Deployment,
}

impl Stage {
    /// The setting and value that select this stage.
    fn setting(self) -> (&'static str, &'static str) {
        match self {
            Self::Environment => ("environment", "staging"),
            Self::Deployment => ("deployment", "dep42"),
        }
    }

    /// The header keyrelay sets for this stage, and its value.
    fn header(self) -> (&'static str, &'static str) {
        match self {
            Self::Environment => ("x-baseten-environment", "staging"),
            Self::Deployment => ("x-baseten-deployment", "dep42"),
        }
    }

    /// The other stage's header, which must not be sent.
    fn other_header(self) -> &'static str {
        match self {
            Self::Environment => "x-baseten-deployment",
            Self::Deployment => "x-baseten-environment",
        }
    }

    /// The server's arguments for what the shortcut must send.
    fn server_checks(self) -> Vec<String> {
        let (name, value) = self.header();
        vec![
            "--require".to_owned(),
            format!("{MODEL_ID_HEADER}={MODEL_ID}"),
            "--require".to_owned(),
            format!("{name}={value}"),
            "--absent".to_owned(),
            self.other_header().to_owned(),
        ]
    }
}

/// The one place these tests read or write the shortcut's route: checks
/// what `--model abc123 --grpc` built (the upstream, the key header, the
/// static headers in `set_headers`), then aims the route at the local
/// server on `port`. If the route's fields are renamed, only this changes.
fn aim_shortcut_at(config: &mut Config, stage: Stage, port: u16) {
    let [route] = config.routes.as_mut_slice() else {
        panic!("the shortcut builds one route, got {:?}", config.routes);
    };
    assert_eq!(route.upstream.scheme.as_str(), "https", "{route:?}");
    assert_eq!(route.upstream.authority.as_str(), MODEL_HOST, "{route:?}");
    assert_eq!(route.upstream.base_path, "", "{route:?}");
    assert_eq!(route.credential.header.as_str(), "baseten-authorization");
    assert_eq!(route.http, keyrelay::config::UpstreamHttp::Http2);
    let mut set: Vec<(&str, &str)> = route
        .set_headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.to_str().expect("an ASCII value")))
        .collect();
    set.sort_unstable();
    let mut expected = vec![(MODEL_ID_HEADER, MODEL_ID), stage.header()];
    expected.sort_unstable();
    assert_eq!(set, expected, "the shortcut's static request headers");
    route.upstream =
        parse_upstream(&format!("https://localhost:{port}")).expect("the local server's URL");
}

/// The server requiring what the shortcut sends for `stage`, and keyrelay
/// configured by the shortcut, aimed at it.
async fn shortcut(stage: Stage) -> (GrpcUpstream, GrpcRelay) {
    let upstream = GrpcUpstream::start_checking(&stage.server_checks()).await;
    let relay = GrpcRelay::through_shortcut(&upstream, stage).await;
    (upstream, relay)
}

/// How keyrelay is set up in front of the server: a route from a TOML table
/// (the direct case), or the Baseten gRPC shortcut with a stage.
#[derive(Debug, Clone, Copy)]
enum Setup {
    Table,
    Shortcut(Stage),
}

/// Every setup a streaming test runs through. `deployment = "dep42"` instead
/// of an environment: the server requires `x-baseten-deployment: dep42` and
/// no `x-baseten-environment`.
const EVERY_SETUP: [Setup; 3] = [
    Setup::Table,
    Setup::Shortcut(Stage::Environment),
    Setup::Shortcut(Stage::Deployment),
];

impl Setup {
    /// The server, and keyrelay set up this way in front of it.
    async fn start(self) -> (GrpcUpstream, GrpcRelay) {
        match self {
            Self::Table => {
                let upstream = GrpcUpstream::start().await;
                let relay = GrpcRelay::start(&upstream.config("baseten-authorization")).await;
                (upstream, relay)
            }
            Self::Shortcut(stage) => shortcut(stage).await,
        }
    }
}

#[tokio::test]
async fn grpc_server_stream_arrives_message_by_message_with_ok_trailers() {
    for setup in EVERY_SETUP {
        let (mut upstream, relay) = setup.start().await;
        let (trailers, status) = stream_in_lockstep(&mut upstream, &relay, "stream 6", 6).await;
        assert_eq!(status, "status OK", "{setup:?}");
        assert_eq!(
            trailers,
            ["x-tokens-sent=6"],
            "the server's trailing metadata, {setup:?}"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn grpc_error_status_after_messages_reaches_the_client() {
    for setup in EVERY_SETUP {
        let (mut upstream, relay) = setup.start().await;
        let (trailers, status) =
            stream_in_lockstep(&mut upstream, &relay, "abort-after 2 RESOURCE_EXHAUSTED", 2).await;
        assert_eq!(
            status, "status RESOURCE_EXHAUSTED stopped by the test",
            "{setup:?}"
        );
        assert_eq!(
            trailers,
            ["x-tokens-sent=2"],
            "the server's trailing metadata, {setup:?}"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn grpc_shortcut_unary_call_gets_its_reply_and_trailers() {
    let (mut upstream, relay) = shortcut(Stage::Environment).await;
    let mut client = call_through_with(&relay, "hello", &["--unary"]);

    client
        .while_running(
            "the call at the server",
            upstream.server.expect_line("echo hello"),
        )
        .await;
    client.expect_line("message echo hello").await;
    let (trailers, status) = trailers_and_status(&mut client).await;
    assert_eq!(status, "status OK");
    assert_eq!(
        trailers,
        ["x-echo-bytes=5"],
        "the server's trailing metadata"
    );
    client.success().await;
    relay.stop().await;
}

/// 200 server-streaming calls on one client channel (one h2c connection to
/// keyrelay), all open at once: the server holds each until all 200 have
/// arrived, then sends 20 messages on each. Every call must get its messages
/// in order, its trailers and OK. The client prints nothing until all are
/// done (each call has a 30 s deadline), so the wait is [`python::STARTUP`].
#[tokio::test]
async fn grpc_shortcut_carries_200_concurrent_streams_on_one_channel() {
    const CALLS: usize = 200;
    let request = format!("burst 20 together {CALLS}");
    let (mut upstream, relay) = shortcut(Stage::Environment).await;
    let calls = CALLS.to_string();
    let mut client = call_through_with(&relay, &request, &["--concurrent", &calls]);

    let summary = client
        .line_within(python::STARTUP, "the concurrent calls' summary")
        .await;
    assert_eq!(
        summary,
        format!("streams {CALLS}/{CALLS} ok"),
        "the first failed call, if any, is printed instead; stderr: {}",
        client.stderr()
    );
    let elapsed = client.line("the time the calls took").await;
    eprintln!("{CALLS} concurrent gRPC streams through keyrelay: {elapsed} s");
    for _ in 0..CALLS {
        upstream
            .server
            .expect_line(&format!("call {request}"))
            .await;
    }
    client.success().await;
    relay.stop().await;
}

/// Control: the client sends its own `baseten-model-id` and stage header;
/// keyrelay must replace them, not add to them (the server requires exactly
/// one entry of each, with the shortcut's value).
#[tokio::test]
async fn grpc_shortcut_replaces_the_clients_own_model_id() {
    let (mut upstream, relay) = shortcut(Stage::Environment).await;
    let options = [
        "--unary",
        "--metadata",
        "baseten-model-id=wrong",
        "--metadata",
        "x-baseten-environment=production",
    ];
    let mut client = call_through_with(&relay, "hello", &options);

    // The client's status first: on failure it names the header the server refused.
    let (lines, status) = lines_and_status(&mut client).await;
    assert_eq!(
        status, "status OK",
        "keyrelay must replace the client's baseten-model-id and x-baseten-environment"
    );
    assert_eq!(lines, ["message echo hello", "trailer x-echo-bytes=5"]);
    upstream.server.expect_line("echo hello").await;
    client.success().await;
    relay.stop().await;
}

/// Control: the server's shortcut checks are not vacuous. Called directly
/// over TLS with the right key, it accepts the headers the shortcut should
/// send and refuses a wrong model id, a missing stage header and the other
/// stage's header, each with a status naming the header.
#[tokio::test]
async fn grpc_server_checks_the_shortcut_headers_when_called_directly() {
    let mut upstream = GrpcUpstream::start_checking(&Stage::Environment.server_checks()).await;
    let target = format!("localhost:{}", upstream.port);
    let auth = format!("baseten-authorization={EXPECTED_AUTH}");
    let model = format!("{MODEL_ID_HEADER}={MODEL_ID}");
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &[&model, "x-baseten-environment=staging"],
            "echo hello",
            "status OK",
        ),
        (
            &["baseten-model-id=wrong", "x-baseten-environment=staging"],
            "rejected wrong or missing baseten-model-id",
            "status INVALID_ARGUMENT wrong or missing baseten-model-id",
        ),
        (
            &[&model],
            "rejected wrong or missing x-baseten-environment",
            "status INVALID_ARGUMENT wrong or missing x-baseten-environment",
        ),
        (
            &[
                &model,
                "x-baseten-environment=staging",
                "x-baseten-deployment=d",
            ],
            "rejected unexpected x-baseten-deployment",
            "status INVALID_ARGUMENT unexpected x-baseten-deployment",
        ),
    ];
    for (metadata, at_server, status) in cases {
        let ca = upstream.ca_file.path().to_owned();
        let mut args = vec![
            target.as_str(),
            "hello",
            ca.as_str(),
            "--unary",
            "--without-placeholder",
            "--metadata",
            auth.as_str(),
        ];
        for entry in metadata {
            args.extend(["--metadata", entry]);
        }
        let mut client = Script::spawn("grpc_client.py", &args);
        client
            .while_running(
                "the call at the server",
                upstream.server.expect_line(at_server),
            )
            .await;
        // The reply and trailers (or a trailers-only response's headers) come first.
        let (_lines, got) = lines_and_status(&mut client).await;
        assert_eq!(got, status, "metadata {metadata:?}");
        client.success().await;
    }
}

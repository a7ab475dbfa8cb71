//! The key never leaks: not in logs at any level (the real binary at
//! RUST_LOG=trace), not in error bodies, not in `Debug` output, and never to a
//! host other than the configured upstream.

use crate::support;

use std::process::Stdio;

use bytes::Bytes;
use http::Request;
use support::*;

/// A client-side secret: SDK placeholders can be real tokens too; they must not be logged either.
const CLIENT_SECRET: &str = "client-bearer-7d41e0c2";

/// The HTTP versions of the two hops: client to keyrelay, keyrelay to upstream.
#[derive(Clone, Copy)]
struct Hops {
    client: http::Version,
    upstream: http::Version,
}

const HTTP1_BOTH: Hops = Hops {
    client: http::Version::HTTP_11,
    upstream: http::Version::HTTP_11,
};

/// Sends a streamed request and a failing one through `relay`, checking
/// responses on the way, and that each hop spoke the version it should.
async fn exercise(upstream: &mut MockUpstream, relay: std::net::SocketAddr, hops: Hops) {
    let client = if hops.client == http::Version::HTTP_2 {
        h2c_client()
    } else {
        http1_client()
    };
    let request = Request::post(format!("http://{relay}/production/predict?q=1"))
        .header("authorization", format!("Bearer {CLIENT_SECRET}"))
        .header("x-api-key", CLIENT_SECRET)
        .body(full(r#"{"stream": true}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.headers()["authorization"], EXPECTED_AUTH);
    // Without this the HTTP/2 case would pass with the upstream flag ignored.
    assert_eq!(
        exchange.request.version(),
        hops.upstream,
        "the upstream hop's version"
    );
    let (mut tx, _dropped) = exchange.respond_streaming();
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.version(), hops.client, "the client hop's version");
    let mut body = response.into_body();
    for token in ["a", "b", "c"] {
        tx.send_data(Bytes::from(token)).await.expect("send");
        next_data(&mut body).await.expect("frame").expect("data");
    }
    drop(tx);
    let end = next_data(&mut body).await;
    assert!(end.is_none(), "stream should end cleanly, got {end:?}");

    // An upstream error passes through, and its body must not echo the key.
    let pending = tokio::spawn(
        client.request(
            Request::get(format!("http://{relay}/missing"))
                .body(empty())
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.version(), hops.upstream);
    exchange.respond_full(401, r#"{"error": "bad key"}"#);
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    let body = body_bytes(response).await;
    assert!(!String::from_utf8_lossy(&body).contains(KEY));
}

fn assert_clean(output: &str) {
    assert!(!output.is_empty(), "expected trace output to scan");
    assert!(
        !output.contains(KEY),
        "the upstream key appeared in output:\n{output}"
    );
    assert!(
        !output.contains(CLIENT_SECRET),
        "a client credential appeared in output"
    );
}

async fn scan_binary_at_trace(extra: &[&str], hops: Hops) {
    let mut upstream = MockUpstream::start().await;
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.url()])
        .args(extra)
        .env("BASETEN_API_KEY", KEY)
        .env("RUST_LOG", "trace");
    let mut relay = RelayProcess::spawn(command).await;
    exercise(&mut upstream, relay.addr, hops).await;
    // SIGTERM, not SIGKILL: every line logged so far must be in the scan.
    let output = relay.stop_and_output().await;
    let log = relay.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was on:\n{log}"
    );
    assert_clean(&output);
}

#[tokio::test]
async fn key_never_appears_in_trace_logs_http1() {
    scan_binary_at_trace(&[], HTTP1_BOTH).await;
}

#[tokio::test]
async fn key_never_appears_in_trace_logs_h2_both_sides() {
    scan_binary_at_trace(
        &["--upstream-http2"],
        Hops {
            client: http::Version::HTTP_2,
            upstream: http::Version::HTTP_2,
        },
    )
    .await;
}

#[tokio::test]
async fn key_never_appears_in_json_logs() {
    scan_binary_at_trace(&["--log-format", "json"], HTTP1_BOTH).await;
}

#[tokio::test]
async fn key_never_appears_in_error_bodies() {
    let relay = Relay::start(&format!("http://127.0.0.1:{}", closed_port()), &[]).await;
    let response = within(
        "502",
        http1_client().request(
            Request::get(relay.url("/x"))
                .body(empty())
                .expect("request"),
        ),
    )
    .await
    .expect("response");
    assert_eq!(response.status(), 502);
    let headers = format!("{:?}", response.headers());
    let body = body_bytes(response).await;
    assert!(!headers.contains(KEY));
    assert!(!String::from_utf8_lossy(&body).contains(KEY));
    relay.stop().await;
}

#[tokio::test]
async fn config_debug_output_masks_the_key() {
    let config = keyrelay::config::load(&sources("https://a.test", &[])).expect("config");
    for rendering in [format!("{config:?}"), format!("{config:#?}")] {
        assert!(
            !rendering.contains(KEY),
            "Debug leaked the key: {rendering}"
        );
    }
}

#[tokio::test]
async fn startup_errors_do_not_print_the_key() {
    let output = binary()
        .args(["--upstream", "not a url", "--listen", "nowhere"])
        .env("BASETEN_API_KEY", KEY)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("upstream"), "{text}");
    assert!(!text.contains(KEY));
}

/// A key pasted into the upstream URL's path is never printed: not in the
/// startup lines, not in the request logs (at trace level), not in an error
/// body, whose `upstream` field is host and port only.
#[tokio::test]
async fn a_secret_in_the_upstream_path_is_never_printed() {
    const PATH_SECRET: &str = "sk-pasted-into-path-7c1e";
    let port = closed_port();
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--warm-connections", "0"])
        .args([
            "--upstream",
            &format!("http://127.0.0.1:{port}/{PATH_SECRET}/v1"),
        ])
        .env("BASETEN_API_KEY", KEY)
        .env("RUST_LOG", "trace");
    let mut relay = RelayProcess::spawn(command).await;
    let response = support::raw::get(relay.addr, "/chat/completions").await;
    assert_eq!(response.status(), 502);
    assert_eq!(
        response.json()["upstream"],
        format!("127.0.0.1:{port}"),
        "{}",
        response.body_text()
    );
    assert!(!response.body_text().contains(PATH_SECRET));
    let log = relay.stop_and_output().await;
    assert!(log.contains(&format!("http://127.0.0.1:{port}")), "{log}");
    assert!(
        !log.contains(PATH_SECRET),
        "the log printed the path: {log}"
    );
}

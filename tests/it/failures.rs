//! What a client sees when the upstream fails, and that keyrelay survives it.
//!
//! Failures before the response headers become keyrelay's own JSON errors
//! (`"source": "keyrelay"`, a stable `type`). Failures after the headers cannot
//! change the status any more, so they must abort the client's body instead of
//! ending it cleanly: a truncated completion that looks complete is the worst
//! outcome for a streaming client. Every test ends by sending one more request
//! through the same keyrelay, because a proxy that answers one failure
//! correctly and then wedges is still broken.

use crate::support;

use crate::support::raw;
use crate::support::tls;

use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use raw::{RawConn, RawUpstream};
use support::*;
use tls::{TestCa, TlsUpstream};
use tokio::io::AsyncWriteExt;

type TestClient = Client<HttpConnector, TestBody>;

/// Sends a GET through keyrelay and waits for the response head.
async fn get(client: &TestClient, relay: &Relay, path: &str) -> Response<Incoming> {
    let request = Request::get(relay.url(path))
        .body(empty())
        .expect("request");
    within("keyrelay's response", client.request(request))
        .await
        .expect("keyrelay answered")
}

/// Starts a GET in the background, for tests that must act as the upstream first.
fn spawn_get(
    client: &TestClient,
    relay: &Relay,
    path: &str,
) -> tokio::task::JoinHandle<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
    let request = Request::get(relay.url(path))
        .body(empty())
        .expect("request");
    tokio::spawn(client.request(request))
}

async fn response_of(
    pending: tokio::task::JoinHandle<Result<Response<Incoming>, hyper_util::client::legacy::Error>>,
) -> Response<Incoming> {
    within("keyrelay's response", pending)
        .await
        .expect("join")
        .expect("keyrelay answered")
}

async fn body_bytes(response: Response<Incoming>) -> Bytes {
    within("the whole body", response.into_body().collect())
        .await
        .expect("body completes")
        .to_bytes()
}

/// Checks that `response` is keyrelay's own JSON error of `kind` and returns its body.
async fn expect_keyrelay_error(
    response: Response<Incoming>,
    status: u16,
    kind: &str,
) -> serde_json::Value {
    assert_eq!(response.status(), status, "status for {kind}");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content-type for {kind}"
    );
    let body = body_bytes(response).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(!text.contains(KEY), "error body leaks the key: {text}");
    let json: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"));
    assert_eq!(json["type"], kind, "type in {text}");
    assert_eq!(json["source"], "keyrelay", "source in {text}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error message in {text}"
    );
    json
}

/// Serves one healthy request on a new raw connection and checks it arrives.
async fn raw_upstream_still_serves(client: &TestClient, relay: &Relay, upstream: &mut RawUpstream) {
    let pending = spawn_get(client, relay, "/after");
    let mut conn = upstream.next_conn().await;
    let head = raw::serve_ok(&mut conn, "still fine").await;
    assert_eq!(head.target(), "/after");
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, "still fine");
}

// ---------------------------------------------------------------------------
// Failures before the response head: keyrelay's own JSON errors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn refused_connection_is_502_upstream_refused() {
    let relay = Relay::start(&format!("http://127.0.0.1:{}", closed_port()), &[]).await;
    let client = http1_client();

    let json = expect_keyrelay_error(
        get(&client, &relay, "/v1/chat/completions").await,
        502,
        "upstream_refused",
    )
    .await;
    println!("refused: {json}");

    // The upstream is still down; keyrelay must answer the same way again, not hang.
    expect_keyrelay_error(
        get(&client, &relay, "/again").await,
        502,
        "upstream_refused",
    )
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn tls_handshake_that_never_finishes_is_504_connect_timeout() {
    // Accepts TCP and then says nothing: the TLS handshake can never finish.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let relay = Relay::start(
        &format!("https://localhost:{port}"),
        &[("connect_timeout", "300ms")],
    )
    .await;
    let client = http1_client();
    let json = expect_keyrelay_error(
        get(&client, &relay, "/v1/models").await,
        504,
        "upstream_connect_timeout",
    )
    .await;
    println!("silent TLS: {json}");
    relay.stop().await;
    held.abort();
}

#[tokio::test]
async fn unresolvable_host_is_502_upstream_dns() {
    // `.invalid` is reserved (RFC 6761): it never resolves anywhere.
    let relay = Relay::start("http://does-not-exist.invalid", &[]).await;
    let client = http1_client();

    let json = expect_keyrelay_error(
        get(&client, &relay, "/v1/models").await,
        502,
        "upstream_dns",
    )
    .await;
    println!("dns: {json}");
    expect_keyrelay_error(get(&client, &relay, "/again").await, 502, "upstream_dns").await;
    relay.stop().await;
}

#[tokio::test]
async fn untrusted_certificate_is_502_upstream_tls_naming_unknown_issuer() {
    let ca = TestCa::new();
    let mut upstream = TlsUpstream::start(ca.issue(&["localhost"])).await;
    // No ca_file: only the web roots are trusted, which never signed this CA.
    let relay = Relay::start(&upstream.url("localhost"), &[]).await;
    let client = http1_client();

    let json = expect_keyrelay_error(
        get(&client, &relay, "/v1/models").await,
        502,
        "upstream_tls",
    )
    .await;
    let message = json["error"].as_str().expect("error text");
    assert!(message.contains("unknown issuer"), "message: {message}");
    assert!(
        message.contains("ca_file"),
        "message names the fix: {message}"
    );
    assert!(
        upstream.next_handshake().await.is_err(),
        "the server saw the handshake fail"
    );
    assert!(
        upstream.no_request(),
        "no request crossed an untrusted connection"
    );

    expect_keyrelay_error(get(&client, &relay, "/again").await, 502, "upstream_tls").await;
    relay.stop().await;
}

#[tokio::test]
async fn certificate_for_another_name_is_502_upstream_tls_naming_wrong_name() {
    let ca = TestCa::new();
    let ca_file = ca.write_pem_file();
    let mut upstream = TlsUpstream::start(ca.issue(&["other.test"])).await;
    // Trusted issuer, so the only thing wrong is the name.
    let relay = Relay::start(&upstream.url("localhost"), &[("ca_file", ca_file.path())]).await;
    let client = http1_client();

    let json = expect_keyrelay_error(
        get(&client, &relay, "/v1/models").await,
        502,
        "upstream_tls",
    )
    .await;
    let message = json["error"].as_str().expect("error text");
    assert!(message.contains("wrong name"), "message: {message}");
    assert!(
        upstream.next_handshake().await.is_err(),
        "the server saw the handshake fail"
    );
    assert!(
        upstream.no_request(),
        "no request crossed a mis-named connection"
    );
    relay.stop().await;
}

#[tokio::test]
async fn private_ca_in_ca_file_is_trusted_and_key_travels_over_tls() {
    let ca = TestCa::new();
    let ca_file = ca.write_pem_file();
    let mut upstream = TlsUpstream::start(ca.issue(&["localhost"])).await;
    let relay = Relay::start(&upstream.url("localhost"), &[("ca_file", ca_file.path())]).await;
    let client = http1_client();

    let response = get(&client, &relay, "/v1/models?limit=1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, "secure hello");

    assert_eq!(upstream.next_handshake().await, Ok(()));
    let seen = upstream.next_request().await;
    assert_eq!(
        seen.uri.path_and_query().map(|pq| pq.as_str()),
        Some("/v1/models?limit=1")
    );
    let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [EXPECTED_AUTH], "key injected once, over TLS");
    assert_eq!(
        seen.headers["host"],
        format!("localhost:{}", upstream.addr.port()),
        "Host is the upstream's name, the one the certificate was checked against"
    );
    relay.stop().await;
}

#[tokio::test]
async fn silent_upstream_is_504_after_response_header_timeout() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("response_header_timeout", "200ms")]).await;
    let client = http1_client();

    let started = Instant::now();
    let pending = spawn_get(&client, &relay, "/v1/chat/completions");
    // Held, never answered: the upstream got the request and stays silent.
    let silent = upstream.next().await;
    let json =
        expect_keyrelay_error(response_of(pending).await, 504, "upstream_header_timeout").await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "504 came before the timeout: {:?}",
        started.elapsed()
    );
    let message = json["error"].as_str().expect("error text");
    assert!(
        message.contains("response_header_timeout"),
        "message names the setting: {message}"
    );

    let pending = spawn_get(&client, &relay, "/after");
    upstream.next().await.respond_full(200, "still fine");
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, "still fine");
    drop(silent);
    relay.stop().await;
}

#[tokio::test]
async fn upstream_closing_before_headers_is_502_upstream_closed() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let pending = spawn_get(&client, &relay, "/v1/chat/completions");
    let mut conn = upstream.next_conn().await;
    let head = conn.read_head().await;
    assert_eq!(head.target(), "/v1/chat/completions");
    drop(conn);

    let json = expect_keyrelay_error(response_of(pending).await, 502, "upstream_closed").await;
    println!("closed: {json}");
    assert!(
        upstream.no_connection_pending(),
        "a request that reached the upstream must not be retried"
    );

    raw_upstream_still_serves(&client, &relay, &mut upstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn upstream_answering_with_garbage_is_502_upstream_protocol() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let pending = spawn_get(&client, &relay, "/v1/chat/completions");
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send("SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n")
        .await;

    let json = expect_keyrelay_error(response_of(pending).await, 502, "upstream_protocol").await;
    println!("garbage: {json}");
    // Kept open until now so that the failure is the garbage, not a close.
    drop(conn);

    raw_upstream_still_serves(&client, &relay, &mut upstream).await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// Failures after the response head: the body must abort, never end cleanly
// ---------------------------------------------------------------------------

const CHUNKED_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            transfer-encoding: chunked\r\n\r\n";

#[tokio::test]
async fn upstream_dying_mid_chunked_stream_aborts_http1_body() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let pending = spawn_get(&client, &relay, "/stream");
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send(format!("{CHUNKED_HEAD}7\r\ndata: 1\r\n")).await;
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    // Lockstep, so the chunks are known to have been relayed before the failure.
    assert_eq!(
        next_data(&mut body).await.expect("frame").expect("data"),
        "data: 1"
    );
    conn.send("7\r\ndata: 2\r\n").await;
    assert_eq!(
        next_data(&mut body).await.expect("frame").expect("data"),
        "data: 2"
    );
    // Gone without the terminating 0-chunk.
    drop(conn);

    match next_data(&mut body).await {
        Some(Err(err)) => println!("http1 client saw: {err:?}"),
        Some(Ok(data)) => panic!("unexpected data after the upstream died: {data:?}"),
        None => panic!("the body ended cleanly although the upstream died mid-stream"),
    }

    raw_upstream_still_serves(&client, &relay, &mut upstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn upstream_dying_mid_chunked_stream_never_sends_terminating_chunk() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    // A keep-alive request: a clean end would leave the connection open, so an
    // observed close can only be keyrelay aborting it.
    let mut client = RawConn::connect(relay.addr).await;
    client
        .send(format!(
            "GET /stream HTTP/1.1\r\nHost: {}\r\n\r\n",
            relay.addr
        ))
        .await;
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    // Everything at once, then the close: what the upstream had sent before dying
    // should still reach the client.
    conn.send(format!("{CHUNKED_HEAD}7\r\ndata: 1\r\n7\r\ndata: 2\r\n"))
        .await;
    drop(conn);

    let head = client.read_head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    let ending = client.read_to_end().await;
    let text = String::from_utf8_lossy(&ending.bytes).into_owned();
    println!("raw client got {text:?} then {:?}", ending.error);
    assert!(
        !text.contains("0\r\n\r\n"),
        "the terminating chunk must never be sent: {text:?}"
    );
    assert!(
        text.contains("data: 1") && text.contains("data: 2"),
        "chunks sent before the failure reach the client: {text:?}"
    );

    raw_upstream_still_serves(&http1_client(), &relay, &mut upstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn upstream_dying_mid_stream_resets_h2c_stream() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = h2c_client();

    let pending = spawn_get(&client, &relay, "/stream");
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send(format!("{CHUNKED_HEAD}7\r\ndata: 1\r\n")).await;
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let mut body = response.into_body();
    assert_eq!(
        next_data(&mut body).await.expect("frame").expect("data"),
        "data: 1"
    );
    drop(conn);

    match next_data(&mut body).await {
        Some(Err(err)) => println!("h2c client saw: {err:?}"),
        Some(Ok(data)) => panic!("unexpected data after the upstream died: {data:?}"),
        None => panic!("the h2 stream ended cleanly although the upstream died mid-stream"),
    }

    // Same h2 connection: a reset stream must not take the connection down with it.
    raw_upstream_still_serves(&client, &relay, &mut upstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn upstream_closing_before_content_length_is_reached_aborts_body() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let pending = spawn_get(&client, &relay, "/file");
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        .await;
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"],
        "100",
        "the declared length is relayed"
    );
    let mut body = response.into_body();
    assert_eq!(
        next_data(&mut body).await.expect("frame").expect("data"),
        "0123456789"
    );
    drop(conn);

    match next_data(&mut body).await {
        Some(Err(err)) => println!("content-length client saw: {err:?}"),
        Some(Ok(data)) => panic!("unexpected data after the upstream died: {data:?}"),
        None => panic!("a 100-byte body ended cleanly after 10 bytes"),
    }

    raw_upstream_still_serves(&client, &relay, &mut upstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn silent_stream_is_aborted_after_idle_timeout_and_upstream_released() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("idle_timeout", "300ms")]).await;
    let client = http1_client();

    let pending = spawn_get(&client, &relay, "/stream");
    let (mut tx, dropped) = upstream.next().await.respond_streaming();
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    tx.send_data(Bytes::from_static(b"first token"))
        .await
        .expect("send");
    assert_eq!(
        next_data(&mut body).await.expect("frame").expect("data"),
        "first token"
    );
    let silent_since = Instant::now();

    // `tx` stays alive: the upstream is silent, not finished.
    match next_data(&mut body).await {
        Some(Err(err)) => println!("idle client saw: {err:?}"),
        Some(Ok(data)) => panic!("unexpected data from a silent upstream: {data:?}"),
        None => panic!("the body ended cleanly although the upstream never finished"),
    }
    let waited = silent_since.elapsed();
    // A little slack below 300ms: the timer starts when keyrelay got the frame,
    // slightly before this client did.
    assert!(
        waited >= std::time::Duration::from_millis(250),
        "aborted after {waited:?}, before idle_timeout"
    );
    // keyrelay lets go of the upstream stream instead of keeping it open.
    dropped.wait().await;
    drop(tx);

    let pending = spawn_get(&client, &relay, "/after");
    upstream.next().await.respond_full(200, "still fine");
    let response = response_of(pending).await;
    assert_eq!(body_bytes(response).await, "still fine");
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// Upstream errors are not keyrelay's: passed through untouched
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upstream_error_responses_pass_through_unchanged() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let cases: [(u16, &str); 5] = [
        (400, r#"{"error": "Invalid input: prompt is required"}"#),
        (401, r#"{"error": "Invalid API key"}"#),
        (429, r#"{"error": "Rate limit exceeded"}"#),
        (500, r#"{"error": "Internal server error"}"#),
        (503, r#"{"error": "Model is not ready, it is scaling up"}"#),
    ];
    for (status, error_body) in cases {
        let pending = spawn_get(&client, &relay, "/v1/chat/completions");
        let request_id = format!("req-{status}");
        let response = http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-baseten-request-id", &request_id)
            .header("retry-after", "7")
            .body(full(error_body))
            .expect("response");
        upstream.next().await.respond(response);

        let response = response_of(pending).await;
        assert_eq!(response.status(), status);
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-baseten-request-id"], request_id.as_str());
        assert_eq!(headers["retry-after"], "7");
        assert_eq!(
            headers["content-length"],
            error_body.len().to_string().as_str()
        );
        let body = body_bytes(response).await;
        assert_eq!(
            body, error_body,
            "body for {status} is the upstream's, byte for byte"
        );
    }
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// Connection reuse
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upstream_closing_idle_pooled_connection_does_not_fail_next_request() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let pending = spawn_get(&client, &relay, "/first");
    let mut first = upstream.next_conn().await;
    let head = raw::serve_ok(&mut first, "one").await;
    assert_eq!(head.target(), "/first");
    assert_eq!(body_bytes(response_of(pending).await).await, "one");

    // The upstream ends the idle keep-alive connection (as servers do after
    // their keep-alive timeout). Waiting for keyrelay's side to close too is
    // what makes this deterministic: afterwards keyrelay has seen the close,
    // and the pooled connection must not be handed to the next request.
    first.stream.shutdown().await.expect("shutdown");
    let rest = first.read_to_end().await;
    assert!(
        rest.bytes.is_empty(),
        "no second request on the closed connection: {:?}",
        String::from_utf8_lossy(&rest.bytes)
    );
    drop(first);

    let pending = spawn_get(&client, &relay, "/second");
    let mut second = upstream.next_conn().await;
    let head = raw::serve_ok(&mut second, "two").await;
    assert_eq!(head.target(), "/second");
    let response = response_of(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await, "two");
    assert!(
        upstream.no_connection_pending(),
        "each request reached the upstream exactly once"
    );
    relay.stop().await;
}

#[tokio::test]
async fn silent_client_connection_is_closed_after_header_read_timeout() {
    let upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("header_read_timeout", "300ms")]).await;
    let mut silent = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    // Sends nothing at all: not even enough to tell HTTP/1.1 from HTTP/2.
    let mut buf = [0u8; 16];
    let n = within(
        "keyrelay to close the silent connection",
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "keyrelay closed the connection");
    relay.stop().await;
}

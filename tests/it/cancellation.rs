//! Cancellation: when the client goes away, keyrelay must let the upstream know
//! at once, so a model stops generating (and billing) tokens nobody will read.
//!
//! Every test waits on an event (the upstream's body being dropped, or its
//! connection closing) rather than sleeping; a missing propagation fails at the
//! step timeout. Latencies are printed, not asserted tightly: CI machines vary.

use crate::support;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn http1_client_dropping_the_response_mid_stream_drops_the_upstream_stream() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let request = Request::post(relay.url("/production/predict"))
        .body(full(r#"{"prompt": "a long story", "stream": true}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let mut exchange = upstream.next().await;
    drain_request_body(&mut exchange).await;
    let (mut tx, dropped) = exchange.respond_streaming();
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    let mut body = response.into_body();

    // Mid-stream for real: a few tokens have gone all the way through.
    for k in 0..3 {
        let token = Bytes::from(format!(" token{k}"));
        tx.send_data(token.clone()).await.expect("send");
        let got = next_data(&mut body).await.expect("frame").expect("data");
        assert_eq!(got, token);
    }

    let started = Instant::now();
    drop(body);
    dropped.wait().await;
    let latency = started.elapsed();
    println!("cancel latency, HTTP/1.1 client drop -> upstream body dropped: {latency:?}");
    assert!(latency < STEP, "took {latency:?}");
    relay.stop().await;
}

#[tokio::test]
async fn client_disconnect_while_waiting_for_response_headers_closes_the_upstream_request() {
    // A bare-socket upstream: it reads the request and never answers, like a
    // model server still cold-starting. Its socket shows exactly when keyrelay
    // gives the request up.
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let upstream_url = format!("http://{}", upstream.local_addr().expect("addr"));
    let relay = Relay::start(&upstream_url, &[]).await;

    let mut client = TcpStream::connect(relay.addr).await.expect("connect");
    let body = r#"{"prompt": "hi"}"#;
    let request = format!(
        "POST /production/predict HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client
        .write_all(request.as_bytes())
        .await
        .expect("write request");

    let (mut conn, _) = within("keyrelay to connect upstream", upstream.accept())
        .await
        .expect("accept");
    let forwarded = read_request(&mut conn, body.len()).await;
    assert!(
        forwarded.contains(EXPECTED_AUTH),
        "this is keyrelay's forwarded request: {forwarded:?}"
    );

    let started = Instant::now();
    drop(client);
    expect_closed(&mut conn).await;
    let latency = started.elapsed();
    println!("cancel latency, HTTP/1.1 client disconnect before response headers -> upstream connection closed: {latency:?}");
    relay.stop().await;
}

#[tokio::test]
async fn h2_client_reset_while_waiting_for_response_headers_closes_the_upstream_request() {
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let upstream_url = format!("http://{}", upstream.local_addr().expect("addr"));
    let relay = Relay::start(&upstream_url, &[]).await;
    let (mut sender, connection) = h2_connection(relay.addr).await;

    let request = Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let pending = sender.send_request(request);
    // Drive the request until it has reached the upstream, keeping the
    // response future so dropping it later is what cancels the stream.
    let mut pending = Box::pin(pending);
    let mut conn = tokio::select! {
        accepted = upstream.accept() => accepted.expect("accept").0,
        response = &mut pending => panic!("response before the upstream answered: {response:?}"),
        () = tokio::time::sleep(STEP) => panic!("request never reached the upstream"),
    };
    let forwarded = read_request(&mut conn, 0).await;
    assert!(
        forwarded.starts_with("GET /v1/models HTTP/1.1\r\n"),
        "{forwarded:?}"
    );

    let started = Instant::now();
    drop(pending);
    expect_closed(&mut conn).await;
    let latency = started.elapsed();
    println!("cancel latency, HTTP/2 stream reset before response headers -> upstream connection closed: {latency:?}");
    assert!(
        !connection.is_finished(),
        "resetting one stream must not close the client's connection"
    );
    relay.stop().await;
}

#[tokio::test]
async fn h2_client_reset_mid_stream_drops_the_upstream_stream_and_keeps_the_connection() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    // One connection driven by hand, so "the same connection" is certain.
    let (mut sender, connection) = h2_connection(relay.addr).await;

    let request = Request::post(relay.url("/production/predict"))
        .body(full(r#"{"prompt": "a long story", "stream": true}"#))
        .expect("request");
    let pending = tokio::spawn(sender.send_request(request));
    let mut exchange = upstream.next().await;
    drain_request_body(&mut exchange).await;
    let (mut tx, dropped) = exchange.respond_streaming();
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.version(), Version::HTTP_2);
    let mut body = response.into_body();
    for k in 0..3 {
        let token = Bytes::from(format!(" token{k}"));
        tx.send_data(token.clone()).await.expect("send");
        let got = next_data(&mut body).await.expect("frame").expect("data");
        assert_eq!(got, token);
    }

    // Dropping an h2 response body mid-stream sends RST_STREAM(CANCEL) and
    // leaves the connection open.
    let started = Instant::now();
    drop(body);
    dropped.wait().await;
    let latency = started.elapsed();
    println!("cancel latency, HTTP/2 stream reset -> upstream body dropped: {latency:?}");
    assert!(latency < STEP, "took {latency:?}");

    within("the connection to accept another request", sender.ready())
        .await
        .expect("connection still usable");
    let request = Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let pending = tokio::spawn(sender.send_request(request));
    upstream.next().await.respond_full(200, "still here");
    let response = within("second response", pending)
        .await
        .expect("join")
        .expect("second request on the same connection");
    assert_eq!(response.status(), 200);
    let body = within("second body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "still here");
    assert!(!connection.is_finished(), "the connection is still open");
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// Helpers local to this file
// ---------------------------------------------------------------------------

/// Reads the request body to its end at the mock upstream before it answers.
///
/// The mock (hyper) only notices its peer closing while it is still reading
/// the connection; if the test dropped an unfinished request body, the mock
/// would stop reading and could see keyrelay's close only on a later write,
/// which would blame keyrelay for the mock's blindness.
async fn drain_request_body(exchange: &mut Exchange) {
    let body = exchange.request.body_mut();
    // Bounded: a test request body is a few dozen bytes, one frame each at most.
    for _ in 0..1000 {
        match next_data(body).await {
            Some(Ok(_)) => {}
            Some(Err(err)) => panic!("request body failed: {err}"),
            None => return,
        }
    }
    panic!("request body never ended");
}

/// An HTTP/2 prior-knowledge connection to keyrelay, driven by a spawned task.
async fn h2_connection(
    addr: SocketAddr,
) -> (
    http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = within("connecting to keyrelay", TcpStream::connect(addr))
        .await
        .expect("connect");
    // Small frames (RST_STREAM) must not wait for Nagle.
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = within(
        "the h2 handshake",
        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .expect("h2 handshake");
    (sender, tokio::spawn(connection))
}

/// Reads one forwarded request (head plus a `body_len`-byte body) off a bare
/// upstream socket and returns it as text.
async fn read_request(conn: &mut TcpStream, body_len: usize) -> String {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded by STEP as a whole; each read adds at least one byte.
    within("the forwarded request", async {
        loop {
            if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                if request.len() >= end + 4 + body_len {
                    return;
                }
            }
            let n = conn.read(&mut buf).await.expect("read request");
            assert!(n > 0, "keyrelay closed before sending the whole request");
            request.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8(request).expect("request is text")
}

/// Waits until keyrelay closes (or resets) its connection to the upstream.
///
/// keyrelay has nothing more to send on this connection, so the only
/// acceptable outcomes of the read are end-of-file and a reset.
async fn expect_closed(conn: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let read = within(
        "keyrelay to close the upstream connection after the client left",
        conn.read(&mut buf),
    )
    .await;
    if let Ok(n @ 1..) = read {
        panic!(
            "keyrelay sent more after the request: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

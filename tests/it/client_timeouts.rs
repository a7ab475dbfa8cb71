//! Timeouts for every way a client can hold a connection without using it:
//! `client_idle_timeout` (an HTTP/2 or h2c connection with no stream open,
//! even one that keeps sending PINGs, which hyper answers without a request)
//! and `request_body_timeout` (a request body that stops arriving).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::support::h2_frames::{
    frame, get_frame, headers_frame, H2Conn, FRAME_GOAWAY, FRAME_PING,
};
use crate::support::raw::{RawConn, RawUpstream};
use crate::support::reliability::report;
use crate::support::*;

/// Reads frames until the connection ends; true if a GOAWAY came first.
async fn goaway_then_end(conn: &mut H2Conn) -> bool {
    let mut goaway = false;
    // Bounded: each read has a timeout, and the end stops it.
    while let Some(frame) = conn.next_frame().await {
        goaway |= frame.kind == FRAME_GOAWAY;
    }
    goaway
}

#[tokio::test]
async fn an_h2c_connection_that_only_pings_is_closed_after_client_idle_timeout() {
    let upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("client_idle_timeout", "400ms")]).await;
    let mut conn = H2Conn::open(relay.addr).await;
    let opened = Instant::now();

    // A PING every 100 ms, each answered, for as long as keyrelay keeps the
    // connection: the PINGs must not count as activity.
    let pinger = async {
        let mut n: u64 = 0;
        loop {
            n += 1;
            if !conn
                .send_lossy(&frame(FRAME_PING, 0, 0, &n.to_be_bytes()))
                .await
            {
                break;
            }
            let deadline = Instant::now() + Duration::from_millis(100);
            // Read what comes (PING ACKs) for 100 ms; the end stops it.
            loop {
                match tokio::time::timeout_at(deadline, conn.next_frame()).await {
                    Err(_elapsed) => break,
                    Ok(Some(frame)) if frame.kind == FRAME_GOAWAY => {
                        return (true, goaway_then_end(&mut conn).await);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return (false, false),
                }
            }
        }
        (false, false)
    };
    let (goaway, _) = within("keyrelay to close the pinging connection", pinger).await;
    let held = opened.elapsed();
    assert!(goaway, "closed with a GOAWAY");
    assert!(
        held >= Duration::from_millis(400),
        "not before client_idle_timeout: {held:?}"
    );
    // The idle timeout, then at most the 2 s keyrelay allows a client that
    // never answers the GOAWAY exchange's PING (this one does not).
    assert!(
        held < Duration::from_secs(5),
        "closed soon after client_idle_timeout: {held:?}"
    );
    report(
        "issue23",
        &[
            "an h2c connection that only sends PINGs (client_idle_timeout 400ms)",
            &format!(
                "GOAWAY, then closed {} ms after it opened",
                held.as_millis()
            ),
        ],
    );
    relay.stop().await;
}

#[tokio::test]
async fn an_h2c_connection_with_a_stream_open_outlives_client_idle_timeout() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("client_idle_timeout", "300ms")]).await;
    let mut conn = H2Conn::open(relay.addr).await;

    // One stream held open three times the idle timeout: not idle.
    conn.send(&get_frame(1, "/slow")).await;
    let exchange = upstream.next().await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    exchange.respond_full(200, "late");
    assert_eq!(conn.response_status(1).await, Some(200));

    // Then nothing in flight: closed after the idle timeout.
    let closed = Instant::now();
    assert!(goaway_then_end(&mut conn).await, "GOAWAY once idle");
    assert!(closed.elapsed() < Duration::from_secs(5));
    relay.stop().await;
}

#[tokio::test]
async fn client_idle_timeout_off_keeps_a_pinging_connection() {
    let upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("client_idle_timeout", "off")]).await;
    let mut conn = H2Conn::open(relay.addr).await;
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        conn.send(&frame(FRAME_PING, 0, 0, &[0; 8])).await;
        // Bounded: next_frame reads with a timeout.
        loop {
            let next = conn.next_frame().await.expect("still open");
            assert_ne!(next.kind, FRAME_GOAWAY, "{next:?}");
            if next.kind == FRAME_PING {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it still serves a request.
    conn.send(&get_frame(1, "/after")).await;
    drop(upstream);
    assert!(conn.response_status(1).await.is_some());
    drop(conn);
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// request_body_timeout
// ---------------------------------------------------------------------------

/// A POST head for `len` body bytes to keyrelay at `relay`.
fn post_head(relay: &Relay, len: usize) -> String {
    format!(
        "POST /v1/upload HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\r\n",
        relay.addr
    )
}

#[tokio::test]
async fn a_body_trickled_slower_than_request_body_timeout_gets_408_and_the_upstream_request_is_aborted(
) {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("request_body_timeout", "300ms")]).await;
    let mut client = RawConn::connect(relay.addr).await;
    client.send(post_head(&relay, 10) + "ab").await;

    let exchange = upstream.next().await;
    let started = Instant::now();
    // The rest never comes: the upstream's body read fails (aborted).
    let upstream_body = within("the upstream body", exchange.request.into_body().collect()).await;
    assert!(upstream_body.is_err(), "the upstream request was aborted");

    let answer = client.read_response().await;
    assert_eq!(answer.status(), 408, "{}", answer.body_text());
    assert_eq!(answer.json()["type"], "request_body_timeout");
    assert_eq!(answer.json()["source"], "keyrelay");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "cut promptly: {waited:?}");
    report(
        "issue23",
        &[
            "a request body that stops after 2 of 10 bytes (request_body_timeout 300ms)",
            &format!(
                "408 request_body_timeout after {} ms; the upstream request aborted",
                waited.as_millis()
            ),
        ],
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_chunked_body_that_stalls_between_chunks_is_cut_too() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("request_body_timeout", "300ms")]).await;
    let mut client = RawConn::connect(relay.addr).await;
    client
        .send(format!(
            "POST /v1/upload HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
            relay.addr
        ))
        .await;
    let exchange = upstream.next().await;
    let upstream_body = within("the upstream body", exchange.request.into_body().collect()).await;
    assert!(upstream_body.is_err(), "the upstream request was aborted");
    let answer = client.read_response().await;
    assert_eq!(answer.status(), 408, "{}", answer.body_text());
    assert_eq!(answer.json()["type"], "request_body_timeout");
    relay.stop().await;
}

#[tokio::test]
async fn a_body_that_stalls_after_the_response_started_ends_the_response_visibly() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("request_body_timeout", "300ms")]).await;
    let mut client = RawConn::connect(relay.addr).await;
    client.send(post_head(&relay, 10) + "ab").await;

    // The upstream answers at once, streaming, before the body is whole.
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    assert_eq!(conn.read_exact(2).await, b"ab");
    conn.send("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .await;
    let head = client.read_head().await;
    assert_eq!(head.status(), 200);

    // The body stalls: keyrelay aborts the upstream request (closes its
    // connection) and cuts the client's response short, with no
    // terminating chunk, so the client cannot take it for complete.
    let upstream_saw = conn.read_to_end().await;
    assert!(
        upstream_saw.bytes.is_empty(),
        "nothing more of the body: {:?}",
        String::from_utf8_lossy(&upstream_saw.bytes)
    );
    let rest = client.read_to_end().await;
    assert!(
        !rest.bytes.ends_with(b"0\r\n\r\n"),
        "the response must not end cleanly: {:?}",
        String::from_utf8_lossy(&rest.bytes)
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_slow_body_under_request_body_timeout_is_forwarded_whole() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("request_body_timeout", "500ms")]).await;
    let mut client = RawConn::connect(relay.addr).await;
    client.send(post_head(&relay, 8)).await;
    let writer = async {
        // Eight bytes, one every 150 ms: 1.2 s in all, each gap under the limit.
        for byte in b"slowbody" {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.send([*byte]).await;
        }
        client
    };
    let reader = async {
        let exchange = upstream.next().await;
        let body = within("the whole body", async {
            let (parts, body) = exchange.request.into_parts();
            (parts, body.collect().await)
        });
        let (_, collected) = body.await;
        let bytes: Bytes = collected.expect("the body arrives whole").to_bytes();
        (bytes, ())
    };
    let (mut client, (bytes, ())) = tokio::join!(writer, reader);
    assert_eq!(bytes, "slowbody");
    let answer = client.read_response().await;
    // The test dropped the exchange without answering: the mock says 500.
    assert_eq!(answer.status(), 500, "{}", answer.body_text());
    relay.stop().await;
}

#[tokio::test]
async fn an_h2c_request_body_that_stalls_gets_408_and_the_connection_is_then_idle() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("request_body_timeout", "300ms"),
            ("client_idle_timeout", "400ms"),
        ],
    )
    .await;
    let mut conn = H2Conn::open(relay.addr).await;
    // A POST whose body starts and then stops, its stream left open.
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "127.0.0.1"),
        (":path", "/v1/upload"),
        ("content-type", "text/plain"),
    ];
    conn.send(&headers_frame(1, &fields, false)).await;
    conn.send(&frame(0x0, 0, 1, b"ab")).await;
    let exchange = upstream.next().await;
    let upstream_body = within("the upstream body", exchange.request.into_body().collect()).await;
    assert!(upstream_body.is_err(), "the upstream request was aborted");
    assert_eq!(conn.response_status(1).await, Some(408));
    // With the stream answered, nothing is in flight: GOAWAY and the end.
    assert!(goaway_then_end(&mut conn).await);
    relay.stop().await;
}

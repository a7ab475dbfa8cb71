//! The HTTP/1.1 upstream pool (`src/proxy/upstream/http1_pool.rs`), seen
//! from a raw upstream: a connection whose response was read to its end
//! carries the next request, one whose response was abandoned is closed and
//! never reused, and an idle one is closed after `pool_idle_timeout`.
//!
//! keyrelay runs one serving thread here (`workers = 1`), so every request
//! goes through the same pool, and no warm spares (`warm_connections = 0`),
//! so every connection the upstream sees was opened for a request.

use http::{Request, StatusCode};
use http_body_util::BodyExt;

use crate::support::raw::{serve_ok, RawUpstream};
use crate::support::{body_bytes, empty, http1_client, sources, within, Relay};
use keyrelay::config::OverrideValue;

async fn pooled_relay(upstream: &RawUpstream, settings: &[(&str, &str)]) -> Relay {
    let mut sources = sources(&upstream.url(), settings);
    sources.set("warm_connections", OverrideValue::Text("0".to_owned()));
    sources.set("workers", OverrideValue::Text("1".to_owned()));
    Relay::from_sources(&sources).await
}

/// A GET through `relay` in the background; the test answers it upstream.
fn get(relay: &Relay, path: &str) -> tokio::task::JoinHandle<String> {
    let request = Request::get(relay.url(path))
        .body(empty())
        .expect("request");
    tokio::spawn(async move {
        let response = http1_client().request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        String::from_utf8_lossy(&body_bytes(response).await).into_owned()
    })
}

#[tokio::test]
async fn a_connection_whose_response_was_read_whole_carries_the_next_request() {
    let mut upstream = RawUpstream::start().await;
    let relay = pooled_relay(&upstream, &[]).await;

    let first = get(&relay, "/one");
    let mut conn = upstream.next_conn().await;
    assert_eq!(serve_ok(&mut conn, "one").await.target(), "/one");
    assert_eq!(within("the first body", first).await.expect("join"), "one");

    // A chunked response this time: its end is the zero-size chunk.
    let second = get(&relay, "/two");
    assert_eq!(conn.read_head().await.target(), "/two");
    conn.send("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n")
        .await;
    assert_eq!(
        within("the second body", second).await.expect("join"),
        "two"
    );

    let third = get(&relay, "/three");
    assert_eq!(serve_ok(&mut conn, "three").await.target(), "/three");
    assert_eq!(
        within("the third body", third).await.expect("join"),
        "three"
    );
    assert!(
        upstream.no_connection_pending(),
        "all three requests rode the first connection"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_connection_whose_response_was_abandoned_is_closed_not_reused() {
    let mut upstream = RawUpstream::start().await;
    let relay = pooled_relay(&upstream, &[]).await;

    // The client reads the first chunk of a stream, then goes away.
    let request = Request::get(relay.url("/stream"))
        .body(empty())
        .expect("request");
    let abandoned = tokio::spawn(async move {
        let response = http1_client().request(request).await.expect("response");
        let mut body = response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "tok");
        // Dropping the body and the client closes the client connection.
    });
    let mut streaming = upstream.next_conn().await;
    assert_eq!(streaming.read_head().await.target(), "/stream");
    streaming
        .send("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntok\r\n")
        .await;
    within("the client to give up", abandoned)
        .await
        .expect("join");
    assert!(
        streaming.head_or_end().await.is_none(),
        "keyrelay closes the upstream connection of an abandoned stream"
    );

    let next = get(&relay, "/next");
    let mut fresh = upstream.next_conn().await;
    assert_eq!(serve_ok(&mut fresh, "next").await.target(), "/next");
    assert_eq!(within("the next body", next).await.expect("join"), "next");
    relay.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_pool_idle_timeout() {
    let mut upstream = RawUpstream::start().await;
    let relay = pooled_relay(&upstream, &[("pool_idle_timeout", "1s")]).await;

    let only = get(&relay, "/once");
    let mut conn = upstream.next_conn().await;
    serve_ok(&mut conn, "once").await;
    assert_eq!(within("the body", only).await.expect("join"), "once");
    // Bounded by the raw connection's read timeout (10 s), ten times the idle timeout.
    assert!(
        conn.head_or_end().await.is_none(),
        "keyrelay closes the idle connection instead of sending on it"
    );

    // The next request opens a new connection.
    let later = get(&relay, "/later");
    let mut fresh = upstream.next_conn().await;
    assert_eq!(serve_ok(&mut fresh, "later").await.target(), "/later");
    assert_eq!(
        within("the later body", later).await.expect("join"),
        "later"
    );
    relay.stop().await;
}

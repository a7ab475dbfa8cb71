//! `warm_connections` (default 1): keyrelay opens a connection to each
//! upstream at startup, before any request, hands it to the first request
//! that needs one, and opens another whenever the server closes its spare.
//! These tests run keyrelay at that default (the rest of the suite turns it
//! off, since its mocks take every connection for a request). Each serving
//! thread keeps its own spares, so most tests here run one thread
//! (`workers = 1`) to count one pool's connections; the last one checks that
//! every thread has its spare.

use std::sync::atomic::Ordering;

use http::StatusCode;

use crate::support::h2_server::{H2Upstream, Limits};
use crate::support::ops::eventually;
use crate::support::raw::{RawConn, RawUpstream};
use crate::support::tls::{TestCa, TlsUpstream};
use crate::support::{body_bytes, http1_client, sources, within, Relay};
use keyrelay::config::OverrideValue;

/// keyrelay at the default `warm_connections`, on one serving thread, in
/// front of `upstream`.
async fn warm_relay(upstream: &str, settings: &[(&str, &str)]) -> Relay {
    let mut sources = sources(upstream, settings);
    sources.set("warm_connections", OverrideValue::Text("1".to_owned()));
    sources.set("workers", OverrideValue::Text("1".to_owned()));
    Relay::from_sources(&sources).await
}

async fn get_ok(relay: &Relay, path: &str) -> String {
    let response = within(
        "an answer",
        http1_client().get(relay.url(path).parse().expect("url")),
    )
    .await
    .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    String::from_utf8_lossy(&body_bytes(response).await).into_owned()
}

/// Sends a request through `relay` and checks it arrives on `conn` (a
/// spare), answering it there.
async fn request_arrives_on(mut conn: RawConn, relay: &Relay) {
    let client = http1_client();
    let pending = tokio::spawn(client.get(relay.url("/v1/models").parse().expect("url")));
    assert_eq!(conn.read_head().await.target(), "/v1/models");
    conn.send("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
}

/// Over HTTPS: the TLS handshake happens at startup, with no request, and
/// the first request arrives on that connection.
#[tokio::test]
async fn the_first_request_rides_the_connection_opened_at_startup() {
    let ca = TestCa::new();
    let mut upstream = TlsUpstream::start(ca.issue(&["localhost"])).await;
    let ca_file = ca.write_pem_file();
    let relay = warm_relay(&upstream.url("localhost"), &[("ca_file", ca_file.path())]).await;

    upstream
        .next_handshake()
        .await
        .expect("a handshake before any request");
    assert!(upstream.no_request(), "the warm connection sends nothing");
    assert_eq!(get_ok(&relay, "/v1/models").await, "secure hello");
    let seen = upstream.next_request().await;
    assert_eq!(seen.connection, 0, "the request used the warm connection");
    // The spare it took is replaced.
    upstream
        .next_handshake()
        .await
        .expect("a new spare after the first was taken");
    relay.stop().await;
}

/// A spare the server closes is replaced at once, and the next request
/// uses the replacement.
#[tokio::test]
async fn a_spare_the_server_closes_is_opened_again() {
    let mut upstream = RawUpstream::start().await;
    let relay = warm_relay(&upstream.url(), &[]).await;

    let first = upstream.next_conn().await;
    drop(first);
    let second = upstream.next_conn().await;
    request_arrives_on(second, &relay).await;
    relay.stop().await;
}

/// Over HTTP/2 the pool keeps a whole HTTP/2 connection warm (PINGs keep
/// it alive): it is open before any request and carries the first ones.
#[tokio::test]
async fn an_http2_pool_opens_its_connection_at_startup_and_uses_it() {
    let upstream = H2Upstream::start(Limits::default()).await;
    let relay = warm_relay(
        &upstream.url(),
        &[("ca_file", upstream.ca_file()), ("upstream_http", "2")],
    )
    .await;
    eventually("the warm HTTP/2 connection", || async {
        (upstream.counters.connections.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(upstream.counters.requests.load(Ordering::SeqCst), 0);
    for _ in 0..5 {
        assert_eq!(get_ok(&relay, "/small").await, "hello");
    }
    assert_eq!(
        upstream.counters.connections.load(Ordering::SeqCst),
        1,
        "the requests went on the warm connection"
    );
    relay.stop().await;
}

/// A spare older than `pool_idle_timeout` is replaced even though the
/// server never closed it (its close may have been lost), and the next
/// request goes on the young one.
#[tokio::test]
async fn a_spare_past_pool_idle_timeout_is_replaced() {
    let mut upstream = RawUpstream::start().await;
    let relay = warm_relay(&upstream.url(), &[("pool_idle_timeout", "1s")]).await;

    let _old = upstream.next_conn().await;
    let young = upstream.next_conn().await;
    request_arrives_on(young, &relay).await;
    relay.stop().await;
}

/// `upstream_http = "auto"` against a server without h2: the connection
/// that found out is closed, and an HTTP/1.1 spare takes its place before
/// any request, which then rides it.
#[tokio::test]
async fn an_auto_route_whose_server_chooses_http1_keeps_an_http1_spare() {
    let ca = TestCa::new();
    let mut upstream = TlsUpstream::start(ca.issue(&["localhost"])).await;
    let ca_file = ca.write_pem_file();
    let relay = warm_relay(
        &upstream.url("localhost"),
        &[("ca_file", ca_file.path()), ("upstream_http", "auto")],
    )
    .await;

    upstream
        .next_handshake()
        .await
        .expect("the asking handshake");
    upstream.next_handshake().await.expect("the HTTP/1.1 spare");
    assert!(upstream.no_request());
    assert_eq!(get_ok(&relay, "/v1/models").await, "secure hello");
    let seen = upstream.next_request().await;
    assert_eq!(seen.connection, 1, "the request used the HTTP/1.1 spare");
    relay.stop().await;
}

/// With several serving threads each keeps its own spare (a request is
/// served by the thread that accepted its connection, on that thread's
/// upstream connections), so the first request on any thread rides a
/// connection opened at startup.
#[tokio::test]
async fn every_serving_thread_keeps_its_own_spare() {
    const WORKERS: usize = 3;
    let mut upstream = RawUpstream::start().await;
    let mut sources = sources(&upstream.url(), &[]);
    sources.set("warm_connections", OverrideValue::Text("1".to_owned()));
    sources.set("workers", OverrideValue::Text(WORKERS.to_string()));
    let relay = Relay::from_sources(&sources).await;

    let mut spares = Vec::new();
    for _ in 0..WORKERS {
        spares.push(upstream.next_conn().await);
    }
    // Every keeper has run once its thread has stopped: a spare beyond one
    // per thread would be waiting by now.
    relay.stop().await;
    assert!(
        upstream.no_connection_pending(),
        "one spare per thread, no more"
    );
}

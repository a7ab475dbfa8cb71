//! The HTTP/1.1 upstream pool (`src/proxy/upstream/http1_pool.rs`), seen
//! from a raw upstream: a connection whose response was read to its end
//! carries the next request, one whose response was abandoned is closed and
//! never reused, and an idle one is closed after `pool_idle_timeout`.
//!
//! A bodiless idempotent request written on a reused connection that the
//! upstream closed before answering goes once more on a new connection;
//! anything with a body, or that got a response byte, never does.
//!
//! keyrelay runs one serving thread here (`workers = 1`), so every request
//! goes through the same pool, and no warm spares (`warm_connections = 0`),
//! so every connection the upstream sees was opened for a request.

use std::future::Future;
use std::pin::Pin;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use crate::support::ops::{self, AdminRelay};
use crate::support::raw::{serve_ok, RawConn, RawResponse, RawUpstream};
use crate::support::reliability::report;
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

// ---------------------------------------------------------------------------
// A reused connection the upstream closed without answering
// ---------------------------------------------------------------------------

const RETRIES: &str = "keyrelay_upstream_retries_total";
const STALE: [(&str, &str); 2] = [("route", "default"), ("reason", "stale_connection")];

/// The real binary with one serving thread (one pool) in front of `upstream`.
async fn pooled_binary(upstream: &RawUpstream) -> AdminRelay {
    let mut command = ops::command(&upstream.url());
    command.args(["--workers", "1"]);
    AdminRelay::spawn(command).await
}

/// Sends `request` raw to keyrelay in the background and reads one response
/// (`head`: the request was a HEAD, so the response has no body).
fn send_raw(relay: &AdminRelay, request: String, head: bool) -> JoinHandle<RawResponse> {
    let addr = relay.addr();
    tokio::spawn(async move {
        let mut conn = RawConn::connect(addr).await;
        conn.send(request).await;
        conn.read_response_to(head).await
    })
}

fn request(relay: &AdminRelay, start: &str, extra: &str) -> String {
    format!(
        "{start} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{extra}\r\n",
        relay.addr()
    )
}

/// A GET answered 200 on a connection the upstream opens for it; returns
/// that connection, now idle in keyrelay's pool.
async fn primed(relay: &AdminRelay, upstream: &mut RawUpstream) -> RawConn {
    let primer = send_raw(relay, request(relay, "GET /primer", ""), false);
    let mut conn = upstream.next_conn().await;
    assert_eq!(serve_ok(&mut conn, "primer").await.target(), "/primer");
    let answer = within("the primer", primer).await.expect("join");
    assert_eq!(answer.status(), 200);
    conn
}

#[tokio::test]
async fn a_bodiless_request_on_a_reused_connection_closed_unanswered_goes_once_more() {
    let mut upstream = RawUpstream::start().await;
    let relay = pooled_binary(&upstream).await;
    let mut idle = primed(&relay, &mut upstream).await;

    // Each request reaches the reused connection, which the upstream closes
    // after reading the head, without a byte of answer (its keep-alive ran
    // out as the request crossed it). The request comes again on a new
    // connection, and the client sees only the answer from there.
    let cases = [
        ("GET /again", ""),
        ("HEAD /again", ""),
        ("OPTIONS /again", ""),
        ("DELETE /again", "Content-Length: 0\r\n"),
    ];
    for (start, extra) in cases {
        let head = start.starts_with("HEAD");
        let answer = send_raw(&relay, request(&relay, start, extra), head);
        let first = idle.read_head().await;
        assert_eq!(first.start_line, format!("{start} HTTP/1.1"));
        drop(idle);
        let mut fresh = upstream.next_conn().await;
        let second = if head {
            // The answer to a HEAD has no body.
            let second = fresh.read_head().await;
            fresh
                .send("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n")
                .await;
            second
        } else {
            serve_ok(&mut fresh, "second").await
        };
        assert_eq!(
            second.start_line, first.start_line,
            "the same request again"
        );
        assert_eq!(second.headers, first.headers, "with the same headers");
        let answer = within("the answer", answer).await.expect("join");
        assert_eq!(answer.status(), 200, "{start}: {}", answer.body_text());
        if !head {
            assert_eq!(answer.body_text(), "second");
        }
        report(
            "issue23",
            &[
                &format!("{start} (bodiless) on a reused upstream connection the upstream closes without answering"),
                "200 from a second, new connection; counted in upstream_retries_total{reason=stale_connection}",
            ],
        );
        idle = fresh;
    }
    relay.wait_for_sample(RETRIES, &STALE, 4.0).await;
    assert!(upstream.no_connection_pending(), "each went exactly twice");
}

#[tokio::test]
async fn a_request_with_a_body_or_an_answer_begun_is_never_sent_twice() {
    let mut upstream = RawUpstream::start().await;
    let relay = pooled_binary(&upstream).await;

    // (request start, extra headers and body, what the upstream reads
    // before it closes, what it sends first)
    type Upstream = fn(&mut RawConn) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    let cases: [(&str, &str, Upstream); 6] = [
        ("POST /body", "Content-Length: 5\r\n\r\nhello", |conn| {
            Box::pin(async move {
                conn.read_exact(5).await;
            })
        }),
        ("DELETE /body", "Content-Length: 5\r\n\r\nhello", |conn| {
            Box::pin(async move {
                conn.read_exact(5).await;
            })
        }),
        // An empty chunked body is still a body: its framing was sent.
        (
            "DELETE /chunked",
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            |conn| {
                Box::pin(async move {
                    conn.read_chunked().await;
                })
            },
        ),
        // hyper sends a GET's chunked body as no body at all, but keyrelay
        // cannot know it was empty before reading it: not sent twice.
        (
            "GET /chunked",
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            |_| Box::pin(async {}),
        ),
        // A GET whose answer had begun: a byte came back, never again.
        ("GET /begun", "\r\n", |conn| {
            Box::pin(async move {
                conn.send("HTTP/1.1 200 OK\r\ncontent-le").await;
            })
        }),
        ("GET /one-byte", "\r\n", |conn| {
            Box::pin(async move {
                conn.send("H").await;
            })
        }),
    ];
    for (start, rest, upstream_does) in cases {
        let mut idle = primed(&relay, &mut upstream).await;
        let text = format!(
            "{start} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{rest}",
            relay.addr()
        );
        let answer = send_raw(&relay, text, false);
        assert_eq!(
            idle.read_head().await.start_line,
            format!("{start} HTTP/1.1")
        );
        upstream_does(&mut idle).await;
        drop(idle);
        let answer = within("the answer", answer).await.expect("join");
        assert_eq!(answer.status(), 502, "{start}: {}", answer.body_text());
        assert_eq!(answer.json()["type"], "upstream_closed", "{start}");
        assert!(
            upstream.no_connection_pending(),
            "{start} reached the upstream exactly once"
        );
        report(
            "issue23",
            &[
                &format!("{start} (with a body, or an answer begun) on a reused connection closed before the answer ended"),
                "502 upstream_closed; reached the upstream exactly once",
            ],
        );
    }
    assert_eq!(relay.scrape().await.counter(RETRIES, &STALE), 0.0);
}

#[tokio::test]
async fn a_bodiless_request_on_a_warm_spare_closed_unanswered_goes_once_more() {
    let mut upstream = RawUpstream::start().await;
    let mut command = crate::support::binary();
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.url()])
        .args(["--warm-connections", "1", "--workers", "1"])
        .env("BASETEN_API_KEY", crate::support::KEY);
    let relay = AdminRelay::spawn(command).await;
    // The spare keyrelay opened at startup, silent until a request takes it.
    let mut spare = upstream.next_conn().await;

    let answer = send_raw(&relay, request(&relay, "GET /on-a-spare", ""), false);
    assert_eq!(spare.read_head().await.target(), "/on-a-spare");
    drop(spare);

    // Two connections come next: the resend's, dialled for it, and the
    // keeper's new spare. The request rides one of them.
    let mut first = upstream.next_conn().await;
    let mut second = upstream.next_conn().await;
    let mut carrier = tokio::select! {
        head = first.read_head() => {
            assert_eq!(head.target(), "/on-a-spare");
            first
        }
        head = second.read_head() => {
            assert_eq!(head.target(), "/on-a-spare");
            second
        }
    };
    carrier
        .send("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain")
        .await;
    let answer = within("the answer", answer).await.expect("join");
    assert_eq!(answer.status(), 200, "{}", answer.body_text());
    assert_eq!(answer.body_text(), "again");
    relay.wait_for_sample(RETRIES, &STALE, 1.0).await;
}

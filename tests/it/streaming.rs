//! Streaming without buffering, proved in lockstep: the mock upstream sends
//! frame k+1 only after the client has received frame k through keyrelay, so
//! any buffering would deadlock the test (and fail it at the step timeout)
//! instead of merely slowing it down. The same holds for request bodies in the
//! other direction. Framing (chunked vs Content-Length) and trailers are
//! checked here too, since they are part of relaying a stream faithfully.

use crate::support;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::test]
async fn raw_chunked_tokens_arrive_one_by_one() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let request = Request::post(relay.url("/production/predict"))
        .body(full(r#"{"prompt": "hi", "stream": true}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    let (mut tx, _dropped) = exchange.respond_streaming_with(
        http::Response::builder().header("content-type", "application/octet-stream"),
    );
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let mut body = response.into_body();

    for k in 0..50 {
        let token = Bytes::from(format!(" token{k}"));
        tx.send_data(token.clone()).await.expect("send");
        let got = next_data(&mut body).await.expect("frame").expect("data");
        assert_eq!(got, token, "frame {k} arrived alone and intact");
    }
    drop(tx);
    assert!(next_data(&mut body).await.is_none(), "stream ends cleanly");
    relay.stop().await;
}

#[tokio::test]
async fn sse_events_arrive_one_at_a_time_until_done() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(full(r#"{"model": "m", "stream": true, "messages": []}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    let (mut tx, _dropped) = exchange.respond_streaming_with(
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "private"),
    );
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // Proxies in front of keyrelay (nginx) must not buffer the events either;
    // the upstream's own cache-control is kept.
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    assert_eq!(response.headers()["cache-control"], "private");
    assert!(
        response.headers().get("content-length").is_none(),
        "an event stream has no length"
    );
    let mut body = response.into_body();

    for k in 0..20 {
        let event = format!(
            "data: {{\"id\":\"chatcmpl-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{k}\"}}}}]}}\n\n"
        );
        tx.send_data(Bytes::from(event.clone()))
            .await
            .expect("send event");
        recv_exact(&mut body, event.as_bytes(), &format!("event {k}")).await;
    }
    let done = "data: [DONE]\n\n";
    tx.send_data(Bytes::from_static(done.as_bytes()))
        .await
        .expect("send done");
    recv_exact(&mut body, done.as_bytes(), "the [DONE] event").await;
    drop(tx);
    assert!(
        next_data(&mut body).await.is_none(),
        "stream ends after [DONE]"
    );
    relay.stop().await;
}

#[tokio::test]
async fn h2c_client_receives_tokens_one_by_one() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = h2c_client();

    let request = Request::post(relay.url("/production/predict"))
        .body(full(r#"{"prompt": "hi", "stream": true}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    let (mut tx, _dropped) = exchange.respond_streaming();
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2, "client hop is h2c");
    let mut body = response.into_body();

    for k in 0..50 {
        let token = format!(" token{k}");
        tx.send_data(Bytes::from(token.clone()))
            .await
            .expect("send");
        recv_exact(&mut body, token.as_bytes(), &format!("frame {k}")).await;
    }
    drop(tx);
    assert!(next_data(&mut body).await.is_none(), "stream ends cleanly");
    relay.stop().await;
}

#[tokio::test]
async fn request_body_parts_reach_upstream_one_by_one() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    // The client feeds its body part by part; no length is known, so hyper sends it chunked.
    let (mut parts, body) = Channel::<Bytes, BoxError>::new(1);
    let request = Request::post(relay.url("/v1/audio/stream"))
        .header("content-type", "application/octet-stream")
        .body(body.boxed())
        .expect("request");
    let pending = tokio::spawn(client.request(request));

    // The request head must reach the upstream before the body is complete:
    // a proxy that collected the body first would never get here.
    let mut exchange = upstream.next().await;
    assert_eq!(
        exchange.request.headers()["transfer-encoding"],
        "chunked",
        "an upload of unknown length is forwarded chunked"
    );
    assert!(exchange.request.headers().get("content-length").is_none());

    for k in 0..30 {
        let part = format!("part {k};");
        parts
            .send_data(Bytes::from(part.clone()))
            .await
            .expect("client sends part");
        recv_exact(
            exchange.request.body_mut(),
            part.as_bytes(),
            &format!("upload part {k}"),
        )
        .await;
    }
    drop(parts);
    assert!(
        next_data(exchange.request.body_mut()).await.is_none(),
        "upload ends when the client ends it"
    );

    exchange.respond_full(200, "stored");
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let body = within("response body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "stored");
    relay.stop().await;
}

#[tokio::test]
async fn chunked_upstream_stays_chunked_and_ends_only_when_upstream_ends() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut raw = RawConn::connect(relay.addr).await;

    raw.send(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let exchange = upstream.next().await;
    let (mut tx, _dropped) = exchange.respond_streaming();

    let head = raw.head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.all("transfer-encoding"), ["chunked"]);
    assert!(
        head.all("content-length").is_empty(),
        "a chunked response must not carry a length: {:?}",
        head.headers
    );

    // Each upstream frame arrives as its own chunk before the next is sent. A
    // premature last chunk would show up here in place of a token.
    for k in 0..10 {
        let token = format!("token{k} ");
        tx.send_data(Bytes::from(token.clone()))
            .await
            .expect("send");
        let chunk = raw.chunk().await;
        assert_eq!(
            chunk.as_deref(),
            Some(token.as_bytes()),
            "chunk {k} is the token, not the end of the body"
        );
    }

    drop(tx);
    assert_eq!(raw.chunk().await, None, "0\r\n\r\n once the upstream ends");

    // The response ended exactly there: the same connection serves the next
    // request, whose status line would be garbled by any stray body bytes.
    raw.send(b"GET /v1/again HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    upstream.next().await.respond_full(200, "again");
    let head = raw.head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(raw.until_close().await, b"again");
    relay.stop().await;
}

#[tokio::test]
async fn fixed_length_upstream_keeps_content_length_and_no_chunking() {
    const BODY: &str = r#"{"object":"list","data":[{"id":"model-1"}]}"#;
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut raw = RawConn::connect(relay.addr).await;

    // `Connection: close` lets the test read to EOF and so see every byte after the head.
    raw.send(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let exchange = upstream.next().await;
    exchange.respond_full(200, BODY);

    let head = raw.head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.all("content-length"), [BODY.len().to_string()]);
    assert!(
        head.all("transfer-encoding").is_empty(),
        "a Content-Length response must not be re-chunked: {:?}",
        head.headers
    );
    assert_eq!(
        String::from_utf8_lossy(&raw.until_close().await),
        BODY,
        "exactly the body follows the head, without chunk framing"
    );
    relay.stop().await;
}

#[tokio::test]
async fn empty_body_keeps_content_length_zero() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut raw = RawConn::connect(relay.addr).await;

    raw.send(b"POST /v1/ack HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await;
    let exchange = upstream.next().await;
    exchange.respond(
        Response::builder()
            .header("content-length", "0")
            .body(empty())
            .expect("response"),
    );

    let head = raw.head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.all("content-length"), ["0"]);
    assert!(
        head.all("transfer-encoding").is_empty(),
        "an empty body must not become a chunked one: {:?}",
        head.headers
    );
    assert!(
        raw.until_close().await.is_empty(),
        "nothing follows the head"
    );
    relay.stop().await;
}

#[tokio::test]
async fn trailers_from_an_h2_upstream_reach_an_h2c_client() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("upstream_http2", "true")]).await;
    let client = h2c_client();

    // A gRPC-style unary call: trailers carry the status.
    let request = Request::post(relay.url("/pkg.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(b"\0\0\0\0\x03\x0a\x01x")))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    assert_eq!(
        exchange.request.version(),
        Version::HTTP_2,
        "upstream hop is HTTP/2, the precondition for upstream trailers"
    );
    let (mut tx, _dropped) = exchange
        .respond_streaming_with(Response::builder().header("content-type", "application/grpc"));
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let mut body = response.into_body();

    let message = Bytes::from_static(b"\0\0\0\0\x07\x0a\x05hello");
    tx.send_data(message.clone()).await.expect("send data");
    let frame = within("the data frame", body.frame())
        .await
        .expect("a frame")
        .expect("frame ok");
    assert_eq!(frame.into_data().expect("data frame"), message);

    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    tx.send_trailers(trailers).await.expect("send trailers");
    drop(tx);
    let frame = within("the trailers frame", body.frame())
        .await
        .expect("trailers were dropped: the body ended without them")
        .expect("frame ok");
    let got = frame
        .into_trailers()
        .unwrap_or_else(|frame| panic!("expected trailers, got {frame:?}"));
    assert_eq!(got.get("grpc-status").expect("grpc-status"), "0");
    assert_eq!(got.get("grpc-message").expect("grpc-message"), "ok");
    assert!(
        within("the end of the body", body.frame()).await.is_none(),
        "nothing after the trailers"
    );
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// Helpers local to this file
// ---------------------------------------------------------------------------

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads data frames until exactly `expected` has arrived, and checks it.
///
/// Frames may be split on the way (a proxy is free to re-chunk), so this
/// accumulates; it fails as soon as more than `expected` arrived, which is what
/// a proxy that held data back and then flushed it in one go would produce.
async fn recv_exact<B>(body: &mut B, expected: &[u8], what: &str)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut got = Vec::with_capacity(expected.len());
    // Each round adds at least one byte or ends the stream, so this is bounded.
    for _ in 0..=expected.len() {
        if got.len() >= expected.len() {
            break;
        }
        match next_data(body).await {
            Some(Ok(data)) => got.extend_from_slice(&data),
            Some(Err(err)) => panic!("{what}: body failed: {err:?}"),
            None => break,
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected),
        "{what} arrived alone and intact"
    );
}

/// A hand-written HTTP/1.1 client on a bare socket: the test sees the exact
/// bytes keyrelay puts on the wire (framing headers, chunk sizes, the final
/// `0\r\n\r\n`), which a real HTTP client would decode away.
struct RawConn {
    io: BufReader<TcpStream>,
}

/// The status line and headers of a raw response.
struct RawHead {
    status_line: String,
    headers: Vec<(String, String)>,
}

impl RawHead {
    fn status(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("malformed status line {:?}", self.status_line))
    }

    /// Every value of header `name` (case-insensitive), in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

impl RawConn {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let stream = within("connecting to keyrelay", TcpStream::connect(addr))
            .await
            .expect("connect to keyrelay");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            io: BufReader::new(stream),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("writing the request", self.io.get_mut().write_all(bytes))
            .await
            .expect("write request");
    }

    /// One CRLF-terminated line, without the CRLF.
    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        let n = within("a response line", self.io.read_until(b'\n', &mut line))
            .await
            .expect("read line");
        assert!(n > 0, "connection closed where a line was expected");
        assert!(
            line.ends_with(b"\r\n"),
            "line not CRLF-terminated: {:?}",
            String::from_utf8_lossy(&line)
        );
        line.truncate(line.len() - 2);
        String::from_utf8(line).expect("line is UTF-8")
    }

    async fn head(&mut self) -> RawHead {
        let status_line = self.line().await;
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "not an HTTP/1.1 status line: {status_line:?}"
        );
        let mut headers = Vec::new();
        // A response head has far fewer than 100 lines; the bound keeps a
        // misbehaving peer from looping the test.
        for _ in 0..100 {
            let line = self.line().await;
            if line.is_empty() {
                return RawHead {
                    status_line,
                    headers,
                };
            }
            let (name, value) = line.split_once(':').expect("header line has a colon");
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        panic!("response head never ended");
    }

    async fn exact(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        within("response bytes", self.io.read_exact(&mut buf))
            .await
            .expect("read exact");
        buf
    }

    /// Decodes one chunk of a chunked body: `Some(data)`, or `None` for the
    /// final zero-size chunk (checked to carry no trailers).
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let size_line = self.line().await;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk-size line {size_line:?}"));
        if size == 0 {
            assert_eq!(self.line().await, "", "last chunk ends with an empty line");
            return None;
        }
        let data = self.exact(size).await;
        assert_eq!(self.exact(2).await, b"\r\n", "chunk data ends with CRLF");
        Some(data)
    }

    /// Everything until the peer closes the connection.
    async fn until_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        within("the connection to close", self.io.read_to_end(&mut rest))
            .await
            .expect("read to end");
        rest
    }
}

//! What reaches the upstream, and what comes back, is the client's request and
//! the upstream's response with only hop-by-hop details changed.
//!
//! Request targets and hop-by-hop headers are sent with a raw TCP client:
//! hyper's client would normalise or reject some of what real clients (and
//! attackers) send, and the point is to see what keyrelay does with the bytes.

use crate::support;

use crate::support::raw;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use raw::{assert_keyrelay_error, RawResponse, RawUpstream};
use support::*;

/// Sends `request` raw to keyrelay while the test answers at `upstream`.
///
/// Returns the request the upstream saw (head and body) and the client's response.
async fn raw_through(
    relay: &Relay,
    upstream: &mut MockUpstream,
    request: String,
    answer: http::Response<TestBody>,
) -> (http::request::Parts, Bytes, RawResponse) {
    let addr = relay.addr;
    let client = tokio::spawn(async move { raw::exchange(addr, &request).await });
    let (parts, body) = take_request(upstream.next().await, answer).await;
    let response = within("the raw client's response", client)
        .await
        .expect("raw client");
    (parts, body, response)
}

/// Reads the whole request an exchange carries, then answers it.
async fn take_request(
    mut exchange: Exchange,
    answer: http::Response<TestBody>,
) -> (http::request::Parts, Bytes) {
    let body = within("the request body", exchange.request.body_mut().collect())
        .await
        .expect("request body")
        .to_bytes();
    let (mut parts, ()) = Request::builder()
        .method(exchange.request.method().clone())
        .uri(exchange.request.uri().clone())
        .version(exchange.request.version())
        .body(())
        .expect("copy of the request head")
        .into_parts();
    parts.headers = exchange.request.headers().clone();
    exchange.respond(answer);
    (parts, body)
}

#[tokio::test]
async fn request_target_reaches_upstream_byte_for_byte() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    // Each of these is something a normalising proxy would "fix": an encoded
    // slash, a dot segment, `+` vs `%20`, an empty value, a repeated key, empty
    // segments, an empty query.
    let targets = [
        "/a/b%2Fc/../d?x=1&y=%20+z&empty=&x=2",
        "//double//slash/./",
        "/v1/chat/completions?",
        "/%7Euser/%E2%9C%93?q=%3D%26",
    ];
    for target in targets {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            relay.addr
        );
        let (parts, _, response) = raw_through(&relay, &mut upstream, request, ok("ok")).await;
        assert_eq!(response.status(), 200, "status for {target}");
        assert_eq!(parts.method, Method::GET);
        assert_eq!(
            parts.uri.to_string(),
            target,
            "target as the upstream received it"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn upstream_base_path_is_prefixed_to_request_path() {
    let mut upstream = MockUpstream::start().await;
    // The trailing slash of the configured URL must not double up.
    let relay = Relay::start(&format!("{}/base/", upstream.url()), &[]).await;
    let client = http1_client();

    for (sent, expected) in [
        ("/v1/chat", "/base/v1/chat"),
        ("/v1/chat?stream=true&n=2", "/base/v1/chat?stream=true&n=2"),
        ("/", "/base/"),
    ] {
        let request = Request::get(relay.url(sent))
            .body(empty())
            .expect("request");
        let pending = tokio::spawn(client.request(request));
        let (parts, _) = take_request(upstream.next().await, ok("ok")).await;
        assert_eq!(parts.uri.to_string(), expected, "for {sent}");
        let response = within("response", pending)
            .await
            .expect("join")
            .expect("response");
        assert_eq!(response.status(), 200);
    }
    relay.stop().await;
}

#[tokio::test]
async fn upstream_receives_its_own_authority_as_host() {
    let mut upstream = MockUpstream::start().await;
    // The client-side name must be accepted by the host check to reach the upstream.
    let relay = Relay::start(&upstream.url(), &[("allowed_hosts", "client-side.example")]).await;

    let request =
        "GET /v1/models HTTP/1.1\r\nHost: client-side.example:9999\r\nConnection: close\r\n\r\n"
            .to_owned();
    let (parts, _, response) = raw_through(&relay, &mut upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header_values(&parts.headers, "host"),
        [upstream.addr.to_string().as_str()],
        "exactly one Host, the upstream's"
    );
    relay.stop().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let request = format!(
        "GET /hop HTTP/1.1\r\n\
         Host: {}\r\n\
         Connection: close, x-hop-req\r\n\
         X-Hop-Req: for keyrelay only\r\n\
         Keep-Alive: timeout=5, max=100\r\n\
         TE: gzip\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: websocket\r\n\
         X-End-To-End: kept\r\n\
         \r\n",
        relay.addr
    );
    let (parts, _, response) = raw_through(&relay, &mut upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.body_text(), "ok");
    for name in [
        "connection",
        "x-hop-req",
        "keep-alive",
        "te",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            parts.headers.get(name).is_none(),
            "{name} reached the upstream: {:?}",
            parts.headers
        );
    }
    assert_eq!(header_values(&parts.headers, "x-end-to-end"), ["kept"]);
    relay.stop().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_relayed() {
    // Raw upstream: a hyper server might add or drop some of these itself.
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let request = Request::get(relay.url("/hop"))
        .body(empty())
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send(
        "HTTP/1.1 200 OK\r\n\
         Connection: x-hop\r\n\
         X-Hop: 1\r\n\
         Keep-Alive: timeout=5, max=100\r\n\
         Proxy-Connection: keep-alive\r\n\
         x-baseten-request-id: req-hop\r\n\
         content-length: 2\r\n\
         \r\n\
         ok",
    )
    .await;
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    for name in ["connection", "x-hop", "keep-alive", "proxy-connection"] {
        assert!(
            headers.get(name).is_none(),
            "{name} reached the client: {headers:?}"
        );
    }
    assert_eq!(header_values(&headers, "x-baseten-request-id"), ["req-hop"]);
    assert_eq!(body_bytes(response).await, "ok");
    relay.stop().await;
}

/// A gzip member header followed by bytes that are not valid deflate data:
/// any attempt to decompress (or re-encode) them would change or reject them.
fn compressed_looking_bytes() -> Bytes {
    let mut bytes = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff];
    bytes.extend((0u8..=255).rev());
    bytes.extend_from_slice(b"\r\n0\r\n\r\n\xff\xfe");
    Bytes::from(bytes)
}

#[tokio::test]
async fn end_to_end_headers_and_encoded_bodies_pass_untouched() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let payload = compressed_looking_bytes();
    let request = Request::post(relay.url("/v1/upload"))
        .header("content-encoding", "gzip")
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, br")
        .header("x-request-tag", "abc")
        .body(full(payload.clone()))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let answer = http::Response::builder()
        .header("content-encoding", "gzip")
        .header("content-type", "application/json")
        .header("vary", "accept-encoding")
        .header("x-baseten-request-id", "req-123")
        .body(full(payload.clone()))
        .expect("answer");
    let (parts, received) = take_request(upstream.next().await, answer).await;
    assert_eq!(received, payload, "request body bytes unchanged");
    assert_eq!(header_values(&parts.headers, "content-encoding"), ["gzip"]);
    assert_eq!(
        header_values(&parts.headers, "accept-encoding"),
        ["gzip, br"]
    );
    assert_eq!(header_values(&parts.headers, "x-request-tag"), ["abc"]);
    assert_eq!(
        header_values(&parts.headers, "content-length"),
        [payload.len().to_string().as_str()]
    );

    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(header_values(&headers, "content-encoding"), ["gzip"]);
    assert_eq!(header_values(&headers, "vary"), ["accept-encoding"]);
    assert_eq!(header_values(&headers, "x-baseten-request-id"), ["req-123"]);
    assert_eq!(
        header_values(&headers, "content-length"),
        [payload.len().to_string().as_str()],
        "a Content-Length response stays one"
    );
    assert_eq!(
        body_bytes(response).await,
        payload,
        "response body bytes unchanged"
    );
    relay.stop().await;
}

#[tokio::test]
async fn te_trailers_is_forwarded_for_grpc_style_clients() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    for sent in ["trailers", "gzip, trailers"] {
        let request = format!(
            "POST /pkg.Service/Method HTTP/1.1\r\nHost: {}\r\nTE: {sent}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            relay.addr
        );
        let (parts, _, response) = raw_through(&relay, &mut upstream, request, ok("ok")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header_values(&parts.headers, "te"),
            ["trailers"],
            "for TE: {sent}"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn absolute_form_target_cannot_redirect_to_another_host() {
    let mut upstream = MockUpstream::start().await;
    let mut elsewhere = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let request = format!(
        "GET http://{0}/steal?what=key HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        elsewhere.addr
    );
    let (parts, _, response) = raw_through(&relay, &mut upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(parts.uri.to_string(), "/steal?what=key");
    assert_eq!(
        header_values(&parts.headers, "host"),
        [upstream.addr.to_string().as_str()]
    );
    assert!(elsewhere.nothing_received(), "the other host got a request");
    assert_eq!(
        upstream_connections(&elsewhere),
        0,
        "keyrelay connected to the host named in the request target"
    );
    relay.stop().await;
}

#[tokio::test]
async fn connect_is_refused_with_405_and_reaches_nobody() {
    let mut upstream = MockUpstream::start().await;
    let mut elsewhere = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let response = raw::exchange(
        relay.addr,
        &format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", elsewhere.addr),
    )
    .await;
    assert_keyrelay_error(&response, 405, "connect_not_supported");
    let json = response.json();
    assert!(json["error"]
        .as_str()
        .is_some_and(|e| e.contains("CONNECT")));

    for (name, mock) in [("upstream", &mut upstream), ("other host", &mut elsewhere)] {
        assert!(mock.nothing_received(), "the {name} got a request");
        assert_eq!(
            upstream_connections(mock),
            0,
            "keyrelay connected to the {name}"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn asterisk_target_is_400_and_not_forwarded() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let response = raw::exchange(
        relay.addr,
        &format!(
            "OPTIONS * HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            relay.addr
        ),
    )
    .await;
    assert_keyrelay_error(&response, 400, "bad_request_target");
    assert!(upstream.nothing_received());
    relay.stop().await;
}

#[tokio::test]
async fn every_method_is_forwarded_as_sent() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    for method in [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let sends_body = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        let body = if sends_body {
            full(format!("{method} body"))
        } else {
            empty()
        };
        let request = Request::builder()
            .method(method.clone())
            .uri(relay.url("/resource/7"))
            .body(body)
            .expect("request");
        let pending = tokio::spawn(client.request(request));
        // The body says which method produced it; for HEAD only its length travels.
        let answer = http::Response::builder()
            .header("x-seen-method", method.as_str())
            .body(full(format!("answer to {method}")))
            .expect("answer");
        let (parts, received) = take_request(upstream.next().await, answer).await;
        assert_eq!(parts.method, method);
        assert_eq!(parts.uri.to_string(), "/resource/7");
        if sends_body {
            assert_eq!(received, format!("{method} body"), "{method} body");
        } else {
            assert!(received.is_empty(), "{method} grew a body: {received:?}");
        }

        let response = within("response", pending)
            .await
            .expect("join")
            .expect("response");
        assert_eq!(response.status(), 200, "{method}");
        assert_eq!(response.headers()["x-seen-method"], method.as_str());
        let expected_len = format!("answer to {method}").len().to_string();
        if method == Method::HEAD {
            assert_eq!(
                response
                    .headers()
                    .get("content-length")
                    .map(|v| v.as_bytes()),
                Some(expected_len.as_bytes()),
                "HEAD keeps the Content-Length a GET would have"
            );
            assert!(body_bytes(response).await.is_empty());
        } else {
            assert_eq!(body_bytes(response).await, format!("answer to {method}"));
        }
    }
    relay.stop().await;
}

#[tokio::test]
async fn h2c_client_is_forwarded_like_http1() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = h2c_client();

    let request = Request::post(relay.url("/a/b%2Fc/../d?x=1&y=%20+z&empty=&x=2"))
        .header("content-type", "application/json")
        .header("te", "trailers")
        .header("x-request-tag", "h2")
        .body(full(r#"{"prompt": "hi"}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let answer = http::Response::builder()
        .header("x-baseten-request-id", "req-h2")
        .body(full("from upstream"))
        .expect("answer");
    let (parts, received) = take_request(upstream.next().await, answer).await;
    assert_eq!(parts.method, Method::POST);
    assert_eq!(
        parts.uri.to_string(),
        "/a/b%2Fc/../d?x=1&y=%20+z&empty=&x=2"
    );
    assert_eq!(
        header_values(&parts.headers, "host"),
        [upstream.addr.to_string().as_str()]
    );
    assert_eq!(
        header_values(&parts.headers, "authorization"),
        [EXPECTED_AUTH]
    );
    assert_eq!(header_values(&parts.headers, "x-request-tag"), ["h2"]);
    assert_eq!(header_values(&parts.headers, "te"), ["trailers"]);
    assert_eq!(received, r#"{"prompt": "hi"}"#);

    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-baseten-request-id"], "req-h2");
    assert_eq!(body_bytes(response).await, "from upstream");
    relay.stop().await;
}

/// `set_request_headers` replaces every value the client sent under that
/// name (the upstream sees exactly the configured one) and leaves other
/// headers alone.
#[tokio::test]
async fn static_request_headers_replace_what_the_client_sent() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[(
            "set_request_headers",
            "x-baseten-environment: staging, X-Team: ml",
        )],
    )
    .await;

    let request = "GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\
                   x-team: evil\r\nX-Team: evil-too\r\nx-other: kept\r\nConnection: close\r\n\r\n"
        .to_owned();
    let (parts, _, response) = raw_through(&relay, &mut upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header_values(&parts.headers, "x-team"), ["ml"]);
    assert_eq!(
        header_values(&parts.headers, "x-baseten-environment"),
        ["staging"]
    );
    assert_eq!(header_values(&parts.headers, "x-other"), ["kept"]);
    relay.stop().await;
}

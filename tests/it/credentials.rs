//! The credential contract: the upstream gets keyrelay's key exactly once, in
//! the configured header; whatever credentials the client sent never leave
//! the machine; and nothing keyrelay sends back to the client contains the key.
//!
//! Client SDKs insist on sending something: the OpenAI SDK sends
//! `Authorization: Bearer <placeholder>`, the Anthropic SDK `x-api-key`. Those
//! placeholders must be replaced, not forwarded next to the real key (an
//! upstream seeing two `Authorization` headers may pick either).

use crate::support;

use crate::support::guard_util::forwarded;

use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use keyrelay::config;
use support::*;

/// Sends a GET with `headers` through keyrelay (HTTP/1.1) and returns the
/// headers the upstream received.
async fn upstream_headers(
    relay: &Relay,
    upstream: &mut MockUpstream,
    headers: &[(&str, &str)],
) -> HeaderMap {
    upstream_headers_with(
        &http1_client(),
        relay.url("/v1/chat/completions"),
        upstream,
        headers,
    )
    .await
}

/// [`upstream_headers`] with any client and URL.
async fn upstream_headers_with(
    client: &TestClient,
    url: String,
    upstream: &mut MockUpstream,
    headers: &[(&str, &str)],
) -> HeaderMap {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(empty()).expect("request");
    let (seen, response) = round_trip(client, upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    seen
}

/// Fails if any header other than `except` carries `needle`.
fn assert_only_in(headers: &HeaderMap, except: &str, needle: &str) {
    for (name, value) in headers {
        if name == except {
            continue;
        }
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(needle),
            "{needle:?} appears in {name}: {headers:?}"
        );
    }
}

#[tokio::test]
async fn key_is_injected_exactly_once() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let seen = upstream_headers(&relay, &mut upstream, &[]).await;
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    assert_only_in(&seen, "authorization", KEY);
    relay.stop().await;
}

#[tokio::test]
async fn openai_sdk_bearer_placeholder_is_replaced_not_forwarded() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    // Two of them, as a misconfigured client stack might send.
    let seen = upstream_headers(
        &relay,
        &mut upstream,
        &[
            ("authorization", "Bearer placeholder"),
            ("authorization", "Bearer second-placeholder"),
        ],
    )
    .await;
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    assert_only_in(&seen, "", "placeholder");
    relay.stop().await;
}

#[tokio::test]
async fn anthropic_sdk_x_api_key_is_removed() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let seen = upstream_headers(
        &relay,
        &mut upstream,
        &[
            ("x-api-key", "sk-ant-placeholder"),
            ("anthropic-version", "2023-06-01"),
        ],
    )
    .await;
    assert!(
        seen.get("x-api-key").is_none(),
        "x-api-key forwarded: {seen:?}"
    );
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    // Only credentials are scrubbed, not the SDK's other headers.
    assert_eq!(header_values(&seen, "anthropic-version"), ["2023-06-01"]);
    relay.stop().await;
}

#[tokio::test]
async fn proxy_authorization_is_removed() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let seen = upstream_headers(
        &relay,
        &mut upstream,
        &[("proxy-authorization", "Basic dXNlcjpjb3Jwb3JhdGUtcGFzcw==")],
    )
    .await;
    assert!(
        seen.get("proxy-authorization").is_none(),
        "proxy-authorization forwarded: {seen:?}"
    );
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    relay.stop().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_the_injected_key() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    // Raw, so the Connection header reaches keyrelay exactly as written.
    let addr = relay.addr;
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\n\
         Connection: authorization, close\r\n\
         Authorization: Bearer placeholder\r\n\r\n"
    );
    let (seen, response) = forwarded(&mut upstream, addr, &request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    relay.stop().await;
}

#[tokio::test]
async fn custom_header_and_template_carry_the_key() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("auth_header", "baseten-authorization"),
            ("auth_template", "Api-Key {key}"),
        ],
    )
    .await;

    let seen = upstream_headers(
        &relay,
        &mut upstream,
        &[
            ("authorization", "Bearer placeholder"),
            // A client value of the custom header is replaced, never kept beside the key.
            ("baseten-authorization", "Api-Key client-supplied"),
        ],
    )
    .await;
    assert_eq!(
        header_values(&seen, "baseten-authorization"),
        [EXPECTED_AUTH]
    );
    assert!(
        seen.get("authorization").is_none(),
        "the default header is still scrubbed: {seen:?}"
    );
    assert_only_in(&seen, "baseten-authorization", KEY);
    relay.stop().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_a_custom_credential_header() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("auth_header", "baseten-authorization")]).await;

    let addr = relay.addr;
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\n\
         Connection: baseten-authorization, close\r\n\r\n"
    );
    let (seen, response) = forwarded(&mut upstream, addr, &request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header_values(&seen, "baseten-authorization"),
        [EXPECTED_AUTH]
    );
    relay.stop().await;
}

#[tokio::test]
async fn bearer_template_is_rendered() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("auth_template", "Bearer {key}")]).await;

    let seen = upstream_headers(
        &relay,
        &mut upstream,
        &[("authorization", "Bearer placeholder")],
    )
    .await;
    assert_eq!(
        header_values(&seen, "authorization"),
        [format!("Bearer {KEY}")]
    );
    relay.stop().await;
}

#[tokio::test]
async fn h2c_client_credentials_are_replaced_too() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let seen = upstream_headers_with(
        &h2c_client(),
        relay.url("/v1/chat/completions"),
        &mut upstream,
        &[
            ("authorization", "Bearer placeholder"),
            ("x-api-key", "sk-ant-placeholder"),
        ],
    )
    .await;
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    assert!(seen.get("x-api-key").is_none());
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// key_env
// ---------------------------------------------------------------------------

/// A key distinct from [`KEY`], so the test can tell which variable was read.
const OTHER_KEY: &str = "kr-other-KEY-0a9b8c7d6e5f";

#[tokio::test]
async fn key_env_selects_the_variable_holding_the_key() {
    let mut upstream = MockUpstream::start().await;
    let mut sources = support::sources(&upstream.url(), &[("key_env", "MY_MODEL_KEY")]);
    // BASETEN_API_KEY stays set too: keyrelay must read the named variable, not the default.
    sources
        .env
        .insert("MY_MODEL_KEY".to_owned(), OTHER_KEY.to_owned());
    let relay = Relay::from_sources(&sources).await;

    let request = Request::get(format!("http://{}/v1/models", relay.addr))
        .body(empty())
        .expect("request");
    let (seen, response) = round_trip(&http1_client(), &mut upstream, request, ok("ok")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header_values(&seen, "authorization"),
        [format!("Api-Key {OTHER_KEY}")]
    );
    assert_only_in(&seen, "", KEY);
    relay.stop().await;
}

#[tokio::test]
async fn key_env_naming_an_unset_variable_is_rejected_by_name() {
    let sources = support::sources("http://127.0.0.1:9", &[("key_env", "UNSET_MODEL_KEY")]);
    let err = config::load(&sources).expect_err("no key, no proxy");
    let text = err.to_string();
    assert!(
        err.problems
            .iter()
            .any(|p| p.setting == "key_env" && p.message.contains("UNSET_MODEL_KEY")),
        "{text}"
    );
    assert!(
        !text.contains(KEY),
        "the error echoes another variable's key: {text}"
    );
}

// ---------------------------------------------------------------------------
// Nothing keyrelay sends to the client contains the key
// ---------------------------------------------------------------------------

/// Fails if the full bytes of `response` (head and body) contain the key.
fn assert_no_key(what: &str, response: &raw::RawResponse) {
    let text = String::from_utf8_lossy(&response.raw);
    assert!(
        !text.contains(KEY),
        "{what}: response leaks the key: {text}"
    );
    println!("{what}: {} {}", response.status(), response.body_text());
}

#[tokio::test]
async fn responses_never_contain_the_key() {
    // Success, and an upstream error relayed as is.
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("response_header_timeout", "200ms")]).await;
    for status in [200, 401] {
        let addr = relay.addr;
        let client = tokio::spawn(async move { raw::get(addr, "/v1/models").await });
        upstream
            .next()
            .await
            .respond_full(status, r#"{"error": "Invalid API key"}"#);
        let response = within("raw response", client).await.expect("raw client");
        assert_eq!(response.status(), status);
        assert_no_key(&format!("upstream {status}"), &response);
    }

    // keyrelay's own errors, before and after reaching the upstream.
    let addr = relay.addr;
    let client = tokio::spawn(async move { raw::get(addr, "/slow").await });
    let silent = upstream.next().await;
    let response = within("raw response", client).await.expect("raw client");
    assert_eq!(response.status(), 504);
    assert_no_key("header timeout", &response);
    drop(silent);

    let connect = raw::exchange(
        relay.addr,
        "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(connect.status(), 405);
    assert_no_key("CONNECT", &connect);

    let asterisk = raw::exchange(
        relay.addr,
        "OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(asterisk.status(), 400);
    assert_no_key("OPTIONS *", &asterisk);
    relay.stop().await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    for (what, url) in [
        ("refused", format!("http://127.0.0.1:{port}")),
        ("dns", "https://does-not-exist.invalid".to_owned()),
    ] {
        let relay = Relay::start(&url, &[]).await;
        let response = raw::get(relay.addr, "/v1/models").await;
        assert_eq!(response.status(), 502, "{what}");
        assert_no_key(what, &response);
        relay.stop().await;
    }
}

#[tokio::test]
async fn upstream_sees_the_key_only_in_the_credential_header_with_a_body() {
    // A POST body and many headers: the key must not be copied anywhere else.
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();
    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer placeholder")
        .body(full(r#"{"model": "m", "messages": []}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let mut exchange = upstream.next().await;
    let body = within("request body", exchange.request.body_mut().collect())
        .await
        .expect("body")
        .to_bytes();
    let seen = exchange.request.headers().clone();
    exchange.respond_full(200, "ok");
    within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(body, r#"{"model": "m", "messages": []}"#);
    assert_eq!(header_values(&seen, "authorization"), [EXPECTED_AUTH]);
    assert_only_in(&seen, "authorization", KEY);
    relay.stop().await;
}

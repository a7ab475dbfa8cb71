//! Admission, attacked through real sockets: DNS-rebinding `Host` values,
//! cross-site browser requests and preflights, local access tokens and their
//! rate limit, the non-loopback bind guard, and the path policy.
//!
//! Requests whose exact bytes matter (a hostile `Host`, none at all, HTTP/1.0,
//! absolute-form targets) go through the raw TCP client. Every refusal is
//! checked two ways: keyrelay's JSON error reaches the client, and the mock
//! upstream sees nothing (the request races the upstream, so a forwarded
//! request fails the test at once instead of timing out).

use crate::support;

use crate::support::raw;

use crate::support::guard_util;

use std::process::Stdio;

use bytes::Bytes;
use guard_util::*;
use http::{Request, Response};
use keyrelay::config::{self, OverrideValue, Sources};
use raw::assert_keyrelay_error;
use support::*;

/// The origin the CORS tests allow.
const APP_ORIGIN: &str = "http://localhost:3000";

/// A local access token held in an environment variable; the variable names it.
/// (Not `KEYRELAY_*`: those variables are keyrelay's own settings.)
const ENV_TOKEN_VAR: &str = "FRONTEND_TOKEN";
const ENV_TOKEN: &str = "tok-frontend-3b8e1f0a9c7d5e2b";

/// A local access token held in a file; the file name names it.
const FILE_TOKEN_NAME: &str = "batch-token";
const FILE_TOKEN: &str = "tok-batch-6a2d9e4c1f8b7a30";

/// A raw HTTP/1.1 request with the given `Host` line (or none) and extra header lines.
fn with_host(method: &str, target: &str, host: Option<&str>, headers: &[(&str, &str)]) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\n");
    if let Some(host) = host {
        text.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    text
}

/// A raw request to a loopback `Host`, with extra header lines and a body.
fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    text
}

// ---------------------------------------------------------------------------
// 1. Host: DNS rebinding
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rebinding_host_names_are_refused_and_reach_nothing() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let port = relay.addr.port();
    let mut hosts: Vec<String> = Vec::new();
    for name in [
        // Attacker-controlled names that resolve to 127.0.0.1.
        "evil.example",
        "localhost.evil.example",
        "localhost.evil.example.",
        "127.0.0.1.nip.io",
        "evilocalhost",
        // Other spellings of "this machine" a rebinding page could use.
        "127.0.0.2",
        "0.0.0.0",
        "2130706433",
        "0x7f000001",
        "127.1",
        "[::2]",
        "[::]",
    ] {
        hosts.push(name.to_owned());
        hosts.push(format!("{name}:{port}"));
    }
    hosts.extend(["localhost:http".to_owned(), "localhost:".to_owned()]);

    for host in &hosts {
        let response = refused(
            &mut upstream,
            relay.addr,
            &with_host("GET", "/v1/models", Some(host), &[]),
        )
        .await;
        assert_keyrelay_error(&response, 403, "host_not_allowed");
        assert!(
            response.header("access-control-allow-origin").is_none(),
            "{host}"
        );
    }
    // A rebinding page also sends its own origin; the host check still answers.
    let response = refused(
        &mut upstream,
        relay.addr,
        &with_host(
            "POST",
            "/v1/chat/completions",
            Some(&format!("evil.example:{port}")),
            &[
                ("Origin", &format!("http://evil.example:{port}")),
                ("Content-Type", "text/plain"),
            ],
        ),
    )
    .await;
    assert_keyrelay_error(&response, 403, "host_not_allowed");

    assert_eq!(
        upstream_connections(&upstream),
        0,
        "keyrelay must not even connect upstream for a refused Host"
    );
    relay.stop().await;
}

#[tokio::test]
async fn empty_missing_and_conflicting_hosts_are_refused() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let port = relay.addr.port();
    let cases = [
        (
            "empty Host",
            "GET /v1/models HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n".to_owned(),
        ),
        (
            "blank Host",
            "GET /v1/models HTTP/1.1\r\nHost:    \r\nConnection: close\r\n\r\n".to_owned(),
        ),
        (
            "HTTP/1.1 without Host",
            "GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned(),
        ),
        (
            "HTTP/1.0 without Host",
            "GET /v1/models HTTP/1.0\r\n\r\n".to_owned(),
        ),
        (
            "HTTP/1.0 with an attacker Host",
            "GET /v1/models HTTP/1.0\r\nHost: evil.example\r\n\r\n".to_owned(),
        ),
        (
            "a second, hostile Host",
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: localhost:{port}\r\nHost: evil.example\r\n\
                 Connection: close\r\n\r\n"
            ),
        ),
        (
            "absolute-form naming an attacker host",
            format!(
                "GET http://evil.example:{port}/v1/models HTTP/1.1\r\nHost: localhost:{port}\r\n\
                 Connection: close\r\n\r\n"
            ),
        ),
        (
            "absolute-form to localhost with an attacker Host",
            format!(
                "GET http://localhost:{port}/v1/models HTTP/1.1\r\nHost: evil.example\r\n\
                 Connection: close\r\n\r\n"
            ),
        ),
    ];
    for (what, request) in &cases {
        let response = refused(&mut upstream, relay.addr, request).await;
        assert_eq!(response.status(), 403, "{what}: {:?}", response.head);
        assert_keyrelay_error(&response, 403, "host_not_allowed");
    }
    assert_eq!(upstream_connections(&upstream), 0);
    relay.stop().await;
}

#[tokio::test]
async fn loopback_hosts_in_every_spelling_and_configured_hosts_are_accepted() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[("allowed_hosts", "keyrelay.internal,Models.Team.Svc.")],
    )
    .await;
    let port = relay.addr.port();
    let accepted = [
        "localhost".to_owned(),
        "LOCALHOST".to_owned(),
        "LocalHost.".to_owned(),
        format!("localhost:{port}"),
        format!("localhost.:{port}"),
        "127.0.0.1".to_owned(),
        format!("127.0.0.1:{port}"),
        "127.0.0.1.".to_owned(),
        "[::1]".to_owned(),
        format!("[::1]:{port}"),
        "keyrelay.internal".to_owned(),
        "KEYRELAY.INTERNAL.:8080".to_owned(),
        "models.team.svc".to_owned(),
        format!("models.team.svc:{port}"),
    ];
    for host in &accepted {
        let (_, response) = forwarded(
            &mut upstream,
            relay.addr,
            &with_host("GET", "/v1/models", Some(host), &[]),
            ok("ok"),
        )
        .await;
        assert_eq!(response.status(), 200, "{host}: {:?}", response.head);
        assert_eq!(response.body_text(), "ok");
    }
    // Configured names are exact, not suffixes or prefixes.
    for host in [
        "evil.keyrelay.internal",
        "keyrelay.internal.evil.example",
        "keyrelay.internals",
        "team.svc",
    ] {
        let response = refused(
            &mut upstream,
            relay.addr,
            &with_host("GET", "/v1/models", Some(host), &[]),
        )
        .await;
        assert_keyrelay_error(&response, 403, "host_not_allowed");
    }
    relay.stop().await;
}

#[tokio::test]
async fn h2c_with_a_hostile_authority_is_refused() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let port = relay.addr.port();

    for (authority, host_header) in [
        (format!("evil.example:{port}"), None),
        (format!("127.0.0.1.nip.io:{port}"), None),
        ("2130706433".to_owned(), None),
        // Good :authority, hostile Host header: every authority must pass.
        (format!("localhost:{port}"), Some("evil.example")),
    ] {
        let mut builder = Request::get(format!("http://{authority}/v1/models"));
        if let Some(host) = host_header {
            builder = builder.header("host", host);
        }
        let pending = tokio::spawn(h2_send(relay.addr, builder.body(empty()).expect("request")));
        let response = tokio::select! {
            response = pending => response.expect("h2 client"),
            exchange = upstream.next() => panic!(
                ":authority {authority} reached the upstream: {:?}",
                exchange.request.headers()
            ),
        };
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), 403, ":authority {authority}");
        let body = body_bytes(response).await;
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
        assert_eq!(json["type"], "host_not_allowed", "{json}");
    }
    assert_eq!(upstream_connections(&upstream), 0);

    // The same client with a loopback :authority is served: the refusals above
    // are about the name, not about h2c.
    let pending = tokio::spawn(h2_send(
        relay.addr,
        Request::get(format!("http://localhost:{port}/v1/models"))
            .body(empty())
            .expect("request"),
    ));
    upstream.next().await.respond_full(200, "ok");
    let response = within("h2 response", pending).await.expect("join");
    assert_eq!(response.status(), 200);
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// 2. Origin and CORS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn any_origin_is_refused_by_default_and_requests_without_one_pass() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let cross_site = [
        (
            "GET from a local app",
            request("GET", "/v1/models", &[("Origin", APP_ORIGIN)], ""),
        ),
        (
            "simple cross-site POST (text/plain, no preflight)",
            request(
                "POST",
                "/v1/chat/completions",
                &[
                    ("Origin", "https://evil.example"),
                    ("Content-Type", "text/plain"),
                ],
                r#"{"model":"m","messages":[{"role":"user","content":"spend"}]}"#,
            ),
        ),
        (
            "form POST",
            request(
                "POST",
                "/production/predict",
                &[
                    ("Origin", "https://evil.example"),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ],
                "a=b",
            ),
        ),
        (
            "Origin: null (sandboxed iframe, file://)",
            request(
                "POST",
                "/v1/chat/completions",
                &[("Origin", "null"), ("Content-Type", "text/plain")],
                "{}",
            ),
        ),
        (
            "preflight",
            request(
                "OPTIONS",
                "/v1/chat/completions",
                &[
                    ("Origin", "https://evil.example"),
                    ("Access-Control-Request-Method", "POST"),
                ],
                "",
            ),
        ),
    ];
    for (what, text) in &cross_site {
        let response = refused(&mut upstream, relay.addr, text).await;
        assert_eq!(response.status(), 403, "{what}: {:?}", response.head);
        assert_keyrelay_error(&response, 403, "origin_not_allowed");
        assert!(
            response.header("access-control-allow-origin").is_none(),
            "{what}: a refused origin must not be granted CORS"
        );
    }
    assert_eq!(upstream_connections(&upstream), 0);

    let (_, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request("POST", "/v1/chat/completions", &[], "{}"),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.header("access-control-allow-origin").is_none());
    relay.stop().await;
}

#[tokio::test]
async fn allowed_origin_gets_its_exact_origin_back_and_others_are_refused() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_origins", APP_ORIGIN)]).await;

    // The upstream tries to be permissive; keyrelay's exact answer must win.
    let answer = Response::builder()
        .header("x-baseten-request-id", "req-123")
        .header("access-control-allow-origin", "*")
        .header("vary", "accept-encoding")
        .body(full("ok"))
        .expect("response");
    let (_, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "POST",
            "/v1/chat/completions",
            &[("Origin", APP_ORIGIN), ("Content-Type", "application/json")],
            "{}",
        ),
        answer,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        count(&response, "access-control-allow-origin"),
        1,
        "{:?}",
        response.head
    );
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    let vary = list_values(&response, "vary");
    assert!(vary.contains(&"origin".to_owned()), "Vary: {vary:?}");
    let exposed = list_values(&response, "access-control-expose-headers");
    assert!(
        exposed.contains(&"x-baseten-request-id".to_owned()),
        "{exposed:?}"
    );
    assert_eq!(response.header("x-baseten-request-id"), Some("req-123"));
    assert_eq!(response.body_text(), "ok");

    for other in [
        "http://localhost:3001",
        "https://localhost:3000",
        "http://localhost:3000.evil.example",
        "http://127.0.0.1:3000",
        "null",
    ] {
        let response = refused(
            &mut upstream,
            relay.addr,
            &request("GET", "/v1/models", &[("Origin", other)], ""),
        )
        .await;
        assert_keyrelay_error(&response, 403, "origin_not_allowed");
        assert!(response.header("access-control-allow-origin").is_none());
    }
    // Two Origin headers, one allowed: refused, not granted.
    let response = refused(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/v1/models",
            &[("Origin", APP_ORIGIN), ("Origin", "https://evil.example")],
            "",
        ),
    )
    .await;
    assert_keyrelay_error(&response, 403, "origin_not_allowed");
    relay.stop().await;
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_is_answered_locally() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_origins", APP_ORIGIN)]).await;
    let asked_headers = "authorization, content-type, x-stainless-os";
    let preflight = |origin: &str| {
        request(
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", asked_headers),
                ("Access-Control-Request-Private-Network", "true"),
            ],
            "",
        )
    };

    let response = refused(&mut upstream, relay.addr, &preflight(APP_ORIGIN)).await;
    assert_eq!(response.status(), 204, "{:?}", response.head);
    assert!(response.body.is_empty());
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    assert!(list_values(&response, "vary").contains(&"origin".to_owned()));
    let methods = list_values(&response, "access-control-allow-methods");
    assert!(methods.contains(&"post".to_owned()), "{methods:?}");
    assert_eq!(
        response.header("access-control-allow-headers"),
        Some(asked_headers)
    );
    let max_age: u64 = response
        .header("access-control-max-age")
        .expect("max-age")
        .parse()
        .expect("integer max-age");
    assert!(max_age > 0);
    assert_eq!(
        response.header("access-control-allow-private-network"),
        Some("true")
    );

    let response = refused(
        &mut upstream,
        relay.addr,
        &preflight("https://evil.example"),
    )
    .await;
    assert_keyrelay_error(&response, 403, "origin_not_allowed");
    assert!(response.header("access-control-allow-origin").is_none());
    assert!(response
        .header("access-control-allow-private-network")
        .is_none());

    assert_eq!(
        upstream_connections(&upstream),
        0,
        "preflights are never forwarded"
    );
    relay.stop().await;
}

#[tokio::test]
async fn allowed_origin_streams_in_lockstep_with_cors_headers() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_origins", APP_ORIGIN)]).await;
    let client = http1_client();
    let pending = tokio::spawn(
        client.request(
            Request::post(relay.url("/v1/chat/completions"))
                .header("origin", APP_ORIGIN)
                .header("content-type", "application/json")
                .body(full(r#"{"stream":true}"#))
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.headers()["authorization"], EXPECTED_AUTH);
    let (mut tx, _dropped) = exchange.respond_streaming_with(
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("x-baseten-request-id", "req-stream"),
    );
    let response = within("streaming response head", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        APP_ORIGIN
    );
    let mut body = response.into_body();
    for frame in ["data: {\"t\":\"Hel\"}\n\n", "data: {\"t\":\"lo\"}\n\n"] {
        tx.send_data(Bytes::from(frame)).await.expect("send frame");
        let got = next_data(&mut body).await.expect("a frame").expect("data");
        assert_eq!(got, frame);
    }
    drop(tx);
    let end = next_data(&mut body).await;
    assert!(end.is_none(), "stream should end cleanly, got {end:?}");
    relay.stop().await;
}

#[tokio::test]
async fn keyrelay_errors_carry_cors_headers_for_an_allowed_origin() {
    let relay = Relay::start(
        &format!("http://127.0.0.1:{}", closed_port()),
        &[("allowed_origins", APP_ORIGIN)],
    )
    .await;
    let response = raw::exchange(
        relay.addr,
        &request("GET", "/v1/models", &[("Origin", APP_ORIGIN)], ""),
    )
    .await;
    assert_keyrelay_error(&response, 502, "upstream_refused");
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    assert!(list_values(&response, "vary").contains(&"origin".to_owned()));
    assert!(list_values(&response, "access-control-expose-headers")
        .contains(&"x-baseten-request-id".to_owned()));
    relay.stop().await;
}

#[tokio::test]
async fn admission_refusals_for_an_allowed_origin_are_readable_by_it() {
    // A page on an allowed origin must be able to read why keyrelay said no
    // (401, 429 with Retry-After, 403 path): without CORS headers the browser
    // hides the response and the app only sees an opaque network error.
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("cors-refusals");
    let sources = token_sources(
        &upstream.url(),
        &dir,
        &[
            ("allowed_origins", APP_ORIGIN),
            ("token_rate_limit", "1/m"),
            ("allowed_paths", "/v1/*"),
        ],
    );
    let relay = Relay::from_sources(&sources).await;
    let bearer = format!("Bearer {ENV_TOKEN}");

    let unauthorized = refused(
        &mut upstream,
        relay.addr,
        &request("GET", "/v1/models", &[("Origin", APP_ORIGIN)], ""),
    )
    .await;
    let path = refused(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/admin",
            &[("Origin", APP_ORIGIN), ("Authorization", &bearer)],
            "",
        ),
    )
    .await;
    // The path refusal above spent the token's only request of the minute
    // (tokens are checked before paths), so this one is rate limited.
    let limited = refused(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/v1/models",
            &[("Origin", APP_ORIGIN), ("Authorization", &bearer)],
            "",
        ),
    )
    .await;
    let mut missing = Vec::new();
    for (kind, status, response) in [
        ("unauthorized", 401, &unauthorized),
        ("path_not_allowed", 403, &path),
        ("rate_limited", 429, &limited),
    ] {
        assert_keyrelay_error(response, status, kind);
        if response.header("access-control-allow-origin") != Some(APP_ORIGIN) {
            missing.push(kind);
        }
    }
    assert!(
        missing.is_empty(),
        "refusals without Access-Control-Allow-Origin for the allowed origin: {missing:?}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_host_refusal_tells_an_allowed_page_why_and_a_rebinding_page_nothing() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_origins", APP_ORIGIN)]).await;
    let port = relay.addr.port();
    let host = format!("dev-box.local:{port}");

    // A page on an allowed origin that calls keyrelay by an unlisted name
    // learns it is the name, so the developer can add it to allowed_hosts.
    let allowed = refused(
        &mut upstream,
        relay.addr,
        &with_host("GET", "/v1/models", Some(&host), &[("Origin", APP_ORIGIN)]),
    )
    .await;
    assert_keyrelay_error(&allowed, 403, "host_not_allowed");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );

    // A rebinding page's origin is its own name: told nothing.
    let rebinding = format!("http://attacker.test:{port}");
    let hostile = refused(
        &mut upstream,
        relay.addr,
        &with_host(
            "POST",
            "/v1/chat/completions",
            Some(&format!("attacker.test:{port}")),
            &[("Origin", &rebinding)],
        ),
    )
    .await;
    assert_keyrelay_error(&hostile, 403, "host_not_allowed");
    assert!(hostile.header("access-control-allow-origin").is_none());
    relay.stop().await;
}

#[tokio::test]
async fn a_loopback_port_wildcard_allows_every_dev_server_port_and_nothing_else() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[("allowed_origins", "http://localhost:*")],
    )
    .await;

    for origin in ["http://localhost:5173", "http://localhost:3001"] {
        let (_, response) = forwarded(
            &mut upstream,
            relay.addr,
            &request("GET", "/v1/models", &[("Origin", origin)], ""),
            ok("ok"),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.header("access-control-allow-origin"),
            Some(origin),
            "the page's own origin is echoed, never the pattern"
        );
        // Without it the page's PerformanceResourceTiming hides Server-Timing.
        assert_eq!(response.header("timing-allow-origin"), Some(origin));
        assert!(response.header("server-timing").is_some());
    }
    for origin in [
        "http://127.0.0.1:5173",
        "https://localhost:5173",
        "http://localhost.evil.example:5173",
        "http://localhost:5173.evil.example",
    ] {
        let response = refused(
            &mut upstream,
            relay.addr,
            &request("GET", "/v1/models", &[("Origin", origin)], ""),
        )
        .await;
        assert_keyrelay_error(&response, 403, "origin_not_allowed");
        assert!(
            response.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn credentials_are_granted_to_allowed_origins_only_when_configured() {
    let mut upstream = MockUpstream::start().await;
    let preflight = request(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", APP_ORIGIN),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        "",
    );
    let call = request(
        "GET",
        "/v1/models",
        &[("Origin", APP_ORIGIN), ("Cookie", "s=1")],
        "",
    );
    // The upstream tries to grant credentials itself.
    let granting = || {
        Response::builder()
            .header("access-control-allow-credentials", "true")
            .body(full("ok"))
            .expect("response")
    };

    let relay = Relay::start(&upstream.url(), &[("allowed_origins", APP_ORIGIN)]).await;
    let answer = refused(&mut upstream, relay.addr, &preflight).await;
    assert_eq!(answer.status(), 204);
    assert!(answer.header("access-control-allow-credentials").is_none());
    let (_, response) = forwarded(&mut upstream, relay.addr, &call, granting()).await;
    assert!(
        response
            .header("access-control-allow-credentials")
            .is_none(),
        "only allow_credentials grants credentials: {:?}",
        response.head
    );
    relay.stop().await;

    let relay = Relay::start(
        &upstream.url(),
        &[
            ("allowed_origins", APP_ORIGIN),
            ("allow_credentials", "true"),
        ],
    )
    .await;
    let answer = refused(&mut upstream, relay.addr, &preflight).await;
    assert_eq!(answer.status(), 204);
    assert_eq!(
        answer.header("access-control-allow-credentials"),
        Some("true")
    );
    let (seen, response) = forwarded(&mut upstream, relay.addr, &call, ok("ok")).await;
    assert_eq!(
        response.header("access-control-allow-credentials"),
        Some("true")
    );
    // Cookies are not port-scoped: those of every app on localhost come
    // along, and they are not the upstream's business.
    assert!(seen.get("cookie").is_none(), "{seen:?}");
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    // A disallowed origin is granted nothing.
    let response = refused(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/v1/models",
            &[("Origin", "http://localhost:3001")],
            "",
        ),
    )
    .await;
    assert_keyrelay_error(&response, 403, "origin_not_allowed");
    assert!(response
        .header("access-control-allow-credentials")
        .is_none());
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Local access tokens
// ---------------------------------------------------------------------------

/// Sources with one token in the environment and one in a file (with the
/// trailing newline editors add), plus `extra` settings.
fn token_sources(upstream: &str, dir: &TempDir, extra: &[(&str, &str)]) -> Sources {
    let file = dir.write(FILE_TOKEN_NAME, &format!("{FILE_TOKEN}\n"));
    let file = file.to_str().expect("UTF-8 temp path").to_owned();
    let mut settings = vec![
        ("access_token_env", ENV_TOKEN_VAR),
        ("access_token_files", file.as_str()),
    ];
    settings.extend_from_slice(extra);
    let mut sources = support::sources(upstream, &settings);
    sources
        .env
        .insert(ENV_TOKEN_VAR.to_owned(), ENV_TOKEN.to_owned());
    sources
}

#[tokio::test]
async fn missing_wrong_and_near_miss_tokens_are_refused() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("tokens-refused");
    let relay = Relay::from_sources(&token_sources(&upstream.url(), &dir, &[])).await;

    let prefix = &ENV_TOKEN[..ENV_TOKEN.len() - 1];
    let extended = format!("{ENV_TOKEN}0");
    let upper = ENV_TOKEN.to_ascii_uppercase();
    let both = format!("{ENV_TOKEN}{FILE_TOKEN}");
    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no token", vec![]),
        (
            "wrong bearer",
            vec![("Authorization", bearer("tok-guess-000000000000"))],
        ),
        ("prefix", vec![("Authorization", bearer(prefix))]),
        ("extension", vec![("Authorization", bearer(&extended))]),
        ("other case", vec![("Authorization", bearer(&upper))]),
        ("two tokens glued", vec![("Authorization", bearer(&both))]),
        ("no scheme", vec![("Authorization", ENV_TOKEN.to_owned())]),
        (
            "Basic scheme",
            vec![("Authorization", format!("Basic {ENV_TOKEN}"))],
        ),
        (
            "empty bearer",
            vec![("Authorization", "Bearer ".to_owned())],
        ),
        (
            "dedicated header, prefix",
            vec![("X-Keyrelay-Token", FILE_TOKEN[..8].to_owned())],
        ),
        (
            "dedicated header, token plus junk",
            vec![("X-Keyrelay-Token", format!("{FILE_TOKEN} x"))],
        ),
        (
            "token as the upstream's Api-Key scheme",
            vec![("Authorization", format!("Api-Key {ENV_TOKEN}"))],
        ),
    ];
    for (what, headers) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let response = refused(
            &mut upstream,
            relay.addr,
            &request("POST", "/v1/chat/completions", &headers, "{}"),
        )
        .await;
        assert_keyrelay_error(&response, 401, "unauthorized");
        let challenge = response
            .header("www-authenticate")
            .unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate"));
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
        assert!(
            !response.body_text().contains(ENV_TOKEN) && !response.body_text().contains(FILE_TOKEN),
            "{what}: the error body names a token"
        );
    }
    assert_eq!(upstream_connections(&upstream), 0);
    relay.stop().await;
}

#[tokio::test]
async fn valid_tokens_pass_and_are_never_forwarded() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("tokens-pass");
    let relay = Relay::from_sources(&token_sources(&upstream.url(), &dir, &[])).await;

    // Authorization: Bearer, as an OpenAI SDK sends its api_key.
    let (seen, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &format!("Bearer {ENV_TOKEN}"))],
            "{}",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(seen.get_all("authorization").iter().count(), 1);
    assert_eq!(seen["authorization"], EXPECTED_AUTH);
    assert!(
        !headers_contain(&seen, ENV_TOKEN),
        "upstream saw the token: {seen:?}"
    );

    // The dedicated header, with the file's token (its newline trimmed).
    let (seen, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "POST",
            "/production/predict",
            &[("X-Keyrelay-Token", FILE_TOKEN)],
            "{}",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(seen["authorization"], EXPECTED_AUTH);
    assert!(seen.get("x-keyrelay-token").is_none(), "{seen:?}");
    assert!(
        !headers_contain(&seen, FILE_TOKEN),
        "upstream saw the token: {seen:?}"
    );

    // Lowercase scheme, as some clients send it.
    let (seen, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/v1/models",
            &[("authorization", &format!("bearer {FILE_TOKEN}"))],
            "",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(!headers_contain(&seen, FILE_TOKEN), "{seen:?}");
    relay.stop().await;
}

#[tokio::test]
async fn bearer_token_is_not_forwarded_when_authorization_is_not_scrubbed() {
    // An upstream keyed by x-api-key, with a strip list that leaves
    // Authorization alone: the local token read from Authorization must still
    // not travel to the upstream.
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("tokens-custom-header");
    let relay = Relay::from_sources(&token_sources(
        &upstream.url(),
        &dir,
        &[
            ("auth_header", "x-api-key"),
            ("auth_template", "{key}"),
            ("strip_request_headers", "x-api-key"),
        ],
    ))
    .await;
    let (seen, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "POST",
            "/v1/messages",
            &[("Authorization", &format!("Bearer {ENV_TOKEN}"))],
            "{}",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(seen["x-api-key"], KEY);
    assert!(
        !headers_contain(&seen, ENV_TOKEN),
        "the local access token was forwarded to the upstream: {seen:?}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_needs_no_token() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("tokens-preflight");
    let relay = Relay::from_sources(&token_sources(
        &upstream.url(),
        &dir,
        &[("allowed_origins", APP_ORIGIN)],
    ))
    .await;
    let response = refused(
        &mut upstream,
        relay.addr,
        &request(
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", APP_ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization"),
            ],
            "",
        ),
    )
    .await;
    assert_eq!(response.status(), 204, "{:?}", response.head);
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    // The actual request from that origin still needs the token.
    let (_, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "POST",
            "/v1/chat/completions",
            &[
                ("Origin", APP_ORIGIN),
                ("Authorization", &format!("Bearer {ENV_TOKEN}")),
            ],
            "{}",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    relay.stop().await;
}

#[tokio::test]
async fn token_values_never_appear_in_trace_logs_but_their_names_do() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("tokens-logs");
    let file = dir.write(FILE_TOKEN_NAME, &format!("{FILE_TOKEN}\n"));
    let near_miss = format!("{ENV_TOKEN}-wrong");
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.url()])
        .args(["--access-token-env", ENV_TOKEN_VAR])
        .arg("--access-token-files")
        .arg(&file)
        .env("BASETEN_API_KEY", KEY)
        .env(ENV_TOKEN_VAR, ENV_TOKEN)
        .env("RUST_LOG", "trace");
    let mut relay = RelayProcess::spawn(command).await;

    // HTTP/1.1 with the bearer token.
    let (seen, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request(
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &format!("Bearer {ENV_TOKEN}"))],
            "{}",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(!headers_contain(&seen, ENV_TOKEN));

    // h2c with the dedicated header (h2 logs frames at trace level).
    let client = h2c_client();
    let pending = tokio::spawn(
        client.request(
            Request::post(format!("http://{}/production/predict", relay.addr))
                .header("x-keyrelay-token", FILE_TOKEN)
                .body(full("{}"))
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    assert!(!headers_contain(exchange.request.headers(), FILE_TOKEN));
    exchange.respond_full(200, "ok");
    let response = within("h2 response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let _ = within(
        "h2 body",
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await;

    // A near miss is refused, and must not be logged either.
    let response = refused(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/v1/models",
            &[("X-Keyrelay-Token", near_miss.as_str())],
            "",
        ),
    )
    .await;
    assert_eq!(response.status(), 401);

    let log = relay.wait_for_log("request finished", 3).await;
    let everything = relay.stop_and_output().await;

    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was on:\n{log}"
    );
    for (what, secret) in [
        ("env token", ENV_TOKEN),
        ("file token", FILE_TOKEN),
        ("near miss", near_miss.as_str()),
        ("upstream key", KEY),
    ] {
        assert!(
            !everything.contains(secret),
            "the {what} appeared in keyrelay's output:\n{everything}"
        );
    }
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request finished"))
        .collect();
    assert!(
        access.iter().any(|l| l.contains(ENV_TOKEN_VAR)),
        "the access log should name the env token:\n{}",
        access.join("\n")
    );
    assert!(
        access.iter().any(|l| l.contains(FILE_TOKEN_NAME)),
        "the access log should name the file token:\n{}",
        access.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 4. Token rate limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_rate_limit_refuses_the_fourth_request_with_retry_after() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("tokens-rate");
    let relay = Relay::from_sources(&token_sources(
        &upstream.url(),
        &dir,
        &[("token_rate_limit", "3/m")],
    ))
    .await;
    let with_env_token = request(
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &format!("Bearer {ENV_TOKEN}"))],
        "{}",
    );
    for n in 1..=3 {
        let (_, response) = forwarded(&mut upstream, relay.addr, &with_env_token, ok("ok")).await;
        assert_eq!(response.status(), 200, "request {n} is within the rate");
    }
    let limited = refused(&mut upstream, relay.addr, &with_env_token).await;
    assert_keyrelay_error(&limited, 429, "rate_limited");
    let retry_after = limited
        .header("retry-after")
        .expect("429 carries Retry-After");
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is whole seconds, got {retry_after:?}"));
    assert!(
        seconds > 0 && seconds <= 60,
        "3/m refills one request in 20 s; Retry-After {seconds}"
    );

    // The other token has its own bucket: three more, then it is limited too.
    let with_file_token = request(
        "POST",
        "/v1/chat/completions",
        &[("X-Keyrelay-Token", FILE_TOKEN)],
        "{}",
    );
    for n in 1..=3 {
        let (_, response) = forwarded(&mut upstream, relay.addr, &with_file_token, ok("ok")).await;
        assert_eq!(response.status(), 200, "second token, request {n}");
    }
    let limited = refused(&mut upstream, relay.addr, &with_file_token).await;
    assert_keyrelay_error(&limited, 429, "rate_limited");

    // A wrong token is unauthorized, not rate limited.
    let response = refused(
        &mut upstream,
        relay.addr,
        &request(
            "GET",
            "/v1/models",
            &[("Authorization", "Bearer tok-guess-000000000000")],
            "",
        ),
    )
    .await;
    assert_keyrelay_error(&response, 401, "unauthorized");
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Non-loopback listen addresses
// ---------------------------------------------------------------------------

#[test]
fn non_loopback_listen_without_tokens_exits_64_naming_the_way_out() {
    let output = binary()
        .args([
            "--listen",
            "0.0.0.0:0",
            "--upstream",
            &format!("http://127.0.0.1:{}", closed_port()),
        ])
        .env("BASETEN_API_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run keyrelay");
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "stderr: {text}");
    assert!(text.contains("listen"), "{text}");
    assert!(text.contains("--allow-unauthenticated-network"), "{text}");
    assert!(!text.contains(KEY), "{text}");
}

#[test]
fn other_non_loopback_addresses_need_tokens_too() {
    for listen in ["[::]:0", "10.11.12.13:8080", "192.168.1.2:0"] {
        let mut sources = support::sources("http://127.0.0.1:9", &[]);
        sources.set("listen", OverrideValue::Text(listen.to_owned()));
        let err = config::load(&sources).expect_err("exposed without tokens");
        assert!(
            err.problems.iter().any(|p| p.setting == "listen"),
            "{listen}: {err}"
        );
    }
    // The whole 127/8 block is loopback: no tokens needed there.
    let mut sources = support::sources("http://127.0.0.1:9", &[]);
    sources.set("listen", OverrideValue::Text("127.0.0.2:0".to_owned()));
    config::load(&sources).expect("127.0.0.2 is loopback");
}

#[tokio::test]
async fn non_loopback_listen_starts_with_the_explicit_opt_out() {
    let mut command = binary();
    command
        .args([
            "--listen",
            "0.0.0.0:0",
            "--allow-unauthenticated-network",
            "--upstream",
            &format!("http://127.0.0.1:{}", closed_port()),
        ])
        .env("BASETEN_API_KEY", KEY);
    // Bound to 0.0.0.0 only for as long as it takes to see it start.
    let mut relay = RelayProcess::spawn(command).await;
    // The warning is written right after the ready line.
    let warned = tokio::time::timeout(STEP, relay.wait_for_log("non-loopback", 1)).await;
    relay.child.start_kill().expect("kill");
    let _ = relay.child.wait().await;
    assert!(
        relay.addr.ip().is_unspecified(),
        "listening on {}",
        relay.addr
    );
    assert!(warned.is_ok(), "expected a warning:\n{}", relay.log());
}

#[tokio::test]
async fn non_loopback_listen_starts_with_an_access_token_and_demands_it() {
    let mut upstream = MockUpstream::start().await;
    let mut command = binary();
    command
        .args(["--listen", "0.0.0.0:0", "--upstream", &upstream.url()])
        .args(["--access-token-env", ENV_TOKEN_VAR])
        .env("BASETEN_API_KEY", KEY)
        .env(ENV_TOKEN_VAR, ENV_TOKEN);
    let mut relay = RelayProcess::spawn(command).await;
    assert!(relay.addr.ip().is_unspecified());
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], relay.addr.port()));

    let response = refused(&mut upstream, local, &request("GET", "/v1/models", &[], "")).await;
    assert_keyrelay_error(&response, 401, "unauthorized");
    let (seen, response) = forwarded(
        &mut upstream,
        local,
        &request(
            "GET",
            "/v1/models",
            &[("Authorization", &format!("Bearer {ENV_TOKEN}"))],
            "",
        ),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(seen["authorization"], EXPECTED_AUTH);

    relay.child.start_kill().expect("kill");
    let _ = relay.child.wait().await;
    assert!(!relay.log().contains("non-loopback address: anyone"));
}

/// The admin port takes no token, so it may leave loopback only with the
/// explicit opt-out, or beside a main port that is on the network behind
/// access tokens (deploy/kubernetes/shared.yaml). Its /metrics and /usage
/// were otherwise open to the network without a word.
#[tokio::test]
async fn admin_listen_beyond_loopback_exits_64_naming_admin_listen() {
    let mut command = tokio::process::Command::from(binary());
    command
        .args([
            "--admin-listen",
            "0.0.0.0:0",
            "--upstream",
            &format!("http://127.0.0.1:{}", closed_port()),
        ])
        .env("BASETEN_API_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A keyrelay that starts instead is killed when the wait times out.
        .kill_on_drop(true);
    let output = within("keyrelay to refuse the config", command.output())
        .await
        .expect("run keyrelay");
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "stderr: {text}");
    assert!(text.contains("admin_listen"), "{text}");
    assert!(text.contains("--allow-unauthenticated-network"), "{text}");
    support::reliability::report(
        "issue23",
        &[
            "--admin-listen 0.0.0.0:0 without an opt-in",
            &format!(
                "exit {}, naming admin_listen and --allow-unauthenticated-network",
                output.status.code().unwrap_or(-1)
            ),
        ],
    );
}

#[test]
fn admin_listen_beyond_loopback_needs_the_same_opt_in_as_the_main_port() {
    let load = |settings: &[(&str, &str)]| {
        let mut sources = support::sources("http://127.0.0.1:9", settings);
        sources
            .env
            .insert(ENV_TOKEN_VAR.to_owned(), ENV_TOKEN.to_owned());
        config::load(&sources)
    };
    let names_admin = |result: Result<config::Config, config::ConfigError>| {
        result
            .expect_err("refused")
            .problems
            .iter()
            .any(|p| p.setting == "admin_listen")
    };
    for admin in ["0.0.0.0:9901", "[::]:9901", "10.1.2.3:9901"] {
        assert!(names_admin(load(&[("admin_listen", admin)])), "{admin}");
        // Tokens guard only the main port: on loopback they are no reason
        // to open the admin port to the network.
        assert!(
            names_admin(load(&[
                ("admin_listen", admin),
                ("access_token_env", ENV_TOKEN_VAR)
            ])),
            "{admin} with a loopback main port and tokens"
        );
        load(&[
            ("admin_listen", admin),
            ("allow_unauthenticated_network", "true"),
        ])
        .unwrap_or_else(|err| panic!("{admin} with the opt-out: {err}"));
        // A deployment for other machines: main port on the network behind tokens.
        load(&[
            ("admin_listen", admin),
            ("listen", "0.0.0.0:8080"),
            ("access_token_env", ENV_TOKEN_VAR),
        ])
        .unwrap_or_else(|err| panic!("{admin} beside a token-guarded network port: {err}"));
    }
    load(&[("admin_listen", "127.0.0.2:9901")]).expect("127/8 is loopback");
    load(&[("admin_listen", "[::1]:9901")]).expect("::1 is loopback");
}

// ---------------------------------------------------------------------------
// 6. Path policy
// ---------------------------------------------------------------------------

const PATH_RULES: &str = "POST /production/predict,/v1/*";

#[tokio::test]
async fn path_policy_forwards_only_matching_methods_and_paths() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_paths", PATH_RULES)]).await;

    for (method, target) in [
        ("POST", "/production/predict"),
        ("POST", "/production/predict?stream=true"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("DELETE", "/v1/files/f-1"),
    ] {
        let (_, response) = forwarded(
            &mut upstream,
            relay.addr,
            &request(method, target, &[], ""),
            ok("ok"),
        )
        .await;
        assert_eq!(response.status(), 200, "{method} {target}");
    }
    let before = upstream_connections(&upstream);
    for (method, target) in [
        ("GET", "/production/predict"),
        ("PUT", "/production/predict"),
        ("post", "/production/predict"),
        ("POST", "/production/predict/"),
        ("POST", "/production/predictions"),
        ("POST", "/production/predict/async"),
        ("POST", "/other"),
        ("GET", "/v1"),
        ("GET", "/v2/models"),
        ("GET", "/"),
        ("POST", "/development/predict"),
    ] {
        let response = refused(&mut upstream, relay.addr, &request(method, target, &[], "")).await;
        assert_keyrelay_error(&response, 403, "path_not_allowed");
    }
    assert_eq!(
        upstream_connections(&upstream),
        before,
        "refused paths opened no upstream connection"
    );
    relay.stop().await;
}

#[tokio::test]
async fn path_policy_prefix_cannot_be_escaped_with_dot_segments() {
    // "/v1/*" must not become a way to reach other upstream paths: servers and
    // proxies in front of the model resolve "/v1/../admin" (and its
    // percent-encoded spelling) to "/admin".
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_paths", PATH_RULES)]).await;
    let mut escaped = Vec::new();
    for target in [
        "/v1/../production/other",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/admin",
        "/v1/./../admin",
    ] {
        let text = request("POST", target, &[], "{}");
        let addr = relay.addr;
        let mut client = tokio::spawn(async move { raw::exchange(addr, &text).await });
        tokio::select! {
            response = &mut client => {
                let response = response.expect("raw client");
                assert!(
                    (400..500).contains(&response.status()),
                    "{target}: {:?}",
                    response.head
                );
            }
            exchange = upstream.next() => {
                escaped.push(exchange.request.uri().to_string());
                exchange.respond_full(200, "ok");
                within("the client's response", client).await.expect("raw client");
            }
        }
    }
    assert!(
        escaped.is_empty(),
        "allowed_paths \"/v1/*\" let these targets reach the upstream: {escaped:?}"
    );
    relay.stop().await;
}

/// With path rules on, every spelling that some server resolves to another
/// path is refused with 400 `ambiguous_path` (keyrelay's JSON) and reaches
/// nobody: Tomcat/Spring path parameters, double decoding, overlong UTF-8,
/// backslashes, encoded separators hiding dot segments, dot segments after
/// one decoding. Ordinary paths, legitimate escapes (`%20`, an encoded slash
/// in a model name) included, still pass.
#[tokio::test]
async fn ambiguous_paths_are_refused_with_400_when_path_rules_are_on() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("allowed_paths", "POST /v1/*")]).await;
    for target in [
        "/v1/..;/admin",
        "/v1/..;a=b/admin",
        "/v1/chat;x=1/completions",
        "/v1/%3b/admin",
        "/v1/%2e%2e/admin",
        "/v1/.%2E/admin",
        "/v1/%2e/../admin",
        "/v1/%252e%252e/admin",
        "/v1/%25",
        "/v1/%c0%ae%c0%ae/admin",
        "/v1/%C0%AE%C0%AE/admin",
        "/v1/%e0%80%ae%e0%80%ae/admin",
        "/v1/%ff/admin",
        "/v1/%5c..%5cadmin",
        "/v1/..%5Cadmin",
        "/v1/..%2fadmin",
        "/v1/%2F..%2Fadmin",
        "/v1/a%2f..%2f..%2fadmin",
        "/v1/%zz",
        "/v1/chat%",
        "/v1/%u002e%u002e/admin",
        "/v1/a%00.json",
        "/v1/../admin",
        "/v1/./chat",
        "/v1/..?x=/v1/",
    ] {
        let response = refused(
            &mut upstream,
            relay.addr,
            &request("POST", target, &[], "{}"),
        )
        .await;
        assert_keyrelay_error(&response, 400, "ambiguous_path");
        support::reliability::report(
            "issue23",
            &[
                &format!("allowed_paths = POST /v1/*; POST {target}"),
                &format!(
                    "{} {}; not forwarded",
                    response.status(),
                    response.json()["type"].as_str().unwrap_or("?")
                ),
            ],
        );
    }
    // A raw backslash: hyper may refuse the target itself (a bare 400); if it
    // passes, keyrelay refuses it. Never forwarded either way.
    let response = refused(
        &mut upstream,
        relay.addr,
        &request("POST", "/v1/..\\admin", &[], "{}"),
    )
    .await;
    assert_eq!(response.status(), 400, "{}", response.describe());

    // Still a 403, not a 400, for a plain path the rules do not allow.
    let response = refused(
        &mut upstream,
        relay.addr,
        &request("POST", "/v2/chat", &[], "{}"),
    )
    .await;
    assert_keyrelay_error(&response, 403, "path_not_allowed");

    for target in [
        "/v1/chat/completions",
        "/v1/files/my%20file.jsonl",
        "/v1/caf%C3%A9",
        "/v1/models/meta-llama%2FLlama-3.1-8B",
        "/v1/models.json?x=..;%25",
        "/v1/a.b/..c",
    ] {
        let (_, response) = forwarded(
            &mut upstream,
            relay.addr,
            &request("POST", target, &[], "{}"),
            ok("ok"),
        )
        .await;
        assert_eq!(response.status(), 200, "{target}");
    }
    relay.stop().await;
}

/// Without path rules nothing is refused as ambiguous: keyrelay forwards the
/// target byte for byte (hostile_input.rs checks that it is never rewritten).
#[tokio::test]
async fn ambiguous_paths_pass_when_no_path_rules_are_set() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let (_, response) = forwarded(
        &mut upstream,
        relay.addr,
        &request("POST", "/v1/..;/x", &[], "{}"),
        ok("ok"),
    )
    .await;
    assert_eq!(response.status(), 200);
    relay.stop().await;
}

#[test]
fn invalid_path_rules_stop_startup_naming_allowed_paths() {
    for rules in [
        "POST predict",
        "GE{T /x",
        "POST",
        "v1/*",
        "POST /v1/..;/admin",
    ] {
        let sources = support::sources("http://127.0.0.1:9", &[("allowed_paths", rules)]);
        let err = config::load(&sources).expect_err("invalid rule");
        assert!(
            err.problems.iter().any(|p| p.setting == "allowed_paths"),
            "{rules:?}: {err}"
        );
    }
}

#[tokio::test]
async fn cross_site_no_cors_requests_without_origin_are_refused() {
    // `<img src="http://127.0.0.1:8080/v1/models">` on another site: no Origin,
    // but the browser marks it with Sec-Fetch-Site.
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    for site in ["cross-site", "same-site"] {
        let response = refused(
            &mut upstream,
            relay.addr,
            &format!(
                "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: {site}\r\n\
                 Sec-Fetch-Mode: no-cors\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_keyrelay_error(&response, 403, "origin_not_allowed");
    }
    // Typing the URL (Sec-Fetch-Site: none) is the user's own request.
    let pending = tokio::spawn(raw::exchange(
        relay.addr,
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: none\r\nConnection: close\r\n\r\n",
    ));
    upstream.next().await.respond_full(200, "models");
    let response = within("response", pending).await.expect("join");
    assert_eq!(response.status(), 200);
    relay.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_is_not_forwarded_as_a_protocol_switch() {
    // Only WebSocket upgrades are spliced; after an h2c switch keyrelay could
    // no longer check the requests on that connection.
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let pending = tokio::spawn(raw::exchange(
        relay.addr,
        "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    ));
    let exchange = upstream.next().await;
    assert!(exchange.request.headers().get("upgrade").is_none());
    assert!(exchange.request.headers().get("http2-settings").is_none());
    exchange.respond_full(200, "plain");
    let response = within("response", pending).await.expect("join");
    assert_eq!(response.status(), 200);
    relay.stop().await;
}

/// TRACE and TRACK make a server echo the request it received, which would
/// hand the client the key keyrelay injected. They are answered 405 here, in
/// any letter case, over HTTP/1.1 and HTTP/2, with or without path rules,
/// unless a rule of the route's allowed_paths that names the method itself
/// matches the path (a rule without a method does not count).
#[tokio::test]
async fn trace_and_track_are_answered_here_unless_a_rule_names_them() {
    let mut upstream = MockUpstream::start().await;
    let open = Relay::start(&upstream.url(), &[]).await;
    let ruled = Relay::start(
        &upstream.url(),
        &[("allowed_paths", "/v1/*,TRACE /debug/*")],
    )
    .await;
    let answered = std::cell::Cell::new(0);
    let refused = |response: &raw::RawResponse, what: &str| {
        answered.set(answered.get() + 1);
        assert_eq!(response.status(), 405, "{what}: {}", response.describe());
        assert_eq!(response.json()["type"], "method_not_allowed", "{what}");
        assert_eq!(response.json()["source"], "keyrelay", "{what}");
        let allow = response.header("allow").expect("an Allow header");
        assert!(
            allow.contains("POST") && !allow.contains("TRACE"),
            "{allow}"
        );
        assert!(!response.body_text().contains(KEY), "{what}");
    };
    for (relay, name) in [(&open, "no rules"), (&ruled, "rules")] {
        for method in ["TRACE", "TRACK", "trace", "Track"] {
            for target in ["/v1/models", "/v1/*", "http://localhost/v1/models"] {
                let request = format!(
                    "{method} {target} HTTP/1.1\r\nHost: localhost\r\nMax-Forwards: 0\r\n\
                     Connection: close\r\n\r\n"
                );
                let what = format!("{name}: {method} {target}");
                refused(&raw::exchange(relay.addr, &request).await, &what);
            }
        }
        // With a body, chunked.
        let request = "TRACE /v1/models HTTP/1.1\r\nHost: localhost\r\n\
                       Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        refused(&raw::exchange(relay.addr, request).await, name);

        // HTTP/2.
        let response = within(
            "h2 TRACE",
            h2c_client().request(
                Request::builder()
                    .method("TRACE")
                    .uri(relay.url("/v1/models"))
                    .body(empty())
                    .expect("request"),
            ),
        )
        .await
        .expect("response");
        assert_eq!(response.status(), 405, "{name}: h2");
        assert!(response.headers().contains_key("allow"));
    }
    // TRACK is not named; TRACE outside its rule's path, or escaping it
    // with a dot segment, is not either.
    for request in [
        "TRACK /debug/x",
        "TRACE /v2/x",
        "TRACE /debug/../admin",
        "TRACE /debug/%2e%2e/admin",
    ] {
        let full = format!("{request} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        refused(&raw::exchange(ruled.addr, &full).await, request);
    }
    assert!(upstream.nothing_received(), "nothing reached the upstream");
    support::reliability::report(
        "issue23",
        &[
            "TRACE / TRACK in any letter case, origin or absolute form, with a chunked body, with and without path rules, or escaping a `TRACE /debug/*` rule by dot segments",
            &format!(
                "{} HTTP/1.1 requests: 405 method_not_allowed with Allow, no key echoed; 2 HTTP/2: 405; none forwarded",
                answered.get()
            ),
        ],
    );

    // Named by a rule, TRACE is the route owner's choice and is forwarded.
    let pending = tokio::spawn(raw::exchange(
        ruled.addr,
        "TRACE /debug/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ));
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.method(), "TRACE");
    exchange.respond_full(200, "traced");
    let allowed = within("allowed TRACE", pending).await.expect("join");
    assert_eq!(allowed.status(), 200);
    open.stop().await;
    ruled.stop().await;
}

/// A method-override header makes servers that obey it (Google's front
/// ends, Express's method-override, Symfony) act on another method than
/// the request's: it cannot carry a TRACE past the 405, nor a DELETE past
/// `allowed_paths = "POST /v1/*"`.
#[tokio::test]
async fn method_override_headers_cannot_carry_a_method_past_the_rules() {
    let mut upstream = MockUpstream::start().await;
    let open = Relay::start(&upstream.url(), &[]).await;
    let ruled = Relay::start(&upstream.url(), &[("allowed_paths", "POST /v1/*")]).await;
    let mut escaped = Vec::new();
    for (relay, header, want) in [
        (&open, "X-HTTP-Method-Override: TRACE", 405),
        (&open, "X-HTTP-Method: trace", 405),
        (&open, "X-Method-Override: TRACK", 405),
        (&ruled, "X-HTTP-Method-Override: DELETE", 403),
        (&ruled, "X-HTTP-Method-Override: POST, delete", 403),
        (&ruled, "X-HTTP-Method: PUT", 403),
    ] {
        let request = format!(
            "POST /v1/files/f1 HTTP/1.1\r\nHost: localhost\r\n{header}\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            raw::exchange(relay.addr, &request),
        )
        .await;
        let status = response.as_ref().map(|r| r.status()).ok();
        if status != Some(want) {
            escaped.push(format!("{header}: {status:?}"));
        }
        let rules = if std::ptr::eq(relay, &ruled) {
            "allowed_paths = \"POST /v1/*\""
        } else {
            "no path rules"
        };
        crate::support::reliability::report(
            "issue23",
            &[
                &format!("POST /v1/files/f1 with {header} ({rules})"),
                &status.map_or("no answer within 1 s".to_owned(), |s| {
                    format!("{s}, not forwarded")
                }),
            ],
        );
    }
    assert!(escaped.is_empty(), "not refused: {escaped:#?}");
    assert!(upstream.nothing_received(), "nothing reached the upstream");

    // Naming the request's own allowed method is harmless.
    let pending = tokio::spawn(raw::exchange(
        ruled.addr,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
         X-HTTP-Method-Override: POST\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ));
    let exchange = upstream.next().await;
    exchange.respond_full(200, "{}");
    let allowed = within("allowed POST", pending).await.expect("join");
    assert_eq!(allowed.status(), 200);
    open.stop().await;
    ruled.stop().await;
}

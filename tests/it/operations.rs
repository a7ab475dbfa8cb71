//! Operating keyrelay: the admin listener and `keyrelay health`, resource
//! limits (concurrency, request head and body size, slow request heads), and
//! the request ids, Server-Timing header and JSON access log that tie a
//! client's request to keyrelay's and the upstream's records.
//!
//! The admin tests run the real binary (the admin address is only known from
//! its ready line); the limit and id tests run keyrelay in-process. Metrics
//! after traffic are in `tests/metrics.rs`, shutdown in `tests/lifecycle.rs`.

use crate::support;

use crate::support::raw;

use crate::support::ops;

use std::time::Duration;

use http::Request;
use ops::{admin_request, admin_request_with, health_check, AdminRelay, HeldStream};
use raw::{assert_keyrelay_error, RawConn};
use support::*;
use tokio::time::Instant;

/// A local access token in an environment variable (not `KEYRELAY_*`).
const TOKEN_VAR: &str = "FRONTEND_TOKEN";
const TOKEN: &str = "tok-frontend-7c1e5a9b3d2f4e60";

/// Sends the raw `request` on a fresh connection in the background.
fn spawn_exchange(
    addr: std::net::SocketAddr,
    request: String,
) -> tokio::task::JoinHandle<raw::RawResponse> {
    tokio::spawn(async move { raw::exchange(addr, &request).await })
}

// ---------------------------------------------------------------------------
// 1. The admin listener
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_listener_answers_healthz_readyz_and_metrics() {
    let mut upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    assert_ne!(relay.admin.port(), relay.addr().port());

    let healthz = relay.admin("GET", "/healthz").await;
    assert_eq!(healthz.status(), 200);
    assert_eq!(healthz.header("content-type"), Some("application/json"));
    assert_eq!(healthz.json()["status"], "ok");
    let head = relay.admin("HEAD", "/healthz").await;
    assert_eq!(head.status(), 200, "probes may use HEAD");

    let readyz = relay.admin("GET", "/readyz").await;
    assert_eq!(readyz.status(), 200);
    assert_eq!(readyz.json()["status"], "ready");

    let metrics = relay.admin("GET", "/metrics").await;
    assert_eq!(metrics.status(), 200);
    let content_type = metrics.header("content-type").expect("content-type");
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "a Prometheus text content type: {content_type}"
    );
    let text = metrics.body_text();
    // Families with per-route handles exist from startup; the request and
    // upstream error counters appear with their first series (tests/metrics.rs).
    for family in [
        "# TYPE keyrelay_request_duration_seconds histogram",
        "# TYPE keyrelay_time_to_first_byte_seconds histogram",
        "# TYPE keyrelay_frame_gap_seconds histogram",
        "# TYPE keyrelay_overhead_seconds histogram",
        "# TYPE keyrelay_active_requests gauge",
        "# TYPE keyrelay_request_body_bytes counter",
        "# TYPE keyrelay_response_body_bytes counter",
    ] {
        assert!(text.contains(family), "missing {family:?} in:\n{text}");
    }
    // Every line is a comment or a `name{labels} value` sample.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let scrape = ops::Scrape(line.to_owned());
        assert_eq!(scrape.samples().len(), 1, "not a sample line: {line:?}");
    }
    let scrape = ops::Scrape(text);
    assert_eq!(
        scrape.present("keyrelay_active_requests", &[("route", "default")]),
        0.0
    );

    for (method, path) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/healthz/extra"),
        ("GET", "/v1/chat/completions"),
    ] {
        let response = relay.admin(method, path).await;
        assert_eq!(response.status(), 404, "{method} {path}");
        assert!(
            response.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("/healthz")),
            "the 404 lists the admin endpoints: {}",
            response.body_text()
        );
    }
    // Wrong methods are refused too; in particular a GET never quits.
    for (method, path) in [("GET", "/quitquitquit"), ("POST", "/metrics")] {
        let response = relay.admin(method, path).await;
        assert!(
            matches!(response.status(), 404 | 405),
            "{method} {path} answered {}",
            response.status()
        );
    }
    assert_eq!(relay.admin("GET", "/readyz").await.status(), 200);
    assert!(relay.running(), "GET /quitquitquit must not stop keyrelay");
    assert!(
        upstream.nothing_received(),
        "admin requests are never forwarded"
    );
    assert_eq!(upstream_connections(&upstream), 0);
}

#[tokio::test]
async fn admin_paths_on_the_proxy_port_are_forwarded_not_answered() {
    let mut upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;

    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/quitquitquit"),
    ] {
        let pending = tokio::spawn(admin_request(relay.addr(), method, path));
        let exchange = upstream.next().await;
        assert_eq!(exchange.request.method().as_str(), method);
        assert_eq!(exchange.request.uri().path(), path);
        assert_eq!(
            exchange.request.headers()["authorization"],
            EXPECTED_AUTH,
            "forwarded like any other request"
        );
        exchange.respond_full(404, "upstream: no such route");
        let response = within("the forwarded answer", pending).await.expect("join");
        assert_eq!(response.status(), 404, "{method} {path}");
        assert_eq!(
            response.body_text(),
            "upstream: no such route",
            "{method} {path} on the proxy port must be the upstream's answer"
        );
    }

    // The forwarded POST /quitquitquit started no shutdown: still ready, and
    // the proxy port still forwards.
    assert_eq!(relay.admin("GET", "/readyz").await.status(), 200);
    let pending = tokio::spawn(raw::get(relay.addr(), "/v1/models"));
    upstream.next().await.respond_full(200, "models");
    let response = within("a request after the forwarded quit", pending)
        .await
        .expect("join");
    assert_eq!(response.status(), 200);
    assert!(relay.running());
}

#[tokio::test]
async fn admin_needs_no_token_while_the_proxy_port_does() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command
        .args(["--access-token-env", TOKEN_VAR])
        .env(TOKEN_VAR, TOKEN);
    let relay = AdminRelay::spawn(command).await;

    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = relay.admin("GET", path).await;
        assert_eq!(
            response.status(),
            200,
            "{path} without a token: {}",
            response.body_text()
        );
    }

    // The proxy port does demand the token, so the admin answers above were
    // not just a token-less configuration.
    let refused = raw::get(relay.addr(), "/v1/models").await;
    assert_keyrelay_error(&refused, 401, "unauthorized");
    assert!(upstream.nothing_received());

    let pending = spawn_exchange(
        relay.addr(),
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    upstream.next().await.respond_full(200, "models");
    let response = within("the authorised request", pending)
        .await
        .expect("join");
    assert_eq!(response.status(), 200);
}

/// A web page can reach the admin port: a cross-site `no-cors` POST needs
/// no preflight, and a rebinding name makes the browser send its own Host.
/// Neither may stop keyrelay or read its metrics and usage.
#[tokio::test]
async fn a_cross_site_post_to_quitquitquit_is_refused_and_keyrelay_keeps_serving() {
    let mut upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let attacker = ("Origin", "https://attacker.example");
    let cross_site = ("Sec-Fetch-Site", "cross-site");
    let text_plain = ("Content-Type", "text/plain;charset=UTF-8");
    // What the case is, its header lines, its body.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        // What fetch(url, {method: "POST", mode: "no-cors", body: "x"}) sends.
        ("a no-cors fetch", &[attacker, cross_site, text_plain], "x"),
        ("an Origin alone", &[attacker], ""),
        ("Origin: null (a sandboxed page)", &[("Origin", "null")], ""),
        ("Sec-Fetch-Site: cross-site alone", &[cross_site], ""),
        (
            "Sec-Fetch-Site: same-site (another localhost port)",
            &[("Sec-Fetch-Site", "same-site")],
            "",
        ),
        (
            "a text/plain body alone",
            &[("Content-Type", "TEXT/PLAIN")],
            "x",
        ),
        (
            "a form alone",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            "a=b",
        ),
        (
            "a multipart form alone",
            &[("Content-Type", "multipart/form-data; boundary=x")],
            "--x--",
        ),
        (
            "a rebinding Host",
            &[
                ("Host", "attacker.example"),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            "",
        ),
    ];
    for (what, headers, body) in cases {
        let response =
            admin_request_with(relay.admin, "POST", "/quitquitquit", headers, body).await;
        assert_eq!(response.status(), 403, "{what}: {}", response.body_text());
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        let json = response.json();
        assert_eq!(json["source"], "keyrelay", "{what}: {json}");
        assert!(json["error"].is_string(), "{what}: {json}");
        support::reliability::report(
            "issue23",
            &[
                &format!("admin port: POST /quitquitquit with {what}"),
                &format!(
                    "{} {}",
                    response.status(),
                    json["type"].as_str().unwrap_or("?")
                ),
            ],
        );
    }
    assert!(relay.running(), "a refused quit must not stop keyrelay");
    let ready = relay.admin("GET", "/readyz").await.status();
    assert_eq!(ready, 200);
    let pending = tokio::spawn(raw::get(relay.addr(), "/v1/models"));
    upstream.next().await.respond_full(200, "models");
    let response = within("a request after the refused quits", pending)
        .await
        .expect("join");
    assert_eq!(response.status(), 200, "keyrelay still serves");
    support::reliability::report(
        "issue23",
        &[
            &format!(
                "admin port: after the {} refused POSTs to /quitquitquit",
                cases.len()
            ),
            &format!(
                "still running: /readyz {ready}, a proxied request {}",
                response.status()
            ),
        ],
    );

    // What a Job's container sends (curl -X POST, or a JSON body, typed in
    // by hand with Sec-Fetch-Site: none) still stops it.
    let quit = admin_request_with(
        relay.admin,
        "POST",
        "/quitquitquit",
        &[
            ("Content-Type", "application/json"),
            ("Sec-Fetch-Site", "none"),
        ],
        "{}",
    )
    .await;
    assert_eq!(quit.status(), 200, "{}", quit.body_text());
    let status = relay.exit_within(STEP).await;
    assert_eq!(status.code(), Some(0), "{}", relay.process.log());
}

#[tokio::test]
async fn admin_endpoints_refuse_rebinding_hosts_and_web_pages() {
    let upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let port = relay.admin.port().to_string();
    for path in ["/usage", "/metrics", "/healthz", "/readyz"] {
        let mut refusals = std::collections::BTreeMap::<String, usize>::new();
        for host in [
            "attacker.example".to_owned(),
            format!("attacker.example:{port}"),
            format!("localhost.attacker.example:{port}"),
            format!("127.0.0.1.nip.io:{port}"),
            format!("0.0.0.0:{port}"),
            format!("127.0.0.2:{port}"),
            String::new(),
        ] {
            let response =
                admin_request_with(relay.admin, "GET", path, &[("Host", &host)], "").await;
            assert_eq!(response.status(), 403, "{path} with Host {host:?}");
            assert_eq!(
                response.json()["type"],
                "host_not_allowed",
                "{path} {host:?}"
            );
            *refusals
                .entry(format!(
                    "{} {}",
                    response.status(),
                    response.json()["type"].as_str().unwrap_or("?")
                ))
                .or_default() += 1;
        }
        for headers in [
            &[("Origin", "https://attacker.example")][..],
            &[("Sec-Fetch-Site", "cross-site")],
            &[("Sec-Fetch-Site", "same-site")],
        ] {
            let response = admin_request_with(relay.admin, "GET", path, headers, "").await;
            assert_eq!(response.status(), 403, "{path} with {headers:?}");
            assert_eq!(
                response.json()["type"],
                "cross_site_request",
                "{path} {headers:?}"
            );
            assert!(
                !response.body_text().contains("keyrelay_"),
                "no metrics leak"
            );
            *refusals
                .entry(format!(
                    "{} {}",
                    response.status(),
                    response.json()["type"].as_str().unwrap_or("?")
                ))
                .or_default() += 1;
        }
        support::reliability::report(
            "issue23",
            &[
                &format!("admin port: GET {path} with a rebinding Host (attacker.example, 127.0.0.1.nip.io, 0.0.0.0, 127.0.0.2, empty: 7 forms), an Origin or a cross-/same-site Sec-Fetch-Site"),
                &refusals
                    .iter()
                    .map(|(what, count)| format!("{count} × {what}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ],
        );
        for host in [
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ] {
            let response =
                admin_request_with(relay.admin, "GET", path, &[("Host", &host)], "").await;
            assert_eq!(response.status(), 200, "{path} with Host {host}");
        }
        let typed =
            admin_request_with(relay.admin, "GET", path, &[("Sec-Fetch-Site", "none")], "").await;
        assert_eq!(typed.status(), 200, "{path} typed into the address bar");
    }
    assert!(relay.running());
}

/// Kubelet probes and Prometheus address the admin port by the pod's IP,
/// which is no loopback name: the IP the connection arrived on is accepted
/// (a rebinding page can only send its own name). 127.0.0.2 stands in for
/// the pod IP.
#[tokio::test]
async fn admin_port_accepts_its_own_ip_as_host_as_probes_send_it() {
    let upstream = MockUpstream::start().await;
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.2:0"])
        .args(["--upstream", &upstream.url(), "--warm-connections", "0"])
        .env("BASETEN_API_KEY", KEY);
    let relay = AdminRelay::spawn(command).await;
    assert_eq!(relay.admin.ip().to_string(), "127.0.0.2");
    let own = relay.admin.to_string();
    let response = admin_request_with(relay.admin, "GET", "/metrics", &[("Host", &own)], "").await;
    assert_eq!(response.status(), 200, "{}", response.body_text());
    let other = format!("127.0.0.3:{}", relay.admin.port());
    let response =
        admin_request_with(relay.admin, "GET", "/metrics", &[("Host", &other)], "").await;
    assert_eq!(response.status(), 403, "{}", response.body_text());
}

#[tokio::test]
async fn health_subcommand_exits_0_against_keyrelay_and_1_when_nothing_listens() {
    let upstream = MockUpstream::start().await;
    let relay = AdminRelay::spawn(ops::command(&upstream.url())).await;

    let (status, stderr) = health_check(&format!("http://{}/healthz", relay.admin)).await;
    assert_eq!(status.code(), Some(0), "healthy keyrelay; stderr: {stderr}");

    let closed = format!("http://127.0.0.1:{}/healthz", closed_port());
    let (status, stderr) = health_check(&closed).await;
    assert_eq!(status.code(), Some(1), "nothing listens; stderr: {stderr}");
    assert!(
        stderr.contains("keyrelay health"),
        "says why it failed: {stderr}"
    );
}

// ---------------------------------------------------------------------------
// 4. Limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn max_concurrent_requests_refuses_the_third_with_503_then_recovers() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("max_concurrent_requests", "2")]).await;
    let client = http1_client();

    let mut first = HeldStream::open(&client, &mut upstream, &relay.url("/stream/1")).await;
    let mut second = HeldStream::open(&client, &mut upstream, &relay.url("/stream/2")).await;
    first.lockstep("data: a1\n\n").await;
    second.lockstep("data: b1\n\n").await;

    let third = raw::get(relay.addr, "/v1/models").await;
    assert_keyrelay_error(&third, 503, "overloaded");
    assert_eq!(
        third.header("retry-after"),
        Some("1"),
        "tells the client when to retry"
    );
    assert!(
        upstream.nothing_received(),
        "the refused request is not forwarded"
    );

    // The refusal did not disturb the streams holding the slots.
    first.lockstep("data: a2\n\n").await;
    second.lockstep("data: b2\n\n").await;
    first.finish().await;

    // A slot is free again.
    let pending = tokio::spawn(raw::get(relay.addr, "/v1/models"));
    upstream.next().await.respond_full(200, "models");
    let response = within("the request after a slot freed", pending)
        .await
        .expect("join");
    assert_eq!(response.status(), 200, "{}", response.body_text());
    assert_eq!(response.body_text(), "models");

    second.lockstep("data: b3\n\n").await;
    second.finish().await;
    relay.stop().await;
}

#[tokio::test]
async fn request_head_over_max_request_header_size_gets_431_and_the_next_is_served() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("max_request_header_size", "8KiB")]).await;

    let big = "a".repeat(16 * 1024);
    let mut conn = RawConn::connect(relay.addr).await;
    conn.send(format!(
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let response = conn.read_response().await;
    assert_eq!(response.status(), 431, "{}", response.body_text());
    assert!(upstream.nothing_received());
    assert_eq!(upstream_connections(&upstream), 0);

    // A head well under the limit on the next connection is served.
    let medium = "b".repeat(4 * 1024);
    let pending = spawn_exchange(
        relay.addr,
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Medium: {medium}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.headers()["x-medium"], medium.as_str());
    exchange.respond_full(200, "models");
    let response = within("the next request", pending).await.expect("join");
    assert_eq!(response.status(), 200);
    relay.stop().await;
}

#[tokio::test]
async fn declared_body_over_max_request_body_gets_413_without_reaching_the_upstream() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("max_request_body", "1KiB")]).await;

    let body = "x".repeat(2048);
    let response = raw::exchange(
        relay.addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Length: 2048\r\nConnection: close\r\n\r\n{body}"
        ),
    )
    .await;
    assert_keyrelay_error(&response, 413, "payload_too_large");
    assert!(upstream.nothing_received());
    assert_eq!(
        upstream_connections(&upstream),
        0,
        "keyrelay must not even connect upstream"
    );

    // Exactly at the limit is forwarded whole.
    let body = "y".repeat(1024);
    let pending = spawn_exchange(
        relay.addr,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Length: 1024\r\nConnection: close\r\n\r\n{body}"
        ),
    );
    let mut exchange = upstream.next().await;
    assert_eq!(exchange.request.headers()["content-length"], "1024");
    let body = exchange.request.body_mut();
    let forwarded = read_upstream_body(body, 1024)
        .await
        .expect("a body at the limit is forwarded");
    assert_eq!(forwarded, 1024);
    assert!(next_data(body).await.is_none(), "and ends there");
    exchange.respond_full(200, "ok");
    let response = within("the answer", pending).await.expect("join");
    assert_eq!(response.status(), 200);
    relay.stop().await;
}

#[tokio::test]
async fn chunked_body_growing_past_max_request_body_is_cut_before_the_upstream_gets_it_all() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("max_request_body", "1KiB")]).await;

    let mut client = RawConn::connect(relay.addr).await;
    client
        .send(
            "POST /v1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
    let chunk = "z".repeat(512);
    let chunk_frame = format!("200\r\n{chunk}\r\n");
    client.send(&chunk_frame).await;

    // Streaming: the upstream gets the head and the body as it arrives.
    let mut exchange = upstream.next().await;
    let body = exchange.request.body_mut();
    let mut received = 0usize;
    received += read_upstream_body(body, 512)
        .await
        .expect("first 512 bytes");
    client.send(&chunk_frame).await;
    received += read_upstream_body(body, 512)
        .await
        .expect("up to the limit is forwarded");
    assert_eq!(received, 1024);

    // One more chunk takes the body past 1 KiB.
    client.send(&chunk_frame).await;
    let beyond = read_upstream_body(body, 512).await;
    match beyond {
        Err(err) => println!("upstream saw its request body fail: {err}"),
        Ok(n) => panic!(
            "the upstream got {n} more bytes ({} in all) past max_request_body",
            received + n
        ),
    }

    let response = client.read_response().await;
    println!("client got {} {}", response.status(), response.body_text());
    assert_keyrelay_error(&response, 413, "payload_too_large");
    drop(exchange);
    relay.stop().await;
}

/// Reads `want` bytes of a request body at the upstream; `Err` if the body
/// fails, and `Ok` with fewer bytes only if it ends.
async fn read_upstream_body(
    body: &mut hyper::body::Incoming,
    want: usize,
) -> Result<usize, String> {
    let mut got = 0usize;
    // Bounded: every iteration consumes a frame, and `next_data` is bounded by STEP.
    while got < want {
        match next_data(body).await {
            Some(Ok(data)) => got += data.len(),
            Some(Err(err)) => return Err(format!("{err} ({got} bytes before it)")),
            None => return Ok(got),
        }
    }
    Ok(got)
}

#[tokio::test]
async fn slow_request_heads_are_cut_after_header_read_timeout_while_others_are_served() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("header_read_timeout", "500ms")]).await;

    // A slowloris: many connections, each with half a request head, then silence.
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut conn = RawConn::connect(relay.addr).await;
        conn.send("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            .await;
        slow.push(conn);
    }

    // Meanwhile another client is served normally.
    let pending = tokio::spawn(raw::get(relay.addr, "/v1/models"));
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.uri().path(), "/v1/models");
    exchange.respond_full(200, "models");
    let response = within("the well-behaved client", pending)
        .await
        .expect("join");
    assert_eq!(response.status(), 200);
    println!("well-behaved client served after {:?}", started.elapsed());

    // The timeout is the behaviour under test: each stalled connection is
    // closed by keyrelay (read_to_end waits for that, bounded by STEP).
    for conn in &mut slow {
        let ending = conn.read_to_end().await;
        let text = String::from_utf8_lossy(&ending.bytes).into_owned();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "a stalled head gets at most a 408: {text:?}"
        );
    }
    let waited = started.elapsed();
    println!("stalled connections cut after {waited:?}");
    assert!(
        waited >= Duration::from_millis(400),
        "cut after {waited:?}, before header_read_timeout"
    );
    assert!(
        upstream.nothing_received(),
        "half a head is never forwarded"
    );
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Request ids, Server-Timing and the access log
// ---------------------------------------------------------------------------

/// The `dur=` of keyrelay's Server-Timing entry, in milliseconds.
fn server_timing_ms(value: &str) -> f64 {
    assert!(
        value.starts_with("keyrelay;"),
        "keyrelay's Server-Timing entry: {value:?}"
    );
    let dur = value
        .split(';')
        .find_map(|part| part.trim().strip_prefix("dur="))
        .unwrap_or_else(|| panic!("no dur= in {value:?}"));
    dur.parse()
        .unwrap_or_else(|_| panic!("dur is not a number in {value:?}"))
}

#[tokio::test]
async fn generated_request_id_goes_upstream_and_back_with_server_timing() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let mut ids = Vec::new();
    for _ in 0..2 {
        let request = Request::get(relay.url("/v1/models"))
            .body(empty())
            .expect("request");
        let (seen, response) = round_trip(
            &http1_client(),
            &mut upstream,
            request,
            http::Response::new(full("answer")),
        )
        .await;
        let sent = seen
            .get("x-request-id")
            .expect("the upstream receives an x-request-id")
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(!sent.is_empty());
        assert_eq!(
            response.headers().get("x-request-id").map(|v| v.as_bytes()),
            Some(sent.as_bytes()),
            "the client gets the same id back"
        );
        let timing = response
            .headers()
            .get("server-timing")
            .expect("Server-Timing")
            .to_str()
            .expect("ascii");
        let dur = server_timing_ms(timing);
        assert!(
            (0.0..STEP.as_secs_f64() * 1e3).contains(&dur),
            "overhead {dur} ms"
        );
        ids.push(sent);
    }
    assert_ne!(ids[0], ids[1], "each request gets its own id");
    relay.stop().await;
}

#[tokio::test]
async fn client_request_id_is_kept_end_to_end() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("x-request-id", "client-trace-42")
        .body(full("{}"))
        .expect("request");
    let (seen, response) = round_trip(
        &http1_client(),
        &mut upstream,
        request,
        http::Response::new(full("answer")),
    )
    .await;
    assert_eq!(seen["x-request-id"], "client-trace-42");
    assert_eq!(
        seen.get_all("x-request-id").iter().count(),
        1,
        "not duplicated"
    );
    assert_eq!(response.headers()["x-request-id"], "client-trace-42");
    relay.stop().await;
}

#[tokio::test]
async fn upstream_baseten_request_id_is_passed_back_instead_of_keyrelays() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    let request = Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let answer = http::Response::builder().header("x-baseten-request-id", "bt-pred-123");
    let (seen, response) = round_trip(
        &http1_client(),
        &mut upstream,
        request,
        answer.body(full("answer")).expect("response"),
    )
    .await;
    assert!(
        seen.contains_key("x-request-id"),
        "keyrelay still sends its id upstream"
    );
    assert_eq!(response.headers()["x-baseten-request-id"], "bt-pred-123");
    assert!(
        !response.headers().contains_key("x-request-id"),
        "with Baseten's id present keyrelay adds none of its own: {:?}",
        response.headers()
    );
    assert!(response.headers().contains_key("server-timing"));
    assert_eq!(response.body(), "answer");
    relay.stop().await;
}

#[tokio::test]
async fn json_access_log_line_reports_each_request() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--log-format", "json"]);
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();

    // A stream answered with Baseten's id, sent with a query that must not be logged.
    let request = Request::post(relay.url("/v1/chat/completions?secret=query-value"))
        .body(full(r#"{"stream": true}"#))
        .expect("request");
    let mut stream = HeldStream::open_request(
        &client,
        &mut upstream,
        request,
        http::Response::builder().header("x-baseten-request-id", "bt-json-77"),
    )
    .await;
    stream.lockstep("data: one\n\n").await;
    stream.lockstep("data: two\n\n").await;
    let streamed = stream.finish().await;

    // A plain request without Baseten's id: keyrelay's own id is logged.
    let request = Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let (_, response) = round_trip(
        &http1_client(),
        &mut upstream,
        request,
        http::Response::new(full("answer")),
    )
    .await;
    let own_id = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();

    let log = relay.wait_for_log("request finished", 2).await;

    let mut access = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("log line is not JSON ({err}): {line}"));
        if event["message"] == "request finished" {
            access.push(event);
        }
    }
    assert_eq!(access.len(), 2, "{log}");
    assert!(!log.contains("query-value"), "queries are never logged");

    let stream_line = &access[0];
    assert_eq!(stream_line["target"], "keyrelay::access", "{stream_line}");
    assert_eq!(stream_line["request_id"], "bt-json-77", "{stream_line}");
    assert_eq!(stream_line["method"], "POST", "{stream_line}");
    assert_eq!(stream_line["path"], "/v1/chat/completions", "{stream_line}");
    assert_eq!(stream_line["status"], 200, "{stream_line}");
    assert_eq!(stream_line["bytes"], streamed, "{stream_line}");
    assert_eq!(stream_line["outcome"], "ok", "{stream_line}");
    let ttfb = stream_line["ttfb_ms"]
        .as_f64()
        .expect("ttfb_ms is a number");
    let duration = stream_line["duration_ms"]
        .as_f64()
        .expect("duration_ms is a number");
    assert!(
        0.0 <= ttfb && ttfb <= duration,
        "ttfb {ttfb} within duration {duration}"
    );

    let plain_line = &access[1];
    assert_eq!(plain_line["request_id"], own_id.as_str(), "{plain_line}");
    assert_eq!(plain_line["method"], "GET", "{plain_line}");
    assert_eq!(plain_line["path"], "/v1/models", "{plain_line}");
    assert_eq!(plain_line["status"], 200, "{plain_line}");
    assert_eq!(plain_line["bytes"], "answer".len(), "{plain_line}");
    assert_eq!(plain_line["outcome"], "ok", "{plain_line}");
    assert!(plain_line["ttfb_ms"].is_number(), "{plain_line}");
    assert!(plain_line["duration_ms"].is_number(), "{plain_line}");
}

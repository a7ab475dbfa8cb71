//! Retries and failover (`retry_on`, `fallback`), through real sockets: what
//! is retried, what never is, and how each attempt shows.
//!
//! The guarantee under test is the one no timing can fake: a request is
//! sent again only while nothing of its answer has reached the client. Each
//! test counts the attempts the upstream saw, so one that retried after the
//! first byte, replayed a body it did not have whole, or hammered a failing
//! upstream past its budget fails on the count, not on a sleep.
//!
//! How a client that wants keyrelay to misbehave would try, and where each
//! is tested:
//! - cut the stream after the first token, hoping for a second generation:
//!   `a_stream_cut_after_the_first_token_is_never_sent_again`;
//! - upload more than keyrelay keeps, or upload without a length, then meet
//!   a 503: `uploads_keyrelay_cannot_replay_whole_are_never_retried`;
//! - have the upstream answer before it read the upload (early 503), so the
//!   replay must still carry every byte: `an_upload_answered_early_is_replayed_whole`;
//! - ask for a wait longer than allowed: `a_retry_after_beyond_the_cap_is_relayed_at_once`;
//! - make a route fail every request: `the_retry_budget_caps_attempts_against_a_failing_upstream`;
//! - fail over to a route with another credential, hoping the first route's
//!   key goes along: `failover_uses_the_fallbacks_own_credential_and_path_then_returns`.

use crate::support;

use crate::support::ops;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use keyrelay::config::Sources;
use ops::AdminRelay;
use support::reliability::report;
use support::*;

const ATTEMPTS: &str = "keyrelay_upstream_attempts_total";

/// A 2xx/4xx/5xx answer with a JSON body and extra headers.
fn answer(status: u16, headers: &[(&str, &str)]) -> Response<TestBody> {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(full(format!("{{\"status\": {status}}}")))
        .expect("response")
}

/// A JSON POST of `body` to `url`, with its length declared.
fn post(url: &str, body: impl Into<Bytes>) -> Request<TestBody> {
    let body = body.into();
    Request::post(url)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(full(body))
        .expect("request")
}

/// Reads a request body whole at the mock upstream.
async fn read_body(exchange: &mut Exchange) -> Bytes {
    within("the request body", exchange.request.body_mut().collect())
        .await
        .expect("request body")
        .to_bytes()
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_the_wait_and_shows_each_attempt() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--retry-on", "429,503", "--retry-methods", "POST"]);
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    let prompt = r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;

    let started = Instant::now();
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), prompt)));
    let mut first = upstream.next().await;
    assert_eq!(read_body(&mut first).await, prompt);
    first.respond(answer(429, &[("retry-after", "1")]));
    let mut second = upstream.next().await;
    let waited = started.elapsed();
    assert_eq!(read_body(&mut second).await, prompt, "the same bytes again");
    assert_eq!(
        header_values(second.request.headers(), "authorization"),
        [EXPECTED_AUTH]
    );
    second.respond(ok(r#"{"choices": []}"#));

    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert!(
        waited >= Duration::from_secs(1),
        "Retry-After: 1 waited out, {waited:?}"
    );
    let timing = header_values(response.headers(), "server-timing").join(", ");
    assert!(
        timing.contains("attempt;desc=\"429 from default\";dur=")
            && timing.contains("attempt;desc=\"200 from default\";dur="),
        "{timing}"
    );
    assert!(
        response.headers().get("x-keyrelay-upstream").is_none(),
        "route names stay private by default"
    );
    assert_eq!(body_bytes(response).await, r#"{"choices": []}"#);
    assert!(upstream.nothing_received(), "two attempts, no third");

    let route = ("route", "default");
    let target = ("target", "default");
    relay
        .wait_for_sample(ATTEMPTS, &[route, target, ("outcome", "relayed")], 1.0)
        .await;
    let scrape = relay.scrape().await;
    assert_eq!(
        scrape.counter(ATTEMPTS, &[route, target, ("outcome", "retried")]),
        1.0
    );
    relay.process.wait_for_log("attempts=2", 1).await;
    report(
        "issue25",
        &[
            "429 with Retry-After: 1, then 200",
            &format!(
                "one 200 after {:.2} s; upstream saw 2 attempts; Server-Timing lists both",
                waited.as_secs_f64()
            ),
        ],
    );
}

#[tokio::test]
async fn a_retry_after_beyond_the_cap_is_relayed_at_once() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "429"),
            ("retry_methods", "POST"),
            ("retry_max_wait", "2s"),
        ],
    )
    .await;
    let client = http1_client();
    let started = Instant::now();
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    upstream
        .next()
        .await
        .respond(answer(429, &[("retry-after", "30")]));
    let response = within("the 429", pending)
        .await
        .expect("join")
        .expect("response");
    let took = started.elapsed();
    assert_eq!(response.status(), 429);
    assert_eq!(header_values(response.headers(), "retry-after"), ["30"]);
    assert!(
        took < Duration::from_secs(2),
        "relayed at once, not waited: {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(upstream.nothing_received(), "not retried");

    // A hostile upstream's Retry-After past any clock's range.
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    let huge = u64::MAX.to_string();
    upstream
        .next()
        .await
        .respond(answer(429, &[("retry-after", &huge)]));
    let response = within("the 429", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 429, "relayed, keyrelay still standing");
    report(
        "issue25",
        &[
            "429 with Retry-After: 30 (retry_max_wait 2s)",
            &format!("the 429 relayed in {} ms, not retried", took.as_millis()),
        ],
    );
}

#[tokio::test]
async fn a_stream_cut_after_the_first_token_is_never_sent_again() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "429,502,503,504,connect"),
            ("retry_methods", "POST"),
        ],
    )
    .await;
    let client = http1_client();
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    let exchange = upstream.next().await;
    let (mut sender, _dropped) = exchange
        .respond_streaming_with(Response::builder().header("content-type", "text/event-stream"));
    let response = within("the head", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // Lockstep: the first token reaches the client before the upstream dies.
    let token = Bytes::from_static(b"data: {\"token\": \"Hello\"}\n\n");
    within("sending the token", sender.send_data(token.clone()))
        .await
        .expect("send");
    let received = next_data(&mut body).await.expect("a frame").expect("data");
    assert_eq!(received, token);
    sender.abort("the model server died".into());
    let end = loop {
        match within("the abort", body.frame()).await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Some(Err(_))),
        "the cut stream is aborted visibly, not ended cleanly: {end:?}"
    );
    // Bounded: a retry would have reached the upstream well within this.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(upstream.nothing_received(), "one attempt, never a second");
    report(
        "issue25",
        &[
            "stream cut after the first token (retry_on 502,503,504,connect; POST retried)",
            "client saw the token, then an aborted body; upstream saw 1 attempt",
        ],
    );
}

#[tokio::test]
async fn an_upload_answered_early_is_replayed_whole() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "503"),
            ("retry_methods", "POST"),
            ("retry_max_wait", "50ms"),
        ],
    )
    .await;
    let client = http1_client();
    // 200 KiB, streamed in 8 KiB parts with its length declared.
    let upload: Bytes = (0..200 * 1024)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (mut sender, channel) = http_body_util::channel::Channel::<Bytes, _>::new(1);
    let request = Request::post(relay.url("/v1/files"))
        .header("content-length", upload.len())
        .body(channel.boxed())
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let feeder = {
        let upload = upload.clone();
        tokio::spawn(async move {
            for part in upload.chunks(8 * 1024) {
                if sender
                    .send_data(Bytes::copy_from_slice(part))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    // The first attempt is answered before its body was read (and read
    // after, so that the connection closes cleanly: an upstream that
    // resets it instead can lose its own early answer in transit, which
    // keyrelay sees as a failed connection, not a 503).
    let first = upstream
        .next()
        .await
        .respond_before_reading(answer(503, &[]));
    let mut second = upstream.next().await;
    let replayed = read_body(&mut second).await;
    assert_eq!(replayed.len(), upload.len());
    assert!(replayed == upload, "the exact same bytes, in order");
    second.respond(ok("stored"));
    let first_read = within("the first attempt's body", first)
        .await
        .expect("join");
    assert!(first_read <= upload.len());
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    within("the upload", feeder).await.expect("feeder");
    report(
        "issue25",
        &[
            "200 KiB upload, first attempt answered 503 before reading it",
            "second attempt got all 204800 bytes, identical",
        ],
    );
}

#[tokio::test]
async fn uploads_keyrelay_cannot_replay_whole_are_never_retried() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "503"),
            ("retry_methods", "POST"),
            ("retry_buffer", "64KiB"),
            ("retry_max_wait", "50ms"),
        ],
    )
    .await;
    let client = http1_client();

    // Over retry_buffer, length declared.
    let big = vec![b'x'; 200 * 1024];
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/files"), big)));
    let mut exchange = upstream.next().await;
    assert_eq!(read_body(&mut exchange).await.len(), 200 * 1024);
    exchange.respond(answer(503, &[]));
    let response = within("the 503", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 503, "passed through");

    // Chunked: no declared length, so keyrelay cannot know it will have it whole.
    let (mut sender, channel) = http_body_util::channel::Channel::<Bytes, _>::new(1);
    let request = Request::post(relay.url("/v1/files"))
        .body(channel.boxed())
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    within("sending", sender.send_data(Bytes::from_static(b"{}")))
        .await
        .expect("send");
    drop(sender);
    let mut exchange = upstream.next().await;
    assert_eq!(read_body(&mut exchange).await, "{}");
    exchange.respond(answer(503, &[]));
    let response = within("the 503", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 503, "passed through");

    // Within retry_buffer: retried (the control for the two above).
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/files"), "{}")));
    upstream.next().await.respond(answer(503, &[]));
    upstream.next().await.respond(ok("done"));
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(upstream.nothing_received(), "4 attempts in all, no more");
    report(
        "issue25",
        &[
            "503 for a 200 KiB upload over retry_buffer 64KiB, and for a chunked upload",
            "both passed through after 1 attempt; a 2-byte body was retried (control)",
        ],
    );
}

#[tokio::test]
async fn statuses_are_retried_only_for_retry_methods_and_connect_failures_for_all() {
    let mut upstream = MockUpstream::start().await;
    // POST is not in the default retry_methods.
    let relay = Relay::start(
        &upstream.url(),
        &[("retry_on", "503"), ("retry_max_wait", "50ms")],
    )
    .await;
    let client = http1_client();
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    upstream.next().await.respond(answer(503, &[]));
    let response = within("the 503", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 503);
    let pending = tokio::spawn(client.get(relay.url("/v1/models").parse().expect("uri")));
    upstream.next().await.respond(answer(503, &[]));
    upstream.next().await.respond(ok("[]"));
    let response = within("the GET", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200, "a GET is retried by default");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(upstream.nothing_received());

    // Nothing listening: a POST goes again (it never left keyrelay), and
    // the client gets the 502 once the attempts are used.
    let port = closed_port();
    let relay = Relay::start(
        &format!("http://127.0.0.1:{port}"),
        &[("retry_on", "connect"), ("retry_max_wait", "50ms")],
    )
    .await;
    let response = within(
        "the 502",
        client.request(post(&relay.url("/v1/chat/completions"), "{}")),
    )
    .await
    .expect("response");
    assert_eq!(response.status(), 502);
    let timing = header_values(response.headers(), "server-timing").join(", ");
    assert_eq!(
        timing
            .matches("attempt;desc=\"upstream_refused from default\"")
            .count(),
        3,
        "{timing}"
    );
}

#[tokio::test]
async fn the_retry_budget_caps_attempts_against_a_failing_upstream() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "503"),
            ("retry_attempts", "3"),
            ("retry_max_wait", "10ms"),
        ],
    )
    .await;
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&attempts);
    let failing = tokio::spawn(async move {
        loop {
            upstream.next().await.respond(answer(503, &[]));
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let client = http1_client();
    let requests = 50;
    for _ in 0..requests {
        let response = within(
            "a 503",
            client.get(relay.url("/v1/models").parse().expect("uri")),
        )
        .await
        .expect("response");
        assert_eq!(response.status(), 503);
    }
    failing.abort();
    let seen = attempts.load(std::sync::atomic::Ordering::SeqCst);
    // Unbounded, 50 requests x 4 attempts = 200. The budget: 20% of the
    // requests in the last 10 s, at least 10 retries.
    assert_eq!(
        seen,
        requests + 10,
        "{seen} attempts for {requests} requests"
    );
    report(
        "issue25",
        &[
            "100% failing upstream, 50 requests, retry_attempts 3, retry_budget 20%",
            &format!("{seen} attempts (unbounded: 200)"),
        ],
    );
}

#[tokio::test]
async fn failover_uses_the_fallbacks_own_credential_and_path_then_returns() {
    let primary_port = closed_port();
    let mut backup = MockUpstream::start().await;
    let relay = primary_and_backup(
        &format!("http://127.0.0.1:{primary_port}"),
        &backup.url(),
        &format!("{RETRY_POST}\neject_after = \"2\"\neject_for = \"1s\""),
        "",
    )
    .await;
    let client = http1_client();
    let url = relay.url("/v1/chat/completions?stream=1");

    // Primary refuses: the backup serves, with its own key and path.
    for round in 0..3 {
        let pending = tokio::spawn(client.request(post(&url, "{}")));
        let exchange = backup.next().await;
        let headers = exchange.request.headers();
        assert_eq!(
            exchange.request.uri(),
            "/openai/v1/chat/completions?stream=1"
        );
        assert_eq!(header_values(headers, "x-api-key"), ["other-key-2b7e"]);
        assert!(
            headers.get("authorization").is_none(),
            "the primary's key stays home"
        );
        exchange.respond_full(200, "from backup");
        let response = within("the answer", pending)
            .await
            .expect("join")
            .expect("response");
        assert_eq!(
            header_values(response.headers(), "x-keyrelay-upstream"),
            ["backup"]
        );
        let timing = header_values(response.headers(), "server-timing").join(", ");
        // Two refusals eject the primary: later requests skip it.
        assert_eq!(
            timing.contains("upstream_refused from primary"),
            round < 2,
            "round {round}: {timing}"
        );
    }

    // The primary comes back; after the cool-down one request probes it,
    // and traffic returns.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", primary_port))
        .await
        .expect("the primary's port is free again");
    let mut primary = MockUpstream::on(listener).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let pending = tokio::spawn(client.request(post(&url, "{}")));
        let exchange = primary.next().await;
        assert_eq!(exchange.request.uri(), "/v1/chat/completions?stream=1");
        assert_eq!(
            header_values(exchange.request.headers(), "authorization"),
            [EXPECTED_AUTH]
        );
        exchange.respond_full(200, "from primary");
        let response = within("the answer", pending)
            .await
            .expect("join")
            .expect("response");
        assert_eq!(
            header_values(response.headers(), "x-keyrelay-upstream"),
            ["primary"]
        );
    }
    assert!(backup.nothing_received());
    report(
        "issue25",
        &[
            "primary refuses connections, fallback = [backup] (eject_after 2, eject_for 1s)",
            "backup served with its own key and path; primary skipped after 2 refusals; back on primary after the cool-down",
        ],
    );
}

/// What the route's budget has spent, from the admin port's `/usage`.
async fn budget_spent(relay: &AdminRelay) -> u64 {
    let response = relay.admin("GET", "/usage").await;
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = serde_json::from_str(&response.body_text()).expect("JSON");
    report["budgets"][0]["spent"].as_u64().expect("a count")
}

#[tokio::test]
async fn only_the_attempt_that_answered_is_charged_to_the_budget() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--retry-on", "503", "--retry-methods", "POST"]);
    command.args(["--retry-max-wait", "50ms", "--token-budget", "100000/day"]);
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    let body = r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), body)));
    upstream.next().await.respond(answer(503, &[]));
    let usage = r#"{"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 30}}"#;
    upstream.next().await.respond(
        Response::builder()
            .header("content-type", "application/json")
            .body(full(usage))
            .expect("response"),
    );
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    body_bytes(response).await;
    // What the answer reported, once: not a second reservation or estimate
    // for the attempt that failed.
    let mut last = 0;
    let charged = tokio::time::timeout(STEP, async {
        loop {
            last = budget_spent(&relay).await;
            if last == 42 {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("spent {last}, expected 42"));
    report(
        "issue25",
        &[
            "budgeted route, 503 then 200 reporting 12 + 30 tokens",
            &format!("charged {charged} tokens, once"),
        ],
    );
}

#[tokio::test]
async fn a_client_gone_during_the_wait_is_not_sent_again() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[("retry_on", "429"), ("retry_methods", "POST")],
    )
    .await;
    let client = http1_client();
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    upstream
        .next()
        .await
        .respond(answer(429, &[("retry-after", "1")]));
    // Gone while keyrelay waits out the Retry-After.
    tokio::time::sleep(Duration::from_millis(100)).await;
    pending.abort();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        upstream.nothing_received(),
        "nobody to answer: no second attempt"
    );
}

#[tokio::test]
async fn an_http2_upstream_gets_the_same_body_again_on_a_new_stream() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("upstream_http", "2"),
            ("retry_on", "503"),
            ("retry_methods", "POST"),
            ("retry_max_wait", "50ms"),
        ],
    )
    .await;
    let client = http1_client();
    let prompt = r#"{"model": "m", "messages": [{"role": "user", "content": "over h2"}]}"#;
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), prompt)));
    let mut first = upstream.next().await;
    assert_eq!(first.request.version(), http::Version::HTTP_2);
    assert_eq!(read_body(&mut first).await, prompt);
    first.respond(answer(503, &[]));
    let mut second = upstream.next().await;
    assert_eq!(second.request.version(), http::Version::HTTP_2);
    assert_eq!(
        read_body(&mut second).await,
        prompt,
        "the same bytes on a new stream"
    );
    second.respond(ok("{}"));
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream_connections(&upstream),
        1,
        "one multiplexed connection"
    );
}

#[tokio::test]
async fn concurrent_requests_share_one_retry_budget() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "503"),
            ("retry_attempts", "3"),
            ("retry_max_wait", "10ms"),
        ],
    )
    .await;
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&attempts);
    let failing = tokio::spawn(async move {
        loop {
            upstream.next().await.respond(answer(503, &[]));
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let client = http1_client();
    let requests = 20;
    let all = (0..requests).map(|_| {
        let uri = relay.url("/v1/models").parse().expect("uri");
        client.get(uri)
    });
    for response in within("20 concurrent 503s", futures_join_all(all)).await {
        assert_eq!(response.expect("response").status(), 503);
    }
    failing.abort();
    let seen = attempts.load(std::sync::atomic::Ordering::SeqCst);
    // 20 x 4 unbounded; the budget's floor of 10 retries holds across
    // the serving threads however the requests interleave.
    assert_eq!(
        seen,
        requests + 10,
        "{seen} attempts for {requests} concurrent requests"
    );
    report(
        "issue25",
        &[
            "20 concurrent requests against a 100% failing upstream, retry_attempts 3",
            &format!("{seen} attempts (unbounded: 80)"),
        ],
    );
}

/// Awaits every future, in order (the tests take no `futures` crate).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("join"));
    }
    outputs
}

/// The primary's retry methods in most tests here.
const RETRY_POST: &str = "retry_methods = [\"POST\"]";

/// keyrelay with route "primary" (`/v1`, upstream `primary` under `/v1`,
/// retrying refused connections and 503 onto "backup") and route
/// "backup" (`/backup`, upstream `backup` under `/openai/v1`, its own key
/// in `x-api-key`), each with its `extra` settings; responses name the
/// route that answered.
async fn primary_and_backup(
    primary: &str,
    backup: &str,
    primary_extra: &str,
    backup_extra: &str,
) -> Relay {
    let toml = format!(
        r#"
upstream_name_header = true

[[routes]]
name = "primary"
prefix = "/v1"
upstream = "{primary}/v1"
key_env = "BASETEN_API_KEY"
retry_on = ["connect", "503"]
retry_max_wait = "50ms"
fallback = ["backup"]
{primary_extra}

[[routes]]
name = "backup"
prefix = "/backup"
upstream = "{backup}/openai/v1"
key_env = "OTHER_KEY"
auth_header = "x-api-key"
auth_template = "{{key}}"
{backup_extra}
"#
    );
    with_two_keys(toml).await
}

/// keyrelay with the config file `toml`, and the keys `BASETEN_API_KEY`
/// ([`KEY`]) and `OTHER_KEY` in its environment.
async fn with_two_keys(toml: String) -> Relay {
    let file = temp_file("retries", "keyrelay.toml", toml);
    let sources = Sources {
        file: Some(file.0.clone()),
        env: HashMap::from([
            ("BASETEN_API_KEY".to_owned(), KEY.to_owned()),
            ("OTHER_KEY".to_owned(), "other-key-2b7e".to_owned()),
        ]),
        ..Sources::default()
    };
    Relay::from_sources(&sources).await
}

#[tokio::test]
async fn failover_holds_the_request_to_the_fallbacks_allowed_paths() {
    let mut primary = MockUpstream::start().await;
    let mut backup = MockUpstream::start().await;
    // The backup's key may be used for chat completions only.
    let relay = primary_and_backup(
        &primary.url(),
        &backup.url(),
        RETRY_POST,
        r#"allowed_paths = ["POST /backup/chat/completions"]"#,
    )
    .await;
    let client = http1_client();

    // A path the backup's policy refuses: the attempts stay on the
    // primary (1 + retry_attempts), and the backup's key is not used.
    let request = client.request(post(&relay.url("/v1/fine_tuning/jobs"), "{}"));
    let response = kept_off_the_backup(&mut primary, &mut backup, request).await;
    assert_eq!(response.status(), 503, "relayed, not failed over");

    // A path it allows: failed over (the control).
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    primary.next().await.respond(answer(503, &[]));
    let exchange = backup.next().await;
    assert_eq!(exchange.request.uri(), "/openai/v1/chat/completions");
    exchange.respond_full(200, "from backup");
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_fallback_that_cannot_take_the_path_is_skipped_not_blamed_on_the_client() {
    let mut primary = MockUpstream::start().await;
    // The fallback is a Baseten regional host, which takes bare paths
    // only: a staged path is not one it can be sent.
    let toml = format!(
        r#"
[[routes]]
name = "primary"
prefix = "/v1"
upstream = "{primary}/v1"
key_env = "BASETEN_API_KEY"
retry_on = ["503"]
retry_methods = ["POST"]
retry_attempts = 1
retry_max_wait = "50ms"
fallback = ["regional"]

[[routes]]
name = "regional"
prefix = "/regional"
model = "abc123"
environment = "staging"
regional = true
key_env = "OTHER_KEY"
"#,
        primary = primary.url(),
    );
    let relay = with_two_keys(toml).await;
    let client = http1_client();
    let url = relay.url("/v1/environments/staging/predict");
    // The primary fails every attempt.
    let failing = tokio::spawn(async move {
        loop {
            primary.next().await.respond(answer(503, &[]));
        }
    });
    let response = within("the answer", client.request(post(&url, "{}")))
        .await
        .expect("response");
    failing.abort();
    assert_eq!(
        response.status(),
        503,
        "the upstream's answer, not a 400 for a path the client never sent to the fallback"
    );
}

#[tokio::test]
async fn after_the_cool_down_one_request_probes_an_ejected_route() {
    let mut primary = MockUpstream::start().await;
    let mut backup = MockUpstream::start().await;
    let relay = primary_and_backup(
        &primary.url(),
        &backup.url(),
        &format!("{RETRY_POST}\neject_after = \"2\"\neject_for = \"1s\""),
        "",
    )
    .await;
    let client = http1_client();
    let url = relay.url("/v1/chat/completions");
    // Two 503s in a row eject the primary.
    for _ in 0..2 {
        let pending = tokio::spawn(client.request(post(&url, "{}")));
        primary.next().await.respond(answer(503, &[]));
        backup.next().await.respond_full(200, "from backup");
        within("the answer", pending)
            .await
            .expect("join")
            .expect("response");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Past the cool-down, requests arriving together: one probes the
    // primary, the others keep going to the backup until it answers.
    let pending: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.request(post(&url, "{}"))))
        .collect();
    let probe = primary.next().await;
    for _ in 0..3 {
        tokio::select! {
            exchange = backup.next() => exchange.respond_full(200, "from backup"),
            _ = primary.next() => panic!("a second request went to the primary during its probe"),
        }
    }
    probe.respond_full(200, "from primary");
    for request in pending {
        let response = within("the answer", request)
            .await
            .expect("join")
            .expect("response");
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn a_trace_the_route_allows_never_fails_over_to_a_route_that_refuses_it() {
    let mut primary = MockUpstream::start().await;
    let mut backup = MockUpstream::start().await;
    // TRACE makes a server echo the request, the injected key with it:
    // the primary names it, the backup (no allowed_paths) does not.
    let relay = primary_and_backup(
        &primary.url(),
        &backup.url(),
        "allowed_paths = [\"TRACE /v1/debug\"]\nretry_methods = [\"TRACE\"]",
        "",
    )
    .await;
    let client = http1_client();
    let trace = Request::builder()
        .method("TRACE")
        .uri(relay.url("/v1/debug"))
        .body(empty())
        .expect("request");
    let response = kept_off_the_backup(&mut primary, &mut backup, client.request(trace)).await;
    assert_eq!(response.status(), 503);
}

/// The answer to `request` (on the primary of [`primary_and_backup`])
/// when the primary answers each of its 3 attempts with 503; a panic if
/// one goes to the backup instead, whose key is not for it.
async fn kept_off_the_backup<F>(
    primary: &mut MockUpstream,
    backup: &mut MockUpstream,
    request: F,
) -> Response<hyper::body::Incoming>
where
    F: std::future::Future<
            Output = Result<Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
        > + Send
        + 'static,
{
    let pending = tokio::spawn(request);
    let failing = async {
        for _ in 0..3 {
            primary.next().await.respond(answer(503, &[]));
        }
        within("the 503", pending).await
    };
    tokio::select! {
        response = failing => response.expect("join").expect("response"),
        exchange = backup.next() => panic!(
            "{} {} went to the backup, whose policy refuses it",
            exchange.request.method(),
            exchange.request.uri()
        ),
    }
}

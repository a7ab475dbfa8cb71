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
//! - send a body in another shape (chunked or HTTP/2 with trailers, gzip,
//!   multipart, a DATA frame past its Content-Length) hoping a replay
//!   differs from what the first attempt got:
//!   `a_chunked_upload_with_trailers_is_passed_through_not_retried`,
//!   `an_http2_upload_with_trailers_is_sent_again_as_it_was_sent_first`,
//!   `encoded_and_oddly_typed_uploads_are_replayed_byte_for_byte`,
//!   `a_body_longer_than_its_declared_length_is_never_replayed_short`;
//! - reach a fallback's key with a path its rules refuse (`/v1/x/`,
//!   `/v1/./x`, `/v1/%2e%2e/admin`): `failover_holds_odd_paths_to_the_fallbacks_rules`;
//! - leave during the wait or the replay: `a_client_gone_during_the_wait_*`,
//!   `a_client_gone_during_the_replay_gets_no_third_attempt`;
//! - an upstream asking for `Retry-After: 0` forever, or sending 103 Early
//!   Hints before its 503: `a_retry_after_of_zero_on_every_answer_still_waits_the_backoff`,
//!   `early_hints_before_a_503_are_never_relayed_twice`.

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
use support::{h2_frames, raw};

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

    let response = answered(pending).await;
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
    let response = answered(pending).await;
    let took = started.elapsed();
    assert_eq!(response.status(), 429);
    assert_eq!(header_values(response.headers(), "retry-after"), ["30"]);
    assert!(
        took < Duration::from_secs(2),
        "relayed at once, not waited: {took:?}"
    );
    no_further_attempt(&mut upstream, 200, "not retried").await;

    // A hostile upstream's Retry-After past any clock's range.
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), "{}")));
    let huge = u64::MAX.to_string();
    upstream
        .next()
        .await
        .respond(answer(429, &[("retry-after", &huge)]));
    let response = answered(pending).await;
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
    let response = answered(pending).await;
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
    no_further_attempt(&mut upstream, 600, "one attempt, never a second").await;
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
    let relay = retrying_posts(&upstream.url(), &[]).await;
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
    let response = answered(pending).await;
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
    let relay = retrying_posts(&upstream.url(), &[("retry_buffer", "64KiB")]).await;
    let client = http1_client();

    // Over retry_buffer, length declared.
    let big = vec![b'x'; 200 * 1024];
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/files"), big)));
    let mut exchange = upstream.next().await;
    assert_eq!(read_body(&mut exchange).await.len(), 200 * 1024);
    exchange.respond(answer(503, &[]));
    let response = answered(pending).await;
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
    let response = answered(pending).await;
    assert_eq!(response.status(), 503, "passed through");

    // Within retry_buffer: retried (the control for the two above).
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/files"), "{}")));
    upstream.next().await.respond(answer(503, &[]));
    upstream.next().await.respond(ok("done"));
    let response = answered(pending).await;
    assert_eq!(response.status(), 200);
    no_further_attempt(&mut upstream, 200, "4 attempts in all, no more").await;
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
    let response = answered(pending).await;
    assert_eq!(response.status(), 503);
    let pending = tokio::spawn(client.get(relay.url("/v1/models").parse().expect("uri")));
    upstream.next().await.respond(answer(503, &[]));
    upstream.next().await.respond(ok("[]"));
    let response = answered(pending).await;
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
    let requests = 50;
    let seen = failing_attempts(requests, false).await;
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
        let response = answered(pending).await;
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
        let response = answered(pending).await;
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
    let response = answered(pending).await;
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
    no_further_attempt(&mut upstream, 1500, "nobody to answer: no second attempt").await;
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
    let response = answered(pending).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream_connections(&upstream),
        1,
        "one multiplexed connection"
    );
}

#[tokio::test]
async fn concurrent_requests_share_one_retry_budget() {
    // Bounded in time: `failing_attempts` waits for all within one step.
    for requests in [20, 50] {
        let seen = failing_attempts(requests, true).await;
        // 4 attempts each unbounded; the budget allows max(20% of the
        // requests, 10) = 10 retries, however the requests interleave
        // across the serving threads.
        assert_eq!(
            seen,
            requests + 10,
            "{seen} attempts for {requests} concurrent requests"
        );
        report(
            "issue25",
            &[
                &format!(
                    "{requests} concurrent requests against a 100% failing upstream, retry_attempts 3"
                ),
                &format!("{seen} attempts (unbounded: {})", requests * 4),
            ],
        );
    }
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
    let response = answered(pending).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_fallback_that_cannot_take_the_path_is_skipped_not_blamed_on_the_client() {
    let primary = MockUpstream::start().await;
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
    let (failing, _) = always_failing(primary, &[]);
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
        answered(pending).await;
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
        let response = answered(request).await;
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
/// when the primary answers each of its attempts with 503; a panic if one
/// goes to the backup instead, whose key is not for it.
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
    let mut pending = tokio::spawn(request);
    let answer_of = async {
        // Bounded: each attempt is answered at once, and the request ends
        // within retry_attempts of them.
        loop {
            tokio::select! {
                response = &mut pending => return response,
                exchange = primary.next() => exchange.respond(answer(503, &[])),
            }
        }
    };
    tokio::select! {
        response = within("the answer", answer_of) => response.expect("join").expect("response"),
        exchange = backup.next() => panic!(
            "{} {} went to the backup, whose policy refuses it",
            exchange.request.method(),
            exchange.request.uri()
        ),
    }
}

/// A request on its way, spawned so the test can answer at the upstream.
type Pending = tokio::task::JoinHandle<
    Result<Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
>;

/// The response a [`Pending`] request got, bounded.
async fn answered(pending: Pending) -> Response<hyper::body::Incoming> {
    within("the answer", pending)
        .await
        .expect("join")
        .expect("response")
}

/// Answers every request at `upstream` with 503 and `headers` until the
/// task is aborted; counts them.
fn always_failing(
    mut upstream: MockUpstream,
    headers: &'static [(&'static str, &'static str)],
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&attempts);
    let failing = tokio::spawn(async move {
        while let Some(exchange) = upstream.recv().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            exchange.respond(answer(503, headers));
        }
    });
    (failing, attempts)
}

/// The attempts a 100% failing upstream sees for `requests` GETs, sent
/// one after the other or all at once, with retry_attempts 3 and the
/// default budget.
async fn failing_attempts(requests: usize, at_once: bool) -> usize {
    let upstream = MockUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[
            ("retry_on", "503"),
            ("retry_attempts", "3"),
            ("retry_max_wait", "10ms"),
        ],
    )
    .await;
    let (failing, attempts) = always_failing(upstream, &[]);
    let client = http1_client();
    let get = || client.get(relay.url("/v1/models").parse().expect("uri"));
    if at_once {
        let all = within(
            "concurrent 503s",
            futures_join_all((0..requests).map(|_| get())),
        )
        .await;
        for response in all {
            assert_eq!(response.expect("response").status(), 503);
        }
    } else {
        for _ in 0..requests {
            let response = within("a 503", get()).await.expect("response");
            assert_eq!(response.status(), 503);
        }
    }
    failing.abort();
    attempts.load(std::sync::atomic::Ordering::SeqCst)
}

/// Waits `millis` (well past any retry's wait in the test), then asserts
/// that no further request reached `upstream`.
async fn no_further_attempt(upstream: &mut MockUpstream, millis: u64, what: &str) {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    assert!(upstream.nothing_received(), "{what}");
}

/// keyrelay retrying POSTs that meet a 503, after at most 50 ms.
async fn retrying_posts(upstream: &str, extra: &[(&str, &str)]) -> Relay {
    let mut settings = vec![
        ("retry_on", "503"),
        ("retry_methods", "POST"),
        ("retry_max_wait", "50ms"),
    ];
    settings.extend_from_slice(extra);
    Relay::start(upstream, &settings).await
}

#[tokio::test]
async fn a_chunked_upload_with_trailers_is_passed_through_not_retried() {
    let mut upstream = MockUpstream::start().await;
    let relay = retrying_posts(&upstream.url(), &[]).await;
    let mut client = raw::RawConn::connect(relay.addr).await;
    client
        .send(format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
                 Trailer: x-digest\r\n\r\n2\r\n{{}}\r\n0\r\nx-digest: sha-256=abc\r\n\r\n",
            relay.addr
        ))
        .await;
    let mut exchange = upstream.next().await;
    assert!(exchange.request.headers().get("trailer").is_none());
    let sent = within("the body", exchange.request.body_mut().collect())
        .await
        .expect("body");
    assert!(sent.trailers().is_none(), "request trailers are dropped");
    assert_eq!(sent.to_bytes(), "{}");
    exchange.respond(answer(503, &[]));
    assert_eq!(client.read_response().await.status(), 503, "passed through");
    no_further_attempt(&mut upstream, 200, "no declared length: 1 attempt").await;
    report(
        "issue25",
        &[
            "503 for a chunked HTTP/1.1 upload with a trailer",
            "passed through after 1 attempt (no declared length); the trailer was not forwarded",
        ],
    );
}

#[tokio::test]
async fn an_http2_upload_with_trailers_is_sent_again_as_it_was_sent_first() {
    let mut upstream = MockUpstream::start().await;
    let relay = retrying_posts(&upstream.url(), &[]).await;
    let client = h2c_client();
    let (mut sender, channel) = http_body_util::channel::Channel::<Bytes, _>::new(2);
    let prompt = r#"{"model": "m", "messages": []}"#;
    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-length", prompt.len())
        .header("trailer", "x-digest")
        .body(channel.boxed())
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    within(
        "the body",
        sender.send_data(Bytes::from_static(prompt.as_bytes())),
    )
    .await
    .expect("send");
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-digest", "sha-256=abc".parse().expect("value"));
    within("the trailers", sender.send_trailers(trailers))
        .await
        .expect("send");
    let mut seen = Vec::new();
    for status in [503, 200] {
        let mut exchange = upstream.next().await;
        let sent = within("the body", exchange.request.body_mut().collect())
            .await
            .expect("body");
        seen.push((sent.trailers().cloned(), sent.to_bytes()));
        exchange.respond(answer(status, &[]));
    }
    assert_eq!(answered(pending).await.status(), 200);
    // Request trailers are dropped for every attempt alike (request_body.rs):
    // the replay is what the first attempt sent, not less.
    assert_eq!(seen[0], seen[1], "the same body and trailers twice");
    assert_eq!(seen[1], (None, Bytes::from_static(prompt.as_bytes())));
    report(
        "issue25",
        &[
            "503 for an HTTP/2 upload with a declared length and trailers",
            "retried; both attempts got the same bytes and no trailers (request trailers are never forwarded)",
        ],
    );
}

#[tokio::test]
async fn encoded_and_oddly_typed_uploads_are_replayed_byte_for_byte() {
    let mut upstream = MockUpstream::start().await;
    let relay = retrying_posts(&upstream.url(), &[]).await;
    let client = http1_client();
    // A gzip header, NULs, bytes that are no UTF-8, CRLFs.
    let mut upload = vec![0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff];
    upload.extend((0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    upload.extend_from_slice(b"\r\n\r\n\x00\xc3\x28");
    let upload = Bytes::from(upload);
    let shapes = [
        (Some("gzip"), "application/json"),
        (Some("br, gzip"), "application/octet-stream"),
        (None, "multipart/form-data; boundary=----x"),
        (None, "text/plain; charset=utf-16"),
    ];
    for (encoding, kind) in shapes {
        let mut request = Request::post(relay.url("/v1/files"))
            .header("content-type", kind)
            .header("content-length", upload.len());
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let request = request.body(full(upload.clone())).expect("request");
        let pending = tokio::spawn(client.request(request));
        for status in [503, 200] {
            let mut exchange = upstream.next().await;
            let headers = exchange.request.headers().clone();
            assert_eq!(header_values(&headers, "content-type"), [kind]);
            assert_eq!(
                headers
                    .get("content-encoding")
                    .map(|v| v.to_str().expect("text")),
                encoding
            );
            let sent = read_body(&mut exchange).await;
            assert!(sent == upload, "{kind}: byte for byte, attempt {status}");
            exchange.respond(answer(status, &[]));
        }
        assert_eq!(answered(pending).await.status(), 200);
    }
    report(
        "issue25",
        &[
            "503 for 70 KB uploads sent gzip / br encoded, multipart, UTF-16 text",
            "each retried once with the same bytes and the same Content-Type and Content-Encoding",
        ],
    );
}

#[tokio::test]
async fn a_body_longer_than_its_declared_length_is_never_replayed_short() {
    let mut upstream = MockUpstream::start().await;
    let relay = retrying_posts(&upstream.url(), &[("retry_buffer", "64KiB")]).await;

    // HTTP/1.1: the body is the declared 10 bytes; the rest is the next
    // request on the connection (and no request at all).
    let mut client = raw::RawConn::connect(relay.addr).await;
    let mut bytes = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\n",
        relay.addr
    )
    .into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', 100 * 1024));
    let _ = client.try_send(&bytes).await;
    for status in [503, 200] {
        let mut exchange = upstream.next().await;
        assert_eq!(read_body(&mut exchange).await, "xxxxxxxxxx");
        exchange.respond(answer(status, &[]));
    }
    assert_eq!(client.read_response().await.status(), 200);

    // HTTP/2: a DATA frame beyond the declared length resets the stream;
    // no attempt may get a body that ends cleanly.
    let mut h2 = h2_frames::H2Conn::open(relay.addr).await;
    let authority = relay.addr.to_string();
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", &authority),
        (":path", "/v1/files"),
        ("content-length", "10"),
    ];
    h2.send(&h2_frames::headers_frame(1, &fields, false)).await;
    h2.send_lossy(&h2_frames::frame(
        0x0,
        h2_frames::FLAG_END_STREAM,
        1,
        &[b'y'; 1000],
    ))
    .await;
    let status = h2.response_status(1).await;
    let mut clean = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Some(mut exchange)) =
        tokio::time::timeout(Duration::from_millis(100), upstream.recv()).await
    {
        if let Ok(body) = exchange.request.body_mut().collect().await {
            clean.push(body.to_bytes());
        }
        exchange.respond(answer(503, &[]));
    }
    assert!(
        clean.is_empty(),
        "an attempt got a clean short body: {clean:?}"
    );
    report(
        "issue25",
        &[
            "Content-Length: 10 with 100 KiB sent (HTTP/1.1), and with a 1000-byte DATA frame (HTTP/2)",
            &format!(
                "HTTP/1.1: both attempts got the declared 10 bytes; HTTP/2: {}, no attempt got a clean short body",
                status.map_or("stream reset".to_owned(), |s| format!("status {s}"))
            ),
        ],
    );
}

#[tokio::test]
async fn failover_holds_odd_paths_to_the_fallbacks_rules() {
    let mut primary = MockUpstream::start().await;
    let mut backup = MockUpstream::start().await;
    let relay = primary_and_backup(
        &primary.url(),
        &backup.url(),
        RETRY_POST,
        r#"allowed_paths = ["POST /backup/x"]"#,
    )
    .await;
    let client = http1_client();
    let odd = [
        "/v1/x/",
        "/v1/./x",
        "/v1/%2e%2e/admin",
        "/v1/x/..",
        "/v1/.%2E/x",
        "/v1//x",
    ];
    // The path the backup allows fails over (the control); first, as
    // the primary's 503s below eject it.
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/x"), "{}")));
    primary.next().await.respond(answer(503, &[]));
    let exchange = backup.next().await;
    assert_eq!(exchange.request.uri(), "/openai/v1/x");
    exchange.respond_full(200, "from backup");
    assert_eq!(answered(pending).await.status(), 200);
    let mut statuses = Vec::new();
    for path in odd {
        let request = client.request(post(&relay.url(path), "{}"));
        let response = kept_off_the_backup(&mut primary, &mut backup, request).await;
        statuses.push(format!("{path} {}", response.status().as_u16()));
    }
    report(
        "issue25",
        &[
            "failover to a fallback allowing only POST /backup/x, for /v1/x/, /v1/./x, /v1/%2e%2e/admin, /v1/x/.., /v1/.%2E/x, /v1//x",
            &format!("none reached the backup ({}); only /v1/x failed over", statuses.join(", ")),
        ],
    );
}

#[tokio::test]
async fn a_retry_after_of_zero_on_every_answer_still_waits_the_backoff() {
    let upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("retry_on", "503")]).await;
    let (failing, attempts) = always_failing(upstream, &[("retry-after", "0")]);
    let client = http1_client();
    let started = Instant::now();
    let response = within(
        "the 503",
        client.get(relay.url("/v1/models").parse().expect("uri")),
    )
    .await
    .expect("response");
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    tokio::time::sleep(Duration::from_millis(200)).await;
    failing.abort();
    let seen = attempts.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(seen, 3, "1 + retry_attempts (2)");
    // The backoff's floors: 125 ms before the first retry, 250 ms before
    // the second.
    assert!(
        took >= Duration::from_millis(375),
        "waited the backoff, not back to back: {took:?}"
    );
    report(
        "issue25",
        &[
            "503 with Retry-After: 0 on every answer",
            &format!(
                "{seen} attempts (retry_attempts 2), over {} ms: the backoff is waited",
                took.as_millis()
            ),
        ],
    );
}

#[tokio::test]
async fn early_hints_before_a_503_are_never_relayed_twice() {
    let mut upstream = raw::RawUpstream::start().await;
    let relay = Relay::start(
        &upstream.url(),
        &[("retry_on", "503"), ("retry_max_wait", "50ms")],
    )
    .await;
    let mut client = raw::RawConn::connect(relay.addr).await;
    client
        .send(format!(
            "GET /v1/models HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            relay.addr
        ))
        .await;
    let hints = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
    for last in [
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    ] {
        let mut conn = upstream.next_conn().await;
        conn.read_head().await;
        conn.send(format!("{hints}{last}")).await;
    }
    let ending = client.read_to_end().await;
    let text = String::from_utf8_lossy(&ending.bytes);
    assert!(text.matches(" 103 ").count() <= 1, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 ").count(), 1, "{text}");
    assert!(!text.contains(" 503 "), "{text}");
    assert!(text.ends_with("ok"), "{text}");
    report(
        "issue25",
        &[
            "103 Early Hints, then 503; then 103 and 200",
            &format!(
                "one 200 relayed; 103s relayed: {}",
                text.matches(" 103 ").count()
            ),
        ],
    );
}

#[tokio::test]
async fn a_client_gone_during_the_wait_releases_its_reservation() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--retry-on", "429", "--retry-methods", "POST"]);
    command.args(["--token-budget", "200/day"]);
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    // Holds all of the budget while it is in flight.
    let body = r#"{"model": "m", "max_tokens": 1000}"#;
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), body)));
    upstream
        .next()
        .await
        .respond(answer(429, &[("retry-after", "1")]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    pending.abort();
    relay
        .process
        .wait_for_log("outcome=\"client_cancelled\"", 1)
        .await;
    no_further_attempt(&mut upstream, 1200, "no second attempt").await;
    // The reservation went with the request: the next one is sent.
    let pending = tokio::spawn(client.request(post(&relay.url("/v1/chat/completions"), body)));
    upstream.next().await.respond(ok("{}"));
    assert_eq!(answered(pending).await.status(), 200);
}

#[tokio::test]
async fn a_client_gone_during_the_replay_gets_no_third_attempt() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--retry-on", "503", "--retry-methods", "POST"]);
    command.args(["--retry-max-wait", "50ms"]);
    let relay = AdminRelay::spawn(command).await;
    let mut client = raw::RawConn::connect(relay.addr()).await;
    client
        .send(format!(
            "POST /v1/files HTTP/1.1\r\nHost: {}\r\nContent-Length: 1000\r\n\r\n",
            relay.addr()
        ))
        .await;
    client.send([b'z'; 500]).await;
    let _first = upstream
        .next()
        .await
        .respond_before_reading(answer(503, &[]));
    // The second attempt gets the kept half, then the client is gone.
    let mut second = upstream.next().await;
    let mut got = 0;
    while got < 500 {
        let frame = within("the replayed half", second.request.body_mut().frame())
            .await
            .expect("a frame")
            .expect("data");
        got += frame.data_ref().map_or(0, Bytes::len);
    }
    drop(client);
    let rest = within("the body's end", second.request.body_mut().collect()).await;
    assert!(rest.is_err(), "the replay is aborted, not ended short");
    relay
        .process
        .wait_for_log("outcome=\"client_cancelled\"", 1)
        .await;
    no_further_attempt(&mut upstream, 300, "no third attempt").await;
    report(
        "issue25",
        &[
            "client gone halfway through the second attempt's body",
            "the upstream saw that body aborted, no third attempt; logged client_cancelled",
        ],
    );
}

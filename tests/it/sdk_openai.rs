//! The official `openai` Python SDK through keyrelay, as the README shows it:
//! `OpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="unused")`.
//!
//! The mock upstream answers `/v1/chat/completions` like an OpenAI-compatible
//! server: Server-Sent Events of `chat.completion.chunk` objects, then
//! `data: [DONE]`. It sends event k+1 only after the SDK, in a child process,
//! has yielded and printed chunk k, so a proxy (or SDK setting) that buffered
//! the stream would stall the test instead of passing it. The upstream must
//! see keyrelay's key, exactly once, and never the SDK's placeholder; a
//! control test shows that check rejects the SDK talking to it directly.
//!
//! The SDK retries on its own (`max_retries`, 2 by default). The retry tests
//! at the end show keyrelay's retries (`retry_on`) give an SDK that does not
//! retry what its own retries would, and what both retrying adds up to.

use crate::support;
use crate::support::python;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use python::Script;
use serde_json::{json, Value};
use support::*;

const SCRIPT: &str = "openai_stream.py";
const MODEL: &str = "kr-test-model";
const TOKENS: [&str; 8] = [
    "The",
    " Mistral",
    " is",
    " a",
    " cold",
    " northerly",
    " wind",
    ".",
];

/// Why the upstream would refuse these credentials, if it would.
fn credential_problem(headers: &HeaderMap) -> Option<String> {
    let auth: Vec<_> = headers.get_all("authorization").iter().collect();
    if auth != [EXPECTED_AUTH] {
        return Some(format!(
            "authorization was {auth:?}, expected exactly [{EXPECTED_AUTH:?}]"
        ));
    }
    headers
        .iter()
        .find(|(_, value)| value.as_bytes().windows(6).any(|w| w == b"unused"))
        .map(|(name, _)| format!("the SDK's placeholder key reached the upstream in {name}"))
}

/// Reads the request body and checks it is the chat completion the script asks for.
async fn check_chat_request(body: &mut Incoming, stream: bool) {
    let body = within("the request body", body.collect())
        .await
        .expect("request body")
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("request body is JSON");
    assert_eq!(body["model"], MODEL, "{body}");
    assert_eq!(body["messages"][0]["content"], "What is the Mistral wind?");
    assert_eq!(body["stream"].as_bool().unwrap_or(false), stream, "{body}");
}

/// One Server-Sent Event carrying a `chat.completion.chunk`.
fn chunk_event(delta: Value, finish_reason: Option<&str>) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-keyrelay-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// Parses one JSON line the script printed for a chunk.
async fn printed_chunk(client: &mut Script, what: &str) -> Value {
    let line = client.line(what).await;
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("{what}: {line:?} is not JSON: {err}"))
}

#[tokio::test]
async fn openai_sdk_stream_yields_each_chunk_as_the_upstream_sends_it() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut client = Script::spawn(SCRIPT, &[&relay.url("/v1"), "stream"]);
    client.started("ready").await;

    let mut exchange = client
        .while_running("the request at the upstream", upstream.next())
        .await;
    assert_eq!(exchange.request.method(), http::Method::POST);
    assert_eq!(exchange.request.uri().path(), "/v1/chat/completions");
    if let Some(problem) = credential_problem(exchange.request.headers()) {
        panic!("keyrelay did not inject the key: {problem}");
    }
    check_chat_request(exchange.request.body_mut(), true).await;
    let (mut events, _dropped) = exchange.respond_streaming_with(
        http::Response::builder().header("content-type", "text/event-stream"),
    );

    // The role comes first, with empty content, as OpenAI's API sends it.
    events
        .send_data(chunk_event(
            json!({"role": "assistant", "content": ""}),
            None,
        ))
        .await
        .expect("send role chunk");
    assert_eq!(
        printed_chunk(&mut client, "the role chunk").await,
        json!({"content": "", "finish_reason": null})
    );
    for token in TOKENS {
        events
            .send_data(chunk_event(json!({"content": token}), None))
            .await
            .expect("send token chunk");
        // Lockstep: nothing more is sent until the SDK has yielded this chunk.
        assert_eq!(
            printed_chunk(&mut client, &format!("the chunk {token:?}")).await,
            json!({"content": token, "finish_reason": null})
        );
    }
    events
        .send_data(chunk_event(json!({}), Some("stop")))
        .await
        .expect("send final chunk");
    assert_eq!(
        printed_chunk(&mut client, "the final chunk").await,
        json!({"content": null, "finish_reason": "stop"})
    );
    events
        .send_data(Bytes::from_static(b"data: [DONE]\n\n"))
        .await
        .expect("send [DONE]");
    drop(events);
    client.expect_line("end").await;
    client.success().await;
    relay.stop().await;
}

#[tokio::test]
async fn openai_sdk_non_streaming_call_gets_the_whole_completion() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut client = Script::spawn(SCRIPT, &[&relay.url("/v1"), "once"]);
    client.started("ready").await;

    let mut exchange = client
        .while_running("the request at the upstream", upstream.next())
        .await;
    assert_eq!(exchange.request.uri().path(), "/v1/chat/completions");
    if let Some(problem) = credential_problem(exchange.request.headers()) {
        panic!("keyrelay did not inject the key: {problem}");
    }
    check_chat_request(exchange.request.body_mut(), false).await;
    let completion = json!({
        "id": "chatcmpl-keyrelay-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": TOKENS.concat()},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15},
    });
    let response = http::Response::builder()
        .header("content-type", "application/json")
        .body(full(completion.to_string()))
        .expect("response");
    exchange.respond(response);

    assert_eq!(
        printed_chunk(&mut client, "the completion").await,
        json!({"content": TOKENS.concat(), "finish_reason": "stop", "total_tokens": 15})
    );
    client.success().await;
    relay.stop().await;
}

/// Control: the credential check above is not vacuous. The same SDK call
/// sent straight to the mock upstream, skipping keyrelay, carries the
/// placeholder and fails the check.
#[tokio::test]
async fn credential_check_rejects_the_sdk_when_it_skips_keyrelay() {
    let mut upstream = MockUpstream::start().await;
    let mut client = Script::spawn(SCRIPT, &[&format!("{}/v1", upstream.url()), "once"]);
    client.started("ready").await;

    let exchange = client
        .while_running("the request at the upstream", upstream.next())
        .await;
    let problem = credential_problem(exchange.request.headers())
        .expect("a request without keyrelay must fail the credential check");
    assert!(problem.contains("Bearer unused"), "{problem}");
    exchange.respond_full(401, r#"{"error": "wrong key"}"#);

    let status = client.exit_status().await;
    assert!(!status.success(), "the SDK raises on 401");
    assert!(
        client.stderr().contains("AuthenticationError"),
        "{}",
        client.stderr()
    );
}

/// `add_stream_usage`: keyrelay asks the upstream for usage the SDK did not
/// ask for, and removes the usage-only chunk (`"choices": []`) that this
/// adds, which the script's `chunk.choices[0]` would otherwise fail on.
#[tokio::test]
async fn with_add_stream_usage_the_sdk_never_sees_the_usage_chunk_keyrelay_asked_for() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("add_stream_usage", "true")]).await;
    let mut client = Script::spawn(SCRIPT, &[&relay.url("/v1"), "stream"]);
    client.started("ready").await;

    let mut exchange = client
        .while_running("the request at the upstream", upstream.next())
        .await;
    let body = within("the request body", exchange.request.body_mut().collect())
        .await
        .expect("request body")
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("the rewritten body is JSON");
    assert_eq!(
        body["stream_options"],
        json!({"include_usage": true}),
        "{body}"
    );
    assert_eq!(
        body["model"], MODEL,
        "the rest of the request is kept: {body}"
    );
    let (mut events, _dropped) = exchange.respond_streaming_with(
        http::Response::builder().header("content-type", "text/event-stream"),
    );
    for token in TOKENS {
        events
            .send_data(chunk_event(json!({"content": token}), None))
            .await
            .expect("send token chunk");
        assert_eq!(
            printed_chunk(&mut client, &format!("the chunk {token:?}")).await,
            json!({"content": token, "finish_reason": null})
        );
    }
    let usage = json!({
        "id": "chatcmpl-keyrelay-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
    });
    // The final chunk, the usage chunk and [DONE] in one frame, as servers
    // often flush them.
    let mut tail = chunk_event(json!({}), Some("stop")).to_vec();
    tail.extend_from_slice(format!("data: {usage}\n\ndata: [DONE]\n\n").as_bytes());
    events
        .send_data(Bytes::from(tail))
        .await
        .expect("send the end");
    drop(events);
    assert_eq!(
        printed_chunk(&mut client, "the final chunk").await,
        json!({"content": null, "finish_reason": "stop"})
    );
    client.expect_line("end").await;
    client.success().await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// Retries: keyrelay's and the SDK's own
// ---------------------------------------------------------------------------
//
// What the SDK does with an error answer's headers (openai 1.55 to 3.x,
// `_should_retry` and `_calculate_retry_timeout` in its `_base_client.py`):
// - it retries 408, 409, 429 and 5xx, unless `x-should-retry: false`
//   (`x-should-retry: true` retries any status);
// - it waits `retry-after-ms` (milliseconds, preferred) or `retry-after`
//   (seconds, or an HTTP date) when that is above 0 and at most 60 s (120 s
//   in newer versions, which do not retry at all beyond that); otherwise
//   0.5 s × 2^n, at most 8 s, less up to 25 % jitter. So `Retry-After: 0`
//   means its own backoff, not no wait;
// - every attempt carries `x-stainless-retry-count` (0 on its first), which
//   shows at the upstream whose retry an attempt was.
// When keyrelay gives up (attempts used, a wait over `retry_max_wait`) it
// relays the upstream's answer, headers included, so the SDK then applies
// these rules to the upstream's own `Retry-After`.

/// keyrelay's retry settings for these tests: a model API's POSTs are
/// retried for 429 and 503, as the `retry_methods` help advises.
const RETRIES: [(&str, &str); 2] = [("retry_on", "429,503"), ("retry_methods", "POST")];

/// An OpenAI-style 429, the JSON error body the SDK raises `RateLimitError` from.
fn rate_limited(retry_after: &str) -> http::Response<TestBody> {
    let error = json!({"error": {
        "message": "Rate limit reached for requests",
        "type": "requests",
        "param": null,
        "code": "rate_limit_exceeded",
    }});
    http::Response::builder()
        .status(429)
        .header("content-type", "application/json")
        .header("retry-after", retry_after)
        .body(full(error.to_string()))
        .expect("response")
}

/// The streamed chat completion the upstream finally answers with: the
/// role, the tokens, the final chunk and `[DONE]`.
fn completion_events() -> Vec<Bytes> {
    let mut events = vec![chunk_event(
        json!({"role": "assistant", "content": ""}),
        None,
    )];
    events.extend(
        TOKENS
            .iter()
            .map(|token| chunk_event(json!({"content": token}), None)),
    );
    events.push(chunk_event(json!({}), Some("stop")));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// What the script prints for [`completion_events`]: a line per chunk.
fn completion_printed() -> Vec<Value> {
    let mut printed = vec![json!({"content": "", "finish_reason": null})];
    printed.extend(
        TOKENS
            .iter()
            .map(|token| json!({"content": token, "finish_reason": null})),
    );
    printed.push(json!({"content": null, "finish_reason": "stop"}));
    printed
}

/// What one SDK call through a run of 429s came to.
struct Outcome {
    /// How often the SDK itself retried (`retries_taken`).
    sdk_retries: u64,
    /// The final response's `Server-Timing`, if it had one.
    server_timing: Option<String>,
    /// The chunks the SDK yielded, as the script printed them.
    chunks: Vec<Value>,
    /// Each attempt the upstream saw: its body and `x-stainless-retry-count`.
    attempts: Vec<(Bytes, String)>,
    /// The time between one attempt's arrival and the next's.
    gaps: Vec<std::time::Duration>,
}

/// Runs the script (`stream --raw`, with the SDK's `max_retries`) against
/// `base_url`, whose upstream answers the first `refusals` attempts with a
/// 429 carrying `retry_after`, and the next with [`completion_events`].
/// `keyrelay` says whether `base_url` is keyrelay (which must inject the key).
async fn call_through_429s(
    base_url: &str,
    upstream: &mut MockUpstream,
    max_retries: u32,
    refusals: usize,
    retry_after: &str,
    keyrelay: bool,
) -> Outcome {
    let retries = max_retries.to_string();
    let args = [base_url, "stream", "--max-retries", &retries, "--raw"];
    let mut client = Script::spawn(SCRIPT, &args);
    client.started("ready").await;

    let mut attempts = Vec::new();
    let mut arrivals = Vec::new();
    for attempt in 0..=refusals {
        let what = format!("attempt {} at the upstream", attempt + 1);
        let mut exchange = client.while_running(&what, upstream.next()).await;
        arrivals.push(std::time::Instant::now());
        if keyrelay {
            if let Some(problem) = credential_problem(exchange.request.headers()) {
                panic!("attempt {}: {problem}", attempt + 1);
            }
        }
        let count = exchange
            .request
            .headers()
            .get("x-stainless-retry-count")
            .map_or("none", |value| value.to_str().expect("ASCII"))
            .to_owned();
        let body = within("the request body", exchange.request.body_mut().collect())
            .await
            .expect("request body")
            .to_bytes();
        attempts.push((body, count));
        if attempt < refusals {
            exchange.respond(rate_limited(retry_after));
            continue;
        }
        let (mut events, _dropped) = exchange.respond_streaming_with(
            http::Response::builder().header("content-type", "text/event-stream"),
        );
        for event in completion_events() {
            events.send_data(event).await.expect("send an event");
        }
    }

    let raw = printed_chunk(&mut client, "the raw response line").await;
    let mut chunks = Vec::new();
    for at in 0..completion_printed().len() {
        chunks.push(printed_chunk(&mut client, &format!("chunk {at}")).await);
    }
    client.expect_line("end").await;
    client.success().await;
    assert!(
        upstream.nothing_received(),
        "the upstream saw more than {} attempts",
        refusals + 1
    );
    Outcome {
        sdk_retries: raw["retries_taken"].as_u64().expect("retries_taken"),
        server_timing: raw["server_timing"].as_str().map(str::to_owned),
        chunks,
        gaps: arrivals.windows(2).map(|w| w[1] - w[0]).collect(),
        attempts,
    }
}

/// The issue's compatibility test: the SDK with `max_retries=0` through
/// keyrelay with retries on gets what the SDK with its own retries gets
/// without keyrelay. The upstream answers `429` with `Retry-After: 1`, then
/// the completion; both sides wait the second out, the upstream sees two
/// attempts with the same body, and the SDK yields the same chunks.
#[tokio::test]
async fn sdk_without_retries_through_keyrelay_gets_what_its_own_retries_get() {
    let mut through = MockUpstream::start().await;
    let mut direct = MockUpstream::start().await;
    let relay = Relay::start(&through.url(), &RETRIES).await;
    let relay_url = relay.url("/v1");
    let direct_url = format!("{}/v1", direct.url());
    // Side by side: each waits out its own second.
    let (keyrelay_retried, sdk_retried) = tokio::join!(
        call_through_429s(&relay_url, &mut through, 0, 1, "1", true),
        call_through_429s(&direct_url, &mut direct, 2, 1, "1", false),
    );
    relay.stop().await;

    assert_eq!(keyrelay_retried.chunks, completion_printed());
    assert_eq!(sdk_retried.chunks, keyrelay_retried.chunks);
    for (who, outcome) in [("keyrelay", &keyrelay_retried), ("the SDK", &sdk_retried)] {
        assert_eq!(outcome.attempts.len(), 2, "{who}");
        assert_eq!(
            outcome.attempts[0].0, outcome.attempts[1].0,
            "{who} sent the retry with another body"
        );
        assert!(
            outcome.gaps[0] >= std::time::Duration::from_secs(1),
            "{who} retried after {:?}, before Retry-After: 1 was up",
            outcome.gaps[0]
        );
    }
    let body: Value =
        serde_json::from_slice(&keyrelay_retried.attempts[0].0).expect("a JSON request body");
    assert_eq!(body["stream"], true, "{body}");

    // Who retried: keyrelay sent the SDK's one attempt twice; the SDK
    // itself counted its retry.
    assert_eq!(keyrelay_retried.sdk_retries, 0);
    let counts = |outcome: &Outcome| -> Vec<String> {
        outcome.attempts.iter().map(|(_, c)| c.clone()).collect()
    };
    assert_eq!(counts(&keyrelay_retried), ["0", "0"]);
    assert_eq!(sdk_retried.sdk_retries, 1);
    assert_eq!(counts(&sdk_retried), ["0", "1"]);

    let timing = keyrelay_retried
        .server_timing
        .expect("keyrelay's answer carries Server-Timing");
    assert!(
        timing.contains(r#"attempt;desc="429 from default""#),
        "{timing}"
    );
    assert!(
        timing.contains(r#"attempt;desc="200 from default""#),
        "{timing}"
    );
    assert_eq!(sdk_retried.server_timing, None, "the mock sends none");
}

/// Both retrying, against an upstream that answers 429 three times, then the
/// completion: keyrelay retries twice (its default `retry_attempts`) and
/// relays the third 429; the SDK (`max_retries=2`) retries once, and keyrelay
/// forwards that attempt, which gets the completion.
///
/// Retries multiply: keyrelay's attempts × the SDK's. The upstream saw 4
/// attempts for one SDK call here (3 from keyrelay for the SDK's first, 1
/// for its retry); an upstream that kept refusing would see 3 × 3 = 9.
/// Give retries to one layer, or size both with this in mind.
#[tokio::test]
async fn sdk_and_keyrelay_both_retrying_multiply_the_attempts() {
    let mut upstream = MockUpstream::start().await;
    let mut settings = RETRIES.to_vec();
    // Retry-After: 0 asks keyrelay for no wait; the cap bounds the test
    // should it fall back to its backoff.
    settings.push(("retry_max_wait", "100ms"));
    let relay = Relay::start(&upstream.url(), &settings).await;
    let outcome = call_through_429s(&relay.url("/v1"), &mut upstream, 2, 3, "0", true).await;
    relay.stop().await;

    assert_eq!(outcome.chunks, completion_printed());
    assert_eq!(
        outcome.attempts.len(),
        4,
        "3 from keyrelay for the SDK's first call, 1 for its retry"
    );
    let counts: Vec<&str> = outcome.attempts.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        counts,
        ["0", "0", "0", "1"],
        "three from keyrelay, then the SDK's retry"
    );
    assert!(
        outcome
            .attempts
            .iter()
            .all(|(body, _)| *body == outcome.attempts[0].0),
        "every attempt carries the same body"
    );
    assert_eq!(outcome.sdk_retries, 1);
    // The SDK's retry was answered at once: one attempt, no attempt list.
    let timing = outcome.server_timing.expect("Server-Timing");
    assert!(!timing.contains("attempt"), "{timing}");
}

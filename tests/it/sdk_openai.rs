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

//! Anthropic's official `anthropic` Python SDK through keyrelay with
//! `provider = "anthropic"`: `Anthropic(base_url="http://127.0.0.1:PORT")`,
//! holding no key of its own, or a placeholder one.
//!
//! The mock upstream answers `/v1/messages` as Anthropic's API streams:
//! `message_start`, `content_block_start`, a `ping`, one
//! `content_block_delta` per piece of text, `content_block_stop`,
//! `message_delta`, `message_stop`, each an SSE `event:` line and a JSON
//! `data:` line. It sends each text delta only after the SDK, in a child
//! process, has yielded the one before, so a buffering proxy stalls the
//! test. The upstream checks what Anthropic's API would: `x-api-key` is
//! keyrelay's key, exactly once, `anthropic-version` is set once, and the
//! SDK's placeholder key reaches it nowhere.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::support::python::Script;
use crate::support::*;

const SCRIPT: &str = "anthropic_stream.py";
/// The placeholder the script's `placeholder` mode hands the SDK.
const PLACEHOLDER: &str = "sk-ant-placeholder-not-a-key";
/// The key keyrelay holds, in the preset's variable.
const ANTHROPIC_KEY: &str = "sk-ant-relay-KEY-0b5e2f";
const TEXT: [&str; 5] = ["The", " Mistral", " is", " a", " cold wind."];

/// Why Anthropic's API would refuse these headers, if it would.
fn credential_problem(headers: &HeaderMap) -> Option<String> {
    let keys: Vec<_> = headers.get_all("x-api-key").iter().collect();
    if keys != [ANTHROPIC_KEY] {
        return Some(format!(
            "x-api-key was {keys:?}, expected [{ANTHROPIC_KEY:?}]"
        ));
    }
    let versions: Vec<_> = headers.get_all("anthropic-version").iter().collect();
    if versions != ["2023-06-01"] {
        return Some(format!("anthropic-version was {versions:?}"));
    }
    if headers.contains_key("authorization") {
        return Some("an authorization header reached the upstream".to_owned());
    }
    headers
        .iter()
        .find(|(_, value)| String::from_utf8_lossy(value.as_bytes()).contains(PLACEHOLDER))
        .map(|(name, _)| format!("the SDK's placeholder key reached the upstream in {name}"))
}

type Events = http_body_util::channel::Sender<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Sends one SSE event as Anthropic's API writes them.
async fn send(events: &mut Events, name: &str, data: Value) {
    let frame = Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    events.send_data(frame).await.expect("send event");
}

async fn printed(client: &mut Script, what: &str) -> Value {
    let line = client.line(what).await;
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("{what}: {line:?} is not JSON: {err}"))
}

async fn sdk_streams_through_the_anthropic_preset(mode: &str) {
    let mut upstream = MockUpstream::start().await;
    let mut sources = sources(&upstream.url(), &[("provider", "anthropic")]);
    sources
        .env
        .insert("ANTHROPIC_API_KEY".to_owned(), ANTHROPIC_KEY.to_owned());
    let relay = Relay::from_sources(&sources).await;
    let mut client = Script::spawn(SCRIPT, &[&relay.url(""), mode]);
    client.started("ready").await;

    let mut exchange = client
        .while_running("the request at the upstream", upstream.next())
        .await;
    assert_eq!(exchange.request.method(), http::Method::POST);
    assert_eq!(exchange.request.uri().path(), "/v1/messages");
    if let Some(problem) = credential_problem(exchange.request.headers()) {
        panic!("{mode}: {problem}");
    }
    let body = within("the request body", exchange.request.body_mut().collect())
        .await
        .expect("request body")
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(body["stream"], true, "{body}");
    assert_eq!(body["model"], "claude-kr-test", "{body}");
    let (mut events, _dropped) = exchange.respond_streaming_with(
        http::Response::builder()
            .header("content-type", "text/event-stream")
            .header("request-id", "req_kr_test"),
    );
    send(
        &mut events,
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_kr_test", "type": "message", "role": "assistant",
            "model": "claude-kr-test", "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
    )
    .await;
    send(
        &mut events,
        "content_block_start",
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}),
    )
    .await;
    send(&mut events, "ping", json!({"type": "ping"})).await;
    for text in TEXT {
        send(
            &mut events,
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": text}}),
        )
        .await;
        // Lockstep: the next event waits for the SDK to yield this one.
        assert_eq!(
            printed(&mut client, &format!("the text {text:?}")).await,
            json!({ "text": text })
        );
    }
    send(
        &mut events,
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    )
    .await;
    send(
        &mut events,
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": 9}}),
    )
    .await;
    send(&mut events, "message_stop", json!({"type": "message_stop"})).await;
    drop(events);
    assert_eq!(
        printed(&mut client, "the final message").await,
        json!({"stop_reason": "end_turn", "output_tokens": 9, "text": TEXT.concat()})
    );
    client.expect_line("end").await;
    client.success().await;
    relay.stop().await;
}

#[tokio::test]
async fn anthropic_sdk_without_a_key_streams_through_the_anthropic_preset() {
    sdk_streams_through_the_anthropic_preset("keyless").await;
}

#[tokio::test]
async fn anthropic_sdk_placeholder_key_is_replaced_by_keyrelays() {
    sdk_streams_through_the_anthropic_preset("placeholder").await;
}

//! Token usage read off responses as they pass (issue 16, item 1): the real
//! binary in front of a mock upstream that sends OpenAI and Anthropic usage,
//! split across frames at awkward places. Each frame is sent only after the
//! client has read the previous one, so the tap provably holds nothing
//! back; the counts then show up in `/metrics` and in the access-log line.

use crate::support;

use crate::support::ops;

use http::Request;
use ops::{AdminRelay, HeldStream};
use support::*;

const TOKENS: &str = "keyrelay_llm_tokens_total";
const TTFT_COUNT: &str = "keyrelay_time_to_first_token_seconds_count";
const RATE_COUNT: &str = "keyrelay_output_tokens_per_second_count";

/// A local access token; the metric names it by its variable, never its value.
const TOKEN_VAR: &str = "CHAT_APP_TOKEN";
const TOKEN: &str = "tok-chat-app-5f1e2d3c4b5a6978";

fn tokens(token: &'static str, kind: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("route", "default"),
        ("access_token", token),
        ("kind", kind),
    ]
}

fn sse() -> http::response::Builder {
    http::Response::builder().header("content-type", "text/event-stream")
}

fn post(relay: &AdminRelay, path: &str, body: &'static str) -> Request<TestBody> {
    Request::post(relay.url(path))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(full(body))
        .expect("request")
}

async fn relay_with(extra: &[&str], upstream: &MockUpstream) -> AdminRelay {
    let mut command = ops::command(&upstream.url());
    command
        .args(["--access-token-env", TOKEN_VAR])
        .args(extra)
        .env(TOKEN_VAR, TOKEN);
    AdminRelay::spawn(command).await
}

#[tokio::test]
async fn openai_stream_usage_split_mid_number_is_counted_and_nothing_is_held_back() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&[], &upstream).await;
    let client = http1_client();
    let request = post(&relay, "/v1/chat/completions", r#"{"stream": true}"#);
    let mut stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;

    // Frames cut inside an event, inside a key and inside a number, with
    // CRLF line ends on one event.
    for frame in [
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\nda",
        "ta: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_to",
        "kens\":1",
        "1,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n",
        "\ndata: [DONE]\n\n",
    ] {
        stream.lockstep(frame).await;
    }
    stream.finish().await;

    let scrape = relay
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "prompt"), 11.0)
        .await;
    assert_eq!(
        scrape.counter(TOKENS, &tokens(TOKEN_VAR, "completion")),
        2.0
    );
    assert_eq!(scrape.counter(TOKENS, &tokens(TOKEN_VAR, "cached")), 4.0);
    assert!(!scrape.0.contains(TOKEN), "the token's value never appears");
    assert_eq!(scrape.present(TTFT_COUNT, &[("route", "default")]), 1.0);
    assert_eq!(scrape.present(RATE_COUNT, &[("route", "default")]), 1.0);
    let log = relay
        .wait_for_log(
            "prompt_tokens=11 completion_tokens=2 cached_tokens=4 ttft_ms=",
            1,
        )
        .await;
    assert!(log.contains("tokens_per_s="), "{log}");
}

#[tokio::test]
async fn anthropic_streams_and_json_responses_are_counted() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&[], &upstream).await;
    let client = http1_client();

    let request = post(&relay, "/v1/messages", r#"{"stream": true}"#);
    let mut stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;
    for frame in [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_",
        "tokens\":15}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ] {
        stream.lockstep(frame).await;
    }
    stream.finish().await;
    let scrape = relay
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "completion"), 15.0)
        .await;
    assert_eq!(scrape.counter(TOKENS, &tokens(TOKEN_VAR, "prompt")), 25.0);
    assert_eq!(scrape.counter(TOKENS, &tokens(TOKEN_VAR, "cached")), 5.0);

    // A whole JSON response, with its Content-Length.
    let pending = tokio::spawn(client.request(post(&relay, "/v1/chat/completions", "{}")));
    let answer = r#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"Hi"}}],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
    upstream.next().await.respond(
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(answer))
            .expect("response"),
    );
    let response = within("the JSON response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(body_bytes(response).await, answer.as_bytes());
    let scrape = relay
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "prompt"), 32.0)
        .await;
    assert_eq!(
        scrape.counter(TOKENS, &tokens(TOKEN_VAR, "completion")),
        18.0
    );
}

#[tokio::test]
async fn with_the_tap_off_nothing_is_read() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--usage-tap", "off"], &upstream).await;
    let client = http1_client();
    let request = post(&relay, "/v1/chat/completions", r#"{"stream": true}"#);
    let mut stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;
    stream
        .lockstep(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}\n\n",
        )
        .await;
    stream.finish().await;
    let scrape = relay
        .wait_for_sample(
            "keyrelay_requests_total",
            &[("route", "default"), ("status", "2xx"), ("outcome", "ok")],
            1.0,
        )
        .await;
    assert_eq!(scrape.value(TOKENS, &tokens(TOKEN_VAR, "prompt")), None);
}

//! Token usage read off responses as they pass, and the budgets it is
//! charged to: the real binary in front of a mock upstream that sends
//! OpenAI and Anthropic usage, split across frames at awkward places. Each
//! frame is sent only after the client has read the previous one, so the
//! tap provably holds nothing back; the counts then show up in `/metrics`,
//! in the access-log line and in the admin port's `/usage`, and a used-up
//! budget refuses the next request before it goes upstream.

use crate::support;

use crate::support::guard_util::TempDir;
use crate::support::ops;

use http::Request;
use ops::{sse, AdminRelay, HeldStream};
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
    // Anthropic's input_tokens leaves out its cache reads: 25 + 5.
    assert_eq!(scrape.counter(TOKENS, &tokens(TOKEN_VAR, "prompt")), 30.0);
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
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "prompt"), 37.0)
        .await;
    assert_eq!(
        scrape.counter(TOKENS, &tokens(TOKEN_VAR, "completion")),
        18.0
    );

    // A whole Anthropic message.
    let pending = tokio::spawn(client.request(post(&relay, "/v1/messages", "{}")));
    let answer = r#"{"type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"usage":{"input_tokens":4,"output_tokens":2}}"#;
    upstream.next().await.respond(
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(answer))
            .expect("response"),
    );
    let response = within("the Anthropic JSON response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(body_bytes(response).await, answer.as_bytes());
    let scrape = relay
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "prompt"), 41.0)
        .await;
    assert_eq!(
        scrape.counter(TOKENS, &tokens(TOKEN_VAR, "completion")),
        20.0
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

/// Streams one OpenAI response reporting `prompt` + `completion` tokens.
async fn spend(
    relay: &AdminRelay,
    upstream: &mut MockUpstream,
    client: &TestClient,
    prompt: u64,
    completion: u64,
) {
    let request = post(relay, "/v1/chat/completions", r#"{"stream": true}"#);
    let mut stream = HeldStream::open_request(client, upstream, request, sse()).await;
    stream
        .lockstep(&format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}}}\n\n"
        ))
        .await;
    stream.finish().await;
}

/// The `/usage` report of the budget at `index`.
async fn budget(relay: &AdminRelay, index: usize) -> serde_json::Value {
    let response = relay.admin("GET", "/usage").await;
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = serde_json::from_str(&response.body_text()).expect("JSON");
    report["budgets"][index].clone()
}

#[tokio::test]
async fn a_used_up_budget_refuses_with_retry_after_before_anything_is_forwarded() {
    let mut upstream = MockUpstream::start().await;
    // A day window: a minute one could roll over between two requests.
    let relay = relay_with(&["--access-token-budget", "20/day"], &upstream).await;
    let client = http1_client();

    // Admitted with the budget untouched; it crosses it and is finished.
    spend(&relay, &mut upstream, &client, 12, 13).await;
    relay
        .wait_for_sample(
            "keyrelay_llm_budget_overshoot_tokens_total",
            &[("scope", "access_token"), ("name", TOKEN_VAR)],
            5.0,
        )
        .await;
    let report = budget(&relay, 0).await;
    assert_eq!(report["name"], TOKEN_VAR);
    assert_eq!(report["spent"], 25);
    assert_eq!(report["remaining"], 0);

    let refused = client
        .request(post(&relay, "/v1/chat/completions", "{}"))
        .await
        .expect("keyrelay answered");
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value =
        serde_json::from_slice(&body_bytes(refused).await).expect("JSON body");
    assert_eq!(body["type"], "token_budget_exhausted");
    assert_eq!(body["budget"], format!("access token {TOKEN_VAR}: 20/day"));
    assert!(
        upstream.nothing_received(),
        "refused before it went upstream"
    );
}

#[tokio::test]
async fn spent_tokens_survive_a_restart_and_a_corrupt_state_file_is_not_trusted() {
    let mut upstream = MockUpstream::start().await;
    let dir = TempDir::new("usage-state");
    let state = dir.path().join("usage.json");
    let state_arg = state.to_str().expect("UTF-8 path").to_owned();
    let flags = [
        "--token-budget",
        "1000/day",
        "--usage-state-file",
        &state_arg,
    ];
    let client = http1_client();

    let mut relay = relay_with(&flags, &upstream).await;
    spend(&relay, &mut upstream, &client, 30, 40).await;
    relay
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "completion"), 40.0)
        .await;
    relay.process.stop_and_output().await;
    assert!(state.exists(), "written at shutdown");

    let restarted = relay_with(&flags, &upstream).await;
    let report = budget(&restarted, 0).await;
    assert_eq!(
        (report["scope"].clone(), report["spent"].clone()),
        ("route".into(), 70.into())
    );
    drop(restarted);

    std::fs::write(&state, "{\"version\":1,\"accounts\":[{\"scope\"").expect("corrupt it");
    let fresh = relay_with(&flags, &upstream).await;
    assert_eq!(
        budget(&fresh, 0).await["spent"],
        0,
        "a corrupt file is not trusted"
    );
    fresh
        .wait_for_log("usage_state_file is corrupt, so it is not trusted", 1)
        .await;
    assert!(
        dir.path().join("usage.json.corrupt").exists(),
        "kept for a person to look at"
    );
}

#[tokio::test]
async fn add_stream_usage_asks_for_usage_counts_it_and_keeps_it_from_the_client() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--add-stream-usage"], &upstream).await;
    let client = http1_client();
    let usage_event =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":6,\"completion_tokens\":2}}\n\n";
    let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";

    for asked in [false, true] {
        let body = if asked {
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        } else {
            r#"{"stream":true}"#
        };
        let pending = tokio::spawn(client.request(post(&relay, "/v1/chat/completions", body)));
        let mut exchange = upstream.next().await;
        let sent = exchange.body_json().await;
        assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
        let (mut tx, _dropped) = exchange.respond_streaming_with(sse());
        let response = within("the response head", pending)
            .await
            .expect("join")
            .expect("response");
        let mut body = response.into_body();
        // Lockstep: the content chunk reaches the client before anything more is sent.
        tx.send_data(chunk.into()).await.expect("send");
        assert_eq!(
            next_data(&mut body).await.expect("frame").expect("data"),
            chunk
        );
        // The usage event split in two, then [DONE].
        let (first, second) = usage_event.split_at(30);
        for part in [first, second, "data: [DONE]\n\n"] {
            tx.send_data(part.to_owned().into()).await.expect("send");
        }
        drop(tx);
        let mut rest = Vec::new();
        while let Some(frame) = next_data(&mut body).await {
            rest.extend_from_slice(&frame.expect("data"));
        }
        let expected = if asked {
            format!("{usage_event}data: [DONE]\n\n")
        } else {
            "data: [DONE]\n\n".to_owned()
        };
        assert_eq!(String::from_utf8_lossy(&rest), expected, "asked: {asked}");
    }
    // Both counted, whoever asked.
    relay
        .wait_for_sample(TOKENS, &tokens(TOKEN_VAR, "prompt"), 12.0)
        .await;
}

#[tokio::test]
async fn a_budgeted_request_cannot_escape_its_budget_by_asking_for_compression() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000/day"], &upstream).await;
    let client = http1_client();
    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, br")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(full(r#"{"stream": true}"#))
        .expect("request");
    let stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;
    assert_eq!(
        stream.upstream_headers["accept-encoding"], "identity",
        "the tap must be able to read what is charged"
    );
    stream.finish().await;
}

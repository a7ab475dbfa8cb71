//! Budgets a client cannot escape (issue 23): every request shape an
//! OpenAI-compatible server streams is asked for its usage, a response
//! that reports none is still charged, concurrent requests hold
//! reservations, and a route's request caps read the same bounded body.
//! The real binary in front of a mock upstream, through real sockets.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;

use crate::support::ops::{self, eventually, sse, AdminRelay, HeldStream};
use crate::support::*;

async fn relay_with(extra: &[&str], upstream: &MockUpstream) -> AdminRelay {
    let mut command = ops::command(&upstream.url());
    command.args(extra);
    AdminRelay::spawn(command).await
}

/// What the route's first budget has spent (reservations included).
async fn spent(relay: &AdminRelay) -> u64 {
    let response = relay.admin("GET", "/usage").await;
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = serde_json::from_str(&response.body_text()).expect("JSON");
    report["budgets"][0]["spent"].as_u64().expect("a count")
}

/// Waits until the budget shows `want` spent.
async fn wait_spent(relay: &AdminRelay, want: u64) {
    let mut last = 0;
    let found = tokio::time::timeout(STEP, async {
        loop {
            last = spent(relay).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(found.is_ok(), "spent {last}, expected {want}");
}

/// A body the client sends chunked, with no Content-Length, in two frames.
fn chunked(body: &'static str) -> TestBody {
    let (first, second) = body.split_at(body.len() / 2);
    let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, BoxError>::new(2);
    tokio::spawn(async move {
        let _ = tx.send_data(Bytes::from_static(first.as_bytes())).await;
        let _ = tx.send_data(Bytes::from_static(second.as_bytes())).await;
    });
    channel.boxed()
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test]
async fn every_streaming_shape_a_server_accepts_is_asked_for_its_usage() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--add-stream-usage"], &upstream).await;
    let client = http1_client();
    let json = Some("application/json");
    // (what, path, content type, body, chunked)
    let shapes: [(&str, &str, Option<&str>, &'static str, bool); 8] = [
        (
            "plain JSON",
            "/v1/chat/completions",
            json,
            r#"{"stream":true}"#,
            false,
        ),
        (
            "stream_options: null",
            "/v1/chat/completions",
            json,
            r#"{"stream":true,"stream_options":null}"#,
            false,
        ),
        (
            "\"stream\": \"true\"",
            "/v1/chat/completions",
            json,
            r#"{"stream":"true"}"#,
            false,
        ),
        (
            "no content type",
            "/v1/chat/completions",
            None,
            r#"{"stream":true}"#,
            false,
        ),
        (
            "text/plain",
            "/v1/chat/completions",
            Some("text/plain"),
            r#"{"stream":true}"#,
            false,
        ),
        (
            "chunked body",
            "/v1/chat/completions",
            json,
            r#"{"stream":true,"model":"m"}"#,
            true,
        ),
        (
            "UTF-8 BOM",
            "/v1/chat/completions",
            json,
            "\u{feff}{\"stream\":true}",
            false,
        ),
        (
            "trailing slash",
            "/v1/chat/completions/",
            json,
            r#"{"stream":true}"#,
            false,
        ),
    ];
    let mut escaped = Vec::new();
    for (what, path, content_type, body, is_chunked) in shapes {
        let mut request = Request::post(relay.url(path));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let body = if is_chunked {
            chunked(body)
        } else {
            full(body)
        };
        let pending = tokio::spawn(client.request(request.body(body).expect("request")));
        let mut exchange = upstream.next().await;
        let sent = within("the request body", exchange.request.body_mut().collect())
            .await
            .expect("body")
            .to_bytes();
        let sent = sent.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&sent);
        let sent: serde_json::Value = serde_json::from_slice(sent).expect("JSON upstream");
        if sent["stream_options"]["include_usage"] != true {
            escaped.push(what);
        }
        crate::support::reliability::report(
            "issue23",
            &[
                &format!("add_stream_usage; a streaming chat request with {what}"),
                &format!(
                    "forwarded with stream_options.include_usage = {}",
                    sent["stream_options"]["include_usage"]
                ),
            ],
        );
        exchange.respond(sse().body(full("data: [DONE]\n\n")).expect("response"));
        let response = within("the answer", pending)
            .await
            .expect("join")
            .expect("answer");
        assert_eq!(response.status(), 200, "{what}");
        body_bytes(response).await;
    }
    assert!(
        escaped.is_empty(),
        "no include_usage added for: {escaped:?}"
    );
}

#[tokio::test]
async fn a_client_gone_before_the_usage_event_is_charged_a_lower_bound() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let client = http1_client();
    let body = r#"{"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full(body))
        .expect("request");
    let mut stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;
    for word in ["Hel", "lo", " there"] {
        stream
            .lockstep(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"
            ))
            .await;
    }
    // Every content chunk read, then gone before the usage event.
    let HeldStream {
        tx,
        dropped,
        body: client_body,
        ..
    } = stream;
    drop(client_body);
    dropped.wait().await;
    drop(tx);
    // The prompt estimate (body bytes / 4) and one token per content chunk.
    wait_spent(&relay, (body.len() / 4 + 3) as u64).await;
    crate::support::reliability::report(
        "issue23",
        &[
            "a client reads every content chunk (3), then disconnects before the usage event",
            &format!(
                "charged {} tokens (lower bound: {}-byte body / 4, 1 per content chunk)",
                spent(&relay).await,
                body.len()
            ),
        ],
    );
}

#[tokio::test]
async fn a_json_answer_over_the_tap_bound_is_charged_the_usage_at_its_end() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let client = http1_client();
    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full(r#"{"max_tokens":8000}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let mut answer = br#"{"object":"chat.completion","choices":[{"message":{"content":""#.to_vec();
    answer.extend(std::iter::repeat_n(b'a', (1 << 20) + 100));
    answer.extend_from_slice(
        br#""}}],"usage":{"prompt_tokens":10,"completion_tokens":5000,"total_tokens":5010}}"#,
    );
    let length = answer.len();
    upstream.next().await.respond(
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(answer))
            .expect("response"),
    );
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("answer");
    assert_eq!(body_bytes(response).await.len(), length, "relayed whole");
    wait_spent(&relay, 5_010).await;
    crate::support::reliability::report(
        "issue23",
        &[
            &format!("a non-streamed JSON answer of {length} bytes (over the 1 MiB bound) reporting 5,010 tokens"),
            &format!(
                "relayed whole; charged {} tokens (the usage at its end)",
                spent(&relay).await
            ),
        ],
    );
}

/// A streamed answer reporting `tokens` (prompt 100 + the rest completion).
fn usage_stream(tokens: u64) -> TestBody {
    full(format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\n\
         data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":100,\"completion_tokens\":{}}}}}\n\n\
         data: [DONE]\n\n",
        tokens - 100
    ))
}

/// Sends `count` requests with `body` at once, holds every one that
/// reaches the upstream until each of the others was refused, then answers
/// them all with `tokens` each. Returns (admitted, refused with 429).
async fn at_once(
    relay: &AdminRelay,
    upstream: &mut MockUpstream,
    count: usize,
    body: &'static str,
    tokens: u64,
) -> (usize, usize) {
    let client = http1_client();
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let request = Request::post(relay.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(full(body))
                .expect("request");
            let client = client.clone();
            tokio::spawn(async move {
                let response = client.request(request).await.expect("answered");
                let status = response.status().as_u16();
                body_bytes(response).await;
                status
            })
        })
        .collect();
    let mut held = Vec::new();
    loop {
        let finished = tasks.iter().filter(|task| task.is_finished()).count();
        if held.len() + finished == count {
            break;
        }
        tokio::select! {
            exchange = upstream.next() => held.push(exchange),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    let admitted = held.len();
    for exchange in held {
        exchange.respond(sse().body(usage_stream(tokens)).expect("response"));
    }
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("join") {
            200 => {}
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    (admitted, refused)
}

#[tokio::test]
async fn six_concurrent_streams_cannot_spend_past_the_budget_together() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1500/day"], &upstream).await;
    // Each spends 1,166: before reservations all six were admitted (6,996).
    let (admitted, refused) = at_once(&relay, &mut upstream, 6, r#"{"stream":true}"#, 1_166).await;
    assert_eq!(
        (admitted, refused),
        (1, 5),
        "the first holds the budget_reserve"
    );
    wait_spent(&relay, 1_166).await;
    crate::support::reliability::report(
        "issue23",
        &[
            "6 concurrent streams against a 1,500/day budget, each spending 1,166",
            &format!(
                "{admitted} admitted, {refused} refused with 429; {} spent",
                spent(&relay).await
            ),
        ],
    );
}

#[tokio::test]
async fn twenty_concurrent_streams_overshoot_by_less_than_one_reservation() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000/day"], &upstream).await;
    // 113 bytes: a reservation of 28 (prompt) + 100 (max_tokens) = 128.
    let body = r#"{"model":"m","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Say hello, in a few words."}]}"#;
    let reservation = (body.len() / 4 + 100) as u64;
    // Each spends 140: more than the prompt estimate guessed.
    let (admitted, refused) = at_once(&relay, &mut upstream, 20, body, 140).await;
    let total = admitted as u64 * 140;
    wait_spent(&relay, total).await;
    let overshoot = total.saturating_sub(1_000);
    println!("20 concurrent streams, 1000/day: {admitted} admitted, {total} spent, overshoot {overshoot} (one reservation: {reservation})");
    assert!(admitted < 20, "reservations stop admission");
    assert!(
        overshoot <= reservation,
        "overshoot {overshoot} > {reservation}"
    );
    crate::support::reliability::report(
        "issue23",
        &[
            &format!("20 concurrent streams against a 1,000/day budget, each reserving {reservation} and spending 140"),
            &format!("{admitted} admitted, {refused} refused with 429; {total} spent: overshoot {overshoot}, one reservation is {reservation}"),
        ],
    );
}

#[tokio::test]
async fn unreadable_bodies_are_forwarded_under_the_reservation_or_refused() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let client = http1_client();
    // Not JSON: forwarded, and its stream charged though it reports nothing.
    let request = Request::post(relay.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full("stream=true&model=m"))
        .expect("request");
    let stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;
    let mut stream = stream;
    stream
        .lockstep("data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n")
        .await;
    stream.finish().await;
    wait_spent(&relay, ("stream=true&model=m".len() / 4 + 1) as u64).await;
    crate::support::reliability::report(
        "issue23",
        &[
            "a budgeted streaming request whose body is not JSON (`stream=true&model=m`), its stream reporting no usage",
            &format!(
                "forwarded; charged {} tokens (lower bound)",
                spent(&relay).await
            ),
        ],
    );
    drop(relay);

    let refusing = relay_with(
        &[
            "--token-budget",
            "1000000/day",
            "--unparsed-budget-requests",
            "refuse",
        ],
        &upstream,
    )
    .await;
    let too_big = "x".repeat((1 << 20) + 1);
    for body in ["not json".to_owned(), format!("{{\"a\":\"{too_big}\"}}")] {
        let length = body.len();
        let request = Request::post(refusing.url("/v1/chat/completions"))
            .body(full(body))
            .expect("request");
        let response = client.request(request).await.expect("answered");
        let status = response.status();
        assert_eq!(status, 400);
        let error: serde_json::Value =
            serde_json::from_slice(&body_bytes(response).await).expect("JSON");
        assert_eq!(error["type"], "unreadable_request_body");
        crate::support::reliability::report(
            "issue23",
            &[
                &if length > 1 << 20 {
                    format!("unparsed_budget_requests = refuse; a JSON body of {length} bytes, over the 1 MiB bound")
                } else {
                    format!("unparsed_budget_requests = refuse; a body that is not JSON ({length} bytes)")
                },
                &format!(
                    "{} {}; not forwarded",
                    status.as_u16(),
                    error["type"].as_str().unwrap_or("?")
                ),
            ],
        );
    }
    assert!(upstream.nothing_received(), "refused before the upstream");
}

async fn answer(
    client: &TestClient,
    relay: &AdminRelay,
    content_type: Option<&str>,
    body: &'static str,
) -> (u16, serde_json::Value) {
    let mut request = Request::post(relay.url("/v1/chat/completions"));
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = client
        .request(request.body(full(body)).expect("request"))
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let body = body_bytes(response).await;
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test]
async fn request_caps_refuse_other_models_and_over_asking_however_the_body_is_sent() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(
        &["--allowed-models", "small", "--max-output-tokens", "500"],
        &upstream,
    )
    .await;
    let client = http1_client();
    for (content_type, body) in [
        (Some("application/json"), r#"{"model":"large"}"#),
        (None, "\u{feff}{\"model\":\"large\"}"),
        (Some("text/plain"), r#"{"model":"large","max_tokens":10}"#),
        (Some("application/json"), r#"{"messages":[]}"#),
    ] {
        let (status, error) = answer(&client, &relay, content_type, body).await;
        crate::support::reliability::report(
            "issue23",
            &[
                &format!(
                    "allowed_models = small; `{}` sent as {}",
                    body.replace('\u{feff}', "(BOM)"),
                    content_type.unwrap_or("no content type")
                ),
                &format!("{status} {}", error["type"].as_str().unwrap_or("?")),
            ],
        );
        assert_eq!(
            (status, &error["type"]),
            (403, &"model_not_allowed".into()),
            "{body}"
        );
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|m| m.contains("allowed_models")),
            "{error}"
        );
    }
    let (status, error) = answer(
        &client,
        &relay,
        Some("application/json"),
        r#"{"model":"small","max_completion_tokens":"100000"}"#,
    )
    .await;
    crate::support::reliability::report(
        "issue23",
        &[
            "max_output_tokens = 500; `\"max_completion_tokens\": \"100000\"` (a string)",
            &format!("{status} {}", error["type"].as_str().unwrap_or("?")),
        ],
    );
    assert_eq!(
        (status, &error["type"]),
        (403, &"max_output_tokens_exceeded".into())
    );
    assert!(error["error"]
        .as_str()
        .is_some_and(|m| m.contains("max_output_tokens") && m.contains("is 500")));
    // A body keyrelay cannot read cannot escape the caps.
    let (status, error) = answer(&client, &relay, Some("application/json"), "model=large").await;
    assert_eq!(
        (status, &error["type"]),
        (400, &"unreadable_request_body".into())
    );
    assert!(
        upstream.nothing_received(),
        "all refused before the upstream"
    );

    // Within the caps: forwarded, a missing limit filled in.
    let pending = tokio::spawn(
        client.request(
            Request::post(relay.url("/v1/chat/completions"))
                .body(full(r#"{"model":"small"}"#))
                .expect("request"),
        ),
    );
    let mut exchange = upstream.next().await;
    let sent = exchange.body_json().await;
    crate::support::reliability::report(
        "issue23",
        &[
            "max_output_tokens = 500; a request that names no output limit",
            &format!("forwarded with max_tokens = {}", sent["max_tokens"]),
        ],
    );
    assert_eq!(sent["max_tokens"], 500);
    exchange.respond_full(200, "{}");
    within("the answer", pending)
        .await
        .expect("join")
        .expect("answer");
}

#[tokio::test]
async fn over_asking_is_clamped_when_the_route_says_so() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(
        &[
            "--max-output-tokens",
            "256",
            "--over-max-output-tokens",
            "clamp",
            "--add-stream-usage",
        ],
        &upstream,
    )
    .await;
    let client = http1_client();
    let pending = tokio::spawn(
        client.request(
            Request::post(relay.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(chunked(
                    r#"{"stream":true,"max_tokens":100000,"max_completion_tokens":9}"#,
                ))
                .expect("request"),
        ),
    );
    let mut exchange = upstream.next().await;
    let length: usize = exchange.request.headers()["content-length"]
        .to_str()
        .expect("text")
        .parse()
        .expect("number");
    let sent = exchange
        .request
        .body_mut()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(sent.len(), length);
    let sent: serde_json::Value = serde_json::from_slice(&sent).expect("JSON");
    crate::support::reliability::report(
        "issue23",
        &[
            "max_output_tokens = 256, over_max_output_tokens = clamp; a chunked streaming body asking max_tokens 100000",
            &format!(
                "forwarded with max_tokens = {}, max_completion_tokens = {}, include_usage = {}",
                sent["max_tokens"], sent["max_completion_tokens"], sent["stream_options"]["include_usage"]
            ),
        ],
    );
    assert_eq!(sent["max_tokens"], 256);
    assert_eq!(sent["max_completion_tokens"], 9);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    exchange.respond(sse().body(full("data: [DONE]\n\n")).expect("response"));
    within("the answer", pending)
        .await
        .expect("join")
        .expect("answer");
}

#[tokio::test]
async fn a_failed_request_gives_its_reservation_back() {
    // No upstream listening: the request fails after reserving.
    let upstream = MockUpstream::start().await;
    let mut command = ops::command(&format!("http://127.0.0.1:{}", closed_port()));
    command.args(["--token-budget", "5000/day"]);
    let relay = AdminRelay::spawn(command).await;
    drop(upstream);
    let client = http1_client();
    let request = Request::post(relay.url("/v1/chat/completions"))
        .body(full(r#"{"stream":true}"#))
        .expect("request");
    let response = client.request(request).await.expect("answered");
    assert_eq!(response.status(), 502);
    eventually("the reservation given back", || async {
        (spent(&relay).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn access_tokens_carry_their_own_caps_on_top_of_the_route() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command
        .args(["--access-token-env", "APP_TOKEN"])
        .args(["--access-token-allowed-models", "small,tiny"])
        .args(["--access-token-max-output-tokens", "64"])
        .args(["--allowed-models", "small,large"])
        .env("APP_TOKEN", "tok-app-7c1d9e2f3a4b5c6d");
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    let ask = |body: &'static str| {
        Request::post(relay.url("/v1/chat/completions"))
            .header("authorization", "Bearer tok-app-7c1d9e2f3a4b5c6d")
            .body(full(body))
            .expect("request")
    };
    for (body, status, kind) in [
        // The route allows it, the token does not.
        (r#"{"model":"large"}"#, 403, "model_not_allowed"),
        // The token allows it, the route does not.
        (r#"{"model":"tiny"}"#, 403, "model_not_allowed"),
        (
            r#"{"model":"small","max_tokens":65}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        ("{\"model\":\"small\"", 400, "unreadable_request_body"),
    ] {
        let response = client.request(ask(body)).await.expect("answered");
        let got = response.status();
        let error: serde_json::Value =
            serde_json::from_slice(&body_bytes(response).await).expect("JSON");
        crate::support::reliability::report(
            "issue23",
            &[
                &format!("an access token capped at small,tiny / 64 tokens on a route allowing small,large; `{body}`"),
                &format!("{} {}", got.as_u16(), error["type"].as_str().unwrap_or("?")),
            ],
        );
        assert_eq!(got, status, "{body}");
        assert_eq!(error["type"], kind, "{body}");
    }
    assert!(
        upstream.nothing_received(),
        "all refused before the upstream"
    );
    let pending = tokio::spawn(client.request(ask(r#"{"model":"small"}"#)));
    let mut exchange = upstream.next().await;
    let sent = exchange.body_json().await;
    assert_eq!(sent["max_tokens"], 64, "the token's cap filled in");
    exchange.respond_full(200, "{}");
    within("the answer", pending)
        .await
        .expect("join")
        .expect("answer");
}

#[tokio::test]
async fn a_client_gone_before_the_response_head_still_pays_for_its_prompt() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let client = http1_client();
    let body = r#"{"stream":true,"messages":[{"role":"user","content":"a long prompt"}]}"#;
    let pending = tokio::spawn(
        client.request(
            Request::post(relay.url("/v1/chat/completions"))
                .body(full(body))
                .expect("request"),
        ),
    );
    // The upstream has the request (and reads its prompt); the client
    // leaves before the answer starts.
    let exchange = upstream.next().await;
    pending.abort();
    let _ = pending.await;
    wait_spent(&relay, (body.len() / 4) as u64).await;
    crate::support::reliability::report(
        "issue23",
        &[
            "a budgeted client disconnects after the upstream has its prompt, before the response head",
            &format!(
                "charged {} tokens ({}-byte body / 4)",
                spent(&relay).await,
                body.len()
            ),
        ],
    );
    drop(exchange);
}

/// Sends `body` to `path` and reads keyrelay's answer: `None` if none came
/// within a second (the request went to the upstream, which holds it).
async fn refusal(
    client: &TestClient,
    relay: &AdminRelay,
    path: &str,
    token: Option<&str>,
    body: &'static str,
) -> Option<(u16, String)> {
    let mut request = Request::post(relay.url(path)).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let pending = client.request(request.body(full(body)).expect("request"));
    let response = tokio::time::timeout(Duration::from_secs(1), pending)
        .await
        .ok()?
        .expect("answered");
    let status = response.status().as_u16();
    let error: serde_json::Value =
        serde_json::from_slice(&body_bytes(response).await).unwrap_or_default();
    Some((
        status,
        error["type"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Asserts that each `(path, body)` is refused with `(status, kind)`, and
/// none reaches the upstream.
async fn all_refused(
    relay: &AdminRelay,
    upstream: &mut MockUpstream,
    token: Option<&str>,
    cases: &[(&str, &'static str, u16, &str)],
) {
    let client = http1_client();
    let mut escaped = Vec::new();
    for (path, body, status, kind) in cases {
        let got = refusal(&client, relay, path, token, body).await;
        if got != Some((*status, (*kind).to_owned())) {
            escaped.push(format!("{path} {body}: {got:?}"));
        }
        let seen = match &got {
            Some((status, kind)) => format!("{status} {kind}"),
            None => "no answer within 1 s".to_owned(),
        };
        crate::support::reliability::report(
            "issue23",
            &[
                &format!("past a request cap: POST {path} {body}"),
                &format!("{seen}{}", token.map_or("", |_| " (access token's caps)")),
            ],
        );
    }
    assert!(escaped.is_empty(), "not refused as expected: {escaped:#?}");
    assert!(upstream.nothing_received(), "refused before the upstream");
}

#[tokio::test]
async fn an_access_tokens_caps_hold_for_a_body_keyrelay_cannot_parse() {
    // The route has no caps of its own; the token's must still hold for a
    // body Python's json module reads (NaN, UTF-16) and serde_json does not.
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command
        .args(["--access-token-env", "APP_TOKEN"])
        .args(["--access-token-allowed-models", "small"])
        .args(["--access-token-max-output-tokens", "64"])
        .env("APP_TOKEN", "tok-app-7c1d9e2f3a4b5c6d");
    let relay = AdminRelay::spawn(command).await;
    all_refused(
        &relay,
        &mut upstream,
        Some("tok-app-7c1d9e2f3a4b5c6d"),
        &[
            (
                "/v1/chat/completions",
                r#"{"model":"large","max_tokens":100000,"temperature":NaN}"#,
                400,
                "unreadable_request_body",
            ),
            (
                "/v1/chat/completions",
                "\u{feff}{\"model\":\"large\"} trailing",
                400,
                "unreadable_request_body",
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn keys_servers_read_differently_cannot_carry_a_model_or_limit_past_the_caps() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(
        &["--allowed-models", "small", "--max-output-tokens", "500"],
        &upstream,
    )
    .await;
    let unreadable = "unreadable_request_body";
    all_refused(
        &relay,
        &mut upstream,
        None,
        &[
            // Go's encoding/json (Ollama, LocalAI) matches names in any
            // case and takes the last.
            (
                "/v1/chat/completions",
                r#"{"model":"small","Model":"large"}"#,
                400,
                unreadable,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"small","max_tokens":10,"MAX_TOKENS":100000}"#,
                400,
                unreadable,
            ),
            // A Kelvin sign folds to k.
            (
                "/v1/chat/completions",
                "{\"model\":\"small\",\"max_to\u{212A}ens\":100000}",
                400,
                unreadable,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"small","MODEL":"large"}"#,
                400,
                unreadable,
            ),
            // Parsers that keep the first of a repeated key.
            (
                "/v1/chat/completions",
                r#"{"model":"large","model":"small"}"#,
                400,
                unreadable,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"small","max_tokens":100000,"max_tokens":10}"#,
                400,
                unreadable,
            ),
            // llama.cpp prefers n_predict to max_tokens; -1 is no limit.
            (
                "/v1/chat/completions",
                r#"{"model":"small","max_tokens":10,"n_predict":100000}"#,
                403,
                "max_output_tokens_exceeded",
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"small","n_predict":-1}"#,
                400,
                unreadable,
            ),
            // The model in the path is the one Gemini, Vertex AI, Azure
            // and Bedrock run.
            (
                "/v1beta/models/large:streamGenerateContent",
                r#"{"model":"small","contents":[]}"#,
                403,
                "model_not_allowed",
            ),
            (
                "/v1beta/models/lar%67e:generateContent",
                r#"{"contents":[]}"#,
                403,
                "model_not_allowed",
            ),
            (
                "/openai/deployments/large/chat/completions",
                r#"{"model":"small"}"#,
                403,
                "model_not_allowed",
            ),
            (
                "/model/large/invoke",
                r#"{"model":"small"}"#,
                403,
                "model_not_allowed",
            ),
        ],
    )
    .await;

    // An allowed model in the path stands in for the body's.
    let client = http1_client();
    let pending = tokio::spawn(
        client.request(
            Request::post(relay.url("/v1beta/models/small:generateContent"))
                .body(full(r#"{"contents":[],"Temperature":1}"#))
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    exchange.respond_full(200, "{}");
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("answer");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn completions_paths_a_server_decodes_are_asked_for_their_usage() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--add-stream-usage"], &upstream).await;
    let client = http1_client();
    let mut escaped = Vec::new();
    // uvicorn decodes %2F before Starlette routes the path.
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions/",
        "/V1/CHAT/COMPLETIONS",
    ] {
        let pending = tokio::spawn(
            client.request(
                Request::post(relay.url(path))
                    .body(full(r#"{"stream":true}"#))
                    .expect("request"),
            ),
        );
        let mut exchange = upstream.next().await;
        let sent = exchange.body_json().await;
        let added = sent["stream_options"]["include_usage"] == true;
        if !added {
            escaped.push(path);
        }
        crate::support::reliability::report(
            "issue23",
            &[
                &format!("add_stream_usage: a streaming chat request to {path}, which servers decode to the chat path"),
                if added {
                    "include_usage added to the body sent upstream"
                } else {
                    "include_usage NOT added"
                },
            ],
        );
        exchange.respond(sse().body(full("data: [DONE]\n\n")).expect("response"));
        let response = within("the answer", pending)
            .await
            .expect("join")
            .expect("answer");
        body_bytes(response).await;
    }
    assert!(
        escaped.is_empty(),
        "no include_usage added for: {escaped:?}"
    );
}

#[tokio::test]
async fn answers_in_other_text_types_are_charged_a_lower_bound() {
    // Ollama's native API streams JSON lines; other servers answer in
    // plain text or name no type. None reports OpenAI-style usage.
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let client = http1_client();
    let body = r#"{"model":"llama3","messages":[{"role":"user","content":"hello there"}]}"#;
    let prompt = (body.len() / 4) as u64;
    let lines = "{\"message\":{\"content\":\"Hi\"},\"done\":false}\n\
                 {\"message\":{\"content\":\" you\"},\"done\":false}\n\
                 {\"done\":true,\"eval_count\":2}\n";
    let text = "x".repeat(400);
    let mut expected = 0;
    for (content_type, answer, charge) in [
        (Some("application/x-ndjson"), lines.to_owned(), prompt + 3),
        (
            Some("text/plain; charset=utf-8"),
            text.clone(),
            prompt + 100,
        ),
        (None, text.clone(), prompt + 100),
    ] {
        let pending = tokio::spawn(
            client.request(
                Request::post(relay.url("/api/chat"))
                    .body(full(body))
                    .expect("request"),
            ),
        );
        let exchange = upstream.next().await;
        let mut response = http::Response::builder();
        if let Some(content_type) = content_type {
            response = response.header("content-type", content_type);
        }
        exchange.respond(response.body(full(answer)).expect("response"));
        let response = within("the answer", pending)
            .await
            .expect("join")
            .expect("answer");
        assert_eq!(response.status(), 200);
        body_bytes(response).await;
        expected += charge;
        wait_spent(&relay, expected).await;
        crate::support::reliability::report(
            "issue23",
            &[
                &format!(
                    "a budgeted answer typed {} that reports no usage",
                    content_type.unwrap_or("nothing")
                ),
                &format!("charged {charge} tokens (prompt estimate + lower bound), /usage agrees"),
            ],
        );
    }
}

#[tokio::test]
async fn n_answers_ask_for_n_times_the_output_cap() {
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--max-output-tokens", "500"], &upstream).await;
    all_refused(
        &relay,
        &mut upstream,
        None,
        &[
            (
                "/v1/chat/completions",
                r#"{"max_tokens":500,"n":128}"#,
                403,
                "max_output_tokens_exceeded",
            ),
            (
                "/v1/completions",
                r#"{"max_tokens":"200","best_of":3}"#,
                403,
                "max_output_tokens_exceeded",
            ),
        ],
    )
    .await;
    drop(relay);

    // Clamped, each answer gets its share; with none named, likewise.
    let clamping = relay_with(
        &[
            "--max-output-tokens",
            "500",
            "--over-max-output-tokens",
            "clamp",
        ],
        &upstream,
    )
    .await;
    let client = http1_client();
    for body in [r#"{"max_tokens":500,"n":4}"#, r#"{"n":4}"#] {
        let pending = tokio::spawn(
            client.request(
                Request::post(clamping.url("/v1/chat/completions"))
                    .body(full(body))
                    .expect("request"),
            ),
        );
        let mut exchange = upstream.next().await;
        let sent = exchange.body_json().await;
        assert_eq!(sent["max_tokens"], 125, "{body}");
        exchange.respond_full(200, "{}");
        within("the answer", pending)
            .await
            .expect("join")
            .expect("answer");
    }
}

#[tokio::test]
async fn twenty_clients_gone_at_the_worst_moments_leave_exact_charges() {
    // Half leave after the request went upstream, before the answer's
    // head; half after one generated chunk, before the end. Every
    // reservation is settled: nothing stays held, nothing is charged 0.
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let client = http1_client();
    let body = r#"{"stream":true,"messages":[{"role":"user","content":"a prompt"}]}"#;
    let prompt = (body.len() / 4) as u64;
    let (first_frame, first_frames) = tokio::sync::mpsc::channel::<()>(20);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let request = Request::post(relay.url("/v1/chat/completions"))
                .body(full(body))
                .expect("request");
            let client = client.clone();
            let first_frame = first_frame.clone();
            tokio::spawn(async move {
                let Ok(response) = client.request(request).await else {
                    return;
                };
                let mut body = response.into_body();
                let _ = body.frame().await;
                let _ = first_frame.send(()).await;
                // Gone, the stream unfinished.
            })
        })
        .collect();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(upstream.next().await);
    }
    // The even requests' clients leave before any answer.
    for task in tasks.iter().step_by(2) {
        task.abort();
    }
    let mut senders = Vec::new();
    for exchange in held {
        let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        let _ = tx.send_data(Bytes::from_static(chunk.as_bytes())).await;
        exchange.respond(sse().body(channel.boxed()).expect("response"));
        senders.push(tx);
    }
    let mut first_frames = first_frames;
    for _ in 0..10 {
        within("a first chunk", first_frames.recv()).await;
    }
    for task in tasks {
        let _ = task.await;
    }
    // An even client may leave only after its head and chunk were
    // written to its socket (then it paid for the chunk): between the two.
    let (low, high) = (10 * prompt + 10 * (prompt + 1), 20 * (prompt + 1));
    eventually("every reservation settled", || async {
        let now = spent(&relay).await;
        (low..=high).contains(&now).then_some(())
    })
    .await;
    drop(senders);
}

#[tokio::test]
async fn output_limits_other_apis_nest_are_capped_too() {
    // Ollama's native API, Gemini, Bedrock Converse and TGI read their
    // output limit from a nested object, and ignore a top-level max_tokens.
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--max-output-tokens", "500"], &upstream).await;
    let over = "max_output_tokens_exceeded";
    all_refused(
        &relay,
        &mut upstream,
        None,
        &[
            (
                "/api/chat",
                r#"{"options":{"num_predict":100000}}"#,
                403,
                over,
            ),
            (
                "/api/generate",
                r#"{"options":{"num_predict":-1}}"#,
                400,
                "unreadable_request_body",
            ),
            (
                "/v1beta/models/m:generateContent",
                r#"{"generationConfig":{"maxOutputTokens":100000}}"#,
                403,
                over,
            ),
            (
                "/v1beta/models/m:generateContent",
                r#"{"generationConfig":{"maxOutputTokens":400,"candidateCount":8}}"#,
                403,
                over,
            ),
            (
                "/model/m/converse",
                r#"{"inferenceConfig":{"maxTokens":9000}}"#,
                403,
                over,
            ),
            (
                "/generate",
                r#"{"parameters":{"max_new_tokens":9000}}"#,
                403,
                over,
            ),
            (
                "/api/chat",
                r#"{"OPTIONS":{"num_predict":-1}}"#,
                400,
                "unreadable_request_body",
            ),
        ],
    )
    .await;

    // A request naming none gets the cap where its API reads it.
    let client = http1_client();
    for (path, body, pointer) in [
        ("/api/chat", r#"{"model":"m"}"#, "/options/num_predict"),
        (
            "/v1beta/models/m:streamGenerateContent",
            r#"{"contents":[]}"#,
            "/generationConfig/maxOutputTokens",
        ),
        (
            "/model/m/converse-stream",
            r#"{"messages":[]}"#,
            "/inferenceConfig/maxTokens",
        ),
        (
            "/generate_stream",
            r#"{"inputs":"x","parameters":{}}"#,
            "/parameters/max_new_tokens",
        ),
    ] {
        let pending = tokio::spawn(
            client.request(
                Request::post(relay.url(path))
                    .body(full(body))
                    .expect("request"),
            ),
        );
        let mut exchange = upstream.next().await;
        let sent = exchange.body_json().await;
        assert_eq!(sent.pointer(pointer), Some(&500.into()), "{path}: {sent}");
        exchange.respond_full(200, "{}");
        within("the answer", pending)
            .await
            .expect("join")
            .expect("answer");
    }
}

#[tokio::test]
async fn a_model_named_in_the_query_is_checked_with_or_without_a_body() {
    // OpenAI's Realtime API takes its model from the query of a WebSocket
    // upgrade (Azure's: `deployment`), with no body to read.
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--allowed-models", "small"], &upstream).await;
    let mut escaped = Vec::new();
    for (target, body) in [
        ("/v1/realtime?model=large", ""),
        ("/openai/realtime?api-version=1&deployment=large", ""),
        ("/v1/realtime?model=lar%67e", ""),
        (
            "/v1/chat/completions?model=large",
            "Content-Length: 17\r\n\r\n{\"model\":\"small\"}",
        ),
    ] {
        let body = if body.is_empty() { "\r\n" } else { body };
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{body}"
        );
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            raw::exchange(relay.addr(), &request),
        )
        .await;
        let status = response.as_ref().map(|r| r.status()).ok();
        if status != Some(403) {
            escaped.push(format!("{target}: {status:?}"));
        }
    }
    assert!(escaped.is_empty(), "not refused: {escaped:#?}");
    assert!(upstream.nothing_received(), "refused before the upstream");
}

#[tokio::test]
async fn a_client_gone_while_its_body_is_read_for_the_budget_is_client_cancelled() {
    // A budgeted route reads a JSON body to estimate it before forwarding.
    let mut upstream = MockUpstream::start().await;
    let relay = relay_with(&["--token-budget", "1000000/day"], &upstream).await;
    let mut client = crate::support::raw::RawConn::connect(relay.addr()).await;
    client
        .send(format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":",
            relay.addr()
        ))
        .await;
    drop(client);
    let log = relay
        .process
        .wait_for_log("outcome=\"client_cancelled\"", 1)
        .await;
    assert!(!log.contains("bad_request_body"), "{log}");
    assert!(upstream.nothing_received(), "nothing was forwarded");
}

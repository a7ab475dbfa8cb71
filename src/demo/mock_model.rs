//! A local mock model endpoint for the demo: Baseten-shaped, streaming, keyed.
//!
//! It answers the two ways people stream from Baseten:
//! - `POST .../predict` with `"stream": true`: raw token bytes, chunked, no framing
//!   (what truss models do); without `stream`, one JSON object;
//! - `POST .../v1/chat/completions` with `"stream": true`: OpenAI-style Server-Sent
//!   Events ending in `data: [DONE]`, with a `usage` event before it when the
//!   request asks (`"stream_options": {"include_usage": true}`), as OpenAI
//!   does; without `stream`, a `chat.completion` object with its `usage`.
//!
//! Every request must carry `Authorization: Api-Key <key>` with the key it was
//! started with, so a demo that streams at all proves keyrelay injected it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::secrets::key::ApiKey;

/// The mock's answer, streamed a token at a time. Its é, ô, €, Chinese and
/// emoji are 2, 3 and 4 bytes long in UTF-8, as a real model's output often
/// is: a client that decodes each byte or frame on its own fails on them,
/// so the demo's printed snippets are shown to decode them whole.
pub const ANSWER: &str = "The mistral is a strong, cold northwesterly wind that blows from \
southern France into the Gulf of Lion. It funnels down the Rhône valley, clears the sky \
and can gust above 90 km/h; in Chinese it is 密史脱拉风. It empties café terraces, \
€4 espresso and all 💨";

/// Pause between tokens, so a person watching sees them arrive one by one.
pub const TOKEN_INTERVAL: Duration = Duration::from_millis(40);

/// Request bodies are prompts; anything larger is refused.
const MAX_REQUEST_BODY: usize = 1 << 20;

/// Tokens the channel may hold before the sender waits for the reader.
const TOKEN_BUFFER: usize = 1;

type MockBody = Either<Full<Bytes>, Channel<Bytes>>;

/// Splits [`ANSWER`] into word tokens, each keeping its leading space.
pub fn tokens() -> Vec<&'static str> {
    let mut tokens = Vec::new();
    let mut start = 0;
    for (index, _) in ANSWER.match_indices(' ') {
        if index > start {
            tokens.push(&ANSWER[start..index]);
        }
        start = index;
    }
    tokens.push(&ANSWER[start..]);
    tokens
}

/// Serves the mock model on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, key: &ApiKey) -> std::io::Result<()> {
    let expected = key
        .header_value("Api-Key {key}")
        .map_err(std::io::Error::other)?;
    let state = Arc::new(State {
        expected,
        next_id: AtomicU64::new(1),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(state.handle(request).await) }
            });
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "mock model connection ended");
            }
        });
    }
}

/// Binds `127.0.0.1:0` and serves there; returns the address.
pub async fn start(key: ApiKey) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = serve(listener, &key).await {
            tracing::error!(error = %err, "mock model stopped");
        }
    });
    Ok(addr)
}

struct State {
    expected: HeaderValue,
    next_id: AtomicU64,
}

impl State {
    async fn handle(&self, request: Request<Incoming>) -> Response<MockBody> {
        if request.headers().get(AUTHORIZATION) != Some(&self.expected) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong Api-Key (the mock expects the key keyrelay injects)",
            );
        }
        let path = request.uri().path().to_owned();
        let is_predict = path.ends_with("/predict");
        let is_chat = path.ends_with("/chat/completions");
        if request.method() != Method::POST || !(is_predict || is_chat) {
            return error(
                StatusCode::NOT_FOUND,
                "the mock serves POST .../predict and POST .../v1/chat/completions",
            );
        }
        // The mock reads whole prompts; this is the demo's model, not keyrelay's data path.
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BODY)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "prompt too large"),
        };
        let Ok(input) = serde_json::from_slice::<Value>(&body) else {
            return error(StatusCode::BAD_REQUEST, "body must be JSON");
        };
        let stream = input.get("stream").and_then(Value::as_bool) == Some(true);
        let usage = Usage::of(&input);
        let include_usage = input
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut response = match (is_chat, stream) {
            (false, true) => stream_tokens("application/octet-stream", |t| t.to_owned(), None),
            (true, true) => stream_tokens(
                "text/event-stream",
                sse_chunk,
                Some(sse_done(include_usage.then_some(usage))),
            ),
            (false, false) => json_response(&json!({ "output": ANSWER })),
            (true, false) => json_response(&chat_completion(usage)),
        };
        if let Ok(value) = HeaderValue::from_str(&format!("mock-{id}")) {
            response.headers_mut().insert("x-baseten-request-id", value);
        }
        response
    }
}

/// Streams the tokens, each rendered by `render`, then `trailer` if any.
fn stream_tokens(
    content_type: &'static str,
    render: fn(&str) -> String,
    trailer: Option<String>,
) -> Response<MockBody> {
    let (mut sender, body) = Channel::<Bytes>::new(TOKEN_BUFFER);
    tokio::spawn(async move {
        for token in tokens() {
            if sender.send_data(Bytes::from(render(token))).await.is_err() {
                return; // the client went away: stop "generating"
            }
            tokio::time::sleep(TOKEN_INTERVAL).await;
        }
        if let Some(last) = trailer {
            // Ignored on failure: the client has already gone.
            let _ = sender.send_data(Bytes::from(last)).await;
        }
    });
    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn sse_chunk(token: &str) -> String {
    let chunk = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "model": "mock",
        "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": null}],
    });
    format!("data: {chunk}\n\n")
}

/// Tokens a request "used": its prompt's words, and the answer's tokens.
#[derive(Clone, Copy)]
struct Usage {
    prompt: usize,
    completion: usize,
}

impl Usage {
    fn of(request: &Value) -> Self {
        let words = |text: &str| text.split_whitespace().count();
        let prompt = match request.get("messages").and_then(Value::as_array) {
            Some(messages) => messages
                .iter()
                .filter_map(|m| m.get("content")?.as_str())
                .map(words)
                .sum(),
            None => request
                .get("prompt")
                .and_then(Value::as_str)
                .map_or(0, words),
        };
        Self {
            prompt,
            completion: tokens().len(),
        }
    }

    fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }
}

fn sse_done(usage: Option<Usage>) -> String {
    let last = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "model": "mock",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    });
    let usage = usage.map_or_else(String::new, |usage| {
        let chunk = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "model": "mock",
            "choices": [],
            "usage": usage.to_json(),
        });
        format!("data: {chunk}\n\n")
    });
    format!("data: {last}\n\n{usage}data: [DONE]\n\n")
}

fn chat_completion(usage: Usage) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": "mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ANSWER},
            "finish_reason": "stop",
        }],
        "usage": usage.to_json(),
    })
}

fn json_response(value: &Value) -> Response<MockBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(value.to_string()))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    let mut response = json_response(&json!({ "error": message }));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_rebuild_the_answer() {
        let tokens = tokens();
        assert!(tokens.len() > 20);
        assert_eq!(tokens.concat(), ANSWER);
        assert!(tokens[1].starts_with(' '));
    }
}

//! An OAuth2 token endpoint (client credentials, RFC 6749 §4.4) for the
//! OAuth2 tests, on a thread and runtime of its own: keyrelay's first token
//! request happens while its configuration loads, which blocks the test's
//! runtime.
//!
//! It checks each request as an authorization server would (POST, a form
//! body, `grant_type=client_credentials`, the scope, the client id and
//! secret by the one authentication method it is set to accept) and
//! answers a token `PREFIX<n>-<expiry in ms>` that lives `lifetime`, which
//! [`super::expiring::CheckingUpstream`] reads back. Anything wrong gets
//! 401 `invalid_client` (or 400 `invalid_request`), and is recorded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::expiring::now_ms;

/// The client id keyrelay is configured with.
pub(crate) const CLIENT_ID: &str = "keyrelay-test client";
/// The client secret; distinctive, so a leak scan finds it.
pub(crate) const CLIENT_SECRET: &str = "oauth-client-SECRET-9d8e7f+/=";
/// What every issued token starts with.
pub(crate) const TOKEN_PREFIX: &str = "oa-token-";
/// The scope keyrelay asks for.
pub(crate) const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// How the endpoint wants the client to authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    /// `client_secret_basic`.
    Basic,
    /// `client_secret_post`.
    Post,
}

#[derive(Default)]
struct State {
    issued: u64,
    refused: Vec<String>,
    down: bool,
}

/// The running endpoint; stopped when dropped.
pub(crate) struct TokenEndpoint {
    url: String,
    state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

impl TokenEndpoint {
    /// Accepts `method` only and issues tokens living `lifetime` seconds.
    pub(crate) fn start(method: Method, lifetime: f64) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!(
            "http://{}/oauth2/v2.0/token",
            listener.local_addr().expect("addr")
        );
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let serving = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let state = Arc::clone(&shared);
                        tokio::spawn(async move {
                            let service = service_fn(move |request| {
                                let state = Arc::clone(&state);
                                async move {
                                    Ok::<_, Infallible>(
                                        answer(request, method, lifetime, &state).await,
                                    )
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serving => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            url,
            state,
            _stop: stop,
        }
    }

    /// The token URL.
    pub(crate) fn url(&self) -> String {
        self.url.clone()
    }

    /// How many tokens it has issued.
    pub(crate) fn issued(&self) -> u64 {
        self.state.lock().expect("lock").issued
    }

    /// Why it refused the requests it refused.
    pub(crate) fn refused(&self) -> Vec<String> {
        self.state.lock().expect("lock").refused.clone()
    }

    /// While down, every request gets 503 `temporarily_unavailable`.
    pub(crate) fn set_down(&self, down: bool) {
        self.state.lock().expect("lock").down = down;
    }
}

async fn answer(
    request: Request<Incoming>,
    method: Method,
    lifetime: f64,
    state: &Mutex<State>,
) -> Response<Full<Bytes>> {
    let (head, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if state.lock().expect("lock").down {
        return json(503, r#"{"error": "temporarily_unavailable"}"#.to_owned());
    }
    match check(&head, &body, method) {
        Err(problem) => {
            state.lock().expect("lock").refused.push(problem.clone());
            json(
                401,
                format!(r#"{{"error": "invalid_client", "error_description": "{problem}"}}"#),
            )
        }
        Ok(()) => {
            let n = {
                let mut state = state.lock().expect("lock");
                state.issued += 1;
                state.issued
            };
            let expiry = now_ms() + (lifetime * 1000.0) as u128;
            json(
                200,
                format!(
                    r#"{{"access_token": "{TOKEN_PREFIX}{n}-{expiry}", "token_type": "Bearer", "expires_in": {lifetime}}}"#
                ),
            )
        }
    }
}

/// What an authorization server checks of a client-credentials request.
fn check(head: &http::request::Parts, body: &[u8], method: Method) -> Result<(), String> {
    if head.method != http::Method::POST {
        return Err(format!("method {}", head.method));
    }
    let content_type = head.headers.get("content-type").map(|v| v.as_bytes());
    if content_type != Some(b"application/x-www-form-urlencoded") {
        return Err("not a form body".to_owned());
    }
    let form = parse_form(std::str::from_utf8(body).map_err(|_| "body not UTF-8")?);
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err("grant_type".to_owned());
    }
    if form.get("scope").map(String::as_str) != Some(SCOPE) {
        return Err("scope".to_owned());
    }
    let basic = head.headers.get("authorization").map(|value| {
        let text = value.to_str().unwrap_or_default();
        let encoded = text.strip_prefix("Basic ").unwrap_or_default();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_default();
        let decoded = String::from_utf8(decoded).unwrap_or_default();
        let (id, secret) = decoded.split_once(':').unwrap_or_default();
        (decode(id), decode(secret))
    });
    let posted = (
        form.get("client_id").cloned(),
        form.get("client_secret").cloned(),
    );
    let expected = (CLIENT_ID.to_owned(), CLIENT_SECRET.to_owned());
    let fine = match method {
        Method::Basic => basic == Some(expected) && posted == (None, None),
        Method::Post => basic.is_none() && posted == (Some(expected.0), Some(expected.1)),
    };
    if fine {
        Ok(())
    } else {
        Err(format!("client authentication is not client_secret_{method:?}").to_lowercase())
    }
}

fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (decode(name), decode(value)))
        .collect()
}

/// Form decoding: `+` is a space, `%XX` a byte.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

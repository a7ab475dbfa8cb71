//! `keyrelay demo`: the whole product on one machine, with no network and no real key.
//!
//! It starts the [`crate::demo::mock_model`] endpoint with a freshly
//! generated key, starts keyrelay in front of it with that key in its
//! environment, streams one prediction through keyrelay while printing each
//! token with its arrival time, streams a chat that asks for usage and
//! prints the tokens keyrelay counted, and then keeps serving and prints commands a
//! user can paste to try it with curl, Python `requests` and the SSE endpoint,
//! and the address of a [`page`] that streams through keyrelay in a browser.

pub mod mock_model;
pub mod page;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::config::{self, ListenAddr, OverrideValue, Sources};
use crate::guard::origin::AllowedOrigin;
use crate::ops::signals;
use crate::secrets::key::ApiKey;
use crate::telemetry::metrics::Metrics;

/// Variable the demo puts its generated key in (in keyrelay's swapped environment only).
const DEMO_KEY_ENV: &str = "DEMO_MODEL_API_KEY";

/// The prompt of the demo request, from Baseten's streaming guide.
const PROMPT: &str = "What is the Mistral wind?";

/// How the demo failed to start.
#[derive(Debug)]
pub enum DemoError {
    /// A setting was wrong (exit status 64).
    Config(config::ConfigError),
    /// Something else: binding, the demo request.
    Io(std::io::Error),
}

impl From<std::io::Error> for DemoError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err)
    }
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(mut sources: Sources) -> Result<(), DemoError> {
    let key = generate_key();
    let mock_addr = mock_model::start(ApiKey::new(key.clone())).await?;

    // The demo's key goes into keyrelay's copy of the environment only, and the
    // credential settings are pinned to what the mock expects.
    sources.env.insert(DEMO_KEY_ENV.to_owned(), key);
    for (setting, value) in [
        ("upstream", format!("http://{mock_addr}")),
        ("key_env", DEMO_KEY_ENV.to_owned()),
        ("auth_header", "authorization".to_owned()),
        ("auth_template", "Api-Key {key}".to_owned()),
    ] {
        sources.set(setting, OverrideValue::Text(value));
    }
    let mut config = config::load(&sources).map_err(DemoError::Config)?;
    let _log = crate::telemetry::logging::init(config.log_format);

    // The page's origin is allowed, by both names a user may type.
    let (page_listener, page_addr) = page::bind().await?;
    for host in ["127.0.0.1", "localhost"] {
        let origin = AllowedOrigin::parse(&format!("http://{host}:{}", page_addr.port()))
            .map_err(std::io::Error::other)?;
        config.access.cors.allow(origin);
    }

    let listener = bind_or_fallback(&config.listen).await?;
    let proxy_addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let server = tokio::spawn(crate::run_with_metrics(
        config,
        listener,
        signals::shutdown_requested(),
        Arc::clone(&metrics),
    ));
    let relay = page::PageConfig {
        relay: relay_url_for_page(proxy_addr),
        prompt: PROMPT,
    };
    tokio::spawn(async move {
        if let Err(err) = page::serve(page_listener, relay).await {
            tracing::error!(error = %err, "demo page stopped");
        }
    });

    let mut out = std::io::stdout();
    writeln!(
        out,
        "keyrelay demo\n  mock model endpoint  http://{mock_addr}  (rejects requests without its generated Api-Key)\n  keyrelay             http://{proxy_addr}  (adds the key; clients send none)\n  browser page         http://{page_addr}/  (open it: a page with no key streams through keyrelay)\n"
    )?;
    writeln!(
        out,
        "Streaming POST /production/predict through keyrelay; each token as it arrives:"
    )?;
    stream_once(proxy_addr, &mut out).await?;
    count_chat_usage(proxy_addr, &metrics, &mut out).await?;
    print_try_it(proxy_addr, &mut out)?;

    server
        .await
        .map_err(|err| std::io::Error::other(err.to_string()))??;
    Ok(())
}

/// keyrelay's base URL for a local browser page. A wildcard listen address
/// is reached through loopback, and an IPv6 one by `localhost`, since a
/// Content-Security-Policy source cannot name an IPv6 address.
fn relay_url_for_page(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("http://127.0.0.1:{}", addr.port()),
        IpAddr::V4(_) => format!("http://{addr}"),
        IpAddr::V6(_) => format!("http://localhost:{}", addr.port()),
    }
}

/// Binds the configured address; if the default port is taken, any free loopback port.
async fn bind_or_fallback(addr: &ListenAddr) -> std::io::Result<TcpListener> {
    let ListenAddr::Tcp(addr) = addr else {
        return Err(std::io::Error::other(
            "the demo prints curl commands for a TCP address; use --listen IP:PORT",
        ));
    };
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!("keyrelay demo: {addr} is in use; using a free port on 127.0.0.1 instead");
            TcpListener::bind(("127.0.0.1", 0)).await
        }
        Err(err) => Err(err),
    }
}

/// Sends the demo request through keyrelay and prints every frame with its arrival time.
async fn stream_once(proxy: SocketAddr, out: &mut impl Write) -> std::io::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = serde_json::json!({ "prompt": PROMPT, "stream": true }).to_string();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{proxy}/production/predict"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(std::io::Error::other)?;

    let started = Instant::now();
    let response = client
        .request(request)
        .await
        .map_err(std::io::Error::other)?;
    writeln!(
        out,
        "  status {}  transfer-encoding: {}\n",
        response.status(),
        response
            .headers()
            .get("transfer-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    )?;
    let mut body = response.into_body();
    let mut text = String::new();
    let mut decoder = Utf8Stream::default();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(std::io::Error::other)?;
        if let Some(data) = frame.data_ref() {
            let token = decoder.push(data);
            writeln!(out, "  +{:>6.0} ms  {:?}", ms(started.elapsed()), token)?;
            text.push_str(&token);
            frames += 1;
        }
    }
    text.push_str(&decoder.finish());
    writeln!(
        out,
        "\n  {frames} frames in {:.0} ms: {text}\n",
        ms(started.elapsed())
    )
}

/// Streams an OpenAI-style chat that asks for usage, then prints the tokens
/// keyrelay read off the stream as it passed (`keyrelay_llm_tokens_total`).
async fn count_chat_usage(
    proxy: SocketAddr,
    metrics: &Metrics,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = serde_json::json!({
        "model": "mock",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": PROMPT}],
    });
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(std::io::Error::other)?;
    let response = client
        .request(request)
        .await
        .map_err(std::io::Error::other)?;
    let mut body = response.into_body();
    let mut events = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.map_err(std::io::Error::other)?.data_ref() {
            events += data.windows(6).filter(|w| w == b"data: ").count();
        }
    }
    // keyrelay counts a response when its record ends, a moment after the
    // client has read the last byte.
    let started = Instant::now();
    let count = |kind| metrics.llm_tokens("default", kind);
    while count("completion") == 0 && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writeln!(
        out,
        "Streamed POST /v1/chat/completions (SSE, {events} events, with \"stream_options\": {{\"include_usage\": true}}).\n  \
         keyrelay read the usage off the stream as it passed: {} prompt + {} completion tokens\n  \
         (keyrelay_llm_tokens_total; set token_budget to cap them)\n",
        count("prompt"),
        count("completion"),
    )
}

fn print_try_it(proxy: SocketAddr, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        r#"keyrelay keeps serving. Try it (no key needed; keyrelay adds it):

  curl --no-buffer -X POST http://{proxy}/production/predict \
    -d '{{"prompt": "{PROMPT}", "stream": true}}'

  curl --no-buffer http://{proxy}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model": "mock", "stream": true, "messages": [{{"role": "user", "content": "{PROMPT}"}}]}}'

  python3 - <<'EOF'
import codecs, json, requests
decoder = codecs.getincrementaldecoder("utf-8")()  # a character may span two chunks
with requests.post("http://{proxy}/production/predict",
                   data=json.dumps({{"prompt": "{PROMPT}", "stream": True}}),
                   stream=True) as resp:
    for chunk in resp.iter_content(chunk_size=None):  # each chunk as it arrives
        print(decoder.decode(chunk), end="", flush=True)
print(decoder.decode(b"", final=True))
EOF

Press Ctrl-C to stop."#
    )
}

/// UTF-8 text that arrives in pieces: the bytes of a character split across
/// two frames are held until the rest arrives, instead of each half turning
/// into U+FFFD (or an error, as Python's per-chunk `decode` raises).
#[derive(Debug, Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The text `bytes` completes, holding back an unfinished character.
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // Only the last character is unfinished: hold it back.
            Err(err) if err.error_len().is_none() => err.valid_up_to(),
            // Not UTF-8 at all: show it as best it can be.
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(complete);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// What is left when the stream ends: an unfinished character, shown as U+FFFD.
    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// A fresh random key: the std hasher's per-process random seed is enough for a demo.
fn generate_key() -> String {
    let high = RandomState::new().hash_one(std::process::id());
    let low = RandomState::new().hash_one(Instant::now());
    format!("demo-{high:016x}{low:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_frames_are_decoded_whole() {
        let text = "é € 密 💨";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            for second in cut..=bytes.len() {
                let mut stream = Utf8Stream::default();
                let mut decoded = stream.push(&bytes[..cut]);
                decoded += &stream.push(&bytes[cut..second]);
                decoded += &stream.push(&bytes[second..]);
                decoded += &stream.finish();
                assert_eq!(decoded, text, "cut at {cut} and {second}");
            }
        }
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_shown_as_a_replacement() {
        let mut stream = Utf8Stream::default();
        assert_eq!(stream.push(&"a€".as_bytes()[..2]), "a");
        assert_eq!(stream.finish(), "\u{fffd}");
    }
}

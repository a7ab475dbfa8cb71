//! What a request asks a model for, read from its JSON body within a bound:
//! how many output tokens it may generate, which model, whether it streams.
//!
//! Budgets reserve from it, the route's request caps (`max_output_tokens`,
//! `allowed_models`) are checked against it, and `add_stream_usage` rewrites
//! it. It is read only on routes that have one of these, once, and at most
//! [`MAX_BODY`] bytes of it: a longer body is forwarded as it came (the bytes
//! read first, then the rest), and counts as unparsed.
//!
//! OpenAI-compatible servers are lenient, so the reading is too: any
//! content type but `multipart/*`, a body with or without a length
//! (chunked), a UTF-8 byte order mark before the JSON, `"stream": "true"`
//! (pydantic's lax booleans), numbers written as strings.

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Map, Value};

/// Largest request body read to find what it asks for.
pub const MAX_BODY: usize = 1 << 20;

/// How long reading that body may take.
pub const READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The fields that bound a request's output, by API: chat completions and
/// Anthropic (`max_tokens`), newer chat completions
/// (`max_completion_tokens`), the Responses API (`max_output_tokens`),
/// llama.cpp's server (`n_predict`, which it prefers to `max_tokens` on
/// its OpenAI-compatible paths too, and where -1 means no limit).
pub const OUTPUT_FIELDS: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n_predict",
];

/// The body as read.
#[derive(Debug)]
pub enum ReadBody {
    /// All of it, within [`MAX_BODY`].
    Whole(Bytes),
    /// Longer than [`MAX_BODY`]: what was read, then the unread rest.
    Longer { head: Bytes, rest: Incoming },
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFailed {
    /// The client's framing was bad or it went away.
    Malformed,
    /// It did not arrive within [`READ_LIMIT`].
    TooSlow,
}

/// True if a body with these headers might be JSON a server would accept:
/// anything but a multipart upload.
pub fn may_be_json(headers: &HeaderMap) -> bool {
    !headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .get(..10)
                .is_some_and(|start| start.eq_ignore_ascii_case("multipart/"))
        })
}

/// Reads `body` up to [`MAX_BODY`] bytes, within [`READ_LIMIT`].
pub async fn read(mut body: Incoming) -> Result<ReadBody, ReadFailed> {
    let reading = async {
        let mut buffer = BytesMut::new();
        loop {
            match body.frame().await {
                None => return Ok(ReadBody::Whole(buffer.freeze())),
                Some(Err(_)) => return Err(ReadFailed::Malformed),
                Some(Ok(frame)) => {
                    // Request trailers are not forwarded from a read body.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    buffer.extend_from_slice(&data);
                    if buffer.len() > MAX_BODY {
                        return Ok(ReadBody::Longer {
                            head: buffer.freeze(),
                            rest: body,
                        });
                    }
                }
            }
        }
    };
    tokio::time::timeout(READ_LIMIT, reading)
        .await
        .unwrap_or(Err(ReadFailed::TooSlow))
}

/// The body as a JSON object, if it is one (a leading byte order mark is
/// allowed, as Python's and Go's servers allow it), and one that every
/// server reads as keyrelay does: `None` for an object that names a
/// top-level key twice, or two keys that differ only in letter case
/// (servers disagree on which one counts: Go's `encoding/json`, behind
/// Ollama and LocalAI, matches field names case-insensitively and takes
/// the last; others take the first), or spells a key keyrelay reads
/// ([`READ_FIELDS`]) in another case.
pub fn parse(body: &[u8]) -> Option<Map<String, Value>> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    serde_json::from_slice::<Unambiguous>(body).ok()?.0
}

/// The top-level keys keyrelay reads from a request.
pub const READ_FIELDS: [&str; 14] = [
    "model",
    "stream",
    "stream_options",
    "n",
    "best_of",
    OUTPUT_FIELDS[0],
    OUTPUT_FIELDS[1],
    OUTPUT_FIELDS[2],
    OUTPUT_FIELDS[3],
    // The objects that hold NESTED_OUTPUT_FIELDS.
    "options",
    "generationConfig",
    "generation_config",
    "inferenceConfig",
    "parameters",
];

/// A key as Go's `encoding/json` compares field names: each character
/// lowered then raised, so `MAX_TOKENS`, `Max_Tokens` and `max_to\u{212A}ens`
/// (a Kelvin sign) are all `max_tokens`.
fn fold(key: &str) -> String {
    key.chars()
        .flat_map(char::to_lowercase)
        .flat_map(char::to_uppercase)
        .collect()
}

/// A JSON object whose top-level keys no two servers read differently;
/// `None` inside when they might.
struct Unambiguous(Option<Map<String, Value>>);

impl<'de> serde::Deserialize<'de> for Unambiguous {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = Unambiguous;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Unambiguous, A::Error> {
                let mut object = Map::new();
                let mut folded = std::collections::HashSet::new();
                let mut ambiguous = false;
                while let Some(key) = map.next_key::<String>()? {
                    let value: Value = map.next_value()?;
                    let key_fold = fold(&key);
                    let misspelt = !READ_FIELDS.contains(&key.as_str())
                        && READ_FIELDS.iter().any(|field| fold(field) == key_fold);
                    ambiguous |= misspelt || !folded.insert(key_fold);
                    object.insert(key, value);
                }
                Ok(Unambiguous((!ambiguous).then_some(object)))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// A boolean as a lenient server reads it: `true`, `1`, or one of pydantic's
/// true strings.
pub fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(on)) => *on,
        Some(Value::Number(number)) => number.as_f64() == Some(1.0),
        Some(Value::String(text)) => matches!(
            text.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on" | "t" | "y"
        ),
        _ => false,
    }
}

/// A token limit that is not a whole number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotACount;

/// A whole number as a lenient server reads it: `100`, `100.0`, `"100"`.
/// `Err` for a value that is there but is not one.
pub fn count(value: &Value) -> Result<u64, NotACount> {
    match value {
        Value::Number(number) => number
            .as_u64()
            .or_else(|| {
                number
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .ok_or(NotACount),
        Value::String(text) => text.trim().parse().map_err(|_| NotACount),
        _ => Err(NotACount),
    }
}

/// Output limits one object down, by API: Ollama's native API
/// (`options.num_predict`), Gemini and Vertex AI
/// (`generationConfig.maxOutputTokens`, in both of proto JSON's
/// spellings), Bedrock Converse (`inferenceConfig.maxTokens`), TGI
/// (`parameters.max_new_tokens`).
pub const NESTED_OUTPUT_FIELDS: [(&str, &str); 7] = [
    ("options", "num_predict"),
    ("generationConfig", "maxOutputTokens"),
    ("generationConfig", "max_output_tokens"),
    ("generation_config", "maxOutputTokens"),
    ("generation_config", "max_output_tokens"),
    ("inferenceConfig", "maxTokens"),
    ("parameters", "max_new_tokens"),
];

/// Every output limit the request names: its [`OUTPUT_FIELDS`] and
/// [`NESTED_OUTPUT_FIELDS`].
fn output_limits(request: &Map<String, Value>) -> impl Iterator<Item = &Value> {
    let top = OUTPUT_FIELDS.iter().filter_map(|field| request.get(*field));
    let nested = NESTED_OUTPUT_FIELDS
        .iter()
        .filter_map(|(parent, field)| request.get(*parent)?.as_object()?.get(*field));
    top.chain(nested)
}

/// The most output tokens the request may generate per choice: the largest
/// of its output limits ([`OUTPUT_FIELDS`], [`NESTED_OUTPUT_FIELDS`]);
/// `Ok(None)` when it names none (or only nulls), `Err` when one is not a
/// whole number.
pub fn max_output(request: &Map<String, Value>) -> Result<Option<u64>, NotACount> {
    let mut max = None;
    for value in output_limits(request) {
        if !value.is_null() {
            max = Some(max.unwrap_or(0).max(count(value)?));
        }
    }
    Ok(max)
}

/// How many answers the request asks for (`n`, `best_of`, Gemini's
/// `candidateCount`), at least 1.
pub fn choices(request: &Map<String, Value>) -> u64 {
    let top = ["n", "best_of"]
        .iter()
        .filter_map(|field| request.get(*field));
    let nested = ["generationConfig", "generation_config"]
        .iter()
        .filter_map(|parent| request.get(*parent)?.as_object())
        .flat_map(|config| ["candidateCount", "candidate_count"].map(|f| config.get(f)))
        .flatten();
    top.chain(nested)
        .filter_map(|value| count(value).ok())
        .max()
        .unwrap_or(1)
        .clamp(1, 128)
}

/// Output assumed for a budgeted request whose body names no
/// `max_tokens` (or cannot be read): the `budget_reserve` default.
pub const DEFAULT_BUDGET_RESERVE: u64 = 4_096;

/// The largest prompt estimate a body's length makes (a long upload of
/// base64 images is not that many tokens).
pub const MAX_PROMPT_ESTIMATE: u64 = 128_000;

/// The prompt estimate of a body of `bytes`: one token per 4 bytes, capped.
pub fn prompt_estimate(bytes: u64) -> u64 {
    (bytes / 4).min(MAX_PROMPT_ESTIMATE)
}

/// What a budgeted route does with a request body it cannot read as a
/// JSON object within [`MAX_BODY`] (`unparsed_budget_requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unparsed {
    /// Forward it under a reservation of `budget_reserve` plus the body's
    /// length / 4 (the default).
    #[default]
    Forward,
    /// Refuse it with 400.
    Refuse,
}

impl Unparsed {
    /// Parses `forward` or `refuse`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "forward" => Some(Self::Forward),
            "refuse" => Some(Self::Refuse),
            _ => None,
        }
    }
}

/// What a route does with a request that asks for more output than its
/// `max_output_tokens` (`over_max_output_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverCap {
    /// Refuse it with 403 (the default).
    #[default]
    Refuse,
    /// Lower what it asks for to the cap, rewriting the body.
    Clamp,
}

impl OverCap {
    /// Parses `refuse` or `clamp`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "refuse" => Some(Self::Refuse),
            "clamp" => Some(Self::Clamp),
            _ => None,
        }
    }
}

/// A route's request caps, read from the request's JSON body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCaps {
    /// The most output tokens a request may ask for, all its choices
    /// (`n`, `best_of`) together.
    pub max_output_tokens: Option<u64>,
    /// What happens to a request asking for more.
    pub over_max_output_tokens: OverCap,
    /// The only models requests may name; empty allows any.
    pub allowed_models: Vec<String>,
}

/// Why a request breaks a cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// Its model is not in `allowed_models` (or it names none).
    Model,
    /// It asks for `asked` output tokens, above `cap`.
    Output { asked: u64, cap: u64 },
    /// A cap is set and the body is not a JSON object keyrelay can read
    /// within its bound (or `max_tokens` is not a number).
    Unreadable,
}

impl RequestCaps {
    /// True if any cap is set.
    pub fn is_set(&self) -> bool {
        self.max_output_tokens.is_some() || !self.allowed_models.is_empty()
    }

    /// Checks `request` (sent to `path`) against the caps; with
    /// `over_max_output_tokens = "clamp"` lowers what it asks for. A request
    /// that names no output limit gets the cap as one (`max_output_tokens`
    /// on the Responses API, `max_tokens` elsewhere), since servers
    /// otherwise generate up to the context's end. `Ok(true)` when the
    /// request was changed.
    ///
    /// `token` holds the caps of a request that presents an access token
    /// (`access_token_*`): its model must be allowed by both lists, and the
    /// lower output cap applies (refused or clamped as the route says).
    pub fn apply(
        &self,
        token: Option<&RequestCaps>,
        request: &mut Map<String, Value>,
        target: &http::Uri,
    ) -> Result<bool, Broken> {
        let path = target.path();
        let model = request.get("model").and_then(Value::as_str);
        // A model named by the target is the one such servers run: it must
        // be allowed too, and then stands in for a body that names none.
        let in_target = self.check_target(token, target)?;
        for caps in std::iter::once(self).chain(token) {
            let allowed = |model: &str| caps.allowed_models.iter().any(|m| m == model);
            if caps.allowed_models.is_empty() {
                continue;
            }
            let body_ok = match request.get("model") {
                None if in_target => true,
                _ => model.is_some_and(allowed),
            };
            if !body_ok {
                return Err(Broken::Model);
            }
        }
        let cap = match (
            self.max_output_tokens,
            token.and_then(|t| t.max_output_tokens),
        ) {
            (Some(route), Some(token)) => route.min(token),
            (Some(cap), None) | (None, Some(cap)) => cap,
            (None, None) => return Ok(false),
        };
        // The cap bounds the whole request: `n` answers of `max_tokens`
        // each ask for n times as much.
        let choices = choices(request);
        let per_choice = (cap / choices).max(1);
        match max_output(request).map_err(|NotACount| Broken::Unreadable)? {
            Some(asked) if asked.saturating_mul(choices) <= cap => Ok(false),
            Some(asked) if self.over_max_output_tokens == OverCap::Refuse => Err(Broken::Output {
                asked: asked.saturating_mul(choices),
                cap,
            }),
            Some(_) => {
                let clamp = |value: &mut Value| {
                    if count(value).is_ok_and(|asked| asked > per_choice) {
                        *value = Value::from(per_choice);
                    }
                };
                for field in OUTPUT_FIELDS {
                    if let Some(value) = request.get_mut(field) {
                        clamp(value);
                    }
                }
                for (parent, field) in NESTED_OUTPUT_FIELDS {
                    if let Some(value) = request
                        .get_mut(parent)
                        .and_then(Value::as_object_mut)
                        .and_then(|config| config.get_mut(field))
                    {
                        clamp(value);
                    }
                }
                Ok(true)
            }
            None => {
                let (parent, field) = limit_field(path, request);
                let target = match parent {
                    None => request,
                    Some(parent) => request
                        .entry(parent)
                        .or_insert_with(|| Value::Object(Map::new()))
                        .as_object_mut()
                        .ok_or(Broken::Unreadable)?,
                };
                target.insert(field.to_owned(), Value::from(per_choice));
                Ok(true)
            }
        }
    }
}

impl RequestCaps {
    /// Checks the models the request target names ([`target_models`])
    /// against `allowed_models` (and the token's): for every request,
    /// with a body or without (a WebSocket to OpenAI's
    /// `/v1/realtime?model=`). True if it names one.
    pub fn check_target(
        &self,
        token: Option<&RequestCaps>,
        target: &http::Uri,
    ) -> Result<bool, Broken> {
        let named = target_models(target);
        for caps in std::iter::once(self).chain(token) {
            let allowed = |model: &String| caps.allowed_models.iter().any(|m| m == model);
            if !caps.allowed_models.is_empty() && !named.iter().all(allowed) {
                return Err(Broken::Model);
            }
        }
        Ok(!named.is_empty())
    }
}

/// The models a request target names: its path ([`path_model`]), and its
/// query's `model` and `deployment` parameters (OpenAI's and Azure's
/// Realtime WebSockets), percent decoded.
pub fn target_models(target: &http::Uri) -> Vec<String> {
    let mut named: Vec<String> = path_model(target.path()).into_iter().collect();
    for pair in target.query().unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if matches!(percent_decode(key).as_str(), "model" | "deployment") {
            named.push(percent_decode(&value.replace('+', " ")));
        }
    }
    named
}

/// Where a request to `path` that names no output limit gets one: the
/// field its API reads (`parent.field` when nested).
fn limit_field(path: &str, request: &Map<String, Value>) -> (Option<&'static str>, &'static str) {
    let decoded = percent_decode(path);
    let path = decoded.trim_end_matches('/');
    let ends = |suffix: &str| path.ends_with(suffix);
    if ends("/api/chat") || ends("/api/generate") {
        (Some("options"), "num_predict")
    } else if ends(":generateContent") || ends(":streamGenerateContent") {
        let parent = if request.contains_key("generation_config") {
            "generation_config"
        } else {
            "generationConfig"
        };
        (Some(parent), "maxOutputTokens")
    } else if ends("/converse") || ends("/converse-stream") {
        (Some("inferenceConfig"), "maxTokens")
    } else if ends("/generate") || ends("/generate_stream") {
        (Some("parameters"), "max_new_tokens")
    } else if ends("/responses") {
        (None, "max_output_tokens")
    } else {
        (None, "max_tokens")
    }
}

/// The model a path names, as APIs that put it there write it, percent
/// decoded: Gemini and Vertex AI (`.../models/MODEL:generateContent`),
/// Azure OpenAI (`/openai/deployments/MODEL/...`), Bedrock
/// (`/model/MODEL/invoke`, `/converse`, and their streaming forms).
pub fn path_model(path: &str) -> Option<String> {
    let path = percent_decode(path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, pair) in segments.windows(2).enumerate() {
        let (name, value) = (pair[0].to_ascii_lowercase(), pair[1]);
        let after = segments.get(i + 2).map(|s| s.to_ascii_lowercase());
        let named = match name.as_str() {
            "models" => value.split_once(':').map(|(model, _)| model),
            "deployments" => Some(value),
            "model" => after
                .is_some_and(|action| {
                    action.starts_with("invoke") || action.starts_with("converse")
                })
                .then_some(value),
            _ => None,
        };
        if let Some(model) = named.filter(|m| !m.is_empty()) {
            return Some(model.to_owned());
        }
    }
    None
}

/// True for a path `add_stream_usage` applies to: one ending in
/// `/completions` (chat or legacy), with trailing slashes, in any letter
/// case, or percent-encoded (a letter, or the slash: uvicorn decodes
/// `/v1/chat%2Fcompletions` before Starlette routes it), as servers that
/// decode paths would route it.
pub fn is_completions_path(path: &str) -> bool {
    let decoded = percent_decode(path);
    let path = decoded.trim_end_matches('/');
    let last = path.rsplit('/').next().unwrap_or(path);
    last.eq_ignore_ascii_case("completions")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_values_read_as_a_lenient_server_reads_them() {
        for on in [
            serde_json::json!(true),
            serde_json::json!("true"),
            serde_json::json!("True"),
            serde_json::json!(1),
            serde_json::json!("yes"),
        ] {
            assert!(truthy(Some(&on)), "{on}");
        }
        for off in [
            serde_json::json!(false),
            serde_json::json!("false"),
            serde_json::json!(0),
            serde_json::json!(null),
        ] {
            assert!(!truthy(Some(&off)), "{off}");
        }
        let request =
            parse(b"\xEF\xBB\xBF{\"max_tokens\":\"100\",\"max_completion_tokens\":250.0,\"n\":3}")
                .expect("an object after a BOM");
        assert_eq!(max_output(&request), Ok(Some(250)));
        assert_eq!(choices(&request), 3);
        assert_eq!(
            max_output(&parse(b"{\"max_tokens\":null}").expect("object")),
            Ok(None)
        );
        assert!(max_output(&parse(b"{\"max_tokens\":\"lots\"}").expect("object")).is_err());
        assert!(parse(b"[1]").is_none());
    }

    #[test]
    fn caps_refuse_or_clamp_and_fill_in_a_missing_limit() {
        let caps = RequestCaps {
            max_output_tokens: Some(100),
            over_max_output_tokens: OverCap::Refuse,
            allowed_models: vec!["small".to_owned()],
        };
        let mut ok = parse(br#"{"model":"small","max_tokens":50}"#).expect("object");
        assert_eq!(
            caps.apply(
                None,
                &mut ok,
                &http::Uri::from_static("/v1/chat/completions")
            ),
            Ok(false)
        );
        let mut big = parse(br#"{"model":"small","max_completion_tokens":"500"}"#).expect("o");
        assert_eq!(
            caps.apply(
                None,
                &mut big,
                &http::Uri::from_static("/v1/chat/completions")
            ),
            Err(Broken::Output {
                asked: 500,
                cap: 100
            })
        );
        for model in [
            &br#"{"model":"large"}"#[..],
            br#"{"model":["small"]}"#,
            b"{}",
        ] {
            let mut request = parse(model).expect("object");
            assert_eq!(
                caps.apply(None, &mut request, &http::Uri::from_static("/v1/x")),
                Err(Broken::Model)
            );
        }
        let clamp = RequestCaps {
            over_max_output_tokens: OverCap::Clamp,
            ..caps
        };
        clamp
            .apply(
                None,
                &mut big,
                &http::Uri::from_static("/v1/chat/completions"),
            )
            .expect("clamped");
        assert_eq!(big["max_completion_tokens"], 100);
        let mut none = parse(br#"{"model":"small"}"#).expect("object");
        assert_eq!(
            clamp.apply(None, &mut none, &http::Uri::from_static("/v1/responses/")),
            Ok(true)
        );
        assert_eq!(none["max_output_tokens"], 100);
        // An access token's caps add to the route's.
        let token = RequestCaps {
            max_output_tokens: Some(10),
            over_max_output_tokens: OverCap::Refuse,
            allowed_models: vec!["tiny".to_owned()],
        };
        let mut small = parse(br#"{"model":"small","max_tokens":50}"#).expect("object");
        assert_eq!(
            clamp.apply(Some(&token), &mut small, &http::Uri::from_static("/v1/x")),
            Err(Broken::Model)
        );
        let both = RequestCaps {
            allowed_models: vec!["small".to_owned()],
            ..token
        };
        assert_eq!(
            clamp.apply(Some(&both), &mut small, &http::Uri::from_static("/v1/x")),
            Ok(true)
        );
        assert_eq!(
            small["max_tokens"], 10,
            "the lower cap, clamped as the route says"
        );
    }

    #[test]
    fn completions_paths_are_recognised_however_written() {
        for path in [
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/chat/completions//",
            "/v1/completions",
            "/v1/chat/completion%73",
            "/v1/chat/%63ompletions",
            "/v1/chat%2Fcompletions",
            "/V1/CHAT/COMPLETIONS",
        ] {
            assert!(is_completions_path(path), "{path}");
        }
        for path in ["/v1/embeddings", "/v1/chat/completionsx", "/completions/x"] {
            assert!(!is_completions_path(path), "{path}");
        }
    }

    #[test]
    fn keys_servers_read_differently_make_a_body_unreadable() {
        for ambiguous in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"model":"a","Model":"b"}"#,
            br#"{"Stream":true}"#,
            "{\"max_to\u{212A}ens\":1}".as_bytes(),
            br#"{"x":1,"X":2}"#,
        ] {
            assert!(parse(ambiguous).is_none(), "{ambiguous:?}");
        }
        let fine = parse(br#"{"model":"a","Temperature":1,"messages":[{"a":1,"a":2}]}"#);
        assert!(
            fine.is_some(),
            "nested keys and other fields are the server's"
        );
    }

    #[test]
    fn models_in_paths_are_found() {
        for (path, model) in [
            (
                "/v1beta/models/gemini-pro:generateContent",
                Some("gemini-pro"),
            ),
            (
                "/v1/projects/p/locations/l/publishers/google/models/g%31:x",
                Some("g1"),
            ),
            ("/openai/deployments/gpt/chat/completions", Some("gpt")),
            (
                "/model/anthropic.claude/invoke-with-response-stream",
                Some("anthropic.claude"),
            ),
            ("/model/abc/environments/production/predict", None),
            ("/v1/models", None),
            ("/v1/models/gpt-4", None),
            ("/v1/chat/completions", None),
        ] {
            assert_eq!(path_model(path).as_deref(), model, "{path}");
        }
    }
}

//! What one JSON document from a model API says about token usage.
//!
//! Three shapes carry usage, and keyrelay reads all of them:
//! - OpenAI chat completions and completions: `usage.prompt_tokens`,
//!   `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`,
//!   on the final stream chunk (with `stream_options.include_usage`), on
//!   every chunk (vLLM's continuous usage stats), or on the whole response;
//! - OpenAI Responses: `response.usage.input_tokens` / `output_tokens` /
//!   `input_tokens_details.cached_tokens` on `response.completed`;
//! - Anthropic Messages: `message.usage.input_tokens` (and
//!   `cache_read_input_tokens`) on `message_start`, `usage.output_tokens` on
//!   `message_delta`, or `usage` on the whole response.
//!
//! Every figure is a running total, so a later report replaces an earlier
//! one field by field ([`Usage::merge`]).

use std::borrow::Cow;

use serde::Deserialize;

pub use crate::telemetry::tokens::Usage;

/// What a document says: its usage report, and whether it carries
/// generated content (the first such event is the time to first token).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reading<'a> {
    /// The usage it reports, if any.
    pub usage: Usage,
    /// It carries generated text (or reasoning, or a tool call's arguments).
    pub has_content: bool,
    /// The model it names, borrowed from the document where it can be.
    pub model: Option<Cow<'a, str>>,
}

/// Reads one JSON document; anything that is not one of the shapes above
/// reads as nothing.
pub fn read(json: &[u8]) -> Reading<'_> {
    let Ok(mut document) = serde_json::from_slice::<Document>(json) else {
        return Reading::default();
    };
    let mut usage = Usage::default();
    let model = document
        .model
        .or_else(|| document.message.as_mut().and_then(|m| m.model.take()))
        .or_else(|| document.response.as_mut().and_then(|r| r.model.take()))
        .map(|name| name.0);
    for reported in [
        document.message.and_then(|m| m.usage),
        document.response.and_then(|r| r.usage),
        document.usage,
    ]
    .into_iter()
    .flatten()
    {
        usage.merge(reported.into());
    }
    let has_content = document.choices.iter().any(|choice| {
        [&choice.delta, &choice.message]
            .into_iter()
            .flatten()
            .any(Delta::has_content)
    }) || match &document.delta {
        Some(DeltaField::Object(delta)) => delta.has_content(),
        // Responses API text deltas are plain strings.
        Some(DeltaField::Text(text)) => !text.is_empty(),
        None => false,
    };
    Reading {
        usage,
        has_content,
        model,
    }
}

/// The fields of any of the shapes that matter here; serde skips the rest
/// without building them.
#[derive(Deserialize)]
struct Document<'a> {
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default, borrow)]
    model: Option<Name<'a>>,
    #[serde(default, borrow)]
    message: Option<Nested<'a>>,
    #[serde(default, borrow)]
    response: Option<Nested<'a>>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    delta: Option<DeltaField>,
}

/// A top-level `delta`: Anthropic's object, or the Responses API's text.
#[derive(Deserialize)]
#[serde(untagged)]
enum DeltaField {
    Object(Delta),
    Text(String),
}

#[derive(Deserialize)]
struct Nested<'a> {
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default, borrow)]
    model: Option<Name<'a>>,
}

/// A model's name: borrowed from the document unless it has escapes (a
/// `Cow` field only borrows as a struct's direct field, not inside `Option`).
#[derive(Deserialize)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    message: Option<Delta>,
}

/// An OpenAI `delta` / `message` or an Anthropic `delta`.
#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
}

impl Delta {
    fn has_content(&self) -> bool {
        let content = match &self.content {
            Some(serde_json::Value::String(text)) => !text.is_empty(),
            Some(serde_json::Value::Array(parts)) => !parts.is_empty(),
            _ => false,
        };
        let non_empty = |text: &Option<String>| text.as_deref().is_some_and(|t| !t.is_empty());
        content
            || non_empty(&self.reasoning_content)
            || non_empty(&self.text)
            || non_empty(&self.thinking)
            || non_empty(&self.partial_json)
            || self
                .tool_calls
                .as_ref()
                .is_some_and(|calls| !calls.is_empty())
    }
}

/// Usage in the OpenAI or the Anthropic vocabulary.
#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<RawUsage> for Usage {
    fn from(raw: RawUsage) -> Self {
        let cached = |details: Option<Details>| details.and_then(|d| d.cached_tokens);
        // Anthropic's input_tokens leaves out the tokens read from and
        // written to its cache; OpenAI's prompt and input tokens include
        // cached ones.
        let anthropic_cache = raw
            .cache_read_input_tokens
            .unwrap_or(0)
            .saturating_add(raw.cache_creation_input_tokens.unwrap_or(0));
        let input = raw
            .input_tokens
            .map(|input| input.saturating_add(anthropic_cache));
        Usage {
            prompt: raw.prompt_tokens.or(input),
            completion: raw.completion_tokens.or(raw.output_tokens),
            cached: cached(raw.prompt_tokens_details)
                .or(cached(raw.input_tokens_details))
                .or(raw.cache_read_input_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64, cached: Option<u64>) -> Usage {
        Usage {
            prompt: Some(prompt),
            completion: Some(completion),
            cached,
        }
    }

    #[test]
    fn the_model_is_read_from_each_shape_and_borrowed_unless_escaped() {
        let openai = read(br#"{"model":"llama-3","choices":[]}"#);
        assert!(matches!(openai.model, Some(Cow::Borrowed("llama-3"))));
        let escaped = read(br#"{"model":"org\/llama","choices":[]}"#);
        assert_eq!(escaped.model.as_deref(), Some("org/llama"));
        let anthropic = read(
            br#"{"type":"message_start","message":{"model":"claude","usage":{"input_tokens":1}}}"#,
        );
        assert_eq!(anthropic.model.as_deref(), Some("claude"));
        assert_eq!(anthropic.usage.prompt, Some(1), "usage still read");
        let responses = read(br#"{"type":"response.created","response":{"model":"gpt"}}"#);
        assert_eq!(responses.model.as_deref(), Some("gpt"));
        let odd = read(br#"{"model":42,"usage":{"prompt_tokens":2}}"#);
        assert_eq!(odd.model, None);
    }

    #[test]
    fn openai_chunks_report_content_and_final_usage() {
        let chunk = br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        assert_eq!(
            read(chunk),
            Reading {
                usage: Usage::default(),
                has_content: true,
                model: None,
            }
        );
        let role_only = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert!(!read(role_only).has_content);
        let last = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(read(last).usage, usage(12, 30, Some(8)));
        let whole = br#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"Hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        assert_eq!(read(whole).usage, usage(3, 1, None));
    }

    #[test]
    fn anthropic_events_report_input_then_output() {
        let start = br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"cache_read_input_tokens":5,"output_tokens":1}}}"#;
        let delta = br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#;
        let end = br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#;
        let mut total = Usage::default();
        total.merge(read(start).usage);
        assert!(read(delta).has_content);
        assert!(!read(end).has_content);
        total.merge(read(end).usage);
        assert_eq!(total, usage(30, 15, Some(5)), "input + cache reads");
    }

    #[test]
    fn responses_api_reports_on_completion() {
        let delta = br#"{"type":"response.output_text.delta","delta":"Hi"}"#;
        assert!(read(delta).has_content);
        let done = br#"{"type":"response.completed","response":{"usage":{"input_tokens":9,"output_tokens":4,"input_tokens_details":{"cached_tokens":0}}}}"#;
        assert_eq!(read(done).usage, usage(9, 4, Some(0)));
    }

    #[test]
    fn other_documents_read_as_nothing() {
        for other in [&b"[DONE]"[..], b"{", b"42", b"{\"usage\":\"lots\"}", b""] {
            assert_eq!(read(other), Reading::default());
        }
    }
}

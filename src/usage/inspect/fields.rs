//! The JSON fields a request body asks with, read as leniently as the
//! servers behind keyrelay read them: its output limit, its choices,
//! whether it streams.

use serde_json::{Map, Value};

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

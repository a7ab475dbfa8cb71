//! A route's request caps (`max_output_tokens`, `allowed_models`) and what
//! happens to a request that breaks them or cannot be read.

use serde_json::{Map, Value};

use super::fields::{choices, count, max_output, NotACount, NESTED_OUTPUT_FIELDS, OUTPUT_FIELDS};
use super::path::{percent_decode, target_models};

/// What a budgeted route does with a request body it cannot read as a
/// JSON object within [`MAX_BODY`](super::MAX_BODY) (`unparsed_budget_requests`).
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

//! The model a request target names (Gemini, Vertex AI, Azure OpenAI,
//! Bedrock paths; Realtime query parameters), and the paths
//! `add_stream_usage` applies to, as servers that decode paths see them.

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

/// `text` with each `%XX` replaced by its byte (invalid UTF-8 replaced).
pub(crate) fn percent_decode(text: &str) -> String {
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

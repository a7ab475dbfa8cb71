//! `add_stream_usage`: asking for usage on streams whose client did not, and
//! keeping the extra event from the client.
//!
//! OpenAI-compatible streams carry `usage` only when the request says
//! `"stream_options": {"include_usage": true}`, which the SDKs do not send by
//! default, so keyrelay would count nothing for them. With the route setting
//! on, keyrelay adds it to streaming JSON chat/completions requests (whole
//! bodies of at most [`MAX_REWRITE`] bytes with a declared length; other
//! requests go through untouched), and removes the usage-only event it
//! caused from what the client receives, so a script that indexes
//! `chunk.choices[0]` on every event keeps working.
//!
//! The request body is read whole to rewrite it: that is the price of the
//! setting, bounded and opt-in. Its bytes are kept as sent, with the field
//! inserted after the opening brace. On the response side only an
//! unfinished line is held back (an SSE client cannot act on it before its
//! end anyway); complete events pass at once.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use memchr::memmem;
use serde_json::Value;

use super::tap::MAX_LINE;

/// Largest request body keyrelay reads to add `include_usage`.
pub const MAX_REWRITE: usize = 1 << 20;

/// The field keyrelay adds, as inserted after the body's opening brace.
const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// True for a request `add_stream_usage` may rewrite: a POST of JSON to
/// `.../chat/completions` or `.../completions` with a declared length
/// within [`MAX_REWRITE`].
pub fn is_candidate(parts: &Parts) -> bool {
    let path = parts.uri.path();
    let json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    let length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    parts.method == Method::POST
        && (path.ends_with("/chat/completions") || path.ends_with("/completions"))
        && json
        && length.is_some_and(|length| length <= MAX_REWRITE)
}

/// Reads the body of a candidate request and, if it asks for a stream
/// without usage, adds `include_usage`. Returns the body to send and
/// whether keyrelay added the field (then the usage event is its own).
pub async fn add_include_usage(
    parts: &mut Parts,
    body: Incoming,
) -> Result<(Bytes, bool), hyper::Error> {
    let body = body.collect().await?.to_bytes();
    let Some(rewritten) = with_include_usage(&body) else {
        return Ok((body, false));
    };
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
    Ok((Bytes::from(rewritten), true))
}

/// The body with `include_usage` added, if it is a JSON object that
/// streams and has no `stream_options.include_usage` of its own.
fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    if request.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    match request.get("stream_options") {
        None => {
            // The common case: the bytes stay as sent, the field goes first.
            let brace = body.iter().position(|b| *b == b'{')?;
            let mut out = Vec::with_capacity(body.len() + INCLUDE_USAGE.len());
            out.extend_from_slice(&body[..=brace]);
            out.extend_from_slice(INCLUDE_USAGE);
            out.extend_from_slice(&body[brace + 1..]);
            Some(out)
        }
        Some(Value::Object(options))
            if options.get("include_usage") == Some(&Value::Bool(true)) =>
        {
            None
        }
        Some(Value::Object(_)) => {
            // Other stream options: set the one field, re-serialising.
            let mut request = request;
            let options = request.get_mut("stream_options")?.as_object_mut()?;
            options.insert("include_usage".to_owned(), Value::Bool(true));
            serde_json::to_vec(&request).ok()
        }
        // Not an object: the upstream will say what is wrong with it.
        Some(_) => None,
    }
}

/// Removes the usage-only event (`"choices": []` with `usage`) from an SSE
/// stream as it passes, holding back nothing but an unfinished line.
#[derive(Debug, Default)]
pub struct UsageEventStrip {
    /// The start of a line the next frame finishes.
    held: Vec<u8>,
    /// The usage event's data line was dropped; its blank line goes too.
    drop_blank: bool,
    /// Gave up (a line beyond [`MAX_LINE`]): everything passes as it comes.
    off: bool,
}

impl UsageEventStrip {
    /// What of `frame` to send now; `None` when nothing is ready.
    pub fn pass(&mut self, frame: Bytes) -> Option<Bytes> {
        if self.off {
            return Some(frame);
        }
        let fast = self.held.is_empty()
            && !self.drop_blank
            && memmem::find(&frame, b"\"usage\"").is_none();
        if fast {
            // Complete lines go as they are; an unfinished one waits.
            let complete = memchr::memrchr(b'\n', &frame).map_or(0, |end| end + 1);
            self.held.extend_from_slice(&frame[complete..]);
            return (complete > 0).then(|| frame.slice(..complete));
        }
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(&frame);
        let mut out = Vec::with_capacity(data.len());
        let mut rest = &data[..];
        while let Some(end) = memchr::memchr(b'\n', rest) {
            let line = &rest[..=end];
            rest = &rest[end + 1..];
            let blank = matches!(line, b"\n" | b"\r\n");
            if std::mem::take(&mut self.drop_blank) && blank {
                continue;
            }
            if is_usage_only(line) {
                self.drop_blank = true;
                continue;
            }
            out.extend_from_slice(line);
        }
        if rest.len() > MAX_LINE {
            // Not SSE as keyrelay knows it: stop filtering, lose nothing.
            self.off = true;
            out.extend_from_slice(rest);
        } else {
            self.held.extend_from_slice(rest);
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// True while an unfinished line is held.
    pub fn holds_bytes(&self) -> bool {
        !self.held.is_empty()
    }

    /// At the end of the stream: the unfinished last line, if any.
    pub fn finish(&mut self) -> Option<Bytes> {
        let rest = std::mem::take(&mut self.held);
        (!rest.is_empty() && !is_usage_only(&rest)).then(|| Bytes::from(rest))
    }
}

/// A `data:` line holding a chunk with `usage` and no choices.
fn is_usage_only(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return false;
    };
    if memmem::find(data, b"\"usage\"").is_none() {
        return false;
    }
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let no_choices = match chunk.get("choices") {
        Some(Value::Array(choices)) => choices.is_empty(),
        None => true,
        Some(_) => false,
    };
    no_choices && chunk.get("usage").is_some_and(|usage| !usage.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_is_added_only_where_it_is_missing() {
        let added = with_include_usage(br#"{"model":"m","stream":true,"messages":[]}"#)
            .map(|body| String::from_utf8(body).expect("UTF-8"));
        assert_eq!(
            added.as_deref(),
            Some(
                r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
            )
        );
        let merged =
            with_include_usage(br#"{"stream":true,"stream_options":{"x":1}}"#).expect("rewritten");
        let merged: Value = serde_json::from_slice(&merged).expect("JSON");
        assert_eq!(
            merged["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        for untouched in [
            &br#"{"stream":false}"#[..],
            br#"{"messages":[]}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            br#"{"stream":true,"stream_options":null}"#,
            b"[1,2]",
            b"not json",
        ] {
            assert_eq!(with_include_usage(untouched), None);
        }
    }

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
        data: [DONE]\n\n";
    const WITHOUT_USAGE: &str =
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";

    fn strip_all(frames: &[&[u8]]) -> (String, Vec<usize>) {
        let mut strip = UsageEventStrip::default();
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        for frame in frames {
            if let Some(passed) = strip.pass(Bytes::copy_from_slice(frame)) {
                sizes.push(passed.len());
                out.extend_from_slice(&passed);
            }
        }
        if let Some(rest) = strip.finish() {
            out.extend_from_slice(&rest);
        }
        (String::from_utf8(out).expect("UTF-8"), sizes)
    }

    #[test]
    fn the_usage_event_is_removed_however_the_stream_is_split() {
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let (out, _) = strip_all(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(out, WITHOUT_USAGE, "cut at {cut}");
        }
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(strip_all(&chunks).0, WITHOUT_USAGE);
    }

    #[test]
    fn complete_events_pass_at_once_and_other_usage_stays() {
        // A content chunk that also reports usage (vLLM) is the client's.
        let both = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(strip_all(&[both.as_bytes()]).0, both);
        // An event in one frame is passed whole, as the same bytes.
        let event = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let (out, sizes) = strip_all(&[event.as_bytes(), event.as_bytes()]);
        assert_eq!(out, event.repeat(2));
        assert_eq!(sizes, vec![event.len(), event.len()]);
    }
}

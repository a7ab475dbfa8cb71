//! `add_stream_usage`: asking for usage on streams whose client did not, and
//! keeping the extra event from the client.
//!
//! OpenAI-compatible streams carry `usage` only when the request says
//! `"stream_options": {"include_usage": true}`, which the SDKs do not send by
//! default, so keyrelay would count nothing for them. With the route setting
//! on, keyrelay adds it to streaming chat/completions requests (bodies that
//! [`inspect`](super::inspect) reads as a JSON object within its bound;
//! others go through untouched, under the budget's reservation), and removes the usage-only event it
//! caused from what the client receives, so a script that indexes
//! `chunk.choices[0]` on every event keeps working.
//!
//! The request body is read whole to rewrite it: that is the price of the
//! setting, bounded and opt-in. Its bytes are kept as sent, with the field
//! inserted after the opening brace. On the response side only an
//! unfinished line is held back (an SSE client cannot act on it before its
//! end anyway); complete events pass at once.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::inspect::truthy;
use super::tap::{followed_by, has_usage_object, MAX_LINE};

/// The field keyrelay adds, as inserted after the body's opening brace.
const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// True if `request` streams (as a lenient server reads `stream`: `true`,
/// `"true"`, `1`) and does not ask for usage itself.
pub fn lacks_usage(request: &Map<String, Value>) -> bool {
    if !truthy(request.get("stream")) {
        return false;
    }
    match request.get("stream_options") {
        None | Some(Value::Null) => true,
        Some(Value::Object(options)) => options.get("include_usage") != Some(&Value::Bool(true)),
        // Not an object: the upstream will say what is wrong with it.
        Some(_) => false,
    }
}

/// Sets `stream_options.include_usage` in a request [`lacks_usage`] says
/// lacks it; false if it could not (a `stream_options` that is no object).
pub fn set_include_usage(request: &mut Map<String, Value>) -> bool {
    let options = request.entry("stream_options").or_insert(Value::Null);
    if options.is_null() {
        *options = Value::Object(Map::new());
    }
    match options.as_object_mut() {
        Some(options) => {
            options.insert("include_usage".to_owned(), Value::Bool(true));
            true
        }
        None => false,
    }
}

/// `body` (which parsed as `request`) with `include_usage` added, if it
/// streams without asking for usage. Without `stream_options` the bytes
/// stay as sent, the field inserted after the opening brace; otherwise
/// the request is written out again.
pub fn with_include_usage(body: &[u8], request: &Map<String, Value>) -> Option<Vec<u8>> {
    if !lacks_usage(request) {
        return None;
    }
    if !request.contains_key("stream_options") {
        // The common case: the bytes stay as sent, the field goes first.
        let brace = body.iter().position(|b| *b == b'{')?;
        let mut out = Vec::with_capacity(body.len() + INCLUDE_USAGE.len());
        out.extend_from_slice(&body[..=brace]);
        out.extend_from_slice(INCLUDE_USAGE);
        out.extend_from_slice(&body[brace + 1..]);
        return Some(out);
    }
    let mut request = request.clone();
    set_include_usage(&mut request).then(|| serde_json::to_vec(&request).ok())?
}

/// Removes the usage-only event (`"choices": []` with `usage`) from an SSE
/// stream as it passes. It holds back only the unfinished last line of a
/// frame, and only while that line could still turn out to be the usage
/// event: one that starts an event with `data:` and has shown no choice yet.
#[derive(Debug)]
pub struct UsageEventStrip {
    /// The start of a line the next frame finishes.
    held: Vec<u8>,
    /// The next line starts an event (the stream's start, or after a blank line).
    at_event_start: bool,
    /// The last frame ended inside a line that was already sent.
    mid_line: bool,
    /// The usage event's data line was dropped; its blank line goes too.
    drop_blank: bool,
}

impl Default for UsageEventStrip {
    fn default() -> Self {
        Self {
            held: Vec::new(),
            at_event_start: true,
            mid_line: false,
            drop_blank: false,
        }
    }
}

impl UsageEventStrip {
    /// What of `frame` to send now; `None` when nothing is ready.
    pub fn pass(&mut self, frame: Bytes) -> Option<Bytes> {
        let joined;
        let data: &[u8] = if self.held.is_empty() {
            &frame
        } else {
            let mut held = std::mem::take(&mut self.held);
            held.extend_from_slice(&frame);
            joined = held;
            &joined
        };
        let rewrote = data.len() != frame.len();
        // The kept parts of `data`, as ranges; most frames keep one.
        let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
        let mut keep = |range: std::ops::Range<usize>| match kept.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => kept.push(range),
        };
        let mut start = 0;
        while let Some(len) = memchr::memchr(b'\n', &data[start..]) {
            let end = start + len + 1;
            let line = &data[start..end];
            let continues = std::mem::take(&mut self.mid_line);
            let blank = !continues && matches!(line, b"\n" | b"\r\n");
            if std::mem::take(&mut self.drop_blank) && blank {
                self.at_event_start = true;
            } else if !continues && self.at_event_start && is_usage_only(line) {
                self.drop_blank = true;
            } else {
                keep(start..end);
                self.at_event_start = blank;
            }
            start = end;
        }
        let tail = &data[start..];
        if !tail.is_empty() {
            let could_be_usage = !self.mid_line && self.at_event_start && could_be_usage_only(tail);
            if could_be_usage && tail.len() <= MAX_LINE {
                self.held.extend_from_slice(tail);
            } else {
                keep(start..data.len());
                self.mid_line = true;
            }
        }
        match kept.as_slice() {
            [] => None,
            // Nothing cut: the frame's own bytes, without a copy.
            [only] if !rewrote => Some(frame.slice(only.clone())),
            ranges => {
                let mut out = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum());
                for range in ranges {
                    out.extend_from_slice(&data[range.clone()]);
                }
                Some(Bytes::from(out))
            }
        }
    }

    /// True while an unfinished line is held.
    pub fn holds_bytes(&self) -> bool {
        !self.held.is_empty()
    }

    /// The held line, to send before trailers, an error or the end.
    pub fn finish(&mut self) -> Option<Bytes> {
        let rest = std::mem::take(&mut self.held);
        (!rest.is_empty() && !is_usage_only(&rest)).then(|| Bytes::from(rest))
    }
}

/// True if an unfinished line may still be a usage-only `data:` line: it is
/// a start of `data:`, or a `data:` line that has not shown a choice.
fn could_be_usage_only(start: &[u8]) -> bool {
    if start.len() < b"data:".len() {
        return b"data:".starts_with(start);
    }
    start.starts_with(b"data:") && !has_a_choice(start)
}

/// True if `data` shows `"choices"` holding an object (`"choices": [{`).
fn has_a_choice(data: &[u8]) -> bool {
    memchr::memmem::find_iter(data, b"\"choices\"")
        .any(|at| followed_by(&data[at + b"\"choices\"".len()..], b":[{"))
}

/// A `data:` line holding a chunk with `usage` and no choices.
fn is_usage_only(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return false;
    };
    if !has_usage_object(data) {
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
        let with = |body: &[u8]| {
            let request = crate::usage::inspect::parse(body).expect("an object");
            with_include_usage(body, &request)
        };
        let added = with(br#"{"model":"m","stream":true,"messages":[]}"#)
            .map(|body| String::from_utf8(body).expect("UTF-8"));
        assert_eq!(
            added.as_deref(),
            Some(
                r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
            )
        );
        for merged in [
            &br#"{"stream":true,"stream_options":{"x":1}}"#[..],
            br#"{"stream":"true","stream_options":{"x":1,"include_usage":false}}"#,
        ] {
            let merged = with(merged).expect("rewritten");
            let merged: Value = serde_json::from_slice(&merged).expect("JSON");
            assert_eq!(merged["stream_options"]["include_usage"], true);
            assert_eq!(merged["stream_options"]["x"], 1);
        }
        let null = with(br#"{"stream":true,"stream_options":null}"#).expect("rewritten");
        let null: Value = serde_json::from_slice(&null).expect("JSON");
        assert_eq!(
            null["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        for untouched in [
            &br#"{"stream":false}"#[..],
            br#"{"messages":[]}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            br#"{"stream":true,"stream_options":"odd"}"#,
        ] {
            assert_eq!(with(untouched), None);
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
    fn only_a_line_that_may_be_the_usage_event_waits() {
        let mut strip = UsageEventStrip::default();
        // A content line cut short passes at once: it has shown its choice.
        let start = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi";
        assert_eq!(
            strip.pass(Bytes::from(start)).as_deref(),
            Some(start.as_bytes())
        );
        assert_eq!(
            strip.pass(Bytes::from("\"}}]}\n\n")).as_deref(),
            Some(&b"\"}}]}\n\n"[..])
        );
        // The start of a line that may still be the usage event waits...
        assert_eq!(strip.pass(Bytes::from("data: {\"id\":\"c\",")), None);
        assert!(strip.holds_bytes());
        // ...and goes out with its end once it shows a choice.
        let rest = "\"choices\":[{\"delta\":{}}]}\n\n";
        assert_eq!(
            strip.pass(Bytes::from(rest)).as_deref(),
            Some(format!("data: {{\"id\":\"c\",{rest}").as_bytes())
        );
    }

    #[test]
    fn a_usage_event_with_other_fields_is_left_whole() {
        let event =
            "event: chunk\nid: 7\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(strip_all(&[event.as_bytes()]).0, event);
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

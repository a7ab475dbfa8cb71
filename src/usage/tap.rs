//! Reading token usage off a response body as it passes, without holding
//! back a byte.
//!
//! The tap sees each data frame just before it goes to the client and keeps
//! only what it must to find whole documents: for Server-Sent Events, the
//! one unfinished line carried over from the previous frame (bounded by
//! [`MAX_LINE`]); for a JSON response, a copy of the body (bounded by
//! [`MAX_JSON`]; of a longer one only the last [`JSON_TAIL`] bytes, where
//! a whole answer's `usage` is), read when it ends. The frames themselves
//! go on untouched. SSE frames are also searched for `"delta"`, one per
//! generated chunk, the lower bound a budget charges when no usage comes.
//!
//! Of the SSE lines, only `data:` lines are read, and of those only the ones
//! that can matter: every line until the first generated content (for the
//! time to first token), then only lines that mention `"usage"`. So a
//! stream's per-chunk cost after its first token is a scan for line ends
//! and for that word.

use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use std::sync::LazyLock;

use memchr::memmem;
use tokio::time::Instant;

use super::event;
pub use crate::telemetry::tokens::{GaveUp, Usage, UsageReport};

/// Longest SSE line the tap carries across frames; a longer one (a huge
/// tool-call argument, or a stream that is not SSE) turns the tap off for
/// that stream, which is counted.
pub const MAX_LINE: usize = 64 * 1024;

/// Largest JSON body the tap copies to read its `usage`.
pub const MAX_JSON: usize = 1 << 20;

/// How much of the end of a longer JSON body the tap keeps: OpenAI and
/// Anthropic put `usage` after the content, at the end.
pub const JSON_TAIL: usize = 64 * 1024;

/// A tap on one response body.
#[derive(Debug)]
pub struct UsageTap {
    framing: Framing,
    report: UsageReport,
    model: ModelName,
}

/// The model the response names (`model`, Anthropic's `message.model`, the
/// Responses API's `response.model`), kept only when a request's span will
/// report it: the documents read anyway are parsed for it at no extra
/// cost, and the one copy is made only then.
#[derive(Debug, Default)]
struct ModelName {
    wanted: bool,
    name: Option<Box<str>>,
}

impl ModelName {
    fn offer(&mut self, name: Option<&str>) {
        if let (true, None, Some(name)) = (self.wanted, &self.name, name) {
            self.name = Some(name.into());
        }
    }
}

#[derive(Debug)]
enum Framing {
    /// Server-Sent Events: the unfinished line from the previous frame.
    Sse { partial: Vec<u8> },
    /// A JSON document, copied as it passes.
    Json { document: Vec<u8> },
    /// A JSON document past [`MAX_JSON`]: only its last [`JSON_TAIL`]
    /// bytes, where the `usage` of a whole answer is.
    JsonTail { tail: Vec<u8> },
    /// Stopped reading (see [`UsageReport::gave_up`]).
    Off,
}

impl UsageTap {
    /// A tap for a response with these headers, if it can carry usage: a
    /// successful, unencoded `text/event-stream` or `application/json`
    /// (a compressed body is not decompressed to be read).
    pub fn for_response(status: http::StatusCode, headers: &HeaderMap) -> Option<Self> {
        if !status.is_success() {
            return None;
        }
        let encoded = headers
            .get(CONTENT_ENCODING)
            .is_some_and(|coding| !coding.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded {
            return None;
        }
        let media_type = headers.get(CONTENT_TYPE)?.to_str().ok()?;
        let media_type = media_type.split(';').next()?.trim();
        let framing = if media_type.eq_ignore_ascii_case("text/event-stream") {
            Framing::Sse {
                partial: Vec::new(),
            }
        } else if media_type.eq_ignore_ascii_case("application/json") {
            let declared = headers
                .get(CONTENT_LENGTH)
                .and_then(|len| len.to_str().ok()?.parse::<usize>().ok());
            if declared.is_some_and(|len| len > MAX_JSON) {
                Framing::JsonTail { tail: Vec::new() }
            } else {
                Framing::Json {
                    document: Vec::with_capacity(declared.unwrap_or(0)),
                }
            }
        } else {
            return None;
        };
        Some(Self {
            framing,
            report: UsageReport::default(),
            model: ModelName::default(),
        })
    }

    /// Keeps the model the response names, for [`UsageTap::take_model`].
    pub fn read_model(&mut self) {
        self.model.wanted = true;
    }

    /// The model the response named, when [`UsageTap::read_model`] asked.
    pub fn take_model(&mut self) -> Option<Box<str>> {
        self.model.name.take()
    }

    /// Why a successful SSE or JSON response, which could carry usage,
    /// cannot be tapped, if it cannot: it is compressed.
    pub fn unreadable(status: http::StatusCode, headers: &HeaderMap) -> Option<GaveUp> {
        if !status.is_success() {
            return None;
        }
        let media_type = headers.get(CONTENT_TYPE)?.to_str().ok()?;
        let media_type = media_type.split(';').next()?.trim();
        if !media_type.eq_ignore_ascii_case("text/event-stream")
            && !media_type.eq_ignore_ascii_case("application/json")
        {
            return None;
        }
        let encoded = headers
            .get(CONTENT_ENCODING)
            .is_some_and(|coding| !coding.as_bytes().eq_ignore_ascii_case(b"identity"));
        encoded.then_some(GaveUp::Encoded)
    }

    /// True for a Server-Sent Events response.
    pub fn is_sse(&self) -> bool {
        matches!(self.framing, Framing::Sse { .. })
    }

    /// Reads one data frame, `now` being when it passes to the client.
    pub fn feed(&mut self, data: &[u8], now: Instant) {
        let gave_up = match &mut self.framing {
            Framing::Sse { partial } => {
                self.report.deltas += MENTIONS_DELTA.find_iter(data).count() as u64;
                feed_sse(partial, data, now, &mut self.report, &mut self.model)
            }
            Framing::Json { document } if document.len() + data.len() > MAX_JSON => {
                let mut tail = std::mem::take(document);
                keep_tail(&mut tail, data);
                self.framing = Framing::JsonTail { tail };
                return;
            }
            Framing::JsonTail { tail } => {
                keep_tail(tail, data);
                None
            }
            Framing::Json { document } => {
                document.extend_from_slice(data);
                None
            }
            Framing::Off => None,
        };
        if let Some(why) = gave_up {
            self.framing = Framing::Off;
            self.report.gave_up = Some(why);
        }
    }

    /// The report, once the body ended (or was abandoned).
    pub fn finish(mut self, now: Instant) -> UsageReport {
        match std::mem::replace(&mut self.framing, Framing::Off) {
            // Most JSON answers (model lists, health, errors) carry no
            // usage: a search is cheaper than parsing them.
            Framing::Json { document } if has_usage_object(&document) => {
                let reading = event::read(&document);
                self.model.offer(reading.model.as_deref());
                self.report.usage.merge(reading.usage);
                if reading.has_content {
                    self.report.first_content.get_or_insert(now);
                }
            }
            Framing::JsonTail { tail } => match last_usage_object(&tail) {
                Some(usage) => {
                    let mut document = b"{\"usage\":".to_vec();
                    document.extend_from_slice(usage);
                    document.push(b'}');
                    self.report.usage.merge(event::read(&document).usage);
                }
                None => self.report.gave_up = Some(GaveUp::OverlongJson),
            },
            // A last line without its newline still counts.
            Framing::Sse { partial } if !partial.is_empty() => {
                read_line(&partial, now, &mut self.report, &mut self.model);
            }
            Framing::Json { .. } | Framing::Sse { .. } | Framing::Off => {}
        }
        self.report
    }
}

/// Reads the complete lines of one frame, carrying an unfinished one in
/// `partial`; gives up on a line longer than [`MAX_LINE`].
fn feed_sse(
    partial: &mut Vec<u8>,
    data: &[u8],
    now: Instant,
    report: &mut UsageReport,
    model: &mut ModelName,
) -> Option<GaveUp> {
    let mut rest = data;
    // Past the first token, only lines that mention "usage" matter, and
    // most frames have none: one search over the frame decides it, and
    // only an unfinished last line is kept.
    if partial.is_empty() && report.first_content.is_some() && !has_usage_object(data) {
        let tail = match memchr::memrchr(b'\n', data) {
            Some(end) => &data[end + 1..],
            None => data,
        };
        if tail.len() > MAX_LINE {
            return Some(GaveUp::OverlongLine);
        }
        partial.extend_from_slice(tail);
        return None;
    }
    if !partial.is_empty() {
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        if partial.len() + end > MAX_LINE {
            return Some(GaveUp::OverlongLine);
        }
        partial.extend_from_slice(&rest[..end]);
        if end == rest.len() {
            return None;
        }
        read_line(partial, now, report, model);
        partial.clear();
        rest = &rest[end + 1..];
    }
    while let Some(end) = memchr::memchr(b'\n', rest) {
        read_line(&rest[..end], now, report, model);
        rest = &rest[end + 1..];
    }
    if rest.len() > MAX_LINE {
        return Some(GaveUp::OverlongLine);
    }
    partial.extend_from_slice(rest);
    None
}

/// The search for `"usage"`, built once: building a searcher costs more
/// than running it over one chunk.
static MENTIONS_USAGE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// The search for a generated chunk's `"delta"`.
static MENTIONS_DELTA: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"delta\""));

/// Appends `data` to `tail`, keeping only its last [`JSON_TAIL`] bytes.
fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    let data = &data[data.len().saturating_sub(JSON_TAIL)..];
    let excess = (tail.len() + data.len()).saturating_sub(JSON_TAIL);
    tail.drain(..excess.min(tail.len()));
    tail.extend_from_slice(data);
}

/// The last complete `"usage": {...}` object in `tail` (its braces
/// matched, strings skipped), if any.
fn last_usage_object(tail: &[u8]) -> Option<&[u8]> {
    let key = b"\"usage\"";
    let mut found = None;
    for at in MENTIONS_USAGE.find_iter(tail) {
        let rest = &tail[at + key.len()..];
        if !followed_by(rest, b":{") {
            continue;
        }
        let open = rest.iter().position(|b| *b == b'{')?;
        let object = &rest[open..];
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (i, byte) in object.iter().enumerate() {
            match (in_string, escaped, *byte) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (true, false, b'"') => in_string = false,
                (true, false, _) => {}
                (false, _, b'"') => in_string = true,
                (false, _, b'{') => depth += 1,
                (false, _, b'}') => {
                    depth -= 1;
                    if depth == 0 {
                        found = Some(&object[..=i]);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// True if `data` has a `"usage"` key holding an object. OpenAI streams that
/// were asked for usage send `"usage": null` on every chunk, which is
/// not worth parsing.
pub fn has_usage_object(data: &[u8]) -> bool {
    MENTIONS_USAGE
        .find_iter(data)
        .any(|at| followed_by(&data[at + b"\"usage\"".len()..], b":{"))
}

/// True if `rest` starts with the bytes of `tokens`, JSON whitespace
/// allowed before each: what follows a key, e.g. `: {` for an object value.
pub fn followed_by(mut rest: &[u8], tokens: &[u8]) -> bool {
    for token in tokens {
        let start = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(rest.len());
        match rest[start..].split_first() {
            Some((first, after)) if first == token => rest = after,
            _ => return false,
        }
    }
    true
}

/// Reads one SSE line (without its `\n`).
fn read_line(line: &[u8], now: Instant, report: &mut UsageReport, model: &mut ModelName) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    let data = data.strip_prefix(b" ").unwrap_or(data);
    let before_first_token = report.first_content.is_none();
    if !before_first_token && !has_usage_object(data) {
        return;
    }
    let reading = event::read(data);
    model.offer(reading.model.as_deref());
    report.usage.merge(reading.usage);
    if reading.has_content && before_first_token {
        report.first_content = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(content_type).expect("value"),
        );
        headers
    }

    fn tap_for(content_type: &str) -> UsageTap {
        UsageTap::for_response(StatusCode::OK, &headers(content_type)).expect("a tap")
    }

    const OPENAI_STREAM: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
        data: [DONE]\n\n";

    fn expected() -> Usage {
        Usage {
            prompt: Some(11),
            completion: Some(2),
            cached: Some(4),
        }
    }

    #[test]
    fn usage_is_found_however_the_stream_is_split() {
        let bytes = OPENAI_STREAM.as_bytes();
        // Every split into two frames, and byte by byte.
        for cut in 0..=bytes.len() {
            let mut tap = tap_for("text/event-stream; charset=utf-8");
            let now = Instant::now();
            tap.feed(&bytes[..cut], now);
            tap.feed(&bytes[cut..], now);
            assert_eq!(tap.finish(now).usage, expected(), "cut at {cut}");
        }
        let mut tap = tap_for("text/event-stream");
        let now = Instant::now();
        for byte in bytes.chunks(1) {
            tap.feed(byte, now);
        }
        let report = tap.finish(now);
        assert_eq!(report.usage, expected());
        assert_eq!(report.gave_up, None);
    }

    #[test]
    fn the_first_token_is_the_first_content_not_the_first_byte() {
        let mut tap = tap_for("text/event-stream");
        let start = Instant::now();
        let (role, hel) = OPENAI_STREAM.split_at(
            OPENAI_STREAM
                .find("data: {\"choices\":[{\"delta\":{\"content\":\"Hel")
                .expect("chunk"),
        );
        tap.feed(role.as_bytes(), start);
        let later = start + std::time::Duration::from_millis(250);
        tap.feed(hel.as_bytes(), later);
        assert_eq!(tap.finish(later).first_content, Some(later));
    }

    #[test]
    fn only_a_usage_object_counts_as_usage() {
        assert!(has_usage_object(
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(has_usage_object(br#"{"usage" : { "prompt_tokens": 1}}"#));
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{}}],"usage":null}"#
        ));
        assert!(!has_usage_object(
            br#"{"text":"the word \"usage\" in content"}"#
        ));
        assert!(!has_usage_object(br#"{"usage""#));
    }

    #[test]
    fn an_overlong_line_turns_the_tap_off_for_that_stream() {
        let mut tap = tap_for("text/event-stream");
        let now = Instant::now();
        let long = vec![b'x'; MAX_LINE + 1];
        tap.feed(b"data: ", now);
        tap.feed(&long, now);
        tap.feed(OPENAI_STREAM.as_bytes(), now);
        let report = tap.finish(now);
        assert_eq!(report.gave_up, Some(GaveUp::OverlongLine));
        assert!(report.usage.is_empty());
    }

    #[test]
    fn a_json_body_is_read_at_its_end_within_the_bound() {
        let body = br#"{"object":"chat.completion","choices":[{"message":{"content":"Hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        let mut tap = tap_for("application/json");
        let now = Instant::now();
        for part in body.chunks(7) {
            tap.feed(part, now);
        }
        let report = tap.finish(now);
        assert_eq!(report.usage.prompt, Some(5));
        assert_eq!(report.usage.completion, Some(1));

        // Beyond the bound, the usage at the end is still found...
        let mut big = headers("application/json");
        big.insert(CONTENT_LENGTH, HeaderValue::from(MAX_JSON + 1));
        let mut tap = UsageTap::for_response(StatusCode::OK, &big).expect("a tail tap");
        tap.feed(br#"{"choices":[{"message":{"content":""#, now);
        tap.feed(&vec![b'x'; MAX_JSON], now);
        tap.feed(
            br#""}}],"usage":{"prompt_tokens":10,"completion_tokens":5000,"x":{"s":"}"}}}"#,
            now,
        );
        let report = tap.finish(now);
        assert_eq!(report.usage.completion, Some(5000));
        assert_eq!(report.gave_up, None);
        // ...and a body without one is counted as unread.
        let mut tap = tap_for("application/json");
        tap.feed(&vec![b' '; MAX_JSON], now);
        tap.feed(b"{}", now);
        assert_eq!(tap.finish(now).gave_up, Some(GaveUp::OverlongJson));
    }

    #[test]
    fn only_successful_unencoded_sse_and_json_are_tapped() {
        assert!(
            UsageTap::for_response(StatusCode::BAD_REQUEST, &headers("application/json")).is_none()
        );
        assert!(
            UsageTap::for_response(StatusCode::OK, &headers("application/octet-stream")).is_none()
        );
        assert!(UsageTap::for_response(StatusCode::OK, &HeaderMap::new()).is_none());
        let mut gzip = headers("application/json");
        gzip.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(UsageTap::for_response(StatusCode::OK, &gzip).is_none());
    }
}

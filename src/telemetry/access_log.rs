//! The access-log line: written by hand into the log writer's queue.
//!
//! Every request ends with one line, so its cost is per request. Going
//! through `tracing`'s `fmt` layer costs about 15,000 CPU instructions a line
//! (field visitors, `Debug` formatting of floats, the timestamp, a copy into
//! a per-event buffer); this formats the same line, text or JSON, straight
//! into a reused buffer with integer arithmetic, then hands it to the same
//! writer thread as every other log line (see [`crate::telemetry::logging`]).
//!
//! The line is only written when `RUST_LOG` enables the `keyrelay::access`
//! target at `info` (the default), checked through `tracing`'s own filter.
//! Without keyrelay's log writer installed (an embedder's subscriber), the
//! same fields go out as a plain `tracing` event.

use std::cell::RefCell;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;
use crate::telemetry::logging;
use crate::telemetry::tokens::Usage;

/// Target of access-log events, for `RUST_LOG=keyrelay::access=info` style filters.
pub(crate) const TARGET: &str = "keyrelay::access";

/// The access-log event's message, kept for filters and tests that look for it.
const MESSAGE: &str = "request finished";

/// Everything one access-log line says about a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AccessLine<'a> {
    pub request_id: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: Option<u16>,
    /// The access token's name, never its value.
    pub token: Option<&'a str>,
    pub ttfb: Option<Duration>,
    pub duration: Duration,
    pub bytes: u64,
    pub outcome: &'static str,
    /// Tokens the upstream reported using.
    pub usage: Usage,
    /// Time to the first generated token.
    pub ttft: Option<Duration>,
    /// Output tokens per second after the first.
    pub tokens_per_second: Option<f64>,
    /// Attempts upstream, when there was more than one.
    pub attempts: Option<u32>,
    /// The route whose upstream answered, when it was not the request's own.
    pub upstream: Option<&'a str>,
}

impl AccessLine<'_> {
    /// Writes the line if the log filter lets `keyrelay::access` info through.
    pub(crate) fn emit(&self) {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let Some(sink) = logging::sink() else {
            self.emit_event();
            return;
        };
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            match sink.format {
                LogFormat::Text => self.write_text(&mut line, now, sink.ansi),
                LogFormat::Json => self.write_json(&mut line, now),
            }
            line.push(b'\n');
            // Queued, or counted as dropped when the writer is that far behind.
            sink.writer.append(&line);
        });
    }

    /// The same fields as a `tracing` event, for a subscriber keyrelay did not install.
    fn emit_event(&self) {
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            method = self.method,
            path = self.path,
            status = self.status,
            token = self.token,
            ttfb_ms = self.ttfb.map(|ttfb| ttfb.as_micros() as f64 / 1e3),
            duration_ms = self.duration.as_micros() as f64 / 1e3,
            bytes = self.bytes,
            outcome = self.outcome,
            prompt_tokens = self.usage.prompt,
            completion_tokens = self.usage.completion,
            cached_tokens = self.usage.cached,
            ttft_ms = self.ttft.map(|ttft| ttft.as_micros() as f64 / 1e3),
            tokens_per_s = self.tokens_per_second,
            attempts = self.attempts,
            upstream = self.upstream,
            "{MESSAGE}"
        );
    }

    /// `tracing-subscriber`'s full text format, so both kinds of line read alike:
    /// `TIMESTAMP  INFO keyrelay::access: request finished key=value ...`.
    fn write_text(&self, out: &mut Vec<u8>, now: Duration, ansi: bool) {
        let mut timestamp = [0u8; TIMESTAMP_LEN];
        format_timestamp(now, &mut timestamp);
        if ansi {
            out.extend_from_slice(b"\x1b[2m");
            out.extend_from_slice(&timestamp);
            out.extend_from_slice(
                b"\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mkeyrelay::access\x1b[0m\x1b[2m:\x1b[0m request finished",
            );
        } else {
            out.extend_from_slice(&timestamp);
            out.extend_from_slice(b"  INFO keyrelay::access: request finished");
        }
        self.write_fields(out, Shape::Text { ansi });
    }

    /// `tracing-subscriber`'s flattened JSON, field for field.
    fn write_json(&self, out: &mut Vec<u8>, now: Duration) {
        let mut timestamp = [0u8; TIMESTAMP_LEN];
        format_timestamp(now, &mut timestamp);
        out.extend_from_slice(b"{\"timestamp\":\"");
        out.extend_from_slice(&timestamp);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request finished\"");
        self.write_fields(out, Shape::Json);
        Shape::Json.key(out, key!("target"));
        Shape::Json.string(out, TARGET);
        out.push(b'}');
    }

    /// The fields in `tracing`'s order; absent ones are left out, as `tracing` does.
    fn write_fields(&self, out: &mut Vec<u8>, shape: Shape) {
        if let Some(request_id) = self.request_id {
            shape.key(out, key!("request_id"));
            shape.string(out, request_id);
        }
        shape.key(out, key!("method"));
        // Recorded with `%` (Display), so text prints it unquoted.
        match shape {
            Shape::Text { .. } => out.extend_from_slice(self.method.as_bytes()),
            Shape::Json => shape.string(out, self.method),
        }
        shape.key(out, key!("path"));
        shape.string(out, self.path);
        if let Some(status) = self.status {
            shape.key(out, key!("status"));
            push_u64(out, status.into());
        }
        if let Some(token) = self.token {
            shape.key(out, key!("token"));
            shape.string(out, token);
        }
        if let Some(ttfb) = self.ttfb {
            shape.key(out, key!("ttfb_ms"));
            push_millis(out, ttfb);
        }
        shape.key(out, key!("duration_ms"));
        push_millis(out, self.duration);
        shape.key(out, key!("bytes"));
        push_u64(out, self.bytes);
        shape.key(out, key!("outcome"));
        shape.string(out, self.outcome);
        for (key, tokens) in [
            (key!("prompt_tokens"), self.usage.prompt),
            (key!("completion_tokens"), self.usage.completion),
            (key!("cached_tokens"), self.usage.cached),
        ] {
            if let Some(tokens) = tokens {
                shape.key(out, key);
                push_u64(out, tokens);
            }
        }
        if let Some(ttft) = self.ttft {
            shape.key(out, key!("ttft_ms"));
            push_millis(out, ttft);
        }
        if let Some(rate) = self.tokens_per_second {
            shape.key(out, key!("tokens_per_s"));
            // Only requests that report usage pay for float formatting.
            let _ = write!(out, "{rate:.1}");
        }
        if let Some(attempts) = self.attempts {
            shape.key(out, key!("attempts"));
            push_u64(out, attempts.into());
        }
        if let Some(upstream) = self.upstream {
            shape.key(out, key!("upstream"));
            shape.string(out, upstream);
        }
    }
}

/// A field's key as each [`Shape`] writes it, spelled out at compile time
/// so that writing one is a single copy.
struct Key {
    text: &'static str,
    text_ansi: &'static str,
    json: &'static str,
}

/// The [`Key`] for a field name.
macro_rules! key {
    ($name:literal) => {
        &Key {
            text: concat!(" ", $name, "="),
            text_ansi: concat!(" \x1b[3m", $name, "\x1b[0m\x1b[2m=\x1b[0m"),
            json: concat!(",\"", $name, "\":"),
        }
    };
}
use key;

/// How fields are written: `tracing-subscriber`'s text (styled for a
/// terminal or not) or its JSON.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Text { ansi: bool },
    Json,
}

impl Shape {
    /// What comes before a field's value: ` name=` or `,"name":`.
    fn key(self, out: &mut Vec<u8>, key: &Key) {
        let key = match self {
            Self::Text { ansi: false } => key.text,
            Self::Text { ansi: true } => key.text_ansi,
            Self::Json => key.json,
        };
        out.extend_from_slice(key.as_bytes());
    }

    /// A string value: quoted as `Debug` prints it (how `tracing` prints
    /// `&str` fields) or as a JSON string.
    fn string(self, out: &mut Vec<u8>, text: &str) {
        if is_plain(text) {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
            return;
        }
        match self {
            Self::Text { .. } => {
                let _ = write!(out, "{text:?}");
            }
            Self::Json => {
                let _ = serde_json::to_writer(&mut *out, text);
            }
        }
    }
}

/// `2026-12-02T12:37:09.938260Z`: RFC 3339 in UTC with microseconds.
const TIMESTAMP_LEN: usize = 27;

/// Formats `since_epoch` as [`TIMESTAMP_LEN`] bytes of RFC 3339 UTC.
fn format_timestamp(since_epoch: Duration, out: &mut [u8; TIMESTAMP_LEN]) {
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let second_of_day = secs % 86_400;
    let mut put = |at: usize, value: u64, digits: u32| {
        let mut value = value;
        for i in (0..digits as usize).rev() {
            out[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, second_of_day / 3600, 2);
    put(14, second_of_day / 60 % 60, 2);
    put(17, second_of_day % 60, 2);
    put(20, since_epoch.subsec_micros().into(), 6);
    for (at, separator) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        out[at] = separator;
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Decimal digits of `value`.
fn push_u64(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut value = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Milliseconds with up to three decimals, as `f64`'s shortest form prints
/// them: `1.0`, `15.77`, `132.607`.
fn push_millis(out: &mut Vec<u8>, duration: Duration) {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    let fraction = micros % 1000;
    let digits = [
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ];
    // Trailing zeros go, but one digit always stays: `.5`, `.05`, `.0`.
    let keep = if fraction % 100 == 0 {
        2
    } else if fraction % 10 == 0 {
        3
    } else {
        4
    };
    out.extend_from_slice(&digits[..keep]);
}

/// True when `text` needs no escaping in a quoted Rust `Debug` or JSON string.
fn is_plain(text: &str) -> bool {
    text.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine<'static> {
        AccessLine {
            request_id: Some("kr-1"),
            method: "POST",
            path: "/v1/chat/completions",
            status: Some(200),
            token: Some("frontend"),
            ttfb: Some(Duration::from_micros(1_005)),
            duration: Duration::from_micros(132_600),
            bytes: 69,
            outcome: "ok",
            usage: Usage::default(),
            ttft: None,
            tokens_per_second: None,
            attempts: None,
            upstream: None,
        }
    }

    /// 2026-12-02T12:37:09.938260Z
    const NOW: Duration = Duration::new(1_796_215_029, 938_260_123);

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut out = [0u8; TIMESTAMP_LEN];
        format_timestamp(NOW, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).expect("ASCII"),
            "2026-12-02T12:37:09.938260Z"
        );
        format_timestamp(Duration::ZERO, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).expect("ASCII"),
            "1970-01-01T00:00:00.000000Z"
        );
        // A leap day, and the last second of a leap year.
        format_timestamp(Duration::from_secs(951_782_400), &mut out);
        assert_eq!(
            std::str::from_utf8(&out).expect("ASCII"),
            "2000-02-29T00:00:00.000000Z"
        );
        format_timestamp(Duration::from_secs(1_735_689_599), &mut out);
        assert_eq!(
            std::str::from_utf8(&out).expect("ASCII"),
            "2024-12-31T23:59:59.000000Z"
        );
    }

    #[test]
    fn civil_dates_match_a_day_by_day_count() {
        let mut date = (1970, 1, 1);
        let days_in = |year: u64, month: u64| match month {
            2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        for days in 0..200_000 {
            assert_eq!(civil_from_days(days), date, "day {days}");
            date.2 += 1;
            if date.2 > days_in(date.0, date.1) {
                date = if date.1 == 12 {
                    (date.0 + 1, 1, 1)
                } else {
                    (date.0, date.1 + 1, 1)
                };
            }
        }
    }

    #[test]
    fn millis_print_like_f64_shortest_form() {
        for micros in [
            0u64, 1, 5, 10, 100, 999, 1_000, 1_005, 15_770, 132_607, 9_000_001,
        ] {
            let mut out = Vec::new();
            push_millis(&mut out, Duration::from_micros(micros));
            let expected = format!("{:?}", micros as f64 / 1e3);
            assert_eq!(
                String::from_utf8(out).expect("UTF-8"),
                expected,
                "{micros} µs"
            );
        }
    }

    #[test]
    fn text_line_reads_like_tracing_fmt() {
        let mut out = Vec::new();
        line().write_text(&mut out, NOW, false);
        assert_eq!(
            String::from_utf8(out).expect("UTF-8"),
            "2026-12-02T12:37:09.938260Z  INFO keyrelay::access: request finished \
             request_id=\"kr-1\" method=POST path=\"/v1/chat/completions\" status=200 \
             token=\"frontend\" ttfb_ms=1.005 duration_ms=132.6 bytes=69 outcome=\"ok\""
        );
    }

    #[test]
    fn json_line_is_tracing_json_field_for_field() {
        let mut out = Vec::new();
        line().write_json(&mut out, NOW);
        let value: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(
            value,
            serde_json::json!({
                "timestamp": "2026-12-02T12:37:09.938260Z",
                "level": "INFO",
                "message": "request finished",
                "request_id": "kr-1",
                "method": "POST",
                "path": "/v1/chat/completions",
                "status": 200,
                "token": "frontend",
                "ttfb_ms": 1.005,
                "duration_ms": 132.6,
                "bytes": 69,
                "outcome": "ok",
                "target": "keyrelay::access",
            })
        );
    }

    #[test]
    fn token_usage_follows_the_outcome() {
        let tapped = AccessLine {
            usage: Usage {
                prompt: Some(12),
                completion: Some(30),
                cached: Some(8),
            },
            ttft: Some(Duration::from_micros(210_500)),
            tokens_per_second: Some(48.26),
            ..line()
        };
        let mut out = Vec::new();
        tapped.write_text(&mut out, NOW, false);
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(
            text.ends_with(
                " outcome=\"ok\" prompt_tokens=12 completion_tokens=30 cached_tokens=8 \
                 ttft_ms=210.5 tokens_per_s=48.3"
            ),
            "{text}"
        );
        let mut json = Vec::new();
        tapped.write_json(&mut json, NOW);
        let value: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(value["completion_tokens"], 30);
        assert_eq!(value["ttft_ms"], 210.5);
        assert_eq!(value["tokens_per_s"], 48.3);
    }

    #[test]
    fn retried_requests_name_their_attempts_and_the_route_that_answered() {
        let retried = AccessLine {
            attempts: Some(3),
            upstream: Some("backup"),
            ..line()
        };
        let mut out = Vec::new();
        retried.write_text(&mut out, NOW, false);
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(
            text.ends_with(" outcome=\"ok\" attempts=3 upstream=\"backup\""),
            "{text}"
        );
        let mut json = Vec::new();
        retried.write_json(&mut json, NOW);
        let value: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(value["attempts"], 3);
        assert_eq!(value["upstream"], "backup");
    }

    #[test]
    fn absent_fields_are_left_out_and_odd_text_is_escaped() {
        let odd = AccessLine {
            request_id: None,
            path: "/a\"b\\c\u{7f}",
            status: None,
            token: None,
            ttfb: None,
            ..line()
        };
        let mut json = Vec::new();
        odd.write_json(&mut json, NOW);
        let value: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(value["path"], "/a\"b\\c\u{7f}");
        for absent in ["request_id", "status", "token", "ttfb_ms"] {
            assert!(value.get(absent).is_none(), "{absent} in {value}");
        }
        let mut text = Vec::new();
        odd.write_text(&mut text, NOW, false);
        let text = String::from_utf8(text).expect("UTF-8");
        assert!(text.contains(r#"path="/a\"b\\c\u{7f}""#), "{text}");
        assert!(!text.contains("status="), "{text}");
    }

    #[test]
    fn ansi_styles_wrap_the_parts_tracing_styles() {
        let mut out = Vec::new();
        line().write_text(&mut out, NOW, true);
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(text.starts_with("\x1b[2m2026-12-02T12:37:09.938260Z\x1b[0m \x1b[32m INFO\x1b[0m "));
        assert!(
            text.contains("\x1b[3mstatus\x1b[0m\x1b[2m=\x1b[0m200"),
            "{text}"
        );
    }
}

//! OTLP's protobuf encoding of spans (`ExportTraceServiceRequest`), written
//! directly: keyrelay sends one message type of a fixed schema, so a
//! protobuf code generator (and `protoc` at build time) would cost more
//! than the 100 lines below. Field numbers are those of
//! `opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto`;
//! the tests decode the result with the official definitions.

use crate::telemetry::trace::span::{Attribute, Event, SpanData, Status, Value};

/// What every exported batch says about who sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// `service.name` first, then `OTEL_RESOURCE_ATTRIBUTES`.
    pub attributes: Vec<(String, String)>,
}

/// `ExportTraceServiceRequest { resource_spans = 1 }` holding `spans`.
pub fn export_request(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 512);
    message(&mut out, 1, |resource_spans| {
        // ResourceSpans { resource = 1, scope_spans = 2 }
        message(resource_spans, 1, |encoded| {
            key_values(encoded, 1, &resource.attributes);
        });
        message(resource_spans, 2, |scope_spans| {
            // ScopeSpans { scope = 1, spans = 2 }
            message(scope_spans, 1, |scope| {
                string(scope, 1, "keyrelay");
                string(scope, 2, env!("CARGO_PKG_VERSION"));
            });
            for span in spans {
                message(scope_spans, 2, |encoded| encode_span(encoded, span));
            }
        });
    });
    out
}

/// `Span`: ids 1, 2, trace_state 3, parent 4, name 5, kind 6 (SERVER = 2),
/// times 7 and 8 (fixed64), attributes 9, events 11, status 15, flags 16.
fn encode_span(out: &mut Vec<u8>, span: &SpanData) {
    bytes(out, 1, &span.trace_id.0);
    bytes(out, 2, &span.span_id.0);
    if let Some(state) = &span.trace_state {
        string(out, 3, state);
    }
    if let Some(parent) = &span.parent_span_id {
        bytes(out, 4, &parent.0);
    }
    string(out, 5, &span.name);
    varint_field(out, 6, 2);
    fixed64(out, 7, span.start_unix_nano);
    fixed64(out, 8, span.end_unix_nano);
    attributes(out, 9, &span.attributes);
    for event in &span.events {
        message(out, 11, |encoded| encode_event(encoded, event));
    }
    if let Status::Error(message_text) = &span.status {
        // Status { message = 2, code = 3 (ERROR = 2) }
        message(out, 15, |status| {
            string(status, 2, message_text);
            varint_field(status, 3, 2);
        });
    }
    tag(out, 16, WIRE_FIXED32);
    out.extend_from_slice(&span.flags.to_le_bytes());
}

/// `Event { time_unix_nano = 1 (fixed64), name = 2, attributes = 3 }`.
fn encode_event(out: &mut Vec<u8>, event: &Event) {
    fixed64(out, 1, event.time_unix_nano);
    string(out, 2, event.name);
    attributes(out, 3, &event.attributes);
}

/// Attributes, each a `KeyValue { key = 1, value = 2 (AnyValue { string
/// 1, int 3, double 4 }) }`. Their lengths are computed up front rather
/// than put in front afterwards (as [`message`] does): a span has a score
/// of them, and moving each one's bytes showed in the profile.
fn attributes(out: &mut Vec<u8>, field: u32, attributes: &[Attribute]) {
    for attribute in attributes {
        let any_length = match &attribute.value {
            Value::Text(text) => 1 + varint_len(text.len() as u64) + text.len(),
            Value::Static(text) => 1 + varint_len(text.len() as u64) + text.len(),
            Value::Int(number) => 1 + varint_len(*number as u64),
            Value::Float(_) => 9,
        };
        let key = attribute.key;
        let pair_length = 1
            + varint_len(key.len() as u64)
            + key.len()
            + 1
            + varint_len(any_length as u64)
            + any_length;
        tag(out, field, WIRE_LEN);
        varint(out, pair_length as u64);
        string(out, 1, key);
        tag(out, 2, WIRE_LEN);
        varint(out, any_length as u64);
        match &attribute.value {
            Value::Text(text) => string(out, 1, text),
            Value::Static(text) => string(out, 1, text),
            Value::Int(number) => varint_field(out, 3, *number as u64),
            Value::Float(number) => {
                tag(out, 4, WIRE_FIXED64);
                out.extend_from_slice(&number.to_le_bytes());
            }
        }
    }
}

/// Resource attributes: `KeyValue`s of strings.
fn key_values(out: &mut Vec<u8>, field: u32, pairs: &[(String, String)]) {
    for (key, value) in pairs {
        message(out, field, |pair| {
            string(pair, 1, key);
            message(pair, 2, |any| string(any, 1, value));
        });
    }
}

/// How many bytes `value` takes as a varint.
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

const WIRE_VARINT: u32 = 0;
const WIRE_FIXED64: u32 = 1;
const WIRE_LEN: u32 = 2;
const WIRE_FIXED32: u32 = 5;

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    tag(out, field, WIRE_VARINT);
    varint(out, value);
}

fn fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    tag(out, field, WIRE_FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    tag(out, field, WIRE_LEN);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn string(out: &mut Vec<u8>, field: u32, value: &str) {
    bytes(out, field, value.as_bytes());
}

/// A length-delimited sub-message: written in place, then its length
/// put in front (messages here are small; one move per message).
fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, WIRE_LEN);
    let start = out.len();
    body(out);
    let mut length = (out.len() - start) as u64;
    let mut prefix = [0u8; 10];
    let mut used = 0;
    loop {
        prefix[used] = length as u8 & 0x7f;
        length >>= 7;
        if length == 0 {
            used += 1;
            break;
        }
        prefix[used] |= 0x80;
        used += 1;
    }
    out.splice(start..start, prefix[..used].iter().copied());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, value);
            assert_eq!(varint_len(value), out.len(), "{value}");
        }
    }

    #[test]
    fn attributes_with_computed_lengths_equal_nested_messages() {
        let all = [
            Attribute::new("a", "text"),
            Attribute::new("b", 300_i64),
            Attribute::new("c", Value::Float(0.5)),
            Attribute::new("d", Value::Static("x")),
            Attribute::new("e", -1_i64),
        ];
        let mut computed = Vec::new();
        attributes(&mut computed, 9, &all);
        let mut nested = Vec::new();
        for attribute in &all {
            message(&mut nested, 9, |pair| {
                string(pair, 1, attribute.key);
                message(pair, 2, |any| match &attribute.value {
                    Value::Text(text) => string(any, 1, text),
                    Value::Static(text) => string(any, 1, text),
                    Value::Int(number) => varint_field(any, 3, *number as u64),
                    Value::Float(number) => {
                        tag(any, 4, WIRE_FIXED64);
                        any.extend_from_slice(&number.to_le_bytes());
                    }
                });
            });
        }
        assert_eq!(computed, nested);
    }

    #[test]
    fn nested_lengths_cover_what_follows_them() {
        let mut out = Vec::new();
        message(&mut out, 1, |inner| string(inner, 2, &"x".repeat(200)));
        // tag, two-byte length (203), then the inner tag, length 200, bytes.
        assert_eq!(&out[..3], &[0x0a, 0xcb, 0x01]);
        assert_eq!(out.len(), 3 + 203);
    }
}

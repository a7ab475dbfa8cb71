//! W3C Trace Context (`traceparent`): the ids a request's span takes from
//! its caller and hands on to the upstream.
//!
//! Parsed as the recommendation says: version `ff` and all-zero ids are
//! invalid, version `00` is exactly 55 characters, a later version may add
//! fields after a `-`, hex is lowercase. A header that breaks any rule is
//! treated as absent (a new trace starts), never repaired.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};

/// A trace's id: 16 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

/// A span's id: 8 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanId(pub [u8; 8]);

/// The sampled bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

/// What a valid `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
}

impl Parent {
    /// Parses a `traceparent` value; `None` if it breaks any rule.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let version = hex_byte(value.get(0..2)?)?;
        let valid_length = match version {
            0xff => return None,
            0x00 => value.len() == 55,
            // A later version: the fields known here, then more after a dash.
            _ => value.len() == 55 || (value.len() > 55 && value[55] == b'-'),
        };
        if !valid_length || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, byte) in span_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            flags,
        })
    }

    /// True if the caller recorded its span.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// The `traceparent` value naming `span_id` of `trace_id` as the parent.
pub fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> String {
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    push_hex(&mut value, &trace_id.0);
    value.push('-');
    push_hex(&mut value, &span_id.0);
    value.push_str(if sampled { "-01" } else { "-00" });
    value
}

/// Lowercase hex of `bytes`, appended to `out` (by table: this runs for
/// every traced request, where `write!` costs ten times as much).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

/// Two lowercase hex digits as a byte.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            _ => None,
        }
    }
    match digits {
        [high, low] => Some(nibble(*high)? << 4 | nibble(*low)?),
        _ => None,
    }
}

thread_local! {
    /// Per-thread generator state, seeded from the OS's randomness (what
    /// `RandomState` keys are made of): ids need to be unique and
    /// unpredictable enough to sample on, not secret.
    static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(std::time::SystemTime::now()));
}

/// The next 64 random bits (SplitMix64).
fn next_u64() -> u64 {
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

impl TraceId {
    /// A new random trace id.
    pub fn random() -> Self {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&next_u64().to_be_bytes());
        id[8..].copy_from_slice(&next_u64().to_be_bytes());
        if id == [0; 16] {
            id[15] = 1;
        }
        Self(id)
    }
}

impl SpanId {
    /// A new random span id.
    pub fn random() -> Self {
        Self(next_u64().max(1).to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_recommendations_example() {
        let parent = Parent::parse(VALID.as_bytes()).expect("valid");
        assert!(parent.sampled());
        assert_eq!(
            parent.span_id.0,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(traceparent(parent.trace_id, parent.span_id, true), VALID);
    }

    #[test]
    fn refuses_what_the_recommendation_forbids() {
        let broken = [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for value in broken {
            assert_eq!(Parent::parse(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn accepts_a_later_version_with_more_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes";
        let parent = Parent::parse(later.as_bytes()).expect("valid");
        assert!(!parent.sampled());
    }

    #[test]
    fn random_ids_differ_and_are_never_zero() {
        let (a, b) = (TraceId::random(), TraceId::random());
        assert_ne!(a, b);
        assert_ne!(a.0, [0; 16]);
        assert_ne!(SpanId::random().0, [0; 8]);
    }
}

//! Request ids and the `Server-Timing` value: the two header values keyrelay
//! writes on every request.
//!
//! Both are formatted on the stack by [`ShortValue`] rather than with
//! `format!`: they run per request, and `fmt` showed up in the profiles
//! (`bench/instructions.sh`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// Baseten's id for a prediction, preferred in logs when the upstream sends it.
pub(crate) const BASETEN_REQUEST_ID: HeaderName = HeaderName::from_static("x-baseten-request-id");

/// The request id keyrelay sends upstream and back when Baseten's is absent.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Tells developers (browser devtools, curl -v) how long keyrelay itself took.
pub(crate) const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Numbers requests and names them `kr-<process prefix>-<number>`.
///
/// Each serving thread has its own counter, so numbering costs no shared
/// cache line: thread `i` of `n` hands out `i + 1`, `i + 1 + n`, ..., and
/// numbers stay unique across the process.
pub(crate) struct RequestIds {
    /// Random per process, so ids from different keyrelays do not collide.
    prefix: String,
    next: AtomicU64,
    step: u64,
}

impl RequestIds {
    /// The numbering of serving thread `index` of `workers`, with a new prefix.
    pub(crate) fn new(index: usize, workers: usize) -> Self {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Self::numbering(format!("{:08x}", random as u32), index, workers)
    }

    /// The numbering of another serving thread, with this one's prefix.
    pub(crate) fn for_worker(&self, index: usize, workers: usize) -> Self {
        Self::numbering(self.prefix.clone(), index, workers)
    }

    fn numbering(prefix: String, index: usize, workers: usize) -> Self {
        Self {
            prefix,
            next: AtomicU64::new(index as u64 + 1),
            step: workers.max(1) as u64,
        }
    }

    /// The next request's number (for logs and spans).
    pub(crate) fn next(&self) -> u64 {
        self.next.fetch_add(self.step, Ordering::Relaxed)
    }

    /// The client's `X-Request-Id`, or a new one made from `number` and set
    /// on the request so the upstream sees the same id.
    pub(crate) fn assign(&self, headers: &mut HeaderMap, number: u64) -> HeaderValue {
        if let Some(existing) = headers.get(X_REQUEST_ID) {
            return detached(existing);
        }
        let generated = ShortValue::default()
            .text("kr-")
            .text(&self.prefix)
            .text("-")
            .decimal(number)
            .finish();
        headers.insert(X_REQUEST_ID, generated.clone());
        generated
    }
}

/// A copy of a peer's header value that the access record keeps for a
/// whole stream: hyper parses values as slices of the connection's read
/// buffer, and holding one keeps that buffer (8 KiB) allocated beside the
/// one hyper takes for its next read (issue 29).
pub(crate) fn detached(value: &HeaderValue) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(value.as_bytes()))
        .unwrap_or_else(|_| value.clone())
}

/// The `Server-Timing` value for keyrelay's own share of a request.
pub(crate) fn server_timing(overhead: Duration) -> HeaderValue {
    let micros = overhead.as_micros().min(u128::from(u64::MAX)) as u64;
    let fraction = micros % 1000;
    let mut value = ShortValue::default();
    value
        .text("keyrelay;desc=\"proxy overhead\";dur=")
        .decimal(micros / 1000)
        .text(".")
        .decimal_padded(fraction, 3);
    value.finish()
}

/// Writes a short header value on the stack, so it costs one allocation and
/// no `fmt` machinery.
struct ShortValue {
    bytes: [u8; 64],
    len: usize,
}

impl Default for ShortValue {
    fn default() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }
}

impl ShortValue {
    fn text(&mut self, text: &str) -> &mut Self {
        for &byte in text.as_bytes() {
            self.push(byte);
        }
        self
    }

    fn decimal(&mut self, number: u64) -> &mut Self {
        let digits = number.checked_ilog10().unwrap_or(0) + 1;
        self.decimal_padded(number, digits)
    }

    /// `number` in exactly `digits` digits, zero-padded on the left.
    fn decimal_padded(&mut self, number: u64, digits: u32) -> &mut Self {
        for place in (0..digits).rev() {
            let digit = (number / 10u64.pow(place)) % 10;
            self.push(b'0' + digit as u8);
        }
        self
    }

    /// Values here are far shorter than the buffer; a longer one is cut.
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn finish(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.bytes[..self.len])
            .unwrap_or_else(|_| HeaderValue::from_static("keyrelay"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{server_timing, ShortValue};

    #[test]
    fn short_values_write_decimals_without_fmt() {
        let mut value = ShortValue::default();
        value.text("kr-").decimal(0).text("-").decimal(1_234_567);
        assert_eq!(value.finish(), "kr-0-1234567");

        let mut value = ShortValue::default();
        value.decimal(u64::MAX).text(" ").decimal_padded(7, 3);
        assert_eq!(value.finish(), "18446744073709551615 007");
    }

    #[test]
    fn short_values_are_cut_at_the_buffer() {
        let mut value = ShortValue::default();
        value.text(&"x".repeat(100));
        assert_eq!(value.finish().len(), 64);
    }

    #[test]
    fn server_timing_is_milliseconds_with_three_decimals() {
        assert_eq!(
            server_timing(Duration::from_micros(1_234)),
            "keyrelay;desc=\"proxy overhead\";dur=1.234"
        );
        assert_eq!(
            server_timing(Duration::from_nanos(5_999)),
            "keyrelay;desc=\"proxy overhead\";dur=0.005"
        );
    }
}

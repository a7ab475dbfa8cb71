//! HTTP/2 frames by hand, for inputs that hyper's own client would never
//! send: a HEADERS + RST_STREAM flood, more streams than the peer allows,
//! malformed header blocks. HPACK is written without the dynamic table or
//! Huffman coding, so no encoder state is needed; responses are read as far
//! as the tests need (frame type, stream, error code, `:status`).

use std::net::SocketAddr;

use crate::support::raw::RawConn;

pub(crate) const FRAME_HEADERS: u8 = 0x1;
pub(crate) const FRAME_RST_STREAM: u8 = 0x3;
pub(crate) const FRAME_SETTINGS: u8 = 0x4;
pub(crate) const FRAME_PING: u8 = 0x6;
pub(crate) const FRAME_GOAWAY: u8 = 0x7;
pub(crate) const FLAG_END_STREAM: u8 = 0x1;
pub(crate) const FLAG_END_HEADERS: u8 = 0x4;
pub(crate) const FLAG_ACK: u8 = 0x1;
pub(crate) const CANCEL: u32 = 0x8;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame size");
    let mut bytes = len.to_be_bytes()[1..].to_vec();
    bytes.push(kind);
    bytes.push(flags);
    bytes.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
pub(crate) fn hpack_int(first: u8, n: u32, mut value: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A HEADERS frame; every field a literal without indexing (no Huffman), so
/// the test needs no HPACK encoder state.
pub(crate) fn headers_frame(stream: u32, fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_int(0, 7, name.len(), &mut block);
        block.extend_from_slice(name.as_bytes());
        hpack_int(0, 7, value.len(), &mut block);
        block.extend_from_slice(value.as_bytes());
    }
    let flags = FLAG_END_HEADERS | if end_stream { FLAG_END_STREAM } else { 0 };
    frame(FRAME_HEADERS, flags, stream, &block)
}

pub(crate) fn get_fields(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".to_owned()),
        (":scheme", "http".to_owned()),
        (":authority", "127.0.0.1".to_owned()),
        (":path", path.to_owned()),
    ]
}

pub(crate) fn get_frame(stream: u32, path: &str) -> Vec<u8> {
    let fields = get_fields(path);
    let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    headers_frame(stream, &fields, true)
}

pub(crate) fn rst_frame(stream: u32, code: u32) -> Vec<u8> {
    frame(FRAME_RST_STREAM, 0, stream, &code.to_be_bytes())
}

#[derive(Debug)]
pub(crate) struct H2Frame {
    pub kind: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl H2Frame {
    pub(crate) fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            FRAME_RST_STREAM => 0,
            FRAME_GOAWAY => 4,
            _ => return None,
        };
        self.payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The `:status` of a response HEADERS frame when HPACK indexed it from
    /// the static table (hyper does for 200, 204, 206, 304, 400, 404, 500).
    pub(crate) fn indexed_status(&self) -> Option<u16> {
        match self.payload.first()? {
            0x88 => Some(200),
            0x89 => Some(204),
            0x8a => Some(206),
            0x8b => Some(304),
            0x8c => Some(400),
            0x8d => Some(404),
            0x8e => Some(500),
            _ => None,
        }
    }

    /// The status of a response head: indexed, or a literal `:status` (name index 8).
    pub(crate) fn status(&self) -> Option<u16> {
        if let Some(status) = self.indexed_status() {
            return Some(status);
        }
        // Literal with indexed name 8 (`:status`): 0x08 / 0x48 / 0x18, then
        // the three digits, plain or Huffman-coded.
        let payload = &self.payload;
        if payload.len() < 3 || payload[0] & 0x0f != 0x08 {
            return None;
        }
        let len = usize::from(payload[1] & 0x7f);
        let value = payload.get(2..2 + len)?;
        if payload[1] & 0x80 == 0 {
            return std::str::from_utf8(value).ok()?.parse().ok();
        }
        huffman_digits(value)?.parse().ok()
    }
}

/// Decodes an HPACK Huffman string made only of digits (RFC 7541 appendix B:
/// `0`-`2` are 5-bit codes 00000-00010, `3`-`9` 6-bit codes 011001-011111).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|byte| (0..8).rev().map(move |i| (byte >> i) & 1))
        .collect();
    let code = |at: usize, n: usize| -> Option<u8> {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0u8, |acc, bit| acc << 1 | bit))
    };
    let mut text = String::new();
    let mut at = 0;
    // Bounded: every iteration consumes 5 or 6 bits; the rest is EOS padding (all ones).
    while bits.len() - at >= 5 {
        match code(at, 5)? {
            five @ 0..=2 => {
                text.push(char::from(b'0' + five));
                at += 5;
            }
            _ => match code(at, 6) {
                Some(six @ 0b011001..=0b011111) => {
                    text.push(char::from(b'3' + (six - 0b011001)));
                    at += 6;
                }
                _ => break,
            },
        }
    }
    Some(text)
}

/// A raw HTTP/2 prior-knowledge connection.
pub(crate) struct H2Conn {
    conn: RawConn,
}

impl H2Conn {
    /// Connects, sends the preface and empty SETTINGS, and acknowledges the server's.
    pub(crate) async fn open(addr: SocketAddr) -> Self {
        Self::open_split(addr, None).await
    }

    /// [`H2Conn::open`], the preface sent in two writes when `split` is
    /// given: its first `split` bytes, a pause, then the rest, so the server
    /// first sees only part of it.
    pub(crate) async fn open_split(addr: SocketAddr, split: Option<usize>) -> Self {
        let mut conn = Self {
            conn: RawConn::connect(addr).await,
        };
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&frame(FRAME_SETTINGS, 0, 0, &[]));
        if let Some(split) = split {
            conn.send(&hello[..split]).await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            conn.send(&hello[split..]).await;
        } else {
            conn.send(&hello).await;
        }
        let settings = conn.next_frame().await.expect("server SETTINGS");
        assert_eq!(settings.kind, FRAME_SETTINGS, "{settings:?}");
        conn.send(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])).await;
        conn
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.conn.send(bytes).await;
    }

    /// Sends without failing when keyrelay already closed the connection.
    pub(crate) async fn send_lossy(&mut self, bytes: &[u8]) -> bool {
        self.conn.try_send(bytes).await.is_ok()
    }

    /// The next frame, or `None` when the connection ended (EOF or reset).
    pub(crate) async fn next_frame(&mut self) -> Option<H2Frame> {
        let head = self.conn.exact_or_end(9).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let payload = self.conn.exact_or_end(len).await?;
        Some(H2Frame {
            kind: head[3],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }

    /// The statuses of two streams' responses (`None` for a reset), in any order.
    pub(crate) async fn two_statuses(&mut self, a: u32, b: u32) -> (Option<u16>, Option<u16>) {
        let mut statuses = [None, None];
        let mut done = [false, false];
        // Bounded: next_frame reads with a timeout, and the connection ending stops it.
        while done != [true, true] {
            let Some(frame) = self.next_frame().await else {
                break;
            };
            let slot = if frame.stream == a {
                0
            } else if frame.stream == b {
                1
            } else {
                continue;
            };
            match frame.kind {
                FRAME_HEADERS if !done[slot] => {
                    statuses[slot] = frame.status();
                    done[slot] = true;
                }
                FRAME_RST_STREAM => done[slot] = true,
                _ => {}
            }
        }
        (statuses[0], statuses[1])
    }

    /// Reads frames until the response HEADERS (its status) or a reset of
    /// `stream` (`None`); other streams' frames are skipped.
    pub(crate) async fn response_status(&mut self, stream: u32) -> Option<u16> {
        // Bounded: next_frame reads with a timeout, and the connection ending stops it.
        while let Some(frame) = self.next_frame().await {
            if frame.stream != stream {
                continue;
            }
            match frame.kind {
                FRAME_HEADERS => return frame.status(),
                FRAME_RST_STREAM => return None,
                _ => {}
            }
        }
        None
    }
}

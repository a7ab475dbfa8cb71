//! Raw TCP on both sides of keyrelay: a byte-level HTTP/1.1 client and an
//! upstream the test scripts connection by connection.
//!
//! hyper's own client and server normalise, validate and frame for us, which
//! is exactly what some tests must avoid: sending a request target byte for
//! byte, an absolute-form or CONNECT request, or an upstream that breaks the
//! protocol (garbage, early close, a chunked body with no terminator).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::within;

/// One HTTP/1.1 connection read through a buffer, usable as client or server.
pub(crate) struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Each read is bounded by [`STEP`](crate::support::STEP) (a timeout
    /// panics); false for a server loop, which waits as long as its peer
    /// keeps an idle connection open.
    timed: bool,
}

/// A response (or request) head split into its start line and headers.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub start_line: String,
    /// Header names lowercased, values as sent, in order, repeats kept.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub(crate) fn parse(text: &str) -> Self {
        let mut lines = text.split("\r\n");
        let start_line = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        Self {
            start_line,
            headers,
        }
    }

    /// The first value of header `name` (lowercase).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The status code of a response head, `None` if the start line has none.
    pub(crate) fn status_code(&self) -> Option<u16> {
        self.start_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
    }

    /// The status code of a response head.
    pub(crate) fn status(&self) -> u16 {
        self.status_code()
            .unwrap_or_else(|| panic!("not a status line: {:?}", self.start_line))
    }

    /// The request target of a request head, as sent.
    pub(crate) fn target(&self) -> &str {
        self.start_line
            .split(' ')
            .nth(1)
            .unwrap_or_else(|| panic!("not a request line: {:?}", self.start_line))
    }
}

/// A whole response as a raw client saw it.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub head: Head,
    /// The body after de-chunking.
    pub body: Vec<u8>,
    /// Every byte received for this response, head and framing included.
    pub raw: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn status(&self) -> u16 {
        self.head.status()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub(crate) fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {:?}", self.body_text()))
    }

    /// "400 empty body", "403 keyrelay JSON host_not_allowed", "200 body \"ok\"".
    pub(crate) fn describe(&self) -> String {
        let kind = if self.body.is_empty() {
            "empty body".to_owned()
        } else if self.header("content-type") == Some("application/json") {
            let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
            format!(
                "keyrelay JSON {}",
                json["type"].as_str().unwrap_or("(no type)")
            )
        } else {
            format!("body {:?}", self.body_text())
        };
        format!("{} {kind}", self.status())
    }
}

/// How a connection ended when read to its end.
#[derive(Debug)]
pub(crate) struct Ending {
    /// Everything received until the end.
    pub bytes: Vec<u8>,
    /// `None` for an orderly EOF, the error for a reset.
    pub error: Option<std::io::Error>,
}

impl RawConn {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            timed: true,
        }
    }

    /// A connection whose reads wait without a bound: the server side of a
    /// peer that may keep it open and idle for as long as it likes.
    pub(crate) fn untimed(stream: TcpStream) -> Self {
        Self {
            timed: false,
            ..Self::new(stream)
        }
    }

    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let stream = within("a raw TCP connection", TcpStream::connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self::new(stream)
    }

    pub(crate) async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.try_send(bytes).await.expect("raw write");
    }

    /// Writes `bytes`, returning the error instead of panicking (the peer may
    /// answer and close while this side is still sending).
    pub(crate) async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        within("a raw write", self.stream.write_all(bytes.as_ref())).await
    }

    /// Reads more into the buffer; returns how many bytes came (0 at EOF).
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let read = self.stream.read(&mut chunk);
        let n = if self.timed {
            within("bytes on a raw connection", read).await?
        } else {
            read.await?
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads until `ready` finds a whole item at the front of the buffer (it
    /// returns the item's length) and takes it; `Err` says how the connection
    /// ended first ("EOF" or the read error).
    async fn take_when(
        &mut self,
        ready: impl Fn(&[u8]) -> Option<usize>,
    ) -> Result<Vec<u8>, String> {
        // Bounded: every iteration reads bytes or ends.
        loop {
            if let Some(n) = ready(&self.buf) {
                return Ok(self.take(n));
            }
            match self.fill().await {
                Ok(0) => return Err("EOF".to_owned()),
                Ok(_) => {}
                Err(err) => return Err(err.to_string()),
            }
        }
    }

    /// [`take_when`](Self::take_when) for tests: the connection ending first panics.
    async fn take_or_panic(
        &mut self,
        what: &str,
        ready: impl Fn(&[u8]) -> Option<usize>,
    ) -> Vec<u8> {
        match self.take_when(ready).await {
            Ok(item) => item,
            Err(end) => panic!(
                "connection ended ({end}) while reading {what}; got {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Takes `n` bytes from the front of the buffer.
    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buf.drain(..n).collect()
    }

    /// A head (up to and including the blank line), or `None` if the
    /// connection ends first.
    pub(crate) async fn head_or_end(&mut self) -> Option<Vec<u8>> {
        self.take_when(head_length).await.ok()
    }

    /// One line without its CRLF, or `None` if the connection ends first.
    pub(crate) async fn line_or_end(&mut self) -> Option<Vec<u8>> {
        let mut line = self.take_when(line_length).await.ok()?;
        line.truncate(line.len() - 2);
        Some(line)
    }

    /// Exactly `n` bytes, or `None` if the connection ends first.
    pub(crate) async fn exact_or_end(&mut self, n: usize) -> Option<Vec<u8>> {
        self.take_when(|buf| (buf.len() >= n).then_some(n))
            .await
            .ok()
    }

    /// Reads a head (up to and including the blank line) and returns it raw.
    pub(crate) async fn read_head_raw(&mut self) -> Vec<u8> {
        self.take_or_panic("a message head", head_length).await
    }

    /// Reads and parses a head.
    pub(crate) async fn read_head(&mut self) -> Head {
        let raw = self.read_head_raw().await;
        Head::parse(&String::from_utf8_lossy(&raw))
    }

    /// Reads exactly `n` more bytes.
    pub(crate) async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        self.take_or_panic("a fixed-length body", |buf| (buf.len() >= n).then_some(n))
            .await
    }

    /// Reads one line including its CRLF.
    async fn read_line(&mut self) -> Vec<u8> {
        self.take_or_panic("a chunk line", line_length).await
    }

    /// Reads a chunked body to its terminating chunk; returns (decoded, raw).
    pub(crate) async fn read_chunked(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut body = Vec::new();
        let mut raw = Vec::new();
        // Bounded: each iteration consumes at least one chunk line.
        for _ in 0..100_000 {
            let line = self.read_line().await;
            raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let size_text = text.trim_end().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_text, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {text:?}"));
            if size == 0 {
                // Trailers, if any, then the final blank line.
                loop {
                    let line = self.read_line().await;
                    raw.extend_from_slice(&line);
                    if line == b"\r\n" {
                        return (body, raw);
                    }
                }
            }
            let data = self.read_exact(size + 2).await;
            raw.extend_from_slice(&data);
            body.extend_from_slice(&data[..size]);
        }
        panic!("chunked body did not end within 100000 chunks");
    }

    /// Reads one response, framed by Content-Length, chunking, or EOF.
    ///
    /// `head_request` says the response carries no body whatever its headers say.
    pub(crate) async fn read_response_to(&mut self, head_request: bool) -> RawResponse {
        let head_raw = self.read_head_raw().await;
        let head = Head::parse(&String::from_utf8_lossy(&head_raw));
        let mut raw = head_raw;
        let status = head.status();
        let body = if head_request || status == 204 || status == 304 || status < 200 {
            Vec::new()
        } else if head
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            let (body, framing) = self.read_chunked().await;
            raw.extend_from_slice(&framing);
            body
        } else if let Some(length) = head.header("content-length") {
            let length: usize = length.parse().expect("numeric content-length");
            let body = self.read_exact(length).await;
            raw.extend_from_slice(&body);
            body
        } else {
            let ending = self.read_to_end().await;
            if let Some(err) = ending.error {
                panic!("connection reset while reading a close-delimited body: {err}");
            }
            raw.extend_from_slice(&ending.bytes);
            ending.bytes
        };
        RawResponse { head, body, raw }
    }

    pub(crate) async fn read_response(&mut self) -> RawResponse {
        self.read_response_to(false).await
    }

    /// Reads until the peer closes (orderly or by reset), bounded by `within`.
    pub(crate) async fn read_to_end(&mut self) -> Ending {
        // Bounded: every iteration either reads bytes or ends; `within` bounds each read.
        loop {
            match self.fill().await {
                Ok(0) => {
                    return Ending {
                        bytes: std::mem::take(&mut self.buf),
                        error: None,
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    return Ending {
                        bytes: std::mem::take(&mut self.buf),
                        error: Some(err),
                    }
                }
            }
        }
    }
}

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The length of the head at the front of `buf` (through the blank line), if whole.
fn head_length(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n\r\n").map(|at| at + 4)
}

/// The length of the line at the front of `buf` (through its CRLF), if whole.
fn line_length(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n").map(|at| at + 2)
}

/// Sends `request` on a fresh connection and reads one response.
pub(crate) async fn exchange(addr: SocketAddr, request: &str) -> RawResponse {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    conn.read_response().await
}

/// A plain GET for `path` on a fresh connection.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> RawResponse {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// An upstream on 127.0.0.1:0 that hands each accepted connection to the test.
pub(crate) struct RawUpstream {
    pub addr: SocketAddr,
    connections: mpsc::UnboundedReceiver<RawConn>,
}

impl RawUpstream {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("addr");
        let (tx, connections) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).expect("nodelay");
                if tx.send(RawConn::new(stream)).is_err() {
                    return;
                }
            }
        });
        Self { addr, connections }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for keyrelay to open the next connection.
    pub(crate) async fn next_conn(&mut self) -> RawConn {
        within("a connection at the raw upstream", self.connections.recv())
            .await
            .expect("raw upstream stopped")
    }

    /// True if no connection is waiting (without waiting).
    pub(crate) fn no_connection_pending(&mut self) -> bool {
        self.connections.try_recv().is_err()
    }
}

/// Reads one request head on `conn` and answers it with a small 200.
pub(crate) async fn serve_ok(conn: &mut RawConn, body: &str) -> Head {
    let head = conn.read_head().await;
    conn.send(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    head
}

/// Everything a raw client got back for one (hostile) input, until keyrelay
/// ended the connection.
#[derive(Debug)]
pub(crate) struct ClientSaw {
    pub bytes: Vec<u8>,
    /// How the connection ended: "closed", "reset (KIND)", with the write
    /// error after it if the request could not be written whole.
    pub ending: String,
}

impl ClientSaw {
    /// Every response in the bytes, in order, framed by Content-Length or
    /// chunking; a truncated last one is kept as far as it goes.
    pub(crate) fn answers(&self) -> Vec<RawResponse> {
        let mut answers = Vec::new();
        let mut rest: &[u8] = &self.bytes;
        // Bounded: each iteration consumes a response or stops.
        while let Some(head_end) = head_length(rest) {
            let start = rest;
            let head = Head::parse(&String::from_utf8_lossy(&rest[..head_end - 4]));
            if head.status_code().is_none() {
                break;
            }
            rest = &rest[head_end..];
            let mut body = Vec::new();
            if let Some(length) = head
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
            {
                let length = length.min(rest.len());
                body = rest[..length].to_vec();
                rest = &rest[length..];
            } else if head.header("transfer-encoding").is_some() {
                // Chunked: decode until the last chunk.
                loop {
                    let Some(line_end) = find(rest, b"\r\n") else {
                        rest = &[];
                        break;
                    };
                    let size = usize::from_str_radix(
                        String::from_utf8_lossy(&rest[..line_end])
                            .split(';')
                            .next()
                            .unwrap_or_default()
                            .trim(),
                        16,
                    )
                    .unwrap_or(0);
                    rest = &rest[line_end + 2..];
                    if size == 0 {
                        rest = &rest[line_length(rest).unwrap_or(rest.len())..];
                        break;
                    }
                    let take = (size + 2).min(rest.len());
                    body.extend_from_slice(&rest[..size.min(rest.len())]);
                    rest = &rest[take..];
                }
            }
            let raw = start[..start.len() - rest.len()].to_vec();
            answers.push(RawResponse { head, body, raw });
        }
        answers
    }

    /// "400 empty body; then closed".
    pub(crate) fn describe(&self) -> String {
        let mut parts: Vec<String> = self.answers().iter().map(RawResponse::describe).collect();
        if parts.is_empty() {
            parts.push("no response".to_owned());
        }
        format!("{}; then {}", parts.join(", then "), self.ending)
    }
}

/// Sends `request` on a fresh connection and reads until keyrelay ends it.
///
/// A write error is tolerated (keyrelay may answer and close while the client
/// is still sending, e.g. an oversized head); each read is bounded by `STEP`.
pub(crate) async fn probe(addr: SocketAddr, request: &[u8]) -> ClientSaw {
    probe_with(addr, request, false).await
}

/// [`probe`], optionally shutting down the sending side after the request.
pub(crate) async fn probe_with(addr: SocketAddr, request: &[u8], half_close: bool) -> ClientSaw {
    let mut conn = RawConn::connect(addr).await;
    let write_error = conn
        .try_send(request)
        .await
        .err()
        .map(|err| format!("write failed ({:?})", err.kind()));
    if half_close {
        let _ = conn.stream.shutdown().await;
    }
    let end = conn.read_to_end().await;
    let ending = match end.error {
        None => "closed".to_owned(),
        Some(err) => format!("reset ({:?})", err.kind()),
    };
    let ending = match write_error {
        Some(write) => format!("{ending} ({write})"),
        None => ending,
    };
    ClientSaw {
        bytes: end.bytes,
        ending,
    }
}

/// Asserts `response` is keyrelay's own JSON error with `status` and `kind`.
pub(crate) fn assert_keyrelay_error(response: &RawResponse, status: u16, kind: &str) {
    assert_eq!(
        response.status(),
        status,
        "expected {status} {kind}; got {:?} {:?}",
        response.head,
        response.body_text()
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{:?}",
        response.head
    );
    let json = response.json();
    assert_eq!(json["type"], kind, "{json}");
    assert_eq!(json["source"], "keyrelay", "{json}");
}

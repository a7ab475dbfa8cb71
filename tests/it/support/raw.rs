//! Raw TCP on both sides of keyrelay: a byte-level HTTP/1.1 client and an
//! upstream the test scripts connection by connection.
//!
//! hyper's own client and server normalise, validate and frame for us, which
//! is exactly what some tests must avoid: sending a request target byte for
//! byte, an absolute-form or CONNECT request, or an upstream that breaks the
//! protocol (garbage, early close, a chunked body with no terminator).
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::within;

/// One HTTP/1.1 connection read through a buffer, usable as client or server.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A response (or request) head split into its start line and headers.
#[derive(Debug, Clone)]
pub struct Head {
    pub start_line: String,
    /// Header names lowercased, values as sent, in order, repeats kept.
    pub headers: Vec<(String, String)>,
}

impl Head {
    fn parse(text: &str) -> Self {
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
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The status code of a response head.
    pub fn status(&self) -> u16 {
        self.start_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {:?}", self.start_line))
    }

    /// The request target of a request head, as sent.
    pub fn target(&self) -> &str {
        self.start_line
            .split(' ')
            .nth(1)
            .unwrap_or_else(|| panic!("not a request line: {:?}", self.start_line))
    }
}

/// A whole response as a raw client saw it.
#[derive(Debug)]
pub struct RawResponse {
    pub head: Head,
    /// The body after de-chunking.
    pub body: Vec<u8>,
    /// Every byte received for this response, head and framing included.
    pub raw: Vec<u8>,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        self.head.status()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {:?}", self.body_text()))
    }
}

/// How a connection ended when read to its end.
#[derive(Debug)]
pub struct Ending {
    /// Everything received until the end.
    pub bytes: Vec<u8>,
    /// `None` for an orderly EOF, the error for a reset.
    pub error: Option<std::io::Error>,
}

impl RawConn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within("a raw TCP connection", TcpStream::connect(addr))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self::new(stream)
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("a raw write", self.stream.write_all(bytes.as_ref()))
            .await
            .expect("raw write");
    }

    /// Reads more into the buffer; returns how many bytes came (0 at EOF).
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = within("bytes on a raw connection", self.stream.read(&mut chunk)).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn fill_or_panic(&mut self, what: &str) {
        let n = self
            .fill()
            .await
            .unwrap_or_else(|err| panic!("reading {what}: {err}"));
        assert!(
            n > 0,
            "connection closed while reading {what}; got {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// Takes `n` bytes from the front of the buffer.
    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buf.drain(..n).collect()
    }

    /// Reads a head (up to and including the blank line) and returns it raw.
    pub async fn read_head_raw(&mut self) -> Vec<u8> {
        let mut scanned: usize = 0;
        loop {
            if let Some(pos) = find(&self.buf[scanned.saturating_sub(3)..], b"\r\n\r\n") {
                let end = scanned.saturating_sub(3) + pos + 4;
                return self.take(end);
            }
            scanned = self.buf.len();
            self.fill_or_panic("a message head").await;
        }
    }

    /// Reads and parses a head.
    pub async fn read_head(&mut self) -> Head {
        let raw = self.read_head_raw().await;
        Head::parse(&String::from_utf8_lossy(&raw))
    }

    /// Reads exactly `n` more bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill_or_panic("a fixed-length body").await;
        }
        self.take(n)
    }

    /// Reads one line including its CRLF.
    async fn read_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                return self.take(pos + 2);
            }
            self.fill_or_panic("a chunk line").await;
        }
    }

    /// Reads a chunked body to its terminating chunk; returns (decoded, raw).
    pub async fn read_chunked(&mut self) -> (Vec<u8>, Vec<u8>) {
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
    pub async fn read_response_to(&mut self, head_request: bool) -> RawResponse {
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

    pub async fn read_response(&mut self) -> RawResponse {
        self.read_response_to(false).await
    }

    /// Reads until the peer closes (orderly or by reset), bounded by `within`.
    pub async fn read_to_end(&mut self) -> Ending {
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Sends `request` on a fresh connection and reads one response.
pub async fn exchange(addr: SocketAddr, request: &str) -> RawResponse {
    let mut conn = RawConn::connect(addr).await;
    conn.send(request).await;
    conn.read_response().await
}

/// A plain GET for `path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> RawResponse {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// An upstream on 127.0.0.1:0 that hands each accepted connection to the test.
pub struct RawUpstream {
    pub addr: SocketAddr,
    connections: mpsc::UnboundedReceiver<RawConn>,
}

impl RawUpstream {
    pub async fn start() -> Self {
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

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for keyrelay to open the next connection.
    pub async fn next_conn(&mut self) -> RawConn {
        within("a connection at the raw upstream", self.connections.recv())
            .await
            .expect("raw upstream stopped")
    }

    /// True if no connection is waiting (without waiting).
    pub fn no_connection_pending(&mut self) -> bool {
        self.connections.try_recv().is_err()
    }
}

/// Reads one request head on `conn` and answers it with a small 200.
pub async fn serve_ok(conn: &mut RawConn, body: &str) -> Head {
    let head = conn.read_head().await;
    conn.send(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    head
}

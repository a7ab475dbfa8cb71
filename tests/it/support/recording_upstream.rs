//! The recording upstream: a raw HTTP/1.1 server that parses what keyrelay
//! sends strictly and counts connections, complete requests, aborted requests
//! and framing violations (a message with both `Content-Length` and
//! `Transfer-Encoding`, a coding other than chunked, a malformed chunk). The
//! hostile-input tests check against it that nothing a client smuggles, and
//! nothing ambiguous, ever reaches an upstream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::raw::{probe, RawConn};
use crate::support::reliability::escape;
use crate::support::within;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub(crate) struct SeenRequest {
    pub method: String,
    pub target: String,
    /// Names lowercased, values as sent, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// `chunked`, `length N` or `none`.
    pub framing: String,
    /// Trailer lines of a chunked body, raw.
    pub trailers: Vec<u8>,
    /// False when the connection ended (or broke the framing) before the body did.
    pub complete: bool,
}

impl SeenRequest {
    pub(crate) fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub connections: usize,
    pub requests: Vec<SeenRequest>,
    /// Anything keyrelay sent that a strict HTTP/1.1 parser would not accept.
    pub violations: Vec<String>,
    /// Requests being answered right now, and the most there ever were at once.
    pub in_flight: usize,
    pub peak_in_flight: usize,
}

/// A snapshot of the counters, to compare before and after one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub connections: usize,
    pub requests: usize,
    pub violations: usize,
}

/// A raw HTTP/1.1 upstream on 127.0.0.1:0 that records everything and
/// answers every complete request `200 ok`. Targets starting with `/hold`
/// are answered only once [`Recorder::release`] is called.
pub(crate) struct Recorder {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    /// Bumped on every change of `seen`, so tests wait for events, not time.
    changed: watch::Receiver<u64>,
    release: watch::Sender<bool>,
}

impl Recorder {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (notify, changed) = watch::channel(0u64);
        let notify = Arc::new(notify);
        let (release, released) = watch::channel(false);
        let shared = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).expect("nodelay");
                shared.lock().expect("lock").connections += 1;
                notify.send_modify(|n| *n += 1);
                tokio::spawn(serve_recorded(
                    stream,
                    Arc::clone(&shared),
                    Arc::clone(&notify),
                    released.clone(),
                ));
            }
        });
        Self {
            addr,
            seen,
            changed,
            release,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn counts(&self) -> Counts {
        let seen = self.seen.lock().expect("lock");
        Counts {
            connections: seen.connections,
            requests: seen.requests.len(),
            violations: seen.violations.len(),
        }
    }

    /// Requests recorded since `before`.
    pub(crate) fn requests_since(&self, before: Counts) -> Vec<SeenRequest> {
        self.seen.lock().expect("lock").requests[before.requests..].to_vec()
    }

    pub(crate) fn violations_since(&self, before: Counts) -> Vec<String> {
        self.seen.lock().expect("lock").violations[before.violations..].to_vec()
    }

    pub(crate) fn all_requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("lock").requests.clone()
    }

    pub(crate) fn peak_in_flight(&self) -> usize {
        self.seen.lock().expect("lock").peak_in_flight
    }

    /// Waits (bounded by `STEP`) until `test` holds for the recorded state.
    pub(crate) async fn wait_until(&self, what: &str, test: impl Fn(&Seen) -> bool) {
        let mut changed = self.changed.clone();
        within(what, async {
            loop {
                if test(&self.seen.lock().expect("lock")) {
                    return;
                }
                changed.changed().await.expect("recorder alive");
            }
        })
        .await;
    }

    /// Lets every held `/hold...` request be answered.
    pub(crate) fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Serves one upstream connection: strict parse, record, answer.
async fn serve_recorded(
    stream: TcpStream,
    seen: Arc<Mutex<Seen>>,
    notify: Arc<watch::Sender<u64>>,
    mut released: watch::Receiver<bool>,
) {
    let mut conn = RawConn::untimed(stream);
    let record = |request: Option<SeenRequest>, violation: Option<String>| {
        let mut seen = seen.lock().expect("lock");
        if let Some(request) = request {
            seen.requests.push(request);
        }
        if let Some(violation) = violation {
            seen.violations.push(violation);
        }
        drop(seen);
        notify.send_modify(|n| *n += 1);
    };
    // Bounded: every iteration consumes one request, or returns.
    loop {
        let Some(head) = conn.head_or_end().await else {
            return;
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let parts: Vec<&str> = request_line.split(' ').collect();
        if parts.len() != 3 || parts[2] != "HTTP/1.1" {
            record(None, Some(format!("bad request line {request_line:?}")));
            return;
        }
        let mut headers = Vec::new();
        // Header values are taken from the raw bytes so obs-text survives.
        let mut raw_lines = head.split(|&b| b == b'\n').skip(1);
        for line in raw_lines.by_ref() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                break;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                record(None, Some(format!("header line without colon {line:?}")));
                return;
            };
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
                record(None, Some(format!("bad header name {name:?}")));
                return;
            }
            let value = line[colon + 1..].trim_ascii().to_vec();
            if value
                .iter()
                .any(|&b| b == 0 || b == b'\r' || b == b'\n' || (b < b' ' && b != b'\t'))
            {
                record(None, Some(format!("control byte in {name} value")));
                return;
            }
            headers.push((name, value));
        }
        let te: Vec<&Vec<u8>> = headers
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .map(|(_, v)| v)
            .collect();
        let cl: Vec<&Vec<u8>> = headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| v)
            .collect();
        let mut request = SeenRequest {
            method: parts[0].to_owned(),
            target: parts[1].to_owned(),
            headers: headers.clone(),
            body: Vec::new(),
            framing: "none".to_owned(),
            trailers: Vec::new(),
            complete: false,
        };
        if !te.is_empty() && !cl.is_empty() {
            record(
                Some(request),
                Some("both Transfer-Encoding and Content-Length".to_owned()),
            );
            return;
        }
        if !te.is_empty() {
            if te.len() != 1 || !te[0].eq_ignore_ascii_case(b"chunked") {
                record(
                    Some(request),
                    Some(format!(
                        "transfer coding other than chunked: {:?}",
                        te.iter()
                            .map(|v| String::from_utf8_lossy(v))
                            .collect::<Vec<_>>()
                    )),
                );
                return;
            }
            request.framing = "chunked".to_owned();
            match strict_chunked(&mut conn).await {
                Ok((body, trailers)) => {
                    request.body = body;
                    request.trailers = trailers;
                    request.complete = true;
                }
                Err((body, problem)) => {
                    request.body = body;
                    // An unterminated body at EOF is an abort, not a violation.
                    let violation = (problem != "eof").then(|| format!("chunked body: {problem}"));
                    record(Some(request), violation);
                    return;
                }
            }
        } else if !cl.is_empty() {
            let lengths: Vec<Option<usize>> = cl
                .iter()
                .map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|s| s.parse().ok())
                })
                .collect();
            let Some(Some(length)) = lengths.first().copied() else {
                record(Some(request), Some("unparsable Content-Length".to_owned()));
                return;
            };
            if cl.len() > 1 {
                record(
                    Some(request),
                    Some("more than one Content-Length".to_owned()),
                );
                return;
            }
            request.framing = format!("length {length}");
            match conn.exact_or_end(length).await {
                Some(body) => {
                    request.body = body;
                    request.complete = true;
                }
                None => {
                    record(Some(request), None);
                    return;
                }
            }
        } else {
            request.complete = true;
        }
        let hold = request.target.starts_with("/hold");
        {
            let mut state = seen.lock().expect("lock");
            state.in_flight += 1;
            state.peak_in_flight = state.peak_in_flight.max(state.in_flight);
        }
        record(Some(request), None);
        if hold && released.wait_for(|go| *go).await.is_err() {
            return;
        }
        seen.lock().expect("lock").in_flight -= 1;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        if conn.stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// A strict chunked body: `Ok((body, trailers))` or `Err((partial body, problem))`.
async fn strict_chunked(conn: &mut RawConn) -> Result<(Vec<u8>, Vec<u8>), (Vec<u8>, String)> {
    let mut body = Vec::new();
    // Bounded: each iteration consumes a chunk or ends.
    loop {
        let Some(line) = conn.line_or_end().await else {
            return Err((body, "eof".to_owned()));
        };
        let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size_text)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        let Some(size) = size else {
            return Err((body, format!("bad chunk size line {line:?}")));
        };
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(line) = conn.line_or_end().await else {
                    return Err((body, "eof".to_owned()));
                };
                if line.is_empty() {
                    return Ok((body, trailers));
                }
                trailers.extend_from_slice(&line);
                trailers.extend_from_slice(b"\r\n");
            }
        }
        let Some(data) = conn.exact_or_end(size + 2).await else {
            return Err((body, "eof".to_owned()));
        };
        if &data[size..] != b"\r\n" {
            return Err((body, "chunk data not followed by CRLF".to_owned()));
        }
        body.extend_from_slice(&data[..size]);
    }
}

/// Describes what reached the upstream for one case.
pub(crate) fn describe_upstream(requests: &[SeenRequest], violations: &[String]) -> String {
    let mut parts = Vec::new();
    if requests.is_empty() {
        parts.push("nothing".to_owned());
    }
    for request in requests {
        let state = if request.complete {
            "complete"
        } else {
            "aborted before the body ended"
        };
        parts.push(format!(
            "{} {} ({}, body {} B{}) {state}",
            request.method,
            escape(request.target.as_bytes()),
            request.framing,
            request.body.len(),
            if request.trailers.is_empty() {
                String::new()
            } else {
                format!(", trailers {}", escape(&request.trailers))
            }
        ));
    }
    for violation in violations {
        parts.push(format!("FRAMING VIOLATION: {violation}"));
    }
    parts.join("; ")
}

/// The request after each case, on a new connection: it must be served.
pub(crate) async fn next_is_served(relay: SocketAddr, upstream: &Recorder, tag: &str) -> String {
    let path = format!("/next?after={tag}");
    let saw = probe(
        relay,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let answers = saw.answers();
    assert!(
        answers.len() == 1 && answers[0].status() == 200 && answers[0].body == b"ok",
        "after {tag}, the next request was not served: {}",
        saw.describe()
    );
    upstream
        .wait_until("the next request at the upstream", |seen| {
            seen.requests.iter().any(|r| r.target.ends_with(&path))
        })
        .await;
    "200 served".to_owned()
}

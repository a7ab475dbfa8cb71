//! Helpers for the admission (security) and key-rotation tests: keyrelay
//! started from hand-built config sources, raw requests that must or must not
//! reach the upstream, an HTTP/2 client that can name any `:authority`, and
//! throwaway directories for key and token files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::support::raw::{self, RawResponse};
use crate::support::{within, MockUpstream, TestBody};

/// Sends `request` raw to `addr` and expects keyrelay to answer it itself:
/// panics at once if the request reaches `upstream` instead.
pub(crate) async fn refused(
    upstream: &mut MockUpstream,
    addr: SocketAddr,
    request: &str,
) -> RawResponse {
    let request = request.to_owned();
    let client = tokio::spawn(async move { raw::exchange(addr, &request).await });
    let response = tokio::select! {
        response = client => response.expect("raw client"),
        exchange = upstream.next() => panic!(
            "a request keyrelay should refuse reached the upstream: {} {} {:?}",
            exchange.request.method(),
            exchange.request.uri(),
            exchange.request.headers(),
        ),
    };
    assert!(
        upstream.nothing_received(),
        "something reached the upstream"
    );
    response
}

/// Sends `request` raw to `addr`, answers it at `upstream` with `answer`, and
/// returns the headers the upstream saw and the client's response.
pub(crate) async fn forwarded(
    upstream: &mut MockUpstream,
    addr: SocketAddr,
    request: &str,
    answer: Response<TestBody>,
) -> (HeaderMap, RawResponse) {
    let request = request.to_owned();
    let mut client = tokio::spawn(async move { raw::exchange(addr, &request).await });
    let exchange = tokio::select! {
        exchange = upstream.next() => exchange,
        response = &mut client => panic!(
            "keyrelay answered instead of forwarding: {:?}",
            response.map(|r| (r.head.clone(), r.body_text())),
        ),
    };
    let seen = exchange.request.headers().clone();
    exchange.respond(answer);
    let response = within("the raw client's response", client)
        .await
        .expect("raw client");
    (seen, response)
}

/// Every value of header `name` (lowercase) in a raw head, comma lists split.
pub(crate) fn list_values(response: &RawResponse, name: &str) -> Vec<String> {
    response
        .head
        .headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(','))
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect()
}

/// How many times header `name` (lowercase) occurs in a raw head.
pub(crate) fn count(response: &RawResponse, name: &str) -> usize {
    response
        .head
        .headers
        .iter()
        .filter(|(n, _)| n == name)
        .count()
}

/// True if any header name or value in `headers` contains `needle`.
pub(crate) fn headers_contain(headers: &HeaderMap, needle: &str) -> bool {
    headers.iter().any(|(name, value)| {
        name.as_str().contains(needle) || String::from_utf8_lossy(value.as_bytes()).contains(needle)
    })
}

/// Sends one request over a fresh HTTP/2 prior-knowledge connection to
/// `addr`, whatever authority its URI names (the `:authority` pseudo-header).
pub(crate) async fn h2_send(addr: SocketAddr, request: Request<TestBody>) -> Response<Incoming> {
    let stream = within("an h2c connection", TcpStream::connect(addr))
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    within("an h2 response", sender.send_request(request))
        .await
        .expect("h2 response")
}

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        let path = crate::support::unique_temp_path(label, "dir");
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` in this directory and returns its path.
    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

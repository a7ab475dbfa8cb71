//! Every upstream fault, one row a fault: what the upstream does, what the
//! client must see, and the next request through the same keyrelay. Each row
//! is its own test (named for what it proves) and prints its outcome as
//! `RELIABILITY|fault|fault injected|what the client saw|next request`: the
//! rows of RELIABILITY.md's "Upstream faults" table (`bench/reliability.sh`
//! runs this module with `--nocapture`).
//!
//! Failures before the response head become keyrelay's own JSON errors
//! (`"source": "keyrelay"`, a stable `type`, a message, never the key).
//! Failures after the head cannot change the status any more, so they must
//! abort the client's body instead of ending it cleanly: a truncated
//! completion that looks complete is the worst outcome for a streaming
//! client. Errors that are the upstream's own answers pass through
//! untouched. Every row ends with the next request through the same
//! keyrelay, because a proxy that answers one failure correctly and then
//! wedges is still broken.
//!
//! Most rows are one request against an upstream that misbehaves in one way
//! ([`Upstream`]); a raw upstream follows a [`Script`] of bytes, relayed in
//! lockstep so the client is known to have had everything sent before the
//! fault. The faults that take two requests on one pooled connection, and
//! the one that needs a byte-level client, run their own scripts
//! ([`Scenario`]).

use crate::support;

use crate::support::raw;
use crate::support::tls;

use std::time::{Duration, Instant};

use http::{HeaderMap, Request, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use raw::{RawConn, RawUpstream};
use support::reliability::report;
use support::*;
use tls::{TestCa, TlsUpstream};
use tokio::io::AsyncWriteExt;

type TestClient = Client<HttpConnector, TestBody>;

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

/// One test per row, `name => Fault::row(..);`, doc comments kept on the test.
macro_rules! faults {
    ($($(#[$meta:meta])* $name:ident => $fault:expr;)*) => {
        $(
            $(#[$meta])*
            #[tokio::test]
            async fn $name() {
                check($fault).await;
            }
        )*
    };
}

const CHUNKED_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            transfer-encoding: chunked\r\n\r\n";

faults! {
    // Connecting: the same error again for the next request, never a hang.

    refused_connection_is_502_upstream_refused => Fault::row(
        "connection refused (nothing listening)",
        Upstream::Refused,
        Expect::error(502, "upstream_refused"),
    );
    unresolvable_host_is_502_upstream_dns => Fault::row(
        "DNS name does not resolve",
        Upstream::Unresolvable,
        Expect::error(502, "upstream_dns"),
    );
    tls_handshake_that_never_finishes_is_504_connect_timeout => Fault::row(
        "TLS handshake never answered (connect_timeout 300ms)",
        Upstream::SilentTls,
        Expect::error(504, "upstream_connect_timeout"),
    )
    .with(&[("connect_timeout", "300ms")])
    .not_before(Duration::from_millis(300));
    /// The message names the cause and the fix.
    untrusted_certificate_is_502_upstream_tls_naming_unknown_issuer => Fault::row(
        "TLS certificate from an untrusted CA",
        Upstream::UntrustedCertificate,
        Expect::error_naming(502, "upstream_tls", &["unknown issuer", "ca_file"]),
    );
    certificate_for_another_name_is_502_upstream_tls_naming_wrong_name => Fault::row(
        "TLS certificate for another name",
        Upstream::CertificateForAnotherName,
        Expect::error_naming(502, "upstream_tls", &["wrong name"]),
    );

    // Before the response head: keyrelay's own JSON errors.

    silent_upstream_is_504_after_response_header_timeout => Fault::row(
        "upstream silent after the request (response_header_timeout 200ms)",
        Upstream::SilentAfterRequest,
        Expect::error_naming(504, "upstream_header_timeout", &["response_header_timeout"]),
    )
    .with(&[("response_header_timeout", "200ms")])
    .not_before(Duration::from_millis(200));
    upstream_closing_before_headers_is_502_upstream_closed => Fault::row(
        "upstream closes before answering",
        Upstream::Raw(Script::new("").end(End::Close)),
        Expect::error(502, "upstream_closed"),
    );
    /// Held open until the client has its answer, so the failure is the garbage.
    upstream_answering_with_garbage_is_502_upstream_protocol => Fault::row(
        "upstream answers with non-HTTP garbage",
        Upstream::Raw(Script::new("SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n")),
        Expect::error(502, "upstream_protocol"),
    );
    upstream_response_head_of_1_mib_is_5xx => Fault::row(
        "upstream response head of 1 MiB",
        Upstream::Raw(Script::new(one_mib_head())),
        Expect::ServerError,
    );
    upstream_status_code_of_four_digits_is_502_upstream_protocol => Fault::row(
        "upstream status line with an invalid status code",
        Upstream::Raw(Script::new("HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok")),
        Expect::error(502, "upstream_protocol"),
    );
    upstream_header_line_without_colon_is_502_upstream_protocol => Fault::row(
        "upstream header line without a colon",
        Upstream::Raw(Script::new(
            "HTTP/1.1 200 OK\r\nbroken header\r\ncontent-length: 2\r\n\r\nok",
        )),
        Expect::error(502, "upstream_protocol"),
    );
    upstream_with_two_different_content_lengths_is_502_upstream_protocol => Fault::row(
        "upstream sends two different Content-Length headers",
        Upstream::Raw(Script::new(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 40\r\n\r\nok",
        )),
        Expect::error(502, "upstream_protocol"),
    );

    // After the response head: the body must abort, never end as if complete.

    /// Gone without the terminating 0-chunk.
    upstream_dying_mid_chunked_stream_aborts_http1_body => Fault::row(
        "upstream closes mid chunked stream",
        Upstream::Raw(Script::new(CHUNKED_HEAD).chunk("data: 1").chunk("data: 2").end(End::Close)),
        Expect::Aborted,
    );
    /// The next request goes on the same h2 connection: a reset stream must
    /// not take the connection down with it.
    upstream_dying_mid_stream_resets_h2c_stream => Fault::row(
        "upstream closes mid-stream, HTTP/2 client",
        Upstream::Raw(Script::new(CHUNKED_HEAD).chunk("data: 1").end(End::Close)),
        Expect::Aborted,
    )
    .client(Hop::H2c);
    /// The declared length is relayed, so the client can tell the body is short.
    upstream_closing_before_content_length_is_reached_aborts_body => Fault::row(
        "upstream closes before Content-Length is reached",
        Upstream::Raw(
            Script::new("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                .data("0123456789")
                .end(End::Close),
        ),
        Expect::AbortedWith(&[("content-length", "100")]),
    );
    upstream_resetting_the_connection_mid_stream_aborts_the_body => Fault::row(
        "upstream resets the connection (RST) mid-stream",
        Upstream::Raw(Script::new(CHUNKED_HEAD).chunk("data: 1").end(End::Reset)),
        Expect::Aborted,
    );
    upstream_sending_an_invalid_chunk_size_aborts_the_body => Fault::row(
        "upstream sends an invalid chunk size mid-stream",
        Upstream::Raw(Script::new(CHUNKED_HEAD).chunk("data: 1").tail("zz\r\nnope\r\n")),
        Expect::Aborted,
    );
    /// The upstream keeps the stream open and says nothing more: keyrelay
    /// aborts it after `idle_timeout` of silence, not before (a little slack
    /// below 1 s: the timer starts when keyrelay got the piece, slightly
    /// before this client did), and lets go of the upstream connection.
    silent_stream_is_aborted_after_idle_timeout_and_upstream_released => Fault::row(
        "upstream goes silent mid-stream (idle_timeout 1s)",
        Upstream::Raw(Script::new(CHUNKED_HEAD).chunk("data: 1")),
        Expect::Aborted,
    )
    .with(&[("idle_timeout", "1s")])
    .not_before(Duration::from_millis(950));
    /// Byte level, on a keep-alive connection: a clean end would leave the
    /// connection open, so an observed close can only be keyrelay aborting
    /// it, and the terminating chunk is never sent. What the upstream had
    /// sent before dying still reaches the client.
    upstream_dying_mid_chunked_stream_never_sends_terminating_chunk =>
        Fault::scenario(Scenario::NoTerminatingChunk);

    // The upstream's own errors are not keyrelay's: passed through untouched.

    upstream_400_passes_through_unchanged =>
        Fault::passes_through(400, r#"{"error": "Invalid input: prompt is required"}"#);
    upstream_401_passes_through_unchanged =>
        Fault::passes_through(401, r#"{"error": "Invalid API key"}"#);
    upstream_429_passes_through_unchanged =>
        Fault::passes_through(429, r#"{"error": "Rate limit exceeded"}"#);
    upstream_500_passes_through_unchanged =>
        Fault::passes_through(500, r#"{"error": "Internal server error"}"#);
    upstream_503_passes_through_unchanged =>
        Fault::passes_through(503, r#"{"error": "Model is not ready, it is scaling up"}"#);

    // Framing and connection reuse across requests.

    upstream_closing_idle_pooled_connection_does_not_fail_next_request =>
        Fault::scenario(Scenario::IdlePooledConnectionClosed);
    /// Response desync: a second, unsolicited response after the first on a
    /// keep-alive connection must never become the answer to the next request.
    unsolicited_second_response_never_answers_the_next_request =>
        Fault::scenario(Scenario::UnsolicitedSecondResponse);
    /// Found as a bug (since fixed): a response with both
    /// `Transfer-Encoding: chunked` and `Content-Length` is decoded as chunked
    /// (RFC 9112 6.3), and keyrelay used to relay the upstream's
    /// `Content-Length` too (it removed only the hop-by-hop
    /// `Transfer-Encoding`), so the client was told the wrong length and
    /// hung. An intermediary forwarding such a message must remove the
    /// received Content-Length first.
    upstream_response_with_content_length_and_chunked_reaches_the_client_whole =>
        Fault::scenario(Scenario::ContentLengthAndChunked);
    /// A 101 to a plain GET: relayed bare, it ended the client's connection
    /// and the request pipelined behind it. It is keyrelay's 502 instead,
    /// the switched upstream connection is dropped, and the pipelined
    /// request is served on a new one.
    unrequested_101_becomes_502_and_the_pipelined_request_is_served =>
        Fault::scenario(Scenario::UnrequestedUpgrade);
}

/// The control for the TLS rows: a private CA named in `ca_file` is trusted,
/// and the key travels over TLS, once, with the upstream's own Host.
#[tokio::test]
async fn private_ca_in_ca_file_is_trusted_and_key_travels_over_tls() {
    let ca = TestCa::new();
    let ca_file = ca.write_pem_file();
    let mut upstream = TlsUpstream::start(ca.issue(&["localhost"])).await;
    let relay = Relay::start(&upstream.url("localhost"), &[("ca_file", ca_file.path())]).await;
    let client = http1_client();

    let seen = send(&client, &relay, "/v1/models?limit=1").await;
    assert_eq!(seen.status, Some(200), "{seen:?}");
    assert_eq!(seen.body, b"secure hello");

    assert_eq!(upstream.next_handshake().await, Ok(()));
    let request = upstream.next_request().await;
    assert_eq!(
        request.uri.path_and_query().map(|pq| pq.as_str()),
        Some("/v1/models?limit=1")
    );
    let auth: Vec<_> = request.headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [EXPECTED_AUTH], "key injected once, over TLS");
    assert_eq!(
        request.headers["host"],
        format!("localhost:{}", upstream.addr.port()),
        "Host is the upstream's name, the one the certificate was checked against"
    );
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// What a row says
// ---------------------------------------------------------------------------

/// One row of the table.
struct Fault {
    /// The first cell of the RELIABILITY row.
    injected: &'static str,
    upstream: Upstream,
    /// The client's hop to keyrelay.
    client: Hop,
    /// keyrelay settings on top of the defaults.
    settings: &'static [(&'static str, &'static str)],
    expect: Expect,
    /// The failure must not come sooner than this after the request, or after
    /// the last piece of body the client was sent.
    not_before: Option<Duration>,
}

impl Fault {
    fn row(injected: &'static str, upstream: Upstream, expect: Expect) -> Self {
        Self {
            injected,
            upstream,
            client: Hop::Http1,
            settings: &[],
            expect,
            not_before: None,
        }
    }

    /// A fault whose scenario checks and reports it.
    fn scenario(scenario: Scenario) -> Self {
        Self::row("", Upstream::Scenario(scenario), Expect::Scripted)
    }

    fn passes_through(status: u16, body: &'static str) -> Self {
        Self::row(
            "",
            Upstream::ErrorStatus(status, body),
            Expect::PassedThrough,
        )
    }

    fn with(self, settings: &'static [(&'static str, &'static str)]) -> Self {
        Self { settings, ..self }
    }

    fn client(self, client: Hop) -> Self {
        Self { client, ..self }
    }

    fn not_before(self, bound: Duration) -> Self {
        Self {
            not_before: Some(bound),
            ..self
        }
    }
}

/// How the upstream fails.
enum Upstream {
    /// Nothing listens on the port.
    Refused,
    /// A name that never resolves (`.invalid` is reserved by RFC 6761).
    Unresolvable,
    /// TCP is accepted and then nothing is said: the TLS handshake never finishes.
    SilentTls,
    /// An HTTPS upstream whose CA keyrelay does not trust (no `ca_file`:
    /// only the web roots, which never signed it).
    UntrustedCertificate,
    /// An HTTPS upstream with a trusted certificate for another name.
    CertificateForAnotherName,
    /// A hyper upstream that takes the request and never answers.
    SilentAfterRequest,
    /// A hyper upstream answering this status with this JSON body.
    ErrorStatus(u16, &'static str),
    /// A raw upstream that reads the request head and then follows the script.
    Raw(Script),
    /// A fault with its own script of requests.
    Scenario(Scenario),
}

#[derive(Clone, Copy)]
enum Scenario {
    NoTerminatingChunk,
    IdlePooledConnectionClosed,
    UnsolicitedSecondResponse,
    ContentLengthAndChunked,
    UnrequestedUpgrade,
}

/// What a raw upstream sends after reading the request head.
struct Script {
    /// Sent at once: a response head, or whatever stands in for one.
    head: String,
    /// Body bytes after the head: each sent once the client has read the
    /// one before (lockstep), with the data it must arrive as.
    pieces: Vec<(String, &'static str)>,
    /// Sent after the last piece (a broken chunk, ...).
    tail: &'static str,
    /// What the upstream does then.
    end: End,
}

impl Script {
    fn new(head: impl Into<String>) -> Self {
        Self {
            head: head.into(),
            pieces: Vec::new(),
            tail: "",
            end: End::Hold,
        }
    }

    /// One chunk of a chunked body.
    fn chunk(mut self, data: &'static str) -> Self {
        self.pieces
            .push((format!("{:x}\r\n{data}\r\n", data.len()), data));
        self
    }

    /// Body bytes as they are (a Content-Length body).
    fn data(mut self, data: &'static str) -> Self {
        self.pieces.push((data.to_owned(), data));
        self
    }

    fn tail(self, tail: &'static str) -> Self {
        Self { tail, ..self }
    }

    fn end(self, end: End) -> Self {
        Self { end, ..self }
    }
}

/// How a raw upstream leaves the exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// Closes the connection (FIN).
    Close,
    /// Resets it (RST: SO_LINGER 0, then close).
    Reset,
    /// Keeps it open and silent until keyrelay closes it, which it must.
    Hold,
}

/// The client's hop to keyrelay.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    Http1,
    H2c,
}

impl Hop {
    fn client(self) -> TestClient {
        match self {
            Self::Http1 => http1_client(),
            Self::H2c => h2c_client(),
        }
    }

    fn version(self) -> Version {
        match self {
            Self::Http1 => Version::HTTP_11,
            Self::H2c => Version::HTTP_2,
        }
    }
}

/// What the client must see.
enum Expect {
    /// keyrelay's own JSON error with this status and type, whose message
    /// contains each of `names`.
    Error {
        status: u16,
        kind: &'static str,
        names: &'static [&'static str],
    },
    /// Some 5xx: hyper's limits decide which error it is.
    ServerError,
    /// A 200 whose pieces are relayed one by one, and then a body that aborts.
    Aborted,
    /// [`Expect::Aborted`], with these response headers relayed as they were.
    AbortedWith(&'static [(&'static str, &'static str)]),
    /// The upstream's own status, headers and body, byte for byte.
    PassedThrough,
    /// Checked by the row's scenario.
    Scripted,
}

impl Expect {
    const fn error(status: u16, kind: &'static str) -> Self {
        Self::Error {
            status,
            kind,
            names: &[],
        }
    }

    const fn error_naming(status: u16, kind: &'static str, names: &'static [&'static str]) -> Self {
        Self::Error {
            status,
            kind,
            names,
        }
    }
}

fn one_mib_head() -> String {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for n in 0..(1 << 20) / 64 {
        head.push_str(&format!("x-big-{n:06}: {}\r\n", "v".repeat(48)));
    }
    head.push_str("content-length: 2\r\n\r\nok");
    head
}

// ---------------------------------------------------------------------------
// Running a row
// ---------------------------------------------------------------------------

async fn check(fault: Fault) {
    match &fault.upstream {
        Upstream::Refused
        | Upstream::Unresolvable
        | Upstream::SilentTls
        | Upstream::UntrustedCertificate
        | Upstream::CertificateForAnotherName => connect_fault(&fault).await,
        Upstream::SilentAfterRequest => silent_after_request(&fault).await,
        Upstream::ErrorStatus(status, body) => error_status(*status, body).await,
        Upstream::Raw(script) => raw_fault(&fault, script).await,
        Upstream::Scenario(Scenario::NoTerminatingChunk) => no_terminating_chunk().await,
        Upstream::Scenario(Scenario::IdlePooledConnectionClosed) => idle_pooled_close().await,
        Upstream::Scenario(Scenario::UnsolicitedSecondResponse) => unsolicited_response().await,
        Upstream::Scenario(Scenario::ContentLengthAndChunked) => content_length_and_chunked().await,
        Upstream::Scenario(Scenario::UnrequestedUpgrade) => unrequested_upgrade().await,
    }
}

/// Prints the row for RELIABILITY.md.
fn report_row(fault: &str, client_saw: &str, next: &str) {
    report("fault", &[fault, client_saw, next]);
}

/// A fault in reaching the upstream at all: the next request meets it again.
async fn connect_fault(fault: &Fault) {
    let mut settings: Vec<(&str, String)> = fault
        .settings
        .iter()
        .map(|(key, value)| (*key, (*value).to_owned()))
        .collect();
    let mut tls = None;
    let mut _silent = None;
    let mut _ca_file = None;
    let url = match fault.upstream {
        Upstream::Refused => format!("http://127.0.0.1:{}", closed_port()),
        Upstream::Unresolvable => "https://does-not-exist.invalid".to_owned(),
        Upstream::SilentTls => {
            let (port, held) = silent_listener().await;
            _silent = Some(AbortOnDrop(held));
            format!("https://localhost:{port}")
        }
        Upstream::UntrustedCertificate => {
            let upstream = TlsUpstream::start(TestCa::new().issue(&["localhost"])).await;
            let url = upstream.url("localhost");
            tls = Some(upstream);
            url
        }
        Upstream::CertificateForAnotherName => {
            // Trusted issuer, so the only thing wrong is the name.
            let ca = TestCa::new();
            let ca_file = ca.write_pem_file();
            settings.push(("ca_file", ca_file.path().to_owned()));
            _ca_file = Some(ca_file);
            let upstream = TlsUpstream::start(ca.issue(&["other.test"])).await;
            let url = upstream.url("localhost");
            tls = Some(upstream);
            url
        }
        _ => unreachable!("not a connect fault"),
    };
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let relay = Relay::start(&url, &settings).await;
    let client = fault.client.client();

    let seen = send(&client, &relay, "/v1/models").await;
    if let Some(upstream) = tls.as_mut() {
        assert!(
            upstream.next_handshake().await.is_err(),
            "the server saw the handshake fail"
        );
        assert!(
            upstream.no_request(),
            "no request crossed a connection keyrelay does not trust"
        );
    }
    // The upstream is still broken: keyrelay must answer the same way again, not hang.
    let again = send(&client, &relay, "/again").await;
    report_row(
        fault.injected,
        &seen.describe(),
        &format!("same again: {}", again.describe()),
    );
    expect(fault, &seen, &[]);
    expect(fault, &again, &[]);
    relay.stop().await;
}

/// Accepts TCP on 127.0.0.1:0 and never says a word; the task holds the sockets.
async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    (port, held)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn silent_after_request(fault: &Fault) {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), fault.settings).await;
    let client = fault.client.client();
    let started = Instant::now();
    let pending = spawn_send(&client, &relay, "/v1/chat/completions");
    // Held, never answered: the upstream got the request and stays silent.
    let silent = upstream.next().await;
    let seen = collect(pending, started).await;
    let next = next_via_mock(&client, &relay, &mut upstream).await;
    report_row(fault.injected, &seen.describe(), &next);
    expect(fault, &seen, &[]);
    drop(silent);
    relay.stop().await;
}

async fn error_status(status: u16, error_body: &'static str) {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();
    let pending = spawn_send(&client, &relay, "/v1/chat/completions");
    let request_id = format!("req-{status}");
    let response = http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-baseten-request-id", &request_id)
        .header("retry-after", "7")
        .body(full(error_body))
        .expect("response");
    upstream.next().await.respond(response);
    let seen = collect(pending, Instant::now()).await;
    let next = next_via_mock(&client, &relay, &mut upstream).await;
    report_row(
        &format!("upstream answers {status} with a JSON error"),
        &format!(
            "passed through unchanged (status, headers, body): {}",
            seen.describe()
        ),
        &next,
    );
    assert_eq!(seen.status, Some(status), "{seen:?}");
    assert_eq!(seen.kind(), None, "not keyrelay's error: {seen:?}");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["x-baseten-request-id"], request_id.as_str());
    assert_eq!(seen.headers["retry-after"], "7");
    assert_eq!(
        seen.headers["content-length"],
        error_body.len().to_string().as_str()
    );
    assert_eq!(
        seen.body,
        error_body.as_bytes(),
        "body for {status} is the upstream's, byte for byte"
    );
    assert_eq!(seen.end, Ok(()), "{seen:?}");
    relay.stop().await;
}

async fn raw_fault(fault: &Fault, script: &Script) {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), fault.settings).await;
    let client = fault.client.client();
    let started = Instant::now();
    let pending = spawn_send(&client, &relay, "/fault");
    let mut conn = upstream.next_conn().await;
    let head = conn.read_head().await;
    let sent = conn.try_send(&script.head).await;
    // A 1 MiB head may be cut off mid-write: keyrelay stops reading at its limit.
    if script.head.len() <= 64 * 1024 {
        sent.expect("raw write");
    }
    let (seen, held) = if script.pieces.is_empty() {
        let held = end_exchange(conn, script).await;
        (collect(pending, started).await, held)
    } else {
        match head_of(pending).await {
            Ok(response) => {
                // Lockstep: each piece is known to have been relayed before the fault.
                let (parts, mut body) = response.into_parts();
                let mut relayed = Vec::new();
                let mut broken = None;
                for (wire, _) in &script.pieces {
                    conn.send(wire).await;
                    match next_data(&mut body).await {
                        Some(Ok(data)) => relayed.push(String::from_utf8_lossy(&data).into_owned()),
                        Some(Err(err)) => broken = Some(Err(short(&err))),
                        None => broken = Some(Ok(())),
                    }
                    if broken.is_some() {
                        break;
                    }
                }
                let silent_since = Instant::now();
                let held = end_exchange(conn, script).await;
                let mut seen = match broken {
                    None => read_rest(parts, body, started, silent_since).await,
                    Some(end) => Seen::from_head(parts, end, started, silent_since),
                };
                seen.relayed = relayed;
                (seen, held)
            }
            Err(err) => {
                let held = end_exchange(conn, script).await;
                (Seen::no_response(err, started), held)
            }
        }
    };
    if let Some(mut conn) = held {
        // keyrelay lets go of the upstream connection instead of keeping it
        // open: read_to_end fails the test if it is not closed within STEP.
        conn.read_to_end().await;
    }
    assert!(
        upstream.no_connection_pending(),
        "a request that reached the upstream must not be retried"
    );
    let next = next_via_raw(&client, &relay, &mut upstream).await;
    let next = if fault.client == Hop::H2c {
        format!("{next} (same h2 connection)")
    } else {
        next
    };
    report_row(fault.injected, &seen.describe(), &next);
    assert_eq!(head.target(), "/fault", "the request reached the upstream");
    let pieces: Vec<&str> = script.pieces.iter().map(|(_, data)| *data).collect();
    expect(fault, &seen, &pieces);
    relay.stop().await;
}

/// Sends the script's tail and ends the exchange as it says; for `Hold`,
/// hands the connection back for the caller to see keyrelay close it.
async fn end_exchange(mut conn: RawConn, script: &Script) -> Option<RawConn> {
    if !script.tail.is_empty() {
        conn.send(script.tail).await;
    }
    match script.end {
        End::Close => None,
        End::Reset => {
            // SO_LINGER 0 turns the close into a reset (RST).
            #[allow(deprecated)]
            conn.stream
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
            None
        }
        End::Hold => Some(conn),
    }
}

/// Checks what the client saw against the row; `pieces` is the body data
/// the client must have read before an abort.
fn expect(fault: &Fault, seen: &Seen, pieces: &[&str]) {
    let context = format!("{}: {seen:?}", fault.injected);
    if seen.status.is_some() {
        assert_eq!(seen.version, Some(fault.client.version()), "{context}");
    }
    if let Some(bound) = fault.not_before {
        assert!(
            seen.silence >= bound,
            "the failure came after {:?}, before {bound:?}: {context}",
            seen.silence
        );
    }
    match fault.expect {
        Expect::Error {
            status,
            kind,
            names,
        } => {
            assert_eq!(seen.status, Some(status), "status for {kind}: {context}");
            assert_eq!(
                seen.headers.get("content-type").map(|v| v.as_bytes()),
                Some(b"application/json".as_slice()),
                "content-type for {kind}: {context}"
            );
            assert_eq!(seen.end, Ok(()), "the error body is whole: {context}");
            let text = String::from_utf8_lossy(&seen.body).into_owned();
            assert!(!text.contains(KEY), "error body leaks the key: {text}");
            let json: serde_json::Value = serde_json::from_slice(&seen.body)
                .unwrap_or_else(|err| panic!("not JSON ({err}): {text}"));
            assert_eq!(json["type"], kind, "type in {text}");
            assert_eq!(json["source"], "keyrelay", "source in {text}");
            let message = json["error"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "error message in {text}");
            for name in names {
                assert!(message.contains(name), "message names {name:?}: {message}");
            }
        }
        Expect::ServerError => {
            assert!(seen.status.is_some_and(|s| s >= 500), "{context}");
        }
        Expect::Aborted | Expect::AbortedWith(_) => {
            assert_eq!(seen.status, Some(200), "{context}");
            if let Expect::AbortedWith(headers) = fault.expect {
                for (name, value) in headers {
                    assert_eq!(
                        seen.headers.get(*name).map(|v| v.as_bytes()),
                        Some(value.as_bytes()),
                        "the upstream's {name} is relayed: {context}"
                    );
                }
            }
            assert_eq!(
                seen.relayed, pieces,
                "pieces arrive whole and in order: {context}"
            );
            assert!(
                seen.body.is_empty(),
                "unexpected data after the upstream died: {context}"
            );
            assert!(
                seen.end.is_err(),
                "the body ended cleanly although the upstream never finished it: {context}"
            );
        }
        Expect::PassedThrough | Expect::Scripted => unreachable!("checked by the row's function"),
    }
}

// ---------------------------------------------------------------------------
// The client's side
// ---------------------------------------------------------------------------

type Pending =
    tokio::task::JoinHandle<Result<http::Response<Incoming>, hyper_util::client::legacy::Error>>;

/// What a client got for one request.
#[derive(Debug)]
struct Seen {
    /// `None`: no response at all.
    status: Option<u16>,
    version: Option<Version>,
    headers: HeaderMap,
    /// Body data read in lockstep with the upstream, a frame each.
    relayed: Vec<String>,
    /// The rest of the body.
    body: Vec<u8>,
    /// How the body ended: cleanly, or the error (also for no response).
    end: Result<(), String>,
    /// From the request to the end of the body.
    elapsed: Duration,
    /// From the last piece of data read (or the request) to the end.
    silence: Duration,
}

impl Seen {
    fn no_response(err: String, started: Instant) -> Self {
        Self {
            status: None,
            version: None,
            headers: HeaderMap::new(),
            relayed: Vec::new(),
            body: Vec::new(),
            end: Err(err),
            elapsed: started.elapsed(),
            silence: started.elapsed(),
        }
    }

    fn from_head(
        parts: http::response::Parts,
        end: Result<(), String>,
        started: Instant,
        silent_since: Instant,
    ) -> Self {
        Self {
            status: Some(parts.status.as_u16()),
            version: Some(parts.version),
            headers: parts.headers,
            relayed: Vec::new(),
            body: Vec::new(),
            end,
            elapsed: started.elapsed(),
            silence: silent_since.elapsed(),
        }
    }

    /// keyrelay's error type, if this is keyrelay's own JSON error.
    fn kind(&self) -> Option<String> {
        if self.headers.get("content-type").map(|v| v.as_bytes()) != Some(b"application/json") {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        (json["source"] == "keyrelay").then(|| json["type"].as_str().map(str::to_owned))?
    }

    /// "502 keyrelay JSON upstream_refused, body complete (118 B), after 1.3ms".
    fn describe(&self) -> String {
        let Some(status) = self.status else {
            return format!(
                "no response: {}",
                self.end.as_ref().err().map_or("", |e| e.as_str())
            );
        };
        let kind = self
            .kind()
            .map_or(String::new(), |k| format!(" keyrelay JSON {k}"));
        let length = self.relayed.iter().map(String::len).sum::<usize>() + self.body.len();
        let body = match &self.end {
            Ok(()) => format!("body complete ({length} B)"),
            Err(err) => format!("body aborted ({err})"),
        };
        format!("{status}{kind}, {body}, after {:?}", self.elapsed)
    }
}

/// An error as text, short enough for a table cell.
fn short(err: &impl std::fmt::Debug) -> String {
    format!("{err:?}").chars().take(120).collect()
}

/// Starts a GET through keyrelay in the background, for rows that must act
/// as the upstream before the response can come.
fn spawn_send(client: &TestClient, relay: &Relay, path: &str) -> Pending {
    let request = Request::get(relay.url(path))
        .body(empty())
        .expect("request");
    tokio::spawn(client.request(request))
}

/// The response head, or how the request failed.
async fn head_of(pending: Pending) -> Result<http::Response<Incoming>, String> {
    within("keyrelay's response", pending)
        .await
        .expect("join")
        .map_err(|err| short(&err))
}

/// Waits for the response and reads its body to the end.
async fn collect(pending: Pending, started: Instant) -> Seen {
    match head_of(pending).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            read_rest(parts, body, started, started).await
        }
        Err(err) => Seen::no_response(err, started),
    }
}

/// Reads the rest of a body, recording how it ended.
async fn read_rest(
    parts: http::response::Parts,
    mut body: Incoming,
    started: Instant,
    silent_since: Instant,
) -> Seen {
    let mut data = Vec::new();
    let end = loop {
        match next_data(&mut body).await {
            None => break Ok(()),
            Some(Ok(bytes)) => data.extend_from_slice(&bytes),
            Some(Err(err)) => break Err(short(&err)),
        }
    };
    let mut seen = Seen::from_head(parts, end, started, silent_since);
    seen.body = data;
    seen
}

/// One GET through keyrelay, read to the end.
async fn send(client: &TestClient, relay: &Relay, path: &str) -> Seen {
    let started = Instant::now();
    collect(spawn_send(client, relay, path), started).await
}

/// The next request, served by a raw upstream on a new connection.
async fn next_via_raw(client: &TestClient, relay: &Relay, upstream: &mut RawUpstream) -> String {
    let pending = spawn_send(client, relay, "/next");
    let mut conn = upstream.next_conn().await;
    let head = raw::serve_ok(&mut conn, "next").await;
    assert_eq!(head.target(), "/next");
    let seen = collect(pending, Instant::now()).await;
    assert_eq!(seen.status, Some(200), "the next request: {seen:?}");
    assert_eq!(seen.body, b"next", "the next request: {seen:?}");
    "200 served".to_owned()
}

/// The next request, served by a mock upstream.
async fn next_via_mock(client: &TestClient, relay: &Relay, upstream: &mut MockUpstream) -> String {
    let pending = spawn_send(client, relay, "/next");
    upstream.next().await.respond_full(200, "next");
    let seen = collect(pending, Instant::now()).await;
    assert_eq!(seen.status, Some(200), "the next request: {seen:?}");
    assert_eq!(seen.body, b"next", "the next request: {seen:?}");
    "200 served".to_owned()
}

// ---------------------------------------------------------------------------
// Scenarios: the rows with scripts of their own
// ---------------------------------------------------------------------------

async fn no_terminating_chunk() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;

    // Keep-alive: a clean end would leave the connection open.
    let mut client = RawConn::connect(relay.addr).await;
    client
        .send(format!(
            "GET /stream HTTP/1.1\r\nHost: {}\r\n\r\n",
            relay.addr
        ))
        .await;
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    // Everything at once, then the close.
    conn.send(format!("{CHUNKED_HEAD}7\r\ndata: 1\r\n7\r\ndata: 2\r\n"))
        .await;
    drop(conn);

    let head = client.read_head().await;
    let ending = client.read_to_end().await;
    let text = String::from_utf8_lossy(&ending.bytes).into_owned();
    let next = next_via_raw(&http1_client(), &relay, &mut upstream).await;
    report_row(
        "upstream closes mid chunked stream, as a keep-alive HTTP/1.1 client sees it on the wire",
        &format!(
            "{} with transfer-encoding {:?}, then {text:?}, then {}",
            head.status(),
            head.header("transfer-encoding").unwrap_or("-"),
            ending
                .error
                .as_ref()
                .map_or("the connection closed".to_owned(), |err| format!(
                    "the connection reset ({:?})",
                    err.kind()
                ))
        ),
        &next,
    );
    assert_eq!(head.status(), 200);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert!(
        !text.contains("0\r\n\r\n"),
        "the terminating chunk must never be sent: {text:?}"
    );
    assert!(
        text.contains("data: 1") && text.contains("data: 2"),
        "chunks sent before the failure reach the client: {text:?}"
    );
    relay.stop().await;
}

async fn idle_pooled_close() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let pending = spawn_send(&client, &relay, "/first");
    let mut first = upstream.next_conn().await;
    let head = raw::serve_ok(&mut first, "one").await;
    assert_eq!(head.target(), "/first");
    let seen = collect(pending, Instant::now()).await;
    assert_eq!(seen.status, Some(200), "{seen:?}");
    assert_eq!(seen.body, b"one");

    // The upstream ends the idle keep-alive connection (as servers do after
    // their keep-alive timeout). Waiting for keyrelay's side to close too is
    // what makes this deterministic: afterwards keyrelay has seen the close,
    // and the pooled connection must not be handed to the next request.
    first.stream.shutdown().await.expect("shutdown");
    let rest = first.read_to_end().await;
    assert!(
        rest.bytes.is_empty(),
        "no second request on the closed connection: {:?}",
        String::from_utf8_lossy(&rest.bytes)
    );
    drop(first);

    let pending = spawn_send(&client, &relay, "/second");
    let mut second = upstream.next_conn().await;
    let head = raw::serve_ok(&mut second, "two").await;
    assert_eq!(head.target(), "/second");
    let seen = collect(pending, Instant::now()).await;
    report_row(
        "upstream closes an idle pooled connection",
        "(between requests)",
        &format!(
            "{} with its own body {:?}, on a new connection",
            seen.status.unwrap_or_default(),
            String::from_utf8_lossy(&seen.body)
        ),
    );
    assert_eq!(seen.status, Some(200), "{seen:?}");
    assert_eq!(seen.body, b"two");
    assert!(
        upstream.no_connection_pending(),
        "each request reached the upstream exactly once"
    );
    relay.stop().await;
}

async fn unsolicited_response() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();
    let pending = spawn_send(&client, &relay, "/first");
    let mut first = upstream.next_conn().await;
    first.read_head().await;
    first
        .send(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none\
             HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nPOISONED",
        )
        .await;
    let seen = collect(pending, Instant::now()).await;
    assert_eq!(seen.body, b"one", "{seen:?}");
    // keyrelay must drop that connection: the next request goes on a new one.
    let pending = spawn_send(&client, &relay, "/second");
    let mut second = upstream.next_conn().await;
    let head = raw::serve_ok(&mut second, "two").await;
    assert_eq!(head.target(), "/second");
    let next = collect(pending, Instant::now()).await;
    report_row(
        "upstream sends an extra, unsolicited response after the first (response desync)",
        &format!("first request: {}", seen.describe()),
        &format!(
            "next request: {} with its own body {:?}, on a new connection",
            next.status.unwrap_or_default(),
            String::from_utf8_lossy(&next.body)
        ),
    );
    assert_eq!(next.body, b"two", "{next:?}");
    let rest = first.read_to_end().await;
    assert!(
        rest.bytes.is_empty(),
        "a request was sent on the poisoned connection: {:?}",
        String::from_utf8_lossy(&rest.bytes)
    );
    relay.stop().await;
}

async fn content_length_and_chunked() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let addr = relay.addr;
    let client = tokio::spawn(async move {
        let mut conn = RawConn::connect(addr).await;
        conn.send("GET /both HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await;
        let head = conn.read_head().await;
        // How long the client waits for the body is the measurement: 3 s is
        // ample for 5 bytes already sent, and bounds the hang this row found.
        // RawConn::read_to_end also returns what read_head buffered past the head.
        let ended = tokio::time::timeout(Duration::from_secs(3), conn.read_to_end()).await;
        let body = ended
            .as_ref()
            .map(|ending| ending.bytes.clone())
            .unwrap_or_default();
        (head, body, ended.is_ok())
    });
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send(
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let (head, body, ended) = within("the raw client", client).await.expect("join");
    let framing = match (
        head.header("content-length"),
        head.header("transfer-encoding"),
    ) {
        (Some(cl), None) => format!("content-length: {cl}"),
        (None, Some(te)) => format!("transfer-encoding: {te}"),
        (cl, te) => format!("content-length {cl:?}, transfer-encoding {te:?}"),
    };
    let saw = format!(
        "{} with {framing}, body {:?}{}",
        head.status(),
        String::from_utf8_lossy(&body),
        if ended {
            ", then the connection closed"
        } else {
            ", then nothing for 3 s (client hangs)"
        }
    );
    // The upstream connection is keep-alive: end it (and wait for keyrelay to
    // see that) so the next request takes a new one.
    conn.stream.shutdown().await.expect("shutdown");
    let _ = conn.read_to_end().await;
    drop(conn);
    let next = next_via_raw(&http1_client(), &relay, &mut upstream).await;
    report_row(
        "upstream response with both Content-Length: 3 and chunked 5-byte body",
        &saw,
        &next,
    );
    assert!(
        head.header("content-length").is_none_or(|cl| cl == "5"),
        "the upstream's conflicting Content-Length was relayed: {saw}"
    );
    assert!(String::from_utf8_lossy(&body).contains("hello"), "{saw}");
    relay.stop().await;
}

async fn unrequested_upgrade() {
    let mut upstream = RawUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut client = RawConn::connect(relay.addr).await;
    let host = relay.addr;
    client
        .send(format!(
            "GET /first HTTP/1.1\r\nHost: {host}\r\n\r\n\
             GET /second HTTP/1.1\r\nHost: {host}\r\n\r\n"
        ))
        .await;
    let mut first = upstream.next_conn().await;
    let head = first.read_head().await;
    assert_eq!(head.target(), "/first");
    assert!(head.header("upgrade").is_none(), "{head:?}");
    first
        .send(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .await;
    let answer = client.read_response().await;

    // The pipelined request, on the same client connection: the switched
    // upstream connection cannot carry it, so it takes a new one.
    let mut second = upstream.next_conn().await;
    let head = raw::serve_ok(&mut second, "two").await;
    assert_eq!(head.target(), "/second");
    let next = client.read_response().await;
    report_row(
        "upstream answers 101 Switching Protocols to a plain GET, with a second GET pipelined",
        &format!("first request: {}", answer.describe()),
        &format!(
            "pipelined request on the same connection: {} {:?}",
            next.status(),
            next.body_text()
        ),
    );
    assert_eq!(answer.status(), 502, "{}", answer.body_text());
    let json = answer.json();
    assert_eq!(json["type"], "upstream_unrequested_upgrade", "{json}");
    assert_eq!(json["source"], "keyrelay", "{json}");
    assert_eq!(next.status(), 200);
    assert_eq!(next.body, b"two");
    // keyrelay let go of the switched connection without sending on it.
    let rest = first.read_to_end().await;
    assert!(
        rest.bytes.is_empty(),
        "a request was sent on the switched connection: {:?}",
        String::from_utf8_lossy(&rest.bytes)
    );
    report(
        "issue23",
        &[
            "an upstream answers 101 to a plain GET (no upgrade asked), a second GET pipelined behind it",
            &format!(
                "{} {}; the pipelined request {} on a new upstream connection; nothing sent on the switched one",
                answer.status(),
                json["type"].as_str().unwrap_or("?"),
                next.status()
            ),
        ],
    );
    relay.stop().await;
}

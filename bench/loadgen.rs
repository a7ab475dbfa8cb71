//! Load generator and report writer for the keyrelay benchmark (`bench/run.sh`);
//! not part of keyrelay.
//!
//! It speaks HTTP/1.1 over raw sockets (so it sees every `read()` and can tell
//! when two records arrived together) and drives one target at a time: the
//! mock upstream (`bench/upstream.rs`) directly, or a proxy in front of it.
//! Every measuring subcommand prints `key value` lines on stdout, which
//! `run.sh` collects; `report` turns the collection into the markdown tables
//! of `BENCHMARKS.md`.
//!
//! Subcommands (flags are `--name value`; `--auth` is a full `Authorization`
//! value to send, for the direct runs):
//!
//! - `free-port`: prints a port that was free on 127.0.0.1 a moment ago;
//! - `wait-ready --addr A [--timeout-ms T]`: polls `GET /small` every 0.2 ms
//!   until it answers 200, then prints `ready_ns` (wall clock, ns);
//! - `check --addr A [--expect 200]`: one `GET /small`, exits 1 on another status;
//! - `get --addr A --path P`: one GET, prints the body (upstream `/stats`);
//! - `stream --addr A --streams S --chunks N --interval-ms I --size B`:
//!   streaming fidelity: time to first record, per-record delay from the
//!   upstream's send timestamp, records that arrived merged with the previous one;
//! - `bulk --addr A --bytes N`: one large chunked response, MB/s;
//! - `hold --addr A --streams N --secs H [--interval-ms I] [--size B]`: N simultaneous
//!   slow streams held for H seconds, completed vs failed;
//! - `burst --addr A --streams N`: N connections opened at once, with no
//!   pacing, each asking for a one-record stream: ms until every stream had
//!   its record, and how many connections the kernel's listen queue dropped
//!   meanwhile (`TcpExt` `ListenOverflows` and `ListenDrops`);
//! - `cancel --addr A --upstream U --upstream-auth V --trials T --interval-ms I`:
//!   time from dropping a stream's connection to the upstream dropping its body;
//! - `report --results FILE`: markdown tables from `TARGET KEY VALUE` lines.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(command) = args.next() else {
        eprintln!("usage: bench-loadgen COMMAND [--flag value]... (see the doc comment)");
        return ExitCode::from(64);
    };
    let rest: Vec<String> = args.collect();
    let flags = match Flags::parse(&rest) {
        Ok(flags) => flags,
        Err(err) => {
            eprintln!("bench-loadgen: {err}");
            return ExitCode::from(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match command.as_str() {
            "free-port" => free_port(),
            "wait-ready" => wait_ready(&flags).await,
            "check" => check(&flags).await,
            "get" => get(&flags).await,
            "stream" => stream_phase(&flags).await,
            "bulk" => bulk_phase(&flags).await,
            "hold" => hold_phase(&flags).await,
            "burst" => burst_phase(&flags).await,
            "cancel" => cancel_phase(&flags).await,
            "report" => report(&flags),
            other => Err(format!("unknown command {other:?}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-loadgen {command}: {err}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- flags

struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut map = HashMap::new();
        let mut iter = args.iter();
        while let Some(flag) = iter.next() {
            let name = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --flag, got {flag:?}"))?;
            let value = iter
                .next()
                .ok_or_else(|| format!("--{name} needs a value"))?;
            map.insert(name.to_owned(), value.clone());
        }
        Ok(Self(map))
    }

    fn text(&self, name: &str) -> Result<&str, String> {
        self.0
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn opt(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name} {v:?} is not a number")),
        }
    }

    fn addr(&self, name: &str) -> Result<SocketAddr, String> {
        let text = self.text(name)?;
        text.parse()
            .map_err(|_| format!("--{name} {text:?} is not an address"))
    }
}

// ---------------------------------------------------------------- HTTP/1.1 client

/// Wall clock in nanoseconds since the epoch (shared with the mock upstream).
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(u64),
    Close,
}

/// A response head, plus the body bytes that came with it.
struct Head {
    status: u16,
    framing: Framing,
    leftover: Vec<u8>,
    leftover_ns: u64,
}

/// A connection to the target.
struct Client {
    stream: TcpStream,
    addr: SocketAddr,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Self { stream, addr })
    }

    /// Writes `GET path`; returns when writing started (ns).
    async fn send_get(
        &mut self,
        path: &str,
        auth: Option<&str>,
        close: bool,
    ) -> Result<u64, String> {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if let Some(auth) = auth {
            let _ = write!(request, "Authorization: {auth}\r\n");
        }
        if close {
            request.push_str("Connection: close\r\n");
        }
        request.push_str("\r\n");
        // Taken before the write: after it, this thread may lose the CPU to the target.
        let sent = now_ns();
        self.stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write request: {e}"))?;
        Ok(sent)
    }

    async fn read_head(&mut self, scratch: &mut [u8]) -> Result<Head, String> {
        let mut head = Vec::new();
        loop {
            let n = self
                .stream
                .read(scratch)
                .await
                .map_err(|e| format!("read head: {e}"))?;
            if n == 0 {
                return Err("connection closed before the response head".into());
            }
            let at = now_ns();
            head.extend_from_slice(&scratch[..n]);
            if let Some(end) = find(&head, b"\r\n\r\n") {
                let leftover = head.split_off(end + 4);
                let (status, framing) = parse_head(&head)?;
                return Ok(Head {
                    status,
                    framing,
                    leftover,
                    leftover_ns: at,
                });
            }
            if head.len() > 64 * 1024 {
                return Err("response head too large".into());
            }
        }
    }

    /// Reads the body into `sink` until it ends (or the sink is satisfied).
    async fn read_body<S: Sink>(
        &mut self,
        head: &Head,
        scratch: &mut [u8],
        sink: &mut S,
    ) -> Result<(), String> {
        let mut decoder = Decoder::new(head.framing);
        if !head.leftover.is_empty() {
            sink.begin_read(head.leftover_ns);
            decoder.feed(&head.leftover, sink)?;
            sink.end_read();
        }
        while !decoder.done() && !sink.satisfied() {
            let n = self
                .stream
                .read(scratch)
                .await
                .map_err(|e| format!("read body: {e}"))?;
            if n == 0 {
                return if head.framing == Framing::Close {
                    Ok(())
                } else {
                    Err("connection closed before the end of the body".into())
                };
            }
            sink.begin_read(now_ns());
            decoder.feed(&scratch[..n], sink)?;
            sink.end_read();
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Result<(u16, Framing), String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut framing = Framing::Close;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(value.parse().map_err(|_| "bad content-length".to_owned())?);
        }
    }
    if status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    Ok((status, framing))
}

/// Where body bytes go, read by read.
trait Sink {
    fn begin_read(&mut self, _at_ns: u64) {}
    fn data(&mut self, bytes: &[u8]);
    fn end_read(&mut self) {}
    fn satisfied(&self) -> bool {
        false
    }
}

/// Collects the body (small responses).
struct Collect(Vec<u8>);

impl Sink for Collect {
    fn data(&mut self, bytes: &[u8]) {
        if self.0.len() < 1 << 20 {
            self.0.extend_from_slice(bytes);
        }
    }
}

/// Counts bytes (bulk).
struct CountBytes(u64);

impl Sink for CountBytes {
    fn data(&mut self, bytes: &[u8]) {
        self.0 += bytes.len() as u64;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data,
    DataEnd,
    Trailer { line_len: usize },
    Done,
}

/// Incremental body decoder: chunked, sized, or until close.
struct Decoder {
    framing: Framing,
    state: ChunkState,
    line: Vec<u8>,
    remaining: u64,
}

impl Decoder {
    fn new(framing: Framing) -> Self {
        let (state, remaining) = match framing {
            Framing::Length(0) => (ChunkState::Done, 0),
            Framing::Length(n) => (ChunkState::Data, n),
            _ => (ChunkState::Size, 0),
        };
        Self {
            framing,
            state,
            line: Vec::new(),
            remaining,
        }
    }

    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn feed<S: Sink>(&mut self, input: &[u8], sink: &mut S) -> Result<(), String> {
        match self.framing {
            Framing::Close => {
                sink.data(input);
                Ok(())
            }
            Framing::Length(_) => {
                if self.state == ChunkState::Data {
                    let take = (self.remaining.min(input.len() as u64)) as usize;
                    sink.data(&input[..take]);
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                Ok(())
            }
            Framing::Chunked => self.feed_chunked(input, sink),
        }
    }

    fn feed_chunked<S: Sink>(&mut self, input: &[u8], sink: &mut S) -> Result<(), String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Size => match input[i..].iter().position(|&b| b == b'\n') {
                    Some(j) => {
                        self.line.extend_from_slice(&input[i..i + j]);
                        i += j + 1;
                        let size = parse_chunk_size(&self.line)?;
                        self.line.clear();
                        if size == 0 {
                            self.state = ChunkState::Trailer { line_len: 0 };
                        } else {
                            self.remaining = size;
                            self.state = ChunkState::Data;
                        }
                    }
                    None => {
                        self.line.extend_from_slice(&input[i..]);
                        if self.line.len() > 1024 {
                            return Err("chunk size line too long".into());
                        }
                        i = input.len();
                    }
                },
                ChunkState::Data => {
                    let take = (self.remaining.min((input.len() - i) as u64)) as usize;
                    sink.data(&input[i..i + take]);
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                }
                ChunkState::DataEnd => {
                    match input[i] {
                        b'\n' => self.state = ChunkState::Size,
                        b'\r' => {}
                        other => {
                            return Err(format!("expected CRLF after chunk data, got {other:#x}"))
                        }
                    }
                    i += 1;
                }
                ChunkState::Trailer { line_len } => {
                    self.state = match input[i] {
                        b'\n' if line_len == 0 => ChunkState::Done,
                        b'\n' => ChunkState::Trailer { line_len: 0 },
                        b'\r' => ChunkState::Trailer { line_len },
                        _ => ChunkState::Trailer {
                            line_len: line_len + 1,
                        },
                    };
                    i += 1;
                }
                ChunkState::Done => break,
            }
        }
        Ok(())
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(line).map_err(|_| "chunk size is not text".to_owned())?;
    let hex = text.split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size {text:?}"))
}

/// One GET on a fresh connection, `Connection: close`: status and body.
async fn simple_get(
    addr: SocketAddr,
    path: &str,
    auth: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let mut client = Client::connect(addr).await?;
    client.send_get(path, auth, true).await?;
    let mut scratch = vec![0u8; 16 * 1024];
    let head = client.read_head(&mut scratch).await?;
    let mut body = Collect(Vec::new());
    client.read_body(&head, &mut scratch, &mut body).await?;
    Ok((head.status, body.0))
}

// ---------------------------------------------------------------- records

/// Parses the timestamped records of `/stream` as they arrive.
struct Records {
    partial: Vec<u8>,
    read_ns: u64,
    completed_this_read: u64,
    count: u64,
    merged: u64,
    malformed: u64,
    first_ns: Option<u64>,
    /// Per-record delay (receive − send), kept when `keep_delays`.
    delays_ns: Vec<i64>,
    keep_delays: bool,
    want: u64,
}

impl Records {
    fn new(keep_delays: bool, want: u64) -> Self {
        Self {
            partial: Vec::with_capacity(128),
            read_ns: 0,
            completed_this_read: 0,
            count: 0,
            merged: 0,
            malformed: 0,
            first_ns: None,
            delays_ns: Vec::new(),
            keep_delays,
            want,
        }
    }

    fn record(&mut self, record: &[u8]) {
        let parsed = (record.len() >= 28)
            .then(|| {
                let seq: u64 = std::str::from_utf8(&record[..8]).ok()?.parse().ok()?;
                let sent: u64 = std::str::from_utf8(&record[9..28]).ok()?.parse().ok()?;
                Some((seq, sent))
            })
            .flatten();
        match parsed {
            Some((seq, sent)) if seq == self.count => {
                if self.keep_delays {
                    self.delays_ns.push(self.read_ns as i64 - sent as i64);
                }
            }
            _ => self.malformed += 1,
        }
        if self.first_ns.is_none() {
            self.first_ns = Some(self.read_ns);
        }
        self.count += 1;
        self.completed_this_read += 1;
    }
}

impl Sink for Records {
    fn begin_read(&mut self, at_ns: u64) {
        self.read_ns = at_ns;
        self.completed_this_read = 0;
    }

    fn data(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.record(&bytes[..end]);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(&bytes[..end]);
                self.record(&whole);
                whole.clear();
                self.partial = whole;
            }
            bytes = &bytes[end + 1..];
        }
        self.partial.extend_from_slice(bytes);
    }

    fn end_read(&mut self) {
        if self.completed_this_read >= 2 {
            self.merged += self.completed_this_read - 1;
        }
    }

    fn satisfied(&self) -> bool {
        self.want > 0 && self.count >= self.want
    }
}

// ---------------------------------------------------------------- statistics

/// The `p`-quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(ns: i64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

// ---------------------------------------------------------------- subcommands

fn free_port() -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    Ok(())
}

async fn wait_ready(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let auth = flags.opt("auth");
    let deadline = Instant::now() + Duration::from_millis(flags.num("timeout-ms", 10_000)?);
    let mut attempts = 0u64;
    let mut last = String::new();
    while Instant::now() < deadline {
        attempts += 1;
        match simple_get(addr, "/small", auth).await {
            Ok((200, _)) => {
                let ready = now_ns();
                println!("ready_ns {ready}");
                println!("attempts {attempts}");
                return Ok(());
            }
            Ok((status, body)) => {
                last = format!("status {status}: {}", String::from_utf8_lossy(&body))
            }
            Err(err) => last = err,
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Err(format!(
        "{addr} not ready after {attempts} attempts; last: {last}"
    ))
}

async fn check(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let expect = flags.num("expect", 200)?;
    let (status, body) = simple_get(addr, "/small", flags.opt("auth")).await?;
    println!("status {status}");
    if u64::from(status) != expect {
        return Err(format!(
            "expected {expect}, got {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(())
}

async fn get(flags: &Flags) -> Result<(), String> {
    let (status, body) =
        simple_get(flags.addr("addr")?, flags.text("path")?, flags.opt("auth")).await?;
    print!("{}", String::from_utf8_lossy(&body));
    if status != 200 {
        return Err(format!("status {status}"));
    }
    Ok(())
}

/// Result of one fidelity stream.
struct StreamOutcome {
    ttfb_ns: i64,
    records: Records,
}

async fn one_stream(
    addr: SocketAddr,
    auth: Option<String>,
    path: String,
    want: u64,
) -> Result<StreamOutcome, String> {
    let mut client = Client::connect(addr).await?;
    let mut scratch = vec![0u8; 64 * 1024];
    let sent = client.send_get(&path, auth.as_deref(), true).await?;
    let head = client.read_head(&mut scratch).await?;
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    let mut records = Records::new(true, 0);
    client.read_body(&head, &mut scratch, &mut records).await?;
    if records.count != want || records.malformed > 0 {
        return Err(format!(
            "got {} records ({} malformed), wanted {want}",
            records.count, records.malformed
        ));
    }
    let first = records.first_ns.unwrap_or(sent);
    Ok(StreamOutcome {
        ttfb_ns: first as i64 - sent as i64,
        records,
    })
}

async fn stream_phase(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let auth = flags.opt("auth").map(str::to_owned);
    let streams = flags.num("streams", 8)?;
    let chunks = flags.num("chunks", 300)?;
    let interval_us = flags.num("interval-ms", 5)? * 1000;
    let size = flags.num("size", 64)?;
    let limit = Duration::from_micros(chunks * interval_us) + Duration::from_secs(30);
    let path = format!("/stream?n={chunks}&interval_us={interval_us}&size={size}");
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let auth = auth.clone();
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::timeout(limit, one_stream(addr, auth, path, chunks))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
            })
        })
        .collect();
    let mut ttfb = Vec::new();
    let mut delays = Vec::new();
    let (mut merged, mut records, mut failed) = (0u64, 0u64, 0u64);
    for task in tasks {
        match task.await.map_err(|e| e.to_string())? {
            Ok(outcome) => {
                ttfb.push(outcome.ttfb_ns);
                merged += outcome.records.merged;
                records += outcome.records.count;
                delays.extend(outcome.records.delays_ns);
            }
            Err(err) => {
                eprintln!("stream failed: {err}");
                failed += 1;
            }
        }
    }
    ttfb.sort_unstable();
    delays.sort_unstable();
    println!("streams {streams}");
    println!("failed {failed}");
    println!("records {records}");
    println!("merged {merged}");
    println!("ttfb_p50_ms {}", ms(quantile(&ttfb, 0.5)));
    println!("ttfb_max_ms {}", ms(ttfb.last().copied().unwrap_or(0)));
    println!("delay_p50_ms {}", ms(quantile(&delays, 0.5)));
    println!("delay_p99_ms {}", ms(quantile(&delays, 0.99)));
    println!("delay_max_ms {}", ms(delays.last().copied().unwrap_or(0)));
    if failed == streams {
        return Err("every stream failed".into());
    }
    Ok(())
}

async fn bulk_phase(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let bytes = flags.num("bytes", 1 << 30)?;
    let chunk = flags.num("chunk", 64 * 1024)?;
    let mut client = Client::connect(addr).await?;
    let mut scratch = vec![0u8; 256 * 1024];
    let started = Instant::now();
    client
        .send_get(
            &format!("/bulk?bytes={bytes}&chunk={chunk}"),
            flags.opt("auth"),
            true,
        )
        .await?;
    let head = client.read_head(&mut scratch).await?;
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    let mut count = CountBytes(0);
    let limit = Duration::from_secs(flags.num("timeout-s", 300)?);
    tokio::time::timeout(limit, client.read_body(&head, &mut scratch, &mut count))
        .await
        .map_err(|_| "timed out".to_owned())??;
    let secs = started.elapsed().as_secs_f64();
    println!("bytes {}", count.0);
    println!("secs {secs:.3}");
    println!("mbps {:.1}", count.0 as f64 / 1e6 / secs);
    if count.0 != bytes {
        return Err(format!("received {} bytes, expected {bytes}", count.0));
    }
    Ok(())
}

/// Why a held stream failed.
#[derive(Clone, Copy)]
enum HoldError {
    Connect,
    Status,
    Body,
    Timeout,
}

async fn hold_phase(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let auth: Option<Arc<str>> = flags.opt("auth").map(Arc::from);
    let streams = flags.num("streams", 2000)?;
    let secs = flags.num("secs", 5)?;
    let interval_ms = flags.num("interval-ms", 500)?.max(1);
    let chunks = secs * 1000 / interval_ms + 1;
    let connecting = Arc::new(Semaphore::new(
        flags.num("connect-concurrency", 128)? as usize
    ));
    let size = flags.num("size", 48)?;
    let path: Arc<str> = Arc::from(format!(
        "/stream?n={chunks}&interval_us={}&size={size}",
        interval_ms * 1000
    ));
    let received = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let last_open_ns = Arc::new(AtomicU64::new(0));
    let started_ns = now_ns();
    let limit = Duration::from_secs(secs + 60);
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (auth, path, connecting) =
                (auth.clone(), Arc::clone(&path), Arc::clone(&connecting));
            let (open, peak, last_open_ns, received) = (
                Arc::clone(&open),
                Arc::clone(&peak),
                Arc::clone(&last_open_ns),
                Arc::clone(&received),
            );
            tokio::spawn(async move {
                let run = async {
                    let permit = connecting
                        .acquire()
                        .await
                        .map_err(|_| (HoldError::Connect, "closed".to_owned()))?;
                    let mut client = Client::connect(addr)
                        .await
                        .map_err(|e| (HoldError::Connect, e))?;
                    let mut scratch = vec![0u8; 4096];
                    client
                        .send_get(&path, auth.as_deref(), true)
                        .await
                        .map_err(|e| (HoldError::Connect, e))?;
                    let head = client
                        .read_head(&mut scratch)
                        .await
                        .map_err(|e| (HoldError::Status, e))?;
                    drop(permit);
                    if head.status != 200 {
                        return Err((HoldError::Status, format!("status {}", head.status)));
                    }
                    let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
                    peak.fetch_max(now_open, Ordering::Relaxed);
                    last_open_ns.fetch_max(now_ns(), Ordering::Relaxed);
                    let mut records = Records::new(false, 0);
                    let body = client.read_body(&head, &mut scratch, &mut records).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                    received.fetch_add(records.count, Ordering::Relaxed);
                    body.map_err(|e| (HoldError::Body, e))?;
                    if records.count != chunks || records.malformed > 0 {
                        return Err((
                            HoldError::Body,
                            format!("{} of {chunks} records", records.count),
                        ));
                    }
                    Ok(())
                };
                tokio::time::timeout(limit, run)
                    .await
                    .unwrap_or_else(|_| Err((HoldError::Timeout, "timed out".into())))
            })
        })
        .collect();
    let mut completed = 0u64;
    let mut errors = [0u64; 4];
    let mut first_error = None;
    for task in tasks {
        match task.await.map_err(|e| e.to_string())? {
            Ok(()) => completed += 1,
            Err((kind, message)) => {
                errors[kind as usize] += 1;
                first_error.get_or_insert(message);
            }
        }
    }
    if let Some(message) = first_error {
        eprintln!("hold: first failure: {message}");
    }
    println!("streams {streams}");
    println!("completed {completed}");
    println!("failed {}", streams - completed);
    println!("peak_open {}", peak.load(Ordering::Relaxed));
    println!("records {}", received.load(Ordering::Relaxed));
    println!("records_expected {}", streams * chunks);
    println!(
        "ramp_ms {}",
        ms(last_open_ns
            .load(Ordering::Relaxed)
            .saturating_sub(started_ns) as i64)
    );
    println!("failed_connect {}", errors[HoldError::Connect as usize]);
    println!("failed_status {}", errors[HoldError::Status as usize]);
    println!("failed_body {}", errors[HoldError::Body as usize]);
    println!("failed_timeout {}", errors[HoldError::Timeout as usize]);
    if completed == 0 {
        return Err("no stream completed".into());
    }
    Ok(())
}

/// The kernel's `TcpExt` counter `name` from `/proc/net/netstat` (0 where absent).
fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        if let Some((_, value)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return value.parse().unwrap_or(0);
        }
    }
    0
}

async fn burst_phase(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let auth: Option<Arc<str>> = flags.opt("auth").map(Arc::from);
    let streams = flags.num("streams", 1500)?;
    let path: Arc<str> = Arc::from("/stream?n=1&interval_us=0&size=48");
    let limit = Duration::from_secs(60);
    let (overflows, drops) = (tcp_ext("ListenOverflows"), tcp_ext("ListenDrops"));
    let started_ns = now_ns();
    // Every task is spawned before any runs, so all connects start together.
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (auth, path) = (auth.clone(), Arc::clone(&path));
            tokio::spawn(async move {
                let run = async {
                    let mut client = Client::connect(addr).await?;
                    let mut scratch = vec![0u8; 4096];
                    client.send_get(&path, auth.as_deref(), true).await?;
                    let head = client.read_head(&mut scratch).await?;
                    if head.status != 200 {
                        return Err(format!("status {}", head.status));
                    }
                    let mut records = Records::new(false, 0);
                    client.read_body(&head, &mut scratch, &mut records).await?;
                    records.first_ns.ok_or_else(|| "no record".to_owned())
                };
                tokio::time::timeout(limit, run)
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
            })
        })
        .collect();
    let mut first = Vec::new();
    let mut first_error = None;
    for task in tasks {
        match task.await.map_err(|e| e.to_string())? {
            Ok(at_ns) => first.push(at_ns.saturating_sub(started_ns) as i64),
            Err(message) => {
                first_error.get_or_insert(message);
            }
        }
    }
    if let Some(message) = first_error {
        eprintln!("burst: first failure: {message}");
    }
    first.sort_unstable();
    println!("streams {streams}");
    println!("failed {}", streams - first.len() as u64);
    println!("all_first_ms {}", ms(first.last().copied().unwrap_or(0)));
    println!("first_p50_ms {}", ms(quantile(&first, 0.5)));
    println!(
        "listen_overflows {}",
        tcp_ext("ListenOverflows").saturating_sub(overflows)
    );
    println!(
        "listen_drops {}",
        tcp_ext("ListenDrops").saturating_sub(drops)
    );
    if first.is_empty() {
        return Err("no stream got its record".into());
    }
    Ok(())
}

async fn cancel_phase(flags: &Flags) -> Result<(), String> {
    let addr = flags.addr("addr")?;
    let auth = flags.opt("auth");
    let upstream = flags.addr("upstream")?;
    let upstream_auth = flags.opt("upstream-auth");
    let trials = flags.num("trials", 20)?;
    let interval_ms = flags.num("interval-ms", 50)?.max(1);
    let wait_ms = flags.num("wait-ms", 3000)?;
    let records_before = 3;
    // The stream would end by itself a little after the wait: every trial is bounded.
    let chunks = wait_ms / interval_ms + records_before + 10;
    let base = now_ns() % 1_000_000_000 * 1000;
    let mut latencies = Vec::new();
    let mut missed = 0u64;
    for trial in 0..trials {
        let id = base + trial;
        let mut client = Client::connect(addr).await?;
        let mut scratch = vec![0u8; 16 * 1024];
        client
            .send_get(
                &format!(
                    "/stream?n={chunks}&interval_us={}&size=64&id={id}",
                    interval_ms * 1000
                ),
                auth,
                false,
            )
            .await?;
        let head = client.read_head(&mut scratch).await?;
        if head.status != 200 {
            return Err(format!("status {}", head.status));
        }
        let mut records = Records::new(false, records_before);
        tokio::time::timeout(
            Duration::from_secs(10),
            client.read_body(&head, &mut scratch, &mut records),
        )
        .await
        .map_err(|_| "timed out waiting for the first records".to_owned())??;
        // Disconnect right after a record: the next one is due a whole interval later.
        let disconnected = now_ns();
        drop(client);
        let (status, body) = simple_get(
            upstream,
            &format!("/cancelled?id={id}&wait_ms={wait_ms}"),
            upstream_auth,
        )
        .await?;
        if status != 200 {
            missed += 1;
            continue;
        }
        let dropped: u64 = String::from_utf8_lossy(&body)
            .trim()
            .parse()
            .map_err(|_| "bad /cancelled answer".to_owned())?;
        latencies.push(dropped as i64 - disconnected as i64);
    }
    let mean = if latencies.is_empty() {
        0
    } else {
        latencies.iter().sum::<i64>() / latencies.len() as i64
    };
    latencies.sort_unstable();
    println!("trials {trials}");
    println!("missed {missed}");
    println!("p50_ms {}", ms(quantile(&latencies, 0.5)));
    println!("mean_ms {}", ms(mean));
    println!("max_ms {}", ms(latencies.last().copied().unwrap_or(0)));
    if latencies.is_empty() {
        return Err("the upstream never saw a disconnect".into());
    }
    Ok(())
}

// ---------------------------------------------------------------- report

/// Targets, in column order.
/// Report columns; `keyrelay` runs at its default settings, `keyrelay-warn`
/// is the same binary with `RUST_LOG=warn` (no access log), beside it.
const TARGETS: [&str; 5] = ["direct", "nginx", "haproxy", "keyrelay", "keyrelay-warn"];
const PEERS: [&str; 2] = ["nginx", "haproxy"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    High,
    Low,
    /// Informational: no better direction, no ratios.
    None,
}

/// A goal keyrelay's value is checked against.
#[derive(Clone, Copy)]
enum Goal {
    /// At least `f` times the best peer.
    AtLeastBestPeer(f64),
    /// No worse than the best peer.
    NoWorseThanBestPeer,
    /// At most `f` times nginx.
    AtMostNginx(f64),
    /// At least `f` times direct.
    AtLeastDirect(f64),
    /// At most direct.
    AtMostDirect,
    /// At most this absolute value.
    AtMost(f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Self::AtLeastBestPeer(1.0) => "≥ best peer".into(),
            Self::AtLeastBestPeer(f) => format!("≥ {f}× best peer"),
            Self::NoWorseThanBestPeer => "≤ best peer".into(),
            Self::AtMostNginx(f) => format!("≤ {f}× nginx"),
            Self::AtLeastDirect(f) => format!("≥ {f}× direct"),
            Self::AtMostDirect => "≤ direct".into(),
            Self::AtMost(v) => format!("≤ {v}"),
        }
    }

    fn met(self, values: &HashMap<&str, f64>, better: Better) -> Option<bool> {
        let kr = *values.get("keyrelay")?;
        let best = || best_peer(values, better);
        Some(match self {
            Self::AtLeastBestPeer(f) => kr >= f * best()?,
            Self::NoWorseThanBestPeer => kr <= best()?,
            Self::AtMostNginx(f) => kr <= f * values.get("nginx")?,
            Self::AtLeastDirect(f) => kr >= f * values.get("direct")?,
            Self::AtMostDirect => kr <= *values.get("direct")?,
            Self::AtMost(v) => kr <= v,
        })
    }
}

fn best_peer(values: &HashMap<&str, f64>, better: Better) -> Option<f64> {
    let peers = PEERS.iter().filter_map(|p| values.get(p).copied());
    match better {
        Better::High => peers.reduce(f64::max),
        Better::Low => peers.reduce(f64::min),
        Better::None => None,
    }
}

struct Row {
    key: &'static str,
    label: &'static str,
    better: Better,
    digits: usize,
    goals: &'static [Goal],
}

const fn row(
    key: &'static str,
    label: &'static str,
    better: Better,
    digits: usize,
    goals: &'static [Goal],
) -> Row {
    Row {
        key,
        label,
        better,
        digits,
        goals,
    }
}

fn sections() -> Vec<(&'static str, Vec<Row>)> {
    use Better::{High, Low, None as Info};
    use Goal::*;
    vec![
        (
            "Small requests (`GET /small`, wrk)",
            vec![
                row("c32_rps", "c=32 req/s", High, 0, &[AtLeastBestPeer(1.0)]),
                row("c32_p50_ms", "c=32 p50 latency (ms)", Low, 3, &[]),
                row(
                    "c32_p99_ms",
                    "c=32 p99 latency (ms)",
                    Low,
                    3,
                    &[NoWorseThanBestPeer],
                ),
                row("c32_errors", "c=32 errors (socket + non-2xx)", Low, 0, &[]),
                row(
                    "c32_cpu_us",
                    "c=32 proxy CPU µs/request",
                    Low,
                    1,
                    &[AtMostNginx(1.0)],
                ),
                row(
                    "c32_upstream_conns",
                    "c=32 upstream connections opened",
                    Info,
                    0,
                    &[],
                ),
                row("c256_rps", "c=256 req/s", High, 0, &[AtLeastBestPeer(1.0)]),
                row("c256_p50_ms", "c=256 p50 latency (ms)", Low, 3, &[]),
                row(
                    "c256_p99_ms",
                    "c=256 p99 latency (ms)",
                    Low,
                    3,
                    &[NoWorseThanBestPeer],
                ),
                row(
                    "c256_errors",
                    "c=256 errors (socket + non-2xx)",
                    Low,
                    0,
                    &[],
                ),
                row(
                    "c256_cpu_us",
                    "c=256 proxy CPU µs/request",
                    Low,
                    1,
                    &[AtMostNginx(1.0)],
                ),
                row(
                    "c256_upstream_conns",
                    "c=256 upstream connections opened",
                    Info,
                    0,
                    &[],
                ),
            ],
        ),
        (
            "Streaming fidelity (`/stream`, timestamped records)",
            vec![
                row(
                    "stream_ttfb_p50_ms",
                    "time to first record p50 (ms)",
                    Low,
                    3,
                    &[AtMostNginx(1.0)],
                ),
                row(
                    "stream_ttfb_max_ms",
                    "time to first record max (ms)",
                    Low,
                    3,
                    &[],
                ),
                row(
                    "stream_delay_p50_ms",
                    "per-record delay p50 (ms)",
                    Low,
                    3,
                    &[],
                ),
                row(
                    "stream_delay_p99_ms",
                    "per-record delay p99 (ms)",
                    Low,
                    3,
                    &[],
                ),
                row(
                    "stream_delay_max_ms",
                    "per-record delay max (ms)",
                    Low,
                    3,
                    &[],
                ),
                row(
                    "stream_added_p50_ms",
                    "added delay vs direct p50 (ms)",
                    Low,
                    3,
                    &[],
                ),
                row(
                    "stream_added_p99_ms",
                    "added delay vs direct p99 (ms)",
                    Low,
                    3,
                    &[AtMost(2.0)],
                ),
                row(
                    "stream_added_max_ms",
                    "added delay vs direct max (ms)",
                    Low,
                    3,
                    &[],
                ),
                row(
                    "stream_merged",
                    "records merged with the previous one",
                    Low,
                    0,
                    &[AtMostDirect],
                ),
                row("stream_records", "records received", Info, 0, &[]),
                row("stream_failed", "streams failed", Low, 0, &[]),
            ],
        ),
        (
            "Bulk (one chunked response)",
            vec![
                row(
                    "bulk_mbps",
                    "throughput (MB/s, 10⁶ B)",
                    High,
                    0,
                    &[AtLeastBestPeer(1.0), AtLeastDirect(0.7)],
                ),
                row(
                    "bulk_cpu_s_per_gib",
                    "proxy CPU s/GiB",
                    Low,
                    3,
                    &[NoWorseThanBestPeer],
                ),
                row("bulk_peak_rss_mib", "proxy peak RSS (MiB)", Low, 1, &[]),
            ],
        ),
        (
            "Concurrency (simultaneous slow streams)",
            vec![
                row("hold_a_completed", "A streams: completed", High, 0, &[]),
                row("hold_a_failed", "A streams: failed", Low, 0, &[]),
                row(
                    "hold_a_peak_open",
                    "A streams: peak open at once",
                    High,
                    0,
                    &[],
                ),
                row(
                    "hold_a_peak_rss_mib",
                    "A streams: proxy peak RSS (MiB)",
                    Low,
                    1,
                    &[AtMostNginx(1.0)],
                ),
                row(
                    "hold_a_kib_per_stream",
                    "A streams: KiB per stream above the RSS before",
                    Low,
                    1,
                    // No goal: a peer that kept what earlier phases grew
                    // shows almost nothing here. "Memory given back" measures
                    // every target from a fresh process.
                    &[],
                ),
                row("hold_b_completed", "B streams: completed", High, 0, &[]),
                row("hold_b_failed", "B streams: failed", Low, 0, &[AtMost(0.0)]),
                row(
                    "hold_b_peak_open",
                    "B streams: peak open at once",
                    High,
                    0,
                    &[],
                ),
                row(
                    "hold_b_peak_rss_mib",
                    "B streams: proxy peak RSS (MiB)",
                    Low,
                    1,
                    &[],
                ),
                row(
                    "hold_b_kib_per_stream",
                    "B streams: KiB per stream above the RSS before",
                    Low,
                    1,
                    &[],
                ),
            ],
        ),
        (
            "Token chunks (many streams of small frames, as LLM tokens arrive)",
            vec![
                row(
                    "chunks_cpu_us",
                    "proxy CPU µs per relayed chunk",
                    Low,
                    2,
                    &[NoWorseThanBestPeer],
                ),
                row("chunks_received", "chunks received", High, 0, &[]),
                row(
                    "chunks_expected",
                    "chunks sent by the upstream",
                    Info,
                    0,
                    &[],
                ),
                row("chunks_failed", "streams failed", Low, 0, &[AtMost(0.0)]),
            ],
        ),
        (
            "TLS upstream (each proxy talking HTTPS to a TLS terminator in front of the mock)",
            vec![
                row(
                    "tls_c32_rps",
                    "c=32 req/s",
                    High,
                    0,
                    &[AtLeastBestPeer(1.0)],
                ),
                row(
                    "tls_c32_cpu_us",
                    "c=32 proxy CPU µs/request",
                    Low,
                    1,
                    &[AtMostNginx(1.0)],
                ),
                row(
                    "tls_hold_peak_rss_mib",
                    "held streams: proxy peak RSS (MiB)",
                    Low,
                    1,
                    &[AtMostNginx(1.0)],
                ),
                row(
                    "tls_hold_kib_per_stream",
                    "held streams: KiB per stream above idle",
                    Low,
                    1,
                    &[AtMostNginx(1.0), NoWorseThanBestPeer],
                ),
                row(
                    "tls_hold_failed",
                    "held streams failed",
                    Low,
                    0,
                    &[AtMost(0.0)],
                ),
                row(
                    "tls_burst_all_first_ms",
                    "burst: ms until every stream had its record",
                    Low,
                    1,
                    &[NoWorseThanBestPeer],
                ),
                row(
                    "tls_burst_failed",
                    "burst: streams failed",
                    Low,
                    0,
                    &[AtMost(0.0)],
                ),
            ],
        ),
        (
            "HTTP/2 upstream (haproxy and keyrelay talking HTTP/2 over TLS to the terminator)",
            vec![
                row(
                    "h2_hold_peak_rss_mib",
                    "held streams: proxy peak RSS (MiB)",
                    Low,
                    1,
                    &[],
                ),
                row(
                    "h2_hold_kib_per_stream",
                    "held streams: KiB per stream above idle",
                    Low,
                    1,
                    &[NoWorseThanBestPeer],
                ),
                row(
                    "h2_hold_failed",
                    "held streams failed",
                    Low,
                    0,
                    &[AtMost(0.0)],
                ),
            ],
        ),
        (
            "Memory given back (a fresh process, plain HTTP/1.1 upstream, as a new pod starts)",
            vec![
                row("given_idle_rss_mib", "idle RSS (MiB)", Low, 1, &[]),
                row(
                    "given_peak_rss_mib",
                    "peak RSS with the held streams (MiB)",
                    Low,
                    1,
                    &[],
                ),
                row(
                    "given_kib_per_stream",
                    "KiB per held stream above idle",
                    Low,
                    1,
                    &[AtMostNginx(1.0), NoWorseThanBestPeer],
                ),
                row(
                    "given_after_rss_mib",
                    "RSS W s after the streams ended (MiB)",
                    Low,
                    1,
                    &[],
                ),
                row(
                    "given_after_ratio",
                    "RSS W s after / idle RSS",
                    Low,
                    2,
                    &[AtMost(1.5)],
                ),
                row(
                    "given_failed",
                    "held streams failed",
                    Low,
                    0,
                    &[AtMost(0.0)],
                ),
            ],
        ),
        (
            "Burst (connections opened at once, each for a one-record stream)",
            vec![
                row(
                    "burst_all_first_ms",
                    "ms until every stream had its record",
                    Low,
                    1,
                    &[NoWorseThanBestPeer],
                ),
                row(
                    "burst_first_p50_ms",
                    "ms until a stream had its record, p50",
                    Low,
                    1,
                    &[],
                ),
                row("burst_failed", "streams failed", Low, 0, &[AtMost(0.0)]),
                row(
                    "burst_listen_overflows",
                    "connections dropped by a full listen queue (kernel)",
                    Low,
                    0,
                    &[AtMost(0.0)],
                ),
            ],
        ),
        (
            "Cancellation (client disconnect → upstream drops the body)",
            vec![
                row("cancel_p50_ms", "p50 (ms)", Low, 3, &[AtMost(1.0)]),
                row("cancel_mean_ms", "mean (ms)", Low, 3, &[]),
                row("cancel_max_ms", "max (ms)", Low, 3, &[]),
                row("cancel_missed", "never seen by the upstream", Low, 0, &[]),
            ],
        ),
        (
            "Footprint",
            vec![
                row(
                    "startup_ms",
                    "start-up to first served request (ms)",
                    Low,
                    1,
                    &[AtMost(20.0)],
                ),
                row(
                    "idle_rss_mib",
                    "idle RSS after one request (MiB)",
                    Low,
                    1,
                    &[AtMost(10.0)],
                ),
                row("binary_mib", "binary size (MiB)", Low, 2, &[]),
            ],
        ),
    ]
}

fn fmt_value(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) => format!("{v:.digits$}"),
        None => "—".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        // A ratio of differences that can be negative (added delay) means nothing.
        (Some(a), Some(b)) if b > 0.0 && a > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn report(flags: &Flags) -> Result<(), String> {
    let path = flags.text("results")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut values: HashMap<(String, String), f64> = HashMap::new();
    let mut labels: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(target), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if target == "label" {
            labels.insert(
                key.to_owned(),
                parts.fold(value.to_owned(), |acc, p| acc + " " + p),
            );
        } else if let Ok(v) = value.parse::<f64>() {
            values.insert((target.to_owned(), key.to_owned()), v);
        }
    }
    // Added delay relative to direct, for every proxy.
    for stat in ["p50", "p99", "max"] {
        let key = format!("stream_delay_{stat}_ms");
        if let Some(&direct) = values.get(&("direct".to_owned(), key.clone())) {
            for target in TARGETS {
                if let Some(&v) = values.get(&(target.to_owned(), key.clone())) {
                    values.insert(
                        (target.to_owned(), format!("stream_added_{stat}_ms")),
                        v - direct,
                    );
                }
            }
        }
    }
    let hold_a = labels.get("hold_a").cloned().unwrap_or_else(|| "A".into());
    let hold_b = labels.get("hold_b").cloned().unwrap_or_else(|| "B".into());
    let given_wait = labels
        .get("given_wait")
        .cloned()
        .unwrap_or_else(|| "W".into());

    let mut out = String::new();
    let mut misses = Vec::new();
    for (title, rows) in sections() {
        let _ = writeln!(out, "### {title}\n");
        out.push_str("| metric | direct | nginx | haproxy | keyrelay | keyrelay, `RUST_LOG=warn` | keyrelay/nginx | keyrelay/best peer | target | met |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|:-:|\n");
        for row in rows {
            let by_target: HashMap<&str, f64> = TARGETS
                .iter()
                .filter_map(|t| {
                    values
                        .get(&((*t).to_owned(), row.key.to_owned()))
                        .map(|v| (*t, *v))
                })
                .collect();
            if by_target.is_empty() {
                continue;
            }
            let label = row
                .label
                .replacen("A streams", &format!("{hold_a} streams"), 1)
                .replacen("B streams", &format!("{hold_b} streams"), 1)
                .replacen("W s after", &format!("{given_wait} s after"), 1);
            let _ = write!(out, "| {label} |");
            for target in TARGETS {
                let _ = write!(
                    out,
                    " {} |",
                    fmt_value(by_target.get(target).copied(), row.digits)
                );
            }
            let kr = by_target.get("keyrelay").copied();
            if row.better == Better::None {
                out.push_str(" — | — |");
            } else {
                let _ = write!(
                    out,
                    " {} | {} |",
                    ratio(kr, by_target.get("nginx").copied()),
                    ratio(kr, best_peer(&by_target, row.better))
                );
            }
            let goals: Vec<String> = row.goals.iter().map(|g| g.describe()).collect();
            let verdicts: Vec<Option<bool>> = row
                .goals
                .iter()
                .map(|g| g.met(&by_target, row.better))
                .collect();
            let met = if verdicts.is_empty() {
                String::new()
            } else if verdicts.iter().all(|v| *v == Some(true)) {
                "✅".into()
            } else if verdicts.contains(&Some(false)) {
                "❌".into()
            } else {
                "?".into()
            };
            for (goal, verdict) in row.goals.iter().zip(&verdicts) {
                if *verdict == Some(false) {
                    // Rows of different sections share labels (c=32 req/s).
                    let section = title.split(" (").next().unwrap_or(title);
                    misses.push(format!(
                        "{section}, {label}: keyrelay {} (target {})",
                        fmt_value(kr, row.digits),
                        goal.describe()
                    ));
                }
            }
            let _ = writeln!(out, " {} | {met} |", goals.join(", "));
        }
        out.push('\n');
    }
    out.push_str("### Targets keyrelay misses\n\n");
    if misses.is_empty() {
        out.push_str("None.\n");
    } else {
        for miss in misses {
            let _ = writeln!(out, "- {miss}");
        }
    }
    print!("{out}");
    Ok(())
}

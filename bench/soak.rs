//! Soak driver for keyrelay (`bench/soak.sh`); not part of keyrelay.
//!
//! Opens thousands of streams through keyrelay in front of the benchmark's
//! mock upstream (`bench/upstream.rs`) and reads or cancels them at random,
//! over raw HTTP/1.1 sockets so that a cancellation is a real close. Every
//! request it sends is counted, so the script can check that keyrelay's
//! `keyrelay_requests_total` accounts for each one.
//!
//! Subcommands (flags are `--name value`):
//!
//! - `run --addr A --secs S [--concurrency C] [--seed N]`: the soak. C workers
//!   (default 16) loop until S seconds have passed, each iteration one of:
//!   - a stream of 1-20 records, read to its last chunk (completed);
//!   - a stream of 50-200 slow records, closed after 0-5 records (cancelled mid-stream);
//!   - a stream closed as soon as its response head arrived (cancelled at the head);
//!   - 1-5 `GET /small` on one keep-alive connection (completed).
//!
//!   A request is counted once its response head has arrived, so keyrelay has
//!   certainly seen it. Prints `key value` lines: `requests`, `streams`,
//!   `completed`, `cancelled_mid`, `cancelled_head`, `keepalive_requests`,
//!   `errors`, `seconds`, `peak_open`.
//! - `metrics --admin A`: reads keyrelay's `/metrics` and prints
//!   `requests_total N` (summed over every label set), `active_requests N`,
//!   and one `outcome_<outcome>_<status> N` line per label set.
//! - `get --addr A --path P [--auth V]`: one GET, prints the body (the upstream's `/stats`).
//! - `wait-idle --admin A --timeout-ms T`: waits until `active_requests` is 0.

use std::cell::Cell;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single read may wait: a stuck stream is an error, not a hang.
const READ_LIMIT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(command) = args.next() else {
        eprintln!("usage: bench-soak run|metrics|wait-idle [--flag value]...");
        return ExitCode::from(64);
    };
    let rest: Vec<String> = args.collect();
    let flag = |name: &str| {
        rest.windows(2)
            .find(|pair| pair[0] == format!("--{name}"))
            .map(|pair| pair[1].clone())
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match command.as_str() {
            "run" => {
                let addr = parse(flag("addr"), "--addr")?;
                let secs: u64 = parse(flag("secs"), "--secs")?;
                let concurrency: usize = flag("concurrency").map_or(Ok(16), |v| {
                    v.parse().map_err(|_| "--concurrency".to_owned())
                })?;
                let seed: u64 = flag("seed")
                    .map_or(Ok(0x5eed), |v| v.parse().map_err(|_| "--seed".to_owned()))?;
                run(addr, Duration::from_secs(secs), concurrency, seed).await
            }
            "metrics" => {
                let admin = parse(flag("admin"), "--admin")?;
                let text = get_text(admin, "/metrics").await?;
                print!("{}", summarise(&text));
                Ok(())
            }
            "get" => {
                let addr = parse(flag("addr"), "--addr")?;
                let path: String = parse(flag("path"), "--path")?;
                print!("{}", get_text_auth(addr, &path, flag("auth")).await?);
                Ok(())
            }
            "wait-idle" => {
                let admin = parse(flag("admin"), "--admin")?;
                let timeout: u64 = parse(flag("timeout-ms"), "--timeout-ms")?;
                wait_idle(admin, Duration::from_millis(timeout)).await
            }
            other => Err(format!("unknown command {other:?}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-soak {command}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(value: Option<String>, name: &str) -> Result<T, String> {
    value
        .ok_or_else(|| format!("{name} is required"))?
        .parse()
        .map_err(|_| format!("{name} is not valid"))
}

/// A small xorshift generator: reproducible runs from a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

#[derive(Default)]
struct Counters {
    requests: Cell<u64>,
    streams: Cell<u64>,
    completed: Cell<u64>,
    cancelled_mid: Cell<u64>,
    cancelled_head: Cell<u64>,
    keepalive_requests: Cell<u64>,
    errors: Cell<u64>,
    open: Cell<u64>,
    peak_open: Cell<u64>,
}

fn bump(cell: &Cell<u64>) {
    cell.set(cell.get() + 1);
}

async fn run(
    addr: SocketAddr,
    length: Duration,
    concurrency: usize,
    seed: u64,
) -> Result<(), String> {
    let counters = Rc::new(Counters::default());
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let local = tokio::task::LocalSet::new();
    for worker in 0..concurrency {
        let counters = Rc::clone(&counters);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (worker as u64 + 1) | 1);
        local.spawn_local(async move {
            // Bounded: every iteration takes time (records are paced by the
            // upstream) and the loop ends at the deadline.
            while Instant::now() < deadline {
                if let Err(err) = one_iteration(addr, &mut rng, &counters).await {
                    bump(&counters.errors);
                    if counters.errors.get() <= 10 {
                        eprintln!("bench-soak: {err}");
                    }
                }
            }
        });
    }
    local.await;
    let c = &counters;
    println!("requests {}", c.requests.get());
    println!("streams {}", c.streams.get());
    println!("completed {}", c.completed.get());
    println!("cancelled_mid {}", c.cancelled_mid.get());
    println!("cancelled_head {}", c.cancelled_head.get());
    println!("keepalive_requests {}", c.keepalive_requests.get());
    println!("errors {}", c.errors.get());
    println!("peak_open {}", c.peak_open.get());
    println!("seconds {:.1}", started.elapsed().as_secs_f64());
    if c.errors.get() > 0 {
        return Err(format!("{} requests failed", c.errors.get()));
    }
    Ok(())
}

/// Marks a stream open for as long as it lives (for `peak_open`).
struct Open<'a>(&'a Counters);

impl<'a> Open<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.open.set(counters.open.get() + 1);
        counters
            .peak_open
            .set(counters.peak_open.get().max(counters.open.get()));
        Self(counters)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
    }
}

async fn one_iteration(addr: SocketAddr, rng: &mut Rng, c: &Counters) -> Result<(), String> {
    let pick = rng.between(0, 99);
    let mut conn = Conn::connect(addr).await?;
    if pick < 20 {
        // Keep-alive small requests.
        let n = rng.between(1, 5);
        for i in 0..n {
            let close = if i + 1 == n {
                "Connection: close\r\n"
            } else {
                ""
            };
            conn.send(&format!(
                "GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}\r\n"
            ))
            .await?;
            let head = conn.head().await?;
            bump(&c.requests);
            bump(&c.keepalive_requests);
            expect_200(&head)?;
            let length = header(&head, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or("no content-length on /small")?;
            conn.exact(length).await?;
            bump(&c.completed);
        }
        return Ok(());
    }
    let (records, interval_us) = if pick < 60 {
        (rng.between(1, 20), rng.between(0, 5000))
    } else {
        (rng.between(50, 200), rng.between(2000, 10000))
    };
    conn.send(&format!(
        "GET /stream?n={records}&interval_us={interval_us}&size=64 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Connection: close\r\n\r\n"
    ))
    .await?;
    let _open = Open::new(c);
    let head = conn.head().await?;
    bump(&c.requests);
    bump(&c.streams);
    expect_200(&head)?;
    if pick < 60 {
        let got = conn.chunked_to_end().await?;
        if got != records {
            return Err(format!("stream of {records} records ended after {got}"));
        }
        bump(&c.completed);
    } else if pick < 90 {
        let keep = rng.between(0, 5);
        for _ in 0..keep {
            conn.chunk().await?;
        }
        bump(&c.cancelled_mid);
        // Dropping `conn` closes the connection mid-stream.
    } else {
        bump(&c.cancelled_head);
    }
    Ok(())
}

fn expect_200(head: &str) -> Result<(), String> {
    if head.starts_with("HTTP/1.1 200 ") {
        Ok(())
    } else {
        Err(format!(
            "unexpected response {:?}",
            head.lines().next().unwrap_or_default()
        ))
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A raw HTTP/1.1 connection with a read buffer; every read is bounded.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = tokio::time::timeout(READ_LIMIT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.stream
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(READ_LIMIT, self.stream.read(&mut chunk))
            .await
            .map_err(|_| "read timed out".to_owned())?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed early".to_owned());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn find(&self, needle: &[u8]) -> Option<usize> {
        self.buf.windows(needle.len()).position(|w| w == needle)
    }

    async fn head(&mut self) -> Result<String, String> {
        loop {
            if let Some(pos) = self.find(b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..pos + 4).collect();
                return Ok(String::from_utf8_lossy(&head).into_owned());
            }
            self.fill().await?;
        }
    }

    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(pos) = self.find(b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            self.fill().await?;
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One chunk; `Ok(false)` for the last (zero) chunk.
    async fn chunk(&mut self) -> Result<bool, String> {
        let line = self.line().await?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // No trailers from the bench upstream: the final CRLF.
            self.line().await?;
            return Ok(false);
        }
        self.exact(size + 2).await?;
        Ok(true)
    }

    /// Reads a chunked body to its end; returns the number of 64-byte records.
    async fn chunked_to_end(&mut self) -> Result<u64, String> {
        let mut bytes = 0u64;
        // Bounded: each iteration consumes a chunk; the upstream sends at most 200 records.
        loop {
            let before = self.buf.len();
            let line = self.line().await?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size line {line:?} ({before} buffered)"))?;
            if size == 0 {
                self.line().await?;
                return Ok(bytes / 64);
            }
            self.exact(size + 2).await?;
            bytes += size as u64;
        }
    }
}

async fn get_text(addr: SocketAddr, path: &str) -> Result<String, String> {
    get_text_auth(addr, path, None).await
}

async fn get_text_auth(
    addr: SocketAddr,
    path: &str,
    auth: Option<String>,
) -> Result<String, String> {
    let mut conn = Conn::connect(addr).await?;
    let auth = auth.map_or(String::new(), |v| format!("Authorization: {v}\r\n"));
    conn.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    ))
    .await?;
    let head = conn.head().await?;
    expect_200(&head)?;
    let length = header(&head, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or("no content-length")?;
    let body = conn.exact(length).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `requests_total`, `active_requests` and per-label request counts from Prometheus text.
fn summarise(text: &str) -> String {
    let mut total = 0u64;
    let mut active = 0i64;
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(labels) = series.strip_prefix("keyrelay_requests_total") {
            let count: f64 = value.parse().unwrap_or(0.0);
            total += count as u64;
            let label = |name: &str| {
                labels
                    .split(['{', ',', '}'])
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
                    .map(|v| v.trim_matches('"').to_owned())
                    .unwrap_or_default()
            };
            lines.push(format!(
                "outcome_{}_{} {}",
                label("outcome"),
                label("status"),
                count as u64
            ));
        } else if series.starts_with("keyrelay_active_requests") {
            active += value.parse::<f64>().unwrap_or(0.0) as i64;
        }
    }
    lines.sort();
    let mut out = format!("requests_total {total}\nactive_requests {active}\n");
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

async fn wait_idle(admin: SocketAddr, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = get_text(admin, "/metrics").await?;
        let summary = summarise(&text);
        if summary.lines().any(|l| l == "active_requests 0") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("requests still active after {limit:?}:\n{summary}"));
        }
        // Polling is the only way to observe the gauge from outside.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

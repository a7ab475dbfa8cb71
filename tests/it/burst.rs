//! A burst of new connections never waits on the kernel.
//!
//! A frontend fanning out, a batch job or a restarted app pool opens many
//! streams at the same instant. When the listen backlog is full the kernel
//! drops the SYN and that client waits 1 s (then 3 s) to retry, so these
//! tests assert what the kernel saw, not how long anything took: with the
//! default `listen_backlog`, `TcpExt.ListenOverflows` does not move while
//! every one of the connections, all opened at once, gets its first frame.
#![cfg(target_os = "linux")]

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use keyrelay::config::{self, ListenAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Connections opened together; well past std's and tokio's backlogs (128, 1024).
const BURST: usize = 1_500;
/// Bound on the whole burst; a dropped SYN alone would cost 1 s, three 7 s.
const BURST_BOUND: Duration = Duration::from_secs(60);
const FIRST_FRAME: &[u8] = b"first token\n";

/// `TcpExt: ListenOverflows` from /proc/net/netstat (machine-wide).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").expect("read /proc/net/netstat");
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let position = names
            .split_whitespace()
            .position(|name| name == "ListenOverflows")
            .expect("TcpExt has ListenOverflows");
        return values
            .split_whitespace()
            .nth(position)
            .and_then(|value| value.parse().ok())
            .expect("a ListenOverflows value");
    }
    panic!("no TcpExt line in /proc/net/netstat");
}

/// An upstream that answers every request at once with one small frame. Its
/// own backlog is large too: keyrelay opens a connection to it per stream,
/// and an overflow there would count in the same kernel counter.
async fn start_upstream() -> SocketAddr {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(4096).expect("listen");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                            FIRST_FRAME.len()
                        );
                        let sent = async {
                            stream.write_all(response.as_bytes()).await?;
                            stream.write_all(FIRST_FRAME).await
                        };
                        if sent.await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One client: connect, ask, read until the first frame has arrived.
async fn open_stream(relay: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(relay).await?;
    stream
        .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(FIRST_FRAME) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "closed after {:?}",
                String::from_utf8_lossy(&seen)
            )));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_is_never_dropped_by_the_kernel() {
    // Each stream holds four descriptors here (client, accepted, upstream
    // and the upstream's end): more than a stock soft limit of 1024.
    rlimit::increase_nofile_limit(8 * BURST as u64 + 1024).expect("raise RLIMIT_NOFILE");
    let upstream = start_upstream().await;
    let config =
        config::load(&support::sources(&format!("http://{upstream}"), &[])).expect("valid config");
    assert_eq!(config.listen_backlog, 4096, "the default this test proves");
    let listener = keyrelay::ops::listener::bind(
        &config.listen,
        config.unix_socket_mode,
        config.listen_backlog,
    )
    .await
    .expect("bind");
    let ListenAddr::Tcp(relay) = listener.local_addr().expect("addr") else {
        panic!("a TCP listener");
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(keyrelay::run(config, listener, async {
        let _ = stopped.await;
    }));

    let before = listen_overflows();
    let mut clients = JoinSet::new();
    for _ in 0..BURST {
        clients.spawn(open_stream(relay));
    }
    let results = tokio::time::timeout(BURST_BOUND, clients.join_all())
        .await
        .expect("every stream got its first frame within the bound");
    let overflows = listen_overflows() - before;

    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {BURST} streams failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(
        overflows, 0,
        "the kernel dropped {overflows} connections from a full listen queue"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

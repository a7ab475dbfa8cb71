//! Shutdown of the real binary: SIGTERM drains (readiness fails, streams in
//! flight finish, exit 0), a second SIGTERM exits at once (143),
//! `shutdown_grace` cuts streams that never end, `shutdown_delay` keeps
//! accepting for a while, and `POST /quitquitquit` on the admin listener
//! starts the same drain.
//!
//! Waits are on events (readiness flipping, frames arriving, the process
//! exiting) with bounds; only the grace and delay tests measure time, because
//! those periods are the behaviour under test. keyrelay reports ready a moment
//! before it handles SIGTERM, so tests of what the signal does first wait for
//! its handler (from `/proc`); one test signals inside that gap on purpose.

use crate::support;

use crate::support::raw;

use crate::support::ops;

use std::process::Stdio;
use std::time::Duration;

use ops::{eventually, AdminRelay, HeldStream};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Lower bound for a 1 s period measured from the test's side (signal delivery
/// and scheduling only ever make the observed period longer, but timers may
/// round a little).
const ALMOST_ONE_SECOND: Duration = Duration::from_millis(900);

#[tokio::test]
async fn sigterm_fails_readiness_lets_the_stream_finish_and_exits_0() {
    let mut upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let client = http1_client();

    let mut stream = HeldStream::open(&client, &mut upstream, &relay.url("/v1/stream")).await;
    stream.lockstep("data: before\n\n").await;
    assert_eq!(relay.admin("GET", "/readyz").await.status(), 200);

    relay.wait_for_sigterm_handler().await;
    relay.signal("TERM").await;
    let readyz = relay.wait_for_readyz(503).await;
    assert_eq!(readyz.json()["status"], "draining");
    assert_eq!(
        relay.admin("GET", "/healthz").await.status(),
        200,
        "still alive while draining"
    );

    // Without shutdown_delay the proxy listener closes at once.
    let addr = relay.addr();
    eventually("new connections to be refused", || async move {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;

    // The stream in flight carries on to its natural end.
    stream.lockstep("data: during 1\n\n").await;
    stream.lockstep("data: during 2\n\n").await;
    assert!(relay.running(), "keyrelay waits for the stream");
    stream.finish().await;

    let status = relay.exit_within(STEP).await;
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        relay.process.log()
    );
    let log = relay.process.wait_for_log("draining", 1).await;
    assert!(
        !log.contains("grace period over"),
        "nothing was cut:\n{log}"
    );
}

/// keyrelay logs its ready line, answers /readyz and even serves requests a
/// moment before it installs its SIGTERM handler; a SIGTERM in that gap kills
/// it outright (the default action) instead of draining. Each of several
/// processes is signalled the moment its ready line appears, by a shell
/// waiting with `kill` ready (a fresh `kill` process would take longer to
/// start than the gap lasts).
#[tokio::test]
async fn sigterm_right_after_the_ready_line_drains_and_exits_0() {
    let upstream = MockUpstream::start().await;
    let mut endings = Vec::new();
    for _ in 0..30 {
        endings.push(sigterm_at_ready(&upstream.url()).await);
    }
    let killed = endings.iter().filter(|s| s.code() != Some(0)).count();
    assert_eq!(
        killed,
        0,
        "SIGTERM right after \"keyrelay ready\" must drain and exit 0, but {killed} of \
         {} processes were killed by it (no handler yet): {endings:?}",
        endings.len()
    );
}

/// Starts keyrelay, sends SIGTERM as soon as its ready line is read, and
/// returns how it exited.
async fn sigterm_at_ready(upstream: &str) -> std::process::ExitStatus {
    let mut relay = tokio::process::Command::from(ops::command(upstream));
    relay
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut relay = relay.spawn().expect("spawn keyrelay");
    let pid = relay.id().expect("running").to_string();
    let mut killer = tokio::process::Command::new("sh")
        .args(["-c", "read go && kill -s TERM \"$0\"", &pid])
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sh");
    let mut go = killer.stdin.take().expect("sh stdin");

    let mut lines = BufReader::new(relay.stderr.take().expect("stderr")).lines();
    // Bounded: each line read is bounded by STEP, and keyrelay logs a few lines at start.
    for _ in 0..100 {
        let line = within("keyrelay's ready line", lines.next_line())
            .await
            .expect("read stderr")
            .expect("keyrelay exited before it was ready");
        if line.contains("keyrelay ready") {
            go.write_all(b"go\n").await.expect("tell sh to signal");
            break;
        }
    }
    // Keep reading so keyrelay never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let killed = within("sh to send SIGTERM", killer.wait())
        .await
        .expect("wait for sh");
    assert!(killed.success(), "kill -s TERM {pid} failed");
    within("keyrelay to exit", relay.wait())
        .await
        .expect("wait for keyrelay")
}

#[tokio::test]
async fn second_sigterm_while_draining_exits_at_once_with_143() {
    let mut upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let client = http1_client();

    let mut stream = HeldStream::open(&client, &mut upstream, &relay.url("/v1/stream")).await;
    stream.lockstep("data: 1\n\n").await;

    relay.wait_for_sigterm_handler().await;
    relay.signal("TERM").await;
    relay.wait_for_readyz(503).await;
    assert!(relay.running(), "the first signal drains, it does not exit");
    relay.signal("TERM").await;

    // Far less than the 30 s default grace the stream would otherwise get.
    let status = relay.exit_within(Duration::from_secs(5)).await;
    assert_eq!(
        status.code(),
        Some(143),
        "{status:?}\n{}",
        relay.process.log()
    );
    match next_data(&mut stream.body).await {
        Some(Err(err)) => println!("client saw: {err:?}"),
        other => panic!("the stream must be cut, not end cleanly: {other:?}"),
    }
    relay
        .process
        .wait_for_log("second shutdown signal", 1)
        .await;
}

#[tokio::test]
async fn shutdown_grace_cuts_a_stream_that_never_ends() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--shutdown-grace", "1s"]);
    let mut relay = AdminRelay::spawn(command).await;
    let client = http1_client();

    let mut stream = HeldStream::open(&client, &mut upstream, &relay.url("/v1/stream")).await;
    stream.lockstep("data: 1\n\n").await;

    relay.wait_for_sigterm_handler().await;
    let signalled = Instant::now();
    relay.signal("TERM").await;
    // The upstream stays silent: only the grace period can end this stream.
    match next_data(&mut stream.body).await {
        Some(Err(err)) => println!("client saw: {err:?}"),
        other => panic!("the stream must be cut, not end cleanly: {other:?}"),
    }
    let cut_after = signalled.elapsed();
    println!("stream cut {cut_after:?} after SIGTERM");
    assert!(
        cut_after >= ALMOST_ONE_SECOND,
        "cut after {cut_after:?}, before shutdown_grace (1s)"
    );

    let status = relay.exit_within(STEP).await;
    let exited_after = signalled.elapsed();
    println!("exited {exited_after:?} after SIGTERM with {status:?}");
    assert!(
        exited_after < Duration::from_secs(5),
        "took {exited_after:?} to exit with a 1s grace"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        relay.process.log()
    );
    stream.dropped.wait().await;
    // The log is copied from the child's stderr by a reader task, which may
    // still be behind the exit: wait for the line rather than snapshot it.
    relay.process.wait_for_log("grace period over", 1).await;
}

#[tokio::test]
async fn shutdown_delay_keeps_accepting_new_connections_for_a_while() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--shutdown-delay", "1s"]);
    let mut relay = AdminRelay::spawn(command).await;

    relay.wait_for_sigterm_handler().await;
    let signalled = Instant::now();
    relay.signal("TERM").await;
    relay.wait_for_readyz(503).await;

    // Readiness already fails, yet a new connection is still served.
    let pending = tokio::spawn(raw::get(relay.addr(), "/v1/models"));
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.uri().path(), "/v1/models");
    exchange.respond_full(200, "models");
    let response = within("a request during shutdown_delay", pending)
        .await
        .expect("join");
    assert_eq!(response.status(), 200);
    assert_eq!(response.body_text(), "models");
    println!(
        "request during the delay done {:?} after SIGTERM",
        signalled.elapsed()
    );

    let status = relay.exit_within(STEP).await;
    let exited_after = signalled.elapsed();
    println!("exited {exited_after:?} after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        relay.process.log()
    );
    assert!(
        exited_after >= ALMOST_ONE_SECOND,
        "exited after {exited_after:?}, before shutdown_delay (1s) was over"
    );
    relay.process.wait_for_log("shutdown_delay", 1).await;
}

#[tokio::test]
async fn quitquitquit_on_the_admin_port_drains_and_exits_0() {
    let mut upstream = MockUpstream::start().await;
    let mut relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let client = http1_client();

    let mut stream = HeldStream::open(&client, &mut upstream, &relay.url("/v1/stream")).await;
    stream.lockstep("data: 1\n\n").await;

    let quit = relay.admin("POST", "/quitquitquit").await;
    assert_eq!(quit.status(), 200, "{}", quit.body_text());
    assert_eq!(quit.json()["status"], "shutting down");
    relay.wait_for_readyz(503).await;

    stream.lockstep("data: 2\n\n").await;
    assert!(relay.running(), "keyrelay waits for the stream");
    stream.finish().await;

    let status = relay.exit_within(STEP).await;
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        relay.process.log()
    );
    relay.process.wait_for_log("quit requested", 1).await;
}

/// A client that connected and has not sent a byte (a browser's preconnect,
/// a pool's spare connection) must not hold up the drain until its first-bytes
/// timeout (header_read_timeout, 30 s by default): keyrelay closes it at once.
#[tokio::test]
async fn a_connection_that_sent_nothing_does_not_hold_up_the_drain() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[("header_read_timeout", "60s")]).await;
    let mut silent = TcpStream::connect(relay.addr).await.expect("connect");
    // A request served on another connection proves keyrelay has accepted
    // (and is past the accept of) the silent one too.
    let client = http1_client();
    let pending = tokio::spawn(client.get(relay.url("/v1/models").parse().expect("uri")));
    let exchange = upstream.next().await;
    exchange.respond_full(200, "ok");
    within("a served request", pending)
        .await
        .expect("task")
        .expect("served");

    // `stop` waits up to 10 s; the silent connection's own timeout is 60 s.
    relay.stop().await;
    let mut rest = Vec::new();
    let read = within("the silent connection to be closed", async {
        tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut rest).await
    })
    .await;
    // Closed cleanly or reset: either way, at once and with nothing sent.
    drop(read);
    assert!(
        rest.is_empty(),
        "keyrelay sent nothing to the silent connection"
    );
}

#[tokio::test]
async fn sighup_with_nothing_to_reload_is_logged_not_fatal() {
    // `systemctl reload keyrelay` on a service whose key comes from the
    // environment: no key file, no token files, nothing expiring.
    let mut upstream = MockUpstream::start().await;
    let relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    relay.wait_for_sigterm_handler().await;
    relay.signal("HUP").await;
    relay.wait_for_log("SIGHUP: re-reading", 1).await;
    let client = http1_client();
    let request = http::Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let (_, response) = round_trip(&client, &mut upstream, request, ok("{}")).await;
    assert_eq!(response.status(), 200, "still serving after SIGHUP");
}

//! The access log: one line per request at the default level, written off
//! the request path, and none lost when keyrelay is told to stop.
//!
//! Lines go through a queue to a writer thread (src/ops/logging.rs). This
//! drives the real binary: N requests, then SIGTERM, then the process's
//! stderr must hold exactly N access-log lines, the last ones included.

use crate::support;

use crate::support::ops;

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use ops::AdminRelay;
use support::*;

/// Requests sent before the SIGTERM.
const REQUESTS: usize = 200;

#[tokio::test]
async fn every_request_logged_before_sigterm_is_written_before_exit() {
    let mut upstream = MockUpstream::start().await;
    // The default log level: what users run.
    let mut command = ops::command(&upstream.url());
    command.env_remove("RUST_LOG");
    let mut relay = AdminRelay::spawn(command).await;
    relay.wait_for_sigterm_handler().await;
    let client = http1_client();

    for n in 0..REQUESTS {
        let request = Request::get(relay.url(&format!("/v1/logged/{n}")))
            .body(empty())
            .expect("request");
        let sent = tokio::spawn(client.request(request));
        upstream.next().await.respond_full(200, "ok");
        let response = within("the response", sent)
            .await
            .expect("client task")
            .expect("response");
        let body = within("the body", response.into_body().collect()).await;
        assert_eq!(body.expect("body").to_bytes(), "ok");
    }
    relay.signal("TERM").await;
    let status = relay.exit_within(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");

    let log = relay.process.log();
    let logged: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("request finished") && line.contains("/v1/logged/"))
        .collect();
    assert_eq!(
        logged.len(),
        REQUESTS,
        "access-log lines for {REQUESTS} requests; the log ends with:\n{}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    let last = format!("/v1/logged/{}", REQUESTS - 1);
    assert!(
        logged.iter().any(|line| line.contains(&last)),
        "the last request's line was written"
    );
}

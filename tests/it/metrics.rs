//! Prometheus metrics after real traffic, read from the admin listener of the
//! real binary: request outcomes (ok, client cancelled, upstream failures),
//! upstream error kinds, byte counters, the latency histograms and the
//! in-flight gauge.
//!
//! Metrics are recorded when a request's record is dropped, which can trail
//! what the client sees by a moment, so each expectation polls `/metrics`
//! (bounded) until it holds rather than sleeping.

use crate::support;

use crate::support::raw;

use crate::support::ops;

use http::Request;
use ops::{AdminRelay, HeldStream, Scrape};
use raw::RawUpstream;
use support::*;

const ROUTE: (&str, &str) = ("route", "default");

const REQUESTS: &str = "keyrelay_requests_total";
const UPSTREAM_ERRORS: &str = "keyrelay_upstream_errors_total";
const ACTIVE: &str = "keyrelay_active_requests";
const REQUEST_BYTES: &str = "keyrelay_request_body_bytes_total";
const RESPONSE_BYTES: &str = "keyrelay_response_body_bytes_total";

fn requests(status: &'static str, outcome: &'static str) -> [(&'static str, &'static str); 3] {
    [ROUTE, ("status", status), ("outcome", outcome)]
}

fn error_kind(kind: &'static str) -> [(&'static str, &'static str); 2] {
    [ROUTE, ("kind", kind)]
}

/// Count and +Inf bucket of histogram `name` (without suffix), checked equal.
fn histogram_count(scrape: &Scrape, name: &str) -> f64 {
    let count = scrape.present(&format!("{name}_count"), &[ROUTE]);
    let inf = scrape.present(&format!("{name}_bucket"), &[ROUTE, ("le", "+Inf")]);
    assert_eq!(count, inf, "{name}: _count and the +Inf bucket agree");
    count
}

/// Sum of every `requests_total` series of the default route.
fn all_requests(scrape: &Scrape) -> f64 {
    scrape
        .samples()
        .iter()
        .filter(|sample| sample.name == REQUESTS && sample.has_label("route", "default"))
        .map(|sample| sample.value)
        .sum()
}

#[tokio::test]
async fn completed_streams_count_ok_bytes_histograms_and_the_active_gauge() {
    let mut upstream = MockUpstream::start().await;
    let relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let client = http1_client();

    let start = relay.scrape().await;
    assert_eq!(start.present(ACTIVE, &[ROUTE]), 0.0);
    assert_eq!(all_requests(&start), 0.0);
    assert_eq!(start.counter(RESPONSE_BYTES, &[ROUTE]), 0.0);

    let prompt = r#"{"prompt": "count my bytes", "stream": true}"#;
    let request = Request::post(relay.url("/v1/chat/completions"))
        .body(full(prompt))
        .expect("request");
    let mut first =
        HeldStream::open_request(&client, &mut upstream, request, http::Response::builder()).await;
    let mut second = HeldStream::open(&client, &mut upstream, &relay.url("/v1/other")).await;

    // Two streams held open: both in flight.
    let held = relay.scrape().await;
    assert_eq!(held.present(ACTIVE, &[ROUTE]), 2.0, "{}", held.0);
    assert_eq!(all_requests(&held), 0.0, "nothing has finished yet");

    first.lockstep("data: {\"token\": \"Hello\"}\n\n").await;
    first.lockstep("data: {\"token\": \", world\"}\n\n").await;
    first.lockstep("data: [DONE]\n\n").await;
    second.lockstep("data: only frame\n\n").await;

    let first_bytes = first.finish().await;
    relay.wait_for_sample(ACTIVE, &[ROUTE], 1.0).await;
    relay
        .wait_for_sample(REQUESTS, &requests("2xx", "ok"), 1.0)
        .await;
    let second_bytes = second.finish().await;
    let after = relay
        .wait_for_sample(REQUESTS, &requests("2xx", "ok"), 2.0)
        .await;
    println!("{}", after.0);

    assert_eq!(after.present(ACTIVE, &[ROUTE]), 0.0, "back to 0");
    assert_eq!(all_requests(&after), 2.0, "no other outcome was counted");
    assert_eq!(
        after.present(RESPONSE_BYTES, &[ROUTE]),
        (first_bytes + second_bytes) as f64,
        "response bytes are the bytes relayed"
    );
    assert_eq!(
        after.present(REQUEST_BYTES, &[ROUTE]),
        prompt.len() as f64,
        "request bytes are the body relayed upstream"
    );
    assert_eq!(
        histogram_count(&after, "keyrelay_time_to_first_byte_seconds"),
        2.0
    );
    assert_eq!(
        histogram_count(&after, "keyrelay_request_duration_seconds"),
        2.0
    );
    assert_eq!(histogram_count(&after, "keyrelay_overhead_seconds"), 2.0);
    // Three frames in the first stream make at least two gaps; one frame makes none.
    let gaps = histogram_count(&after, "keyrelay_frame_gap_seconds");
    assert!(gaps >= 2.0, "frame gaps observed: {gaps}");
    assert!(
        after.present("keyrelay_request_duration_seconds_sum", &[ROUTE]) > 0.0,
        "durations are recorded"
    );
    assert_eq!(
        after.counter(UPSTREAM_ERRORS, &error_kind("reset_mid_stream")),
        0.0
    );
}

#[tokio::test]
async fn client_cancelling_mid_stream_counts_client_cancelled() {
    let mut upstream = MockUpstream::start().await;
    let relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let client = http1_client();

    let mut stream = HeldStream::open(&client, &mut upstream, &relay.url("/v1/stream")).await;
    stream.lockstep("data: 1\n\n").await;
    stream.lockstep("data: 2\n\n").await;
    assert_eq!(relay.scrape().await.present(ACTIVE, &[ROUTE]), 1.0);

    let HeldStream {
        tx,
        dropped,
        body,
        relayed,
        ..
    } = stream;
    drop(body);
    dropped.wait().await;
    drop(tx);

    let after = relay
        .wait_for_sample(REQUESTS, &requests("2xx", "client_cancelled"), 1.0)
        .await;
    assert_eq!(after.counter(REQUESTS, &requests("2xx", "ok")), 0.0);
    assert_eq!(all_requests(&after), 1.0);
    assert_eq!(after.present(ACTIVE, &[ROUTE]), 0.0);
    assert_eq!(after.present(RESPONSE_BYTES, &[ROUTE]), relayed as f64);
    assert_eq!(
        after.counter(UPSTREAM_ERRORS, &error_kind("reset_mid_stream")),
        0.0,
        "a client leaving is not an upstream failure"
    );
}

#[tokio::test]
async fn refused_upstream_counts_upstream_refused() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let relay = AdminRelay::spawn(ops::command(&url)).await;

    for _ in 0..2 {
        let response = raw::get(relay.addr(), "/v1/models").await;
        assert_eq!(response.status(), 502, "{}", response.body_text());
        assert_eq!(response.json()["type"], "upstream_refused");
    }

    let after = relay
        .wait_for_sample(UPSTREAM_ERRORS, &error_kind("upstream_refused"), 2.0)
        .await;
    assert_eq!(
        after.present(REQUESTS, &requests("5xx", "upstream_error")),
        2.0
    );
    assert_eq!(all_requests(&after), 2.0);
    assert_eq!(after.present(ACTIVE, &[ROUTE]), 0.0);
    assert_eq!(
        histogram_count(&after, "keyrelay_time_to_first_byte_seconds"),
        0.0,
        "no upstream byte ever came"
    );
}

#[tokio::test]
async fn upstream_abort_mid_stream_counts_reset_mid_stream() {
    let mut upstream = RawUpstream::start().await;
    let relay = AdminRelay::spawn(ops::command(&upstream.url())).await;
    let client = http1_client();

    let pending = tokio::spawn(
        client.request(
            Request::get(relay.url("/v1/stream"))
                .body(empty())
                .expect("request"),
        ),
    );
    let mut conn = upstream.next_conn().await;
    conn.read_head().await;
    conn.send(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
         9\r\ndata: 1\n\n\r\n",
    )
    .await;
    let response = within("the response head", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert_eq!(
        next_data(&mut body).await.expect("frame").expect("data"),
        "data: 1\n\n"
    );
    // Gone without the terminating chunk.
    drop(conn);
    match next_data(&mut body).await {
        Some(Err(err)) => println!("client saw: {err:?}"),
        other => panic!("the client's stream must be cut, got {other:?}"),
    }

    let after = relay
        .wait_for_sample(UPSTREAM_ERRORS, &error_kind("reset_mid_stream"), 1.0)
        .await;
    assert_eq!(
        after.present(REQUESTS, &requests("2xx", "upstream_error")),
        1.0,
        "the status sent was 200; the outcome is the upstream's failure"
    );
    assert_eq!(all_requests(&after), 1.0);
    assert_eq!(after.present(RESPONSE_BYTES, &[ROUTE]), 9.0);
    assert_eq!(after.present(ACTIVE, &[ROUTE]), 0.0);
}

#[tokio::test]
async fn overloaded_refusal_counts_as_rejected_not_as_an_upstream_error() {
    let mut upstream = MockUpstream::start().await;
    let mut command = ops::command(&upstream.url());
    command.args(["--max-concurrent-requests", "1"]);
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();

    let mut held = HeldStream::open(&client, &mut upstream, &relay.url("/v1/stream")).await;
    held.lockstep("data: 1\n\n").await;
    let refused = raw::get(relay.addr(), "/v1/models").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.json()["type"], "overloaded");
    held.finish().await;

    let after = relay
        .wait_for_sample(REQUESTS, &requests("2xx", "ok"), 1.0)
        .await;
    println!("{}", after.0);
    // The upstream never saw the refused request: keyrelay refused it itself.
    assert_eq!(
        after.counter(UPSTREAM_ERRORS, &error_kind("overloaded")),
        0.0,
        "local overload counted as an upstream failure:\n{}",
        after.0
    );
    assert_eq!(
        after.counter(REQUESTS, &requests("5xx", "rejected")),
        1.0,
        "local overload should be outcome=\"rejected\":\n{}",
        after.0
    );
}

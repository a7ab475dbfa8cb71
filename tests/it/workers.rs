//! Serving threads (`workers`): the kernel spreads new connections over
//! every thread's listening socket, and the port stays keyrelay's alone.
//!
//! These run the real binary, which binds its port with `SO_REUSEPORT` and
//! gives each thread a socket of its own (a listener handed to
//! `keyrelay::run`, as the in-process tests do, is shared by the threads
//! instead; every other test exercises that path).

use crate::support::raw;
use crate::support::{binary, within, MockUpstream, RelayProcess, KEY};

/// Connections opened one after another, each for one request. Each lands
/// on a thread by a hash of its client port, so all 24 on one of two
/// threads would happen once in 2²³ runs.
const CONNECTIONS: usize = 24;

/// One request on a new connection, answered by `upstream`.
async fn get_through(relay: &RelayProcess, upstream: &mut MockUpstream) -> raw::RawResponse {
    let pending = tokio::spawn(raw::get(relay.addr, "/v1/models"));
    upstream.next().await.respond_full(200, "models");
    let response = within("the answer", pending).await.expect("join");
    assert_eq!(response.status(), 200, "{}", response.describe());
    response
}

/// The request number in keyrelay's `X-Request-Id` (`kr-PREFIX-NUMBER`).
fn request_number(response: &raw::RawResponse) -> u64 {
    let id = response.header("x-request-id").expect("an x-request-id");
    id.rsplit('-')
        .next()
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("{id:?} ends in a request number"))
}

/// Thread `i` of `n` numbers its requests `i + 1`, `i + 1 + n`, ...: with
/// two threads, odd numbers come from the first and even from the second,
/// so both parities showing up means both threads accepted connections.
#[tokio::test]
async fn new_connections_are_spread_over_every_serving_thread() {
    let mut upstream = MockUpstream::start().await;
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.url()])
        .args(["--workers", "2", "--warm-connections", "0"])
        .env("BASETEN_API_KEY", KEY);
    let relay = RelayProcess::spawn(command).await;

    let mut numbers = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let response = get_through(&relay, &mut upstream).await;
        numbers.push(request_number(&response));
    }
    let odd = numbers.iter().filter(|number| *number % 2 == 1).count();
    assert!(
        odd > 0 && odd < CONNECTIONS,
        "both threads should have served some of {CONNECTIONS} connections: {numbers:?}"
    );
    let mut unique = numbers.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        CONNECTIONS,
        "request numbers are unique: {numbers:?}"
    );
}

/// `SO_REUSEPORT` would let a second process of the same user bind the same
/// port and take half of the connections with its own key and settings; a
/// second keyrelay is refused the port instead, as without it.
#[tokio::test]
async fn a_second_keyrelay_on_the_same_port_is_refused() {
    let mut upstream = MockUpstream::start().await;
    let mut first = binary();
    first
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.url()])
        .env("BASETEN_API_KEY", KEY);
    let first = RelayProcess::spawn(first).await;

    let mut second = binary();
    second
        .args([
            "--listen",
            &first.addr.to_string(),
            "--upstream",
            &upstream.url(),
        ])
        .env("BASETEN_API_KEY", KEY);
    let output = within(
        "the second keyrelay to exit",
        tokio::process::Command::from(second).output(),
    )
    .await
    .expect("run the second keyrelay");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(69),
        "exit status; stderr: {stderr}"
    );
    assert!(
        stderr.contains("listen: cannot listen on"),
        "the error names the setting: {stderr}"
    );

    // The first still has the port to itself.
    get_through(&first, &mut upstream).await;
}

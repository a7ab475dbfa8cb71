//! The clients from Baseten's streaming guide, unchanged, against keyrelay:
//! `curl --no-buffer` and Python `requests` with `iter_content(1)`.
//!
//! Each runs as a real child process. The mock upstream sends token k+1 only
//! after the client process has written token k to its stdout, so a buffering
//! proxy would stall the test instead of passing it.

use crate::support;
use crate::support::python;

use std::process::Stdio;

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

const TOKENS: usize = 12;

/// Reads from `out` until `expected` has been received, then returns.
async fn read_until(out: &mut (impl AsyncRead + Unpin), seen: &mut Vec<u8>, expected: &[u8]) {
    let mut buf = [0u8; 256];
    within("the client to print the token", async {
        while !seen.ends_with(expected) {
            let n = out.read(&mut buf).await.expect("read client stdout");
            assert!(
                n > 0,
                "client exited early; got so far: {:?}",
                String::from_utf8_lossy(seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
}

/// Streams TOKENS tokens in lockstep to the client process `client(url)` builds.
async fn lockstep_through(client: impl FnOnce(String) -> Command) {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let mut client = client(relay.url("/production/predict"));
    client
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = client.spawn().expect("spawn client");
    let mut out = child.stdout.take().expect("stdout");

    let exchange = upstream.next().await;
    let auth: Vec<_> = exchange
        .request
        .headers()
        .get_all("authorization")
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        auth,
        [EXPECTED_AUTH],
        "the client's placeholder was replaced by the key"
    );
    let (mut tx, _dropped) = exchange.respond_streaming_with(
        http::Response::builder().header("content-type", "application/octet-stream"),
    );

    let mut seen = Vec::new();
    for k in 0..TOKENS {
        let token = format!(" tok{k}");
        tx.send_data(Bytes::from(token.clone()))
            .await
            .expect("send token");
        read_until(&mut out, &mut seen, token.as_bytes()).await;
    }
    drop(tx);
    let status = within("the client to exit", child.wait())
        .await
        .expect("wait");
    assert!(status.success(), "client failed: {status}");
    let expected: String = (0..TOKENS).map(|k| format!(" tok{k}")).collect();
    assert_eq!(String::from_utf8_lossy(&seen), expected);
    relay.stop().await;
}

const BODY: &str = r#"{"prompt": "What is the Mistral wind?", "stream": true}"#;

#[tokio::test]
async fn curl_no_buffer_prints_each_token_as_it_is_produced() {
    lockstep_through(|url| {
        let mut curl = Command::new("curl");
        curl.args([
            "--no-buffer",
            "--silent",
            "--show-error",
            "--fail",
            "-X",
            "POST",
        ])
        .args([
            "-H",
            "Authorization: Bearer placeholder-from-curl",
            "-d",
            BODY,
        ])
        .arg(url);
        curl
    })
    .await;
}

#[tokio::test]
async fn python_requests_iter_content_receives_tokens_one_by_one() {
    lockstep_through(|url| {
        let mut python = Command::new(python::interpreter());
        python
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/requests_stream.py"
            ))
            .args([url.as_str(), BODY, "1"]);
        python
    })
    .await;
}

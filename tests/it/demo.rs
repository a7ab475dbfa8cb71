//! `keyrelay demo`, the README's first command: it must stream tokens through
//! keyrelay with no network and no real key, keep serving, print commands that
//! work, and stop cleanly on SIGTERM.

use crate::support;

use std::process::Stdio;
use std::time::Duration;

use keyrelay::demo::mock_model::{tokens, ANSWER, TOKEN_INTERVAL};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Reads demo stdout lines until one contains `marker`, returning all lines read.
async fn lines_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    marker: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    within("the demo's output", async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            let done = line.contains(marker);
            seen.push(line);
            if done {
                return;
            }
        }
        panic!("demo exited before printing {marker:?}: {seen:#?}");
    })
    .await;
    seen
}

/// The first `http://` word following the word `label` on a line of `output`.
fn address_after(output: &[String], label: &str) -> String {
    output
        .iter()
        .find_map(|line| {
            let mut words = line.split_whitespace().skip_while(|w| *w != label);
            words.next()?;
            words.next().filter(|w| w.starts_with("http://"))
        })
        .unwrap_or_else(|| panic!("no address after {label:?} in {output:#?}"))
        .to_owned()
}

/// The program of the `python3 - <<'EOF'` command the demo printed.
fn printed_python(output: &[String]) -> String {
    let start = output
        .iter()
        .position(|line| line.trim() == "python3 - <<'EOF'")
        .unwrap_or_else(|| panic!("no Python command in {output:#?}"));
    let program: Vec<&str> = output[start + 1..]
        .iter()
        .map(String::as_str)
        .take_while(|line| *line != "EOF")
        .collect();
    program.join("\n") + "\n"
}

async fn curl(args: &[&str]) -> String {
    let output = within(
        "curl",
        Command::new("curl")
            .args(["--silent", "--show-error", "--no-buffer"])
            .args(args)
            .output(),
    )
    .await
    .expect("run curl");
    assert!(output.status.success(), "curl {args:?} failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn demo_streams_tokens_as_they_arrive_and_keeps_serving() {
    let mut demo = tokio::process::Command::from(binary());
    demo.args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = demo.spawn().expect("spawn demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let output = lines_until(&mut lines, "Press Ctrl-C").await;
    let text = output.join("\n");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(
        text.contains(ANSWER),
        "the streamed tokens rebuild the answer:\n{text}"
    );

    // One "+ N ms" line per token, in arrival order. The mock waits
    // TOKEN_INTERVAL between tokens, so if the tokens were relayed as they were
    // produced their arrival times span at least most of that; a buffering
    // proxy would deliver them all within a few milliseconds of each other.
    let arrivals: Vec<f64> = output
        .iter()
        .filter_map(|line| line.trim().strip_prefix('+'))
        .filter_map(|rest| rest.split("ms").next()?.trim().parse().ok())
        .collect();
    assert_eq!(
        arrivals.len(),
        tokens().len(),
        "one line per token:\n{text}"
    );
    assert!(arrivals.windows(2).all(|w| w[0] <= w[1]));
    let spread = Duration::from_secs_f64((arrivals[arrivals.len() - 1] - arrivals[0]) / 1e3);
    let produced_over = TOKEN_INTERVAL * (tokens().len() as u32 - 1);
    assert!(
        spread >= produced_over / 2,
        "tokens arrived within {spread:?} though produced over {produced_over:?}"
    );

    // It streamed a chat that asked for usage, and keyrelay counted it.
    let counted = format!(
        "keyrelay read the usage off the stream as it passed: 5 prompt + {} completion tokens",
        tokens().len()
    );
    assert!(text.contains(&counted), "{counted:?} in:\n{text}");

    // The demo keeps serving, and the commands it printed work with no key.
    let proxy = address_after(&output, "keyrelay");
    assert!(text.contains(&format!(
        "curl --no-buffer -X POST {proxy}/production/predict"
    )));
    let predicted = curl(&[
        "-X",
        "POST",
        &format!("{proxy}/production/predict"),
        "-d",
        r#"{"prompt": "hi", "stream": true}"#,
    ])
    .await;
    assert_eq!(predicted, ANSWER);
    let events = curl(&[
        &format!("{proxy}/v1/chat/completions"),
        "-d",
        r#"{"model": "mock", "stream": true, "messages": []}"#,
    ])
    .await;
    assert!(events.starts_with("data: {"), "{events}");
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");

    // The Python it printed streams the answer whole, é, €, Chinese and
    // emoji included (decoding each byte on its own raised
    // UnicodeDecodeError on the first of them).
    let python = printed_python(&output);
    let mut script = python::Script::spawn_code("the demo's Python snippet", &python);
    script.expect_line(ANSWER).await;
    script.success().await;

    // The browser page is served from its own origin, names keyrelay, and
    // keyrelay answers that origin's preflight (and nobody else's).
    let page = address_after(&output, "page");
    let html = curl(&[&page]).await;
    assert!(html.contains("getReader()"), "{html}");
    assert!(
        html.contains(&format!(r#""relay":"{proxy}""#)),
        "the page is told keyrelay's address: {proxy}"
    );
    let page_origin = page.trim_end_matches('/');
    let preflight = |origin: &str| {
        [
            "-i".to_owned(),
            "-X".to_owned(),
            "OPTIONS".to_owned(),
            format!("{proxy}/v1/chat/completions"),
            "-H".to_owned(),
            format!("Origin: {origin}"),
            "-H".to_owned(),
            "Access-Control-Request-Method: POST".to_owned(),
            "-H".to_owned(),
            "Access-Control-Request-Headers: content-type".to_owned(),
        ]
    };
    let args = preflight(page_origin);
    let answer = curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(
        answer.contains(&format!("access-control-allow-origin: {page_origin}")),
        "{answer}"
    );
    let args = preflight("http://localhost:1");
    let answer = curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // The mock behind it really requires the key keyrelay injects.
    let mock = address_after(&output, "endpoint");
    let refused = curl(&[
        "-X",
        "POST",
        &format!("{mock}/production/predict"),
        "-d",
        "{}",
    ])
    .await;
    assert!(refused.contains("missing or wrong Api-Key"), "{refused}");

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = within("the demo to exit", child.wait())
        .await
        .expect("wait");
    assert!(status.success(), "demo exits 0 on SIGTERM: {status}");
}

//! Request spans exported over OTLP: keyrelay in this process, a mock
//! model upstream, and a mock collector that decodes each export with an
//! independent protobuf decoder (support/otlp.rs).
//!
//! How a caller could make a span lie or leak, and what is checked: a
//! query string holding a key (never in a span), the upstream key (in no
//! attribute, event or byte of the export), a malformed or doubled
//! `traceparent` (a new trace, the caller's `tracestate` dropped), an
//! unsampled caller (no span, but the upstream still joins the trace), a
//! stream still open at shutdown (its span exported before exit).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;

use crate::support::ops::{sse, HeldStream};
use crate::support::otlp::{self, Span, SPAN_KIND_SERVER};
use crate::support::*;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// keyrelay in front of `upstream`, exporting to `collector` with the
/// OpenTelemetry variables `env` (a 50 ms batch delay unless given).
async fn traced_relay(
    upstream: &MockUpstream,
    collector: &MockUpstream,
    settings: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Relay {
    let endpoint = collector.url();
    let mut all = vec![("otlp_endpoint", endpoint.as_str())];
    all.extend_from_slice(settings);
    let mut sources = sources(&upstream.url(), &all);
    sources
        .env
        .insert("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "50".to_owned());
    for (name, value) in env {
        sources.env.insert((*name).to_owned(), (*value).to_owned());
    }
    Relay::from_sources(&sources).await
}

/// The next export the collector receives: its path, content type and
/// body, answered with `status`.
async fn next_export(collector: &mut MockUpstream) -> (String, String, Bytes) {
    let mut exchange = within("an export", collector.next()).await;
    let path = exchange.request.uri().path().to_owned();
    let content_type = exchange
        .request
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = within("the export's body", exchange.request.body_mut().collect())
        .await
        .expect("body")
        .to_bytes();
    exchange.respond(Response::new(empty()));
    (path, content_type, body)
}

/// The spans of the next export over OTLP/HTTP.
async fn next_spans(collector: &mut MockUpstream) -> (Vec<Span>, Bytes) {
    let (path, content_type, body) = next_export(collector).await;
    assert_eq!(path, "/v1/traces");
    assert_eq!(content_type, "application/x-protobuf");
    (otlp::spans(&otlp::decode(&body)), body)
}

fn traceparent(flags: &str) -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}")
}

/// The trace id, parent id and flags of a `traceparent` value.
fn parts_of(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    (
        parts[1].to_owned(),
        parts[2].to_owned(),
        parts[3].to_owned(),
    )
}

#[tokio::test]
async fn a_streamed_chat_is_one_span_in_the_callers_trace_with_its_tokens() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    let relay = traced_relay(&upstream, &collector, &[], &[]).await;
    let client = http1_client();
    let request = Request::post(relay.url("/v1/chat/completions?key=client-secret-in-query"))
        .header("content-type", "application/json")
        .header("traceparent", traceparent("01"))
        .header("tracestate", "vendor=opaque")
        .header("tracestate", "other=2")
        .body(full(r#"{"model":"llama","stream":true}"#))
        .expect("request");
    let mut stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;

    // The upstream joins the caller's trace as a child of keyrelay's span.
    let sent = stream.upstream_headers.clone();
    let (trace, parent, flags) = parts_of(sent["traceparent"].to_str().expect("ascii"));
    assert_eq!((trace.as_str(), flags.as_str()), (CALLER_TRACE, "01"));
    assert_ne!(parent, CALLER_SPAN, "keyrelay's own span id goes upstream");
    assert_eq!(sent["tracestate"], "vendor=opaque,other=2");

    // Streamed in lockstep: tracing holds nothing back.
    for frame in [
        "data: {\"model\":\"llama\\/3.3\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"model\":\"other\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ] {
        stream.lockstep(frame).await;
    }
    stream.finish().await;

    let (spans, raw) = next_spans(&mut collector).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let span = &spans[0];
    assert_eq!(otlp::hex(&span.trace_id), CALLER_TRACE);
    assert_eq!(otlp::hex(&span.parent_span_id), CALLER_SPAN);
    assert_eq!(otlp::hex(&span.span_id), parent, "the id the upstream saw");
    assert_eq!(span.kind, SPAN_KIND_SERVER);
    assert_eq!(span.name, "POST default");
    assert_eq!(
        span.trace_state, "vendor=opaque,other=2",
        "every header's entries"
    );
    assert_eq!(span.flags & 0xff, 1, "sampled");
    assert_eq!(span.flags & 0x300, 0x300, "a remote parent");
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    assert_eq!(span.int("http.response.status_code"), Some(200));
    assert_eq!(span.text("http.request.method"), Some("POST"));
    assert_eq!(span.text("url.path"), Some("/v1/chat/completions"));
    assert_eq!(span.text("keyrelay.route"), Some("default"));
    assert_eq!(span.text("keyrelay.outcome"), Some("ok"));
    assert_eq!(span.text("keyrelay.upstream.address"), Some("127.0.0.1"));
    assert_eq!(span.text("url.scheme"), Some("http"));
    assert_eq!(span.text("gen_ai.operation.name"), Some("chat"));
    // The first model the response names (an escaped one, unescaped).
    assert_eq!(span.text("gen_ai.response.model"), Some("llama/3.3"));
    assert_eq!(span.int("gen_ai.usage.input_tokens"), Some(11));
    assert_eq!(span.int("gen_ai.usage.output_tokens"), Some(2));
    assert!(matches!(
        span.attribute("keyrelay.time_to_first_token"),
        Some(otlp::any_value::Value::Double(seconds)) if *seconds > 0.0
    ));
    let events: Vec<&str> = span
        .events
        .iter()
        .map(|event| event.name.as_str())
        .collect();
    assert!(events.contains(&"first_token"), "{events:?}");
    for event in &span.events {
        assert!(
            (span.start_time_unix_nano..=span.end_time_unix_nano).contains(&event.time_unix_nano),
            "{} within the span",
            event.name
        );
    }
    assert!(span.status.is_none(), "a served request is no error");

    // Neither the upstream key nor the query string is in any byte sent.
    let text = String::from_utf8_lossy(&raw);
    for secret in [KEY, "client-secret-in-query", "Api-Key"] {
        assert!(!text.contains(secret), "{secret} leaked into the export");
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_malformed_or_doubled_traceparent_starts_a_new_trace_without_the_callers_state() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    let relay = traced_relay(&upstream, &collector, &[], &[]).await;
    let client = http1_client();
    let broken = [
        vec![format!(
            "00-{}-{CALLER_SPAN}-01",
            CALLER_TRACE.to_uppercase()
        )],
        vec![format!("ff-{CALLER_TRACE}-{CALLER_SPAN}-01")],
        vec![format!("00-{CALLER_TRACE}-0000000000000000-01")],
        vec![traceparent("01"), traceparent("01")],
        vec![],
    ];
    for values in broken {
        let mut request = Request::get(relay.url("/v1/models")).header("tracestate", "vendor=x");
        for value in &values {
            request = request.header("traceparent", value);
        }
        let request = request.body(empty()).expect("request");
        let (seen, response) = round_trip(&client, &mut upstream, request, ok("{}")).await;
        assert_eq!(response.status(), 200);
        let outgoing = header_values(&seen, "traceparent");
        assert_eq!(outgoing.len(), 1, "{values:?}: one traceparent upstream");
        let (trace, _, flags) = parts_of(outgoing[0]);
        assert_ne!(trace, CALLER_TRACE, "{values:?}: a new trace");
        assert_eq!(flags, "01", "parentbased_always_on samples a new root");
        assert!(
            seen.get("tracestate").is_none(),
            "{values:?}: state dropped"
        );

        let (spans, _) = next_spans(&mut collector).await;
        assert_eq!(spans.len(), 1);
        assert_eq!(otlp::hex(&spans[0].trace_id), trace);
        assert!(spans[0].parent_span_id.is_empty(), "a root span");
        assert_eq!(spans[0].flags & 0x300, 0x100, "no remote parent");
    }
    relay.stop().await;
}

#[tokio::test]
async fn an_unsampled_caller_gets_no_span_but_the_upstream_still_joins_its_trace() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    let relay = traced_relay(&upstream, &collector, &[], &[]).await;
    let client = http1_client();
    for flags in ["00", "01"] {
        let request = Request::get(relay.url(&format!("/v1/models/{flags}")))
            .header("traceparent", traceparent(flags))
            .body(empty())
            .expect("request");
        let (seen, _) = round_trip(&client, &mut upstream, request, ok("{}")).await;
        let (trace, parent, sent_flags) = parts_of(seen["traceparent"].to_str().expect("ascii"));
        assert_eq!((trace.as_str(), sent_flags.as_str()), (CALLER_TRACE, flags));
        assert_ne!(parent, CALLER_SPAN);
    }
    // Only the sampled request's span is exported.
    let (spans, _) = next_spans(&mut collector).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].text("url.path"), Some("/v1/models/01"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.nothing_received(), "no second export");
    relay.stop().await;
}

#[tokio::test]
async fn with_tracing_off_trace_headers_pass_untouched() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();
    let value = traceparent("01");
    let request = Request::get(relay.url("/v1/models"))
        .header("traceparent", &value)
        .header("tracestate", "vendor=opaque")
        .body(empty())
        .expect("request");
    let (seen, _) = round_trip(&client, &mut upstream, request, ok("{}")).await;
    assert_eq!(seen["traceparent"], value.as_str());
    assert_eq!(seen["tracestate"], "vendor=opaque");
    let request = Request::get(relay.url("/v1/models"))
        .body(empty())
        .expect("request");
    let (seen, _) = round_trip(&client, &mut upstream, request, ok("{}")).await;
    assert!(seen.get("traceparent").is_none(), "none is made up");
    relay.stop().await;
}

#[tokio::test]
async fn a_stream_open_at_shutdown_has_its_span_exported_before_exit() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    // A batch delay far beyond the test: only the flush at shutdown sends it.
    let relay = traced_relay(
        &upstream,
        &collector,
        &[("shutdown_grace", "10s")],
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    )
    .await;
    let client = http1_client();
    let request = Request::get(relay.url("/v1/stream"))
        .body(empty())
        .expect("request");
    let mut stream = HeldStream::open_request(&client, &mut upstream, request, sse()).await;
    stream.lockstep("data: one\n\n").await;
    let stopping = tokio::spawn(relay.stop());
    // The stream goes on during the drain, then ends.
    stream.lockstep("data: two\n\n").await;
    let exported = tokio::spawn(async move { next_spans(&mut collector).await });
    stream.finish().await;
    within("keyrelay to drain", stopping)
        .await
        .expect("stopped");
    // Sent and answered before `run` returned, not by a task left behind.
    assert!(exported.is_finished(), "the span was exported before exit");
    let (spans, _) = exported.await.expect("export");
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].text("url.path"), Some("/v1/stream"));
    assert_eq!(spans[0].text("keyrelay.outcome"), Some("ok"));
}

#[tokio::test]
async fn a_failed_upstream_is_an_error_span_and_a_retry_an_event() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    let relay = traced_relay(
        &upstream,
        &collector,
        &[("retry_on", "503"), ("retry_max_wait", "100ms")],
        &[],
    )
    .await;
    let client = http1_client();
    let pending = tokio::spawn(
        client.request(
            Request::get(relay.url("/v1/models"))
                .body(empty())
                .expect("request"),
        ),
    );
    upstream.next().await.respond_full(503, "busy");
    upstream.next().await.respond_full(200, "{}");
    let response = within("the answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    let (spans, _) = next_spans(&mut collector).await;
    let retry = spans[0]
        .events
        .iter()
        .find(|event| event.name == "retry")
        .expect("a retry event");
    assert!(matches!(
        otlp::find(&retry.attributes, "http.response.status_code"),
        Some(otlp::any_value::Value::Int(503))
    ));
    assert_eq!(spans[0].int("keyrelay.attempts"), Some(2));

    // An upstream that answers nothing: the span is an error.
    let down = closed_port();
    let relay_down = traced_relay(
        &MockUpstream::start().await,
        &collector,
        &[("upstream", &format!("http://127.0.0.1:{down}"))],
        &[],
    )
    .await;
    let response = client
        .request(
            Request::get(relay_down.url("/v1/models"))
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), 502);
    let (spans, _) = next_spans(&mut collector).await;
    let status = spans[0].status.as_ref().expect("a status");
    assert_eq!(status.code, 2, "ERROR");
    assert_eq!(spans[0].text("error.type"), Some("upstream_error"));
    relay.stop().await;
    relay_down.stop().await;
}

#[tokio::test]
async fn spans_go_over_grpc_to_a_grpc_collector() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    let relay = traced_relay(&upstream, &collector, &[("otlp_protocol", "grpc")], &[]).await;
    let client = http1_client();
    let request = Request::get(relay.url("/v1beta/models/gemini-2.0-flash:generateContent"))
        .header("traceparent", traceparent("01"))
        .body(empty())
        .expect("request");
    round_trip(&client, &mut upstream, request, ok("{}")).await;

    let mut exchange = within("a gRPC export", collector.next()).await;
    assert_eq!(exchange.request.version(), http::Version::HTTP_2);
    assert_eq!(
        exchange.request.uri().path(),
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    assert_eq!(
        exchange.request.headers()["content-type"],
        "application/grpc"
    );
    let body = exchange
        .request
        .body_mut()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    // A gRPC message: uncompressed, then its length.
    assert_eq!(body[0], 0);
    let length = u32::from_be_bytes(body[1..5].try_into().expect("length")) as usize;
    assert_eq!(length, body.len() - 5);
    let spans = otlp::spans(&otlp::decode(&body[5..]));
    assert_eq!(otlp::hex(&spans[0].trace_id), CALLER_TRACE);
    assert_eq!(
        spans[0].text("gen_ai.request.model"),
        Some("gemini-2.0-flash")
    );
    // A trailers-only answer: grpc-status in the headers.
    exchange.respond(
        Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(empty())
            .expect("answer"),
    );
    relay.stop().await;
}

#[test]
fn trace_settings_keyrelay_would_misread_stop_startup_naming_them() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let cases: [(&[(&str, &str)], &str); 8] = [
        (
            &[endpoint, ("OTEL_TRACES_SAMPLER", "sometimes")],
            "OTEL_TRACES_SAMPLER",
        ),
        (
            &[
                endpoint,
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            "OTEL_TRACES_SAMPLER",
        ),
        (
            &[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            &[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")],
            "OTEL_TRACES_EXPORTER",
        ),
        (
            &[endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "x-team")],
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (
            &[endpoint, ("OTEL_BSP_SCHEDULE_DELAY", "soon")],
            "OTEL_BSP_SCHEDULE_DELAY",
        ),
        (
            &[(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://user:hunter2-secret@127.0.0.1:4318",
            )],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://127.0.0.1")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ];
    for (env, named) in cases {
        let mut sources = sources("http://127.0.0.1:9", &[]);
        for (name, value) in env {
            sources.env.insert((*name).to_owned(), (*value).to_owned());
        }
        let err = keyrelay::config::load(&sources)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(named), "{env:?}: {err}");
        assert!(
            !err.contains("hunter2"),
            "a password is never echoed: {err}"
        );
    }
    // A protocol with no collector would do nothing.
    let lone = sources("http://127.0.0.1:9", &[("otlp_protocol", "grpc")]);
    let err = keyrelay::config::load(&lone)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("otlp_protocol") && err.contains("otlp_endpoint"),
        "{err}"
    );
    // Collector headers are secret: a bad value is named, never shown.
    let mut headers = sources(
        "http://127.0.0.1:9",
        &[("otlp_endpoint", "http://127.0.0.1:4318")],
    );
    headers.env.insert(
        "OTEL_EXPORTER_OTLP_HEADERS".to_owned(),
        "x-team=secret-team-key%0A".to_owned(),
    );
    let err = keyrelay::config::load(&headers)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("x-team") && !err.contains("secret-team-key"),
        "{err}"
    );
    // Off: OTEL_SDK_DISABLED wins over an endpoint, and nothing is checked.
    let mut disabled = sources("http://127.0.0.1:9", &[]);
    for (name, value) in [
        endpoint,
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_SAMPLER", "x"),
    ] {
        disabled.env.insert(name.to_owned(), value.to_owned());
    }
    let config = keyrelay::config::load(&disabled).expect("valid");
    assert!(config.traces.is_none());
}

#[tokio::test]
async fn what_a_client_sends_is_bounded_in_the_span() {
    let mut upstream = MockUpstream::start().await;
    let mut collector = MockUpstream::start().await;
    let relay = traced_relay(&upstream, &collector, &[], &[]).await;
    let client = http1_client();
    let long_path = format!("/v1/{}", "p".repeat(20_000));
    let long_state = format!("vendor={}", "s".repeat(2_000));
    let request = Request::get(relay.url(&long_path))
        .header("traceparent", traceparent("01"))
        .header("tracestate", &long_state)
        .body(empty())
        .expect("request");
    let (seen, _) = round_trip(&client, &mut upstream, request, ok("{}")).await;
    // Propagated whole: keyrelay does not edit the caller's state.
    assert_eq!(seen["tracestate"], long_state.as_str());
    let (spans, raw) = next_spans(&mut collector).await;
    let path = spans[0].text("url.path").expect("url.path");
    assert!(
        path.len() <= 1024 && long_path.starts_with(path),
        "{}",
        path.len()
    );
    assert!(
        spans[0].trace_state.is_empty(),
        "an overlong tracestate is not recorded"
    );
    assert!(
        raw.len() < 4096,
        "the export stays small: {} bytes",
        raw.len()
    );
    relay.stop().await;
}

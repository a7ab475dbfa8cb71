//! `auth_query`: the key in a query parameter (Gemini's `?key=`) instead of
//! a header.
//!
//! What is shown, at a recording upstream: the key goes last, once,
//! percent-encoded, and no header carries it; every spelling of a client's
//! own parameter of that name is removed (`KEY=`, `%6Bey=`, `key[]=`, after
//! a `;`, bare, empty), the path (a `%3F` in it) and the other parameters
//! are left as written; it works with every credential source; settings
//! that could not work stop startup naming them; and the key, now part of
//! the upstream URI, appears in no log line at trace level over HTTP/1.1 or
//! HTTP/2, through a stream, a 401, a retried 500 and a refused connection,
//! nor in any answer keyrelay writes itself.

use http::Request;
use keyrelay::config::OverrideValue;

use crate::support::recording_upstream::{Recorder, SeenRequest};
use crate::support::token_endpoint::{Method, TokenEndpoint, CLIENT_ID, CLIENT_SECRET, SCOPE};
use crate::support::*;

/// A Gemini key with characters a query must encode.
const GEMINI_KEY: &str = "AIza-test+key/1=&x";
const GEMINI_KEY_ENCODED: &str = "AIza-test%2Bkey%2F1%3D%26x";
const STREAM_PATH: &str = "/v1beta/models/gemini-x:streamGenerateContent";

async fn send(relay: &Relay, method: &str, target: &str) -> u16 {
    let request = Request::builder()
        .method(method)
        .uri(relay.url(target))
        .header("x-goog-api-key", "client-own-key")
        .header("authorization", "Bearer client-own-key")
        .body(full(r#"{"contents": []}"#))
        .expect("request");
    let response = within("keyrelay's answer", http1_client().request(request))
        .await
        .expect("response");
    response.status().as_u16()
}

/// Sends `target` through `relay` and returns what the recorder received.
async fn seen(relay: &Relay, recorder: &Recorder, target: &str) -> SeenRequest {
    let before = recorder.counts();
    assert_eq!(send(relay, "POST", target).await, 200, "{target}");
    let mut seen = recorder.requests_since(before);
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.remove(0)
}

/// The gemini preset with `auth_query = "key"`, [`GEMINI_KEY`] in its variable.
fn gemini_sources(upstream: &str) -> keyrelay::config::Sources {
    let mut sources = sources(upstream, &[("provider", "gemini"), ("auth_query", "key")]);
    sources
        .env
        .insert("GEMINI_API_KEY".to_owned(), GEMINI_KEY.to_owned());
    sources
}

#[tokio::test]
async fn the_gemini_preset_with_auth_query_sends_the_key_last_in_the_query_only() {
    let recorder = Recorder::start().await;
    let relay = Relay::from_sources(&gemini_sources(&recorder.url())).await;
    let expected = format!("{STREAM_PATH}?alt=sse&key={GEMINI_KEY_ENCODED}");
    let seen_request = seen(&relay, &recorder, &format!("{STREAM_PATH}?alt=sse")).await;
    assert_eq!(seen_request.method, "POST");
    assert_eq!(seen_request.target, expected);
    assert!(
        seen_request.header("x-goog-api-key").is_empty(),
        "{seen_request:?}"
    );
    assert!(
        seen_request.header("authorization").is_empty(),
        "{seen_request:?}"
    );
    assert_eq!(seen_request.body, br#"{"contents": []}"#);
    for (name, value) in &seen_request.headers {
        let value = String::from_utf8_lossy(value);
        assert!(
            !value.contains(GEMINI_KEY) && !value.contains(GEMINI_KEY_ENCODED),
            "{name} carries the key"
        );
    }

    // A client's own key, however spelled, never survives or doubles.
    for client_query in [
        "alt=sse&key=theirs",
        "key=theirs&alt=sse",
        "alt=sse&KEY=theirs&%6Bey=theirs&key[]=theirs;key=theirs",
        "key&alt=sse&key=",
        "%256Bey=theirs&alt=sse&+key+=theirs&key%5B0%5D=theirs",
        "alt=sse&key%00=theirs&Key%00.x=theirs",
    ] {
        let seen_request = seen(&relay, &recorder, &format!("{STREAM_PATH}?{client_query}")).await;
        assert_eq!(seen_request.target, expected, "{client_query}");
    }
    // The path is the client's: a `%3F` in it is no query.
    let seen_request = seen(
        &relay,
        &recorder,
        "/v1beta/models/m%3Fkey=theirs:generateContent",
    )
    .await;
    assert_eq!(
        seen_request.target,
        format!("/v1beta/models/m%3Fkey=theirs:generateContent?key={GEMINI_KEY_ENCODED}")
    );
    // Other parameters stay as written, `;` included.
    let seen_request = seen(&relay, &recorder, "/v1beta/models?pageSize=5;x=1&keys=2").await;
    assert_eq!(
        seen_request.target,
        format!("/v1beta/models?pageSize=5;x=1&keys=2&key={GEMINI_KEY_ENCODED}")
    );
    relay.stop().await;
}

/// `auth_query` only places the value: the key from a file, a helper
/// command and an OAuth2 token endpoint goes in the query alike, and a
/// written `auth_template` renders it first.
#[tokio::test]
async fn every_credential_source_goes_in_the_query() {
    let recorder = Recorder::start().await;
    let key_file = temp_file("auth-query", "key", "file key/2\n");
    let endpoint = TokenEndpoint::start(Method::Basic, 600.0);
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("key_file", key_file.path().to_owned())],
            "key=file%20key%2F2",
        ),
        (
            vec![("key_command", "echo,cmd+token".to_owned())],
            "key=cmd%2Btoken",
        ),
        (
            vec![
                ("oauth_token_url", endpoint.url()),
                ("oauth_client_id", CLIENT_ID.to_owned()),
                ("oauth_client_secret_env", "TEST_SECRET".to_owned()),
                ("oauth_scope", SCOPE.to_owned()),
            ],
            "key=oa-token-",
        ),
        (
            vec![("auth_template", "T.{key}".to_owned())],
            "key=T.kr-test-KEY-5f3c9a1e7b2d4c6f",
        ),
    ];
    for (settings, expected) in cases {
        let mut sources = sources(&recorder.url(), &[("auth_query", "key")]);
        sources
            .env
            .insert("TEST_SECRET".to_owned(), CLIENT_SECRET.to_owned());
        for (key, value) in &settings {
            let value = if *key == "key_command" {
                OverrideValue::List(value.split(',').map(str::to_owned).collect())
            } else {
                OverrideValue::Text(value.clone())
            };
            sources.set(key, value);
        }
        let relay = Relay::from_sources(&sources).await;
        let seen_request = seen(&relay, &recorder, "/v1/x?a=1").await;
        let query = seen_request.target.split_once('?').expect("query").1;
        assert!(
            query.starts_with(&format!("a=1&{expected}")),
            "{settings:?}: {query}"
        );
        assert!(
            seen_request.header("authorization").is_empty(),
            "{settings:?}: {seen_request:?}"
        );
        relay.stop().await;
    }
}

fn load_error(settings: &[(&str, &str)], file: Option<&str>) -> String {
    let mut sources = sources("https://a.test", settings);
    let temp = file.map(|text| temp_file("auth-query", "routes.toml", text));
    sources.file = temp.as_ref().map(|file| file.0.clone());
    match keyrelay::config::load(&sources) {
        Ok(_) => panic!("{settings:?} {file:?} loaded"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn auth_query_settings_that_cannot_work_stop_startup_naming_them() {
    for name in ["k y", "key=x", "a&b", "k;y", "%6Bey", "key[]", "k#", "ключ"] {
        let err = load_error(&[("auth_query", name)], None);
        assert!(err.contains("auth_query"), "{name}: {err}");
        assert!(
            err.contains("not a plain query parameter name"),
            "{name}: {err}"
        );
    }
    // The key in the query and a header named for it: one would do nothing.
    let err = load_error(
        &[("auth_query", "key"), ("auth_header", "x-goog-api-key")],
        None,
    );
    assert!(
        err.contains("auth_header: auth_query = \"key\" is set too"),
        "{err}"
    );

    // On routes: a route's own header where it inherits auth_query, and a
    // route's own bad name, each named by route.
    let err = load_error(
        &[("auth_query", "key")],
        Some(
            "[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"https://a.test\"\n\
             key_env = \"BASETEN_API_KEY\"\nauth_header = \"api-key\"\n\n\
             [[routes]]\nname = \"b\"\nprefix = \"/b\"\nupstream = \"https://b.test\"\n\
             key_env = \"BASETEN_API_KEY\"\nauth_query = \"k y\"\n",
        ),
    );
    assert!(
        err.contains(r#"routes[0] "a".auth_header: the route inherits the top-level auth_query"#),
        "{err}"
    );
    assert!(err.contains(r#"routes[1] "b".auth_query: "k y""#), "{err}");

    // A route's own auth_query beside the top level's header is fine (the
    // header is the default route's), and so is a route turning it off.
    let file = temp_file(
        "auth-query",
        "ok.toml",
        "auth_header = \"x-top\"\n\n[[routes]]\nname = \"g\"\nprefix = \"/g\"\n\
         upstream = \"https://g.test\"\nkey_env = \"BASETEN_API_KEY\"\nauth_query = \"key\"\n",
    );
    let mut sources = sources("https://a.test", &[]);
    sources.file = Some(file.0.clone());
    let config = keyrelay::config::load(&sources).expect("loads");
    let route = config.routes.iter().find(|r| r.name == "g").expect("g");
    assert_eq!(route.credential.query.as_deref(), Some("key"));
    let default = config
        .routes
        .iter()
        .find(|r| r.name == "default")
        .expect("default");
    assert_eq!(default.credential.query, None);

    // A route turning an inherited auth_query off uses its own header.
    let file = temp_file(
        "auth-query",
        "off.toml",
        "auth_query = \"key\"\n\n[[routes]]\nname = \"h\"\nprefix = \"/h\"\n\
         upstream = \"https://h.test\"\nkey_env = \"BASETEN_API_KEY\"\nauth_query = \"\"\n\
         auth_header = \"api-key\"\n",
    );
    let mut off = crate::support::sources("https://a.test", &[]);
    off.file = Some(file.0.clone());
    let config = keyrelay::config::load(&off).expect("loads");
    let route = config.routes.iter().find(|r| r.name == "h").expect("h");
    assert_eq!(route.credential.query, None);
    assert_eq!(route.credential.header, "api-key");
    let default = config
        .routes
        .iter()
        .find(|r| r.name == "default")
        .expect("default");
    assert_eq!(default.credential.query.as_deref(), Some("key"));
}

/// keyrelay as a process at RUST_LOG=trace, the key in the query of every
/// upstream request, exercised through a stream, a 401, a 500 retried and
/// a refused connection (502, retried too); nothing it printed, and
/// nothing it answered itself, contains the key.
async fn scan_at_trace(http2: bool) {
    let mut upstream = MockUpstream::start().await;
    let dead = closed_port();
    let file = temp_file(
        "auth-query",
        "scan.toml",
        format!(
            "auth_query = \"key\"\nretry_on = [\"500\", \"connect\"]\n\n\
             [[routes]]\nname = \"dead\"\nprefix = \"/dead\"\n\
             upstream = \"http://127.0.0.1:{dead}\"\nkey_env = \"BASETEN_API_KEY\"\n"
        ),
    );
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.url()])
        .args(["--warm-connections", "0", "--config", file.path()])
        .args(if http2 {
            &["--upstream-http2"][..]
        } else {
            &[]
        })
        .env("BASETEN_API_KEY", KEY)
        .env("RUST_LOG", "trace");
    let mut relay = RelayProcess::spawn(command).await;
    let client = http1_client();
    let url = |path: &str| format!("http://{}{path}", relay.addr);
    let with_key = format!("key={KEY}");

    // A stream.
    let pending = tokio::spawn(
        client.request(
            Request::post(url("/v1/stream?alt=sse&key=client-own"))
                .body(full("{}"))
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    assert_eq!(
        exchange.request.uri().query(),
        Some(&*format!("alt=sse&{with_key}"))
    );
    let (mut tx, _dropped) = exchange.respond_streaming();
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    let mut body = response.into_body();
    tx.send_data(bytes::Bytes::from("data: a\n\n"))
        .await
        .expect("send");
    next_data(&mut body).await.expect("frame").expect("data");
    drop(tx);
    while next_data(&mut body).await.is_some() {}

    // A 401, and a 500 tried again.
    let mut answers = Vec::new();
    for statuses in [&[401][..], &[500, 200][..]] {
        let pending = tokio::spawn(
            client.request(
                Request::get(url("/v1/models?key=x"))
                    .body(empty())
                    .expect("request"),
            ),
        );
        for status in statuses {
            let exchange = upstream.next().await;
            assert_eq!(exchange.request.uri().query(), Some(&*with_key));
            exchange.respond_full(*status, r#"{"error": "no"}"#);
        }
        let response = within("response", pending)
            .await
            .expect("join")
            .expect("response");
        answers.push(format!("{:?} {:?}", response.status(), response.headers()));
        answers.push(String::from_utf8_lossy(&body_bytes(response).await).into_owned());
    }
    // A refused connection, tried again, then 502.
    let response = crate::support::raw::get(relay.addr, "/dead/v1/models?alt=sse").await;
    assert_eq!(response.status(), 502, "{}", response.body_text());
    answers.push(format!("{response:?}"));
    answers.push(response.body_text());

    let output = relay.stop_and_output().await;
    assert!(output.contains("TRACE"), "trace logging was on:\n{output}");
    // The startup line names where the key goes, never the key.
    assert!(output.contains("query=\"key\""), "{output}");
    for text in answers.iter().chain([&output]) {
        assert!(!text.contains(KEY), "the key appeared in:\n{text}");
        assert!(
            !text.contains("client-own"),
            "a client's key appeared in:\n{text}"
        );
    }
}

#[tokio::test]
async fn the_query_key_never_appears_in_trace_logs_or_answers_http1() {
    scan_at_trace(false).await;
}

#[tokio::test]
async fn the_query_key_never_appears_in_trace_logs_or_answers_http2() {
    scan_at_trace(true).await;
}

/// An upstream that echoes the request's URL in its answer (a redirect that
/// keeps the query, a `Link`, a debugging header) does not hand the key to
/// the client: `Location` loses the parameter, other headers holding the
/// key are removed.
#[tokio::test]
async fn the_key_is_taken_out_of_the_upstreams_response_headers() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::from_sources(&gemini_sources(&upstream.url())).await;
    let pending = tokio::spawn(
        http1_client().request(
            Request::get(relay.url("/v1beta/models?alt=sse"))
                .body(empty())
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    let echoed = format!("{}{}", upstream.url(), exchange.request.uri());
    assert!(
        echoed.ends_with(&format!("?alt=sse&key={GEMINI_KEY_ENCODED}")),
        "{echoed}"
    );
    exchange.respond(
        http::Response::builder()
            .status(301)
            .header(
                "location",
                format!("{echoed}#top").replace("/models?", "/models/?"),
            )
            .header("content-location", &echoed)
            .header("link", format!("<{echoed}>; rel=next"))
            .header("x-debug-key", GEMINI_KEY)
            .header("x-upstream", "kept")
            .body(empty())
            .expect("response"),
    );
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 301);
    let headers = response.headers();
    assert_eq!(
        headers["location"],
        format!("{}/v1beta/models/?alt=sse#top", upstream.url())
    );
    assert_eq!(
        headers["content-location"],
        format!("{}/v1beta/models?alt=sse", upstream.url())
    );
    assert!(!headers.contains_key("link"), "{headers:?}");
    assert!(!headers.contains_key("x-debug-key"), "{headers:?}");
    assert_eq!(headers["x-upstream"], "kept");
    let all = format!("{headers:?}");
    assert!(
        !all.contains(GEMINI_KEY_ENCODED) && !all.contains(GEMINI_KEY),
        "{all}"
    );
    relay.stop().await;
}

/// The key taken out of an answer is the one its request carried, not
/// the route's current one: an upstream that answers after the credential
/// rotated (a long first byte, a stream's headers) and echoes the key it
/// was sent still does not hand it to the client.
#[tokio::test]
async fn the_key_a_request_carried_is_taken_out_of_an_answer_after_a_rotation() {
    let mut upstream = MockUpstream::start().await;
    let dir = unique_temp_path("auth-query", "rotating");
    std::fs::create_dir_all(&dir).expect("dir");
    let runs = dir.join("runs");
    // Each run prints a new key (qk-secret-<run>) living 2 s: refreshed
    // after about 1.4 s.
    let script = format!(
        r#"n=$(( $(cat {runs} 2>/dev/null || echo 0) + 1 )); echo $n > {runs}; echo '{{"token": "qk-secret-'$n'", "expires_in": 2}}'"#,
        runs = runs.display()
    );
    let mut sources = gemini_sources(&upstream.url());
    sources.set(
        "key_command",
        OverrideValue::List(vec!["sh".into(), "-c".into(), script]),
    );
    let relay = Relay::from_sources(&sources).await;
    let pending = tokio::spawn(
        http1_client().request(
            Request::get(relay.url("/v1beta/models"))
                .body(empty())
                .expect("request"),
        ),
    );
    let exchange = upstream.next().await;
    let uri = exchange.request.uri().to_string();
    let sent = uri
        .split_once("key=")
        .expect("the key in the query")
        .1
        .to_owned();
    assert!(sent.starts_with("qk-secret-"), "{uri}");
    // The upstream thinks until the route's key has rotated.
    let run_count = || {
        std::fs::read_to_string(&runs)
            .ok()
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let first = run_count();
    within("a rotation", async {
        while run_count() == first {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    exchange.respond(
        http::Response::builder()
            .header("x-debug-key", &sent)
            .header("x-upstream", "kept")
            .body(empty())
            .expect("response"),
    );
    let response = within("response", pending)
        .await
        .expect("join")
        .expect("response");
    let headers = response.headers();
    assert_eq!(headers["x-upstream"], "kept");
    assert!(!format!("{headers:?}").contains(&sent), "{headers:?}");
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

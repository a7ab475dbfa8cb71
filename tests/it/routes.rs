//! Several routes on one port: longest prefix wins, the prefix is stripped
//! (or kept), each route injects its own key in its own header, and a path
//! matching no route gets a 404 listing the prefixes (never keys).

use crate::support;

use std::collections::HashMap;

use http::Request;
use keyrelay::config::{self, Sources};
use support::*;

const OTHER_KEY: &str = "kr-test-OTHER-KEY-91b2c3";

/// Starts keyrelay in-process from a TOML route table; the file lives as
/// long as the returned [`TempFile`].
async fn start_with_file(toml: &str) -> (Relay, TempFile) {
    let file = temp_file("routes", "keyrelay.toml", toml);
    let sources = Sources {
        file: Some(file.0.clone()),
        env: HashMap::from([
            ("BASETEN_API_KEY".to_owned(), KEY.to_owned()),
            ("OTHER_KEY".to_owned(), OTHER_KEY.to_owned()),
        ]),
        ..Sources::default()
    };
    (Relay::from_sources(&sources).await, file)
}

async fn get(
    addr: std::net::SocketAddr,
    path: &str,
) -> tokio::task::JoinHandle<http::Response<hyper::body::Incoming>> {
    let client = http1_client();
    let request = Request::get(format!("http://{addr}{path}"))
        .header("authorization", "Bearer placeholder")
        .body(empty())
        .expect("request");
    tokio::spawn(async move { client.request(request).await.expect("response") })
}

#[tokio::test]
async fn longest_prefix_wins_and_each_route_injects_its_own_key() {
    let mut llama = MockUpstream::start().await;
    let mut grpc_like = MockUpstream::start().await;
    let mut fallback = MockUpstream::start().await;
    let toml = format!(
        r#"
upstream = "{fallback}"

[[routes]]
name = "llama"
prefix = "/llama"
upstream = "{llama}/base"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "llama-keep"
prefix = "/llama/keep"
upstream = "{other}"
key_env = "OTHER_KEY"
auth_header = "baseten-authorization"
auth_template = "Api-Key {{key}}"
strip_prefix = false
"#,
        fallback = fallback.url(),
        llama = llama.url(),
        other = grpc_like.url(),
    );
    let (relay, _file) = start_with_file(&toml).await;
    let addr = relay.addr;

    // /llama/... -> the llama upstream, prefix stripped, base path joined.
    let pending = get(addr, "/llama/v1/models?x=1").await;
    let exchange = llama.next().await;
    assert_eq!(
        exchange
            .request
            .uri()
            .path_and_query()
            .expect("pq")
            .as_str(),
        "/base/v1/models?x=1"
    );
    assert_eq!(exchange.request.headers()["authorization"], EXPECTED_AUTH);
    exchange.respond_full(200, "llama");
    assert_eq!(within("llama", pending).await.expect("join").status(), 200);

    // The bare prefix maps to the upstream's base path.
    let pending = get(addr, "/llama").await;
    let exchange = llama.next().await;
    assert_eq!(exchange.request.uri().path(), "/base/");
    exchange.respond_full(200, "root");
    within("llama root", pending).await.expect("join");

    // The longer prefix wins; strip_prefix = false keeps it; its own header and key.
    let pending = get(addr, "/llama/keep/predict").await;
    let exchange = grpc_like.next().await;
    assert_eq!(exchange.request.uri().path(), "/llama/keep/predict");
    assert_eq!(
        exchange.request.headers()["baseten-authorization"],
        format!("Api-Key {OTHER_KEY}").as_str()
    );
    assert!(
        exchange.request.headers().get("authorization").is_none(),
        "the client's placeholder is scrubbed, and nothing else is injected there"
    );
    exchange.respond_full(200, "keep");
    within("keep", pending).await.expect("join");

    // Prefixes match whole segments: /llamas is not /llama; it goes to the default route.
    let pending = get(addr, "/llamas/predict").await;
    let exchange = fallback.next().await;
    assert_eq!(exchange.request.uri().path(), "/llamas/predict");
    assert_eq!(exchange.request.headers()["authorization"], EXPECTED_AUTH);
    exchange.respond_full(200, "fallback");
    within("fallback", pending).await.expect("join");

    assert!(llama.nothing_received() && grpc_like.nothing_received());
}

#[tokio::test]
async fn unmatched_path_gets_404_listing_prefixes_and_never_keys() {
    let mut upstream = MockUpstream::start().await;
    let toml = format!(
        r#"
[[routes]]
name = "a"
prefix = "/a"
upstream = "{url}"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "b"
prefix = "/b"
upstream = "{url}"
key_env = "OTHER_KEY"
"#,
        url = upstream.url()
    );
    let (relay, _file) = start_with_file(&toml).await;
    let addr = relay.addr;
    let response = within("404", get(addr, "/c/predict").await)
        .await
        .expect("join");
    assert_eq!(response.status(), 404);
    let body = body_bytes(response).await;
    let text = String::from_utf8_lossy(&body);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["type"], "no_route");
    let mut routes: Vec<&str> = json["routes"]
        .as_array()
        .expect("routes list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    routes.sort_unstable();
    assert_eq!(routes, ["/a", "/b"]);
    assert!(!text.contains(KEY) && !text.contains(OTHER_KEY), "{text}");
    assert!(upstream.nothing_received());
}

#[tokio::test]
async fn route_path_policy_applies_to_local_paths() {
    let mut upstream = MockUpstream::start().await;
    let toml = format!(
        r#"
[[routes]]
name = "whisper"
prefix = "/whisper"
upstream = "{url}"
key_env = "BASETEN_API_KEY"
allowed_paths = ["GET /whisper/health"]
"#,
        url = upstream.url()
    );
    let (relay, _file) = start_with_file(&toml).await;
    let addr = relay.addr;
    let response = within("403", get(addr, "/whisper/other").await)
        .await
        .expect("join");
    assert_eq!(response.status(), 403);
    let pending = get(addr, "/whisper/health").await;
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.uri().path(), "/health");
    exchange.respond_full(200, "ok");
    assert_eq!(within("200", pending).await.expect("join").status(), 200);
}

/// `--model ID --environment ENV --regional`: the regional host takes bare
/// paths, so short paths are not put under a stage (`/v1/...` still goes
/// under `/sync`), and a staged path is refused by keyrelay with a 400 that
/// says why instead of being sent where it is certain to fail.
#[tokio::test]
async fn regional_routes_send_bare_paths_and_refuse_staged_ones() {
    let mut upstream = MockUpstream::start().await;
    let mut sources = support::sources("", &[]);
    // No upstream URL: the shortcut builds it.
    for (key, value) in [
        ("model", "abc123"),
        ("environment", "staging"),
        ("regional", "true"),
    ] {
        sources.set(key, config::OverrideValue::Text(value.to_owned()));
    }
    let mut config = config::load(&sources).expect("valid regional shortcut");
    assert_eq!(
        config.routes[0].upstream.to_string(),
        "https://model-abc123-staging.api.baseten.co"
    );
    // The same route, pointed at the local upstream.
    let local: http::Uri = upstream.url().parse().expect("url");
    config.routes[0].upstream.scheme = local.scheme().expect("scheme").clone();
    config.routes[0].upstream.authority = local.authority().expect("authority").clone();
    let relay = Relay::from_config(config).await;

    for (local, upstream_path) in [
        ("/predict", "/predict"),
        ("/v1/chat/completions", "/sync/v1/chat/completions"),
        ("/sync/v1/models", "/sync/v1/models"),
    ] {
        let pending = get(relay.addr, local).await;
        let exchange = upstream.next().await;
        assert_eq!(exchange.request.uri().path(), upstream_path, "for {local}");
        exchange.respond(http::Response::new(full("ok")));
        let response = within("the answer", pending).await.expect("client");
        assert_eq!(response.status(), 200);
    }

    let refused = within(
        "the refusal",
        get(relay.addr, "/environments/staging/predict").await,
    )
    .await
    .expect("client");
    assert_eq!(refused.status(), 400);
    let body = body_bytes(refused).await;
    let error: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
    assert_eq!(error["type"], "staged_path_on_regional_host", "{error}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|m| m.contains("bare paths")),
        "{error}"
    );
    assert!(upstream.nothing_received(), "nothing forwarded");
    relay.stop().await;
}

/// Top-level `allowed_paths` and `token_budget` hold on every `[[routes]]`
/// entry that does not set its own (they used to apply to none: a DELETE
/// went out with the key, and the budget was never checked). The inherited
/// budget is one budget, shared by the routes that inherit it; a route that
/// sets its own (even `[]`) keeps its own.
#[tokio::test]
async fn top_level_path_rules_and_budget_hold_on_routes_that_do_not_set_their_own() {
    use crate::support::ops::{self, AdminRelay};

    let mut upstream = MockUpstream::start().await;
    let config = temp_file(
        "routes",
        "inherit.toml",
        format!(
            r#"
allowed_paths = ["POST /llama/v1/*", "POST /mistral/v1/*"]
# A day window: a minute one could roll over between two requests.
token_budget = ["10/day"]

[[routes]]
name = "llama"
prefix = "/llama"
upstream = "{url}"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "mistral"
prefix = "/mistral"
upstream = "{url}"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "own"
prefix = "/own"
upstream = "{url}"
key_env = "BASETEN_API_KEY"
allowed_paths = []
token_budget = []
"#,
            url = upstream.url()
        ),
    );
    let mut command = binary();
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--warm-connections", "0"])
        .args(["--config", config.path()])
        .env("BASETEN_API_KEY", KEY);
    let relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    let send = |method: &str, path: &str| {
        let request = Request::builder()
            .method(method)
            .uri(relay.url(path))
            .header("content-type", "application/json")
            .body(full(r#"{"model":"m"}"#))
            .expect("request");
        tokio::spawn(client.request(request))
    };

    // The inherited path rules: DELETE is not allowed on /llama.
    let refused = within("DELETE /llama/admin", send("DELETE", "/llama/admin"))
        .await
        .expect("join")
        .expect("response");
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(refused).await).expect("JSON");
    assert_eq!(body["type"], "path_not_allowed");
    assert!(upstream.nothing_received(), "refused before the upstream");
    crate::support::reliability::report(
        "issue23",
        &[
            "top-level allowed_paths = POST /llama/v1/* with [[routes]]; DELETE /llama/admin",
            &format!(
                "403 {}; not forwarded",
                body["type"].as_str().unwrap_or("?")
            ),
        ],
    );

    // The first request is within the inherited budget and spends 1,000 tokens.
    let pending = send("POST", "/llama/v1/chat/completions");
    upstream.next().await.respond(
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(
                r#"{"choices":[],"usage":{"prompt_tokens":500,"completion_tokens":500}}"#,
            ))
            .expect("response"),
    );
    let first = within("the first answer", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(first.status(), 200);
    body_bytes(first).await;
    let report = ops::eventually("the charge in /usage", || async {
        let report = relay.admin("GET", "/usage").await.json();
        (report["budgets"][0]["spent"] == 1000).then_some(report)
    })
    .await;
    let budgets = report["budgets"].as_array().expect("budgets");
    assert_eq!(budgets.len(), 1, "one shared budget: {report}");
    assert_eq!(budgets[0]["name"], "default");
    assert_eq!(budgets[0]["budget"], "10/day");

    // Used up, on this route and on the other route that shares it.
    for path in ["/llama/v1/chat/completions", "/mistral/v1/chat/completions"] {
        let refused = within(path, send("POST", path))
            .await
            .expect("join")
            .expect("response");
        assert_eq!(refused.status(), 429, "{path}");
        let body: serde_json::Value =
            serde_json::from_slice(&body_bytes(refused).await).expect("JSON");
        assert_eq!(body["type"], "token_budget_exhausted");
        assert_eq!(body["budget"], "route default: 10/day");
    }
    assert!(upstream.nothing_received(), "refused before the upstream");
    crate::support::reliability::report(
        "issue23",
        &[
            "top-level token_budget = 10/day with [[routes]]; 3 requests of 1,000 tokens on two routes",
            &format!(
                "first served and charged {}; the next two 429 token_budget_exhausted, not forwarded",
                budgets[0]["spent"]
            ),
        ],
    );

    // A route with its own (empty) rules and budget is not held by them.
    let pending = send("DELETE", "/own/anything");
    let exchange = upstream.next().await;
    assert_eq!(exchange.request.method(), "DELETE");
    exchange.respond_full(200, "ok");
    let own = within("the own route", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(own.status(), 200);
}

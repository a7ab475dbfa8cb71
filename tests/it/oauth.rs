//! OAuth2 client credentials: the key is an access token from a token
//! endpoint, fetched at startup and again before it expires.
//!
//! The token endpoint ([`TokenEndpoint`]) checks each request as an
//! authorization server would, by the one client authentication method it
//! accepts, and writes each token's expiry into the token; the upstream
//! ([`CheckingUpstream`]) rejects any request whose token has expired.
//!
//! What is shown: the token is fetched once and sent as `Bearer` to every
//! request until it is refreshed; client_secret_basic and _post each reach
//! an endpoint that accepts only that one; a stream stays open across
//! rotations of 2 s tokens and no request carries an expired one; with the
//! endpoint down after expiry, requests get 503 `credential_unavailable`
//! and nothing is forwarded, until it is back; an upstream 401 asks for one
//! new token; a failing first request stops keyrelay with exit 64 naming
//! `oauth_token_url` and the endpoint's error code; configuration mistakes
//! name their setting; and neither the client secret nor a token ever
//! appears in a trace-level log or an error.

use base64::Engine as _;
use keyrelay::config::OverrideValue;

use crate::support::expiring::{
    expired_means_503_and_nothing_forwarded, get, one_fetch_for_401s, recovered_then_log,
    rotations_beside_a_stream, CheckingUpstream,
};
use crate::support::ops::{self, AdminRelay};
use crate::support::token_endpoint::{
    Method, TokenEndpoint, CLIENT_ID, CLIENT_SECRET, SCOPE, TOKEN_PREFIX,
};
use crate::support::*;

/// The variable keyrelay reads the client secret from.
const SECRET_ENV: &str = "TEST_OAUTH_CLIENT_SECRET";

/// The `oauth_*` settings for `endpoint` (the client secret in [`SECRET_ENV`]).
fn oauth_settings(endpoint: &TokenEndpoint, method: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("oauth_token_url", endpoint.url()),
        ("oauth_client_id", CLIENT_ID.to_owned()),
        ("oauth_client_secret_env", SECRET_ENV.to_owned()),
        ("oauth_scope", SCOPE.to_owned()),
        ("oauth_auth_method", method.to_owned()),
    ]
}

/// The sources of an in-process keyrelay whose key comes from `endpoint`.
fn oauth_sources(
    upstream: &str,
    endpoint: &TokenEndpoint,
    method: &'static str,
) -> keyrelay::config::Sources {
    let mut sources = sources(upstream, &[]);
    sources
        .env
        .insert(SECRET_ENV.to_owned(), CLIENT_SECRET.to_owned());
    for (key, value) in oauth_settings(endpoint, method) {
        sources.set(key, OverrideValue::Text(value));
    }
    sources
}

#[tokio::test]
async fn a_token_is_fetched_once_and_sent_as_bearer_until_refreshed() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let endpoint = TokenEndpoint::start(Method::Basic, 3600.0);
    let relay = Relay::from_sources(&oauth_sources(&upstream.url, &endpoint, "basic")).await;
    let client = http1_client();
    for n in 0..20 {
        assert_eq!(
            get(&client, relay.url("/v1/models")).await.status(),
            200,
            "request {n}"
        );
    }
    assert_eq!(endpoint.issued(), 1, "20 requests, one token request");
    assert_eq!(upstream.accepted(), 20);
    assert_eq!(upstream.runs_seen().into_iter().collect::<Vec<_>>(), [1]);
    assert_eq!(endpoint.refused(), Vec::<String>::new());
    relay.stop().await;
}

#[tokio::test]
async fn client_secret_post_reaches_an_endpoint_that_accepts_only_post() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let endpoint = TokenEndpoint::start(Method::Post, 3600.0);
    let relay = Relay::from_sources(&oauth_sources(&upstream.url, &endpoint, "post")).await;
    let client = http1_client();
    assert_eq!(get(&client, relay.url("/v1/models")).await.status(), 200);
    assert_eq!(endpoint.issued(), 1);
    assert_eq!(endpoint.refused(), Vec::<String>::new());
    relay.stop().await;

    // The same endpoint refuses Basic credentials, and keyrelay says so.
    let err = keyrelay::config::load(&oauth_sources(&upstream.url, &endpoint, "basic"))
        .expect_err("the endpoint refuses basic");
    let err = err.to_string();
    assert!(
        err.contains("oauth_token_url") && err.contains("401") && err.contains("invalid_client"),
        "{err}"
    );
    assert!(!err.contains(CLIENT_SECRET), "{err}");
    assert_eq!(endpoint.refused().len(), 1);
}

#[tokio::test]
async fn a_stream_outlives_token_rotations_and_no_request_carries_an_expired_token() {
    let mut upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    // 2 s tokens, used for 1.8 s and refreshed after 1.6 s.
    let endpoint = TokenEndpoint::start(Method::Basic, 2.0);
    let relay = Relay::from_sources(&oauth_sources(&upstream.url, &endpoint, "basic")).await;
    rotations_beside_a_stream(&mut upstream, &relay, || endpoint.issued()).await;
    relay.stop().await;
}

#[tokio::test]
async fn with_the_endpoint_down_after_expiry_requests_get_503_never_a_stale_token() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let endpoint = TokenEndpoint::start(Method::Basic, 1.5);
    let mut command = ops::command(&upstream.url);
    for (key, value) in oauth_settings(&endpoint, "basic") {
        command
            .arg(format!("--{}", key.replace('_', "-")))
            .arg(value);
    }
    command
        .env(SECRET_ENV, CLIENT_SECRET)
        .env("RUST_LOG", "trace");
    let mut relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    assert_eq!(get(&client, relay.url("/v1/models")).await.status(), 200);
    relay.wait_for_readyz(200).await;

    endpoint.set_down(true);
    expired_means_503_and_nothing_forwarded(&upstream, &relay).await;

    endpoint.set_down(false);
    let log = recovered_then_log(&upstream, &mut relay).await;
    assert!(
        log.contains("temporarily_unavailable"),
        "the endpoint's error is logged:\n{log}"
    );
    assert!(
        log.contains("oauth2 http://"),
        "the source kind is named:\n{log}"
    );
    let basic = base64::engine::general_purpose::STANDARD;
    for secret in [
        CLIENT_SECRET.to_owned(),
        "oauth-client-SECRET".to_owned(),
        basic.encode(format!("keyrelay-test+client:{CLIENT_SECRET}")),
        TOKEN_PREFIX.to_owned(),
    ] {
        assert!(!log.contains(&secret), "{secret} reached the log:\n{log}");
    }
}

#[tokio::test]
async fn an_upstream_401_asks_for_one_new_token_and_passes_through() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let endpoint = TokenEndpoint::start(Method::Basic, 3600.0);
    let relay = Relay::from_sources(&oauth_sources(&upstream.url, &endpoint, "basic")).await;
    one_fetch_for_401s(&upstream, &relay, || endpoint.issued()).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_failing_first_token_request_stops_keyrelay_with_64() {
    // The endpoint takes post only; keyrelay sends basic.
    let endpoint = TokenEndpoint::start(Method::Post, 60.0);
    let mut command = binary();
    command.args([
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
    ]);
    for (key, value) in oauth_settings(&endpoint, "basic") {
        command
            .arg(format!("--{}", key.replace('_', "-")))
            .arg(value);
    }
    let output = command
        .env(SECRET_ENV, CLIENT_SECRET)
        .output()
        .expect("run keyrelay");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("oauth_token_url: the first token request failed")
            && stderr.contains("401 Unauthorized: invalid_client"),
        "{stderr}"
    );
    assert!(!stderr.contains(CLIENT_SECRET), "{stderr}");
}

/// A token answered with `expires_in` under a second is a failed
/// request (tried again after a backoff), not one asked for again as fast
/// as the endpoint answers.
#[test]
fn a_token_that_lives_less_than_a_second_is_a_failed_request() {
    let endpoint = TokenEndpoint::start(Method::Basic, 0.5);
    let err = keyrelay::config::load(&oauth_sources("http://127.0.0.1:9", &endpoint, "basic"))
        .expect_err("a token living 0.5 s")
        .to_string();
    assert!(
        err.contains("oauth_token_url: the first token request failed")
            && err.contains("expires within a second"),
        "{err}"
    );
    assert!(!err.contains(TOKEN_PREFIX), "{err}");
}

#[test]
fn configuration_mistakes_name_their_setting() {
    let endpoint = TokenEndpoint::start(Method::Basic, 60.0);
    let secret_file = temp_file("oauth", "secret", CLIENT_SECRET);
    let cases: [(&[(&str, &str)], &str); 6] = [
        (
            &[("oauth_token_url", "http://idp.example/token")],
            "oauth_token_url: http://idp.example/token is plain http://",
        ),
        (
            &[("oauth_token_url", "login.example/token")],
            "is not an https:// URL",
        ),
        (
            &[("oauth_client_secret_file", secret_file.path())],
            "oauth_client_secret_env: oauth_client_secret_file is set too",
        ),
        (
            &[("oauth_auth_method", "jwt")],
            "oauth_auth_method: \"jwt\" is not basic",
        ),
        (
            &[("key_file", secret_file.path())],
            "oauth_token_url: key_file is set too",
        ),
        (
            &[("key_command", "echo,k")],
            "oauth_token_url: key_command is set too",
        ),
    ];
    for (changes, expected) in cases {
        let mut sources = oauth_sources("http://127.0.0.1:9", &endpoint, "basic");
        for (key, value) in changes {
            let value = if *key == "key_command" {
                OverrideValue::List(value.split(',').map(str::to_owned).collect())
            } else {
                OverrideValue::Text((*value).to_owned())
            };
            sources.set(key, value);
        }
        let err = keyrelay::config::load(&sources)
            .expect_err(expected)
            .to_string();
        assert!(err.contains(expected), "{changes:?}: {err}");
        assert!(!err.contains(CLIENT_SECRET), "{err}");
    }
    // A route that names key_env beside its OAuth2 settings.
    let file = temp_file(
        "oauth",
        "routes.toml",
        format!(
            "[[routes]]\nname = \"azure\"\nprefix = \"/azure\"\nupstream = \"http://127.0.0.1:9\"\n\
             key_env = \"BASETEN_API_KEY\"\noauth_token_url = \"{}\"\noauth_client_id = \"x\"\n\
             oauth_client_secret_env = \"{SECRET_ENV}\"\n",
            endpoint.url()
        ),
    );
    let mut sources = oauth_sources("http://127.0.0.1:9", &endpoint, "basic");
    sources.file = Some(file.0.clone());
    let err = keyrelay::config::load(&sources)
        .expect_err("two sources")
        .to_string();
    assert!(
        err.contains("\"azure\".oauth_token_url: the route also sets key_env"),
        "{err}"
    );
}

/// A token URL with credentials in it (`https://id:secret@idp/token`)
/// would put them in every log line naming the endpoint: refused at
/// startup, the URL not quoted.
#[test]
fn a_token_url_with_credentials_in_it_is_refused_unquoted() {
    let endpoint = TokenEndpoint::start(Method::Basic, 60.0);
    let mut sources = oauth_sources("http://127.0.0.1:9", &endpoint, "basic");
    let in_url = "pw-in-the-url-7c1";
    let with_credentials = endpoint
        .url()
        .replace("http://", &format!("http://app:{in_url}@"));
    sources.set("oauth_token_url", OverrideValue::Text(with_credentials));
    let err = keyrelay::config::load(&sources)
        .expect_err("credentials in the URL")
        .to_string();
    assert!(
        err.contains("oauth_token_url: holds credentials (user:password@host)"),
        "{err}"
    );
    assert!(!err.contains(in_url), "{err}");
}

/// The README's OAuth2 configs load, their token URL pointed at a local
/// endpoint (the flag wins over the file, as it would for a user).
#[test]
fn the_readme_oauth_configs_load() {
    let endpoint = TokenEndpoint::start(Method::Basic, 60.0);
    for block in readme_toml_blocks("oauth_token_url") {
        let file = temp_file("oauth", "readme.toml", &block);
        let mut sources = sources("http://127.0.0.1:9", &[]);
        sources.file = Some(file.0.clone());
        sources.set("oauth_token_url", OverrideValue::Text(endpoint.url()));
        sources.set("oauth_client_id", OverrideValue::Text(CLIENT_ID.to_owned()));
        for name in ["AZURE_CLIENT_SECRET", SECRET_ENV] {
            sources
                .env
                .insert(name.to_owned(), CLIENT_SECRET.to_owned());
        }
        if let Err(err) = keyrelay::config::load(&sources) {
            panic!("README config does not load: {err}\n{block}");
        }
    }
}

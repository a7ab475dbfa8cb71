//! Google credentials (Vertex AI): the key is a Google access token, from a
//! service-account key file (the JWT-bearer grant, RS256) or the metadata
//! server, fetched at startup and again before it expires.
//!
//! The key is made at test time ([`RsaKey`]); the token endpoint
//! ([`TokenEndpoint`] with [`Grant::JwtBearer`]) verifies each assertion's
//! signature with the public key and its claims before issuing a token
//! whose expiry is written into it, and the upstream
//! ([`CheckingUpstream`]) rejects any request whose token has expired.
//!
//! What is shown: `provider = "vertex"` with a key file sends `Bearer
//! <token>` from one token request; `GOOGLE_APPLICATION_CREDENTIALS`
//! names the file when no setting does; a stream stays open across
//! rotations of 2 s tokens and no request carries an expired one, from the
//! key file and from the metadata server alike; the metadata server is
//! asked with `Metadata-Flavor: Google` (it refuses requests without);
//! once the endpoint no longer accepts the key's signature, requests get
//! 503 `credential_unavailable` after expiry and nothing is forwarded,
//! until it does again; a bad key file stops keyrelay with exit 64 naming
//! `google_credentials_file`, never quoting the key; and neither the key,
//! an assertion nor a token appears in a trace-level log.

use http::Request;
use keyrelay::config::OverrideValue;

use crate::support::expiring::{
    expired_means_503_and_nothing_forwarded, get, one_fetch_for_401s, recovered_then_log,
    rotations_beside_a_stream, CheckingUpstream,
};
use crate::support::ops::{self, AdminRelay};
use crate::support::token_endpoint::{
    Grant, RsaKey, ServiceAccount, TokenEndpoint, GOOGLE_SCOPE, TOKEN_PREFIX,
};
use crate::support::*;

const CLIENT_EMAIL: &str = "keyrelay-test@keyrelay-test.iam.gserviceaccount.com";

/// A service account with a new key, a token endpoint that knows it
/// (issuing tokens living `lifetime` seconds), and its key file.
fn service_account(lifetime: f64) -> (RsaKey, TokenEndpoint, TempFile) {
    let key = RsaKey::generate();
    let account = ServiceAccount::new(CLIENT_EMAIL, &key);
    let endpoint = TokenEndpoint::with_grant(Grant::JwtBearer(account.clone()), lifetime);
    let file = temp_file(
        "google",
        "sa.json",
        account.key_file(&key.pkcs8_pem, &endpoint.url()),
    );
    (key, endpoint, file)
}

/// An in-process keyrelay's sources: the vertex preset, its upstream
/// replaced by `upstream`, and `settings` (which may name another preset).
fn vertex_sources(upstream: &str, settings: &[(&str, &str)]) -> keyrelay::config::Sources {
    let vertex = [("provider", "vertex")];
    sources(upstream, &[&vertex[..], settings].concat())
}

#[tokio::test]
async fn a_service_account_key_file_gets_one_verified_token_sent_as_bearer() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let (_key, endpoint, file) = service_account(3600.0);
    let sources = vertex_sources(&upstream.url, &[("google_credentials_file", file.path())]);
    let relay = Relay::from_sources(&sources).await;
    let client = http1_client();
    for n in 0..20 {
        assert_eq!(
            get(&client, relay.url("/v1/projects/p/locations/us-central1/publishers/google/models/gemini:streamGenerateContent")).await.status(),
            200,
            "request {n}"
        );
    }
    assert_eq!(endpoint.refused(), Vec::<String>::new());
    assert_eq!(endpoint.issued(), 1, "20 requests, one token request");
    assert_eq!(upstream.accepted(), 20);
    assert_eq!(upstream.runs_seen().into_iter().collect::<Vec<_>>(), [1]);
    relay.stop().await;
}

#[tokio::test]
async fn an_upstream_401_asks_for_one_new_token_and_passes_through() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let (_key, endpoint, file) = service_account(3600.0);
    let sources = vertex_sources(&upstream.url, &[("google_credentials_file", file.path())]);
    let relay = Relay::from_sources(&sources).await;
    one_fetch_for_401s(&upstream, &relay, || endpoint.issued()).await;
    relay.stop().await;
}

#[tokio::test]
async fn the_loaded_configuration_never_shows_the_private_key() {
    let (key, _endpoint, file) = service_account(3600.0);
    let sources = vertex_sources(
        "http://127.0.0.1:9",
        &[("google_credentials_file", file.path())],
    );
    let config = tokio::task::spawn_blocking(move || keyrelay::config::load(&sources))
        .await
        .expect("join")
        .expect("loads");
    let shown = format!("{config:?}");
    assert!(shown.contains(CLIENT_EMAIL), "the account is named");
    for secret in key.private_lines() {
        assert!(!shown.contains(&secret), "the private key in Debug");
    }
    assert!(!shown.contains(TOKEN_PREFIX), "a token in Debug");
}

#[tokio::test]
async fn google_application_credentials_names_the_file_when_no_setting_does() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let (_key, endpoint, file) = service_account(3600.0);
    let mut sources = vertex_sources(&upstream.url, &[]);
    sources.env.insert(
        "GOOGLE_APPLICATION_CREDENTIALS".to_owned(),
        file.path().to_owned(),
    );
    // Never asked: the variable comes first.
    sources
        .env
        .insert("GCE_METADATA_HOST".to_owned(), "127.0.0.1:9".to_owned());
    let relay = Relay::from_sources(&sources).await;
    assert_eq!(
        get(&http1_client(), relay.url("/v1/models")).await.status(),
        200
    );
    assert_eq!(endpoint.issued(), 1);
    assert_eq!(upstream.accepted(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn service_account_tokens_rotate_beside_a_stream_and_never_arrive_expired() {
    let mut upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    // 2 s tokens, used for 1.8 s and refreshed after 1.6 s.
    let (_key, endpoint, file) = service_account(2.0);
    let sources = vertex_sources(&upstream.url, &[("google_credentials_file", file.path())]);
    let relay = Relay::from_sources(&sources).await;
    rotations_beside_a_stream(&mut upstream, &relay, || endpoint.issued()).await;
    assert_eq!(endpoint.refused(), Vec::<String>::new());
    relay.stop().await;
}

#[tokio::test]
async fn metadata_server_tokens_rotate_beside_a_stream_and_never_arrive_expired() {
    let mut upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let metadata = TokenEndpoint::with_grant(Grant::Metadata, 2.0);
    // The fake refuses what the real one refuses: no Metadata-Flavor.
    let bare = Request::get(format!("{}?scopes={GOOGLE_SCOPE}", metadata.url()))
        .body(empty())
        .expect("request");
    let refused = within("the metadata server", http1_client().request(bare))
        .await
        .expect("response");
    assert_eq!(refused.status(), 403);
    assert_eq!(metadata.refused().len(), 1);

    let mut sources = vertex_sources(&upstream.url, &[]);
    sources
        .env
        .insert("GCE_METADATA_HOST".to_owned(), metadata.host());
    let relay = Relay::from_sources(&sources).await;
    rotations_beside_a_stream(&mut upstream, &relay, || metadata.issued()).await;
    assert_eq!(metadata.refused().len(), 1, "{:?}", metadata.refused());
    relay.stop().await;
}

/// Something else answering at the metadata server's address (a captive
/// portal, a proxy) is not trusted with a token: google-auth checks the
/// answer's `Metadata-Flavor: Google` too. At startup: exit 64 naming
/// `google_credentials`; at a refresh: the old token until it expires,
/// then 503 `credential_unavailable`.
#[tokio::test]
async fn a_metadata_answer_without_metadata_flavor_is_not_trusted() {
    let metadata = TokenEndpoint::with_grant(Grant::Metadata, 1.5);
    metadata.set_not_google(true);
    let mut sources = vertex_sources("http://127.0.0.1:9", &[]);
    sources
        .env
        .insert("GCE_METADATA_HOST".to_owned(), metadata.host());
    let err = keyrelay::config::load(&sources)
        .expect_err("an answer that is not Google's")
        .to_string();
    assert!(
        err.contains("google_credentials: the first token request")
            && err.contains("without \"metadata-flavor: Google\""),
        "{err}"
    );
    assert!(!err.contains(TOKEN_PREFIX), "{err}");

    metadata.set_not_google(false);
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let mut command = ops::command(&upstream.url);
    command
        .args(["--provider", "vertex"])
        .env("GCE_METADATA_HOST", metadata.host())
        .env("RUST_LOG", "trace");
    let mut relay = AdminRelay::spawn(command).await;
    assert_eq!(
        get(&http1_client(), relay.url("/v1/models")).await.status(),
        200
    );
    metadata.set_not_google(true);
    expired_means_503_and_nothing_forwarded(&upstream, &relay).await;
    metadata.set_not_google(false);
    let log = recovered_then_log(&upstream, &mut relay).await;
    assert!(log.contains("without \"metadata-flavor: Google\""), "{log}");
}

#[tokio::test]
async fn a_key_the_endpoint_stops_accepting_means_503_after_expiry_never_a_stale_token() {
    let upstream = CheckingUpstream::start(TOKEN_PREFIX).await;
    let (key, endpoint, file) = service_account(1.5);
    let mut command = ops::command(&upstream.url);
    command
        .args([
            "--provider",
            "vertex",
            "--google-credentials-file",
            file.path(),
        ])
        .env("RUST_LOG", "trace");
    let mut relay = AdminRelay::spawn(command).await;
    let client = http1_client();
    assert_eq!(get(&client, relay.url("/v1/models")).await.status(), 200);
    relay.wait_for_readyz(200).await;

    // The account's key is deleted at Google: the signature no longer verifies.
    endpoint.verify_with(Some(RsaKey::generate().public_der));
    expired_means_503_and_nothing_forwarded(&upstream, &relay).await;
    assert!(
        (endpoint.refused().iter()).any(|why| why == "Invalid JWT Signature."),
        "{:?}",
        endpoint.refused()
    );

    endpoint.verify_with(None);
    let log = recovered_then_log(&upstream, &mut relay).await;
    assert!(
        log.contains("invalid_grant (Invalid JWT Signature.)"),
        "the endpoint's error is logged:\n{log}"
    );
    assert!(
        log.contains(&format!("google service account {CLIENT_EMAIL}")),
        "the source kind is named:\n{log}"
    );
    for secret in key.private_lines() {
        assert!(!log.contains(&secret), "the private key reached the log");
    }
    // An assertion starts with its base64url header; a token with its prefix.
    for secret in ["eyJhbGciOiJSUzI1NiI", TOKEN_PREFIX] {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }
}

#[test]
fn a_bad_key_file_stops_keyrelay_with_64_naming_the_setting_never_the_key() {
    let (key, endpoint, good) = service_account(60.0);
    let account = ServiceAccount::new(CLIENT_EMAIL, &key);
    let text = std::fs::read_to_string(&good.0).expect("key file");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let with = |field: &str, value: serde_json::Value| {
        let mut json = json.clone();
        json[field] = value;
        json.to_string()
    };
    let other_key = RsaKey::generate();
    let cases = [
        (text[..text.len() / 2].to_owned(), "is not a JSON key file"),
        (
            with("type", "authorized_user".into()),
            "is a \"authorized_user\" credentials file",
        ),
        (
            with("private_key", key.pkcs1_pem.clone().into()),
            "is not a PEM PKCS#8 key",
        ),
        (
            with("private_key", key.pkcs8_pem.replace('M', "A").into()),
            "not a usable RSA key",
        ),
        (
            with("token_uri", "http://oauth2.example/token".into()),
            "plain http:// to a host that is not loopback",
        ),
        // A key the endpoint does not know: the first token request fails.
        (
            account.key_file(&other_key.pkcs8_pem, &endpoint.url()),
            "the first token request failed: ",
        ),
    ];
    for (contents, expected) in cases {
        let file = temp_file("google", "bad.json", &contents);
        let output = binary()
            .args([
                "--upstream",
                "http://127.0.0.1:9",
                "--listen",
                "127.0.0.1:0",
            ])
            .args([
                "--provider",
                "vertex",
                "--google-credentials-file",
                file.path(),
            ])
            .output()
            .expect("run keyrelay");
        assert_eq!(output.status.code(), Some(64), "{expected}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("google_credentials_file: ") && stderr.contains(expected),
            "{expected}: {stderr}"
        );
        for secret in key.private_lines().iter().chain(&other_key.private_lines()) {
            assert!(!stderr.contains(secret.as_str()), "the key in: {stderr}");
        }
        assert!(!stderr.contains("eyJhbGciOiJSUzI1NiI"), "{stderr}");
    }
    assert!(
        (endpoint.refused().iter()).any(|why| why == "Invalid JWT Signature."),
        "{:?}",
        endpoint.refused()
    );
}

#[test]
fn configuration_mistakes_name_their_setting() {
    let (_key, _endpoint, file) = service_account(60.0);
    let missing = unique_temp_path("google", "missing.json");
    let missing = missing.to_str().expect("UTF-8 path");
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("google_credentials_file", missing)],
            "google_credentials_file: cannot read",
        ),
        (
            &[("google_scopes", "https://x/auth"), ("provider", "openai")],
            "google_scopes: set, but the route does not use Google credentials",
        ),
        (
            &[("google_credentials", "sometimes")],
            "google_credentials: ",
        ),
        (
            &[
                ("google_credentials_file", file.path()),
                ("key_command", "echo,k"),
            ],
            "google_credentials: key_command is set too",
        ),
        // The first request to a metadata server that is not there.
        (
            &[("google_credentials", "true"), ("provider", "openai")],
            "google_credentials: the first token request to the GCP metadata server failed",
        ),
    ];
    for (changes, expected) in cases {
        let mut sources = vertex_sources("http://127.0.0.1:9", changes);
        sources.env.insert(
            "GCE_METADATA_HOST".to_owned(),
            format!("127.0.0.1:{}", closed_port()),
        );
        let err = keyrelay::config::load(&sources)
            .expect_err(expected)
            .to_string();
        assert!(err.contains(expected), "{changes:?}: {err}");
    }

    // A route that names key_env beside its Google settings; a vertex
    // route with key_env uses that key, not Google's.
    let routes = |extra: &str| {
        format!(
            "[[routes]]\nname = \"vertex\"\nprefix = \"/vertex\"\nupstream = \"http://127.0.0.1:9\"\n\
             provider = \"vertex\"\nkey_env = \"BASETEN_API_KEY\"\n{extra}"
        )
    };
    let load = |toml: String| {
        let file = temp_file("google", "routes.toml", toml);
        let mut sources = sources("http://127.0.0.1:9", &[]);
        sources.file = Some(file.0.clone());
        keyrelay::config::load(&sources)
    };
    // Top-level scopes with no top-level route would apply to nothing.
    let file = temp_file(
        "google",
        "top.toml",
        "google_scopes = [\"https://x/auth\"]\n[[routes]]\nname = \"a\"\nprefix = \"/a\"\n\
         upstream = \"http://127.0.0.1:9\"\n",
    );
    let mut top = sources("", &[]);
    top.file = Some(file.0.clone());
    let err = keyrelay::config::load(&top)
        .expect_err("unused")
        .to_string();
    assert!(
        err.contains("google_scopes: is set at the top level, but no upstream is"),
        "{err}"
    );

    let config = load(routes("")).expect("a static key");
    let vertex = (config.routes.iter())
        .find(|r| r.name == "vertex")
        .expect("route");
    assert_eq!(
        vertex.credential.value.as_bytes(),
        format!("Bearer {KEY}").as_bytes()
    );
    let err = load(routes(&format!(
        "google_credentials_file = \"{}\"\n",
        file.path()
    )))
    .expect_err("two sources")
    .to_string();
    assert!(
        err.contains("\"vertex\".google_credentials: the route also sets key_env"),
        "{err}"
    );
}

/// The README's Vertex AI configs load: the key file pointed at a local
/// one (the flag wins over the file, as it would for a user), the metadata
/// server at a local one.
#[tokio::test]
async fn the_readme_vertex_configs_load() {
    let (_key, endpoint, file) = service_account(60.0);
    let metadata = TokenEndpoint::with_grant(Grant::Metadata, 60.0);
    for block in readme_toml_blocks("provider = \"vertex\"") {
        let toml = temp_file("google", "readme.toml", &block);
        let mut sources = sources("http://127.0.0.1:9", &[]);
        sources.file = Some(toml.0.clone());
        if block.contains("google_credentials_file") {
            sources.set(
                "google_credentials_file",
                OverrideValue::Text(file.path().to_owned()),
            );
        }
        sources
            .env
            .insert("GCE_METADATA_HOST".to_owned(), metadata.host());
        let config = tokio::task::spawn_blocking(move || keyrelay::config::load(&sources))
            .await
            .expect("join");
        if let Err(err) = config {
            panic!("README config does not load: {err}\n{block}");
        }
    }
    assert_eq!(endpoint.issued() + metadata.issued(), 2, "one token each");
}

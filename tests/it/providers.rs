//! Provider presets: `provider = "anthropic"` and the rest set the header
//! the key goes in, its template, the headers the API requires and the
//! variable the key is read from; each preset's request is checked at a
//! recording upstream (the preset's own base URL replaced by the
//! recorder's with `upstream`, which is itself one of the overrides).
//! Every preset value gives way to the setting when it is written.

use http::Request;

use crate::support::recording_upstream::{Recorder, SeenRequest};
use crate::support::*;

type Expected = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// What each preset must send: provider, key variable, header, value
/// (`{key}` for the key), required headers. Written out here rather than
/// read from the table, so a wrong entry there fails.
const EXPECTED: &[Expected] = &[
    (
        "openai",
        "OPENAI_API_KEY",
        "authorization",
        "Bearer {key}",
        &[],
    ),
    (
        "anthropic",
        "ANTHROPIC_API_KEY",
        "x-api-key",
        "{key}",
        &[("anthropic-version", "2023-06-01")],
    ),
    ("gemini", "GEMINI_API_KEY", "x-goog-api-key", "{key}", &[]),
    (
        "azure-openai",
        "AZURE_OPENAI_API_KEY",
        "api-key",
        "{key}",
        &[],
    ),
    (
        "openrouter",
        "OPENROUTER_API_KEY",
        "authorization",
        "Bearer {key}",
        &[],
    ),
    ("groq", "GROQ_API_KEY", "authorization", "Bearer {key}", &[]),
    (
        "together",
        "TOGETHER_API_KEY",
        "authorization",
        "Bearer {key}",
        &[],
    ),
    (
        "fireworks",
        "FIREWORKS_API_KEY",
        "authorization",
        "Bearer {key}",
        &[],
    ),
    (
        "mistral",
        "MISTRAL_API_KEY",
        "authorization",
        "Bearer {key}",
        &[],
    ),
    (
        "deepseek",
        "DEEPSEEK_API_KEY",
        "authorization",
        "Bearer {key}",
        &[],
    ),
    (
        "baseten",
        "BASETEN_API_KEY",
        "authorization",
        "Api-Key {key}",
        &[],
    ),
];

/// Sends one GET through a keyrelay started from `sources` and returns
/// what the recorder received.
async fn one_request(
    sources: &keyrelay::config::Sources,
    recorder: &Recorder,
    path: &str,
) -> SeenRequest {
    let before = recorder.counts();
    let relay = Relay::from_sources(sources).await;
    let request = Request::get(relay.url(path))
        .body(empty())
        .expect("request");
    let response = within("keyrelay's answer", http1_client().request(request))
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    relay.stop().await;
    let mut seen = recorder.requests_since(before);
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.remove(0)
}

fn text(values: Vec<&[u8]>) -> Vec<String> {
    values
        .into_iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[tokio::test]
async fn each_preset_sends_its_header_template_required_headers_and_key_variable() {
    let recorder = Recorder::start().await;
    for (provider, key_env, header, template, required) in EXPECTED {
        // A key of its own in the preset's variable; BASETEN_API_KEY holds
        // the test key, which only the baseten preset may send.
        let key = format!("{provider}-key-7c1d");
        let mut sources = sources(&recorder.url(), &[("provider", provider)]);
        sources.env.insert((*key_env).to_owned(), key.clone());
        let seen = one_request(&sources, &recorder, "/v1/models").await;
        assert_eq!(
            text(seen.header(header)),
            [template.replace("{key}", &key)],
            "{provider}: {seen:?}"
        );
        for (name, value) in *required {
            assert_eq!(text(seen.header(name)), [*value], "{provider}: {seen:?}");
        }
        let carrying_key = (seen.headers.iter())
            .filter(|(_, value)| String::from_utf8_lossy(value).contains(&key))
            .count();
        assert_eq!(carrying_key, 1, "{provider}: the key once, in {header}");
        assert_eq!(seen.target, "/v1/models");
    }
}

#[tokio::test]
async fn written_settings_win_over_the_preset() {
    let recorder = Recorder::start().await;
    let mut sources = sources(
        &recorder.url(),
        &[
            ("provider", "anthropic"),
            ("auth_header", "x-custom-key"),
            ("auth_template", "Token {key}"),
            ("key_env", "MY_KEY"),
            (
                "set_request_headers",
                "Anthropic-Version: 2024-10-22,x-team: search",
            ),
        ],
    );
    sources
        .env
        .insert("MY_KEY".to_owned(), "mine-4e2a".to_owned());
    sources
        .env
        .insert("ANTHROPIC_API_KEY".to_owned(), "not-this-one".to_owned());
    let seen = one_request(&sources, &recorder, "/v1/messages").await;
    assert_eq!(text(seen.header("x-custom-key")), ["Token mine-4e2a"]);
    assert!(seen.header("x-api-key").is_empty(), "{seen:?}");
    assert_eq!(text(seen.header("anthropic-version")), ["2024-10-22"]);
    assert_eq!(text(seen.header("x-team")), ["search"]);
}

#[tokio::test]
async fn routes_take_presets_of_their_own() {
    let recorder = Recorder::start().await;
    let url = recorder.url();
    let file = temp_file(
        "providers",
        "routes.toml",
        format!(
            "[[routes]]\nname = \"claude\"\nprefix = \"/claude\"\nprovider = \"anthropic\"\n\
             upstream = \"{url}\"\n\n\
             [[routes]]\nname = \"gpt\"\nprefix = \"/gpt\"\nprovider = \"openai\"\nupstream = \"{url}\"\n"
        ),
    );
    let mut sources = sources(&url, &[]);
    sources.file = Some(file.0.clone());
    sources
        .env
        .insert("ANTHROPIC_API_KEY".to_owned(), "ant-1".to_owned());
    sources
        .env
        .insert("OPENAI_API_KEY".to_owned(), "oai-2".to_owned());
    let seen = one_request(&sources, &recorder, "/claude/v1/messages").await;
    assert_eq!(text(seen.header("x-api-key")), ["ant-1"]);
    assert_eq!(text(seen.header("anthropic-version")), ["2023-06-01"]);
    let seen = one_request(&sources, &recorder, "/gpt/v1/models").await;
    assert_eq!(text(seen.header("authorization")), ["Bearer oai-2"]);
    assert!(seen.header("anthropic-version").is_empty(), "{seen:?}");
    // The default route keeps the top-level (Baseten) settings.
    let seen = one_request(&sources, &recorder, "/v1/models").await;
    assert_eq!(text(seen.header("authorization")), [EXPECTED_AUTH]);
}

#[test]
fn a_preset_names_the_upstream_and_its_mistakes_are_reported() {
    let with_key = |settings: &[(&str, &str)]| {
        let mut sources = sources("", settings);
        sources
            .env
            .insert("OPENAI_API_KEY".to_owned(), KEY.to_owned());
        sources
            .env
            .insert("AZURE_OPENAI_API_KEY".to_owned(), KEY.to_owned());
        keyrelay::config::load(&sources)
    };
    let config = with_key(&[("provider", "openai")]).expect("loads");
    assert_eq!(
        config.routes[0].upstream.to_string(),
        "https://api.openai.com"
    );

    let err = with_key(&[("provider", "bedrock")])
        .expect_err("unknown")
        .to_string();
    assert!(
        err.contains("provider: \"bedrock\" is not a provider preset"),
        "{err}"
    );
    assert!(
        err.contains("openai, anthropic, gemini, azure-openai"),
        "{err}"
    );
    let err = with_key(&[("provider", "azure-openai")])
        .expect_err("no upstream")
        .to_string();
    assert!(err.contains("upstream"), "{err}");
}

/// The README's provider configs load, with the keys in their variables.
#[test]
fn the_readme_provider_configs_load() {
    // The Vertex AI ones need Google credentials: google_credentials.rs.
    for block in readme_toml_blocks("provider = ") {
        if block.contains("provider = \"vertex\"") {
            continue;
        }
        let file = temp_file("providers", "readme.toml", &block);
        let mut sources = sources("http://127.0.0.1:9", &[]);
        sources.file = Some(file.0.clone());
        for name in ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"] {
            sources.env.insert(name.to_owned(), KEY.to_owned());
        }
        let config = keyrelay::config::load(&sources)
            .unwrap_or_else(|err| panic!("README config does not load: {err}\n{block}"));
        assert!(config.routes.len() > 1, "{block}");
    }
}

//! Provider presets (`provider = "openai"`, ...): for each hosted API, where
//! it lives, how its key is sent, the headers it requires and the variable
//! its own SDKs read the key from.
//!
//! A preset only fills in: a route's own `upstream`, `auth_header`,
//! `auth_template`, `key_env` and `set_request_headers` entries (by header
//! name) win over it. A setting left at its default counts as not written.
//!
//! The base URLs carry no version: clients send `/v1/...` (the OpenAI and
//! Anthropic SDKs with `base_url = http://localhost:8080/v1` or `...:8080`),
//! and paths are appended to the upstream's.

/// One provider's conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provider {
    /// The name `provider` takes.
    pub name: &'static str,
    /// The API's base URL; `None` where it is per customer (Azure's
    /// resource host), so `upstream` must be set.
    pub upstream: Option<&'static str>,
    /// The header the key goes in.
    pub auth_header: &'static str,
    /// Its value, `{key}` replaced by the key.
    pub auth_template: &'static str,
    /// Headers the API requires on every request (`name: value`).
    pub headers: &'static [&'static str],
    /// The environment variable the provider's SDKs read the key from.
    pub key_env: &'static str,
}

/// An OpenAI-style provider: `Authorization: Bearer`, no extra headers.
const fn bearer(name: &'static str, upstream: &'static str, key_env: &'static str) -> Provider {
    Provider {
        name,
        upstream: Some(upstream),
        auth_header: "authorization",
        auth_template: "Bearer {key}",
        headers: &[],
        key_env,
    }
}

/// Every preset, in the README's order.
pub const PROVIDERS: &[Provider] = &[
    bearer("openai", "https://api.openai.com", "OPENAI_API_KEY"),
    Provider {
        name: "anthropic",
        upstream: Some("https://api.anthropic.com"),
        auth_header: "x-api-key",
        auth_template: "{key}",
        headers: &["anthropic-version: 2023-06-01"],
        key_env: "ANTHROPIC_API_KEY",
    },
    Provider {
        name: "gemini",
        upstream: Some("https://generativelanguage.googleapis.com"),
        auth_header: "x-goog-api-key",
        auth_template: "{key}",
        headers: &[],
        key_env: "GEMINI_API_KEY",
    },
    Provider {
        name: "azure-openai",
        upstream: None,
        auth_header: "api-key",
        auth_template: "{key}",
        headers: &[],
        key_env: "AZURE_OPENAI_API_KEY",
    },
    // Google access tokens (google_credentials), no static key; the host
    // is per location, so `upstream` must be set.
    Provider {
        name: "vertex",
        upstream: None,
        auth_header: "authorization",
        auth_template: "Bearer {key}",
        headers: &[],
        key_env: "",
    },
    bearer(
        "openrouter",
        "https://openrouter.ai/api",
        "OPENROUTER_API_KEY",
    ),
    bearer("groq", "https://api.groq.com/openai", "GROQ_API_KEY"),
    bearer("together", "https://api.together.xyz", "TOGETHER_API_KEY"),
    bearer(
        "fireworks",
        "https://api.fireworks.ai/inference",
        "FIREWORKS_API_KEY",
    ),
    bearer("mistral", "https://api.mistral.ai", "MISTRAL_API_KEY"),
    bearer("deepseek", "https://api.deepseek.com", "DEEPSEEK_API_KEY"),
    Provider {
        name: "baseten",
        upstream: Some("https://inference.baseten.co"),
        auth_header: "authorization",
        auth_template: "Api-Key {key}",
        headers: &[],
        key_env: "BASETEN_API_KEY",
    },
];

/// The presets whose key is a Google access token (Application Default
/// Credentials) unless the route names another source.
const GOOGLE_CREDENTIALS: &[&str] = &["vertex"];

impl Provider {
    /// True when the preset's key is a Google access token.
    pub fn google_credentials(&self) -> bool {
        GOOGLE_CREDENTIALS.contains(&self.name)
    }
}

/// The preset called `name` (any case).
pub fn find(name: &str) -> Option<&'static Provider> {
    let name = name.trim();
    PROVIDERS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// The names, for messages: `openai, anthropic, ...`.
pub fn names() -> String {
    PROVIDERS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse::parse_upstream;

    #[test]
    fn every_preset_is_well_formed() {
        for provider in PROVIDERS {
            if let Some(url) = provider.upstream {
                let parsed = parse_upstream(url).expect(url);
                assert_eq!(parsed.scheme, http::uri::Scheme::HTTPS, "{url}");
            }
            assert!(provider.auth_template.contains("{key}"));
            http::HeaderName::from_static(provider.auth_header);
            for header in provider.headers {
                let (name, _) = header.split_once(": ").expect(header);
                http::HeaderName::from_bytes(name.as_bytes()).expect(header);
            }
            assert_eq!(find(&provider.name.to_uppercase()), Some(provider));
        }
        assert!(find("vertex").is_some_and(Provider::google_credentials));
    }
}

//! A route's OAuth2 client-credentials settings (`oauth_*`), checked into
//! an [`OAuthClient`]. Each route names its own, like `key_command`; the
//! top-level ones serve the default route.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls::pki_types::CertificateDer;

use super::target::is_cleartext_beyond_loopback;
use super::{set, RawRoute, Scope};
use crate::config::check::Problems;
use crate::config::settings::default_of;
use crate::config::RawConfig;
use crate::secrets::key::ApiKey;
use crate::secrets::oauth::{AuthMethod, OAuthClient};
use crate::secrets::secret_file;

/// The template an OAuth2 route's key is sent with unless `auth_template`
/// says otherwise: access tokens are bearer tokens (RFC 6750).
pub(super) const BEARER_TEMPLATE: &str = "Bearer {key}";

/// A route's `oauth_*` settings as written.
#[derive(Clone, Copy, Default)]
pub(super) struct OAuthSettings<'a> {
    token_url: Option<&'a str>,
    client_id: Option<&'a str>,
    secret_env: Option<&'a str>,
    secret_file: Option<&'a str>,
    scope: Option<&'a str>,
    audience: Option<&'a str>,
    auth_method: Option<&'a str>,
}

/// How outbound connections are made: what a token URL may be, and whom
/// it trusts.
#[derive(Clone)]
pub(crate) struct Outbound {
    /// `allow_cleartext_upstream`.
    pub(crate) allow_cleartext: bool,
    /// `ca_file`'s certificates.
    pub(crate) extra_ca_certs: Arc<Vec<CertificateDer<'static>>>,
}

impl<'a> OAuthSettings<'a> {
    /// The top level's (the default route's).
    pub(super) fn top(raw: &'a RawConfig) -> Self {
        Self {
            token_url: set(raw.oauth_token_url.as_deref()),
            client_id: set(raw.oauth_client_id.as_deref()),
            secret_env: set(raw.oauth_client_secret_env.as_deref()),
            secret_file: set(raw.oauth_client_secret_file.as_deref()),
            scope: set(raw.oauth_scope.as_deref()),
            audience: set(raw.oauth_audience.as_deref()),
            auth_method: set(raw.oauth_auth_method.as_deref()),
        }
    }

    /// A `[[routes]]` entry's own.
    pub(super) fn route(route: &'a RawRoute) -> Self {
        Self {
            token_url: set(route.oauth_token_url.as_deref()),
            client_id: set(route.oauth_client_id.as_deref()),
            secret_env: set(route.oauth_client_secret_env.as_deref()),
            secret_file: set(route.oauth_client_secret_file.as_deref()),
            scope: set(route.oauth_scope.as_deref()),
            audience: set(route.oauth_audience.as_deref()),
            auth_method: set(route.oauth_auth_method.as_deref()),
        }
    }

    /// True when any setting that asks for OAuth2 is written
    /// (`oauth_auth_method` has a default, so it does not count).
    pub(super) fn is_set(&self) -> bool {
        [
            self.token_url,
            self.client_id,
            self.secret_env,
            self.secret_file,
            self.scope,
            self.audience,
        ]
        .iter()
        .any(Option::is_some)
    }
}

/// The route's `auth_template`: an OAuth2 route left at the default one
/// sends a bearer token.
pub(super) fn template(written: &str, oauth: bool) -> &str {
    if oauth && written == default_of("auth_template") {
        BEARER_TEMPLATE
    } else {
        written
    }
}

/// The route's OAuth2 client when its settings ask for one and are valid
/// (problems reported, naming each setting). `ttl` and `timeout` are the
/// route's `key_command_ttl` and `key_command_timeout` (`None`: reported).
pub(super) fn client(
    settings: &OAuthSettings<'_>,
    ttl: Option<Duration>,
    timeout: Option<Duration>,
    outbound: &Outbound,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<OAuthClient> {
    if !settings.is_set() {
        return None;
    }
    let token_url = token_url(settings.token_url, outbound, scope, found);
    let client_id = settings.client_id;
    if client_id.is_none() {
        found.report(
            &scope.setting("oauth_client_id"),
            "not set; an OAuth2 client needs its client id",
        );
    }
    let secret = client_secret(settings, scope, env, found);
    let method_text = settings.auth_method.unwrap_or("basic");
    let method = AuthMethod::parse(method_text);
    if method.is_none() {
        found.report(
            &scope.setting("oauth_auth_method"),
            format!(
                "{method_text:?} is not basic (client_secret_basic) or post (client_secret_post)"
            ),
        );
    }
    Some(OAuthClient {
        token_url: token_url?,
        client_id: client_id?.trim().to_owned(),
        secret: secret?,
        scope: settings.scope.map(str::to_owned),
        audience: settings.audience.map(str::to_owned),
        method: method?,
        ttl: ttl?,
        timeout: timeout?,
        extra_ca_certs: Arc::clone(&outbound.extra_ca_certs),
    })
}

/// `oauth_token_url`: an absolute https:// URL (plain http:// only to
/// loopback or with `allow_cleartext_upstream`: the secret crosses it).
fn token_url(
    written: Option<&str>,
    outbound: &Outbound,
    scope: &Scope,
    found: &mut Problems,
) -> Option<Uri> {
    let setting = scope.setting("oauth_token_url");
    let Some(written) = written else {
        found.report(
            &setting,
            "not set, but other oauth_* settings are: set the token endpoint's URL",
        );
        return None;
    };
    let url =
        written.trim().parse::<Uri>().ok().filter(|url| {
            url.host().is_some() && matches!(url.scheme_str(), Some("https" | "http"))
        });
    // Credentials in the URL would be in every log line and message that
    // names the endpoint; the URL is not quoted here either.
    if url
        .as_ref()
        .and_then(Uri::authority)
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        found.report(
            &setting,
            "holds credentials (user:password@host), which would reach the log; set the \
             client's in oauth_client_id and oauth_client_secret_env or _file",
        );
        return None;
    }
    let Some(url) = url else {
        found.report(
            &setting,
            format!(
                "{written:?} is not an https:// URL such as https://login.example/oauth2/token"
            ),
        );
        return None;
    };
    let host = url.host().unwrap_or_default();
    if url.scheme_str() == Some("http")
        && is_cleartext_beyond_loopback(&http::uri::Scheme::HTTP, host)
        && !outbound.allow_cleartext
    {
        found.report(
            &setting,
            format!(
                "{url} is plain http:// to a host that is not loopback: the client secret and \
                 the tokens would cross the network in clear text; use https://, or set \
                 allow_cleartext_upstream = true if that network path is trusted"
            ),
        );
        return None;
    }
    Some(url)
}

/// The client secret, from exactly one of `oauth_client_secret_env` and
/// `oauth_client_secret_file`.
fn client_secret(
    settings: &OAuthSettings<'_>,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<ApiKey> {
    let env_setting = scope.setting("oauth_client_secret_env");
    match (settings.secret_env, settings.secret_file) {
        (Some(_), Some(_)) => {
            found.report(
                &env_setting,
                "oauth_client_secret_file is set too; set one source for the client secret",
            );
            None
        }
        (None, None) => {
            found.report(
                &env_setting,
                "not set, nor oauth_client_secret_file: an OAuth2 client needs its secret",
            );
            None
        }
        (Some(name), None) => {
            let secret = env
                .get(name.trim())
                .map(|value| ApiKey::new(value.clone()))
                .filter(|secret| !secret.is_blank());
            if secret.is_none() {
                found.report(
                    &env_setting,
                    format!("environment variable {name} is not set or is empty"),
                );
            }
            secret
        }
        (None, Some(path)) => secret_file::read(Path::new(path))
            .map_err(|problem| {
                found.report(&scope.setting("oauth_client_secret_file"), problem);
            })
            .ok(),
    }
}

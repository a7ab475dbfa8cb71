//! A route's Google credential settings (`google_credentials`,
//! `google_credentials_file`, `google_scopes`), checked into a
//! [`GoogleCredentials`] the way Application Default Credentials are
//! found: the `google_credentials_file` setting, else the file
//! `GOOGLE_APPLICATION_CREDENTIALS` names, else the metadata server. The
//! `vertex` preset asks for them when the route names no other source.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::oauth::Outbound;
use super::target::is_cleartext_beyond_loopback;
use super::{set, RawRoute, Scope};
use crate::config::check::Problems;
use crate::config::parse::Switch;
use crate::config::RawConfig;
use crate::secrets::google::{
    GoogleCredentials, Options, CREDENTIALS_ENV, DEFAULT_SCOPE, METADATA_HOST_ENV,
};
use crate::secrets::secret_file;

/// A route's Google settings as written.
#[derive(Clone, Copy, Default)]
pub(super) struct GoogleSettings<'a> {
    /// `google_credentials`.
    switch: Option<&'a Switch>,
    /// `google_credentials_file`.
    file: Option<&'a str>,
    /// `google_scopes`; `None`: the default.
    scopes: Option<&'a [String]>,
    /// The route's preset (`vertex`) asks for Google credentials and the
    /// route writes no other source.
    by_preset: bool,
}

impl<'a> GoogleSettings<'a> {
    /// The top level's (the default route's).
    pub(super) fn top(raw: &'a RawConfig) -> Self {
        let default = [DEFAULT_SCOPE.to_owned()];
        Self {
            switch: Some(&raw.google_credentials),
            file: set(raw.google_credentials_file.as_deref()),
            scopes: Some(raw.google_scopes.as_slice()).filter(|s| *s != default),
            by_preset: false,
        }
    }

    /// A `[[routes]]` entry's own.
    pub(super) fn route(route: &'a RawRoute) -> Self {
        Self {
            switch: route.google_credentials.as_ref(),
            file: set(route.google_credentials_file.as_deref()),
            scopes: route.google_scopes.as_deref(),
            by_preset: false,
        }
    }

    /// With the preset's ask: Google credentials unless `other_source`
    /// (the route wrote key_env, key_file, key_command or oauth_*).
    pub(super) fn with_preset(self, google_preset: bool, other_source: bool) -> Self {
        Self {
            by_preset: google_preset && !other_source,
            ..self
        }
    }

    /// True when the route's settings ask for Google credentials
    /// themselves (not through a preset).
    pub(super) fn is_written(&self) -> bool {
        self.file.is_some() || self.switch.is_some_and(Switch::on)
    }

    /// True when `google_scopes` is written (not the default).
    pub(super) fn scopes_written(&self) -> bool {
        self.scopes.is_some()
    }

    /// True when the route's key is a Google access token.
    pub(super) fn is_set(&self) -> bool {
        self.is_written() || self.by_preset
    }
}

/// The route's Google credentials when its settings ask for them and they
/// can be had (problems reported, naming each setting). `ttl` and
/// `timeout` are the route's `key_command_ttl` and `key_command_timeout`
/// (`None`: reported).
pub(super) fn credentials(
    settings: &GoogleSettings<'_>,
    ttl: Option<Duration>,
    timeout: Option<Duration>,
    outbound: &Outbound,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<GoogleCredentials> {
    if !settings.is_set() {
        if settings.scopes.is_some() {
            found.report(
                &scope.setting("google_scopes"),
                "set, but the route does not use Google credentials (google_credentials, \
                 google_credentials_file or provider = \"vertex\"), so it would apply to nothing",
            );
        }
        return None;
    }
    let scopes: Vec<String> = match settings.scopes {
        None => vec![DEFAULT_SCOPE.to_owned()],
        Some(written) => (written.iter().map(|s| s.trim()))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    if scopes.is_empty() {
        found.report(
            &scope.setting("google_scopes"),
            format!("names no scope; leave it out for {DEFAULT_SCOPE}"),
        );
        return None;
    }
    let options = Options {
        scopes,
        ttl: ttl?,
        timeout: timeout?,
        extra_ca_certs: Arc::clone(&outbound.extra_ca_certs),
    };
    let file_setting = scope.setting("google_credentials_file");
    let (path, named_by) = match settings.file {
        Some(path) => (path, String::new()),
        None => match env
            .get(CREDENTIALS_ENV)
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
        {
            Some(path) => (path, format!(" (named by {CREDENTIALS_ENV})")),
            None => {
                let host = env.get(METADATA_HOST_ENV).map(String::as_str);
                return GoogleCredentials::metadata(host, options)
                    .map_err(|problem| found.report(&scope.setting("google_credentials"), problem))
                    .ok();
            }
        },
    };
    let text = secret_file::read_secret(Path::new(path))
        .map(zeroize::Zeroizing::new)
        .map_err(|problem| found.report(&file_setting, format!("{problem}{named_by}")))
        .ok()?;
    let credentials = GoogleCredentials::service_account(&text, options)
        .map_err(|problem| found.report(&file_setting, format!("{path}{named_by} {problem}")))
        .ok()?;
    let token_uri = credentials.token_uri()?;
    if is_cleartext_beyond_loopback(
        token_uri.scheme().unwrap_or(&http::uri::Scheme::HTTPS),
        token_uri.host().unwrap_or_default(),
    ) && !outbound.allow_cleartext
    {
        found.report(
            &file_setting,
            format!(
                "{path}{named_by} has a token_uri {token_uri} that is plain http:// to a host \
                 that is not loopback: the signed assertion and the tokens would cross the \
                 network in clear text; use https://, or set allow_cleartext_upstream = true \
                 if that network path is trusted"
            ),
        );
        return None;
    }
    Some(credentials)
}

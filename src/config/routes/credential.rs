//! A route's credential (the key, the header it goes in, the headers
//! scrubbed from clients) and its static request headers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::google::{self, GoogleSettings};
use super::oauth::{self, OAuthSettings, Outbound};
use super::policy::{Inherit, Source};
use super::Scope;
use crate::config::baseten;
use crate::config::check::Problems;
use crate::config::parse::parse_duration;
use crate::config::request_headers;
use crate::config::Credential;
use crate::secrets::key::{ApiKey, KEY_PLACEHOLDER};
use crate::secrets::key_command::KeyCommand;
use crate::secrets::refresh;
use crate::secrets::secret_file;

/// A route's credential settings, before validation.
pub(super) struct CredentialSpec<'a> {
    pub(super) key_env: &'a str,
    pub(super) key_file: Option<&'a str>,
    pub(super) key_command: Option<&'a [String]>,
    pub(super) key_command_ttl: &'a Inherit<String>,
    pub(super) key_command_timeout: &'a Inherit<String>,
    pub(super) oauth: OAuthSettings<'a>,
    pub(super) google: GoogleSettings<'a>,
    pub(super) outbound: &'a Outbound,
    pub(super) header: &'a str,
    pub(super) template: &'a str,
    /// `auth_query`, checked by [`query_name`].
    pub(super) query: Option<String>,
    pub(super) strip: &'a [String],
}

/// On a gRPC route a client's own stage headers are removed, so a call
/// cannot pick a stage other than the configured one (or production).
pub(super) fn strip_grpc_stage_headers(credential: Option<&mut Credential>, grpc: bool) {
    let Some(credential) = credential.filter(|_| grpc) else {
        return;
    };
    for name in baseten::GRPC_STAGE_HEADERS {
        let name = HeaderName::from_static(name);
        if !credential.strip.contains(&name) {
            credential.strip.push(name);
        }
    }
}

/// The header the key goes in: Baseten's gRPC endpoint reads
/// `baseten-authorization`, so a gRPC route left at the default uses it.
pub(super) fn key_header(configured: &str, grpc: bool) -> &str {
    if grpc && configured.eq_ignore_ascii_case("authorization") {
        baseten::GRPC_KEY_HEADER
    } else {
        configured
    }
}

/// The route's static request headers: its `set_request_headers` and, for
/// a gRPC shortcut, the headers naming the model (which win: they are what
/// makes the shortcut reach its model).
pub(super) fn static_headers(
    entries: &[String],
    grpc_headers: Option<&Vec<(&'static str, String)>>,
    credential: Option<&Credential>,
    key: Option<&ApiKey>,
    scope: &Scope,
    found: &mut Problems,
) -> Option<Vec<(HeaderName, HeaderValue)>> {
    let setting = scope.setting("set_request_headers");
    let key_header = credential.map(|c| &c.header);
    let mut headers = request_headers::parse(entries, key_header, key, |problem| {
        found.report(&setting, problem)
    })?;
    for (name, value) in grpc_headers.into_iter().flatten() {
        let name = HeaderName::from_static(name);
        // Checked names and values: ids are letters, digits, - and _.
        let value = HeaderValue::from_str(value).ok()?;
        if headers.iter().any(|(set, _)| *set == name) {
            found.report(
                &setting,
                format!(
                    "{name} is set by grpc from model, environment and deployment; leave it out"
                ),
            );
            return None;
        }
        headers.push((name, value));
    }
    Some(headers)
}

/// The header the credential goes in; `None` (reported) if it cannot
/// carry one: not a header name, or one keyrelay manages itself.
fn credential_header(written: &str, scope: &Scope, found: &mut Problems) -> Option<HeaderName> {
    let header = HeaderName::from_bytes(written.as_bytes())
        .ok()
        .filter(|name| !request_headers::is_managed(name));
    if header.is_none() {
        let name = written.trim();
        let why = if name.starts_with(':') {
            "is an HTTP/2 pseudo-header, which keyrelay sets itself; the credential needs an ordinary header"
        } else if HeaderName::from_bytes(name.as_bytes()).is_ok() {
            "frames or routes the message (host, length, transfer coding, hop-by-hop), \
             which keyrelay manages itself: a credential there would be dropped or corrupt \
             the request; use an ordinary header such as authorization"
        } else {
            "is not a valid header name"
        };
        found.report(&scope.setting("auth_header"), format!("{written:?} {why}"));
    }
    header
}

/// Validates a route's credential: header, template, strip list and the key
/// itself. The key comes back too (when it could be read), for checks that
/// other settings do not contain it.
pub(super) fn credential(
    spec: &CredentialSpec<'_>,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> (Option<Credential>, Option<ApiKey>) {
    let header = credential_header(spec.header, scope, found);
    let token = spec.oauth.is_set() || spec.google.is_set();
    let template = oauth::template(spec.template, token);
    let template_ok = template.contains(KEY_PLACEHOLDER);
    if !template_ok {
        found.report(
            &scope.setting("auth_template"),
            format!("must contain {KEY_PLACEHOLDER} where the key goes"),
        );
    }
    let mut strip = Vec::with_capacity(spec.strip.len() + 1);
    for name in spec.strip.iter().map(|n| n.trim()) {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => strip.push(name),
            Err(_) if name.is_empty() => {}
            Err(_) => found.report(
                &scope.setting("strip_request_headers"),
                format!("{name:?} is not a valid header name"),
            ),
        }
    }

    let key_file = spec.key_file.filter(|p| !p.is_empty()).map(PathBuf::from);
    // The timing settings are checked on every route, used or not, so a
    // wrong value never goes unnoticed.
    let ttl = positive_duration(spec.key_command_ttl, "key_command_ttl", scope, found);
    let timeout = positive_duration(
        spec.key_command_timeout,
        "key_command_timeout",
        scope,
        found,
    );
    let command = key_command(spec, ttl, timeout, scope, found);
    let client = oauth::client(&spec.oauth, ttl, timeout, spec.outbound, scope, env, found);
    let google = google::credentials(&spec.google, ttl, timeout, spec.outbound, scope, env, found);
    if command.is_some() && key_file.is_some() {
        found.report(
            &scope.setting("key_command"),
            "key_file is set too; set one credential source",
        );
    }
    let others = [
        ("key_file", key_file.is_some()),
        ("key_command", spec.key_command.is_some()),
    ];
    for (other, _) in others.iter().filter(|(_, set)| spec.oauth.is_set() && *set) {
        found.report(
            &scope.setting("oauth_token_url"),
            format!("{other} is set too; set one credential source"),
        );
    }
    let others = [
        ("key_file", key_file.is_some()),
        ("key_command", spec.key_command.is_some()),
        ("oauth_token_url", spec.oauth.is_set()),
    ];
    for (other, _) in others
        .iter()
        .filter(|(_, set)| spec.google.is_set() && *set)
    {
        found.report(
            &scope.setting("google_credentials"),
            format!("{other} is set too; set one credential source"),
        );
    }
    let source = match (command, client, google) {
        (Some(command), _, _) => Some(refresh::Source::Command(command)),
        (None, Some(client), _) => Some(refresh::Source::OAuth(client)),
        (None, None, Some(google)) => Some(refresh::Source::Google(google)),
        (None, None, None) => None,
    };
    let mut lifetime = None;
    let (key, source_setting, source_name) = match (&source, &key_file) {
        (Some(source), _) => {
            let key = source
                .run()
                .map_err(|problem| {
                    let what = match source {
                        refresh::Source::Command(_) => "its first run failed",
                        refresh::Source::Google(google) if google.token_uri().is_none() => {
                            "the first token request to the GCP metadata server failed \
                             (no google_credentials_file is set, nor GOOGLE_APPLICATION_CREDENTIALS, \
                             and the metadata server answers only on Google Cloud)"
                        }
                        refresh::Source::OAuth(_) | refresh::Source::Google(_) => {
                            "the first token request failed"
                        }
                    };
                    found.report(
                        &scope.setting(source.setting()),
                        format!("{what}: {problem}"),
                    )
                })
                .ok()
                .map(|fetched| {
                    lifetime = Some(fetched.lifetime);
                    fetched.key
                });
            (key, source.setting(), source.describe())
        }
        (None, Some(path)) => (
            secret_file::read(path)
                .map_err(|problem| found.report(&scope.setting("key_file"), problem))
                .ok(),
            "key_file",
            path.display().to_string(),
        ),
        (None, None) if token => (None, "oauth_token_url", String::new()),
        (None, None) => {
            let key = env
                .get(spec.key_env)
                .map(|value| ApiKey::new(value.clone()))
                .filter(|key| !key.is_blank());
            if key.is_none() {
                found.report(
                    &scope.setting("key_env"),
                    format!(
                        "environment variable {} is not set or is empty; export the upstream API key \
                         in it (or set key_file, key_command or oauth_token_url)",
                        spec.key_env
                    ),
                );
            }
            (key, "key_env", spec.key_env.to_owned())
        }
    };
    let value = match &key {
        Some(key) if template_ok => key
            .header_value(template)
            .map_err(|err| {
                found.report(
                    &scope.setting(source_setting),
                    format!("the key from {source_name} (as rendered by auth_template) {err}"),
                )
            })
            .ok(),
        _ => None,
    };
    let (Some(header), Some(value)) = (header, value) else {
        return (None, key);
    };
    // With auth_query the header is still removed from clients' requests:
    // a client's own key there must not reach the upstream either.
    if !strip.contains(&header) {
        strip.push(header.clone());
    }
    let credential = Credential {
        key_env: spec.key_env.to_owned(),
        key_file,
        source,
        lifetime,
        template: template.to_owned(),
        header,
        query: spec.query.clone(),
        value,
        strip,
    };
    (Some(credential), key)
}

/// The characters an `auth_query` name may have: RFC 3986's unreserved
/// ones, which need no encoding and mean the same to every server.
fn is_query_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// The route's `auth_query`: `Ok(None)` when off (empty), the name when
/// it is one, `Err` (reported) when it is not a plain parameter name or
/// an `auth_header` set beside it would name nothing.
pub(super) fn query_name(
    query: &Inherit<String>,
    header: &Inherit<String>,
    scope: &Scope,
    found: &mut Problems,
) -> Result<Option<String>, ()> {
    let name = query.value.trim();
    if name.is_empty() {
        return Ok(None);
    }
    // A problem with an inherited value is the top level's, reported there.
    let setting = match query.from {
        Source::Own => scope.setting("auth_query"),
        Source::Top => "auth_query".to_owned(),
    };
    let mut ok = true;
    if !name.chars().all(is_query_name_char) {
        if query.from == Source::Own {
            found.report(
                &setting,
                format!(
                    "{name:?} is not a plain query parameter name: use letters, digits and \
                     - . _ ~ only (such as key)"
                ),
            );
        }
        ok = false;
    }
    // auth_header written where auth_query applies would name nothing.
    let both_inherited = query.from == Source::Top && header.from == Source::Top;
    if super::written(header, "auth_header", scope) && !both_inherited {
        let why = match query.from {
            Source::Own => format!(
                "auth_query = {name:?} is set too: the key goes in the query, so this header \
                 would only be removed from requests, never carry the key; leave auth_header \
                 out (or auth_query, to send the key in the header)"
            ),
            Source::Top => format!(
                "the route inherits the top-level auth_query = {name:?}, so the key goes in \
                 the query and this header would never carry it; set auth_query = \"\" in the \
                 route to send the key in the header"
            ),
        };
        found.report(&scope.setting("auth_header"), why);
        ok = false;
    }
    if ok {
        Ok(Some(name.to_owned()))
    } else {
        Err(())
    }
}

/// The route's `key_command` with its timing settings, when it sets one
/// and they are valid (problems reported).
fn key_command(
    spec: &CredentialSpec<'_>,
    ttl: Option<Duration>,
    timeout: Option<Duration>,
    scope: &Scope,
    found: &mut Problems,
) -> Option<KeyCommand> {
    let argv = spec.key_command?;
    if argv[0].trim().is_empty() {
        found.report(
            &scope.setting("key_command"),
            "its first item must be the program to run",
        );
        return None;
    }
    Some(KeyCommand::new(argv.to_vec(), ttl?, timeout?))
}

/// A duration setting that must be longer than zero; a problem with an
/// inherited top-level value is reported once, under the top-level name.
fn positive_duration(
    setting: &Inherit<String>,
    key: &str,
    scope: &Scope,
    found: &mut Problems,
) -> Option<Duration> {
    let name = match setting.from {
        Source::Own => scope.setting(key),
        Source::Top => key.to_owned(),
    };
    let problem = match parse_duration(&setting.value) {
        Ok(Some(duration)) => return Some(duration),
        Ok(None) => "must be longer than 0".to_owned(),
        Err(message) => message,
    };
    let known = (found.0.iter()).any(|seen| seen.setting == name && seen.message == problem);
    if !known {
        found.report(&name, problem);
    }
    None
}

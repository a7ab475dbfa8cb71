//! The route table: which local path prefix goes to which upstream, with
//! which credential.
//!
//! The top-level settings (`upstream` or a Baseten shortcut, `key_env`,
//! `auth_*`, `allowed_paths`, `upstream_http2`) make a route named `default`
//! at prefix `/`. A config file can add named routes:
//!
//! ```toml
//! [[routes]]
//! name = "llama"
//! prefix = "/llama"            # requests under /llama go here (prefix stripped)
//! model = "abc123"             # or upstream = "https://...", chain = "...", model_apis = true
//! environment = "production"   # or deployment = "...", development = true
//! key_env = "BASETEN_API_KEY"  # or key_file = "/run/secrets/key"
//! auth_template = "Api-Key {key}"
//! ```
//!
//! Longest prefix wins. Every problem names its route.

use std::collections::HashMap;
use std::path::PathBuf;

use http::HeaderName;
use serde::Deserialize;

use super::check::Problems;
use super::parse::parse_upstream;
use super::{Credential, RawConfig, UpstreamUrl};
use crate::config::baseten::{self, Stage, Target};
use crate::guard::paths::PathPolicy;
use crate::secrets::key::{ApiKey, KEY_PLACEHOLDER};
use crate::secrets::secret_file;

/// A route as written in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    name: String,
    prefix: String,
    upstream: Option<String>,
    model: Option<String>,
    chain: Option<String>,
    #[serde(default)]
    model_apis: bool,
    environment: Option<String>,
    deployment: Option<String>,
    #[serde(default)]
    development: bool,
    key_env: Option<String>,
    key_file: Option<String>,
    auth_header: Option<String>,
    auth_template: Option<String>,
    strip_request_headers: Option<Vec<String>>,
    strip_prefix: Option<bool>,
    #[serde(default)]
    allowed_paths: Vec<String>,
    #[serde(default)]
    http2: bool,
}

/// One validated route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name used in metrics, logs and messages.
    pub name: String,
    /// Local path prefix (`/` for the default route), without a trailing slash otherwise.
    pub prefix: String,
    /// Whether the prefix is removed before forwarding.
    pub strip_prefix: bool,
    /// Where matching requests go.
    pub upstream: UpstreamUrl,
    /// For Baseten shortcuts: the stage short paths are mapped under.
    pub stage: Option<Stage>,
    /// What is injected and what is scrubbed.
    pub credential: Credential,
    /// Allowed methods and paths (matched on the local path).
    pub paths: PathPolicy,
    /// HTTP/2 to this upstream (gRPC) instead of HTTP/1.1.
    pub http2: bool,
}

/// Where one route's problems are reported: `key` for the top level,
/// `routes[i] "name".key` for a named route.
struct Scope(Option<String>);

impl Scope {
    fn setting(&self, key: &str) -> String {
        match &self.0 {
            None => key.to_owned(),
            Some(route) => format!("{route}.{key}"),
        }
    }
}

/// What a route points at, before validation.
struct TargetSpec<'a> {
    upstream: Option<&'a str>,
    model: Option<&'a str>,
    chain: Option<&'a str>,
    model_apis: bool,
    environment: Option<&'a str>,
    deployment: Option<&'a str>,
    development: bool,
}

/// A route's credential settings, before validation.
struct CredentialSpec<'a> {
    key_env: &'a str,
    key_file: Option<&'a str>,
    header: &'a str,
    template: &'a str,
    strip: &'a [String],
}

/// Builds and validates every route; `None` if anything was wrong.
pub(super) fn check(
    raw: &RawConfig,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<Vec<RouteConfig>> {
    let errors_before = found.0.len();
    let mut routes = Vec::new();

    let top = Scope(None);
    let top_target = TargetSpec {
        upstream: raw.upstream.as_deref(),
        model: raw.model.as_deref(),
        chain: raw.chain.as_deref(),
        model_apis: raw.model_apis,
        environment: raw.environment.as_deref(),
        deployment: raw.deployment.as_deref(),
        development: raw.development,
    };
    let top_target = target(&top_target, &top, found).flatten();
    // The top-level credential is checked whenever it may be used, even if the
    // upstream is missing, so that every problem is reported in one pass.
    if top_target.is_some() || raw.routes.is_empty() {
        let credential = credential(
            &CredentialSpec {
                key_env: &raw.key_env,
                key_file: raw.key_file.as_deref(),
                header: &raw.auth_header,
                template: &raw.auth_template,
                strip: &raw.strip_request_headers,
            },
            &top,
            env,
            found,
        );
        let paths = policy(&raw.allowed_paths, &top, found);
        if let (Some((upstream, stage)), Some(credential), Some(paths)) =
            (top_target, credential, paths)
        {
            routes.push(RouteConfig {
                name: "default".to_owned(),
                prefix: "/".to_owned(),
                strip_prefix: false,
                upstream,
                stage,
                credential,
                paths,
                http2: raw.upstream_http2,
            });
        }
    }

    for (index, route) in raw.routes.iter().enumerate() {
        let scope = Scope(Some(format!("routes[{index}] {:?}", route.name)));
        if let Some(route) = check_route(route, raw, &scope, env, found) {
            routes.push(route);
        }
    }

    let no_upstream = [&raw.upstream, &raw.model, &raw.chain]
        .iter()
        .all(|value| set(value.as_deref()).is_none())
        && !raw.model_apis;
    if raw.routes.is_empty() && no_upstream {
        found.report(
            "upstream",
            "not set; pass --upstream URL (or --model ID, --chain ID, --model-apis), \
             set KEYRELAY_UPSTREAM, or declare [[routes]] in the config file",
        );
    }
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i + 1..] {
            if a.prefix == b.prefix {
                found.report(
                    &format!("routes {:?} and {:?}", a.name, b.name),
                    format!(
                        "both use prefix {:?}; each prefix may appear once",
                        a.prefix
                    ),
                );
            }
            if a.name == b.name {
                found.report(
                    &format!("routes {:?}", a.name),
                    "two routes share this name; names must be unique",
                );
            }
        }
    }
    if found.0.len() > errors_before {
        return None;
    }
    // Longest prefix first, so the first match is the most specific.
    routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
    Some(routes)
}

fn check_route(
    route: &RawRoute,
    raw: &RawConfig,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<RouteConfig> {
    let prefix = route.prefix.trim();
    let prefix = if prefix == "/" {
        "/".to_owned()
    } else {
        prefix.trim_end_matches('/').to_owned()
    };
    if !prefix.starts_with('/') || prefix.contains(['?', '#', '*']) {
        found.report(
            &scope.setting("prefix"),
            format!("{:?} must be a path such as /llama", route.prefix),
        );
    }
    if route.name.trim().is_empty() {
        found.report(&scope.setting("name"), "must not be empty");
    }
    let spec = TargetSpec {
        upstream: route.upstream.as_deref(),
        model: route.model.as_deref(),
        chain: route.chain.as_deref(),
        model_apis: route.model_apis,
        environment: route.environment.as_deref(),
        deployment: route.deployment.as_deref(),
        development: route.development,
    };
    let target = match target(&spec, scope, found) {
        Some(Some(target)) => Some(target),
        Some(None) => {
            found.report(
                &scope.setting("upstream"),
                "the route has no upstream: set upstream, model, chain or model_apis",
            );
            None
        }
        None => None,
    };
    let key_env = route.key_env.as_deref().filter(|v| !v.is_empty());
    let key_file = route.key_file.as_deref().filter(|v| !v.is_empty());
    if key_env.is_none() && key_file.is_none() {
        found.report(
            &scope.setting("key_env"),
            "the route has no credential source: set key_env or key_file",
        );
        return None;
    }
    let credential = credential(
        &CredentialSpec {
            key_env: key_env.unwrap_or_default(),
            key_file,
            header: route.auth_header.as_deref().unwrap_or(&raw.auth_header),
            template: route.auth_template.as_deref().unwrap_or(&raw.auth_template),
            strip: route
                .strip_request_headers
                .as_deref()
                .unwrap_or(&raw.strip_request_headers),
        },
        scope,
        env,
        found,
    );
    let paths = policy(&route.allowed_paths, scope, found);
    let (upstream, stage) = target?;
    Some(RouteConfig {
        name: route.name.clone(),
        prefix,
        strip_prefix: route.strip_prefix.unwrap_or(true),
        upstream,
        stage,
        credential: credential?,
        paths: paths?,
        http2: route.http2,
    })
}

/// `value` unless it is missing or blank.
fn set(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

/// Resolves what a route points at: `Some(None)` when nothing was set.
fn target(
    spec: &TargetSpec<'_>,
    scope: &Scope,
    found: &mut Problems,
) -> Option<Option<(UpstreamUrl, Option<Stage>)>> {
    let model = set(spec.model);
    let chain = set(spec.chain);
    let upstream = set(spec.upstream);
    let chosen = [
        upstream.is_some(),
        model.is_some(),
        chain.is_some(),
        spec.model_apis,
    ]
    .iter()
    .filter(|chosen| **chosen)
    .count();
    if chosen > 1 {
        found.report(
            &scope.setting("upstream"),
            "set only one of upstream, model, chain and model_apis",
        );
        return None;
    }
    let environment = set(spec.environment);
    let deployment = set(spec.deployment);
    let stages = [
        environment.is_some(),
        deployment.is_some(),
        spec.development,
    ]
    .iter()
    .filter(|chosen| **chosen)
    .count();
    if stages > 1 {
        found.report(
            &scope.setting("environment"),
            "set only one of environment, deployment and development",
        );
        return None;
    }
    let named = match (model, chain) {
        (Some(id), _) => Some(Target::Model(id.to_owned())),
        (_, Some(id)) => Some(Target::Chain(id.to_owned())),
        _ => None,
    };
    if named.is_none() && stages > 0 {
        found.report(
            &scope.setting("environment"),
            "environment, deployment and development go with model or chain",
        );
        return None;
    }
    for (key, value) in [
        ("model", model),
        ("chain", chain),
        ("environment", environment),
        ("deployment", deployment),
    ] {
        if let Some(value) = value.filter(|v| !baseten::valid_name(v)) {
            found.report(
                &scope.setting(key),
                format!("{value:?} may contain only letters, digits, - and _"),
            );
            return None;
        }
    }
    let (url, stage) = match named {
        Some(target) => {
            let stage = match (environment, deployment) {
                (_, Some(id)) => Stage::Deployment(id.to_owned()),
                _ if spec.development => Stage::Development,
                (Some(name), _) => Stage::Environment(name.to_owned()),
                _ => Stage::Environment("production".to_owned()),
            };
            (baseten::upstream_url(&target), Some(stage))
        }
        None if spec.model_apis => (baseten::upstream_url(&Target::ModelApis), None),
        None => match upstream {
            Some(url) => (url.to_owned(), None),
            None => return Some(None),
        },
    };
    match parse_upstream(&url) {
        Ok(upstream) => Some(Some((upstream, stage))),
        Err(message) => {
            found.report(&scope.setting("upstream"), message);
            None
        }
    }
}

/// Validates a route's credential: header, template, strip list and the key itself.
fn credential(
    spec: &CredentialSpec<'_>,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<Credential> {
    let header = HeaderName::from_bytes(spec.header.as_bytes()).ok();
    if header.is_none() {
        found.report(
            &scope.setting("auth_header"),
            format!("{:?} is not a valid header name", spec.header),
        );
    }
    let template_ok = spec.template.contains(KEY_PLACEHOLDER);
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
    let (key, source_setting, source) = match &key_file {
        Some(path) => (
            secret_file::read(path)
                .map_err(|problem| found.report(&scope.setting("key_file"), problem))
                .ok(),
            "key_file",
            path.display().to_string(),
        ),
        None => {
            let key = env
                .get(spec.key_env)
                .map(|value| ApiKey::new(value.clone()))
                .filter(|key| !key.is_blank());
            if key.is_none() {
                found.report(
                    &scope.setting("key_env"),
                    format!(
                        "environment variable {} is not set or is empty; export the upstream API key \
                         in it (or set key_file)",
                        spec.key_env
                    ),
                );
            }
            (key, "key_env", spec.key_env.to_owned())
        }
    };
    let value = match &key {
        Some(key) if template_ok => key
            .header_value(spec.template)
            .map_err(|err| {
                found.report(
                    &scope.setting(source_setting),
                    format!("the key from {source} (as rendered by auth_template) {err}"),
                )
            })
            .ok(),
        _ => None,
    };
    let header = header?;
    if !strip.contains(&header) {
        strip.push(header.clone());
    }
    Some(Credential {
        key_env: spec.key_env.to_owned(),
        key_file,
        template: spec.template.to_owned(),
        header,
        value: value?,
        strip,
    })
}

fn policy(rules: &[String], scope: &Scope, found: &mut Problems) -> Option<PathPolicy> {
    PathPolicy::parse(rules)
        .map_err(|message| found.report(&scope.setting("allowed_paths"), message))
        .ok()
}

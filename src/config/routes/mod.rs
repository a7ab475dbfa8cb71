//! The route table: which local path prefix goes to which upstream, with
//! which credential.
//!
//! The top-level settings (`upstream` or a Baseten shortcut, `key_env`,
//! `auth_*`, `allowed_paths`, `upstream_http`, `set_request_headers`) make a
//! route named `default` at prefix `/`. A config file can add named routes,
//! which take the top-level route policy (the settings in [`Policy`]:
//! `auth_*`, the header lists, `allowed_paths`, `token_budget`,
//! `add_stream_usage` and the request rules `budget_reserve`,
//! `unparsed_budget_requests`, `max_output_tokens`, `over_max_output_tokens`,
//! `allowed_models`) and `upstream_http` unless they set their own:
//!
//! ```toml
//! [[routes]]
//! name = "llama"
//! prefix = "/llama"            # requests under /llama go here (prefix stripped)
//! model = "abc123"             # or upstream = "https://...", chain = "...", model_apis = true
//! environment = "production"   # or deployment = "...", development = true
//! key_env = "BASETEN_API_KEY"  # or key_file = "/run/secrets/key", key_command = [...],
//!                              # oauth_token_url = "https://..." (see `oauth`)
//! auth_template = "Api-Key {key}"
//! upstream_http = "2"          # or "1.1", "auto"; grpc = true implies "2"
//! set_request_headers = ["x-team: search"]
//! ```
//!
//! A `provider` preset ([`crate::config::providers`]) fills in the route's
//! upstream, key header and template, required headers and key variable,
//! wherever the route leaves them unwritten. Longest prefix wins. Every
//! problem names its route.
//!
//! Here: the route as written and as validated, and the checks of the whole
//! table. `policy` declares what routes inherit (one line per setting),
//! `rules` checks the request rules, `target` resolves the upstream (Baseten
//! and gRPC shortcuts, HTTP version), `credential` the key and the static
//! headers.

mod credential;
mod google;
pub(super) mod oauth;
mod policy;
mod retry;
mod rules;
mod target;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use self::credential::{
    credential, key_header, query_name, static_headers, strip_grpc_stage_headers, CredentialSpec,
};
use self::google::GoogleSettings;
use self::oauth::{OAuthSettings, Outbound};
use self::policy::{budget_account, path_policy, Inherit, Policy, Source};
pub use self::retry::RetryPolicy;
pub use self::rules::RequestRules;
use self::target::{named_protocol, resolve_protocol, target, Resolved, TargetSpec};
use super::check::{parse_budgets, Problems, Reported};
use super::parse::Switch;
use super::providers::{self, Provider};
use super::settings::default_of;
use super::{Credential, RawConfig, UpstreamHttp, UpstreamUrl};
use crate::config::baseten::Stage;
use crate::guard::paths::PathPolicy;
use crate::secrets::key::KEY_PLACEHOLDER;
use crate::usage::BudgetLimit;

/// A route as written in the config file; numbers and switches as text,
/// so a bad one is reported with the rest (naming the route).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    name: String,
    prefix: String,
    upstream: Option<String>,
    model: Option<String>,
    chain: Option<String>,
    #[serde(default)]
    model_apis: Switch,
    environment: Option<String>,
    deployment: Option<String>,
    #[serde(default)]
    development: Switch,
    #[serde(default)]
    grpc: Switch,
    #[serde(default)]
    regional: Switch,
    provider: Option<String>,
    key_env: Option<String>,
    key_file: Option<String>,
    key_command: Option<Vec<String>>,
    key_command_ttl: Option<String>,
    key_command_timeout: Option<String>,
    oauth_token_url: Option<String>,
    oauth_client_id: Option<String>,
    oauth_client_secret_env: Option<String>,
    oauth_client_secret_file: Option<String>,
    oauth_scope: Option<String>,
    oauth_audience: Option<String>,
    oauth_auth_method: Option<String>,
    google_credentials: Option<Switch>,
    google_credentials_file: Option<String>,
    google_scopes: Option<Vec<String>>,
    auth_header: Option<String>,
    auth_template: Option<String>,
    auth_query: Option<String>,
    strip_request_headers: Option<Vec<String>>,
    strip_prefix: Option<Switch>,
    allowed_paths: Option<Vec<String>>,
    token_budget: Option<Vec<String>>,
    add_stream_usage: Option<Switch>,
    budget_reserve: Option<String>,
    unparsed_budget_requests: Option<String>,
    max_output_tokens: Option<String>,
    over_max_output_tokens: Option<String>,
    allowed_models: Option<Vec<String>>,
    retry_on: Option<Vec<String>>,
    retry_attempts: Option<String>,
    retry_methods: Option<Vec<String>>,
    retry_budget: Option<String>,
    retry_max_wait: Option<String>,
    retry_buffer: Option<String>,
    eject_after: Option<String>,
    eject_for: Option<String>,
    /// Routes tried, in order, when this one's attempt fails (`retry_on`).
    fallback: Option<Vec<String>>,
    upstream_http: Option<String>,
    /// The older spelling of `upstream_http = "2"`.
    #[serde(default)]
    http2: Switch,
    set_request_headers: Option<Vec<String>>,
}

impl RawRoute {
    /// True if the route sets a `token_budget`.
    pub(super) fn has_budget(&self) -> bool {
        self.token_budget.as_ref().is_some_and(|b| !b.is_empty())
    }

    /// True if the route turns `add_stream_usage` on.
    pub(super) fn adds_stream_usage(&self) -> bool {
        self.add_stream_usage.as_ref().is_some_and(Switch::on)
    }
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
    /// The HTTP version spoken to this upstream.
    pub http: UpstreamHttp,
    /// Static headers set on every upstream request, replacing the client's.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// LLM tokens everyone may spend on this route per window.
    pub budgets: Vec<BudgetLimit>,
    /// The account `budgets` are counted in: the route's name, or
    /// `default` for the top-level budget the route inherited (shared by
    /// every route that inherits it).
    pub budget_account: String,
    /// Ask streams for usage the client did not ask for (`add_stream_usage`).
    pub add_stream_usage: bool,
    /// What a budgeted request reserves, and what happens to one keyrelay
    /// cannot read; the route's request caps.
    pub rules: RequestRules,
    /// Which upstream answers are tried again, and where.
    pub retry: RetryPolicy,
}

/// The name of the route the top-level settings make.
const DEFAULT_ROUTE: &str = "default";

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

/// Where a route's key comes from: `key_command` if set, else `key_file`,
/// else `key_env`.
struct KeySource<'a> {
    key_env: &'a str,
    key_file: Option<&'a str>,
    key_command: Option<&'a [String]>,
    oauth: OAuthSettings<'a>,
    google: GoogleSettings<'a>,
    outbound: &'a Outbound,
    /// The route's `provider` preset, filling in what the route leaves out.
    provider: Option<&'static Provider>,
}

/// What a route's policy makes, each checked in the route's context (its
/// prefix, its target, its key); `None` where something was wrong.
struct PolicyParts {
    credential: Option<Credential>,
    set_headers: Option<Vec<(HeaderName, HeaderValue)>>,
    paths: Option<PathPolicy>,
    budgets: Option<Vec<BudgetLimit>>,
}

/// Checks the parts of `policy` that depend on the route: the credential
/// (with the key from `key`), the static headers, the path rules (against
/// `prefix`) and the budgets.
fn policy_parts(
    policy: &Policy,
    key: &KeySource<'_>,
    grpc_headers: Option<&Vec<(&'static str, String)>>,
    prefix: &str,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> PolicyParts {
    let preset = key.provider;
    let header = preset_value(
        &policy.auth_header,
        "auth_header",
        preset.map(|p| p.auth_header),
    );
    let query = query_name(&policy.auth_query, &policy.auth_header, scope, found);
    let template = match &query {
        // A preset's template is made for its header; in a query the key
        // goes bare unless auth_template is written.
        Ok(Some(_)) if !written(&policy.auth_template, "auth_template", scope) => KEY_PLACEHOLDER,
        _ => preset_value(
            &policy.auth_template,
            "auth_template",
            preset.map(|p| p.auth_template),
        ),
    };
    let set_request_headers = with_preset_headers(&policy.set_request_headers.value, preset);
    let (mut credential, key) = credential(
        &CredentialSpec {
            key_env: key.key_env,
            key_file: key.key_file,
            key_command: key.key_command,
            key_command_ttl: &policy.key_command_ttl,
            key_command_timeout: &policy.key_command_timeout,
            oauth: key.oauth,
            google: key.google,
            outbound: key.outbound,
            header: key_header(header, grpc_headers.is_some()),
            template,
            query: query.clone().ok().flatten(),
            strip: &policy.strip_request_headers.value,
        },
        scope,
        env,
        found,
    );
    let set_headers = static_headers(
        &set_request_headers,
        grpc_headers,
        credential.as_ref(),
        key.as_ref(),
        scope,
        found,
    );
    strip_grpc_stage_headers(credential.as_mut(), grpc_headers.is_some());
    PolicyParts {
        credential: credential.filter(|_| query.is_ok()),
        set_headers,
        paths: path_policy(&policy.allowed_paths, prefix, scope, found),
        budgets: budgets(&policy.token_budget.value, scope, found),
    }
}

/// Builds and validates every route; `None` if anything was wrong.
pub(super) fn check(
    raw: &RawConfig,
    env: &HashMap<String, String>,
    outbound: &Outbound,
    found: &mut Problems,
) -> Option<Vec<RouteConfig>> {
    let errors_before = found.0.len();
    let mut routes = Vec::new();

    let top = Scope(None);
    let top_provider = preset(raw.provider.as_deref(), &top, found);
    let top_spec = TargetSpec::top(raw).or_upstream(top_provider.and_then(|p| p.upstream));
    let top_target = target(&top_spec, &top, found).ok().flatten();
    let top_http = named_protocol(
        raw.upstream_http.as_deref(),
        raw.upstream_http2.on(),
        "upstream_http2",
        &top,
        found,
    );
    // Read and checked whether or not a top-level route is made: routes
    // inherit them.
    let policy = Policy::top(raw, found);
    let rules = RequestRules::check(&policy, &top, found);
    let retry = RetryPolicy::check(&policy, None, &top, found);
    // The top-level credential is checked whenever it may be used, even if the
    // upstream is missing, so that every problem is reported in one pass.
    if top_target.is_some() || raw.routes.is_empty() {
        let top_route = TopRoute {
            target: top_target,
            provider: top_provider,
            http: top_http,
            rules: rules.clone(),
            retry,
        };
        routes.extend(default_route(raw, &policy, top_route, outbound, env, found));
    }

    let inherited_http = top_http.ok().flatten().unwrap_or(UpstreamHttp::Http1);
    for (index, route) in raw.routes.iter().enumerate() {
        let scope = Scope(Some(format!("routes[{index}] {:?}", route.name)));
        let inherited = Inherited {
            policy: &policy,
            http: inherited_http,
            outbound,
        };
        routes.extend(check_route(route, raw, &inherited, &scope, env, found));
    }

    report_unused_top_level(raw, found);
    report_clashes(&routes, found);
    report_fallbacks(&routes, found);
    if found.0.len() > errors_before {
        return None;
    }
    // Longest prefix first, so the first match is the most specific.
    routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
    Some(routes)
}

/// The top-level settings checked before the default route is built.
struct TopRoute {
    target: Option<Resolved>,
    provider: Option<&'static Provider>,
    http: Result<Option<UpstreamHttp>, Reported>,
    rules: Option<RequestRules>,
    retry: Option<RetryPolicy>,
}

/// The route the top-level settings make, at prefix `/`; `None` if
/// something was wrong (reported).
fn default_route(
    raw: &RawConfig,
    policy: &Policy,
    top_route: TopRoute,
    outbound: &Outbound,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<RouteConfig> {
    let top = Scope(None);
    let grpc_headers = top_route
        .target
        .as_ref()
        .and_then(|t| t.grpc_headers.as_ref());
    let provider = top_route.provider;
    // A key_env left at its default gives way to the provider's variable.
    let key_env = match provider {
        Some(provider) if raw.key_env == default_of("key_env") => provider.key_env,
        _ => &raw.key_env,
    };
    let key_file = set(raw.key_file.as_deref());
    let key_command = command(Some(&raw.key_command));
    let oauth = OAuthSettings::top(raw);
    let other_source = raw.key_env != default_of("key_env")
        || key_file.is_some()
        || key_command.is_some()
        || oauth.is_set();
    let key = KeySource {
        key_env,
        key_file,
        key_command,
        oauth,
        google: GoogleSettings::top(raw).with_preset(
            provider.is_some_and(Provider::google_credentials),
            other_source,
        ),
        outbound,
        provider,
    };
    let parts = policy_parts(policy, &key, grpc_headers, "/", &top, env, found);
    let grpc = grpc_headers.is_some();
    let http = top_route
        .http
        .ok()
        .and_then(|named| resolve_protocol(named, UpstreamHttp::Http1, grpc, &top, found));
    let target = top_route.target?;
    Some(RouteConfig {
        name: DEFAULT_ROUTE.to_owned(),
        prefix: "/".to_owned(),
        strip_prefix: false,
        upstream: target.upstream,
        stage: target.stage,
        credential: parts.credential?,
        paths: parts.paths?,
        http: http?,
        set_headers: parts.set_headers?,
        budgets: parts.budgets?,
        budget_account: budget_account(DEFAULT_ROUTE, policy),
        add_stream_usage: policy.add_stream_usage.value,
        rules: top_route.rules?,
        retry: top_route.retry?,
    })
}

/// Top-level settings that no route would use: refused, so that nothing
/// written in the config file silently applies to nothing.
fn report_unused_top_level(raw: &RawConfig, found: &mut Problems) {
    let no_upstream = [&raw.upstream, &raw.model, &raw.chain]
        .iter()
        .all(|value| set(value.as_deref()).is_none())
        && !raw.model_apis.on()
        && (raw.provider.as_deref())
            .and_then(providers::find)
            .and_then(|p| p.upstream)
            .is_none();
    if !raw.routes.is_empty() && no_upstream {
        for key in Policy::overridden_everywhere(raw) {
            found.report(
                key,
                "is set at the top level, but every [[routes]] entry sets its own and there \
                 is no top-level upstream, so it would apply to nothing",
            );
        }
    }
    let top_sources = [
        ("key_file", set(raw.key_file.as_deref()).is_some()),
        ("key_command", command(Some(&raw.key_command)).is_some()),
        ("oauth_token_url", OAuthSettings::top(raw).is_set()),
        ("google_credentials", GoogleSettings::top(raw).is_written()),
        ("google_scopes", GoogleSettings::top(raw).scopes_written()),
    ];
    for (key, is_set) in top_sources {
        if !raw.routes.is_empty() && no_upstream && is_set {
            found.report(
                key,
                "is set at the top level, but no upstream is, so no route would use it: \
                 each [[routes]] entry names its own key_env, key_file, key_command, \
                 oauth_token_url or google_credentials",
            );
        }
    }
    if raw.routes.is_empty() && no_upstream {
        found.report(
            "upstream",
            "not set; pass --upstream URL (or --model ID, --chain ID, --model-apis), \
             set KEYRELAY_UPSTREAM, or declare [[routes]] in the config file",
        );
    }
}

/// Routes that share a prefix, a name, or a budget account with different
/// budgets.
fn report_clashes(routes: &[RouteConfig], found: &mut Problems) {
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
            } else if a.budget_account == b.budget_account && a.budgets != b.budgets {
                // Only a [[routes]] entry named "default" with a budget of
                // its own, beside routes that inherit the top-level one.
                found.report(
                    &format!("routes {:?} and {:?}", a.name, b.name),
                    format!(
                        "both budgets would be counted as {:?}, the name of the top-level \
                         token_budget the routes without their own share; rename the route",
                        a.budget_account
                    ),
                );
            }
        }
    }
}

/// What a `[[routes]]` entry takes from the top level when it sets nothing.
struct Inherited<'a> {
    policy: &'a Policy,
    http: UpstreamHttp,
    outbound: &'a Outbound,
}

/// A route's prefix as matched: `/`, or without a trailing slash.
fn route_prefix(route: &RawRoute, scope: &Scope, found: &mut Problems) -> String {
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
    prefix
}

fn check_route(
    route: &RawRoute,
    raw: &RawConfig,
    inherited: &Inherited<'_>,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<RouteConfig> {
    let prefix = route_prefix(route, scope, found);
    if route.name.trim().is_empty() {
        found.report(&scope.setting("name"), "must not be empty");
    }
    let provider = preset(route.provider.as_deref(), scope, found);
    let spec = TargetSpec::of(route, raw).or_upstream(provider.and_then(|p| p.upstream));
    let target = match target(&spec, scope, found) {
        Ok(Some(target)) => Some(target),
        Ok(None) => {
            found.report(
                &scope.setting("upstream"),
                "the route has no upstream: set upstream, model, chain or model_apis",
            );
            None
        }
        Err(Reported) => None,
    };
    let key_env = route.key_env.as_deref().filter(|v| !v.is_empty());
    let key_file = route.key_file.as_deref().filter(|v| !v.is_empty());
    let key_command = command(route.key_command.as_ref());
    let oauth = OAuthSettings::route(route);
    let other_source =
        key_env.is_some() || key_file.is_some() || key_command.is_some() || oauth.is_set();
    let google = GoogleSettings::route(route).with_preset(
        provider.is_some_and(Provider::google_credentials),
        other_source,
    );
    let preset_key_env = provider.map(|p| p.key_env).filter(|k| !k.is_empty());
    if !other_source && preset_key_env.is_none() && !google.is_set() {
        found.report(
            &scope.setting("key_env"),
            "the route has no credential source: set key_env, key_file, key_command, \
             oauth_token_url or google_credentials",
        );
        return None;
    }
    let sources = [
        ("key_command", key_command.is_some()),
        ("oauth_token_url", oauth.is_set()),
        ("google_credentials", google.is_written()),
    ];
    for (source, _) in sources.iter().filter(|(_, set)| *set && key_env.is_some()) {
        found.report(
            &scope.setting(source),
            "the route also sets key_env; set one credential source",
        );
    }
    report_switches(route, scope, found);
    let policy = Policy::of(route, inherited.policy, scope, found);
    let grpc_headers = target.as_ref().and_then(|t| t.grpc_headers.as_ref());
    let key = KeySource {
        key_env: key_env.or(preset_key_env).unwrap_or_default(),
        key_file,
        key_command,
        oauth,
        google,
        outbound: inherited.outbound,
        provider,
    };
    let parts = policy_parts(&policy, &key, grpc_headers, &prefix, scope, env, found);
    let rules = RequestRules::check(&policy, scope, found);
    let retry = RetryPolicy::check(&policy, route.fallback.as_ref(), scope, found);
    report_without_budget(&policy, raw, scope, found);
    let grpc = grpc_headers.is_some();
    let http = named_protocol(
        route.upstream_http.as_deref(),
        route.http2.on(),
        "http2",
        scope,
        found,
    )
    .ok()
    .and_then(|named| resolve_protocol(named, inherited.http, grpc, scope, found));
    let target = target?;
    Some(RouteConfig {
        name: route.name.clone(),
        prefix,
        strip_prefix: route.strip_prefix.as_ref().is_none_or(Switch::on),
        upstream: target.upstream,
        stage: target.stage,
        credential: parts.credential?,
        paths: parts.paths?,
        http: http?,
        set_headers: parts.set_headers?,
        budgets: parts.budgets?,
        budget_account: budget_account(&route.name, &policy),
        add_stream_usage: policy.add_stream_usage.value,
        rules: rules?,
        retry: retry?,
    })
}

/// `fallback` lists that name no route, the route itself, a route twice,
/// or a route whose budget or request caps a request failing over to it
/// would escape.
fn report_fallbacks(routes: &[RouteConfig], found: &mut Problems) {
    for route in routes {
        let setting = format!("routes {:?}.fallback", route.name);
        for (at, name) in route.retry.fallback.iter().enumerate() {
            if *name == route.name {
                found.report(&setting, format!("{name:?} is this route itself"));
            } else if route.retry.fallback[..at].contains(name) {
                found.report(&setting, format!("{name:?} is listed twice"));
            } else if let Some(other) = routes.iter().find(|other| other.name == *name) {
                if let Some(escaped) = escaped_on_failover(route, other) {
                    found.report(
                        &setting,
                        format!(
                            "{name:?} has its own {escaped}, which a request failing over \
                             from {:?} would escape (it is checked and charged on the route \
                             it arrived on); give both routes the same (inherit it), or \
                             leave {name:?} out",
                            route.name
                        ),
                    );
                }
            } else {
                let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
                found.report(
                    &setting,
                    format!("{name:?} is not a route; the routes are {names:?}"),
                );
            }
        }
    }
}

/// What of `fallback`'s own limits a request arriving on `route` would not
/// be held to if it failed over: its budget (reserved and charged on
/// `route`), its request caps (checked on `route`'s).
fn escaped_on_failover(route: &RouteConfig, fallback: &RouteConfig) -> Option<&'static str> {
    if !fallback.budgets.is_empty()
        && (fallback.budget_account != route.budget_account || fallback.budgets != route.budgets)
    {
        return Some("token_budget");
    }
    let (theirs, ours) = (&fallback.rules.caps, &route.rules.caps);
    if !theirs.allowed_models.is_empty() && theirs.allowed_models != ours.allowed_models {
        return Some("allowed_models");
    }
    if theirs.max_output_tokens.is_some()
        && (theirs.max_output_tokens, theirs.over_max_output_tokens)
            != (ours.max_output_tokens, ours.over_max_output_tokens)
    {
        return Some("max_output_tokens");
    }
    None
}

/// A route's switches that are neither on nor off (`add_stream_usage`,
/// route policy, is read in [`Policy::of`]).
fn report_switches(route: &RawRoute, scope: &Scope, found: &mut Problems) {
    let switches = [
        ("model_apis", Some(&route.model_apis)),
        ("development", Some(&route.development)),
        ("grpc", Some(&route.grpc)),
        ("regional", Some(&route.regional)),
        ("http2", Some(&route.http2)),
        ("strip_prefix", route.strip_prefix.as_ref()),
        ("google_credentials", route.google_credentials.as_ref()),
    ];
    for (key, switch) in switches {
        if let Some(message) = switch.and_then(Switch::invalid) {
            found.report(&scope.setting(key), message);
        }
    }
}

/// A route's own budget settings that no budget would use.
fn report_without_budget(policy: &Policy, raw: &RawConfig, scope: &Scope, found: &mut Problems) {
    let no_budget = policy.token_budget.value.is_empty() && raw.access_token_budget.is_empty();
    let explicit = [
        ("budget_reserve", policy.budget_reserve.from),
        (
            "unparsed_budget_requests",
            policy.unparsed_budget_requests.from,
        ),
    ];
    for (setting, from) in explicit {
        if from == Source::Own && no_budget {
            found.report(
                &scope.setting(setting),
                "has no effect: no token_budget or access_token_budget applies to this route",
            );
        }
    }
}

/// A route's `token_budget` entries; `None` if one is wrong (reported).
fn budgets(entries: &[String], scope: &Scope, found: &mut Problems) -> Option<Vec<BudgetLimit>> {
    parse_budgets(entries, &scope.setting("token_budget"), found)
}

/// A `key_command` list, unless it is missing or empty.
fn command(argv: Option<&Vec<String>>) -> Option<&[String]> {
    argv.map(Vec::as_slice).filter(|argv| !argv.is_empty())
}

/// `value` unless it is missing or blank.
fn set(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

/// The `provider` preset named, if any; an unknown name is reported.
fn preset(written: Option<&str>, scope: &Scope, found: &mut Problems) -> Option<&'static Provider> {
    let name = set(written)?;
    let provider = providers::find(name);
    if provider.is_none() {
        found.report(
            &scope.setting("provider"),
            format!(
                "{name:?} is not a provider preset; the presets are {}",
                providers::names()
            ),
        );
    }
    provider
}

/// A route policy value, or the preset's when the route did not write
/// its own (it inherited the top level's, or left the default).
fn preset_value<'a>(
    setting: &'a Inherit<String>,
    key: &str,
    preset: Option<&'static str>,
) -> &'a str {
    match preset {
        Some(value) if setting.from == Source::Top || setting.value == default_of(key) => value,
        _ => &setting.value,
    }
}

/// True when the route (or, for the default route, the top level) wrote
/// this setting itself rather than leaving it to its default.
fn written(setting: &Inherit<String>, key: &str, scope: &Scope) -> bool {
    match (scope.0.is_some(), setting.from) {
        (true, Source::Own) => true,
        (true, Source::Top) => false,
        (false, _) => setting.value.trim() != default_of(key),
    }
}

/// `set_request_headers` with the preset's required headers first, each
/// unless an entry sets the same header.
fn with_preset_headers(entries: &[String], preset: Option<&Provider>) -> Vec<String> {
    let name = |entry: &str| {
        let name = entry.split_once(':').map_or(entry, |(name, _)| name);
        name.trim().to_ascii_lowercase()
    };
    let preset_headers = preset.map_or(&[][..], |p| p.headers);
    (preset_headers.iter())
        .filter(|header| !entries.iter().any(|entry| name(entry) == name(header)))
        .map(|header| (*header).to_owned())
        .chain(entries.iter().cloned())
        .collect()
}

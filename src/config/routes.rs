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
//! key_env = "BASETEN_API_KEY"  # or key_file = "/run/secrets/key"
//! auth_template = "Api-Key {key}"
//! upstream_http = "2"          # or "1.1", "auto"; grpc = true implies "2"
//! set_request_headers = ["x-team: search"]
//! ```
//!
//! Longest prefix wins. Every problem names its route.

use std::collections::HashMap;
use std::path::PathBuf;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::check::{parse_budgets, Problems};
use super::parse::{parse_upstream, split_list};
use super::request_headers;
use super::settings::SETTINGS;
use super::{Credential, RawConfig, UpstreamHttp, UpstreamUrl};
use crate::config::baseten::{self, Stage, Target};
use crate::guard::paths::PathPolicy;
use crate::secrets::key::{ApiKey, KEY_PLACEHOLDER};
use crate::secrets::secret_file;
use crate::usage::inspect::{OverCap, RequestCaps, Unparsed};
use crate::usage::BudgetLimit;

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
    #[serde(default)]
    grpc: bool,
    #[serde(default)]
    regional: bool,
    key_env: Option<String>,
    key_file: Option<String>,
    auth_header: Option<String>,
    auth_template: Option<String>,
    strip_request_headers: Option<Vec<String>>,
    strip_prefix: Option<bool>,
    allowed_paths: Option<Vec<String>>,
    token_budget: Option<Vec<String>>,
    add_stream_usage: Option<bool>,
    budget_reserve: Option<u64>,
    unparsed_budget_requests: Option<String>,
    max_output_tokens: Option<u64>,
    over_max_output_tokens: Option<String>,
    allowed_models: Option<Vec<String>>,
    upstream_http: Option<String>,
    /// The older spelling of `upstream_http = "2"`.
    #[serde(default)]
    http2: bool,
    set_request_headers: Option<Vec<String>>,
}

impl RawRoute {
    /// True if the route sets a `token_budget`.
    pub(super) fn has_budget(&self) -> bool {
        self.token_budget.as_ref().is_some_and(|b| !b.is_empty())
    }

    /// True if the route turns `add_stream_usage` on.
    pub(super) fn adds_stream_usage(&self) -> bool {
        self.add_stream_usage == Some(true)
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
}

/// How a route reads requests: budget reservations and request caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRules {
    /// Output tokens a budgeted request reserves when it names no limit.
    pub budget_reserve: u64,
    /// What happens to a budgeted request keyrelay cannot read.
    pub unparsed_budget_requests: Unparsed,
    /// `max_output_tokens`, `over_max_output_tokens`, `allowed_models`.
    pub caps: RequestCaps,
}

impl RequestRules {
    /// Validates the request rules in `policy`; `None` if one is wrong.
    /// Only the values the route sets itself are reported: an inherited
    /// one was checked (and reported) at the top level, where it is written.
    fn check(policy: &Policy, scope: &Scope, found: &mut Problems) -> Option<Self> {
        let mut valid = true;
        let mut wrong = |from: Source, setting: &str, message: String| {
            if from == Source::Own {
                found.report(&scope.setting(setting), message);
            }
            valid = false;
        };
        let unparsed = &policy.unparsed_budget_requests;
        let unparsed_budget_requests = Unparsed::parse(&unparsed.value);
        if unparsed_budget_requests.is_none() {
            let text = &unparsed.value;
            let message = format!("{text:?} is not one of: forward, refuse");
            wrong(unparsed.from, "unparsed_budget_requests", message);
        }
        let over = &policy.over_max_output_tokens;
        let over_max_output_tokens = OverCap::parse(&over.value);
        if over_max_output_tokens.is_none() {
            let text = &over.value;
            let message = format!("{text:?} is not one of: refuse, clamp");
            wrong(over.from, "over_max_output_tokens", message);
        }
        let max = &policy.max_output_tokens;
        if max.value == Ok(Some(0)) {
            let message = "0 would refuse every request; leave it unset (off) for no cap";
            wrong(max.from, "max_output_tokens", message.to_owned());
        }
        let models = &policy.allowed_models;
        let allowed_models: Vec<String> = models
            .value
            .iter()
            .map(|model| model.trim().to_owned())
            .collect();
        if allowed_models.iter().any(String::is_empty) {
            let message = "an empty model name would match no request; remove it";
            wrong(models.from, "allowed_models", message.to_owned());
        }
        let reserve = &policy.budget_reserve;
        // "off" at the top level reserves nothing, like 0.
        if matches!(reserve.value, Ok(None | Some(0))) {
            let message =
                "must be at least 1: a request that reserves nothing is not held to its budget";
            wrong(reserve.from, "budget_reserve", message.to_owned());
        }
        let (Some(unparsed_budget_requests), Some(over_max_output_tokens)) =
            (unparsed_budget_requests, over_max_output_tokens)
        else {
            return None;
        };
        let (Ok(Some(budget_reserve)), Ok(max_output_tokens)) = (reserve.value, max.value) else {
            return None;
        };
        valid.then_some(Self {
            budget_reserve,
            unparsed_budget_requests,
            caps: RequestCaps {
                max_output_tokens,
                over_max_output_tokens,
                allowed_models,
            },
        })
    }
}

/// A problem that was reported to [`Problems`] where the value is written;
/// what carries it is unusable, and nothing more needs saying about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reported;

/// A whole-number setting: `Ok(None)` is the top level's "off" (a route
/// writes a number or leaves the setting out); `Err` is top-level text that
/// is not a number.
type Number = Result<Option<u64>, Reported>;

/// Where a route's policy value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The route set it (or it is the default route, whose own settings
    /// are the top level's).
    Own,
    /// A `[[routes]]` entry left it out and took the top level's.
    Top,
}

/// One route policy value and where it came from.
struct Inherit<T> {
    value: T,
    from: Source,
}

/// A route policy value as the top level writes it (a `RawConfig` field of
/// type `Top`) and as a `[[routes]]` entry does (an `Option<Route>` field).
trait PolicyValue: Clone {
    /// The `RawRoute` field's type, inside its `Option`.
    type Route;
    /// The `RawConfig` field's type.
    type Top: AtDefault;
    /// A route's own value.
    fn own(route: &Self::Route) -> Self;
    /// The top level's value of setting `key`, read once (problems reported).
    fn top(top: &Self::Top, key: &str, found: &mut Problems) -> Self;
}

/// Policy values written the same way at the top level and in a route.
macro_rules! written_alike {
    ($($ty:ty),*) => {$(
        impl PolicyValue for $ty {
            type Route = $ty;
            type Top = $ty;
            fn own(route: &$ty) -> Self {
                route.clone()
            }
            fn top(top: &$ty, _key: &str, _found: &mut Problems) -> Self {
                top.clone()
            }
        }
    )*};
}

written_alike!(String, Vec<String>, bool);

/// A number in a route; text (a number or "off") at the top level, where
/// flags and environment variables set it too.
impl PolicyValue for Number {
    type Route = u64;
    type Top = String;
    fn own(route: &u64) -> Self {
        Ok(Some(*route))
    }
    fn top(top: &String, key: &str, found: &mut Problems) -> Self {
        found
            .optional::<u64>(key, top, "a whole number")
            .ok_or(Reported)
    }
}

/// Declares [`Policy`]: per setting, a route's own value or the top level's.
macro_rules! route_policy {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// A route's policy settings, each its own or inherited.
        struct Policy {
            $($field: Inherit<$ty>,)*
        }

        impl Policy {
            /// The top-level settings, as the default route's own; what
            /// cannot be read is reported here, once.
            fn top(raw: &RawConfig, found: &mut Problems) -> Self {
                Self {
                    $($field: Inherit {
                        value: <$ty as PolicyValue>::top(&raw.$field, stringify!($field), found),
                        from: Source::Own,
                    },)*
                }
            }

            /// A `[[routes]]` entry's: what it sets, else the top level's.
            fn of(route: &RawRoute, top: &Policy) -> Self {
                Self {
                    $($field: match &route.$field {
                        Some(value) => Inherit {
                            value: <$ty as PolicyValue>::own(value),
                            from: Source::Own,
                        },
                        None => Inherit { value: top.$field.value.clone(), from: Source::Top },
                    },)*
                }
            }

            /// The top-level settings that are set (not at their default)
            /// while every `[[routes]]` entry sets its own: without a
            /// default route they would apply to nothing.
            fn overridden_everywhere(raw: &RawConfig) -> Vec<&'static str> {
                let mut unused = Vec::new();
                $(
                    if !raw.$field.is_default(stringify!($field))
                        && raw.routes.iter().all(|route| route.$field.is_some())
                    {
                        unused.push(stringify!($field));
                    }
                )*
                unused
            }
        }
    };
}

/// Whether a top-level value is its setting's default (from `SETTINGS`).
trait AtDefault {
    fn is_default(&self, key: &str) -> bool;
}

fn default_of(key: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|setting| setting.key == key)
        .map_or("", |setting| setting.default)
}

impl AtDefault for String {
    fn is_default(&self, key: &str) -> bool {
        self.trim() == default_of(key)
    }
}

impl AtDefault for Vec<String> {
    fn is_default(&self, key: &str) -> bool {
        let set: Vec<&str> = self
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        set == split_list(default_of(key))
    }
}

impl AtDefault for bool {
    fn is_default(&self, key: &str) -> bool {
        *self == (default_of(key) == "true")
    }
}

// Every per-route policy setting that also exists at the top level: a
// `[[routes]]` entry that leaves it out takes the top level's value, one
// that sets it (even to `[]`) keeps its own, and a top-level value that
// every route overrides, with no top-level route to use it, is refused.
// Adding one is one line here, given a `RawConfig` field and an `Option`
// `RawRoute` field of the same name (of the types a `PolicyValue` pairs),
// plus a row in the README's "Route policy" table. Settings that apply
// process-wide (token_rate_limit, access_token_budget, max_request_body,
// max_concurrent_requests) are not route policy.
route_policy! {
    auth_header: String,
    auth_template: String,
    strip_request_headers: Vec<String>,
    set_request_headers: Vec<String>,
    allowed_paths: Vec<String>,
    token_budget: Vec<String>,
    add_stream_usage: bool,
    // Request rules ([`RequestRules`]).
    budget_reserve: Number,
    unparsed_budget_requests: String,
    max_output_tokens: Number,
    over_max_output_tokens: String,
    allowed_models: Vec<String>,
}

/// The account a route's `token_budget` is counted in: its own name when
/// it sets one, else the top level's budget, one budget shared by the
/// default route and every route that inherits it (as `default`).
fn budget_account(name: &str, policy: &Policy) -> String {
    match policy.token_budget.from {
        Source::Own => name.to_owned(),
        Source::Top => DEFAULT_ROUTE.to_owned(),
    }
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

/// What a route points at, before validation.
struct TargetSpec<'a> {
    upstream: Option<&'a str>,
    model: Option<&'a str>,
    chain: Option<&'a str>,
    model_apis: bool,
    environment: Option<&'a str>,
    deployment: Option<&'a str>,
    development: bool,
    grpc: bool,
    regional: bool,
    /// `allow_cleartext_upstream`: an `http://` upstream beyond loopback.
    allow_cleartext: bool,
}

impl<'a> TargetSpec<'a> {
    /// The top-level target settings.
    fn top(raw: &'a RawConfig) -> Self {
        Self {
            upstream: raw.upstream.as_deref(),
            model: raw.model.as_deref(),
            chain: raw.chain.as_deref(),
            model_apis: raw.model_apis,
            environment: raw.environment.as_deref(),
            deployment: raw.deployment.as_deref(),
            development: raw.development,
            grpc: raw.grpc,
            regional: raw.regional,
            allow_cleartext: raw.allow_cleartext_upstream,
        }
    }

    /// A `[[routes]]` entry's target settings.
    fn of(route: &'a RawRoute, raw: &RawConfig) -> Self {
        Self {
            upstream: route.upstream.as_deref(),
            model: route.model.as_deref(),
            chain: route.chain.as_deref(),
            model_apis: route.model_apis,
            environment: route.environment.as_deref(),
            deployment: route.deployment.as_deref(),
            development: route.development,
            grpc: route.grpc,
            regional: route.regional,
            allow_cleartext: raw.allow_cleartext_upstream,
        }
    }
}

/// What a route points at, resolved.
struct Resolved {
    upstream: UpstreamUrl,
    stage: Option<Stage>,
    /// For `grpc`: the headers naming the model and its stage.
    grpc_headers: Option<Vec<(&'static str, String)>>,
}

/// Where a route's key comes from: `key_file` if set, else `key_env`.
struct KeySource<'a> {
    key_env: &'a str,
    key_file: Option<&'a str>,
}

/// A route's credential settings, before validation.
struct CredentialSpec<'a> {
    key_env: &'a str,
    key_file: Option<&'a str>,
    header: &'a str,
    template: &'a str,
    strip: &'a [String],
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
    let (mut credential, key) = credential(
        &CredentialSpec {
            key_env: key.key_env,
            key_file: key.key_file,
            header: key_header(&policy.auth_header.value, grpc_headers.is_some()),
            template: &policy.auth_template.value,
            strip: &policy.strip_request_headers.value,
        },
        scope,
        env,
        found,
    );
    let set_headers = static_headers(
        &policy.set_request_headers.value,
        grpc_headers,
        credential.as_ref(),
        key.as_ref(),
        scope,
        found,
    );
    strip_grpc_stage_headers(credential.as_mut(), grpc_headers.is_some());
    PolicyParts {
        credential,
        set_headers,
        paths: path_policy(&policy.allowed_paths, prefix, scope, found),
        budgets: budgets(&policy.token_budget.value, scope, found),
    }
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
    let top_target = target(&TargetSpec::top(raw), &top, found).ok().flatten();
    let top_http = named_protocol(
        raw.upstream_http.as_deref(),
        raw.upstream_http2,
        "upstream_http2",
        &top,
        found,
    );
    // Read and checked whether or not a top-level route is made: routes
    // inherit them.
    let policy = Policy::top(raw, found);
    let rules = RequestRules::check(&policy, &top, found);
    // The top-level credential is checked whenever it may be used, even if the
    // upstream is missing, so that every problem is reported in one pass.
    if top_target.is_some() || raw.routes.is_empty() {
        let top_route = TopRoute {
            target: top_target,
            http: top_http,
            rules: rules.clone(),
        };
        routes.extend(default_route(raw, &policy, top_route, env, found));
    }

    let inherited_http = top_http.ok().flatten().unwrap_or(UpstreamHttp::Http1);
    for (index, route) in raw.routes.iter().enumerate() {
        let scope = Scope(Some(format!("routes[{index}] {:?}", route.name)));
        let inherited = Inherited {
            policy: &policy,
            http: inherited_http,
        };
        routes.extend(check_route(route, raw, &inherited, &scope, env, found));
    }

    report_unused_top_level(raw, found);
    report_clashes(&routes, found);
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
    http: Result<Option<UpstreamHttp>, Reported>,
    rules: Option<RequestRules>,
}

/// The route the top-level settings make, at prefix `/`; `None` if
/// something was wrong (reported).
fn default_route(
    raw: &RawConfig,
    policy: &Policy,
    top_route: TopRoute,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> Option<RouteConfig> {
    let top = Scope(None);
    let grpc_headers = top_route
        .target
        .as_ref()
        .and_then(|t| t.grpc_headers.as_ref());
    let key = KeySource {
        key_env: &raw.key_env,
        key_file: raw.key_file.as_deref(),
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
    })
}

/// Top-level settings that no route would use: refused, so that nothing
/// written in the config file silently applies to nothing.
fn report_unused_top_level(raw: &RawConfig, found: &mut Problems) {
    let no_upstream = [&raw.upstream, &raw.model, &raw.chain]
        .iter()
        .all(|value| set(value.as_deref()).is_none())
        && !raw.model_apis;
    if !raw.routes.is_empty() && no_upstream {
        for key in Policy::overridden_everywhere(raw) {
            found.report(
                key,
                "is set at the top level, but every [[routes]] entry sets its own and there \
                 is no top-level upstream, so it would apply to nothing",
            );
        }
    }
    if !raw.routes.is_empty() && no_upstream && set(raw.key_file.as_deref()).is_some() {
        found.report(
            "key_file",
            "is set at the top level, but no upstream is, so no route would use it: \
             each [[routes]] entry names its own key_env or key_file",
        );
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
    let target = match target(&TargetSpec::of(route, raw), scope, found) {
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
    if key_env.is_none() && key_file.is_none() {
        found.report(
            &scope.setting("key_env"),
            "the route has no credential source: set key_env or key_file",
        );
        return None;
    }
    let policy = Policy::of(route, inherited.policy);
    let grpc_headers = target.as_ref().and_then(|t| t.grpc_headers.as_ref());
    let key = KeySource {
        key_env: key_env.unwrap_or_default(),
        key_file,
    };
    let parts = policy_parts(&policy, &key, grpc_headers, &prefix, scope, env, found);
    let rules = RequestRules::check(&policy, scope, found);
    report_without_budget(&policy, raw, scope, found);
    let grpc = grpc_headers.is_some();
    let http = named_protocol(
        route.upstream_http.as_deref(),
        route.http2,
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
        strip_prefix: route.strip_prefix.unwrap_or(true),
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
    })
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

/// The HTTP version a route names: `upstream_http`, or the older switch
/// (`http2` on a route, `upstream_http2` at the top level) meaning "2";
/// `Ok(None)` when it names none.
fn named_protocol(
    text: Option<&str>,
    switch_on: bool,
    switch: &str,
    scope: &Scope,
    found: &mut Problems,
) -> Result<Option<UpstreamHttp>, Reported> {
    let named = match set(text) {
        None => None,
        Some(text) => match UpstreamHttp::parse(text) {
            Some(named) => Some(named),
            None => {
                found.report(
                    &scope.setting("upstream_http"),
                    format!("{text:?} is not one of: 1.1, 2, auto"),
                );
                return Err(Reported);
            }
        },
    };
    match named {
        Some(named) if switch_on && named != UpstreamHttp::Http2 => {
            found.report(
                &scope.setting(switch),
                format!(
                    "{switch} means upstream_http = \"2\", which contradicts \
                     upstream_http = \"{named}\"; set only upstream_http"
                ),
            );
            Err(Reported)
        }
        None if switch_on => Ok(Some(UpstreamHttp::Http2)),
        named => Ok(named),
    }
}

/// The HTTP version a route speaks: the one it names, else `inherited`.
/// gRPC is HTTP/2, so a gRPC route speaks it unless it names "1.1", which
/// is refused.
fn resolve_protocol(
    named: Option<UpstreamHttp>,
    inherited: UpstreamHttp,
    grpc: bool,
    scope: &Scope,
    found: &mut Problems,
) -> Option<UpstreamHttp> {
    match named {
        Some(UpstreamHttp::Http1) if grpc => {
            found.report(
                &scope.setting("upstream_http"),
                "grpc needs HTTP/2; remove upstream_http = \"1.1\"",
            );
            None
        }
        _ if grpc => Some(UpstreamHttp::Http2),
        named => Some(named.unwrap_or(inherited)),
    }
}

/// On a gRPC route a client's own stage headers are removed, so a call
/// cannot pick a stage other than the configured one (or production).
fn strip_grpc_stage_headers(credential: Option<&mut Credential>, grpc: bool) {
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
fn key_header(configured: &str, grpc: bool) -> &str {
    if grpc && configured.eq_ignore_ascii_case("authorization") {
        baseten::GRPC_KEY_HEADER
    } else {
        configured
    }
}

/// The route's static request headers: its `set_request_headers` and, for
/// a gRPC shortcut, the headers naming the model (which win: they are what
/// makes the shortcut reach its model).
fn static_headers(
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

/// `value` unless it is missing or blank.
fn set(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

/// Resolves what a route points at: `Ok(None)` when nothing was set.
fn target(
    spec: &TargetSpec<'_>,
    scope: &Scope,
    found: &mut Problems,
) -> Result<Option<Resolved>, Reported> {
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
        return Err(Reported);
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
        return Err(Reported);
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
        return Err(Reported);
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
            return Err(Reported);
        }
    }
    if let Some(problem) = shortcut_problem(spec, model, environment) {
        let key = if spec.grpc { "grpc" } else { "regional" };
        found.report(&scope.setting(key), problem);
        return Err(Reported);
    }
    let given = match (environment, deployment) {
        (_, Some(id)) => Some(Stage::Deployment(id.to_owned())),
        _ if spec.development => Some(Stage::Development),
        (Some(name), _) => Some(Stage::Environment(name.to_owned())),
        _ => None,
    };
    let mut grpc_headers = None;
    let (url, stage) = match (named, model) {
        (Some(_), Some(id)) if spec.grpc => {
            grpc_headers = Some(baseten::grpc_headers(id, given.as_ref()));
            (baseten::grpc_url(id), None)
        }
        (Some(_), Some(id)) if spec.regional => (
            baseten::regional_url(id, environment.unwrap_or_default()),
            Some(Stage::Regional),
        ),
        (Some(target), _) => {
            let stage = given.unwrap_or_else(|| Stage::Environment("production".to_owned()));
            (baseten::upstream_url(&target), Some(stage))
        }
        (None, _) if spec.model_apis => (baseten::upstream_url(&Target::ModelApis), None),
        (None, _) => match upstream {
            Some(url) => (url.to_owned(), None),
            None => return Ok(None),
        },
    };
    match parse_upstream(&url) {
        Ok(upstream) if is_cleartext_beyond_loopback(&upstream) && !spec.allow_cleartext => {
            found.report(
                &scope.setting("upstream"),
                format!(
                    "{upstream} is plain http:// to a host that is not loopback: the key would \
                     cross the network in clear text; use https://, or set \
                     allow_cleartext_upstream = true if that network path is trusted"
                ),
            );
            Err(Reported)
        }
        Ok(upstream) => Ok(Some(Resolved {
            upstream,
            stage,
            grpc_headers,
        })),
        Err(message) => {
            found.report(&scope.setting("upstream"), message);
            Err(Reported)
        }
    }
}

/// True for a plain `http://` upstream whose host is not `localhost` or a
/// loopback address.
fn is_cleartext_beyond_loopback(upstream: &UpstreamUrl) -> bool {
    if upstream.scheme != http::uri::Scheme::HTTP {
        return false;
    }
    let host = upstream.authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    !loopback
}

/// Why `grpc` or `regional` cannot apply to what the route points at.
fn shortcut_problem(
    spec: &TargetSpec<'_>,
    model: Option<&str>,
    environment: Option<&str>,
) -> Option<&'static str> {
    if spec.grpc && spec.regional {
        return Some("set only one of grpc and regional");
    }
    if spec.grpc && model.is_none() {
        return Some("grpc goes with model: it calls the model's gRPC server at model-ID.grpc.api.baseten.co");
    }
    if spec.grpc && spec.development {
        return Some("Baseten's gRPC endpoint does not serve development deployments; set environment or deployment, or neither for production");
    }
    if spec.regional && (model.is_none() || environment.is_none()) {
        return Some("regional goes with model and environment: the regional host is model-ID-ENV.api.baseten.co");
    }
    None
}

/// Validates a route's credential: header, template, strip list and the key
/// itself. The key comes back too (when it could be read), for checks that
/// other settings do not contain it.
fn credential(
    spec: &CredentialSpec<'_>,
    scope: &Scope,
    env: &HashMap<String, String>,
    found: &mut Problems,
) -> (Option<Credential>, Option<ApiKey>) {
    let header = HeaderName::from_bytes(spec.header.as_bytes())
        .ok()
        .filter(|name| !request_headers::is_managed(name));
    if header.is_none() {
        let name = spec.header.trim();
        let why = if name.starts_with(':') {
            "is an HTTP/2 pseudo-header, which keyrelay sets itself; the credential needs an ordinary header"
        } else if HeaderName::from_bytes(name.as_bytes()).is_ok() {
            "frames or routes the message (host, length, transfer coding, hop-by-hop), \
             which keyrelay manages itself: a credential there would be dropped or corrupt \
             the request; use an ordinary header such as authorization"
        } else {
            "is not a valid header name"
        };
        found.report(
            &scope.setting("auth_header"),
            format!("{:?} {why}", spec.header),
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
    let (Some(header), Some(value)) = (header, value) else {
        return (None, key);
    };
    if !strip.contains(&header) {
        strip.push(header.clone());
    }
    let credential = Credential {
        key_env: spec.key_env.to_owned(),
        key_file,
        template: spec.template.to_owned(),
        header,
        value,
        strip,
    };
    (Some(credential), key)
}

/// The route's `allowed_paths`. Rules match the local path, prefix
/// included, so a rule outside the route's prefix can never match there: a
/// route's own such rule is a mistake, and so is an inherited list none of
/// whose rules can match (an inherited list may hold rules for other routes).
fn path_policy(
    rules: &Inherit<Vec<String>>,
    prefix: &str,
    scope: &Scope,
    found: &mut Problems,
) -> Option<PathPolicy> {
    let setting = scope.setting("allowed_paths");
    let policy = PathPolicy::parse(&rules.value)
        .map_err(|message| found.report(&setting, message))
        .ok()?;
    let outside = policy.rules_outside(prefix);
    match rules.from {
        Source::Own if !outside.is_empty() => {
            for rule in outside {
                found.report(
                    &setting,
                    format!(
                        "{rule:?} can never match: this route serves only paths under {prefix} \
                         (rules match the local path, prefix included)"
                    ),
                );
            }
            None
        }
        Source::Top if !policy.is_empty() && outside.len() == policy.len() => {
            found.report(
                &setting,
                format!(
                    "inherits the top-level allowed_paths, and none of its rules can match under \
                     this route's prefix {prefix} (rules match the local path, prefix included); \
                     give the route its own allowed_paths (or [] for none)"
                ),
            );
            None
        }
        _ => Some(policy),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::baseten::Stage;
    use crate::config::load::tests::sources;
    use crate::config::{load, Config, ConfigError, Sources, UpstreamHttp};

    const KEY: (&str, &str) = ("BASETEN_API_KEY", "k-123");

    fn settings(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![KEY];
        all.extend_from_slice(pairs);
        load(&sources(&all))
    }

    fn problems(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        settings(pairs)
            .expect_err("refused")
            .problems
            .into_iter()
            .map(|p| (p.setting, p.message))
            .collect()
    }

    fn set_headers(config: &Config) -> Vec<(String, String)> {
        config.routes[0]
            .set_headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect()
    }

    fn with_file(toml: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "keyrelay-routes-{}-{}.toml",
            std::process::id(),
            toml.len()
        ));
        std::fs::write(&path, toml).expect("write");
        let mut all = vec![KEY];
        all.extend_from_slice(pairs);
        let loaded = load(&Sources {
            file: Some(path.clone()),
            ..sources(&all)
        });
        std::fs::remove_file(&path).expect("remove");
        loaded
    }

    #[test]
    fn grpc_shortcut_builds_the_grpc_host_http2_and_the_model_headers() {
        let config = settings(&[
            ("KEYRELAY_MODEL", "abc123"),
            ("KEYRELAY_GRPC", "true"),
            ("KEYRELAY_ENVIRONMENT", "staging"),
        ])
        .expect("valid");
        let route = &config.routes[0];
        assert_eq!(
            route.upstream.to_string(),
            "https://model-abc123.grpc.api.baseten.co"
        );
        assert_eq!(route.http, UpstreamHttp::Http2);
        assert_eq!(route.stage, None, "gRPC paths are method names, not mapped");
        assert_eq!(route.credential.header, "baseten-authorization");
        assert_eq!(route.credential.value.as_bytes(), b"Api-Key k-123");
        assert!(route.credential.strip.iter().any(|h| h == "authorization"));
        for stage_header in ["x-baseten-environment", "x-baseten-deployment"] {
            assert!(
                route.credential.strip.iter().any(|h| h == stage_header),
                "a client's {stage_header} is removed"
            );
        }
        assert_eq!(
            set_headers(&config),
            [
                ("baseten-model-id".to_owned(), "model-abc123".to_owned()),
                ("x-baseten-environment".to_owned(), "staging".to_owned())
            ]
        );

        let deployment = settings(&[
            ("KEYRELAY_MODEL", "abc123"),
            ("KEYRELAY_GRPC", "true"),
            ("KEYRELAY_DEPLOYMENT", "dep42"),
        ])
        .expect("valid");
        assert_eq!(
            set_headers(&deployment)[1],
            ("x-baseten-deployment".to_owned(), "dep42".to_owned())
        );
        let production =
            settings(&[("KEYRELAY_MODEL", "abc123"), ("KEYRELAY_GRPC", "true")]).expect("valid");
        assert_eq!(
            set_headers(&production).len(),
            1,
            "no stage header: production"
        );
    }

    #[test]
    fn grpc_and_regional_refuse_what_they_cannot_reach() {
        let grpc_chain = problems(&[("KEYRELAY_CHAIN", "c1"), ("KEYRELAY_GRPC", "true")]);
        assert_eq!(grpc_chain[0].0, "grpc");
        assert!(
            grpc_chain[0].1.contains("goes with model"),
            "{grpc_chain:?}"
        );
        let grpc_dev = problems(&[
            ("KEYRELAY_MODEL", "m"),
            ("KEYRELAY_GRPC", "true"),
            ("KEYRELAY_DEVELOPMENT", "true"),
        ]);
        assert!(grpc_dev[0].1.contains("development"), "{grpc_dev:?}");
        let regional = problems(&[("KEYRELAY_MODEL", "m"), ("KEYRELAY_REGIONAL", "true")]);
        assert_eq!(regional[0].0, "regional");
        assert!(regional[0].1.contains("environment"), "{regional:?}");
        let both = problems(&[
            ("KEYRELAY_MODEL", "m"),
            ("KEYRELAY_ENVIRONMENT", "e"),
            ("KEYRELAY_REGIONAL", "true"),
            ("KEYRELAY_GRPC", "true"),
        ]);
        assert!(
            both[0].1.contains("only one of grpc and regional"),
            "{both:?}"
        );
        let grpc_http1 = problems(&[
            ("KEYRELAY_MODEL", "m"),
            ("KEYRELAY_GRPC", "true"),
            ("KEYRELAY_UPSTREAM_HTTP", "1.1"),
        ]);
        assert_eq!(grpc_http1[0].0, "upstream_http", "{grpc_http1:?}");
        let model_id = problems(&[
            ("KEYRELAY_MODEL", "m"),
            ("KEYRELAY_GRPC", "true"),
            ("KEYRELAY_SET_REQUEST_HEADERS", "baseten-model-id: other"),
        ]);
        assert_eq!(model_id[0].0, "set_request_headers");
    }

    #[test]
    fn regional_shortcut_puts_the_environment_in_the_host() {
        let config = settings(&[
            ("KEYRELAY_MODEL", "abc123"),
            ("KEYRELAY_ENVIRONMENT", "staging"),
            ("KEYRELAY_REGIONAL", "true"),
        ])
        .expect("valid");
        let route = &config.routes[0];
        assert_eq!(
            route.upstream.to_string(),
            "https://model-abc123-staging.api.baseten.co"
        );
        assert_eq!(route.stage, Some(Stage::Regional));
        assert_eq!(route.http, UpstreamHttp::Http1);
    }

    #[test]
    fn upstream_http_takes_three_values_and_the_old_switch() {
        let http = |pairs: &[(&str, &str)]| {
            let mut all = vec![("KEYRELAY_UPSTREAM", "https://a.test")];
            all.extend_from_slice(pairs);
            settings(&all).map(|config| config.routes[0].http)
        };
        assert_eq!(http(&[]).expect("valid"), UpstreamHttp::Http1);
        assert_eq!(
            http(&[("KEYRELAY_UPSTREAM_HTTP", "2")]).expect("valid"),
            UpstreamHttp::Http2
        );
        assert_eq!(
            http(&[("KEYRELAY_UPSTREAM_HTTP", "auto")]).expect("valid"),
            UpstreamHttp::Auto
        );
        assert_eq!(
            http(&[("KEYRELAY_UPSTREAM_HTTP2", "true")]).expect("valid"),
            UpstreamHttp::Http2
        );
        let bad = http(&[("KEYRELAY_UPSTREAM_HTTP", "h3")]).expect_err("refused");
        assert_eq!(bad.problems[0].setting, "upstream_http");
        assert!(bad.problems[0].message.contains("1.1, 2, auto"));
        let contradiction = http(&[
            ("KEYRELAY_UPSTREAM_HTTP", "auto"),
            ("KEYRELAY_UPSTREAM_HTTP2", "true"),
        ])
        .expect_err("refused");
        assert_eq!(contradiction.problems[0].setting, "upstream_http2");
    }

    #[test]
    fn request_rules_are_checked_and_routes_inherit_them_unless_they_set_their_own() {
        use crate::usage::inspect::{OverCap, Unparsed};
        let config = with_file(
            r#"
max_output_tokens = 1000
allowed_models = ["small"]
budget_reserve = 512
token_budget = ["100000/day"]

[[routes]]
name = "inherits"
prefix = "/a"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "own"
prefix = "/b"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
token_budget = ["10/minute"]
budget_reserve = 64
unparsed_budget_requests = "refuse"
max_output_tokens = 50
over_max_output_tokens = "clamp"
allowed_models = []
"#,
            &[],
        )
        .expect("valid");
        let rules = |name: &str| {
            &config
                .routes
                .iter()
                .find(|r| r.name == name)
                .expect("route")
                .rules
        };
        assert_eq!(rules("inherits").budget_reserve, 512);
        assert_eq!(rules("inherits").caps.max_output_tokens, Some(1000));
        assert_eq!(rules("inherits").caps.allowed_models, ["small"]);
        assert_eq!(rules("own").budget_reserve, 64);
        assert_eq!(rules("own").unparsed_budget_requests, Unparsed::Refuse);
        assert_eq!(rules("own").caps.over_max_output_tokens, OverCap::Clamp);
        assert!(rules("own").caps.allowed_models.is_empty());

        let refused = with_file(
            r#"
budget_reserve = "lots"
over_max_output_tokens = "trim"

[[routes]]
name = "r"
prefix = "/r"
upstream = "https://r.test"
key_env = "BASETEN_API_KEY"
unparsed_budget_requests = "drop"
max_output_tokens = 0
allowed_models = [" "]
"#,
            &[],
        )
        .expect_err("refused");
        let settings: Vec<&str> = refused
            .problems
            .iter()
            .map(|p| p.setting.as_str())
            .collect();
        for expected in [
            "budget_reserve",
            "over_max_output_tokens",
            r#"routes[0] "r".unparsed_budget_requests"#,
            r#"routes[0] "r".max_output_tokens"#,
            r#"routes[0] "r".allowed_models"#,
        ] {
            assert!(settings.contains(&expected), "{expected} in {settings:?}");
        }
    }

    #[test]
    fn top_level_request_rules_every_route_overrides_are_refused() {
        let route = |name: &str, prefix: &str, own: &str| {
            format!(
                "[[routes]]\nname = {name:?}\nprefix = {prefix:?}\nupstream = \"https://a.test\"\n\
                 key_env = \"BASETEN_API_KEY\"\ntoken_budget = [\"10/minute\"]\n{own}\n"
            )
        };
        let own = "budget_reserve = 64\nunparsed_budget_requests = \"forward\"\n\
                   max_output_tokens = 50\nover_max_output_tokens = \"refuse\"\nallowed_models = []";
        let top = "budget_reserve = 512\nunparsed_budget_requests = \"refuse\"\n\
                   max_output_tokens = \"1000\"\nover_max_output_tokens = \"clamp\"\n\
                   allowed_models = [\"small\"]\n";
        let refused = with_file(
            &format!("{top}{}{}", route("a", "/a", own), route("b", "/b", own)),
            &[],
        )
        .expect_err("refused");
        let unused: Vec<&str> = refused
            .problems
            .iter()
            .filter(|p| p.message.contains("would apply to nothing"))
            .map(|p| p.setting.as_str())
            .collect();
        assert_eq!(
            unused,
            [
                "budget_reserve",
                "unparsed_budget_requests",
                "max_output_tokens",
                "over_max_output_tokens",
                "allowed_models"
            ],
            "{refused}"
        );
        // One route that inherits them is enough for them to apply.
        with_file(
            &format!("{top}{}{}", route("a", "/a", own), route("b", "/b", "")),
            &[],
        )
        .expect("valid");
    }

    #[test]
    fn routes_inherit_upstream_http_and_static_headers_unless_they_set_their_own() {
        let config = with_file(
            r#"
upstream_http = "auto"
set_request_headers = ["x-team: ml"]

[[routes]]
name = "inherits"
prefix = "/a"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "own"
prefix = "/b"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
upstream_http = "1.1"
set_request_headers = []

[[routes]]
name = "old-switch"
prefix = "/c"
upstream = "https://c.test"
key_env = "BASETEN_API_KEY"
http2 = true

[[routes]]
name = "grpc"
prefix = "/d"
model = "abc"
grpc = true
key_env = "BASETEN_API_KEY"
"#,
            &[],
        )
        .expect("valid");
        let route = |name: &str| {
            config
                .routes
                .iter()
                .find(|r| r.name == name)
                .expect("route")
        };
        assert_eq!(route("inherits").http, UpstreamHttp::Auto);
        assert_eq!(route("inherits").set_headers.len(), 1);
        assert_eq!(route("own").http, UpstreamHttp::Http1);
        assert!(route("own").set_headers.is_empty());
        assert_eq!(route("old-switch").http, UpstreamHttp::Http2);
        assert_eq!(route("grpc").http, UpstreamHttp::Http2);
        assert_eq!(route("grpc").credential.header, "baseten-authorization");
        let names: Vec<&str> = route("grpc")
            .set_headers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["x-team", "baseten-model-id"]);

        let refused = with_file(
            r#"
[[routes]]
name = "grpc"
prefix = "/"
model = "abc"
grpc = true
key_env = "BASETEN_API_KEY"
upstream_http = "1.1"
set_request_headers = ["x-ok: 1", "cookie: a=b"]
"#,
            &[],
        )
        .expect_err("refused");
        let settings: Vec<&str> = refused
            .problems
            .iter()
            .map(|p| p.setting.as_str())
            .collect();
        assert_eq!(
            settings,
            [
                r#"routes[0] "grpc".set_request_headers"#,
                r#"routes[0] "grpc".upstream_http"#
            ]
        );
    }
}

//! What a route points at: an upstream URL or a Baseten shortcut (model,
//! chain, Model APIs, with a stage; `grpc` and `regional` hosts), and the
//! HTTP version it speaks there.

use super::{set, RawRoute, Reported, Scope};
use crate::config::baseten::{self, Stage, Target};
use crate::config::check::Problems;
use crate::config::parse::parse_upstream;
use crate::config::{RawConfig, UpstreamHttp, UpstreamUrl};

/// What a route points at, before validation.
pub(super) struct TargetSpec<'a> {
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
    pub(super) fn top(raw: &'a RawConfig) -> Self {
        Self {
            upstream: raw.upstream.as_deref(),
            model: raw.model.as_deref(),
            chain: raw.chain.as_deref(),
            model_apis: raw.model_apis.on(),
            environment: raw.environment.as_deref(),
            deployment: raw.deployment.as_deref(),
            development: raw.development.on(),
            grpc: raw.grpc.on(),
            regional: raw.regional.on(),
            allow_cleartext: raw.allow_cleartext_upstream.on(),
        }
    }

    /// A `[[routes]]` entry's target settings.
    pub(super) fn of(route: &'a RawRoute, raw: &RawConfig) -> Self {
        Self {
            upstream: route.upstream.as_deref(),
            model: route.model.as_deref(),
            chain: route.chain.as_deref(),
            model_apis: route.model_apis.on(),
            environment: route.environment.as_deref(),
            deployment: route.deployment.as_deref(),
            development: route.development.on(),
            grpc: route.grpc.on(),
            regional: route.regional.on(),
            allow_cleartext: raw.allow_cleartext_upstream.on(),
        }
    }
}

impl<'a> TargetSpec<'a> {
    /// With `upstream` (a provider preset's) when the route names none.
    pub(super) fn or_upstream(mut self, upstream: Option<&'a str>) -> Self {
        if set(self.upstream).is_none() {
            self.upstream = upstream;
        }
        self
    }
}

/// What a route points at, resolved.
pub(super) struct Resolved {
    pub(super) upstream: UpstreamUrl,
    pub(super) stage: Option<Stage>,
    /// For `grpc`: the headers naming the model and its stage.
    pub(super) grpc_headers: Option<Vec<(&'static str, String)>>,
}

/// The HTTP version a route names: `upstream_http`, or the older switch
/// (`http2` on a route, `upstream_http2` at the top level) meaning "2";
/// `Ok(None)` when it names none.
pub(super) fn named_protocol(
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
pub(super) fn resolve_protocol(
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

/// The target settings a route chose, each set (not blank) or `None`.
struct Chosen<'a> {
    upstream: Option<&'a str>,
    model: Option<&'a str>,
    environment: Option<&'a str>,
    deployment: Option<&'a str>,
    /// The Baseten model or chain, if one is named.
    named: Option<Target>,
}

/// Checks that a route chose at most one target and one stage, with valid
/// names, and that `grpc` or `regional` can apply to them.
fn chosen<'a>(
    spec: &TargetSpec<'a>,
    scope: &Scope,
    found: &mut Problems,
) -> Result<Chosen<'a>, Reported> {
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
    Ok(Chosen {
        upstream,
        model,
        environment,
        deployment,
        named,
    })
}

/// Resolves what a route points at: `Ok(None)` when nothing was set.
pub(super) fn target(
    spec: &TargetSpec<'_>,
    scope: &Scope,
    found: &mut Problems,
) -> Result<Option<Resolved>, Reported> {
    let Chosen {
        upstream,
        model,
        environment,
        deployment,
        named,
    } = chosen(spec, scope, found)?;
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
        Ok(upstream)
            if is_cleartext_beyond_loopback(&upstream.scheme, upstream.authority.host())
                && !spec.allow_cleartext =>
        {
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

/// True for a plain `http://` URL whose host is not `localhost` or a
/// loopback address.
pub(super) fn is_cleartext_beyond_loopback(scheme: &http::uri::Scheme, host: &str) -> bool {
    if *scheme != http::uri::Scheme::HTTP {
        return false;
    }
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

//! The route table at run time: which route a request belongs to, and the
//! upstream URI it becomes.
//!
//! Matching is by path prefix on segment boundaries (`/llama` matches
//! `/llama` and `/llama/predict`, not `/llamas`), longest prefix first. The
//! upstream target is the route's base URL, plus the Baseten stage for
//! shortcuts, plus the client's path (its prefix stripped if configured) and
//! query, byte for byte.

use std::borrow::Cow;
use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};

use crate::config::baseten::{self, Stage};
use crate::config::{Credential, RequestRules, RetryPolicy, RouteConfig, UpstreamUrl};
use crate::guard::paths::PathPolicy;
use crate::proxy::error::ClientError;
use crate::proxy::retry::{RetryBudget, TargetHealth};
use crate::secrets::credential::LiveCredential;
use crate::telemetry::metrics::{Metrics, RouteMetrics};

/// One route, ready to serve.
pub struct Route {
    /// Its place in the table, which is its place in each serving thread's
    /// [`Upstreams`](crate::proxy::upstream::Upstreams).
    pub index: usize,
    /// Name in logs and metrics.
    pub name: String,
    prefix: String,
    strip_prefix: bool,
    /// Where requests go.
    pub upstream: UpstreamUrl,
    /// The `Host` header requests carry upstream over HTTP/1.1, built once
    /// here rather than formatted by hyper's client on every request (HTTP/2
    /// requests send `:authority` instead).
    pub host: Option<HeaderValue>,
    /// `scheme://authority/` of the upstream: the HTTP/1.1 pool's key for
    /// its connections, built once here rather than from each request's URI.
    pub origin: http::Uri,
    stage: Option<Stage>,
    /// Header, scrub list, template and key source.
    pub credential: Credential,
    /// The credential value in use (swapped when the key file changes or
    /// key_command fetches a new one), with its expiry.
    pub live: Arc<LiveCredential>,
    /// Allowed methods and paths.
    pub paths: PathPolicy,
    /// Static headers set on every upstream request.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// This route's metric handles.
    pub metrics: RouteMetrics,
    /// Ask streams for usage the client did not (`add_stream_usage`).
    pub add_stream_usage: bool,
    /// Budget reservations and request caps.
    pub rules: RequestRules,
    /// Which upstream answers are tried again.
    pub retry: RetryPolicy,
    /// The `fallback` routes, by index in the table, in order.
    pub(crate) fallback: Vec<usize>,
    /// Bounds this route's retries (shared by every serving thread).
    pub(crate) retry_budget: RetryBudget,
    /// This route's standing as a retry target.
    pub(crate) health: TargetHealth,
}

/// All routes, longest prefix first.
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds the table from validated route configs (already longest-first).
    pub fn new(configs: &[RouteConfig], metrics: &Arc<Metrics>) -> Self {
        let routes = configs
            .iter()
            .enumerate()
            .map(|(index, config)| Route {
                index,
                name: config.name.clone(),
                prefix: config.prefix.clone(),
                strip_prefix: config.strip_prefix,
                upstream: config.upstream.clone(),
                host: host_header(&config.upstream),
                origin: config.upstream.origin(),
                stage: config.stage.clone(),
                credential: config.credential.clone(),
                live: Arc::new(LiveCredential::with_expiry(
                    config.credential.value.clone(),
                    config.credential.lifetime.map(|lifetime| lifetime.expires),
                )),
                paths: config.paths.clone(),
                set_headers: config.set_headers.clone(),
                metrics: metrics.route(&config.name),
                add_stream_usage: config.add_stream_usage,
                rules: config.rules.clone(),
                retry: config.retry.clone(),
                // Names were checked against the table when the config was.
                fallback: (config.retry.fallback.iter())
                    .filter_map(|name| configs.iter().position(|other| other.name == *name))
                    .collect(),
                retry_budget: RetryBudget::new(config.retry.budget_percent),
                health: TargetHealth::default(),
            })
            .collect();
        Self { routes }
    }

    /// The route serving `path`, if any.
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.matches(path))
    }

    /// The route at `index` (its [`Route::index`]).
    pub(crate) fn at(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The configured prefixes, for the 404 answer.
    pub fn prefixes(&self) -> Vec<String> {
        self.routes.iter().map(|r| r.prefix.clone()).collect()
    }
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        self.prefix == "/"
            || path
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The upstream URI for a client's request target.
    pub fn upstream_uri(&self, target: &Uri) -> Result<Uri, ClientError> {
        self.upstream_uri_for(self, target)
    }

    /// The upstream URI, on this route's upstream, of a request that
    /// arrived on `matched` (this route itself, or one it is a `fallback`
    /// of): `matched`'s prefix rule makes the path, this route's stage and
    /// base path map it, as a request arriving here would be mapped.
    pub fn upstream_uri_for(&self, matched: &Route, target: &Uri) -> Result<Uri, ClientError> {
        let local = match target.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.as_str(),
            Some(_) => return Err(ClientError::BadRequestTarget),
            None => "/",
        };
        let rest = matched.local_rest(local);
        let mapped = match &self.stage {
            Some(stage) => Cow::Owned(
                baseten::map_path(stage, &rest)
                    .map_err(|_| ClientError::StagedPathOnRegionalHost)?,
            ),
            None => rest,
        };
        let path_and_query = if self.upstream.base_path.is_empty() {
            match (mapped, target.path_and_query()) {
                // The common case reuses the client's bytes without copying.
                (Cow::Borrowed(text), Some(pq)) if text.len() == pq.as_str().len() => pq.clone(),
                (mapped, _) => PathAndQuery::try_from(mapped.as_ref())
                    .map_err(|_| ClientError::BadRequestTarget)?,
            }
        } else {
            PathAndQuery::try_from(format!("{}{}", self.upstream.base_path, mapped))
                .map_err(|_| ClientError::BadRequestTarget)?
        };
        Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ClientError::BadRequestTarget)
    }

    /// The local path of a request to this route that this route forwards
    /// as it forwards `path` arriving on `matched` ([`upstream_uri_for`]):
    /// what this route's path policy judges when it is a fallback.
    ///
    /// [`upstream_uri_for`]: Self::upstream_uri_for
    pub(crate) fn local_path_for<'a>(&self, matched: &Route, path: &'a str) -> Cow<'a, str> {
        let rest = matched.local_rest(path);
        if !self.strip_prefix || self.prefix == "/" {
            return rest;
        }
        Cow::Owned(format!("{}{rest}", self.prefix))
    }

    /// A local path and query as this route forwards it: its prefix
    /// stripped if the route says so.
    fn local_rest<'a>(&self, local: &'a str) -> Cow<'a, str> {
        if !self.strip_prefix || self.prefix == "/" {
            return Cow::Borrowed(local);
        }
        let rest = &local[self.prefix.len().min(local.len())..];
        if rest.starts_with('/') {
            Cow::Borrowed(rest)
        } else {
            Cow::Owned(format!("/{rest}"))
        }
    }
}

/// `host[:port]` of the upstream, leaving out the scheme's default port (as
/// hyper's client does when it fills `Host` in itself, which it still does
/// if this is `None`).
fn host_header(upstream: &UpstreamUrl) -> Option<HeaderValue> {
    let authority = &upstream.authority;
    let default_port = if upstream.scheme == Scheme::HTTPS {
        443
    } else {
        80
    };
    match authority.port_u16() {
        Some(port) if port != default_port => {
            HeaderValue::try_from(format!("{}:{port}", authority.host())).ok()
        }
        _ => HeaderValue::try_from(authority.host()).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> UpstreamUrl {
        let uri: Uri = url.parse().expect("url");
        UpstreamUrl {
            scheme: uri.scheme().expect("scheme").clone(),
            authority: uri.authority().expect("authority").clone(),
            base_path: String::new(),
        }
    }

    #[test]
    fn host_header_leaves_out_only_the_default_port() {
        let host = |url| host_header(&upstream(url)).expect("host");
        assert_eq!(
            host("https://model-abc.api.baseten.co"),
            "model-abc.api.baseten.co"
        );
        assert_eq!(host("https://example.test:443"), "example.test");
        assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host("https://[::1]:8443"), "[::1]:8443");
    }
}

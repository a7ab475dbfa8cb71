//! The method rules: the methods a request makes the upstream act on (its
//! own, and any a method-override header names), each held to the route's
//! path policy, and `TRACE`/`TRACK` forwarded only where the policy names
//! them.

use http::{HeaderMap, HeaderName, Method};

use crate::guard::paths::PathVerdict;
use crate::proxy::error::{ClientError, ProxyError, Refusal};
use crate::proxy::route_table::Route;

/// Checks every method the upstream may act on against the route's path
/// policy: the request's, and any a method-override header names (Google's
/// front ends, Express's method-override and Symfony obey them on a POST).
/// Each must pass.
pub(super) fn check(route: &Route, parts: &http::request::Parts) -> Result<(), ProxyError> {
    check_path(route, &parts.method, &parts.headers, parts.uri.path())
}

/// [`check`] for a `method` request with `headers` as if it had asked for
/// `path` (a fallback route's view of a request that arrived on another
/// route).
pub(super) fn check_path(
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
) -> Result<(), ProxyError> {
    for method in std::iter::once(method.clone()).chain(overridden(headers)) {
        if let Some(echoing) = echoing_method(&method) {
            if !route.paths.names(&method, path) {
                return Err(Refusal::MethodNotAllowed(echoing).into());
            }
        }
        match route.paths.check(&method, path) {
            PathVerdict::Allowed => {}
            PathVerdict::NotAllowed => return Err(Refusal::PathNotAllowed.into()),
            PathVerdict::Ambiguous(why) => return Err(ClientError::AmbiguousPath(why).into()),
        }
    }
    Ok(())
}

/// Headers with which a client asks a server to act as if its request
/// used another method.
/// Named once as `HeaderName`s: a `&str` name is parsed again on every lookup.
static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// The methods a request's method-override headers name, as the servers
/// that obey them read them (in upper case; every value, every header).
fn overridden(headers: &HeaderMap) -> impl Iterator<Item = Method> + '_ {
    METHOD_OVERRIDES
        .iter()
        .flat_map(|name| headers.get_all(name))
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .filter_map(|method| Method::from_bytes(&method.trim_ascii().to_ascii_uppercase()).ok())
}

/// `TRACE` or `TRACK` (in any case: methods are case-sensitive, but some
/// servers are not), which make a server echo the request it received, the
/// injected credential included.
fn echoing_method(method: &Method) -> Option<&'static str> {
    ["TRACE", "TRACK"]
        .into_iter()
        .find(|echoing| method.as_str().eq_ignore_ascii_case(echoing))
}

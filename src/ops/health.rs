//! `keyrelay health`: exits 0 when the admin `/healthz` answers 200.
//!
//! For container `HEALTHCHECK` and Kubernetes exec probes: a scratch image
//! has no curl, so the binary checks itself.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How long the check waits before calling keyrelay unhealthy.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks `url`; `Ok` when it answered 200, else a reason.
pub async fn check(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = Request::get(uri)
        .body(Empty::new())
        .map_err(|err| err.to_string())?;
    let response = tokio::time::timeout(CHECK_TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("{url} did not answer within {CHECK_TIMEOUT:?}"))?
        .map_err(|err| format!("{url}: {err}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", response.status()))
    }
}

//! The demo's browser page: one small HTML file with plain JavaScript,
//! embedded in the binary and served from its own local origin.
//!
//! The page is a frontend with no key. It streams a prediction with `fetch`
//! and `getReader()`, and an OpenAI-style chat by parsing SSE from `fetch`,
//! straight from keyrelay, which the demo configures to allow the page's
//! origin. Being on a different port from keyrelay, the page is
//! cross-origin, as a dev server's page is: its requests are preflighted
//! and must pass keyrelay's origin check.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The page, with `__DEMO_CONFIG__` where its settings go.
const PAGE: &str = include_str!("page.html");

/// What the page needs to know, put into it as a JSON object.
pub struct PageConfig {
    /// keyrelay's base URL, e.g. `http://127.0.0.1:8080`.
    pub relay: String,
    /// The prompt it sends.
    pub prompt: &'static str,
}

/// The page with its settings filled in.
pub fn render(config: &PageConfig) -> String {
    let settings = serde_json::json!({ "relay": config.relay, "prompt": config.prompt });
    // JSON is a JavaScript expression; `<` is escaped so that no value can
    // close the script element.
    let settings = settings.to_string().replace('<', "\\u003c");
    PAGE.replace("__DEMO_CONFIG__", &settings)
}

/// Serves the page at `/` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: PageConfig) -> std::io::Result<()> {
    let page = Bytes::from(render(&config));
    // The page may talk to keyrelay and nothing else.
    let policy = HeaderValue::from_str(&format!(
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
         connect-src {}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        config.relay
    ))
    .map_err(std::io::Error::other)?;
    let page = Arc::new((page, policy));
    loop {
        // Running out of descriptors is passing; the page stays up.
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "demo page: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let page = Arc::clone(&page);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (html, policy) = &*page;
                std::future::ready(Ok::<_, Infallible>(answer(&request, html, policy)))
            });
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "demo page connection ended");
            }
        });
    }
}

/// Binds a free port on 127.0.0.1 for the page; returns the listener and its address.
pub async fn bind() -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

fn answer(
    request: &Request<Incoming>,
    html: &Bytes,
    policy: &HeaderValue,
) -> Response<Full<Bytes>> {
    let is_page = matches!(*request.method(), Method::GET | Method::HEAD)
        && matches!(request.uri().path(), "/" | "/index.html");
    if !is_page {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"the demo serves its page at /\n",
        )));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let mut response = Response::new(Full::new(html.clone()));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(CONTENT_SECURITY_POLICY, policy.clone());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_gets_its_settings_and_nothing_can_close_its_script() {
        let page = render(&PageConfig {
            relay: "http://127.0.0.1:8080".to_owned(),
            prompt: "</script><script>alert(1)</script>",
        });
        assert!(!page.contains("__DEMO_CONFIG__"));
        assert!(page.contains(r#""relay":"http://127.0.0.1:8080""#));
        assert_eq!(page.matches("</script>").count(), 1, "only the page's own");
    }
}

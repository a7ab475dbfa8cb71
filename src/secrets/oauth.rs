//! OAuth2 client credentials (RFC 6749 §4.4): a token endpoint that trades
//! a client id and secret for an access token with an expiry.
//!
//! The request goes over keyrelay's own HTTPS stack ([`Endpoint`], which
//! Google's token sources use too), the whole exchange bounded by the
//! route's `key_command_timeout`.
//!
//! The client secret goes in `Authorization: Basic` (`client_secret_basic`,
//! §2.3.1, the default) or in the form body (`client_secret_post`). Neither
//! it nor a token ever reaches a message: errors name the endpoint's HTTP
//! status and its OAuth2 `error` code (with `error_description`, the secret
//! masked out of it), never what came back otherwise.
//!
//! Like [`crate::secrets::key_command::KeyCommand::run`], [`OAuthClient::run`]
//! is synchronous (it runs the request on a thread of its own), so the same
//! code serves the first fetch while the configuration is checked and the
//! refreshes on the blocking pool ([`crate::secrets::refresh`]).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

use crate::secrets::key::ApiKey;
use crate::secrets::key_command::{seconds_of, Fetched, Lifetime, SHORT_LIVED};
use crate::telemetry::logging;

/// The most a token endpoint's answer may hold: a JWT access token with
/// its JSON around it stays far below this.
const MAX_ANSWER: usize = 64 * 1024;

/// The most of an `error_description` quoted in a message.
const MAX_DESCRIPTION: usize = 300;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_secret_basic`: `Authorization: Basic` with the form-encoded
    /// id and secret.
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the body.
    Post,
}

impl AuthMethod {
    /// `basic` or `post`, as `oauth_auth_method` is written.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "basic" | "client_secret_basic" => Some(Self::Basic),
            "post" | "client_secret_post" => Some(Self::Post),
            _ => None,
        }
    }
}

/// A token endpoint and the client's credentials for it.
#[derive(Clone)]
pub struct OAuthClient {
    /// `oauth_token_url`.
    pub token_url: Uri,
    /// `oauth_client_id`.
    pub client_id: String,
    /// The client secret (masked in every `Debug`).
    pub secret: ApiKey,
    /// `oauth_scope`, sent when set.
    pub scope: Option<String>,
    /// `oauth_audience`, sent when set (Auth0 and gateways like it).
    pub audience: Option<String>,
    /// `oauth_auth_method`.
    pub method: AuthMethod,
    /// The lifetime of a token whose answer states no `expires_in`.
    pub ttl: Duration,
    /// The longest a token request may take, connecting included.
    pub timeout: Duration,
    /// `ca_file`'s certificates, trusted besides the web roots.
    pub extra_ca_certs: Arc<Vec<CertificateDer<'static>>>,
}

/// The endpoint, the client id and the method; the secret never.
impl fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthClient")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl OAuthClient {
    /// Asks the token endpoint for a token, waiting for its answer. The
    /// error says what went wrong, never the secret or a token.
    pub fn run(&self) -> Result<Fetched, String> {
        let client = self.clone();
        on_own_thread(async move {
            let request = client.request()?;
            let endpoint = Endpoint {
                url: &client.token_url,
                extra_ca_certs: &client.extra_ca_certs,
                timeout: client.timeout,
                ttl: client.ttl,
                required_header: None,
            };
            endpoint.token(request, &[&client.secret]).await
        })
    }

    /// The token request, the client's credentials in it.
    fn request(&self) -> Result<Request<Full<Bytes>>, String> {
        let url = &self.token_url;
        let mut form = Zeroizing::new(String::new());
        form_pair(&mut form, "grant_type", "client_credentials");
        for (name, value) in [("scope", &self.scope), ("audience", &self.audience)] {
            if let Some(value) = value {
                form_pair(&mut form, name, value);
            }
        }
        let mut request = Request::post(url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        match self.method {
            AuthMethod::Basic => {
                let pair = Zeroizing::new(format!(
                    "{}:{}",
                    form_encode(&self.client_id).as_str(),
                    form_encode(self.secret.expose()).as_str()
                ));
                let encoded =
                    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
                let mut value = HeaderValue::from_str(&format!("Basic {}", &*encoded))
                    .map_err(|_| "the client id or secret cannot be sent in a header".to_owned())?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            AuthMethod::Post => {
                form_pair(&mut form, "client_id", &self.client_id);
                form_pair(&mut form, "client_secret", self.secret.expose());
            }
        }
        request
            .body(Full::new(Bytes::copy_from_slice(form.as_bytes())))
            .map_err(|err| format!("cannot build the request to {url}: {err}"))
    }
}

/// Runs a token request on a thread and runtime of its own and waits for
/// it: the same code serves the first fetch, while the configuration is
/// checked, and the refreshes on the blocking pool.
pub(crate) fn on_own_thread<F>(fetch: F) -> Result<Fetched, String>
where
    F: std::future::Future<Output = Result<Fetched, String>> + Send + 'static,
{
    let fetching = std::thread::Builder::new()
        .name("keyrelay-token".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| format!("cannot start the token request's runtime: {err}"))?;
            runtime.block_on(fetch)
        })
        .map_err(|err| format!("cannot start the token request's thread: {err}"))?;
    fetching
        .join()
        .unwrap_or_else(|_| Err("the token request panicked".to_owned()))
}

/// A token endpoint as every token source reaches it (OAuth2 client
/// credentials, Google's JWT-bearer grant and metadata server): one
/// request over keyrelay's own HTTPS stack (hyper-util's client, the
/// rustls settings upstreams get: web roots plus `ca_file`), HTTP/1.1, a
/// fresh connection each time (a token lives minutes to hours), the whole
/// exchange bounded by `timeout`; an answer `{access_token, expires_in}`.
pub(crate) struct Endpoint<'a> {
    /// Where the request goes, for messages.
    pub(crate) url: &'a Uri,
    /// `ca_file`'s certificates, trusted besides the web roots.
    pub(crate) extra_ca_certs: &'a [CertificateDer<'static>],
    /// The longest the exchange may take, connecting included.
    pub(crate) timeout: Duration,
    /// The lifetime of a token answered without `expires_in`.
    pub(crate) ttl: Duration,
    /// A header the answer must carry with this value, or it is not from
    /// the server meant (the metadata server's `Metadata-Flavor: Google`,
    /// which google-auth checks too: anything else answering at that
    /// address, a captive portal, a proxy, is not trusted with a token).
    pub(crate) required_header: Option<(&'static str, &'static str)>,
}

impl Endpoint<'_> {
    /// Sends `request` and reads the token it answers, with its lifetime.
    /// The errors name the endpoint's status and OAuth2 error code, never
    /// a token; `masked` (what the request carried) is masked out of an
    /// `error_description`.
    pub(crate) async fn token(
        &self,
        request: Request<Full<Bytes>>,
        masked: &[&ApiKey],
    ) -> Result<Fetched, String> {
        let url = self.url;
        let started = Instant::now();
        let (status, body) = tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| {
                format!(
                    "{url} did not answer within key_command_timeout ({:?})",
                    self.timeout
                )
            })??;
        let answer = read_answer(url, status, &body, masked)?;
        let lifetime = started
            .checked_add(answer.expires_in.unwrap_or(self.ttl))
            .and_then(|expires| Lifetime::until(started, expires))
            .ok_or_else(|| format!("{url} issued a token that {SHORT_LIVED}"))?;
        Ok(Fetched {
            key: answer.token,
            lifetime,
            stderr: String::new(),
        })
    }

    /// Sends the token request; the endpoint's status and body.
    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let url = self.url;
        let tls = crate::config::tls::client_config(self.extra_ca_certs)
            .map_err(|err| format!("cannot set up TLS for {url}: {err}"))?;
        let mut tcp = HttpConnector::new();
        // The connector must accept https:// URIs; hyper-rustls does the TLS part.
        tcp.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build::<_, Full<Bytes>>(https);
        let response = client
            .request(request)
            .await
            .map_err(|err| format!("cannot reach {url}: {}", logging::causes(&err)))?;
        let status = response.status();
        if let Some((name, value)) = self.required_header {
            if response.headers().get(name).map(HeaderValue::as_bytes) != Some(value.as_bytes()) {
                return Err(format!(
                    "{url} answered {status} without \"{name}: {value}\"; it is not the server \
                     expected there"
                ));
            }
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|err| format!("reading the answer of {url} failed: {err}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// The token and its lifetime from a 2xx answer; otherwise the
/// endpoint's OAuth2 error, described.
fn read_answer(
    url: &Uri,
    status: StatusCode,
    body: &[u8],
    masked: &[&ApiKey],
) -> Result<Answer, String> {
    // serde_json's errors name a position only, never the text.
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if !status.is_success() {
        return Err(format!(
            "{url} answered {status}{}",
            error_part(json.as_ref(), masked)
        ));
    }
    let Some(mut json) = json.filter(serde_json::Value::is_object) else {
        return Err(format!(
            "{url} answered {status} with a body that is not a JSON object"
        ));
    };
    if let Some(kind) = json.get("token_type").and_then(|t| t.as_str()) {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "{url} issued a token of type {:?}; keyrelay sends Bearer tokens only",
                kind.chars().take(40).collect::<String>()
            ));
        }
    }
    let expires_in = match json.get("expires_in").filter(|v| !v.is_null()) {
        None => None,
        Some(seconds) => Some(seconds_of(seconds).ok_or_else(|| {
            format!("{url} answered an expires_in that is not a number of seconds")
        })?),
    };
    let serde_json::Value::String(token) = json
        .get_mut("access_token")
        .map(serde_json::Value::take)
        .unwrap_or_default()
    else {
        return Err(format!(
            "{url} answered {status} without an access_token string"
        ));
    };
    let token = ApiKey::new(token);
    if token.is_blank() {
        return Err(format!("{url} answered an empty access_token"));
    }
    Ok(Answer { token, expires_in })
}

/// `: invalid_client (description)` from an OAuth2 error answer
/// (RFC 6749 §5.2), the secret masked out; nothing else of the body.
fn error_part(json: Option<&serde_json::Value>, masked: &[&ApiKey]) -> String {
    let field = |name: &str| {
        json.and_then(|json| json.get(name))
            .and_then(serde_json::Value::as_str)
            .map(|text| {
                let text: String = text
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_DESCRIPTION)
                    .collect();
                masked
                    .iter()
                    .fold(text, |text, secret| secret.mask_in(&text))
            })
    };
    match (field("error"), field("error_description")) {
        (Some(code), Some(description)) => format!(": {code} ({description})"),
        (Some(code), None) => format!(": {code}"),
        _ => " without an OAuth2 error code".to_owned(),
    }
}

/// A token endpoint's successful answer, read.
struct Answer {
    token: ApiKey,
    expires_in: Option<Duration>,
}

/// Appends `name=value` to an `application/x-www-form-urlencoded` body.
pub(crate) fn form_pair(form: &mut String, name: &str, value: &str) {
    if !form.is_empty() {
        form.push('&');
    }
    form.push_str(&form_encode(name));
    form.push('=');
    form.push_str(&form_encode(value));
}

/// `text` form-encoded (WHATWG's `application/x-www-form-urlencoded`
/// serializer, which RFC 6749 §2.3.1 asks for in Basic credentials too).
pub(crate) fn form_encode(text: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(text.len() * 3));
    for byte in text.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-client-value";

    fn client() -> OAuthClient {
        OAuthClient {
            token_url: Uri::from_static("https://idp.example/token"),
            client_id: "app".to_owned(),
            secret: ApiKey::new(SECRET.to_owned()),
            scope: None,
            audience: None,
            method: AuthMethod::Basic,
            ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            extra_ca_certs: Arc::default(),
        }
    }

    #[test]
    fn form_encoding_follows_the_form_serializer() {
        assert_eq!(&*form_encode("a b+c/d:é~"), "a+b%2Bc%2Fd%3A%C3%A9%7E");
        let mut form = String::new();
        form_pair(&mut form, "grant_type", "client_credentials");
        form_pair(&mut form, "scope", "https://x/.default");
        assert_eq!(
            form,
            "grant_type=client_credentials&scope=https%3A%2F%2Fx%2F.default"
        );
    }

    #[test]
    fn answers_are_read_and_errors_never_quote_secrets() {
        let client = client();
        let read =
            |status, body: &[u8]| read_answer(&client.token_url, status, body, &[&client.secret]);
        let ok = read(
            StatusCode::OK,
            br#"{"access_token": "tok", "token_type": "Bearer", "expires_in": "3599"}"#,
        )
        .expect("reads");
        assert_eq!(ok.expires_in, Some(Duration::from_secs(3599)));
        let bad = [
            (
                StatusCode::OK,
                r#"{"access_token": "tok", "token_type": "mac"}"#.to_owned(),
                "type",
            ),
            (
                StatusCode::OK,
                r#"{"token": "tok"}"#.to_owned(),
                "without an access_token",
            ),
            (StatusCode::OK, "tok".to_owned(), "not a JSON object"),
            (
                StatusCode::UNAUTHORIZED,
                format!(r#"{{"error": "invalid_client", "error_description": "bad {SECRET}"}}"#),
                "401 Unauthorized: invalid_client (bad ***)",
            ),
            (
                StatusCode::BAD_GATEWAY,
                format!("<html>{SECRET}</html>"),
                "without an OAuth2 error code",
            ),
        ];
        for (status, body, expected) in bad {
            let err = read(status, body.as_bytes()).err().expect(&body);
            assert!(err.contains(expected), "{body}: {err}");
            assert!(!err.contains(SECRET) && !err.contains("tok\""), "{err}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let shown = format!("{:?}", client());
        assert!(
            shown.contains("idp.example") && !shown.contains(SECRET),
            "{shown}"
        );
    }
}

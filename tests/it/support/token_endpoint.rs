//! A token endpoint for the OAuth2 and Google tests, on a thread and
//! runtime of its own: keyrelay's first token request happens while its
//! configuration loads, which blocks the test's runtime.
//!
//! It checks each request as the real server would, by its [`Grant`]:
//! - client credentials (RFC 6749 §4.4): POST, a form body,
//!   `grant_type=client_credentials`, the scope, the client id and secret
//!   by the one authentication method it is set to accept;
//! - Google's JWT-bearer grant (RFC 7523): the assertion's RS256 signature
//!   verified with the service account's public key (ring's
//!   `UnparsedPublicKey`), then its header and claims (`iss`, `aud`,
//!   `scope`, `iat`, `exp`);
//! - Google's metadata server: a GET of the default account's token with
//!   `Metadata-Flavor: Google` and the scopes asked for.
//!
//! It answers a token `PREFIX<n>-<expiry in ms>` that lives `lifetime`,
//! which [`super::expiring::CheckingUpstream`] reads back. Anything wrong
//! gets a 4xx (`invalid_client`, `invalid_grant`, or the metadata
//! server's 403), and is recorded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::expiring::now_ms;

/// The client id keyrelay is configured with.
pub(crate) const CLIENT_ID: &str = "keyrelay-test client";
/// The client secret; distinctive, so a leak scan finds it.
pub(crate) const CLIENT_SECRET: &str = "oauth-client-SECRET-9d8e7f+/=";
/// What every issued token starts with.
pub(crate) const TOKEN_PREFIX: &str = "oa-token-";
/// The scope keyrelay asks for.
pub(crate) const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// How the endpoint wants the client to authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    /// `client_secret_basic`.
    Basic,
    /// `client_secret_post`.
    Post,
}

/// What the endpoint checks.
#[derive(Clone)]
pub(crate) enum Grant {
    /// Client credentials, authenticated by this method.
    Client(Method),
    /// The JWT-bearer grant of a Google service account.
    JwtBearer(ServiceAccount),
    /// Google's metadata server.
    Metadata,
}

/// The service account the JWT-bearer endpoint knows.
#[derive(Clone)]
pub(crate) struct ServiceAccount {
    /// Its `client_email`, the assertion's `iss`.
    pub(crate) client_email: String,
    /// Its key's id, the assertion's `kid`.
    pub(crate) key_id: String,
    /// Its public key, PKCS#1 `RSAPublicKey` DER.
    pub(crate) public_key: Vec<u8>,
}

/// The JWT-bearer grant's `grant_type`.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The scope keyrelay asks Google for by default.
pub(crate) const GOOGLE_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Where the metadata server serves the default account's token.
const METADATA_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

#[derive(Default)]
struct State {
    issued: u64,
    refused: Vec<String>,
    down: bool,
    /// The public key the JWT-bearer endpoint verifies with instead of the
    /// account's (the account's key deleted, a rotation gone wrong).
    other_key: Option<Vec<u8>>,
    /// The metadata server's answers lack `Metadata-Flavor: Google`
    /// (something else answering at its address).
    not_google: bool,
}

/// The running endpoint; stopped when dropped.
pub(crate) struct TokenEndpoint {
    url: String,
    state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

impl TokenEndpoint {
    /// Accepts `method` only and issues tokens living `lifetime` seconds.
    pub(crate) fn start(method: Method, lifetime: f64) -> Self {
        Self::with_grant(Grant::Client(method), lifetime)
    }

    /// Checks requests by `grant` and issues tokens living `lifetime` seconds.
    pub(crate) fn with_grant(grant: Grant, lifetime: f64) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let path = match grant {
            Grant::Client(_) => "/oauth2/v2.0/token",
            Grant::JwtBearer(_) => "/token",
            Grant::Metadata => METADATA_PATH,
        };
        let url = format!("http://{}{path}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        let url_for_check = url.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let serving = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let state = Arc::clone(&shared);
                        let grant = grant.clone();
                        let url = url_for_check.clone();
                        tokio::spawn(async move {
                            let service = service_fn(move |request| {
                                let state = Arc::clone(&state);
                                let grant = grant.clone();
                                let url = url.clone();
                                async move {
                                    Ok::<_, Infallible>(
                                        answer(request, &grant, &url, lifetime, &state).await,
                                    )
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serving => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            url,
            state,
            _stop: stop,
        }
    }

    /// The token URL.
    pub(crate) fn url(&self) -> String {
        self.url.clone()
    }

    /// How many tokens it has issued.
    pub(crate) fn issued(&self) -> u64 {
        self.state.lock().expect("lock").issued
    }

    /// Why it refused the requests it refused.
    pub(crate) fn refused(&self) -> Vec<String> {
        self.state.lock().expect("lock").refused.clone()
    }

    /// The `host:port` it listens on (`GCE_METADATA_HOST`).
    pub(crate) fn host(&self) -> String {
        let rest = self.url.strip_prefix("http://").expect("http URL");
        rest.split_once('/').expect("a path").0.to_owned()
    }

    /// While down, every request gets 503 `temporarily_unavailable`.
    pub(crate) fn set_down(&self, down: bool) {
        self.state.lock().expect("lock").down = down;
    }

    /// The metadata server answers without `Metadata-Flavor: Google`
    /// (a captive portal or proxy answering at its address), tokens and all.
    pub(crate) fn set_not_google(&self, not_google: bool) {
        self.state.lock().expect("lock").not_google = not_google;
    }

    /// Verifies assertions with `public_key` (PKCS#1 DER) rather than the
    /// account's own; `None`: the account's again.
    pub(crate) fn verify_with(&self, public_key: Option<Vec<u8>>) {
        self.state.lock().expect("lock").other_key = public_key;
    }
}

async fn answer(
    request: Request<Incoming>,
    grant: &Grant,
    url: &str,
    lifetime: f64,
    state: &Mutex<State>,
) -> Response<Full<Bytes>> {
    let (head, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if state.lock().expect("lock").down {
        return json(503, r#"{"error": "temporarily_unavailable"}"#.to_owned());
    }
    let checked = match grant {
        Grant::Client(method) => {
            check(&head, &body, *method).map_err(|p| (401, "invalid_client", p))
        }
        Grant::JwtBearer(account) => {
            let key = state.lock().expect("lock").other_key.clone();
            let key = key.as_deref().unwrap_or(&account.public_key);
            check_assertion(&head, &body, account, key, url).map_err(|p| (400, "invalid_grant", p))
        }
        Grant::Metadata => check_metadata(&head).map_err(|p| (403, "forbidden", p)),
    };
    match checked {
        Err((status, code, problem)) => {
            state.lock().expect("lock").refused.push(problem.clone());
            json(
                status,
                format!(r#"{{"error": "{code}", "error_description": "{problem}"}}"#),
            )
        }
        Ok(()) => {
            let n = {
                let mut state = state.lock().expect("lock");
                state.issued += 1;
                state.issued
            };
            let expiry = now_ms() + (lifetime * 1000.0) as u128;
            let mut answer = json(
                200,
                format!(
                    r#"{{"access_token": "{TOKEN_PREFIX}{n}-{expiry}", "token_type": "Bearer", "expires_in": {lifetime}}}"#
                ),
            );
            // The real metadata server says what it is on every answer.
            if matches!(grant, Grant::Metadata) && !state.lock().expect("lock").not_google {
                answer
                    .headers_mut()
                    .insert("metadata-flavor", http::HeaderValue::from_static("Google"));
            }
            answer
        }
    }
}

/// What an authorization server checks of a client-credentials request.
fn check(head: &http::request::Parts, body: &[u8], method: Method) -> Result<(), String> {
    if head.method != http::Method::POST {
        return Err(format!("method {}", head.method));
    }
    let content_type = head.headers.get("content-type").map(|v| v.as_bytes());
    if content_type != Some(b"application/x-www-form-urlencoded") {
        return Err("not a form body".to_owned());
    }
    let form = parse_form(std::str::from_utf8(body).map_err(|_| "body not UTF-8")?);
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err("grant_type".to_owned());
    }
    if form.get("scope").map(String::as_str) != Some(SCOPE) {
        return Err("scope".to_owned());
    }
    let basic = head.headers.get("authorization").map(|value| {
        let text = value.to_str().unwrap_or_default();
        let encoded = text.strip_prefix("Basic ").unwrap_or_default();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_default();
        let decoded = String::from_utf8(decoded).unwrap_or_default();
        let (id, secret) = decoded.split_once(':').unwrap_or_default();
        (decode(id), decode(secret))
    });
    let posted = (
        form.get("client_id").cloned(),
        form.get("client_secret").cloned(),
    );
    let expected = (CLIENT_ID.to_owned(), CLIENT_SECRET.to_owned());
    let fine = match method {
        Method::Basic => basic == Some(expected) && posted == (None, None),
        Method::Post => basic.is_none() && posted == (Some(expected.0), Some(expected.1)),
    };
    if fine {
        Ok(())
    } else {
        Err(format!("client authentication is not client_secret_{method:?}").to_lowercase())
    }
}

/// What Google's token endpoint checks of a JWT-bearer request: the
/// grant type, then the assertion's RS256 signature against `public_key`,
/// then its header and claims.
fn check_assertion(
    head: &http::request::Parts,
    body: &[u8],
    account: &ServiceAccount,
    public_key: &[u8],
    url: &str,
) -> Result<(), String> {
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
    if head.method != http::Method::POST {
        return Err(format!("method {}", head.method));
    }
    let form = parse_form(std::str::from_utf8(body).map_err(|_| "body not UTF-8")?);
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER) {
        return Err("grant_type".to_owned());
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("the assertion is not a JWS".to_owned());
    };
    let base64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signature = base64url
        .decode(signature)
        .map_err(|_| "signature encoding")?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| "Invalid JWT Signature.")?;
    let json = |part: &str| -> Result<serde_json::Value, String> {
        let bytes = base64url.decode(part).map_err(|_| "part encoding")?;
        serde_json::from_slice(&bytes).map_err(|err| format!("part JSON: {err}"))
    };
    let (header, claims) = (json(header)?, json(claims)?);
    let expected_header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": account.key_id});
    if header != expected_header {
        return Err(format!("header {header}"));
    }
    let now = (now_ms() / 1000) as i64;
    let iat = claims["iat"].as_i64().ok_or("iat")?;
    let exp = claims["exp"].as_i64().ok_or("exp")?;
    let expected = [
        (claims["iss"] == account.client_email.as_str(), "iss"),
        (claims["aud"] == url, "aud"),
        (claims["scope"] == GOOGLE_SCOPE, "scope"),
        ((iat - now).abs() <= 60, "iat"),
        (exp == iat + 3600, "exp"),
    ];
    match expected.iter().find(|(fine, _)| !fine) {
        Some((_, claim)) => Err(format!("claim {claim} in {claims}")),
        None => Ok(()),
    }
}

/// What the metadata server checks: a GET of the default account's token
/// with `Metadata-Flavor: Google` (anything else is refused, as the real
/// one refuses), asking for the default scope.
fn check_metadata(head: &http::request::Parts) -> Result<(), String> {
    if head.headers.get("metadata-flavor").map(|v| v.as_bytes()) != Some(b"Google") {
        return Err("Missing Metadata-Flavor:Google header.".to_owned());
    }
    if head.method != http::Method::GET || head.uri.path() != METADATA_PATH {
        return Err(format!("{} {}", head.method, head.uri.path()));
    }
    let query = parse_form(head.uri.query().unwrap_or_default());
    if query.get("scopes").map(String::as_str) != Some(GOOGLE_SCOPE) {
        return Err(format!("scopes {:?}", head.uri.query()));
    }
    Ok(())
}

fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (decode(name), decode(value)))
        .collect()
}

/// Form decoding: `+` is a space, `%XX` a byte.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

/// An RSA key made at test time (2048 bits, by the test environment's
/// Python `cryptography`; ring signs and verifies but cannot generate RSA
/// keys), so no private key is checked in.
pub(crate) struct RsaKey {
    /// The private key as PKCS#8 PEM, as Google's key files hold it.
    pub(crate) pkcs8_pem: String,
    /// The same key as PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`), which a key
    /// file must not hold.
    pub(crate) pkcs1_pem: String,
    /// The public key, PKCS#1 `RSAPublicKey` DER (ring's verifying form).
    pub(crate) public_der: Vec<u8>,
}

const MAKE_RSA_KEY: &str = r#"
import base64, json
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
private = lambda form: key.private_bytes(s.Encoding.PEM, form, s.NoEncryption()).decode()
public = key.public_key().public_bytes(s.Encoding.DER, s.PublicFormat.PKCS1)
print(json.dumps({"pkcs8": private(s.PrivateFormat.PKCS8),
                  "pkcs1": private(s.PrivateFormat.TraditionalOpenSSL),
                  "public": base64.b64encode(public).decode()}))
"#;

impl RsaKey {
    pub(crate) fn generate() -> Self {
        let output = std::process::Command::new(super::python::interpreter())
            .args(["-c", MAKE_RSA_KEY])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run python");
        assert!(
            output.status.success(),
            "making an RSA key failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let made: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        let text = |field: &str| made[field].as_str().expect(field).to_owned();
        Self {
            pkcs8_pem: text("pkcs8"),
            pkcs1_pem: text("pkcs1"),
            public_der: base64::engine::general_purpose::STANDARD
                .decode(text("public"))
                .expect("base64"),
        }
    }

    /// The base64 lines of the private key, which must never be printed.
    pub(crate) fn private_lines(&self) -> Vec<String> {
        (self.pkcs8_pem.lines().chain(self.pkcs1_pem.lines()))
            .filter(|line| !line.starts_with("-----") && line.len() > 20)
            .map(str::to_owned)
            .collect()
    }
}

impl ServiceAccount {
    /// The account `client_email` with `key`.
    pub(crate) fn new(client_email: &str, key: &RsaKey) -> Self {
        Self {
            client_email: client_email.to_owned(),
            key_id: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            public_key: key.public_der.clone(),
        }
    }

    /// Its key file, as the Cloud console downloads it, with `private_key`
    /// and `token_uri` as given.
    pub(crate) fn key_file(&self, private_key: &str, token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "keyrelay-test",
            "private_key_id": self.key_id,
            "private_key": private_key,
            "client_email": self.client_email,
            "client_id": "112233445566778899000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        })
        .to_string()
    }
}

//! Google access tokens, the way Google's own libraries get them
//! (Application Default Credentials), for Vertex AI and other Google APIs:
//!
//! - **A service-account key file** (`"type": "service_account"`, its
//!   `client_email`, a PKCS#8 `private_key` and a `token_uri`): keyrelay
//!   signs a JWT (RS256: `iss` the account, `scope`, `aud` the
//!   `token_uri`, `iat`, `exp` an hour later) and trades it at `token_uri`
//!   for an access token (the JWT-bearer grant, RFC 7523 §2.1).
//! - **The metadata server** on Compute Engine, GKE (Workload Identity),
//!   Cloud Run and the rest: `GET /computeMetadata/v1/instance/
//!   service-accounts/default/token` with `Metadata-Flavor: Google`, at
//!   `metadata.google.internal` or wherever `GCE_METADATA_HOST` says, as
//!   google-auth reads it.
//!
//! Both answer `{access_token, expires_in}`; the request and the reading of
//! the answer are the OAuth2 client's ([`crate::secrets::oauth::Endpoint`]).
//!
//! The signing is ring's (`RsaKeyPair::from_pkcs8`, `RSA_PKCS1_SHA256`), the
//! crate rustls already brings; keyrelay only lays out the JWT around the
//! signature. Neither the private key nor an assertion nor a token ever
//! reaches a message or `Debug`: errors about the key file name the field
//! that is wrong, never its value.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Request, Uri};
use http_body_util::Full;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use crate::secrets::key::ApiKey;
use crate::secrets::key_command::Fetched;
use crate::secrets::oauth::{form_encode, form_pair, on_own_thread, Endpoint};

/// The scope asked for unless `google_scopes` says otherwise: every Google
/// Cloud API, Vertex AI's included (what google-auth's Vertex clients ask).
pub const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The metadata server's host unless `GCE_METADATA_HOST` names another.
pub const METADATA_HOST: &str = "metadata.google.internal";

/// The variable that points the metadata client elsewhere (`host:port`),
/// as google-auth and the Cloud client libraries read it.
pub const METADATA_HOST_ENV: &str = "GCE_METADATA_HOST";

/// The variable naming a key file, when no setting does.
pub const CREDENTIALS_ENV: &str = "GOOGLE_APPLICATION_CREDENTIALS";

/// The path of the default service account's token on the metadata server.
const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// The header the metadata server's requests and answers carry.
const METADATA_FLAVOR: (&str, &str) = ("metadata-flavor", "Google");

/// The JWT-bearer grant's `grant_type` (RFC 7523 §2.1).
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// An assertion's lifetime: Google accepts at most an hour.
const ASSERTION_LIFETIME: u64 = 3600;

/// What every Google source shares: the scopes, the timing, whom TLS trusts.
#[derive(Clone)]
pub struct Options {
    /// `google_scopes`.
    pub scopes: Vec<String>,
    /// The lifetime of a token answered without `expires_in`.
    pub ttl: Duration,
    /// The longest a token request may take (`key_command_timeout`).
    pub timeout: Duration,
    /// `ca_file`'s certificates, trusted besides the web roots.
    pub extra_ca_certs: Arc<Vec<CertificateDer<'static>>>,
}

/// Where a route's Google access tokens come from.
#[derive(Clone)]
pub struct GoogleCredentials {
    kind: Kind,
    options: Options,
}

#[derive(Clone)]
enum Kind {
    /// A service-account key file.
    ServiceAccount(Arc<ServiceAccount>),
    /// The metadata server; its token URL, scopes included.
    Metadata(Uri),
}

/// A service account's key, read from its file.
struct ServiceAccount {
    client_email: String,
    /// `token_uri` as written: the assertion's audience.
    audience: String,
    token_uri: Uri,
    /// `private_key_id`, sent as the JWT's `kid` as google-auth does.
    key_id: Option<String>,
    key: RsaKeyPair,
}

/// The account, the endpoint and the scopes; never the key.
impl fmt::Debug for GoogleCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = f.debug_struct("GoogleCredentials");
        match &self.kind {
            Kind::ServiceAccount(account) => shown
                .field("client_email", &account.client_email)
                .field("token_uri", &account.token_uri),
            Kind::Metadata(url) => shown.field("metadata", url),
        };
        shown
            .field("scopes", &self.options.scopes)
            .finish_non_exhaustive()
    }
}

impl GoogleCredentials {
    /// A service account from the text of its key file. The error names
    /// what is wrong (a field, the key's encoding), never a value from the
    /// file but its `type`.
    pub fn service_account(json: &str, options: Options) -> Result<Self, String> {
        // serde_json's syntax errors name a position only, never the text;
        // the fields are then read by hand, so no value is quoted.
        let mut file: serde_json::Value =
            serde_json::from_str(json).map_err(|err| format!("is not a JSON key file ({err})"))?;
        let text = |file: &serde_json::Value, field: &str| {
            file.get(field)
                .and_then(serde_json::Value::as_str)
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(str::to_owned)
        };
        match text(&file, "type").as_deref() {
            Some("service_account") => {}
            Some(
                other @ ("authorized_user" | "external_account" | "impersonated_service_account"),
            ) => {
                return Err(format!(
                    "is a {other:?} credentials file; keyrelay reads service-account key files \
                     (\"type\": \"service_account\"). For user or federated credentials use \
                     key_command = [\"gcloud\", \"auth\", \"print-access-token\"]"
                ))
            }
            _ => {
                return Err(
                    "has no \"type\": \"service_account\"; it is not a service-account key file"
                        .to_owned(),
                )
            }
        }
        let missing = ["client_email", "private_key", "token_uri"]
            .into_iter()
            .filter(|field| text(&file, field).is_none())
            .collect::<Vec<_>>();
        if !missing.is_empty() {
            return Err(format!(
                "lacks {}, which a service-account key file has",
                missing.join(", ")
            ));
        }
        let client_email = text(&file, "client_email").unwrap_or_default();
        let audience = text(&file, "token_uri").unwrap_or_default();
        let token_uri = audience
            .parse::<Uri>()
            .ok()
            .filter(|uri| {
                uri.host().is_some() && matches!(uri.scheme_str(), Some("https" | "http"))
            })
            .ok_or("has a token_uri that is not an https:// URL")?;
        let key_id = text(&file, "private_key_id");
        let pem = match file.get_mut("private_key").map(serde_json::Value::take) {
            Some(serde_json::Value::String(pem)) => Zeroizing::new(pem),
            _ => Zeroizing::new(String::new()),
        };
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            "has a private_key that is not a PEM PKCS#8 key (-----BEGIN PRIVATE KEY-----)"
                .to_owned()
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|err| format!("has a private_key that is not a usable RSA key ({err})"))?;
        Ok(Self {
            kind: Kind::ServiceAccount(Arc::new(ServiceAccount {
                client_email,
                audience,
                token_uri,
                key_id,
                key,
            })),
            options,
        })
    }

    /// The metadata server at `host` (`GCE_METADATA_HOST`, `host[:port]`),
    /// or at [`METADATA_HOST`].
    pub fn metadata(host: Option<&str>, options: Options) -> Result<Self, String> {
        let host = host.map(str::trim).filter(|h| !h.is_empty());
        let authority = host.unwrap_or(METADATA_HOST);
        let mut url = format!("http://{authority}{METADATA_TOKEN_PATH}");
        if !options.scopes.is_empty() {
            url.push_str("?scopes=");
            url.push_str(&form_encode(&options.scopes.join(",")));
        }
        let url = (url.parse::<Uri>().ok())
            .filter(|uri| uri.authority().is_some_and(|a| a.as_str() == authority))
            .filter(|_| !authority.contains('@'))
            .ok_or_else(|| format!("{METADATA_HOST_ENV}={authority:?} is not a host[:port]"))?;
        Ok(Self {
            kind: Kind::Metadata(url),
            options,
        })
    }

    /// The service account's token endpoint; `None` for the metadata server.
    pub fn token_uri(&self) -> Option<&Uri> {
        match &self.kind {
            Kind::ServiceAccount(account) => Some(&account.token_uri),
            Kind::Metadata(_) => None,
        }
    }

    /// The setting that names the source, for messages.
    pub fn setting(&self) -> &'static str {
        match self.kind {
            Kind::ServiceAccount(_) => "google_credentials_file",
            Kind::Metadata(_) => "google_credentials",
        }
    }

    /// What the source is, for the log: the account, or the metadata host.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::ServiceAccount(account) => {
                format!("google service account {}", account.client_email)
            }
            Kind::Metadata(url) => {
                format!(
                    "google metadata server {}",
                    url.authority().map_or("", |a| a.as_str())
                )
            }
        }
    }

    /// Fetches a token, waiting for it. The error says what went wrong,
    /// never the key, the assertion or a token.
    pub fn run(&self) -> Result<Fetched, String> {
        let credentials = self.clone();
        on_own_thread(async move {
            let options = &credentials.options;
            let (url, request, assertion, required_header) = match &credentials.kind {
                Kind::ServiceAccount(account) => {
                    let assertion = account.assertion(&options.scopes, unix_now())?;
                    let request = account.request(&assertion)?;
                    (&account.token_uri, request, Some(assertion), None)
                }
                Kind::Metadata(url) => (url, metadata_request(url)?, None, Some(METADATA_FLAVOR)),
            };
            let endpoint = Endpoint {
                url,
                extra_ca_certs: &options.extra_ca_certs,
                timeout: options.timeout,
                ttl: options.ttl,
                required_header,
            };
            endpoint.token(request, &Vec::from_iter(&assertion)).await
        })
    }
}

impl ServiceAccount {
    /// The signed JWT (RFC 7523 §3) asserting the account, for `scopes`,
    /// issued at `now` (seconds since the epoch).
    fn assertion(&self, scopes: &[String], now: u64) -> Result<ApiKey, String> {
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(id) = &self.key_id {
            header["kid"] = id.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scopes.join(" "),
            "aud": self.audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut jwt = format!(
            "{}.{}",
            encode(header.to_string().as_bytes()),
            encode(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                jwt.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the JWT assertion failed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&encode(&signature));
        Ok(ApiKey::new(jwt))
    }

    /// The token request: the JWT-bearer grant with `assertion`.
    fn request(&self, assertion: &ApiKey) -> Result<Request<Full<Bytes>>, String> {
        let mut form = Zeroizing::new(String::new());
        form_pair(&mut form, "grant_type", JWT_BEARER);
        form_pair(&mut form, "assertion", assertion.expose());
        Request::post(self.token_uri.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::copy_from_slice(form.as_bytes())))
            .map_err(|err| format!("cannot build the request to {}: {err}", self.token_uri))
    }
}

/// The metadata server's token request.
fn metadata_request(url: &Uri) -> Result<Request<Full<Bytes>>, String> {
    Request::get(url.clone())
        .header(METADATA_FLAVOR.0, METADATA_FLAVOR.1)
        .header(ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|err| format!("cannot build the request to {url}: {err}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(scopes: &[&str]) -> Options {
        Options {
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            extra_ca_certs: Arc::default(),
        }
    }

    /// A syntactically valid PEM whose body is not a key; distinctive, so
    /// a message quoting it is caught.
    const NOT_A_KEY: &str =
        "-----BEGIN PRIVATE KEY-----\\nU0VDUkVUS0VZTUFURVJJQUw=\\n-----END PRIVATE KEY-----\\n";

    fn file(fields: &str) -> String {
        format!("{{{fields}}}")
    }

    #[test]
    fn key_files_are_checked_without_quoting_them() {
        let good_fields = format!(
            r#""type": "service_account", "client_email": "a@p.iam.gserviceaccount.com",
               "token_uri": "https://oauth2.googleapis.com/token", "private_key": "{NOT_A_KEY}""#
        );
        let cases = [
            ("not json".to_owned(), "is not a JSON key file"),
            (
                file(r#""type": "authorized_user", "refresh_token": "SECRETKEYMATERIAL""#),
                "is a \"authorized_user\" credentials file",
            ),
            (
                file(r#""type": "SECRETKEYMATERIAL""#),
                "has no \"type\": \"service_account\"",
            ),
            (
                file(r#""type": "service_account", "private_key": "SECRETKEYMATERIAL""#),
                "lacks client_email, token_uri",
            ),
            (
                file(&good_fields.replace("https://oauth2", "oauth2")),
                "token_uri that is not an https:// URL",
            ),
            (
                file(&good_fields.replace("PRIVATE KEY", "RSA PRIVATE KEY")),
                "not a PEM PKCS#8 key",
            ),
            (file(&good_fields), "not a usable RSA key"),
        ];
        for (json, expected) in cases {
            let err = GoogleCredentials::service_account(&json, options(&[])).expect_err(expected);
            assert!(err.contains(expected), "{json}: {err}");
            assert!(
                !err.contains("SECRETKEYMATERIAL") && !err.contains("U0VDUkVU"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_metadata_url_carries_the_scopes_and_honours_the_host() {
        let default = GoogleCredentials::metadata(None, options(&[DEFAULT_SCOPE, "b c"]))
            .expect("the default host");
        assert_eq!(
            default.kind_url(),
            "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token\
             ?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform%2Cb+c"
        );
        assert_eq!(default.setting(), "google_credentials");
        assert_eq!(
            default.describe(),
            "google metadata server metadata.google.internal"
        );
        let local = GoogleCredentials::metadata(Some("127.0.0.1:8089"), options(&[]))
            .expect("a local host");
        assert_eq!(
            local.kind_url(),
            "http://127.0.0.1:8089/computeMetadata/v1/instance/service-accounts/default/token"
        );
        for bad in ["a/b", "a@b", "a b", "a?b", "[::1"] {
            let err = GoogleCredentials::metadata(Some(bad), options(&[])).expect_err(bad);
            assert!(err.contains("GCE_METADATA_HOST"), "{err}");
        }
    }

    impl GoogleCredentials {
        fn kind_url(&self) -> String {
            match &self.kind {
                Kind::Metadata(url) => url.to_string(),
                Kind::ServiceAccount(account) => account.token_uri.to_string(),
            }
        }
    }
}

//! A private CA and an HTTPS upstream on 127.0.0.1:0 for keyrelay's TLS paths.
//!
//! The CA is generated per test with rcgen, so nothing depends on files in the
//! repository or on the machine's trust store. The upstream speaks HTTP/1.1
//! over rustls and reports the requests it sees, so a test can check that the
//! key really travelled over TLS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::support::{full, temp_file, within, TempFile};

/// A throwaway certificate authority.
pub(crate) struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "keyrelay test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { cert, key }
    }

    /// The CA certificate in PEM, as a user would put it in `ca_file`.
    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses).
    pub(crate) fn issue(&self, names: &[&str]) -> ServerCert {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "keyrelay test upstream");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf signed by CA");
        ServerCert {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    /// Writes the CA's PEM to a uniquely named temporary file, removed on drop.
    pub(crate) fn write_pem_file(&self) -> TempFile {
        temp_file("test-ca", "ca.pem", self.pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A server certificate chain and its private key.
pub(crate) struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// What the HTTPS upstream saw of one request.
#[derive(Debug)]
pub(crate) struct SeenRequest {
    pub uri: Uri,
    pub headers: HeaderMap,
    /// Which accepted connection it came on, counting from 0.
    pub connection: usize,
}

/// An HTTPS (HTTP/1.1) upstream on 127.0.0.1:0 answering 200 "secure hello".
pub(crate) struct TlsUpstream {
    pub addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<SeenRequest>,
    handshakes: mpsc::UnboundedReceiver<Result<(), String>>,
}

impl TlsUpstream {
    pub(crate) async fn start(cert: ServerCert) -> Self {
        // Explicit provider: the test binary must not depend on a process-wide default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(cert.chain, cert.key)
            .expect("server cert");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS upstream");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, requests) = mpsc::unbounded_channel();
        let (handshake_tx, handshakes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let connection = accepted;
                accepted += 1;
                let acceptor = acceptor.clone();
                let seen_tx = seen_tx.clone();
                let handshake_tx = handshake_tx.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(stream).await {
                        Ok(tls) => {
                            let _ = handshake_tx.send(Ok(()));
                            tls
                        }
                        Err(err) => {
                            let _ = handshake_tx.send(Err(err.to_string()));
                            return;
                        }
                    };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let _ = seen_tx.send(SeenRequest {
                            uri: request.uri().clone(),
                            headers: request.headers().clone(),
                            connection,
                        });
                        async { Ok::<_, Infallible>(Response::new(full("secure hello"))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            handshakes,
        }
    }

    /// The upstream URL under the name `host` (which must resolve to 127.0.0.1).
    pub(crate) fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    pub(crate) async fn next_request(&mut self) -> SeenRequest {
        within("a request at the TLS upstream", self.requests.recv())
            .await
            .expect("TLS upstream stopped")
    }

    /// The outcome of the next TLS handshake, as the server saw it.
    pub(crate) async fn next_handshake(&mut self) -> Result<(), String> {
        within("a TLS handshake at the upstream", self.handshakes.recv())
            .await
            .expect("TLS upstream stopped")
    }

    /// True if no handshake is waiting to be read (without waiting).
    pub(crate) fn no_handshake(&mut self) -> bool {
        self.handshakes.try_recv().is_err()
    }

    /// True if no request got through the handshake (without waiting).
    pub(crate) fn no_request(&mut self) -> bool {
        self.requests.try_recv().is_err()
    }
}

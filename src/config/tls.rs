//! The TLS client settings every outbound connection uses, to upstreams
//! and to OAuth2 token endpoints alike: the Mozilla web roots compiled into
//! the binary (so a scratch container needs no CA bundle) plus the `ca_file`
//! certificates.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// A rustls client configuration trusting the web roots and `extra_ca_certs`.
pub(crate) fn client_config(
    extra_ca_certs: &[CertificateDer<'static>],
) -> std::io::Result<ClientConfig> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Each certificate was already parsed once during config validation.
    let (_added, _ignored) = roots.add_parsable_certificates(extra_ca_certs.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

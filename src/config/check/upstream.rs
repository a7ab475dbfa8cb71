//! How keyrelay talks to upstreams: the extra TLS roots, the timeouts, the
//! connection pool and HTTP/2 keepalive.

use std::path::Path;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{Problems, Reported};
use crate::config::{PoolSettings, RawConfig, Timeouts};

/// The upstream connection settings.
pub(super) struct Upstream {
    pub(super) extra_ca_certs: Vec<CertificateDer<'static>>,
    pub(super) timeouts: Timeouts,
    pub(super) pool: PoolSettings,
    pub(super) http2_keepalive_interval: Duration,
    pub(super) http2_keepalive_timeout: Duration,
}

/// `ca_file`, the upstream timeouts, the pool and HTTP/2 keepalive.
pub(super) fn check(raw: &RawConfig, found: &mut Problems) -> Result<Upstream, Reported> {
    let extra_ca_certs = match raw.ca_file.as_deref() {
        None | Some("") => Ok(Vec::new()),
        Some(path) => {
            load_ca_file(Path::new(path)).map_err(|message| found.refuse("ca_file", message))
        }
    };
    let timeouts = timeouts(raw, found);
    let pool = pool(raw, found);
    let keepalive = found.duration(
        "http2_keepalive_interval",
        &raw.http2_keepalive_interval,
        "long HTTP/2 streams need keepalive pings",
    );
    let keepalive_timeout = found.duration(
        "http2_keepalive_timeout",
        &raw.http2_keepalive_timeout,
        "a dead HTTP/2 connection is found only when a PING goes unanswered",
    );
    Ok(Upstream {
        extra_ca_certs: extra_ca_certs?,
        timeouts: timeouts?,
        pool: pool?,
        http2_keepalive_interval: keepalive?,
        http2_keepalive_timeout: keepalive_timeout?,
    })
}

/// `connect_timeout`, `response_header_timeout`, `idle_timeout`.
fn timeouts(raw: &RawConfig, found: &mut Problems) -> Result<Timeouts, Reported> {
    let connect = found.duration(
        "connect_timeout",
        &raw.connect_timeout,
        "a dead upstream would hang requests forever",
    );
    let response_headers =
        found.optional_duration("response_header_timeout", &raw.response_header_timeout);
    let idle = found.optional_duration("idle_timeout", &raw.idle_timeout);
    Ok(Timeouts {
        connect: connect?,
        response_headers: response_headers?,
        idle: idle?,
    })
}

/// `pool_idle_timeout`, `pool_max_idle_per_host`, `warm_connections`.
fn pool(raw: &RawConfig, found: &mut Problems) -> Result<PoolSettings, Reported> {
    let idle_timeout = found.duration(
        "pool_idle_timeout",
        &raw.pool_idle_timeout,
        "keep it shorter than the upstream's keep-alive so stale connections are not reused",
    );
    let max_idle_per_host = found.number(
        "pool_max_idle_per_host",
        &raw.pool_max_idle_per_host,
        0..=MAX_IDLE_PER_HOST,
        "a number of connections",
    );
    let warm_connections = found.number(
        "warm_connections",
        &raw.warm_connections,
        0..=MAX_WARM_CONNECTIONS,
        "a number of connections",
    );
    Ok(PoolSettings {
        idle_timeout: idle_timeout?,
        max_idle_per_host: max_idle_per_host?,
        warm_connections: warm_connections?,
    })
}

/// Most idle connections kept per upstream: one local address can hold no
/// more connections to one upstream address than there are ports; 0 keeps
/// none (every request opens its own).
const MAX_IDLE_PER_HOST: usize = 65_535;

/// Most warm connections per upstream: spares beyond a few only hold
/// sockets the server has to keep open.
const MAX_WARM_CONNECTIONS: usize = 64;

fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{} is not a valid PEM bundle: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificates", path.display()));
    }
    let mut store = rustls::RootCertStore::empty();
    for (index, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|err| {
            format!(
                "certificate #{} in {} is not a usable CA certificate: {err}",
                index + 1,
                path.display()
            )
        })?;
    }
    Ok(certs)
}

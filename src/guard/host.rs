//! Host check: the defence against DNS rebinding.
//!
//! A web page can make a browser send requests to keyrelay under a hostile
//! name that resolves to 127.0.0.1 (DNS rebinding). The browser then reports
//! that name in `Host`, so accepting only loopback names (and the names the
//! operator configures) shuts the attack out before anything else runs. This
//! is kubectl proxy's `--accept-hosts` default, with the holes others fell
//! into closed: an empty or missing Host is refused, ports and a trailing dot
//! are tolerated, and `[::1]` is understood.

use std::net::IpAddr;

use http::header::HOST;
use http::{HeaderMap, Uri};

/// Names accepted without configuration.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// Which `Host` values keyrelay answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// Extra accepted names, normalised (lowercase, no port, no trailing dot).
    extra: Vec<String>,
}

impl HostPolicy {
    /// Accepts the loopback names plus `extra` (e.g. a Kubernetes Service name).
    pub fn new(extra: &[String]) -> Self {
        Self {
            extra: extra
                .iter()
                .filter_map(|name| normalize(name))
                .map(str::to_ascii_lowercase)
                .collect(),
        }
    }

    /// Checks every authority the request names: the `Host` header and, for
    /// HTTP/2 and absolute-form requests, the URI's authority. At least one
    /// must be present, and all present must be accepted.
    pub fn allows(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        self.allows_with(uri, headers, None)
    }

    /// [`allows`](Self::allows), also accepting the literal IP address the
    /// connection arrived on, `local` (for the admin port, which kubelet
    /// probes and Prometheus address by the pod's IP). A rebinding page
    /// can only make the browser send its own host name, never an IP
    /// literal, so this opens nothing to it.
    pub fn allows_at(&self, uri: &Uri, headers: &HeaderMap, local: Option<IpAddr>) -> bool {
        self.allows_with(uri, headers, local)
    }

    fn allows_with(&self, uri: &Uri, headers: &HeaderMap, local: Option<IpAddr>) -> bool {
        let mut seen = false;
        for value in headers.get_all(HOST) {
            seen = true;
            if !value.to_str().is_ok_and(|host| self.accepts(host, local)) {
                return false;
            }
        }
        if let Some(authority) = uri.authority() {
            seen = true;
            if !self.accepts(authority.as_str(), local) {
                return false;
            }
        }
        seen
    }

    /// True when `name` can be an accepted host name (for config validation).
    pub fn is_valid_name(name: &str) -> bool {
        !name.contains('/') && normalize(name).is_some()
    }

    // Runs on every request, so it compares without allocating a lowercase copy.
    fn accepts(&self, host: &str, local: Option<IpAddr>) -> bool {
        normalize(host).is_some_and(|name| {
            LOOPBACK_NAMES
                .iter()
                .copied()
                .chain(self.extra.iter().map(String::as_str))
                .any(|accepted| accepted.eq_ignore_ascii_case(name))
                || local.is_some_and(|local| names_ip(name, local))
        })
    }
}

/// True when `name` (normalised) is the literal address `ip`: `10.0.0.7`,
/// `[fd00::7]`, an IPv4 address also matching its IPv4-mapped IPv6 form.
fn names_ip(name: &str, ip: IpAddr) -> bool {
    let literal = name
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(name);
    literal
        .parse::<IpAddr>()
        .is_ok_and(|parsed| parsed.to_canonical() == ip.to_canonical())
}

/// Drops the port and a trailing dot (case is left to the comparison);
/// `None` for an empty name.
fn normalize(host: &str) -> Option<&str> {
    let host = host.trim();
    let name = if host.starts_with('[') {
        // IPv6 literal: keep the brackets; after `]` only `:port` may follow.
        let end = host.find(']')?;
        match &host[end + 1..] {
            "" => {}
            rest => {
                let port = rest.strip_prefix(':')?;
                if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
            }
        }
        &host[..=end]
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                name
            }
            Some(_) => return None,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn allows(policy: &HostPolicy, host: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_str(host).expect("value"));
        policy.allows(&Uri::from_static("/"), &headers)
    }

    #[test]
    fn loopback_names_pass_in_every_spelling() {
        let policy = HostPolicy::default();
        for host in [
            "localhost",
            "LOCALHOST",
            "localhost:8080",
            "localhost.",
            "localhost.:80",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(allows(&policy, host), "{host} should pass");
        }
    }

    #[test]
    fn rebinding_and_odd_names_are_refused() {
        let policy = HostPolicy::default();
        for host in [
            "",
            " ",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "127.0.0.2",
            "0.0.0.0",
            "[::2]",
            "localhost:",
            "localhost:http",
            "[::1",
            "::1",
            "2130706433",
            "0x7f.0.0.1",
            "[::1]0",
            "[::1]evil.example",
            "[::1]:",
            "[::1]:80:80",
            "[::1]]",
        ] {
            assert!(!allows(&policy, host), "{host:?} should be refused");
        }
    }

    #[test]
    fn missing_host_is_refused_unless_the_uri_names_one() {
        let policy = HostPolicy::default();
        assert!(!policy.allows(&Uri::from_static("/"), &HeaderMap::new()));
        assert!(policy.allows(&Uri::from_static("http://localhost:1/x"), &HeaderMap::new()));
        assert!(!policy.allows(&Uri::from_static("http://evil.test/x"), &HeaderMap::new()));
    }

    #[test]
    fn the_listeners_own_ip_passes_only_where_asked() {
        let policy = HostPolicy::default();
        let local: IpAddr = "10.1.2.3".parse().expect("ip");
        let at = |host: &str, local| {
            let mut headers = HeaderMap::new();
            headers.insert(HOST, http::HeaderValue::from_str(host).expect("value"));
            policy.allows_at(&Uri::from_static("/"), &headers, local)
        };
        assert!(at("10.1.2.3:9901", Some(local)));
        assert!(at("10.1.2.3", Some(local)));
        assert!(at("localhost:9901", Some(local)));
        assert!(!at("10.1.2.4:9901", Some(local)));
        assert!(!at("attacker.example", Some(local)));
        assert!(!at("10.1.2.3.nip.io", Some(local)));
        assert!(!at("012.1.2.3", Some(local)));
        assert!(!at("10.1.2.3:9901", None));
        assert!(
            !allows(&policy, "10.1.2.3"),
            "the main port's check is unchanged"
        );
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert!(at("10.1.2.3:9901", Some(mapped)));
        let v6: IpAddr = "fd00::7".parse().expect("ip");
        assert!(at("[fd00::7]:9901", Some(v6)));
        assert!(!at("[fd00::8]:9901", Some(v6)));
    }

    #[test]
    fn configured_names_pass() {
        let policy = HostPolicy::new(&["KeyRelay.Team.svc.".to_owned()]);
        assert!(allows(&policy, "keyrelay.team.svc:8080"));
        assert!(!allows(&policy, "other.team.svc"));
    }
}

//! One entry of `allowed_origins`: what a browser's `Origin` must be.
//!
//! Browsers send an origin as `scheme://host[:port]`, lowercase, with the
//! default port left out. An entry is checked at startup against that form,
//! because an entry the browser can never send (a path, a `*` in the host,
//! `http://localhost:80`) would silently refuse every request. The one
//! wildcard is a loopback origin's port, `http://localhost:*`: dev servers
//! (Vite, Next) pick their port at start and take the next free one when it
//! is in use, and every port of the user's own machine is theirs alike.

use std::fmt;

/// A checked `allowed_origins` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigin {
    /// Exactly this origin, in the form browsers send (`http://localhost:3000`).
    Exact(String),
    /// This loopback scheme and host on any port (`http://localhost`, from
    /// `http://localhost:*`).
    AnyPort(String),
}

impl AllowedOrigin {
    /// Checks one configured entry; the error says what is wrong and what
    /// would be right.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let text = entry.trim().to_ascii_lowercase();
        if text == "*" || text == "null" {
            return Err(format!(
                "{entry:?} is not allowed: list each origin, such as http://localhost:3000 \
                 (\"*\" would let any web page spend the key, and \"null\" is what \
                 sandboxed frames and file:// pages send)"
            ));
        }
        let (scheme, rest) = text
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
            .ok_or_else(|| {
                format!("{entry:?} must start with http:// or https:// (an origin is scheme://host[:port])")
            })?;
        // `http://localhost:3000/` is how a URL bar shows the origin.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(extra) = rest.find(['/', '?', '#', '@']) {
            return Err(format!(
                "{entry:?} has {:?}, but an origin is only scheme://host[:port], with no path, \
                 query or user: browsers send the page's origin, not its URL",
                &rest[extra..]
            ));
        }
        let (host, port) = split_host_port(rest)
            .ok_or_else(|| format!("{entry:?} has no valid host (IPv6 addresses go in brackets, e.g. http://[::1]:3000)"))?;
        if host.contains('*') {
            return Err(format!(
                "{entry:?} has a wildcard in the host; only a loopback origin's port may be a \
                 wildcard (http://localhost:*); list other origins exactly"
            ));
        }
        if !is_host(host) {
            return Err(format!(
                "{entry:?} has an invalid host {host:?} (write international names in their \
                 xn-- form, as browsers send them)"
            ));
        }
        let scheme_host = format!("{scheme}://{host}");
        match port {
            None => Ok(Self::Exact(scheme_host)),
            Some("*") if is_loopback(host) => Ok(Self::AnyPort(scheme_host)),
            Some("*") => Err(format!(
                "{entry:?}: a port wildcard is allowed only for loopback hosts \
                 (localhost, 127.0.0.1, [::1]); list the ports of {host} exactly"
            )),
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!(
                    "{entry:?} has an invalid port {port:?} (1 to 65535, or * for a loopback host)"
                )),
                // Browsers leave the default port out of Origin, so an entry
                // that spells it out is kept in the form they send.
                Ok(80) if scheme == "http" => Ok(Self::Exact(scheme_host)),
                Ok(443) if scheme == "https" => Ok(Self::Exact(scheme_host)),
                Ok(port) => Ok(Self::Exact(format!("{scheme_host}:{port}"))),
            },
        }
    }

    /// True if a browser's `Origin` value is this origin.
    pub fn matches(&self, origin: &[u8]) -> bool {
        match self {
            Self::Exact(exact) => origin.eq_ignore_ascii_case(exact.as_bytes()),
            Self::AnyPort(scheme_host) => {
                let Some((start, rest)) = origin.split_at_checked(scheme_host.len()) else {
                    return false;
                };
                start.eq_ignore_ascii_case(scheme_host.as_bytes())
                    && match rest {
                        [] => true,
                        [b':', port @ ..] => {
                            (1..=5).contains(&port.len()) && port.iter().all(u8::is_ascii_digit)
                        }
                        _ => false,
                    }
            }
        }
    }

    /// True for a wildcard entry.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, Self::AnyPort(_))
    }
}

impl fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(origin) => f.write_str(origin),
            Self::AnyPort(scheme_host) => write!(f, "{scheme_host}:*"),
        }
    }
}

/// Splits `host[:port]`, where an IPv6 host is in brackets.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    let (host, after) = if authority.starts_with('[') {
        let end = authority.find(']')? + 1;
        authority.split_at(end)
    } else {
        match authority.rfind(':') {
            Some(colon) => authority.split_at(colon),
            None => (authority, ""),
        }
    };
    let port = match after {
        "" => None,
        _ => Some(after.strip_prefix(':').filter(|port| !port.is_empty())?),
    };
    (!host.is_empty()).then_some((host, port))
}

/// A DNS name (ASCII letters, digits, hyphens and dots), an IPv4 address or
/// a bracketed IPv6 address.
fn is_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// The names of the user's own machine.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
        || host == "[::1]"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entry: &str) -> AllowedOrigin {
        AllowedOrigin::parse(entry).unwrap_or_else(|err| panic!("{entry}: {err}"))
    }

    #[test]
    fn entries_are_kept_in_the_form_browsers_send() {
        for (entry, kept) in [
            ("http://localhost:3000", "http://localhost:3000"),
            ("HTTP://LocalHost:3000/", "http://localhost:3000"),
            ("http://localhost:80", "http://localhost"),
            ("https://app.example.com:443", "https://app.example.com"),
            (
                "https://app.example.com:8443",
                "https://app.example.com:8443",
            ),
            ("http://[::1]:5173", "http://[::1]:5173"),
            ("http://127.0.0.1:*", "http://127.0.0.1:*"),
            ("http://localhost:*", "http://localhost:*"),
        ] {
            assert_eq!(parse(entry).to_string(), kept, "{entry}");
        }
    }

    #[test]
    fn entries_a_browser_never_sends_are_refused_with_the_reason() {
        for (entry, reason) in [
            ("*", "list each origin"),
            ("null", "sandboxed"),
            ("localhost:3000", "must start with http://"),
            ("ftp://localhost", "must start with http://"),
            ("http://localhost:3000/app", "no path"),
            ("http://localhost:3000?x=1", "no path"),
            ("http://user@localhost:3000", "no path"),
            ("https://*.example.com", "wildcard in the host"),
            ("http://*:3000", "wildcard in the host"),
            ("https://app.example.com:*", "only for loopback"),
            ("http://localhost:30*", "invalid port"),
            ("http://localhost:0", "invalid port"),
            ("http://localhost:70000", "invalid port"),
            ("http://localhost:", "no valid host"),
            ("http://", "no valid host"),
            ("http://::1:3000", "invalid host"),
            ("http://bücher.example", "xn--"),
            ("http://local host:3000", "invalid host"),
        ] {
            let err = AllowedOrigin::parse(entry).expect_err(entry);
            assert!(err.contains(reason), "{entry}: {err}");
        }
    }

    #[test]
    fn a_port_wildcard_matches_every_port_of_that_host_only() {
        let any = parse("http://localhost:*");
        for origin in [
            "http://localhost:5173",
            "http://localhost:3001",
            "http://localhost",
        ] {
            assert!(any.matches(origin.as_bytes()), "{origin}");
        }
        for origin in [
            "https://localhost:5173",
            "http://127.0.0.1:5173",
            "http://localhost.evil.test:5173",
            "http://localhost:5173.evil.test",
            "http://localhost:",
            "http://localhost:123456",
            "http://localhostx",
            "http://local",
        ] {
            assert!(!any.matches(origin.as_bytes()), "{origin}");
        }
    }

    #[test]
    fn an_exact_origin_matches_itself_only() {
        let exact = parse("http://localhost:3000");
        assert!(exact.matches(b"http://localhost:3000"));
        assert!(exact.matches(b"HTTP://LOCALHOST:3000"));
        for origin in [
            "http://127.0.0.1:3000",
            "http://localhost:3001",
            "http://localhost:3000.evil",
        ] {
            assert!(!exact.matches(origin.as_bytes()), "{origin}");
        }
    }
}

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
use std::net::{Ipv4Addr, Ipv6Addr};

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
        let host = canonical_host(host).map_err(|why| format!("{entry:?}: {why}"))?;
        let scheme_host = format!("{scheme}://{host}");
        match port {
            None => Ok(Self::Exact(scheme_host)),
            Some("*") if is_loopback(&host) => Ok(Self::AnyPort(scheme_host)),
            Some("*") => Err(format!(
                "{entry:?}: a port wildcard is allowed only for loopback hosts \
                 (localhost, 127.0.0.1, [::1]); list the ports of {host} exactly"
            )),
            Some(port) => match parse_port(port) {
                None => Err(format!(
                    "{entry:?} has an invalid port {port:?} (1 to 65535, or * for a loopback host)"
                )),
                // Browsers leave the default port out of Origin, so an entry
                // that spells it out is kept in the form they send.
                Some(80) if scheme == "http" => Ok(Self::Exact(scheme_host)),
                Some(443) if scheme == "https" => Ok(Self::Exact(scheme_host)),
                Some(port) => Ok(Self::Exact(format!("{scheme_host}:{port}"))),
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
                        // As browsers serialise a port: no leading zero, 1 to 65535.
                        [b':', port @ ..] => {
                            !port.starts_with(b"0")
                                && std::str::from_utf8(port)
                                    .ok()
                                    .and_then(parse_port)
                                    .is_some()
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

/// A port as written in an entry: decimal digits only, 1 to 65535.
fn parse_port(port: &str) -> Option<u16> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok().filter(|&port| port != 0)
}

/// The host as a browser serialises it in `Origin`, or why it cannot be one.
///
/// A browser rewrites IP addresses into one canonical form (`127.1` becomes
/// `127.0.0.1`, `[0:0::1]` becomes `[::1]`), so an entry in another form
/// would match nothing. Shortened, octal and hex IPv4 forms are refused
/// rather than reinterpreted; IPv6 is rewritten.
fn canonical_host(host: &str) -> Result<String, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("{host:?} is not an IPv6 address"))?;
        return Ok(format!("[{}]", browser_ipv6(ip)));
    }
    // WHATWG URL parsing reads a host whose last label is a number as IPv4.
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return host
            .parse::<Ipv4Addr>()
            .map(|ip| ip.to_string())
            .map_err(|_| {
                format!("{host:?} is not an IPv4 address in the form browsers send, four decimal numbers such as 127.0.0.1")
            });
    }
    // A DNS name: labels of letters, digits, `-` and `_`; a final dot (the
    // fully qualified form) is kept, since the browser keeps it too.
    let labels = host.strip_suffix('.').unwrap_or(host);
    let valid = labels.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if valid {
        Ok(host.to_owned())
    } else {
        Err(format!(
            "{host:?} is not a host name (write international names in their xn-- form, as browsers send them)"
        ))
    }
}

/// An IPv6 address as the URL standard serialises it: lowercase hex groups,
/// the first longest run of two or more zero groups as `::`, and never the
/// dotted IPv4 tail that `Ipv6Addr`'s `Display` gives mapped addresses.
fn browser_ipv6(ip: Ipv6Addr) -> String {
    let groups = ip.segments();
    // The first longest run of zero groups, if it is at least two long.
    let (mut best, mut run) = ((0, 0), (0, 0));
    for (index, group) in groups.iter().enumerate() {
        if *group == 0 {
            run = if run.1 == 0 {
                (index, 1)
            } else {
                (run.0, run.1 + 1)
            };
            if run.1 > best.1 {
                best = run;
            }
        } else {
            run = (0, 0);
        }
    }
    let hex = |range: &[u16]| {
        range
            .iter()
            .map(|group| format!("{group:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    if best.1 < 2 {
        return hex(&groups);
    }
    let (start, end) = (best.0, best.0 + best.1);
    format!("{}::{}", hex(&groups[..start]), hex(&groups[end..]))
}

/// The names of the user's own machine.
fn is_loopback(host: &str) -> bool {
    matches!(host, "localhost" | "localhost." | "[::1]")
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
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
            ("http://localhost.:3000", "http://localhost.:3000"),
            ("http://my_app.test:3000", "http://my_app.test:3000"),
            ("http://localhost:03000", "http://localhost:3000"),
            ("http://[0:0:0:0:0:0:0:1]:3000", "http://[::1]:3000"),
            (
                "http://[::FFFF:127.0.0.1]:3000",
                "http://[::ffff:7f00:1]:3000",
            ),
            (
                "http://[2001:db8:0:0:1:0:0:1]",
                "http://[2001:db8::1:0:0:1]",
            ),
            ("http://[1:0:2:3:4:5:6:7]", "http://[1:0:2:3:4:5:6:7]"),
            ("http://[0::1]:*", "http://[::1]:*"),
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
            ("http://localhost:+3000", "invalid port"),
            ("http://127.1:4000", "four decimal numbers"),
            ("http://127.000.000.001:4000", "four decimal numbers"),
            ("http://2130706433:4000", "four decimal numbers"),
            ("http://0x7f.0.0.1:4000", "four decimal numbers"),
            ("http://999.1.1.1", "four decimal numbers"),
            ("http://[::g]", "not an IPv6 address"),
            ("http://localhost:", "no valid host"),
            ("http://", "no valid host"),
            ("http://::1:3000", "not a host name"),
            ("http://bücher.example", "xn--"),
            ("http://local host:3000", "not a host name"),
            ("http://a..b", "not a host name"),
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
            "http://localhost:0",
            "http://localhost:08080",
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

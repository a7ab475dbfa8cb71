//! Value parsers: durations, sizes, rates, lists and upstream URLs, each
//! turning what a user typed into a typed value or a message saying what a
//! valid one looks like.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use serde::Deserialize;

use super::UpstreamUrl;
use crate::guard::tokens::Rate;

/// Parses "60/m", "5/s", "1000/h", or "off" (no limit).
pub fn parse_rate(text: &str) -> Result<Option<Rate>, String> {
    let text = text.trim();
    if matches!(text, "off" | "none" | "") {
        return Ok(None);
    }
    let usage = || format!("{text:?} is not a rate (examples: 60/m, 5/s, 1000/h, off)");
    let (count, unit) = text.split_once('/').ok_or_else(usage)?;
    let requests: u32 = count.trim().parse().map_err(|_| usage())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(usage()),
    };
    if requests == 0 {
        return Err(format!(
            "{text:?} allows nothing; use off to disable the limit"
        ));
    }
    Ok(Some(Rate { requests, per }))
}

/// Splits "250ms" into (250, "ms"); `what` names a valid value in the error.
fn amount_and_unit<'a>(text: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let amount = digits
        .parse()
        .map_err(|_| format!("{text:?} is not {what}"))?;
    Ok((amount, unit))
}

/// Parses "65536", "64KiB", "10MiB", "1GiB" (also KB/MB/GB as powers of 1024), or "off".
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if matches!(text, "off" | "none") {
        return Ok(None);
    }
    let (amount, unit) = amount_and_unit(text, "a size (examples: 65536, 64KiB, 10MiB, off)")?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use KiB, MiB or GiB)"
            ))
        }
    };
    amount
        .checked_mul(factor)
        .map(Some)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Splits a comma-separated list, dropping blanks.
pub(super) fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses an upstream base URL: `http(s)://host[:port][/path]`, nothing
/// else: no user info, no query, no fragment, a numeric port in range.
///
/// Messages never repeat the value beyond its scheme and host: a URL can
/// hold a pasted secret (in a "port", the user info or the path), and these
/// messages are printed at startup.
pub fn parse_upstream(text: &str) -> Result<UpstreamUrl, String> {
    const SHAPE: &str = "https://host[:port][/path]";
    let text = text.trim();
    let (scheme, rest) = text
        .split_once("://")
        .ok_or_else(|| format!("is not a URL such as {SHAPE}"))?;
    let scheme = if scheme.eq_ignore_ascii_case("https") {
        Scheme::HTTPS
    } else if scheme.eq_ignore_ascii_case("http") {
        Scheme::HTTP
    } else {
        return Err(format!("must start with https:// or http:// ({SHAPE})"));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(
            "must not carry user:password; keyrelay injects the credential itself \
                    (the value is not shown: it may hold a secret)"
                .to_owned(),
        );
    }
    if rest.contains('?') {
        return Err(format!(
            "must not have a query string; clients send their own ({SHAPE})"
        ));
    }
    if rest.contains('#') {
        return Err(format!("must not have a fragment ({SHAPE})"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (address, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("has an unclosed [ in its host ({SHAPE})"))?;
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "has a host in [] that is not an IPv6 address ({SHAPE})"
                ));
            }
            match after {
                "" => (&authority[..address.len() + 2], None),
                after => match after.strip_prefix(':') {
                    Some(port) => (&authority[..address.len() + 2], Some(port)),
                    None => return Err(format!("has text after its IPv6 host ({SHAPE})")),
                },
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let valid_host = !host.is_empty()
        && (host.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
    if !valid_host {
        return Err(format!("has no valid host name or address ({SHAPE})"));
    }
    if let Some(port) = port {
        let numeric = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|port| port > 0);
        if !numeric {
            return Err(format!(
                "has a port that is not a number from 1 to 65535 ({scheme}://{host}:…; \
                 the rest is not shown: it may hold a secret)"
            ));
        }
    }
    let invalid = || format!("is not a valid URL ({scheme}://{host}…; the rest is not shown)");
    let authority: Authority = authority.parse().map_err(|_| invalid())?;
    if !path.is_empty() && path.parse::<PathAndQuery>().is_err() {
        return Err(invalid());
    }
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path: path.trim_end_matches('/').to_owned(),
    })
}

/// A switch as written (`true`/`false`; also `yes`/`no`, `on`/`off`,
/// `1`/`0`, in any case, as the `config` crate reads a boolean), kept as
/// text: a value that is none of these does not fail the whole read, it is
/// reported with every other problem ([`Switch::invalid`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "String")]
pub(super) struct Switch {
    text: String,
    value: Option<bool>,
}

impl From<String> for Switch {
    fn from(text: String) -> Self {
        let value = match text.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" => Some(false),
            _ => None,
        };
        Self { text, value }
    }
}

/// Off, as a switch left out of a `[[routes]]` entry.
impl Default for Switch {
    fn default() -> Self {
        Self::from("false".to_owned())
    }
}

impl Switch {
    /// True if the switch is on; a switch that is neither is off here
    /// (and reported where the settings are checked).
    pub(super) fn on(&self) -> bool {
        self.value == Some(true)
    }

    /// What is wrong with the value, if it is neither on nor off.
    pub(super) fn invalid(&self) -> Option<String> {
        self.value.is_none().then(|| {
            format!(
                "{:?} is not one of: true, false (or yes/no, on/off, 1/0)",
                self.text
            )
        })
    }
}

/// Parses "250ms", "10s", "5m", "1h", a bare number of seconds, or "off" (None).
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if matches!(text, "off" | "none" | "0") {
        return Ok(None);
    }
    let (amount, unit) = amount_and_unit(text, "a duration (examples: 250ms, 10s, 5m, 1h, off)")?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(amount),
        "" | "s" => Duration::from_secs(amount),
        "m" => Duration::from_secs(amount.saturating_mul(60)),
        "h" => Duration::from_secs(amount.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use ms, s, m or h, or off)"
            ))
        }
    };
    Ok((!duration.is_zero()).then_some(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_off() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(parse_duration("10s"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse_duration("7"), Ok(Some(Duration::from_secs(7))));
        assert_eq!(parse_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("off"), Ok(None));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10d").is_err());
    }

    #[test]
    fn upstream_url_keeps_base_path_without_trailing_slash() {
        let url = parse_upstream("https://model-abc.api.baseten.co/environments/production/")
            .expect("valid");
        assert_eq!(url.scheme, Scheme::HTTPS);
        assert_eq!(url.authority.as_str(), "model-abc.api.baseten.co");
        assert_eq!(url.base_path, "/environments/production");
        assert_eq!(
            parse_upstream("http://h:8080").expect("valid").base_path,
            ""
        );
    }

    #[test]
    fn upstream_url_rejects_other_schemes_userinfo_and_queries() {
        assert!(parse_upstream("ftp://h").is_err());
        assert!(parse_upstream("h:80").is_err());
        assert!(parse_upstream("https://u:p@h").is_err());
        assert!(parse_upstream("https://h/?a=b").is_err());
    }

    #[test]
    fn upstream_url_is_parsed_strictly_and_never_echoed() {
        const SECRET: &str = "sk-live-0123456789";
        for bad in [
            format!("https://h:{SECRET}"),
            format!("https://h:{SECRET}/v1"),
            format!("https://{SECRET}@h"),
            format!("https://h/?key={SECRET}"),
            format!("https://h/#{SECRET}"),
            format!("https://h/{SECRET}?"),
            "https://h:0".to_owned(),
            "https://h:65536".to_owned(),
            "https://h:".to_owned(),
            "https://h:+80".to_owned(),
            "https://:80".to_owned(),
            "https://[::1".to_owned(),
            "https://[nope]:80".to_owned(),
            "https://h h".to_owned(),
            format!("{SECRET}://h"),
        ] {
            let message = parse_upstream(&bad).expect_err(&bad);
            assert!(!message.contains(SECRET), "{bad}: {message}");
        }
        let v6 = parse_upstream("http://[::1]:8080/base/").expect("IPv6");
        assert_eq!(v6.authority.as_str(), "[::1]:8080");
        assert_eq!(v6.base_path, "/base");
        let upper = parse_upstream("HTTPS://Example.test:443").expect("any case");
        assert_eq!(upper.scheme, Scheme::HTTPS);
    }
}

//! Value parsers: durations, sizes, rates, lists and upstream URLs, each
//! turning what a user typed into a typed value or a message saying what a
//! valid one looks like.

use std::time::Duration;

use http::uri::Scheme;
use http::Uri;

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

/// Parses an upstream base URL: http(s), a host, an optional path, nothing else.
pub fn parse_upstream(text: &str) -> Result<UpstreamUrl, String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a valid URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(format!("{text:?} must start with https:// or http://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry user:password; keyrelay injects the credential itself".to_owned(),
        );
    }
    if authority.host().is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{text:?} must not have a query string; clients send their own"
        ));
    }
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
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
}

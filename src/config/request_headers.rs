//! `set_request_headers`: static headers keyrelay sets on every upstream
//! request of a route, replacing whatever the client sent under that name.
//!
//! They are configuration, shown in `--help`-style output and config files,
//! so they must never carry secrets: the credential headers, and any value
//! containing the route's key, are refused (the key goes in `key_env` or
//! `key_file`, where it is kept out of logs). Headers that frame or route
//! the message (`content-length`, `host`, hop-by-hop headers) are refused
//! too: setting them would break the exchange rather than label it.

use http::{HeaderName, HeaderValue};

use crate::secrets::key::ApiKey;

/// Names that belong to the connection, the message framing or keyrelay's
/// request id, which keyrelay manages itself.
const MANAGED: [&str; 11] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
    "x-request-id",
];

/// True for a header keyrelay manages itself (connection, framing, request
/// id), which no setting may put a value in: `set_request_headers` and the
/// credential's `auth_header` alike.
pub(super) fn is_managed(name: &HeaderName) -> bool {
    MANAGED.contains(&name.as_str())
}

/// Names that carry credentials.
const CREDENTIALS: [&str; 5] = [
    "baseten-authorization",
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

/// Parses `name: value` entries. `key_header` is the header the route's key
/// goes in and `key` the key's text, both refused as sources of a static
/// header. Each problem is reported through `report` without the value (it
/// might be a pasted secret).
pub(super) fn parse(
    entries: &[String],
    key_header: Option<&HeaderName>,
    key: Option<&ApiKey>,
    mut report: impl FnMut(String),
) -> Option<Vec<(HeaderName, HeaderValue)>> {
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(entries.len());
    let mut ok = true;
    let entries = entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty());
    for (position, entry) in entries.enumerate() {
        // Named by position: an entry without a colon may be a pasted key.
        let Some((name, value)) = entry.split_once(':') else {
            report(format!("entry {} is not \"name: value\"", position + 1));
            ok = false;
            continue;
        };
        let name = name.trim();
        match check(name, value.trim(), key_header, key) {
            Ok((name, _)) if headers.iter().any(|(seen, _)| *seen == name) => {
                report(format!("{name} is set twice; give each header once"));
                ok = false;
            }
            Ok(header) => headers.push(header),
            Err(problem) => {
                report(problem);
                ok = false;
            }
        }
    }
    ok.then_some(headers)
}

fn check(
    name: &str,
    value: &str,
    key_header: Option<&HeaderName>,
    key: Option<&ApiKey>,
) -> Result<(HeaderName, HeaderValue), String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if is_managed(&header) {
        return Err(format!(
            "{header} is managed by keyrelay for each connection and cannot be set"
        ));
    }
    if CREDENTIALS.contains(&header.as_str()) || key_header == Some(&header) {
        return Err(format!(
            "{header} carries credentials; static headers are never secrets (the key goes in \
             key_env or key_file)"
        ));
    }
    if key.is_some_and(|key| key.is_in(value)) {
        return Err(format!(
            "the value of {header} contains the API key; static headers are never secrets \
             (the key goes in key_env or key_file)"
        ));
    }
    let value = HeaderValue::from_str(value).map_err(|_| {
        format!("the value of {header} is not a valid header value (visible ASCII only)")
    })?;
    Ok((header, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(entries: &[&str]) -> Result<Vec<(String, String)>, Vec<String>> {
        let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        let mut problems = Vec::new();
        let key_header = HeaderName::from_static("baseten-authorization");
        let key = ApiKey::new("sk-secret-123".to_owned());
        match parse(&entries, Some(&key_header), Some(&key), |p| {
            problems.push(p)
        }) {
            Some(headers) => Ok(headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
                .collect()),
            None => Err(problems),
        }
    }

    #[test]
    fn names_and_values_are_trimmed_and_lowercased() {
        assert_eq!(
            parsed(&["X-Team:  ml ", "baseten-model-id: model-abc", ""]),
            Ok(vec![
                ("x-team".into(), "ml".into()),
                ("baseten-model-id".into(), "model-abc".into())
            ])
        );
    }

    #[test]
    fn every_bad_entry_is_named_and_no_value_is_echoed() {
        let problems = parsed(&[
            "no-colon",
            "bad name: x",
            "host: elsewhere",
            "Authorization: Bearer abc",
            "baseten-authorization: Api-Key abc",
            "x-copy: prefix-sk-secret-123",
            "x-a: 1",
            "X-A: 2",
            "x-newline: a\u{7f}b",
        ])
        .expect_err("refused");
        assert_eq!(problems.len(), 8, "{problems:#?}");
        for problem in &problems {
            assert!(!problem.contains("sk-secret-123"), "{problem}");
            assert!(!problem.contains("Bearer abc"), "{problem}");
        }
        assert!(problems[2].contains("host is managed"), "{}", problems[2]);
        assert!(problems[3].contains("credentials"), "{}", problems[3]);
        assert!(problems[4].contains("credentials"), "{}", problems[4]);
        assert!(
            problems[5].contains("contains the API key"),
            "{}",
            problems[5]
        );
        assert!(problems[6].contains("set twice"), "{}", problems[6]);
    }
}

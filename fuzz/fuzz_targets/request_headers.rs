//! Header rewriting and request-target handling on arbitrary requests.
//!
//! An `http::Request` is built from fuzzed parts (method, URI bytes, header
//! names and values, written as text lines: see [`Input`], with
//! dictionaries of the names and values keyrelay treats specially) and run
//! through every pure function of the data path:
//! `headers::prepare_request` (with `remove_hop_by_hop` and `restore_upgrade`),
//! `headers::requested_upgrade`, `headers::has_unsupported_transfer_coding`,
//! `guard::host::HostPolicy::allows` and `allows_at`,
//! `guard::paths::PathPolicy` (`parse`, `check`, `names`, `rules_outside`),
//! `baseten::map_path`, and the route table's `find` + `upstream_uri`. Each
//! result is checked against an independent statement of what it must be:
//!
//! - the credential header is present exactly once, with the configured value;
//! - no hop-by-hop header survives (`TE` only as exactly `trailers`), nor
//!   `Trailer` (request trailers are dropped, so none are announced), nor any
//!   header the client's `Connection` named, nor a stripped one;
//! - every other header survives unchanged, values in order, `Host` included
//!   (`proxy::set_version` alone replaces or removes it, once the upstream's
//!   HTTP version is known);
//! - an upgrade is reported only for `Upgrade: websocket` named by `Connection`;
//! - a transfer coding is supported only when every coding named is `chunked`;
//! - an accepted `Host` is a loopback name or a configured one (or, on the
//!   admin port, the listener's own IP literal), with at most a numeric port
//!   and a trailing dot;
//! - a rule list parses when every rule is `[METHOD] /path[*]` with a path no
//!   server could read as another; with rules, a path servers could read
//!   differently (dot segments, encoded or not, `\`, `;`, `%25`, malformed
//!   or non-UTF-8 escapes, control characters) is `Ambiguous` before any
//!   rule is tried, else `Allowed` exactly when a rule matches; `names`
//!   (which TRACE and TRACK need) only when a rule naming the method matches;
//! - Baseten paths are put under the stage as the table in baseten.rs says,
//!   staged paths refused on a regional host;
//! - the upstream URI has the route's scheme and authority, and the client's
//!   path and query after the base path, unchanged but for the route's
//!   documented mapping (prefix stripped, Baseten stage).
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::Scheme;
use http::{Method, Request, Uri};
use keyrelay::config::baseten::{self, Stage, StagedPathOnRegionalHost};
use keyrelay::config::{self, OverrideValue, RouteConfig, Sources};
use keyrelay::guard::host::HostPolicy;
use keyrelay::guard::paths::{PathPolicy, PathVerdict};
use keyrelay::proxy::headers;
use keyrelay::proxy::route_table::RouteTable;
use libfuzzer_sys::fuzz_target;

/// Names keyrelay handles specially (`@N` in a header line picks one).
const NAMES: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "host",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "baseten-authorization",
    "content-length",
    "x-request-id",
    "x-other",
    "trailer",
];

/// Values worth combining with those names (`@N` picks one).
const VALUES: &[&str] = &[
    "trailers",
    "gzip, trailers",
    "websocket",
    "WebSocket",
    "upgrade",
    "keep-alive, Upgrade",
    "close",
    "authorization",
    "x-other, te",
    "te",
    "host",
    "localhost",
    "127.0.0.1:8080",
    "[::1]:1",
    "chunked",
    "",
    "trailer, host",
    "chunked, gzip",
    "10.1.2.3:9901",
    "[fd00::7]",
];

/// Removed by `prepare_request` whatever `Connection` says (`TE` comes
/// back as `trailers` when the client asked for them).
const ALWAYS_REMOVED: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "trailer",
];

/// The hop-by-hop headers `remove_hop_by_hop` takes out (`Trailer` is left
/// to `prepare_request`: responses keep it).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// The listener addresses `local N` picks from (`allows_at`).
const LOCAL_IPS: [Option<&str>; 5] = [
    None,
    Some("10.1.2.3"),
    Some("::ffff:10.1.2.3"),
    Some("fd00::7"),
    Some("127.0.0.1"),
];

/// One fuzz input, as text a person can write (and seeds are written in):
///
/// ```text
/// METHOD TARGET
/// Name: value            (header lines, any bytes, until an empty line)
///
/// cred N                 (which credential setup, 0-2)
/// stage env|deploy|dev|regional NAME
/// host NAME              (an extra accepted host)
/// local N                (the listener's IP for allows_at, 0-4; 0: none)
/// allow RULE             (a path policy rule)
/// ```
///
/// A header line `@N: value` / `Name: @N` picks name / value N of the
/// dictionaries above, so the special ones are easy to reach.
#[derive(Debug, Default)]
struct Input {
    method: Vec<u8>,
    uri: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    credential: u8,
    extra_hosts: Vec<Vec<u8>>,
    local: u8,
    rules: Vec<String>,
    stage: u8,
    stage_name: Vec<u8>,
}

impl Input {
    fn parse(data: &[u8]) -> Self {
        let mut input = Self::default();
        let mut lines = data
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = lines.next().unwrap_or_default();
        match first.iter().position(|&b| b == b' ') {
            Some(space) => {
                input.method = first[..space].to_vec();
                input.uri = first[space + 1..].to_vec();
            }
            None => input.uri = first.to_vec(),
        }
        for line in lines.by_ref() {
            if line.is_empty() {
                break;
            }
            let (name, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => (&line[..colon], &line[colon + 1..]),
                None => (line, &b""[..]),
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            input.headers.push((pick(name, NAMES), pick(value, VALUES)));
        }
        for line in lines {
            let text = String::from_utf8_lossy(line);
            let (word, rest) = text.split_once(' ').unwrap_or((&text, ""));
            match word {
                "cred" => input.credential = rest.bytes().next().unwrap_or(b'0'),
                "stage" => {
                    let (kind, name) = rest.split_once(' ').unwrap_or((rest, ""));
                    input.stage = match kind {
                        "deploy" => 1,
                        "dev" => 2,
                        "regional" => 3,
                        _ => 0,
                    };
                    input.stage_name = name.as_bytes().to_vec();
                }
                "host" => input.extra_hosts.push(rest.as_bytes().to_vec()),
                "local" => input.local = rest.bytes().next().unwrap_or(b'0'),
                "allow" => input.rules.push(rest.to_owned()),
                _ => {}
            }
        }
        input
    }
}

/// `@N` picks entry N of `dictionary`; anything else is taken as it is.
fn pick(bytes: &[u8], dictionary: &[&str]) -> Vec<u8> {
    let index = bytes
        .strip_prefix(b"@")
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse::<usize>().ok());
    match index {
        Some(n) => dictionary[n % dictionary.len()].as_bytes().to_vec(),
        None => bytes.to_vec(),
    }
}

/// The credential setups the config allows: (header, value, strip list).
fn credential(choice: u8) -> (HeaderName, HeaderValue, Vec<HeaderName>) {
    let defaults = || {
        vec![
            HeaderName::from_static("authorization"),
            HeaderName::from_static("proxy-authorization"),
            HeaderName::from_static("x-api-key"),
        ]
    };
    let mut value = HeaderValue::from_static("Api-Key fuzz-secret-5f3c");
    value.set_sensitive(true);
    match choice % 3 {
        0 => (HeaderName::from_static("authorization"), value, defaults()),
        1 => {
            let name = HeaderName::from_static("baseten-authorization");
            let mut strip = defaults();
            strip.push(name.clone());
            (name, value, strip)
        }
        _ => {
            let name = HeaderName::from_static("x-api-key");
            (
                name,
                HeaderValue::from_static("fuzz-secret-5f3c"),
                vec![HeaderName::from_static("x-api-key")],
            )
        }
    }
}

/// True when the comma list `value` names `token`, case-insensitively.
fn lists(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|text| {
        text.split(',')
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    })
}

fn check_prepare_request(original: &HeaderMap, choice: u8) {
    let (name, value, strip) = credential(choice);
    let mut headers = original.clone();
    headers::prepare_request(&mut headers, &strip, Some((&name, value.clone())));

    let injected: Vec<&HeaderValue> = headers.get_all(&name).iter().collect();
    assert_eq!(injected, [&value], "credential header present exactly once");
    for gone in ALWAYS_REMOVED {
        if gone == "te" {
            continue;
        }
        assert!(!headers.contains_key(gone), "{gone} survived: {headers:?}");
    }
    let te: Vec<&HeaderValue> = headers.get_all(TE).iter().collect();
    let wanted_trailers = original.get_all(TE).iter().any(|v| lists(v, "trailers"));
    if wanted_trailers {
        assert_eq!(te, [&HeaderValue::from_static("trailers")]);
    } else {
        assert!(te.is_empty(), "TE without trailers survived: {te:?}");
    }

    // Names the client's Connection header listed are gone (TE comes back as
    // `trailers` on purpose; the credential is injected after the removal).
    let named: Vec<HeaderName> = original
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for gone in &named {
        if gone == TE || *gone == name {
            continue;
        }
        assert!(
            !headers.contains_key(gone),
            "{gone} named by Connection survived"
        );
    }
    for stripped in &strip {
        if *stripped != name {
            assert!(!headers.contains_key(stripped), "{stripped} not stripped");
        }
    }

    // Everything else is end to end, Host included: same values, same order.
    for key in original.keys() {
        let removed = ALWAYS_REMOVED.contains(&key.as_str())
            || named.contains(key)
            || strip.contains(key)
            || *key == name;
        if removed {
            continue;
        }
        let before: Vec<&HeaderValue> = original.get_all(key).iter().collect();
        let after: Vec<&HeaderValue> = headers.get_all(key).iter().collect();
        assert_eq!(before, after, "end-to-end header {key} changed");
    }
    for key in headers.keys() {
        assert!(
            original.contains_key(key) || *key == name || *key == TE,
            "{key} appeared from nowhere"
        );
    }

    // An upgrade keyrelay forwards on purpose: handshake back, key still once.
    if let Some(protocol) = headers::requested_upgrade(original) {
        headers::restore_upgrade(&mut headers, protocol.clone());
        assert_eq!(
            headers.get(CONNECTION),
            Some(&HeaderValue::from_static("upgrade"))
        );
        assert_eq!(headers.get(UPGRADE), Some(&protocol));
        assert_eq!(headers.get_all(&name).iter().count(), 1);
    }

    // remove_hop_by_hop alone, on the original: idempotent, hop-by-hop-free,
    // and nothing else touched (Trailer is end to end on a response).
    let mut once = original.clone();
    headers::remove_hop_by_hop(&mut once);
    let mut twice = once.clone();
    headers::remove_hop_by_hop(&mut twice);
    assert_eq!(once, twice, "remove_hop_by_hop is idempotent");
    for hop in HOP_BY_HOP {
        if hop != "te" {
            assert!(!once.contains_key(hop));
        }
    }
    for key in original.keys() {
        if !HOP_BY_HOP.contains(&key.as_str()) && !named.contains(key) {
            let before: Vec<&HeaderValue> = original.get_all(key).iter().collect();
            let after: Vec<&HeaderValue> = once.get_all(key).iter().collect();
            assert_eq!(before, after, "remove_hop_by_hop changed {key}");
        }
    }
}

fn check_upgrade(headers: &HeaderMap) {
    let expected = headers
        .get(UPGRADE)
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .filter(|_| {
            headers
                .get_all(CONNECTION)
                .iter()
                .any(|v| lists(v, "upgrade"))
        });
    assert_eq!(headers::requested_upgrade(headers).as_ref(), expected);
}

/// The documented rule: hyper decodes only `chunked`, so a request naming
/// any other coding (or one that is not text) is refused.
fn check_transfer_coding(headers: &HeaderMap) {
    let only_chunked = headers.get_all(TRANSFER_ENCODING).iter().all(|value| {
        value.to_str().is_ok_and(|text| {
            text.split(',')
                .all(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
        })
    });
    assert_eq!(
        headers::has_unsupported_transfer_coding(headers),
        !only_chunked,
        "transfer codings {:?}",
        headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .collect::<Vec<_>>()
    );
}

/// The documented Host rule: a loopback name or a configured one (or, on
/// the admin port, the literal IP the connection arrived on, in either of
/// its IPv4 and IPv4-mapped IPv6 forms), any case, one optional trailing
/// dot, an optional numeric port; nothing else.
fn host_ok(host: &str, extra: &[String], local: Option<IpAddr>) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = if host.starts_with('[') {
        let Some(end) = host.find(']') else {
            return false;
        };
        let rest = &host[end + 1..];
        if !(rest.is_empty()
            || rest
                .strip_prefix(':')
                .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())))
        {
            return false;
        }
        host[..=end].to_owned()
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                name.to_owned()
            }
            Some(_) => return false,
            None => host.clone(),
        }
    };
    let name = name.strip_suffix('.').unwrap_or(&name);
    if name.is_empty() {
        return false;
    }
    let is_local = local.is_some_and(|local| {
        let literal = name
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(name);
        literal.parse::<IpAddr>().is_ok_and(|ip| {
            let canonical = |ip: IpAddr| match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            canonical(ip) == canonical(local)
        })
    });
    is_local
        || ["localhost", "127.0.0.1", "[::1]"].contains(&name)
        || extra.iter().any(|e| {
            let e = e.to_ascii_lowercase();
            e.strip_suffix('.').unwrap_or(&e) == name
        })
}

fn check_host(uri: &Uri, headers: &HeaderMap, extra_raw: &[Vec<u8>], local: u8) {
    let extra: Vec<String> = extra_raw
        .iter()
        .map(|raw| {
            raw.iter()
                .filter(|b| b.is_ascii_alphanumeric() || **b == b'.' || **b == b'-')
                .map(|b| char::from(*b))
                .collect::<String>()
        })
        .filter(|name| HostPolicy::is_valid_name(name))
        .collect();
    let local: Option<IpAddr> =
        LOCAL_IPS[usize::from(local) % LOCAL_IPS.len()].map(|ip| ip.parse().expect("a listed IP"));
    let policy = HostPolicy::new(&extra);

    let mut named = Vec::new();
    let mut readable = true;
    for value in headers.get_all(http::header::HOST) {
        match value.to_str() {
            Ok(text) => named.push(text.to_owned()),
            Err(_) => readable = false,
        }
    }
    if let Some(authority) = uri.authority() {
        named.push(authority.as_str().to_owned());
    }
    let expected =
        |local| readable && !named.is_empty() && named.iter().all(|h| host_ok(h, &extra, local));
    assert_eq!(
        policy.allows(uri, headers),
        expected(None),
        "HostPolicy::allows disagrees with the documented rule for {named:?} (extra {extra:?})"
    );
    assert_eq!(
        policy.allows_at(uri, headers, local),
        expected(local),
        "HostPolicy::allows_at disagrees with the documented rule for {named:?} \
         (extra {extra:?}, local {local:?})"
    );
}

/// The documented ambiguity rule: true when some server could read `path`
/// as another path. Raw `\` or `;`; an escape that is not `%` and two hex
/// digits; or, once every escape is decoded (`%2F` becoming a separator too),
/// a `.` or `..` segment, a `%` (decoded again it is another escape), `\`,
/// `;`, a control character, or bytes that are not UTF-8.
fn ambiguous(path: &str) -> bool {
    let raw = path.as_bytes();
    if raw.contains(&b'\\') || raw.contains(&b';') {
        return true;
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'%' {
            decoded.push(raw[i]);
            i += 1;
            continue;
        }
        let hex = raw
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let Some(hex) = hex else {
            return true;
        };
        let text = std::str::from_utf8(hex).expect("hex digits are ASCII");
        decoded.push(u8::from_str_radix(text, 16).expect("two hex digits"));
        i += 3;
    }
    std::str::from_utf8(&decoded).is_err()
        || decoded
            .iter()
            .any(|&b| matches!(b, b'%' | b'\\' | b';') || b.is_ascii_control())
        || decoded
            .split(|&b| b == b'/')
            .any(|segment| segment == b"." || segment == b"..")
}

/// One rule as the README states it: `[METHOD] /path`, a trailing `*`
/// making the path a prefix.
struct ModelRule {
    method: Option<Method>,
    path: String,
    prefix: bool,
}

impl ModelRule {
    fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

/// The rules, or `None` when some rule is a config mistake: a method that
/// is not one, a path not starting with `/`, or a path no request could
/// match because requests with such paths are refused as ambiguous.
fn model_rules(rules: &[String]) -> Option<Vec<ModelRule>> {
    rules
        .iter()
        .map(|rule| {
            let rule = rule.trim();
            let (method, path) = match rule.split_once(char::is_whitespace) {
                Some((m, p)) => (
                    Some(Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok()?),
                    p.trim(),
                ),
                None => (None, rule),
            };
            if !path.starts_with('/') {
                return None;
            }
            let (path, prefix) = match path.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (path, false),
            };
            if ambiguous(path) {
                return None;
            }
            Some(ModelRule {
                method,
                path: path.to_owned(),
                prefix,
            })
        })
        .collect()
}

fn check_paths(method: &Method, path: &str, rules: &[String]) {
    let parsed = PathPolicy::parse(rules);
    let model = model_rules(rules);
    assert_eq!(
        parsed.is_ok(),
        model.is_some(),
        "PathPolicy::parse({rules:?}) = {parsed:?}"
    );
    let (Ok(policy), Some(model)) = (parsed, model) else {
        return;
    };

    let verdict = policy.check(method, path);
    let expected_ambiguous = !model.is_empty() && ambiguous(path);
    let matched = model.is_empty()
        || model
            .iter()
            .any(|rule| rule.method.as_ref().is_none_or(|m| m == method) && rule.matches(path));
    match verdict {
        PathVerdict::Ambiguous(why) => {
            assert!(expected_ambiguous, "{path:?} called ambiguous ({why})");
            assert!(!why.is_empty());
        }
        PathVerdict::Allowed => {
            assert!(
                !expected_ambiguous,
                "ambiguous {path:?} allowed by {rules:?}"
            );
            assert!(
                matched,
                "{method} {path:?} allowed, matching no rule of {rules:?}"
            );
        }
        PathVerdict::NotAllowed => {
            assert!(!expected_ambiguous, "ambiguous {path:?} not called so");
            assert!(
                !matched,
                "{method} {path:?} refused, though a rule of {rules:?} matches"
            );
        }
    }
    assert_eq!(policy.allows(method, path), verdict == PathVerdict::Allowed);

    // Methods refused unless named (TRACE, TRACK) pass only by a rule that
    // names the very method and matches; never with no rules at all.
    let named = !ambiguous(path)
        && model
            .iter()
            .any(|rule| rule.method.as_ref() == Some(method) && rule.matches(path));
    assert_eq!(
        policy.names(method, path),
        named,
        "names({method}, {path:?}) with {rules:?}"
    );

    // A rule is outside a route prefix when no path the route serves
    // (the prefix itself, or below it) can match it.
    for prefix in ["/", "/llama", "/keep", "/v1/chat"] {
        let under = format!("{prefix}/");
        let outside: Vec<String> = model
            .iter()
            .filter(|rule| {
                let inside = prefix == "/"
                    || if rule.prefix {
                        prefix.starts_with(&rule.path) || rule.path.starts_with(&under)
                    } else {
                        rule.path == prefix || rule.path.starts_with(&under)
                    };
                !inside
            })
            .map(|rule| {
                // Written back as `METHOD /path*`, the method in capitals.
                let method = rule.method.as_ref().map(|m| format!("{m} "));
                let star = if rule.prefix { "*" } else { "" };
                format!("{}{}{star}", method.unwrap_or_default(), rule.path)
            })
            .collect();
        assert_eq!(
            policy.rules_outside(prefix),
            outside,
            "rules_outside({prefix:?}) with {rules:?}"
        );
    }
}

/// The table in baseten.rs: staged paths unchanged (refused on a regional
/// host), `/async_request/...` unchanged, everything else under the stage,
/// with `/sync` before OpenAI-style `/v1` paths.
fn check_map_path(stage: &Stage, stage_prefix: &str, path_and_query: &str) {
    let staged = [
        "/environments/",
        "/deployment/",
        "/development/",
        "/production/",
    ]
    .iter()
    .any(|prefix| path_and_query.starts_with(prefix));
    let expected = if staged {
        if *stage == Stage::Regional {
            Err(StagedPathOnRegionalHost)
        } else {
            Ok(path_and_query.to_owned())
        }
    } else if path_and_query.starts_with("/async_request/") {
        Ok(path_and_query.to_owned())
    } else {
        let path = path_and_query.split('?').next().unwrap_or_default();
        let sync = if path == "/v1" || path.starts_with("/v1/") {
            "/sync"
        } else {
            ""
        };
        Ok(format!("{stage_prefix}{sync}{path_and_query}"))
    };
    assert_eq!(
        baseten::map_path(stage, path_and_query),
        expected,
        "map_path({stage:?}, {path_and_query:?})"
    );
}

/// Routes built once through the real config loader: a default route with
/// a base path, a model shortcut under `/llama` (stripped, staged), a
/// regional model under `/reg` (stripped, bare paths), and a plain upstream
/// under `/keep` that keeps its prefix.
fn routes() -> &'static (RouteTable, Vec<RouteConfig>) {
    static ROUTES: OnceLock<(RouteTable, Vec<RouteConfig>)> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let file =
            std::env::temp_dir().join(format!("keyrelay-fuzz-routes-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            r#"
upstream = "https://default.example.test/base/"
[[routes]]
name = "llama"
prefix = "/llama"
model = "abc123"
key_env = "BASETEN_API_KEY"
[[routes]]
name = "reg"
prefix = "/reg"
model = "abc123"
environment = "staging"
regional = true
key_env = "BASETEN_API_KEY"
[[routes]]
name = "keep"
prefix = "/keep"
upstream = "http://127.0.0.1:8081"
strip_prefix = false
key_env = "BASETEN_API_KEY"
auth_header = "baseten-authorization"
"#,
        )
        .expect("write routes file");
        let mut sources = Sources {
            file: Some(file.clone()),
            env: HashMap::from([("BASETEN_API_KEY".to_owned(), "fuzz-secret-5f3c".to_owned())]),
            ..Sources::default()
        };
        sources.set("listen", OverrideValue::Text("127.0.0.1:0".to_owned()));
        let config = config::load(&sources);
        let _ = std::fs::remove_file(&file);
        let config = config.expect("fuzz route config is valid");
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        for name in ["llama", "reg", "keep"] {
            assert!(names.contains(&name), "route {name} missing: {names:?}");
        }
        assert_eq!(
            config.routes.len(),
            4,
            "three routes and the default: {names:?}"
        );
        // The metrics registry by inference: the target names no ops module.
        let table = RouteTable::new(&config.routes, &Arc::default());
        // The HTTP/1.1 Host each route sends: the authority, default port left out.
        for route in table.iter() {
            let authority = &route.upstream.authority;
            let default = if route.upstream.scheme == Scheme::HTTPS {
                443
            } else {
                80
            };
            let expected = match authority.port_u16() {
                Some(port) if port != default => format!("{}:{port}", authority.host()),
                _ => authority.host().to_owned(),
            };
            assert_eq!(
                route.host.as_ref().map(|h| h.to_str().expect("text")),
                Some(expected.as_str()),
                "Host of route {}",
                route.name
            );
        }
        (table, config.routes.clone())
    })
}

fn check_routes(uri: &Uri) {
    let (table, configs) = routes();
    let path = uri.path();
    // Longest prefix first, on segment boundaries; "/" catches the rest.
    let serves = |prefix: &str| {
        prefix == "/"
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let expected = configs
        .iter()
        .filter(|c| serves(&c.prefix))
        .max_by_key(|c| c.prefix.len())
        .map(|c| c.name.as_str());
    let route = table.find(path);
    assert_eq!(
        route.map(|r| r.name.as_str()),
        expected,
        "route for {path:?}"
    );
    let Some(route) = route else {
        return;
    };
    let config = configs
        .iter()
        .find(|c| c.name == route.name)
        .expect("route has a config");
    let upstream = route.upstream_uri(uri);

    let local = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if !local.starts_with('/') {
        assert!(
            upstream.is_err(),
            "{uri} (target {local:?}) -> {upstream:?}"
        );
        return;
    }
    // strip_prefix: the route's prefix comes off, leaving at least "/".
    let rest = if config.strip_prefix && config.prefix != "/" {
        let rest = local
            .strip_prefix(config.prefix.as_str())
            .expect("a route serves paths under its prefix");
        if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        }
    } else {
        local.to_owned()
    };
    let mapped = match &config.stage {
        Some(stage) => baseten::map_path(stage, &rest),
        None => Ok(rest),
    };
    let Ok(mapped) = mapped else {
        assert!(
            upstream.is_err(),
            "a staged path to a regional host was forwarded: {uri} -> {upstream:?}"
        );
        return;
    };
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(err) => panic!("{uri} refused: {err:?}"),
    };
    assert_eq!(
        upstream.scheme(),
        Some(&config.upstream.scheme),
        "{uri} -> {upstream}"
    );
    assert_eq!(
        upstream.authority(),
        Some(&config.upstream.authority),
        "{uri} -> {upstream}"
    );
    let sent = upstream.path_and_query().map_or("/", |pq| pq.as_str());
    assert_eq!(
        sent,
        format!("{}{mapped}", config.upstream.base_path),
        "{uri} -> {upstream}: path and query forwarded byte for byte"
    );
    assert_eq!(
        upstream.query(),
        uri.query(),
        "query forwarded byte for byte"
    );
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let method = Method::from_bytes(&input.method).unwrap_or(Method::GET);
    let uri = Uri::try_from(input.uri.as_slice()).unwrap_or_else(|_| Uri::from_static("/"));
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in &input.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            builder = builder.header(name, value);
        }
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();

    check_prepare_request(&parts.headers, input.credential);
    check_upgrade(&parts.headers);
    check_transfer_coding(&parts.headers);
    check_host(&parts.uri, &parts.headers, &input.extra_hosts, input.local);
    check_paths(&parts.method, parts.uri.path(), &input.rules);

    let name: String = input
        .stage_name
        .iter()
        .filter(|b| b.is_ascii_alphanumeric() || **b == b'-' || **b == b'_')
        .map(|b| char::from(*b))
        .collect();
    let name = if baseten::valid_name(&name) {
        name
    } else {
        "production".to_owned()
    };
    let (stage, stage_prefix) = match input.stage % 4 {
        0 => (
            Stage::Environment(name.clone()),
            format!("/environments/{name}"),
        ),
        1 => (
            Stage::Deployment(name.clone()),
            format!("/deployment/{name}"),
        ),
        2 => (Stage::Development, "/development".to_owned()),
        _ => (Stage::Regional, String::new()),
    };
    if let Some(pq) = parts.uri.path_and_query() {
        check_map_path(&stage, &stage_prefix, pq.as_str());
    }
    check_routes(&parts.uri);
});

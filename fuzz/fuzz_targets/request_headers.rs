//! Header rewriting and request-target handling on arbitrary requests.
//!
//! An `http::Request` is built from fuzzed parts (method, URI bytes, header
//! names and values, written as text lines: see [`Input`], with
//! dictionaries of the names and values keyrelay treats specially) and run through every pure function of the data path:
//! `headers::prepare_request` (with `remove_hop_by_hop` and `restore_upgrade`),
//! `headers::requested_upgrade`, `guard::host::HostPolicy::allows`,
//! `guard::paths::PathPolicy::allows`, `baseten::map_path`, and the route
//! table's `find` + `upstream_uri`. Each result is checked against an
//! independent statement of what it must be:
//!
//! - the credential header is present exactly once, with the configured value;
//! - no hop-by-hop header survives (`TE` only as exactly `trailers`), nor any
//!   header the client's `Connection` named, nor `Host`, nor a stripped one;
//! - every other header survives unchanged, values in order;
//! - an upgrade is reported only for `Upgrade: websocket` named by `Connection`;
//! - an accepted `Host` is a loopback name or a configured one, with at most a
//!   numeric port and a trailing dot;
//! - a path the path policy allows matches a rule and has no dot segments,
//!   encoded or not;
//! - the upstream URI always has the route's scheme and authority, and the
//!   client's path and query after the base path, unchanged but for the
//!   route's documented mapping.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TE, UPGRADE};
use http::{Method, Request, Uri};
use keyrelay::config::baseten::{self, Stage};
use keyrelay::config::{self, OverrideValue, RouteConfig, Sources};
use keyrelay::guard::host::HostPolicy;
use keyrelay::guard::paths::PathPolicy;
use keyrelay::proxy::headers;
use keyrelay::telemetry::metrics::Metrics;
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
];

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// One fuzz input, as text a person can write (and seeds are written in):
///
/// ```text
/// METHOD TARGET
/// Name: value            (header lines, any bytes, until an empty line)
///
/// cred N                 (which credential setup, 0-2)
/// stage env|deploy|dev NAME
/// host NAME              (an extra accepted host)
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
                        _ => 0,
                    };
                    input.stage_name = name.as_bytes().to_vec();
                }
                "host" => input.extra_hosts.push(rest.as_bytes().to_vec()),
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
    headers::prepare_request(&mut headers, &strip, &name, &value);

    let injected: Vec<&HeaderValue> = headers.get_all(&name).iter().collect();
    assert_eq!(injected, [&value], "credential header present exactly once");
    assert!(!headers.contains_key(HOST), "Host removed");
    for hop in HOP_BY_HOP {
        if hop == "te" {
            continue;
        }
        assert!(!headers.contains_key(hop), "{hop} survived: {headers:?}");
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

    // Everything else is end to end: same values, same order.
    for key in original.keys() {
        let removed = key == HOST
            || HOP_BY_HOP.contains(&key.as_str())
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

    // remove_hop_by_hop alone, on the original: idempotent, hop-by-hop-free.
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

/// The documented Host rule: a loopback name or a configured one, any case,
/// one optional trailing dot, an optional numeric port; nothing else.
fn host_ok(host: &str, extra: &[String]) -> bool {
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
    !name.is_empty()
        && (["localhost", "127.0.0.1", "[::1]"].contains(&name)
            || extra.iter().any(|e| {
                let e = e.to_ascii_lowercase();
                e.strip_suffix('.').unwrap_or(&e) == name
            }))
}

fn check_host(uri: &Uri, headers: &HeaderMap, extra_raw: &[Vec<u8>]) {
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
    let policy = HostPolicy::new(&extra);
    let allowed = policy.allows(uri, headers);

    let mut named = Vec::new();
    let mut readable = true;
    for value in headers.get_all(HOST) {
        match value.to_str() {
            Ok(text) => named.push(text.to_owned()),
            Err(_) => readable = false,
        }
    }
    if let Some(authority) = uri.authority() {
        named.push(authority.as_str().to_owned());
    }
    let expected = readable && !named.is_empty() && named.iter().all(|h| host_ok(h, &extra));
    assert_eq!(
        allowed, expected,
        "HostPolicy::allows disagrees with the documented rule for {named:?} (extra {extra:?})"
    );
}

/// Percent-decodes every `%XX` once.
fn decode(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn check_paths(method: &Method, path: &str, rules: &[String]) {
    let Ok(policy) = PathPolicy::parse(rules) else {
        return;
    };
    if !policy.allows(method, path) || rules.is_empty() {
        return;
    }
    let decoded = decode(path);
    assert!(
        !decoded.contains(&b'\\'),
        "allowed a path with a backslash: {path:?}"
    );
    assert!(
        !decoded
            .split(|&b| b == b'/')
            .any(|segment| segment == b"." || segment == b".."),
        "allowed a path with dot segments: {path:?}"
    );
    let matched = rules.iter().any(|rule| {
        let rule = rule.trim();
        let (rule_method, rule_path) = match rule.split_once(char::is_whitespace) {
            Some((m, p)) => (Some(m.to_ascii_uppercase()), p.trim()),
            None => (None, rule),
        };
        let method_ok = rule_method.is_none_or(|m| m == method.as_str());
        method_ok
            && match rule_path.strip_suffix('*') {
                Some(stem) => path.starts_with(stem),
                None => path == rule_path,
            }
    });
    assert!(
        matched,
        "allowed {method} {path:?} matching no rule of {rules:?}"
    );
}

fn check_map_path(stage: &Stage, path_and_query: &str) {
    let mapped = baseten::map_path(stage, path_and_query);
    assert!(
        mapped.ends_with(path_and_query),
        "{mapped:?} lost the client's path"
    );
    let staged = [
        "/environments/",
        "/deployment/",
        "/development/",
        "/production/",
        "/async_request/",
    ]
    .iter()
    .any(|prefix| path_and_query.starts_with(prefix));
    if staged {
        assert_eq!(mapped, path_and_query);
    } else {
        assert!(
            mapped.starts_with(&stage.to_string()),
            "{mapped:?} not under {stage}"
        );
    }
}

/// Routes built once through the real config loader: a default route with
/// a base path, a model shortcut under `/llama` (stripped, staged), and a
/// plain upstream under `/keep` that keeps its prefix.
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
name = "keep"
prefix = "/keep"
upstream = "http://keep.example.test:8081"
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
        let config = config::load(&sources).expect("fuzz route config is valid");
        let _ = std::fs::remove_file(&file);
        let no_http2_pools = config.routes.iter().map(|_| None).collect();
        let table = RouteTable::new(&config.routes, &Arc::new(Metrics::new()), no_http2_pools);
        (table, config.routes.clone())
    })
}

fn check_routes(uri: &Uri) {
    let (table, configs) = routes();
    let Some(route) = table.find(uri.path()) else {
        return;
    };
    let config = configs
        .iter()
        .find(|c| c.name == route.name)
        .expect("route has a config");
    let Ok(upstream) = route.upstream_uri(uri) else {
        return;
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
    let local = uri.path_and_query().map_or("/", |pq| pq.as_str());
    assert!(
        sent.starts_with(&config.upstream.base_path),
        "{uri} -> {upstream}"
    );
    if config.stage.is_none() && !(config.strip_prefix && config.prefix != "/") {
        assert_eq!(
            sent,
            format!("{}{local}", config.upstream.base_path),
            "path and query forwarded byte for byte"
        );
    }
    if let Some(query) = uri.query() {
        assert_eq!(
            upstream.query(),
            Some(query),
            "query forwarded byte for byte"
        );
    }
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
    check_host(&parts.uri, &parts.headers, &input.extra_hosts);
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
    let stage = match input.stage % 3 {
        0 => Stage::Environment(name),
        1 => Stage::Deployment(name),
        _ => Stage::Development,
    };
    if let Some(pq) = parts.uri.path_and_query() {
        check_map_path(&stage, pq.as_str());
    }
    check_routes(&parts.uri);
});

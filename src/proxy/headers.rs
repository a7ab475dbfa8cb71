//! Header hygiene: hop-by-hop removal and credential replacement.
//!
//! Pure functions over `HeaderMap`, used on both directions of the proxy.
//! Framing headers (`Transfer-Encoding`) are hop-by-hop too: hyper re-frames
//! each hop from the body itself, so a chunked upstream response stays chunked
//! and a `Content-Length` response keeps its (end-to-end) length.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE,
    PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// Hop-by-hop headers of RFC 9110 section 7.6.1, plus the legacy ones proxies still see.
/// Pre-parsed, so removing them costs no parsing per request.
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
];

/// Removes hop-by-hop headers and every header the `Connection` header names.
///
/// `TE: trailers` survives (as exactly that) because gRPC servers require it to
/// know the client understands trailers; every other `TE` value is dropped.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one scan over the names (no hashing) then
    // spares the hashed lookups below on every request and response.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let wants_trailers = headers
        .get_all(TE)
        .iter()
        .any(|value| lists_token(value, "trailers"));

    // Collect first: the names live inside `headers`, which we are about to edit.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }

    if wants_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Prepares a client's request headers for the upstream.
///
/// Drops `Trailer`, hop-by-hop headers and every client credential in
/// `strip`, then sets the `credential` header (name and value), if any (a
/// route with `auth_query` puts its key in the query instead). Order matters:
/// injection comes last so that nothing a client sends, not even
/// `Connection: authorization`, can remove or replace the key.
pub fn prepare_request(
    headers: &mut HeaderMap,
    strip: &[HeaderName],
    credential: Option<(&HeaderName, HeaderValue)>,
) {
    // `Host` is left alone: `set_version` in proxy/mod.rs replaces or
    // removes it once the upstream's HTTP version is known, and nowhere else.
    // Request trailers are dropped (request_body.rs), so none are announced.
    headers.remove(TRAILER);
    remove_hop_by_hop(headers);
    // As above: look for client credentials once before removing any.
    if headers.keys().any(|name| strip.contains(name)) {
        for name in strip {
            headers.remove(name);
        }
    }
    if let Some((name, value)) = credential {
        headers.insert(name.clone(), value);
    }
}

/// The WebSocket upgrade an HTTP/1.1 request asks for (an `Upgrade:
/// websocket` header that `Connection` names). Other protocols (`h2c`, ...)
/// are not forwarded: after a switch keyrelay could no longer check requests.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers
        .get(UPGRADE)
        .filter(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"))?;
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|value| lists_token(value, "upgrade"))
        .then(|| protocol.clone())
}

/// Puts back the handshake headers hop-by-hop removal took out, for an
/// upgrade keyrelay forwards on purpose (WebSockets).
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// True when a request's `Transfer-Encoding` names a coding other than
/// `chunked` (hyper decodes only chunked; the rest would pass through coded).
pub fn has_unsupported_transfer_coding(headers: &HeaderMap) -> bool {
    headers.get_all(TRANSFER_ENCODING).iter().any(|value| {
        value.to_str().map_or(true, |text| {
            text.split(',')
                .any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"))
        })
    })
}

/// Prepares an upstream response's headers for the client.
///
/// Server-Sent Events also gain `X-Accel-Buffering: no` and
/// `Cache-Control: no-cache` (unless the upstream set them), so that a proxy
/// in front of keyrelay (nginx buffers by default) relays events as they come.
pub fn prepare_response(headers: &mut HeaderMap) {
    // hyper decodes a response that has both by its chunked framing; the
    // length is then wrong and must not reach the client (RFC 9112 6.3).
    if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(CONTENT_LENGTH);
    }
    remove_hop_by_hop(headers);
    const EVENT_STREAM: &[u8] = b"text/event-stream";
    let is_event_stream = headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes().trim_ascii_start();
        value.len() >= EVENT_STREAM.len()
            && value[..EVENT_STREAM.len()].eq_ignore_ascii_case(EVENT_STREAM)
    });
    if is_event_stream {
        headers
            .entry(X_ACCEL_BUFFERING)
            .or_insert(HeaderValue::from_static("no"));
        headers
            .entry(CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-cache"));
    }
}

/// nginx's per-response switch for proxy buffering.
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// True when the comma-separated header `value` contains `token` (case-insensitive).
fn lists_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|text| {
        text.split(',')
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{AUTHORIZATION, CONTENT_LENGTH};

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        headers
    }

    #[test]
    fn removes_standard_hop_by_hop_and_connection_named_headers() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-private-hop"),
            ("keep-alive", "timeout=5"),
            ("x-private-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("x-baseten-request-id", "abc"),
            ("content-type", "application/json"),
        ]);
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-baseten-request-id", "content-type"]);
    }

    #[test]
    fn te_trailers_is_kept_alone() {
        let mut headers = map(&[("te", "gzip, trailers")]);
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.get(TE).expect("te"), "trailers");

        let mut headers = map(&[("te", "gzip")]);
        remove_hop_by_hop(&mut headers);
        assert!(headers.get(TE).is_none());
    }

    #[test]
    fn only_chunked_transfer_coding_is_supported() {
        assert!(!has_unsupported_transfer_coding(&map(&[(
            "transfer-encoding",
            "chunked"
        )])));
        assert!(has_unsupported_transfer_coding(&map(&[(
            "transfer-encoding",
            "gzip, chunked"
        )])));
        assert!(!has_unsupported_transfer_coding(&HeaderMap::new()));
    }

    #[test]
    fn content_length_beside_chunked_is_dropped() {
        let mut headers = map(&[("content-length", "3"), ("transfer-encoding", "chunked")]);
        prepare_response(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn content_length_is_end_to_end() {
        let mut headers = map(&[("content-length", "12")]);
        prepare_response(&mut headers);
        assert_eq!(headers.get(CONTENT_LENGTH).expect("kept"), "12");
    }

    #[test]
    fn event_streams_are_marked_unbuffered_unless_the_upstream_said_otherwise() {
        let mut headers = map(&[("content-type", "text/event-stream; charset=utf-8")]);
        prepare_response(&mut headers);
        assert_eq!(headers.get(X_ACCEL_BUFFERING).expect("added"), "no");
        assert_eq!(headers.get(CACHE_CONTROL).expect("added"), "no-cache");

        let mut headers = map(&[
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
        ]);
        prepare_response(&mut headers);
        assert_eq!(headers.get(CACHE_CONTROL).expect("kept"), "no-store");

        let mut headers = map(&[("content-type", "application/octet-stream")]);
        prepare_response(&mut headers);
        assert!(headers.get(X_ACCEL_BUFFERING).is_none());
    }

    #[test]
    fn upgrade_is_recognised_only_when_connection_names_it() {
        let upgrade = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested_upgrade(&upgrade).expect("upgrade"), "websocket");
        assert!(requested_upgrade(&map(&[("upgrade", "websocket")])).is_none());
        assert!(
            requested_upgrade(&map(&[("connection", "upgrade"), ("upgrade", "h2c")])).is_none()
        );

        let mut headers = upgrade.clone();
        remove_hop_by_hop(&mut headers);
        restore_upgrade(&mut headers, HeaderValue::from_static("websocket"));
        assert_eq!(headers.get(CONNECTION).expect("connection"), "upgrade");
        assert_eq!(headers.get(UPGRADE).expect("upgrade"), "websocket");
    }

    #[test]
    fn request_credentials_are_replaced_not_appended() {
        let mut headers = map(&[
            ("authorization", "Bearer placeholder"),
            ("authorization", "Bearer second"),
            ("x-api-key", "anthropic-style"),
            ("proxy-authorization", "Basic Zm9v"),
            ("connection", "authorization"),
        ]);
        let strip = [
            AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("proxy-authorization"),
        ];
        let injected = HeaderValue::from_static("Api-Key real");
        prepare_request(
            &mut headers,
            &strip,
            Some((&AUTHORIZATION, injected.clone())),
        );
        assert_eq!(
            headers.get_all(AUTHORIZATION).iter().collect::<Vec<_>>(),
            [&injected]
        );
        assert_eq!(
            headers.len(),
            1,
            "only the injected header remains: {headers:?}"
        );
    }

    #[test]
    fn custom_credential_header_is_injected() {
        let mut headers = map(&[("authorization", "Bearer placeholder")]);
        let name = HeaderName::from_static("baseten-authorization");
        let value = HeaderValue::from_static("Api-Key real");
        prepare_request(
            &mut headers,
            &[AUTHORIZATION, name.clone()],
            Some((&name, value)),
        );
        assert!(headers.get(AUTHORIZATION).is_none());
        assert_eq!(headers.get(&name).expect("injected"), "Api-Key real");
    }
}

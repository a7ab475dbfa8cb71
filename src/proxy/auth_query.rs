//! `auth_query`: the credential placed in a query parameter of the
//! upstream request (Gemini's `?key=`) instead of a header.
//!
//! The client's own parameters of that name are removed first, as a client's
//! credential header is replaced: whatever the upstream's parser, it finds
//! exactly one, keyrelay's, last. "Of that name" is read the way a lenient
//! server would, so that no spelling slips past: the name percent-decoded
//! (repeatedly), `+` as a space, surrounding spaces trimmed, any case, with
//! or without a `[...]` suffix (`key[]`, `key[0]`) or anything after a NUL
//! (`key%00`), with or without `=`, and
//! with `;` as a separator as well as `&`. The value is percent-encoded:
//! every byte but RFC 3986's unreserved characters.
//!
//! The path is never touched: a `%3F` in it is part of a path segment, not
//! a query.
//!
//! The upstream's answer can echo the URL, key included (a redirect that
//! keeps the query): [`scrub_response`] takes it out of the response
//! headers. Bodies are relayed untouched (nothing on the data path reads
//! them for this).

use std::borrow::Cow;

use http::header::{CONTENT_LOCATION, LOCATION};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::guard::paths::hex_value;
use crate::proxy::error::ClientError;

/// Bytes kept as they are in an encoded value: RFC 3986's unreserved set.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `value` percent-encoded to `out`.
fn encode_into(out: &mut String, value: &[u8]) {
    for &byte in value {
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

/// One round of form decoding: `%XX` to its byte, `+` to a space; a `%`
/// not followed by two hex digits stays.
fn decode_once(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b'%' => match (text.get(at + 1), text.get(at + 2)) {
                (Some(&high), Some(&low)) => match (hex_value(high), hex_value(low)) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        at += 3;
                    }
                    _ => {
                        out.push(b'%');
                        at += 1;
                    }
                },
                _ => {
                    out.push(b'%');
                    at += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    out
}

/// True when the query parameter `piece` (`name=value`, or a bare `name`)
/// names `name`, however it is spelled (see the module's doc).
fn names(piece: &str, name: &str) -> bool {
    let written = piece.split('=').next().unwrap_or_default().as_bytes();
    let mut decoded = written.to_vec();
    // Decoded until nothing changes (bounded): `%256Bey` is `key` to a
    // server that decodes twice.
    for _ in 0..4 {
        let next = decode_once(&decoded);
        if next == decoded {
            break;
        }
        decoded = next;
    }
    // A C-string parser stops at a NUL.
    let base = match decoded.iter().position(|&b| b == b'[' || b == 0) {
        Some(bracket) => &decoded[..bracket],
        None => &decoded[..],
    };
    base.trim_ascii().eq_ignore_ascii_case(name.as_bytes())
}

/// `query` without its parameters named `name`, as written otherwise (each
/// kept parameter with the separator before it); unchanged when it has none.
pub(crate) fn without<'q>(query: &'q str, name: &str) -> Cow<'q, str> {
    let pieces = || {
        let mut separator = None;
        query.split_inclusive(['&', ';']).map(move |piece| {
            let before = separator;
            let (text, after) = match piece.strip_suffix(['&', ';']) {
                Some(text) => (text, piece[text.len()..].chars().next()),
                None => (piece, None),
            };
            separator = after;
            (before, text)
        })
    };
    if !pieces().any(|(_, piece)| names(piece, name)) {
        return Cow::Borrowed(query);
    }
    let mut kept = String::with_capacity(query.len());
    for (separator, piece) in pieces() {
        if piece.is_empty() || names(piece, name) {
            continue;
        }
        if !kept.is_empty() {
            kept.push(separator.unwrap_or('&'));
        }
        kept.push_str(piece);
    }
    Cow::Owned(kept)
}

/// `uri` with the credential `value` in query parameter `name`, last,
/// and every parameter of the client's that names `name` removed.
pub(crate) fn place(uri: Uri, name: &str, value: &[u8]) -> Result<Uri, ClientError> {
    let mut parts = uri.into_parts();
    let (path, query) = match &parts.path_and_query {
        Some(pq) => (pq.path(), pq.query()),
        None => ("/", None),
    };
    let mut target = String::with_capacity(
        path.len() + query.map_or(0, str::len) + name.len() + 2 + value.len() * 3,
    );
    target.push_str(path);
    target.push('?');
    if let Some(query) = query {
        let kept = without(query, name);
        if !kept.is_empty() {
            target.push_str(&kept);
            target.push('&');
        }
    }
    target.push_str(name);
    target.push('=');
    encode_into(&mut target, value);
    parts.path_and_query =
        Some(PathAndQuery::try_from(target).map_err(|_| ClientError::BadRequestTarget)?);
    Uri::from_parts(parts).map_err(|_| ClientError::BadRequestTarget)
}

/// `uri` (a `Location` value) without its query parameters named `name`;
/// `None` when it has none.
fn uri_without(uri: &str, name: &str) -> Option<String> {
    let question = uri.find('?')?;
    let end = uri[question..]
        .find('#')
        .map_or(uri.len(), |at| question + at);
    let kept = match without(&uri[question + 1..end], name) {
        Cow::Borrowed(_) => return None,
        Cow::Owned(kept) => kept,
    };
    let mut clean = String::with_capacity(uri.len());
    clean.push_str(&uri[..question]);
    if !kept.is_empty() {
        clean.push('?');
        clean.push_str(&kept);
    }
    clean.push_str(&uri[end..]);
    Some(clean)
}

/// Keeps the key out of an upstream's response headers: a redirect or
/// `Content-Location` that echoes the request's URL (the query kept, as
/// redirects often keep it) loses the parameter, and any other header
/// holding the key (`value`, as sent or encoded) is removed.
pub(crate) fn scrub_response(headers: &mut HeaderMap, name: &str, value: &[u8]) {
    for header in [LOCATION, CONTENT_LOCATION] {
        let clean = (headers.get(&header))
            .and_then(|uri| uri.to_str().ok())
            .and_then(|uri| uri_without(uri, name))
            .and_then(|clean| HeaderValue::try_from(clean).ok());
        if let Some(clean) = clean {
            headers.insert(header, clean);
        }
    }
    if value.is_empty() {
        return;
    }
    let mut encoded = String::new();
    encode_into(&mut encoded, value);
    let holds =
        |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    let leaking: Vec<HeaderName> = (headers.iter())
        .filter(|(_, v)| holds(v.as_bytes(), value) || holds(v.as_bytes(), encoded.as_bytes()))
        .map(|(name, _)| name.clone())
        .collect();
    for name in leaking {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(target: &str) -> String {
        let uri: Uri = format!("http://up.test{target}").parse().expect("uri");
        let uri = place(uri, "key", b"k 1/+&=%").expect("placed");
        uri.path_and_query().expect("pq").as_str().to_owned()
    }

    #[test]
    fn the_key_goes_last_encoded_and_once() {
        assert_eq!(placed("/v1/m"), "/v1/m?key=k%201%2F%2B%26%3D%25");
        assert_eq!(
            placed("/v1/m?alt=sse"),
            "/v1/m?alt=sse&key=k%201%2F%2B%26%3D%25"
        );
        assert_eq!(placed("/v1/m?"), "/v1/m?key=k%201%2F%2B%26%3D%25");
    }

    #[test]
    fn every_spelling_of_a_clients_key_is_removed() {
        for query in [
            "key=theirs",
            "key",
            "key=",
            "KEY=theirs",
            "Key=a&key=b",
            "%6Bey=theirs",
            "%256Bey=theirs",
            "%6b%65%79=theirs",
            "key[]=theirs",
            "key%5B%5D=theirs",
            "key%00=theirs",
            "key%00x=theirs",
            "key[0]=a&key[1]=b",
            "+key+=theirs",
            "%20key=theirs",
            "key=a=b",
            "&&key=theirs&&",
            ";key=theirs",
        ] {
            assert_eq!(
                placed(&format!("/p?{query}")),
                "/p?key=k%201%2F%2B%26%3D%25",
                "{query}"
            );
        }
        assert_eq!(
            placed("/p?alt=sse;key=theirs&x=1"),
            "/p?alt=sse&x=1&key=k%201%2F%2B%26%3D%25"
        );
        assert_eq!(
            placed("/p?a=1;b=2&key=theirs;c=3"),
            "/p?a=1;b=2;c=3&key=k%201%2F%2B%26%3D%25"
        );
    }

    #[test]
    fn responses_lose_the_key() {
        let mut headers = HeaderMap::new();
        let up = |text: &str| HeaderValue::try_from(text).expect("value");
        headers.insert(LOCATION, up("https://u.test/v1/m/?alt=sse&key=k%201#frag"));
        headers.insert(CONTENT_LOCATION, up("/v1/m?key=k%201"));
        headers.insert("link", up("<https://u.test/?key=k%201>; rel=next"));
        headers.insert("x-echo", up("key k 1"));
        headers.insert("x-kept", up("other"));
        scrub_response(&mut headers, "key", b"k 1");
        assert_eq!(headers[LOCATION], "https://u.test/v1/m/?alt=sse#frag");
        assert_eq!(headers[CONTENT_LOCATION], "/v1/m");
        assert!(!headers.contains_key("link") && !headers.contains_key("x-echo"));
        assert_eq!(headers["x-kept"], "other");
    }

    #[test]
    fn other_parameters_and_the_path_stay() {
        assert_eq!(
            placed("/m%3Fkey=x/y?keys=1&monkey=2&k=3&key_id=4&alt=sse"),
            "/m%3Fkey=x/y?keys=1&monkey=2&k=3&key_id=4&alt=sse&key=k%201%2F%2B%26%3D%25"
        );
        // Nothing to remove: the client's query as it was.
        assert_eq!(
            placed("/p?q=a;b&&r=1"),
            "/p?q=a;b&&r=1&key=k%201%2F%2B%26%3D%25"
        );
        // A `key` inside a value is the value's.
        assert_eq!(
            placed("/p?q=key%3Dx&r=key"),
            "/p?q=key%3Dx&r=key&key=k%201%2F%2B%26%3D%25"
        );
    }
}

//! What one client may take: requests in flight, the size of a request's
//! head and body, how long it may take to send them, and HTTP/2 streams.

use super::{Problems, Reported};
use crate::config::parse::parse_size;
use crate::config::{Limits, RawConfig};

/// `max_concurrent_requests`, `max_request_header_size`, `max_request_body`,
/// the client timeouts and `http2_max_concurrent_streams`.
pub(super) fn check(raw: &RawConfig, found: &mut Problems) -> Result<Limits, Reported> {
    let header_read_timeout =
        found.optional_duration("header_read_timeout", &raw.header_read_timeout);
    let client_idle_timeout =
        found.optional_duration("client_idle_timeout", &raw.client_idle_timeout);
    let request_body_timeout =
        found.optional_duration("request_body_timeout", &raw.request_body_timeout);
    let max_concurrent_requests = found.optional_number(
        "max_concurrent_requests",
        &raw.max_concurrent_requests,
        1..=MAX_CONCURRENT_REQUESTS,
        "a number of requests",
    );
    let max_request_header_size = header_size(&raw.max_request_header_size, found);
    let max_request_body = body_size(&raw.max_request_body, found);
    let http2_max_concurrent_streams = found.number(
        "http2_max_concurrent_streams",
        &raw.http2_max_concurrent_streams,
        1..=MAX_HTTP2_STREAMS,
        "a number of streams",
    );
    Ok(Limits {
        max_concurrent_requests: max_concurrent_requests?,
        max_request_header_size: max_request_header_size?,
        max_request_body: max_request_body?,
        header_read_timeout: header_read_timeout?,
        client_idle_timeout: client_idle_timeout?,
        request_body_timeout: request_body_timeout?,
        http2_max_concurrent_streams: http2_max_concurrent_streams?,
    })
}

/// `max_request_header_size`: a size from [`MIN_HEADER_LIMIT`] to
/// [`MAX_HEADER_LIMIT`].
fn header_size(text: &str, found: &mut Problems) -> Result<usize, Reported> {
    let setting = "max_request_header_size";
    let size = parse_size(text).map_err(|message| found.refuse(setting, message))?;
    match size.map(|s| usize::try_from(s).unwrap_or(usize::MAX)) {
        Some(size) if (MIN_HEADER_LIMIT..=MAX_HEADER_LIMIT).contains(&size) => Ok(size),
        Some(size) if size > MAX_HEADER_LIMIT => Err(found.refuse(
            setting,
            format!(
                "{text:?} is more than any request head needs: use at most 16MiB \
                 ({MAX_HEADER_LIMIT} bytes)"
            ),
        )),
        _ => Err(found.refuse(
            setting,
            format!("must be at least {MIN_HEADER_LIMIT} bytes"),
        )),
    }
}

/// `max_request_body`: a size, or off; 0 would refuse every body.
fn body_size(text: &str, found: &mut Problems) -> Result<Option<u64>, Reported> {
    let setting = "max_request_body";
    match parse_size(text).map_err(|message| found.refuse(setting, message))? {
        Some(0) => Err(found.refuse(
            setting,
            "0 would refuse every request with a body; use off for no limit",
        )),
        size => Ok(size),
    }
}

/// Smallest request-head limit: hyper needs room for an ordinary request.
const MIN_HEADER_LIMIT: usize = 8192;

/// Largest request-head limit, 16 MiB: far beyond any real request head
/// (most servers stop at 8 to 64 KiB), and each connection may buffer this
/// much.
const MAX_HEADER_LIMIT: usize = 16 << 20;

/// Most requests in flight at once: beyond the file descriptors any host
/// gives one process (and the permits a semaphore can count); "off" is no
/// limit.
const MAX_CONCURRENT_REQUESTS: usize = 1_000_000;

/// Most concurrent streams per HTTP/2 client connection: 0 would let no
/// client open a stream (the server would still start, "ready"), and far
/// more than any client multiplexes on one connection is a typo.
const MAX_HTTP2_STREAMS: u32 = 65_535;

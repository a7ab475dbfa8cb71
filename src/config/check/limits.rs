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
    let max_concurrent_requests = found
        .optional::<usize>(
            "max_concurrent_requests",
            &raw.max_concurrent_requests,
            "a whole number",
        )
        .map(|limit| limit.filter(|count| *count > 0));
    let max_request_header_size = header_size(&raw.max_request_header_size, found);
    let max_request_body = parse_size(&raw.max_request_body)
        .map_err(|message| found.refuse("max_request_body", message));
    Ok(Limits {
        max_concurrent_requests: max_concurrent_requests?,
        max_request_header_size: max_request_header_size?,
        max_request_body: max_request_body?,
        header_read_timeout: header_read_timeout?,
        client_idle_timeout: client_idle_timeout?,
        request_body_timeout: request_body_timeout?,
        http2_max_concurrent_streams: raw.http2_max_concurrent_streams,
    })
}

/// `max_request_header_size`: a size of at least [`MIN_HEADER_LIMIT`].
fn header_size(text: &str, found: &mut Problems) -> Result<usize, Reported> {
    let size =
        parse_size(text).map_err(|message| found.refuse("max_request_header_size", message))?;
    match size.and_then(|s| usize::try_from(s).ok()) {
        Some(size) if size >= MIN_HEADER_LIMIT => Ok(size),
        _ => {
            found.report(
                "max_request_header_size",
                format!("must be at least {MIN_HEADER_LIMIT} bytes"),
            );
            Err(Reported)
        }
    }
}

/// Smallest request-head limit: hyper needs room for an ordinary request.
const MIN_HEADER_LIMIT: usize = 8192;

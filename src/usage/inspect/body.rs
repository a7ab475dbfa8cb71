//! Reading a request body within a bound: at most [`MAX_BODY`] bytes,
//! within [`READ_LIMIT`].

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Largest request body read to find what it asks for.
pub const MAX_BODY: usize = 1 << 20;

/// How long reading that body may take.
pub const READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The body as read.
#[derive(Debug)]
pub enum ReadBody {
    /// All of it, within [`MAX_BODY`].
    Whole(Bytes),
    /// Longer than [`MAX_BODY`]: what was read, then the unread rest.
    Longer { head: Bytes, rest: Incoming },
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum ReadFailed {
    /// The client's framing was bad or it went away (hyper's error says
    /// which).
    Malformed(hyper::Error),
    /// It did not arrive within [`READ_LIMIT`].
    TooSlow,
}

/// True if a body with these headers might be JSON a server would accept:
/// anything but a multipart upload.
pub fn may_be_json(headers: &HeaderMap) -> bool {
    !headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .get(..10)
                .is_some_and(|start| start.eq_ignore_ascii_case("multipart/"))
        })
}

/// Reads `body` up to [`MAX_BODY`] bytes, within [`READ_LIMIT`].
pub async fn read(mut body: Incoming) -> Result<ReadBody, ReadFailed> {
    let reading = async {
        let mut buffer = BytesMut::new();
        loop {
            match body.frame().await {
                None => return Ok(ReadBody::Whole(buffer.freeze())),
                Some(Err(err)) => return Err(ReadFailed::Malformed(err)),
                Some(Ok(frame)) => {
                    // Request trailers are not forwarded from a read body.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    buffer.extend_from_slice(&data);
                    if buffer.len() > MAX_BODY {
                        return Ok(ReadBody::Longer {
                            head: buffer.freeze(),
                            rest: body,
                        });
                    }
                }
            }
        }
    };
    tokio::time::timeout(READ_LIMIT, reading)
        .await
        .unwrap_or(Err(ReadFailed::TooSlow))
}

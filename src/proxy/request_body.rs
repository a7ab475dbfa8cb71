//! The request body keyrelay sends upstream: the client's body, frame by
//! frame, counted for metrics and cut off at `max_request_body` if one is set.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use pin_project_lite::pin_project;

use crate::ops::metrics::RouteMetrics;

pin_project! {
    /// A client's request body on its way upstream.
    pub struct RequestBody {
        #[pin]
        client: Incoming,
        limit: Option<u64>,
        seen: u64,
        metrics: RouteMetrics,
    }
}

impl RequestBody {
    /// Wraps the client's body; `limit` caps its total size.
    pub fn new(client: Incoming, limit: Option<u64>, metrics: RouteMetrics) -> Self {
        Self {
            client,
            limit,
            seen: 0,
            metrics,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = match this.client.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(err))) => {
                return Poll::Ready(Some(Err(Box::new(ClientBodyError(err)))))
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            *this.seen += data.len() as u64;
            this.metrics.request_bytes(data.len());
            if let Some(limit) = *this.limit {
                if *this.seen > limit {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.client.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.client.size_hint()
    }
}

/// The client's request body was malformed or cut short (a bad chunk, a
/// connection closed before Content-Length): the client's fault, not the
/// upstream's.
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client's request body is malformed or incomplete: {}",
            self.0
        )
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// A request body grew past `max_request_body` (the limit in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge(pub u64);

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request body larger than max_request_body ({} bytes)",
            self.0
        )
    }
}

impl StdError for BodyTooLarge {}

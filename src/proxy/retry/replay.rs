//! A request body kept whole so that a later attempt can send it again.
//!
//! The client's body is read once, by whichever attempt is sending, and
//! each frame is kept (a reference to the client's own buffer, no copy) as
//! it goes to that attempt: the first attempt still streams the upload as
//! it arrives. A later attempt starts again from the first kept frame and
//! then reads on where the client's body left off. Only a body whose
//! declared length is within `retry_buffer` is kept, so what is held is
//! bounded by the setting (runs of tiny frames are joined, so that their
//! count does not multiply it).
//!
//! Only the newest attempt may read: an earlier one that hyper is still
//! polling (its connection not yet torn down) gets an error, which aborts
//! its request rather than letting it steal the client's next frame. Once
//! no attempt can follow ([`Replay::finish`]), frames are let go as soon
//! as the last attempt has sent them.

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};

use crate::proxy::request_body::{join_small, RequestBody};
use crate::telemetry::metrics::RouteMetrics;

/// The handle the retry loop keeps: new attempts' bodies come from it.
pub(crate) struct Replay {
    kept: Arc<Mutex<Kept>>,
}

/// What every attempt's body shares.
struct Kept {
    /// The client's body (its limits, metrics and pauses checked once, as
    /// it is read); `None` once it has ended.
    source: Option<RequestBody>,
    /// Every frame read from the client so far, while attempts may follow.
    frames: Vec<Bytes>,
    /// `frames` before this are not joined again ([`join_small`]).
    settled: usize,
    /// The number of the attempt allowed to read (the newest).
    current: u32,
    /// The next frame that attempt sends.
    next: usize,
    /// The body's declared length, and what the newest attempt has sent.
    length: u64,
    sent: u64,
    /// The client's body failed (too large, malformed, paused too long):
    /// the attempt that read the failure has it; no later one may send.
    failed: bool,
    /// False once no attempt can follow: frames are let go once sent.
    keep: bool,
    /// The route's metrics, for each attempt's body.
    metrics: RouteMetrics,
}

/// One attempt's view of a [`Replay`]: a cursor into the kept frames.
pub(crate) struct ReplayCursor {
    kept: Arc<Mutex<Kept>>,
    attempt: u32,
}

/// An earlier attempt's body, read after a newer attempt started.
#[derive(Debug)]
pub(crate) struct Superseded;

impl fmt::Display for Superseded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request was sent again; this attempt's body stopped")
    }
}

impl StdError for Superseded {}

impl Replay {
    /// Keeps `body` for attempts after the first when its declared length
    /// is within `limit`, and returns the first attempt's body; otherwise
    /// (`None`) hands `body` back as it was.
    pub(crate) fn keep(body: RequestBody, limit: u64) -> (Option<Self>, RequestBody) {
        let length = match Body::size_hint(&body).exact() {
            Some(length) if length <= limit => length,
            _ => return (None, body),
        };
        let metrics = body.metrics().clone();
        let kept = Arc::new(Mutex::new(Kept {
            source: Some(body),
            frames: Vec::new(),
            settled: 0,
            current: 0,
            next: 0,
            length,
            sent: 0,
            failed: false,
            keep: true,
            metrics: metrics.clone(),
        }));
        let first = ReplayCursor {
            kept: Arc::clone(&kept),
            attempt: 0,
        };
        (Some(Self { kept }), RequestBody::replaying(first, metrics))
    }

    /// The body for the next attempt, from the first byte; the previous
    /// attempt's body stops. `None` if the client's body failed.
    pub(crate) fn again(&self) -> Option<RequestBody> {
        let mut kept = lock(&self.kept);
        if kept.failed || !kept.keep {
            return None;
        }
        kept.current += 1;
        kept.next = 0;
        kept.sent = 0;
        let metrics = kept.metrics.clone();
        let cursor = ReplayCursor {
            kept: Arc::clone(&self.kept),
            attempt: kept.current,
        };
        drop(kept);
        Some(RequestBody::replaying(cursor, metrics))
    }

    /// No attempt follows: frames the last attempt has sent are let go now,
    /// the rest as it sends them.
    pub(crate) fn finish(&self) {
        let mut kept = lock(&self.kept);
        kept.keep = false;
        let sent = kept.next;
        kept.frames[..sent].fill(Bytes::new());
    }
}

fn lock(kept: &Mutex<Kept>) -> MutexGuard<'_, Kept> {
    // Each change leaves the state whole: poisoning is ignored.
    kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl ReplayCursor {
    /// The attempt's next frame: a kept one, else the client's next.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut guard = lock(&self.kept);
        let kept = &mut *guard;
        if kept.current != self.attempt {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(frame) = kept.frames.get_mut(kept.next) {
            let data = if kept.keep {
                frame.clone()
            } else {
                std::mem::take(frame)
            };
            kept.next += 1;
            kept.sent += data.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if kept.failed {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        let Some(source) = kept.source.as_mut() else {
            return Poll::Ready(None);
        };
        match std::pin::Pin::new(source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    kept.sent += data.len() as u64;
                    if kept.keep {
                        kept.frames.push(data.clone());
                        join_small(&mut kept.frames, &mut kept.settled);
                        // The newest attempt reads the client only once it
                        // has sent every kept frame: it is at the end.
                        kept.next = kept.frames.len();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                kept.failed = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                kept.source = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// True when this attempt has sent the whole body.
    pub(crate) fn is_end_stream(&self) -> bool {
        let kept = lock(&self.kept);
        kept.current == self.attempt
            && kept.next >= kept.frames.len()
            && kept.source.as_ref().is_none_or(Body::is_end_stream)
    }

    /// What is left for this attempt to send: the declared length less
    /// what it has sent.
    pub(crate) fn remaining(&self) -> u64 {
        let kept = lock(&self.kept);
        kept.length.saturating_sub(kept.sent)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn collect(body: &mut RequestBody) -> Vec<u8> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut all = Vec::new();
        loop {
            match std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    all.extend_from_slice(frame.data_ref().expect("data"));
                }
                Poll::Ready(None) => return all,
                other => panic!("not a frame: {:?}", other.map(|f| f.map(|r| r.is_ok()))),
            }
        }
    }

    #[test]
    fn a_body_of_tiny_frames_is_kept_in_few_pieces_and_replayed_whole() {
        let metrics = std::sync::Arc::new(Metrics::new()).route("test");
        let sent: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
        let frames = sent.iter().map(|byte| Bytes::copy_from_slice(&[*byte]));
        let (replay, mut first) = Replay::keep(RequestBody::of_frames(frames, metrics), 1 << 20);
        let replay = replay.expect("kept");
        assert_eq!(collect(&mut first), sent);
        // Each kept piece costs a `Bytes` (32 bytes) besides its data: one
        // per byte would hold 32 times the body.
        let pieces = lock(&replay.kept).frames.len();
        assert!(pieces <= 1_000, "{pieces} pieces kept for 100000 bytes");
        let mut again = replay.again().expect("sent again");
        assert_eq!(collect(&mut again), sent, "the same bytes, in order");
    }
}

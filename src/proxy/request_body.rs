//! The request body keyrelay sends upstream: the client's body, frame by
//! frame, counted for metrics and cut off at `max_request_body` if one is set.
//! A client that stops sending for `request_body_timeout` between two parts
//! of its body fails the body with [`BodyTimeout`], which aborts the
//! upstream request (the client gets 408 if no response had started).
//!
//! On HTTP/2 routes the body also keeps what it has sent, up to
//! [`REPLAY_LIMIT`], as references to the client's own buffers (no copy;
//! runs of tiny frames are joined, see [`join_small`]),
//! so that a stream the upstream refused before processing it (REFUSED_STREAM,
//! or above a GOAWAY's last stream id) can be sent again on another
//! connection. When hyper drops a recording body, it hands the frames sent
//! so far and the unread rest of the client's body back to whoever asked
//! for the recording ([`RequestBody::recorded`]).

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::proxy::retry::ReplayCursor;
use crate::telemetry::metrics::RouteMetrics;

/// The most request-body bytes kept for a resend. Prompts fit; a larger
/// upload that meets a refused stream fails as it would without the replay.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// A client's request body on its way upstream.
pub(crate) struct RequestBody {
    /// The client's body; `None` once handed back for a resend.
    client: Option<Incoming>,
    /// Frames sent once already, to send again before reading on (a resend).
    resend: VecDeque<Bytes>,
    limit: Option<u64>,
    seen: u64,
    metrics: RouteMetrics,
    recording: Option<Recording>,
    /// Longest wait for the client's next frame (`request_body_timeout`).
    frame_timeout: Option<Duration>,
    /// Armed while the client's next frame is awaited; made on the first wait.
    waiting: Option<Pin<Box<Sleep>>>,
    /// True while `waiting` runs for the current wait (a frame disarms it).
    armed: bool,
    /// An attempt's place in a body kept for retries: the client's body is
    /// read (and counted, and checked) through it, once for all attempts.
    replay: Option<ReplayCursor>,
}

/// Frames kept as they came until this many are new; then, if they are
/// small, they are joined into one ([`join_small`]).
const JOIN_RUN: usize = 256;

/// New frames averaging up to this are small: kept one by one, each would
/// cost its `Bytes` (32 bytes) on top of its data, and a client sending a
/// body in 1-byte frames would make keyrelay hold 32 times what it means
/// to keep.
const SMALL_FRAME: usize = 1024;

/// Joins the frames of `frames` after `settled` into one once there are
/// [`JOIN_RUN`] of them and they are small (each small byte copied once;
/// larger frames stay as they came, uncopied), and moves `settled` past
/// them. For bodies kept to be sent again ([`REPLAY_LIMIT`],
/// `retry_buffer`): their bound is in bytes, not frames.
pub(crate) fn join_small(frames: &mut Vec<Bytes>, settled: &mut usize) {
    let run = &frames[*settled..];
    if run.len() < JOIN_RUN {
        return;
    }
    let size: usize = run.iter().map(Bytes::len).sum();
    if size <= JOIN_RUN * SMALL_FRAME {
        let mut joined = bytes::BytesMut::with_capacity(size);
        for frame in frames.drain(*settled..) {
            joined.extend_from_slice(&frame);
        }
        frames.push(joined.freeze());
    }
    *settled = frames.len();
}

/// What a recording body keeps, and where it goes when hyper drops it.
struct Recording {
    sent: Vec<Bytes>,
    /// `sent` before this is not joined again ([`join_small`]).
    settled: usize,
    bytes: usize,
    give_back: oneshot::Sender<UnsentBody>,
}

/// A body handed back after its stream was dropped: the frames already sent
/// and the part of the client's body not read yet.
pub(crate) struct UnsentBody {
    sent: Vec<Bytes>,
    client: Option<Incoming>,
    seen: u64,
    limit: Option<u64>,
    metrics: RouteMetrics,
    frame_timeout: Option<Duration>,
    replay: Option<ReplayCursor>,
}

impl UnsentBody {
    /// The same body again, from its first byte.
    pub(crate) fn resend(self) -> RequestBody {
        RequestBody {
            client: self.client,
            resend: self.sent.into(),
            limit: self.limit,
            seen: self.seen,
            metrics: self.metrics,
            recording: None,
            frame_timeout: self.frame_timeout,
            waiting: None,
            armed: false,
            replay: self.replay,
        }
    }
}

impl RequestBody {
    /// Wraps the client's body; `limit` caps its total size.
    pub(crate) fn new(client: Incoming, limit: Option<u64>, metrics: RouteMetrics) -> Self {
        let mut body = Self::empty(limit, metrics);
        body.client = Some(client);
        body
    }

    /// A body with nothing to send (a bodiless request sent again).
    pub(crate) fn nothing(metrics: RouteMetrics) -> Self {
        Self::empty(None, metrics)
    }

    /// A body with nothing to send, counted in `metrics`.
    fn empty(limit: Option<u64>, metrics: RouteMetrics) -> Self {
        Self {
            client: None,
            resend: VecDeque::new(),
            limit,
            seen: 0,
            metrics,
            recording: None,
            frame_timeout: None,
            waiting: None,
            armed: false,
            replay: None,
        }
    }

    /// This body, failing with [`BodyTimeout`] when the client sends nothing
    /// for `limit` between two frames (`None`: it may pause forever).
    pub(crate) fn with_frame_timeout(mut self, limit: Option<Duration>) -> Self {
        self.frame_timeout = limit;
        self
    }

    /// A body keyrelay has read whole already (to rewrite it), counted as
    /// relayed.
    pub(crate) fn buffered(bytes: Bytes, limit: Option<u64>, metrics: RouteMetrics) -> Self {
        metrics.request_bytes(bytes.len());
        let mut body = Self::empty(limit, metrics);
        body.seen = bytes.len() as u64;
        body.resend.push_back(bytes);
        body
    }

    /// A body whose first `head` bytes keyrelay has read already (to see
    /// what it asks for), then the unread `rest` of the client's body.
    pub(crate) fn read_ahead(
        head: Bytes,
        rest: Incoming,
        limit: Option<u64>,
        metrics: RouteMetrics,
    ) -> Self {
        let mut body = Self::buffered(head, limit, metrics);
        body.client = Some(rest);
        body
    }

    /// One attempt's body of a request kept for retries ([`Replay`]): it
    /// reads through `cursor`, which counts and checks the client's bytes.
    ///
    /// [`Replay`]: crate::proxy::retry::Replay
    pub(crate) fn replaying(cursor: ReplayCursor, metrics: RouteMetrics) -> Self {
        let mut body = Self::empty(None, metrics);
        body.replay = Some(cursor);
        body
    }

    /// A body of these frames, as if the client had sent them so.
    #[cfg(test)]
    pub(crate) fn of_frames(
        frames: impl IntoIterator<Item = Bytes>,
        metrics: RouteMetrics,
    ) -> Self {
        let mut body = Self::empty(None, metrics);
        body.resend = frames.into_iter().collect();
        body
    }

    /// This body, recording what it sends; the receiver gets it back when
    /// hyper drops it, unless it grew past [`REPLAY_LIMIT`] (then the
    /// receiver sees the sender dropped).
    pub(crate) fn recorded(mut self) -> (Self, oneshot::Receiver<UnsentBody>) {
        let (give_back, receiver) = oneshot::channel();
        // Frames still to be resent are recorded as they go out (and handed
        // back with the rest if they never do).
        self.recording = Some(Recording {
            sent: Vec::new(),
            settled: 0,
            bytes: 0,
            give_back,
        });
        (self, receiver)
    }

    /// An empty body with the same limits and metrics: what a body that had
    /// ended before it was sent becomes when it is sent again.
    pub(crate) fn empty_copy(&self) -> Self {
        Self::empty(self.limit, self.metrics.clone())
    }

    /// The route's metrics, which the pools count their resends in.
    pub(crate) fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    /// The client has no frame ready: pending, or [`BodyTimeout`] once it
    /// has been silent for the frame timeout.
    fn poll_frame_timeout(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, <Self as Body>::Error>>> {
        let Some(limit) = self.frame_timeout else {
            return Poll::Pending;
        };
        let deadline = Instant::now() + limit;
        let timer = match &mut self.waiting {
            Some(timer) => {
                if !self.armed {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .waiting
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // Whatever the client sends later is not read.
                self.client = None;
                Poll::Ready(Some(Err(Box::new(BodyTimeout(limit)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn record(&mut self, data: &Bytes) {
        if let Some(recording) = &mut self.recording {
            recording.bytes += data.len();
            if recording.bytes > REPLAY_LIMIT {
                self.recording = None;
            } else {
                recording.sent.push(data.clone());
                join_small(&mut recording.sent, &mut recording.settled);
            }
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
        let this = self.get_mut();
        // A resend: the frames were counted and checked the first time.
        if let Some(data) = this.resend.pop_front() {
            this.record(&data);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(replay) = this.replay.as_mut() {
            let polled = replay.poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    this.record(&data);
                }
            }
            return polled;
        }
        let Some(client) = this.client.as_mut() else {
            return Poll::Ready(None);
        };
        // Bounded: a body ends with at most one trailers frame, and every
        // other frame returns.
        loop {
            let frame = match Pin::new(&mut *client).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(err))) => {
                    return Poll::Ready(Some(Err(Box::new(ClientBodyError(err)))))
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return this.poll_frame_timeout(cx),
            };
            this.armed = false;
            // Request trailers are dropped, as nginx does: they would reach
            // the upstream after every header check (a second credential, a
            // cookie, the access token), and no API keyrelay fronts needs
            // them (gRPC requests carry none).
            let Some(data) = frame.data_ref() else {
                continue;
            };
            this.seen += data.len() as u64;
            this.metrics.request_bytes(data.len());
            if let Some(limit) = this.limit {
                if this.seen > limit {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                }
            }
            let data = data.clone();
            this.record(&data);
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.resend.is_empty()
            && self.client.as_ref().is_none_or(Body::is_end_stream)
            && self.replay.as_ref().is_none_or(ReplayCursor::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let resend: u64 = self.resend.iter().map(|frame| frame.len() as u64).sum();
        let client = match (&self.client, &self.replay) {
            (Some(client), _) => client.size_hint(),
            (None, Some(replay)) => SizeHint::with_exact(replay.remaining()),
            (None, None) => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(client.lower() + resend);
        if let Some(upper) = client.upper() {
            hint.set_upper(upper + resend);
        }
        hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(recording) = self.recording.take() {
            let mut sent = recording.sent;
            sent.extend(self.resend.drain(..));
            // Nobody waiting (the upstream answered) is the usual case.
            let _ = recording.give_back.send(UnsentBody {
                sent,
                client: self.client.take(),
                seen: self.seen,
                limit: self.limit,
                metrics: self.metrics.clone(),
                frame_timeout: self.frame_timeout,
                replay: self.replay.take(),
            });
        }
    }
}

/// The client's request body was malformed or cut short (a bad chunk, a
/// connection closed before Content-Length): the client's fault, not the
/// upstream's.
#[derive(Debug)]
pub(crate) struct ClientBodyError(pub hyper::Error);

impl ClientBodyError {
    /// True when the client went away rather than sent a malformed body:
    /// its HTTP/1 connection ended (closed or reset) before the end of the
    /// body, or it cancelled its HTTP/2 stream.
    pub(crate) fn client_gone(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        let mut current = StdError::source(&self.0);
        // Bounded: an error chain is finite.
        while let Some(err) = current {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                ) {
                    return true;
                }
            }
            if let Some(h2) = err.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::CANCEL);
            }
            current = err.source();
        }
        self.0.is_incomplete_message()
    }
}

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

/// The client sent no part of its request body for `request_body_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyTimeout(pub Duration);

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent no request body data for request_body_timeout ({:?})",
            self.0
        )
    }
}

impl StdError for BodyTimeout {}

/// A request body grew past `max_request_body` (the limit in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyTooLarge(pub u64);

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

#[cfg(test)]
mod tests {
    use std::task::{Context, Waker};

    use super::*;
    use crate::telemetry::metrics::Metrics;

    /// A body being resent, as the pool builds it after a refused stream.
    fn resending(frames: &[&'static str]) -> RequestBody {
        RequestBody {
            client: None,
            resend: frames
                .iter()
                .map(|f| Bytes::from_static(f.as_bytes()))
                .collect(),
            limit: None,
            seen: 0,
            metrics: std::sync::Arc::new(Metrics::new()).route("test"),
            recording: None,
            frame_timeout: None,
            waiting: None,
            armed: false,
            replay: None,
        }
    }

    fn next(body: &mut RequestBody) -> Option<Bytes> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            _ => None,
        }
    }

    #[test]
    fn a_recording_of_tiny_frames_is_kept_in_few_pieces_and_resent_whole() {
        let sent: Vec<u8> = (0..60_000).map(|i| (i % 251) as u8).collect();
        let frames = sent.iter().map(|byte| Bytes::copy_from_slice(&[*byte]));
        let metrics = std::sync::Arc::new(Metrics::new()).route("test");
        let (mut body, back) = RequestBody::of_frames(frames, metrics).recorded();
        let mut first = Vec::new();
        while let Some(frame) = next(&mut body) {
            first.extend_from_slice(&frame);
        }
        assert_eq!(first, sent);
        // Each recorded piece costs a `Bytes` (32 bytes) besides its data.
        let pieces = body
            .recording
            .as_ref()
            .expect("within the limit")
            .sent
            .len();
        assert!(pieces <= 1_000, "{pieces} pieces recorded for 60000 bytes");
        drop(body);
        let mut again = back.blocking_recv().expect("given back").resend();
        let mut resent = Vec::new();
        while let Some(frame) = next(&mut again) {
            resent.extend_from_slice(&frame);
        }
        assert_eq!(resent, sent, "the same bytes, in order");
    }

    #[test]
    fn a_body_refused_twice_is_resent_whole_and_once() {
        // Sent again, refused again after one frame went out: what comes
        // back is each frame once, in order, sent or not.
        let (mut body, back) = resending(&["a", "b", "c"]).recorded();
        assert_eq!(next(&mut body).as_deref(), Some(&b"a"[..]));
        drop(body);
        let mut again = back.blocking_recv().expect("given back").resend();
        let mut frames = Vec::new();
        while let Some(frame) = next(&mut again) {
            frames.push(frame);
        }
        assert_eq!(frames, ["a", "b", "c"]);
        assert!(hyper::body::Body::is_end_stream(&again));
    }
}

//! The response body keyrelay hands to hyper: the upstream's body, frame by frame.
//!
//! Nothing is collected or copied: each frame the upstream yields is returned
//! to hyper as is, which writes it to the client before asking for the next
//! one. That is what keeps memory bounded by backpressure. Around that the
//! body does three cheap things: it counts bytes for the access log, it ends a
//! stream that stays silent longer than the idle timeout, and it turns any
//! upstream failure into a body error, which makes hyper abort the client's
//! connection (HTTP/1.1) or reset its stream (HTTP/2) instead of ending it
//! cleanly.
//!
//! One more duty falls to it on HTTP/2 upstreams. hyper's HTTP/1.1 server
//! stops polling a body as soon as it has written `Content-Length` bytes, and
//! drops it; the upstream stream may not have ended yet (servers that relay a
//! body often send END_STREAM on an empty DATA frame after the last bytes).
//! Dropping an HTTP/2 body before its end resets the stream (RST_STREAM
//! CANCEL), and each such reset that h2 later has to answer again counts
//! towards its limit of 1,024 locally caused resets, after which it tears the
//! whole connection down with every stream on it. So a body dropped with all
//! its declared bytes delivered hands the upstream stream to a short task
//! that reads it to its end instead ([`finish_in_background`]).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::proxy::context::Settlement;
use crate::proxy::upstream::Lease;
use crate::telemetry::record::Outcome;
use crate::usage::stream_usage::UsageEventStrip;
use crate::usage::UsageTap;

/// The longest a finished HTTP/2 response may take to send its END_STREAM
/// (or trailers) once its declared bytes are all in.
const FINISH_LIMIT: Duration = Duration::from_secs(5);

/// An upstream response body relayed to the client.
pub struct RelayBody {
    /// Always `Some` until dropped.
    upstream: Option<Incoming>,
    idle: Option<IdleTimer>,
    /// The request's context and access record, settled when the body ends.
    request: Settlement,
    /// Its hold on the upstream connection: an HTTP/2 stream's place, freed
    /// with the stream, or an HTTP/1.1 connection, back to the pool when the
    /// body was read to its end (dropped with it otherwise, which closes it).
    lease: Option<Lease>,
    /// Reads token usage off the frames as they pass (see [`crate::usage`]).
    tap: Option<UsageTap>,
    /// Removes the usage event keyrelay asked for itself (`add_stream_usage`).
    strip: Option<UsageEventStrip>,
    /// Trailers that arrived while the strip held a line, sent after it.
    trailers: Option<Frame<Bytes>>,
}

impl RelayBody {
    /// Wraps `upstream`; `idle` is the longest allowed silence between frames.
    pub fn new(
        upstream: Incoming,
        idle: Option<Duration>,
        mut request: Settlement,
        lease: Lease,
        tap: Option<UsageTap>,
        strip: Option<UsageEventStrip>,
    ) -> Self {
        // hyper never polls a body that says it is empty.
        if upstream.is_end_stream() {
            request.record.finish(Outcome::Ok);
        }
        Self {
            upstream: Some(upstream),
            idle: idle.map(IdleTimer::new),
            request,
            lease: Some(lease),
            tap,
            strip,
            trailers: None,
        }
    }
}

impl RelayBody {
    /// The upstream body was read to its end: its connection may be reused.
    fn body_finished(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            lease.body_finished();
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // The response's end, however it came (finished, failed, timed out,
        // or the client went away): what the tap read, even of a stream cut
        // short, goes in the record, the request settles its budgets by it,
        // and then the record is dropped (and emitted) with this body.
        if let Some(mut tap) = self.tap.take() {
            if let (Some(model), Some(span)) = (tap.take_model(), self.request.record.span()) {
                span.set("gen_ai.response.model", &*model);
            }
            self.request.record.set_usage(tap.finish(Instant::now()));
        }
        self.request.settle();
        let Some(upstream) = self.upstream.take() else {
            return;
        };
        // Every declared byte arrived, only the stream's end is missing: read
        // it rather than reset the stream. A body dropped part-way (the client
        // went away) is reset, which tells the model to stop generating.
        if upstream.is_end_stream() {
            self.body_finished();
        } else if upstream.size_hint().exact() == Some(0) {
            finish_in_background(upstream, self.lease.take());
        }
    }
}

/// Reads a finished HTTP/2 response to its END_STREAM, bounded in time, then
/// frees its stream slot.
fn finish_in_background(mut upstream: Incoming, lease: Option<Lease>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let _ = tokio::time::timeout(FINISH_LIMIT, async {
            while let Some(Ok(_)) = upstream.frame().await {}
        })
        .await;
        drop(lease);
    });
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = self.get_mut();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let frame = match Pin::new(&mut *upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(err))) => {
                    tracing::warn!(
                        request_id = this.request.record.id(),
                        error = %err,
                        "upstream failed mid-stream; aborting the client's response"
                    );
                    this.request.record.finish(Outcome::UpstreamError);
                    this.request
                        .record
                        .metrics()
                        .upstream_error("reset_mid_stream");
                    return Poll::Ready(Some(Err(RelayError::Upstream(err))));
                }
                Poll::Ready(None) => {
                    let held = this.strip.as_mut().and_then(UsageEventStrip::finish);
                    if let Some(rest) = held {
                        this.request.record.add_bytes(rest.len(), Instant::now());
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    this.request.record.finish(Outcome::Ok);
                    this.body_finished();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let Some(idle) = this.idle.as_mut() else {
                        return Poll::Pending;
                    };
                    if !idle.poll_expired(cx) {
                        return Poll::Pending;
                    }
                    tracing::warn!(
                        request_id = this.request.record.id(),
                        idle_timeout = ?idle.limit,
                        "upstream went silent mid-stream; aborting the client's response"
                    );
                    this.request.record.finish(Outcome::Timeout);
                    this.request.record.metrics().upstream_error("idle_timeout");
                    return Poll::Ready(Some(Err(RelayError::Idle(idle.limit))));
                }
            };
            let now = Instant::now();
            if let Some(idle) = this.idle.as_mut() {
                idle.last_frame = now;
            }
            let frame = match frame.into_data() {
                // HTTP/2 ends streams with an empty DATA frame; it carries nothing to relay.
                Ok(data) if data.is_empty() => continue,
                Ok(data) => {
                    if let Some(tap) = this.tap.as_mut() {
                        tap.feed(&data, now);
                    }
                    this.request.record.count_lines(&data);
                    let data = match this.strip.as_mut() {
                        None => data,
                        Some(strip) => match strip.pass(data) {
                            Some(data) => data,
                            // Only the usage event, or an unfinished line.
                            None => continue,
                        },
                    };
                    this.request.record.add_bytes(data.len(), now);
                    Frame::data(data)
                }
                // Trailers, after the line the strip may hold.
                Err(trailers) => match this.strip.as_mut().and_then(UsageEventStrip::finish) {
                    Some(held) => {
                        this.request.record.add_bytes(held.len(), now);
                        this.trailers = Some(trailers);
                        Frame::data(held)
                    }
                    None => trailers,
                },
            };
            // hyper stops polling once a sized body says it has ended, or
            // once the declared length is written, so the last frame is
            // where a Content-Length response completes.
            if upstream.is_end_stream() || upstream.size_hint().exact() == Some(0) {
                this.request.record.finish(Outcome::Ok);
                if upstream.is_end_stream() {
                    this.body_finished();
                }
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        let held = self.trailers.is_some()
            || self
                .strip
                .as_ref()
                .is_some_and(UsageEventStrip::holds_bytes);
        !held && self.upstream.as_ref().is_none_or(Body::is_end_stream)
    }

    // Passing the upstream's exact length through is what keeps a
    // Content-Length response a Content-Length response.
    fn size_hint(&self) -> SizeHint {
        if self.strip.is_some() {
            // Removing an event changes the length: the client gets it chunked.
            return SizeHint::default();
        }
        self.upstream
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Fires when no frame arrived for `limit`.
///
/// The timer is not reset on every frame (that would touch the timer wheel per
/// chunk); frames only record their arrival time, and when the sleep fires it
/// is pushed to `last_frame + limit` unless that moment has really passed.
/// The sleep itself is only created the first time the upstream makes the
/// client wait: most short responses arrive whole and never need one.
struct IdleTimer {
    limit: Duration,
    last_frame: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            last_frame: Instant::now(),
            sleep: None,
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        // A limit too large to add to a clock reading can never expire (the
        // caller has registered for the upstream's next frame already).
        let Some(deadline) = self.last_frame.checked_add(self.limit) else {
            return false;
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let Some(deadline) = self.last_frame.checked_add(self.limit) else {
                return false;
            };
            if Instant::now() >= deadline {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// Why a relayed body ended early.
#[derive(Debug)]
pub enum RelayError {
    /// The upstream connection failed or was reset mid-stream.
    Upstream(hyper::Error),
    /// The upstream sent nothing for the idle timeout.
    Idle(Duration),
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Upstream(err) => write!(f, "upstream failed mid-stream: {err}"),
            Self::Idle(limit) => write!(f, "upstream sent nothing for idle_timeout ({limit:?})"),
        }
    }
}

impl StdError for RelayError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Upstream(err) => Some(err),
            Self::Idle(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Waker};
    use std::time::Duration;

    use super::IdleTimer;

    #[tokio::test]
    async fn an_idle_limit_beyond_the_clock_never_fires_and_never_panics() {
        let mut timer = IdleTimer::new(Duration::from_secs(u64::MAX));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(!timer.poll_expired(&mut cx));
    }
}

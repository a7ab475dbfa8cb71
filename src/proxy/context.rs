//! What the phases of one request share, and the phase that ends it.
//!
//! A [`RequestContext`] is the request's own state, which the phases in
//! [`crate::proxy`] write and read explicitly: the concurrency slot it
//! holds, the access token it presented, the tokens it holds in its
//! budgets, and whether keyrelay asked the upstream for usage itself. It is
//! separate from the [`AccessRecord`], which only reports (the access-log
//! line and the metrics) and which the context fills when the request ends.
//!
//! The request ends in [`RequestContext::settle`]: the budget reservation is
//! replaced by what the response spent, as read off the record. It is
//! called where a request ends: the failure exit ([`Shared::fail`]), the
//! response body's end ([`RelayBody`]'s drop, whatever ended the stream)
//! and the tunnel's end. [`Settlement`] carries the context and the record
//! together to that point; its `Drop` calls the same `settle` as the
//! fallback, so a request dropped on a path that never reached its end
//! (a panic, a future dropped mid-phase) still settles exactly once.
//!
//! [`Shared::fail`]: super::Shared
//! [`RelayBody`]: super::response_body::RelayBody

use std::time::SystemTime;

use tokio::sync::OwnedSemaphorePermit;

use crate::telemetry::record::AccessRecord;
use crate::usage::Reservation;

/// The request's own state, owned by its phases.
#[derive(Debug, Default)]
pub struct RequestContext {
    /// A concurrency slot, released when the request (or its stream) ends.
    pub permit: Option<OwnedSemaphorePermit>,
    /// The name of the local access token the request used (never its value).
    pub token: Option<String>,
    /// What the request holds in its budgets until it settles.
    pub reservation: Option<Reservation>,
    /// keyrelay added `include_usage` to the request (`add_stream_usage`),
    /// so the stream's usage event is keyrelay's, not the client's.
    pub added_usage: bool,
}

impl RequestContext {
    /// The end phase: hands the access-log fields the context owns (the
    /// token's name) to `record`, and replaces the budget reservation with
    /// what the request spent ([`AccessRecord::spent`]). Settling twice is
    /// harmless: the second call finds nothing held.
    pub fn settle(&mut self, record: &mut AccessRecord) {
        if let Some(token) = self.token.take() {
            record.set_token(Some(token));
        }
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let spent = record.spent(reservation.prompt_estimate);
        let metrics = record.metrics().clone();
        reservation.settle(spent, SystemTime::now(), move |overshoots| {
            for overshoot in &overshoots {
                metrics.budget_overshoot(overshoot);
            }
        });
    }
}

/// A request's context and the access record it fills, carried together
/// from the first phase to the end of the response (or tunnel).
///
/// Ending a request is [`Settlement::settle`], called by name where it
/// ends. `Drop` calls it too, as the fallback for a request dropped before
/// it reached its end; then the record is dropped, which emits the access
/// line and the metrics with what settling filled in.
#[derive(Debug)]
pub struct Settlement {
    /// The request's own state.
    pub context: RequestContext,
    /// What the access log and the metrics say about it.
    pub record: AccessRecord,
}

impl Settlement {
    /// A request that has just arrived.
    pub fn new(record: AccessRecord) -> Self {
        Self {
            context: RequestContext::default(),
            record,
        }
    }

    /// Ends the request: see [`RequestContext::settle`].
    pub fn settle(&mut self) {
        self.context.settle(&mut self.record);
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        // The fallback: a no-op when the request's end already settled it.
        self.settle();
    }
}

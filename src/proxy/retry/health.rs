//! Outlier ejection, simply: a route whose upstream fails `eject_after`
//! attempts in a row (a `retry_on` match) is skipped by requests that can
//! go elsewhere for `eject_for`; then one request probes it, and a good
//! answer brings it back, as Envoy's consecutive-5xx detection does.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One route's standing as a target, shared by every serving thread.
#[derive(Default)]
pub(crate) struct TargetHealth {
    /// Failed attempts in a row, also outside the lock: a healthy target
    /// (the usual case) is answered with one atomic load.
    failing: AtomicU32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Failed attempts in a row.
    failures: u32,
    /// Skipped until then; a probe is let through once it has passed.
    ejected_until: Option<Instant>,
}

impl TargetHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when requests may go to this target now. Past the ejection,
    /// the first caller is the probe: the ejection is pushed back by
    /// `eject_for` for everyone else until the probe's answer decides.
    pub(crate) fn try_use(&self, eject_for: Duration) -> bool {
        self.try_use_at(Instant::now(), eject_for)
    }

    fn try_use_at(&self, now: Instant, eject_for: Duration) -> bool {
        if self.failing.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let mut state = self.state();
        match state.ejected_until {
            None => true,
            Some(until) if now >= until => {
                state.ejected_until = Some(now + eject_for);
                true
            }
            Some(_) => false,
        }
    }

    /// An attempt got an answer that is not retried: the target is good.
    pub(crate) fn succeeded(&self) {
        if self.failing.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut state = self.state();
        state.failures = 0;
        state.ejected_until = None;
        self.failing.store(0, Ordering::Relaxed);
    }

    /// An attempt failed (a `retry_on` match); true if this ejected it.
    pub(crate) fn failed(&self, eject_after: u32, eject_for: Duration) -> bool {
        let mut state = self.state();
        state.failures = state.failures.saturating_add(1);
        self.failing.store(state.failures, Ordering::Relaxed);
        if state.failures >= eject_after {
            let newly = state.ejected_until.is_none();
            state.ejected_until = Some(Instant::now() + eject_for);
            return newly;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL_DOWN: Duration = Duration::from_secs(30);

    #[test]
    fn ejected_after_failures_in_a_row_then_probed_once() {
        let health = TargetHealth::default();
        assert!(!health.failed(3, COOL_DOWN));
        health.succeeded();
        assert!(!health.failed(3, COOL_DOWN));
        assert!(!health.failed(3, COOL_DOWN));
        assert!(health.try_use(COOL_DOWN), "two in a row is not three");
        assert!(health.failed(3, COOL_DOWN), "ejected");
        assert!(!health.try_use(COOL_DOWN));
        let later = Instant::now() + COOL_DOWN;
        assert!(health.try_use_at(later, COOL_DOWN), "the probe");
        assert!(!health.try_use_at(later, COOL_DOWN), "only one probe");
        health.succeeded();
        assert!(health.try_use(COOL_DOWN), "back");
    }
}

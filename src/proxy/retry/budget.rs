//! The retry budget: a route's retries are bounded by a share of its
//! requests over a sliding window, as Envoy's and linkerd's retry budgets
//! bound them, so an upstream that fails every request sees at most
//! `1 + retry_budget` times the traffic instead of `1 + retry_attempts`.

use std::sync::Mutex;

use tokio::time::Instant;

/// The window the share is counted over, in one-second buckets.
const WINDOW_SECONDS: usize = 10;

/// Retries always allowed per window, so that a route with little traffic
/// can still retry its occasional failure.
pub(crate) const MIN_RETRIES_PER_WINDOW: u64 = 10;

/// One route's budget, shared by every serving thread.
pub(crate) struct RetryBudget {
    percent: u64,
    epoch: Instant,
    window: Mutex<Window>,
}

/// Requests and retries per second of the last [`WINDOW_SECONDS`].
#[derive(Default)]
struct Window {
    /// `(second, requests, retries)`, indexed by second modulo the window.
    buckets: [(u64, u64, u64); WINDOW_SECONDS],
}

impl Window {
    /// The bucket of `second`, emptied if it last counted an older one.
    fn bucket(&mut self, second: u64) -> &mut (u64, u64, u64) {
        let bucket = &mut self.buckets[(second % WINDOW_SECONDS as u64) as usize];
        if bucket.0 != second {
            *bucket = (second, 0, 0);
        }
        bucket
    }

    /// Requests and retries in the window ending at `second`.
    fn totals(&self, second: u64) -> (u64, u64) {
        let oldest = second.saturating_sub(WINDOW_SECONDS as u64 - 1);
        self.buckets
            .iter()
            .filter(|(at, _, _)| (oldest..=second).contains(at))
            .fold((0, 0), |(requests, retries), (_, req, ret)| {
                (requests + req, retries + ret)
            })
    }
}

impl RetryBudget {
    /// A budget of `percent` retries per request.
    pub(crate) fn new(percent: u32) -> Self {
        Self {
            percent: u64::from(percent),
            epoch: Instant::now(),
            window: Mutex::default(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.duration_since(self.epoch).as_secs()
    }

    /// A request that may be retried arrived `now`.
    pub(crate) fn request(&self, now: Instant) {
        let second = self.second(now);
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        window.bucket(second).1 += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn try_retry(&self) -> bool {
        self.try_retry_at(Instant::now())
    }

    fn try_retry_at(&self, now: Instant) -> bool {
        let second = self.second(now);
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, retries) = window.totals(second);
        let allowed = (requests * self.percent / 100).max(MIN_RETRIES_PER_WINDOW);
        if retries >= allowed {
            return false;
        }
        window.bucket(second).2 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_with_a_floor() {
        let budget = RetryBudget::new(20);
        for _ in 0..100 {
            budget.request(Instant::now());
        }
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 20, "20% of 100 requests");

        // Little traffic still gets the floor.
        let quiet = RetryBudget::new(20);
        quiet.request(Instant::now());
        let granted = (0..100).filter(|_| quiet.try_retry()).count();
        assert_eq!(granted as u64, MIN_RETRIES_PER_WINDOW);
    }

    #[test]
    fn the_window_slides() {
        let budget = RetryBudget::new(20);
        while budget.try_retry() {}
        assert!(!budget.try_retry(), "spent");
        let later = Instant::now() + std::time::Duration::from_secs(WINDOW_SECONDS as u64 + 1);
        assert!(budget.try_retry_at(later), "a new window, a new floor");
    }
}

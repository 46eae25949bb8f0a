//! Whether the shared store answers, as this replica saw it: degraded since when, when to try it
//! again (an outage costs one store timeout per [`STORE_RETRY_MS`], not one per request), and
//! when a long degradation is worth an error log. Every method takes `now` (unix ms).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long the shared store is left alone after it failed, before the next request tries it.
pub const STORE_RETRY_MS: u64 = 250;
/// A long degradation is logged at most this often.
pub const LOG_EVERY_MS: u64 = 60_000;

/// A change of the store's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Degraded,
    Recovered,
}

#[derive(Debug, Default)]
pub struct Health {
    degraded: AtomicBool,
    /// When the current degradation began (0 = healthy).
    since_ms: AtomicU64,
    /// Until then requests skip the shared store.
    retry_at_ms: AtomicU64,
    /// When a long degradation was last logged.
    logged_ms: AtomicU64,
}

impl Health {
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// How long the store has been unreachable (zero when it answers).
    pub fn degraded_for(&self, now_ms: u64) -> Duration {
        let since = self.since_ms.load(Ordering::Relaxed);
        if !self.degraded() || since == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms.saturating_sub(since))
    }

    /// Whether to try the shared store now (always, unless it failed moments ago).
    pub fn try_shared(&self, now_ms: u64) -> bool {
        !self.degraded() || now_ms >= self.retry_at_ms.load(Ordering::Relaxed)
    }

    /// Records the outcome of a store call; says when it changed the health.
    pub fn mark(&self, failed: bool, now_ms: u64) -> Option<Change> {
        if failed {
            self.retry_at_ms
                .store(now_ms.saturating_add(STORE_RETRY_MS), Ordering::Relaxed);
        }
        match (self.degraded.swap(failed, Ordering::Relaxed), failed) {
            (false, true) => {
                self.since_ms.store(now_ms, Ordering::Relaxed);
                Some(Change::Degraded)
            }
            (true, false) => {
                self.since_ms.store(0, Ordering::Relaxed);
                Some(Change::Recovered)
            }
            _ => None,
        }
    }

    /// Whether a degradation longer than `max_ms` should be logged now (once a minute).
    pub fn log_long(&self, now_ms: u64, max_ms: u64) -> bool {
        if self.degraded_for(now_ms).as_millis() as u64 <= max_ms {
            return false;
        }
        let last = self.logged_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= LOG_EVERY_MS)
            && self
                .logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure degrades and holds the store off for 250 ms; a success recovers; how long it
    /// lasted is known; a long degradation is logged once a minute past the limit.
    #[test]
    fn degrade_retry_recover_and_log() {
        let h = Health::default();
        assert!(h.try_shared(0));
        assert_eq!(h.mark(true, 1_000), Some(Change::Degraded));
        assert_eq!(h.mark(true, 1_010), None, "already degraded");
        assert!(!h.try_shared(1_100));
        assert!(h.try_shared(1_010 + STORE_RETRY_MS));
        assert_eq!(h.degraded_for(31_000), Duration::from_secs(30));
        assert!(!h.log_long(31_000, 30_000), "not longer than the limit yet");
        assert!(h.log_long(31_001, 30_000));
        assert!(!h.log_long(60_000, 30_000), "once a minute");
        assert!(h.log_long(31_001 + LOG_EVERY_MS, 30_000));
        assert_eq!(h.mark(false, 100_000), Some(Change::Recovered));
        assert_eq!(h.degraded_for(200_000), Duration::ZERO);
        assert!(h.try_shared(100_001));
        assert!(!h.log_long(500_000, 30_000));
    }
}

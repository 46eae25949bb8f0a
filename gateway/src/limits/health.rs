//! Whether the shared store answers, as this replica saw it: degraded since when, when to try it
//! again (an outage costs one store timeout per [`STORE_RETRY_MS`], not one per request), and
//! when a long degradation is worth an error log. Every method takes `now` (unix ms).

use parking_lot::Mutex;
use std::collections::HashMap;
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

/// The store's health, per partition: a Redis Cluster's slots (a master that died makes only
/// its slots unreachable; the others keep enforcing exactly), or one partition (0) for a
/// store on one server.
#[derive(Debug, Default)]
pub struct Health {
    /// Failed partitions, each with the time (unix ms) before which requests skip it.
    failed: Mutex<HashMap<u16, u64>>,
    /// Whether `failed` holds anything: the healthy path reads only this.
    degraded: AtomicBool,
    /// When the current degradation began (0 = healthy).
    since_ms: AtomicU64,
    /// When a long degradation was last logged.
    logged_ms: AtomicU64,
}

impl Health {
    /// Whether some partition of the store is unreachable.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Whether partition `part` is unreachable.
    pub fn degraded_in(&self, part: u16) -> bool {
        self.degraded() && self.failed.lock().contains_key(&part)
    }

    /// How long some partition has been unreachable (zero when all answer).
    pub fn degraded_for(&self, now_ms: u64) -> Duration {
        let since = self.since_ms.load(Ordering::Relaxed);
        if !self.degraded() || since == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms.saturating_sub(since))
    }

    /// Whether to try partition `part` of the shared store now (always, unless it failed
    /// moments ago).
    pub fn try_shared(&self, part: u16, now_ms: u64) -> bool {
        !self.degraded()
            || self
                .failed
                .lock()
                .get(&part)
                .is_none_or(|&retry_at| now_ms >= retry_at)
    }

    /// Records the outcome of a call to partition `part`; says when it changed the health of
    /// the store as a whole (first partition failed, last one recovered).
    pub fn mark(&self, part: u16, failed: bool, now_ms: u64) -> Option<Change> {
        if !failed && !self.degraded() {
            return None;
        }
        let mut parts = self.failed.lock();
        let was = !parts.is_empty();
        if failed {
            parts.insert(part, now_ms.saturating_add(STORE_RETRY_MS));
        } else {
            parts.remove(&part);
        }
        let is = !parts.is_empty();
        self.degraded.store(is, Ordering::Relaxed);
        match (was, is) {
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
        assert!(h.try_shared(0, 0));
        assert_eq!(h.mark(0, true, 1_000), Some(Change::Degraded));
        assert_eq!(h.mark(0, true, 1_010), None, "already degraded");
        assert!(!h.try_shared(0, 1_100));
        assert!(h.try_shared(0, 1_010 + STORE_RETRY_MS));
        assert_eq!(h.degraded_for(31_000), Duration::from_secs(30));
        assert!(!h.log_long(31_000, 30_000), "not longer than the limit yet");
        assert!(h.log_long(31_001, 30_000));
        assert!(!h.log_long(60_000, 30_000), "once a minute");
        assert!(h.log_long(31_001 + LOG_EVERY_MS, 30_000));
        assert_eq!(h.mark(0, false, 100_000), Some(Change::Recovered));
        assert_eq!(h.degraded_for(200_000), Duration::ZERO);
        assert!(h.try_shared(0, 100_001));
        assert!(!h.log_long(500_000, 30_000));
    }

    /// A failed cluster slot holds off only that slot: the others are tried as usual; the
    /// store counts as recovered only once every failed slot answered again.
    #[test]
    fn partitions_fail_and_recover_alone() {
        let h = Health::default();
        assert_eq!(h.mark(7, true, 1_000), Some(Change::Degraded));
        assert!(!h.try_shared(7, 1_100), "the failed slot waits");
        assert!(h.try_shared(8, 1_100), "another slot is tried at once");
        assert!(h.degraded_in(7) && !h.degraded_in(8));
        assert_eq!(
            h.mark(8, false, 1_100),
            None,
            "a healthy slot changes nothing"
        );
        assert_eq!(h.mark(9, true, 1_200), None, "already degraded");
        assert_eq!(h.mark(7, false, 1_300), None, "slot 9 still down");
        assert!(h.degraded() && !h.degraded_in(7));
        assert_eq!(h.degraded_for(2_000), Duration::from_millis(1_000));
        assert_eq!(h.mark(9, false, 1_400), Some(Change::Recovered));
        assert!(!h.degraded());
    }
}

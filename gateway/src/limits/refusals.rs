//! A per-replica memory of recent refusals, so that a disabled consumer, or one whose quota is
//! spent, is refused before its prompt is read or tokenized: a spent quota must not buy a
//! client a replica's CPU. No store call: entries come from the store's own refusals and live
//! at most [`REMEMBER_MS`], so an operator's change applies within that time.

use crate::error::Error;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Longest a refusal is remembered (an operator's `disabled 0` or larger quota applies within).
pub const REMEMBER_MS: u64 = 1_000;
/// Consumers remembered before the memory starts over (a bound against key-spraying).
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy, Debug)]
enum Why {
    Disabled,
    /// The quota had `remaining` tokens; its window ends at `window_end_ms`.
    Quota {
        remaining: u64,
        window_end_ms: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    why: Why,
    until_ms: u64,
}

#[derive(Default)]
pub struct Refusals {
    map: RwLock<HashMap<String, Entry>>,
    /// Whether the map may hold anything (the common case reads one atomic, no lock).
    any: AtomicBool,
}

impl Refusals {
    pub fn disabled(&self, consumer: &str, now_ms: u64) {
        self.put(consumer, Why::Disabled, now_ms + REMEMBER_MS);
    }

    pub fn quota(&self, consumer: &str, remaining: i64, retry_after_ms: u64, now_ms: u64) {
        let window_end_ms = now_ms + retry_after_ms;
        let why = Why::Quota {
            remaining: remaining.max(0) as u64,
            window_end_ms,
        };
        self.put(consumer, why, (now_ms + REMEMBER_MS).min(window_end_ms));
    }

    fn put(&self, consumer: &str, why: Why, until_ms: u64) {
        let mut m = self.map.write();
        if m.len() >= MAX_ENTRIES {
            m.clear();
        }
        m.insert(consumer.to_string(), Entry { why, until_ms });
        self.any.store(true, Ordering::Relaxed);
    }

    /// Forgets a consumer the store just admitted.
    pub fn admitted(&self, consumer: &str) {
        if self.any.load(Ordering::Relaxed) && self.map.read().contains_key(consumer) {
            let mut m = self.map.write();
            m.remove(consumer);
            if m.is_empty() {
                self.any.store(false, Ordering::Relaxed);
            }
        }
    }

    /// The refusal this consumer would get again: disabled, or (when `at_least` tokens are
    /// known to be needed) a quota with fewer than that left.
    pub fn check(&self, consumer: &str, at_least: Option<u64>, now_ms: u64) -> Option<Error> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let e = *self.map.read().get(consumer)?;
        if e.until_ms <= now_ms {
            return None;
        }
        match e.why {
            Why::Disabled => Some(Error::ConsumerDisabled),
            Why::Quota {
                remaining,
                window_end_ms,
            } if at_least.is_some_and(|n| n > remaining) => Some(Error::QuotaExceeded {
                retry_after_ms: window_end_ms.saturating_sub(now_ms).max(1),
            }),
            Why::Quota { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal is remembered for at most a second, a quota only against requests that need
    /// more than was left, and an admission forgets it.
    #[test]
    fn remembers_briefly_and_precisely() {
        let r = Refusals::default();
        assert!(r.check("a", Some(1), 0).is_none());
        r.disabled("a", 1_000);
        assert!(matches!(
            r.check("a", None, 1_500),
            Some(Error::ConsumerDisabled)
        ));
        assert!(r.check("a", None, 2_000).is_none(), "expired");
        r.quota("q", 100, 30_000, 10_000);
        assert!(
            r.check("q", None, 10_001).is_none(),
            "size unknown: ask the store"
        );
        assert!(r.check("q", Some(100), 10_001).is_none(), "would fit");
        match r.check("q", Some(101), 10_500) {
            Some(Error::QuotaExceeded { retry_after_ms }) => assert_eq!(retry_after_ms, 29_500),
            other => panic!("{other:?}"),
        }
        r.admitted("q");
        assert!(r.check("q", Some(101), 10_500).is_none());
        // A window that ends sooner than a second ends the memory with it.
        r.quota("w", 0, 200, 0);
        assert!(r.check("w", Some(1), 100).is_some());
        assert!(r.check("w", Some(1), 200).is_none());
    }
}

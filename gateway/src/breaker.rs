//! Circuit breaking per backend: failures (listed statuses, connect errors, timeouts) counted in
//! a rolling window trip the backend for `trip_ms`; a 429 carrying `retry-after(-ms)` trips it
//! for exactly that long when `accept_retry_after` is set. Routing reads the result from each
//! backend's `open_until_ms`, so it never waits on this module.
//!
//! This replica keeps its own counts; state shared across the cluster through the store comes
//! with the PTU-first routing work (issue 5).

use crate::routing::{Backend, now_ms};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

#[derive(Default)]
pub struct Breakers {
    windows: Mutex<HashMap<Arc<str>, VecDeque<u64>>>,
}

impl Breakers {
    /// A transport failure or timeout.
    pub fn failure(&self, b: &Backend, retry_after_ms: Option<u64>) {
        self.count(b, retry_after_ms);
    }

    /// A failure status; only the breaker's listed statuses count.
    pub fn failure_status(&self, b: &Backend, status: u16, retry_after_ms: Option<u64>) {
        if b.config.breaker.statuses.contains(&status) {
            let ra = if status == 429 && b.config.breaker.accept_retry_after {
                retry_after_ms
            } else {
                None
            };
            self.count(b, ra);
        }
    }

    fn count(&self, b: &Backend, retry_after_ms: Option<u64>) {
        let now = now_ms();
        let cfg = &b.config.breaker;
        if let Some(ms) = retry_after_ms.filter(|ms| *ms > 0) {
            b.trip_until(now + ms);
            tracing::info!(backend = %b.name, trip_ms = ms, "circuit open (retry-after)");
            return;
        }
        let mut w = self.windows.lock();
        let q = w.entry(b.name.clone()).or_default();
        q.push_back(now);
        while q.front().is_some_and(|t| *t + cfg.window_ms <= now) {
            q.pop_front();
        }
        if q.len() >= cfg.failures as usize {
            q.clear();
            b.trip_until(now + cfg.trip_ms);
            tracing::info!(backend = %b.name, trip_ms = cfg.trip_ms, "circuit open (failures)");
        }
    }

    pub fn success(&self, _b: &Backend) {}

    /// The backend's reported utilization (0..1).
    pub fn utilization(&self, _b: &Backend, _u: f64) {}
}

//! Circuits in memory: the twins of `breaker_failure.lua`, `breaker_probe.lua` and
//! `breaker_close.lua`, with change events sent in-process instead of over pub/sub.

use super::MemoryStore;
use crate::Result;
use crate::model::*;

#[derive(Default, Clone)]
pub(super) struct Circuit {
    open_until_ms: u64,
    trip: u64,
    probe_trip: Option<u64>,
    probe_at_ms: u64,
    failures: std::collections::VecDeque<u64>,
}

impl MemoryStore {
    pub(super) fn breaker_failure_now(
        &self,
        backend: &str,
        f: &BreakerFailure,
    ) -> Result<BreakerState> {
        let f = &f.bounded();
        let now = self.clock.now_us() / 1000;
        let mut g = self.inner.lock();
        let c = g.circuits.entry(backend.to_string()).or_default();
        let mut trip_for = f.trip_for_ms.or(f.probe.then_some(f.trip_ms));
        if trip_for.is_none() {
            c.failures.push_back(now);
            while c.failures.front().is_some_and(|t| *t + f.window_ms <= now) {
                c.failures.pop_front();
            }
            if c.failures.len() >= f.failures as usize {
                trip_for = Some(f.trip_ms);
            }
        }
        let mut changed = false;
        if let Some(ms) = trip_for {
            let until = now + ms;
            if until > c.open_until_ms {
                if c.open_until_ms <= now {
                    c.trip += 1;
                }
                c.open_until_ms = until;
                c.failures.clear();
                changed = true;
            }
        }
        let state = BreakerState {
            backend: backend.to_string(),
            open_until_ms: c.open_until_ms,
            trip: c.trip,
            now_ms: now,
        };
        drop(g);
        if changed {
            let _ = self.events.send(state.clone());
        }
        Ok(state)
    }

    pub(super) fn breaker_close_now(&self, backend: &str) -> Result<bool> {
        let now = self.clock.now_us() / 1000;
        let mut g = self.inner.lock();
        let Some(c) = g.circuits.get_mut(backend) else {
            return Ok(false);
        };
        if c.open_until_ms == 0 {
            return Ok(false);
        }
        c.open_until_ms = 0;
        c.probe_trip = None;
        c.failures.clear();
        let state = BreakerState {
            backend: backend.to_string(),
            open_until_ms: 0,
            trip: c.trip,
            now_ms: now,
        };
        drop(g);
        let _ = self.events.send(state);
        Ok(true)
    }

    pub(super) fn breaker_probe_now(&self, backend: &str, lease_ms: u64) -> Result<bool> {
        let now = self.clock.now_us() / 1000;
        let mut g = self.inner.lock();
        let Some(c) = g.circuits.get_mut(backend) else {
            return Ok(false);
        };
        if c.open_until_ms == 0 || c.open_until_ms > now {
            return Ok(false);
        }
        if c.probe_trip == Some(c.trip) && now.saturating_sub(c.probe_at_ms) < lease_ms.max(1) {
            return Ok(false);
        }
        c.probe_trip = Some(c.trip);
        c.probe_at_ms = now;
        Ok(true)
    }

    pub(super) fn breaker_states_now(&self, backends: &[String]) -> Result<Vec<BreakerState>> {
        let now = self.clock.now_us() / 1000;
        let g = self.inner.lock();
        Ok(backends
            .iter()
            .map(|b| {
                let c = g.circuits.get(b).cloned().unwrap_or_default();
                BreakerState {
                    backend: b.clone(),
                    open_until_ms: c.open_until_ms,
                    trip: c.trip,
                    now_ms: now,
                }
            })
            .collect())
    }
}

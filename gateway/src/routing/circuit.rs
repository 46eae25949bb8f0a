//! A backend's circuit as this replica knows it: the one owner of that state. The store holds
//! the cluster's truth (`tg:breaker:{BACKEND}`, see [`super::breaker`]); this is the local copy
//! that routing reads without a store call, updated from pub/sub events, periodic reads, and
//! this replica's own observations. Every transition takes `now` (unix ms, this replica's
//! clock) so it can be tested without waiting.
//!
//! ```text
//!  closed ──trip(until)──► open ──now ≥ until──► half-open ──close()──► closed
//!                           ▲                        │
//!                           └──── a failed probe ────┘
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tollgate_quota::{BreakerState, MAX_TRIP_MS};

/// How often a replica asks for the probe lease of a half-open backend.
pub const PROBE_ASK_INTERVAL_MS: u64 = 200;
/// How long a backend that reported high utilization is passed over.
pub const SPILL_MS: u64 = 1_000;

/// What routing may do with a backend now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    /// Tripped until then (unix ms): no request goes.
    Open {
        until_ms: u64,
    },
    /// The trip's time is up but nothing closed it: only the trip's one probe may go.
    HalfOpen,
}

impl CircuitState {
    /// The `tollgate_breaker_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open { .. } => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

/// The local state of one backend's circuit (lock-free: read on every request).
#[derive(Debug, Default)]
pub struct Circuit {
    /// Open until this unix time (ms, this replica's clock); 0 = never tripped or closed.
    open_until_ms: AtomicU64,
    /// Tripped and not closed since: once `open_until_ms` passes it is half-open.
    tripped: AtomicBool,
    /// The last trip number seen from the store (a state of an older trip is stale).
    trip_seen: AtomicU64,
    /// When this replica last asked for the probe lease.
    probe_asked_ms: AtomicU64,
    /// Passed over until then: it reported utilization above `spill_utilization`.
    spill_until_ms: AtomicU64,
}

impl Circuit {
    pub fn state(&self, now_ms: u64) -> CircuitState {
        let until = self.open_until_ms.load(Ordering::Relaxed);
        if until > now_ms {
            CircuitState::Open { until_ms: until }
        } else if self.tripped.load(Ordering::Relaxed) {
            CircuitState::HalfOpen
        } else {
            CircuitState::Closed
        }
    }

    /// Stops sending to the backend until `until_ms` (a `retry-after` seen by this replica),
    /// before the store's answer says whether the circuit tripped. A later end never moves back.
    pub fn hold(&self, until_ms: u64) {
        self.open_until_ms.fetch_max(until_ms, Ordering::Relaxed);
    }

    /// Trips the circuit until `until_ms` on this replica's own count (the store is
    /// unreachable): half-open afterwards, like a trip the store recorded.
    pub fn trip(&self, until_ms: u64) {
        self.hold(until_ms);
        self.tripped.store(true, Ordering::Relaxed);
    }

    /// Closes a half-open circuit (a probe, or a request after the trip, succeeded). Returns
    /// whether it was half-open: an open circuit stays open (a success of a request sent before
    /// the trip never cuts it short), a closed one has nothing to close.
    pub fn close_if_half_open(&self, now_ms: u64) -> bool {
        if self.state(now_ms) != CircuitState::HalfOpen {
            return false;
        }
        self.close();
        true
    }

    /// Closes the circuit whatever its state (the trip's probe succeeded).
    pub fn close(&self) {
        self.open_until_ms.store(0, Ordering::Relaxed);
        self.tripped.store(false, Ordering::Relaxed);
    }

    /// Mirrors the store's state of the circuit. The store's clock is translated into this
    /// replica's: only the time left is used, and no trip outlasts [`MAX_TRIP_MS`]. A state of
    /// an older trip than one already seen (a periodic read racing a pub/sub message) is
    /// ignored, a close included.
    pub fn apply(&self, st: &BreakerState, now_ms: u64) {
        let seen = self.trip_seen.fetch_max(st.trip, Ordering::Relaxed);
        if st.trip < seen {
            return;
        }
        if st.open_until_ms == 0 {
            self.close();
            return;
        }
        self.tripped.store(true, Ordering::Relaxed);
        let until = now_ms.saturating_add(st.open_for_ms().min(MAX_TRIP_MS));
        // A newer trip replaces the old one; the same trip never moves back.
        if st.trip > seen {
            self.open_until_ms.store(until, Ordering::Relaxed);
        } else {
            self.open_until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Whether this replica may ask the store for the probe lease now (at most once per
    /// [`PROBE_ASK_INTERVAL_MS`], one request at a time).
    pub fn may_ask_probe(&self, now_ms: u64) -> bool {
        let asked = self.probe_asked_ms.load(Ordering::Relaxed);
        now_ms >= asked.saturating_add(PROBE_ASK_INTERVAL_MS)
            && self
                .probe_asked_ms
                .compare_exchange(asked, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The backend reported utilization above its `spill_utilization`.
    pub fn spill(&self, now_ms: u64) {
        self.spill_until_ms
            .store(now_ms.saturating_add(SPILL_MS), Ordering::Relaxed);
    }

    /// Whether new requests should prefer the next priority group.
    pub fn spilling(&self, now_ms: u64) -> bool {
        self.spill_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(open_until_ms: u64, trip: u64, now_ms: u64) -> BreakerState {
        BreakerState {
            backend: "b".into(),
            open_until_ms,
            trip,
            now_ms,
        }
    }

    /// Closed → open (a local trip) → half-open when the time is up → closed by a success; a
    /// hold (a retry-after the store has not confirmed) ends closed.
    #[test]
    fn local_trip_and_recovery() {
        let h = Circuit::default();
        h.hold(2_000);
        assert_eq!(h.state(1_999), CircuitState::Open { until_ms: 2_000 });
        assert_eq!(h.state(2_000), CircuitState::Closed);
        let c = Circuit::default();
        assert_eq!(c.state(1_000), CircuitState::Closed);
        assert!(!c.close_if_half_open(1_000), "nothing to close");
        c.trip(5_000);
        assert_eq!(c.state(1_000), CircuitState::Open { until_ms: 5_000 });
        c.trip(3_000);
        assert_eq!(
            c.state(1_000),
            CircuitState::Open { until_ms: 5_000 },
            "a trip never moves back"
        );
        assert!(
            !c.close_if_half_open(4_999),
            "a success before the end never cuts a trip short"
        );
        assert_eq!(c.state(5_000), CircuitState::HalfOpen);
        assert!(c.close_if_half_open(5_000));
        assert_eq!(c.state(5_000), CircuitState::Closed);
        assert_eq!(
            [0, 1, 2],
            [
                CircuitState::Closed.gauge(),
                CircuitState::Open { until_ms: 1 }.gauge(),
                CircuitState::HalfOpen.gauge()
            ]
        );
    }

    /// The store's states: translated to this replica's clock, newer trips replace older ones,
    /// stale states (an older trip) are ignored, a close of the current trip closes.
    #[test]
    fn store_states_apply_in_order() {
        let c = Circuit::default();
        // Trip 1 on the store: open 30 s from the store's now, whatever this replica's clock.
        c.apply(&stored(1_030_000, 1, 1_000_000), 50);
        assert_eq!(c.state(50), CircuitState::Open { until_ms: 30_050 });
        // The same trip read again with less time left does not shorten it.
        c.apply(&stored(1_030_000, 1, 1_020_000), 60);
        assert_eq!(c.state(60), CircuitState::Open { until_ms: 30_050 });
        // A stale read of trip 0 (closed) is ignored.
        c.apply(&stored(0, 0, 1_020_000), 70);
        assert_eq!(c.state(70), CircuitState::Open { until_ms: 30_050 });
        // Trip 2 replaces trip 1, even with an earlier end.
        c.apply(&stored(1_021_000, 2, 1_020_000), 80);
        assert_eq!(c.state(80), CircuitState::Open { until_ms: 1_080 });
        assert_eq!(c.state(1_080), CircuitState::HalfOpen);
        // The close of trip 2 closes.
        c.apply(&stored(0, 2, 1_021_500), 1_100);
        assert_eq!(c.state(1_100), CircuitState::Closed);
        // However far ahead a store says, a trip lasts at most MAX_TRIP_MS.
        c.apply(&stored(u64::MAX, 3, 0), 0);
        assert_eq!(
            c.state(0),
            CircuitState::Open {
                until_ms: MAX_TRIP_MS
            }
        );
    }

    /// The probe lease is asked at most once per interval; spilling lasts a second.
    #[test]
    fn probe_asks_and_spill() {
        let c = Circuit::default();
        assert!(c.may_ask_probe(1_000));
        assert!(!c.may_ask_probe(1_000 + PROBE_ASK_INTERVAL_MS - 1));
        assert!(c.may_ask_probe(1_000 + PROBE_ASK_INTERVAL_MS));
        assert!(!c.spilling(0));
        c.spill(10_000);
        assert!(c.spilling(10_000 + SPILL_MS - 1));
        assert!(!c.spilling(10_000 + SPILL_MS));
    }
}

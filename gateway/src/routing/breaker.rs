//! Circuit breaking per backend, shared by every replica.
//!
//! Failures (the breaker's listed statuses, connect errors, timeouts) are counted in a rolling
//! window in the store by one script; when the window is full — or at once for a 429 carrying
//! `retry-after(-ms)` when `accept_retry_after` is set — the circuit opens for `trip_ms` (or
//! exactly the retry-after, believed up to `breaker.max_retry_after_ms`) and the change is
//! published to every replica, which keeps it in each backend's local state: routing reads
//! only that, never the store. When a trip's time is
//! up the circuit is half-open: exactly one replica in the cluster wins the probe lease and
//! sends one real request as the probe (a success closes the circuit everywhere, a failure
//! re-opens it); the others keep away until they hear the result.
//!
//! Store calls happen off the request's way (spawned) except the probe lease, which only a
//! request that would otherwise skip a half-open backend asks for. While the store is
//! unreachable each replica counts failures on its own.

use super::{Backend, Routes};
use crate::clock::now_ms;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tollgate_quota::{AnyStore, BreakerFailure, BreakerState, Store};
/// How often the full circuit state is re-read, healing any lost pub/sub message.
const SYNC_INTERVAL: Duration = Duration::from_secs(2);

pub struct Breakers {
    store: AnyStore,
    /// Failure windows counted here while the store is unreachable.
    local: Mutex<HashMap<Arc<str>, VecDeque<u64>>>,
}

impl Breakers {
    pub fn new(store: AnyStore) -> Arc<Breakers> {
        Arc::new(Breakers {
            store,
            local: Mutex::new(HashMap::new()),
        })
    }

    /// Starts following the shared circuit state: pub/sub events and a periodic full read.
    pub fn start(self: &Arc<Self>, routes: &Routes) -> Vec<JoinHandle<()>> {
        let by_name: Arc<HashMap<String, Arc<Backend>>> = Arc::new(
            routes
                .backends
                .iter()
                .map(|b| (b.name.to_string(), b.clone()))
                .collect(),
        );
        let mut events = self.store.breaker_events();
        let listener = {
            let by_name = by_name.clone();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(st) => {
                            if let Some(b) = by_name.get(&st.backend) {
                                apply(b, &st);
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    }
                }
            })
        };
        let store = self.store.clone();
        let sync = tokio::spawn(async move {
            let names: Vec<String> = by_name.keys().cloned().collect();
            let mut tick = tokio::time::interval(SYNC_INTERVAL);
            loop {
                tick.tick().await;
                if let Ok(states) = store.breaker_states(&names).await {
                    for st in states {
                        if let Some(b) = by_name.get(&st.backend) {
                            apply(b, &st);
                        }
                    }
                }
            }
        });
        vec![listener, sync]
    }

    /// A failed attempt: a transport error or timeout (`status` None) or a failure status.
    /// `probe` says the attempt was the trip's probe.
    pub fn failure(
        self: &Arc<Self>,
        b: &Arc<Backend>,
        status: Option<u16>,
        retry_after_ms: Option<u64>,
        probe: bool,
    ) {
        let cfg = &b.config.breaker;
        let counts = status.is_none_or(|s| cfg.statuses.contains(&s));
        if !counts && !probe {
            return;
        }
        let trip_for_ms = match (status, cfg.accept_retry_after) {
            (Some(429), true) => retry_after_ms
                .filter(|ms| *ms > 0)
                .map(|ms| ms.min(cfg.max_retry_after_ms)),
            _ => None,
        };
        // This replica stops at once; the store tells the others.
        if let Some(ms) = trip_for_ms {
            b.circuit.hold(now_ms().saturating_add(ms));
        }
        let failure = BreakerFailure {
            failures: cfg.failures,
            window_ms: cfg.window_ms,
            trip_ms: cfg.trip_ms,
            trip_for_ms,
            probe,
        };
        let (me, b) = (self.clone(), b.clone());
        tokio::spawn(async move {
            match me.store.breaker_failure(&b.name, &failure).await {
                Ok(st) => {
                    if st.open_until_ms != 0 {
                        tracing::info!(
                            backend = %b.name,
                            open_ms = st.open_for_ms(),
                            trip = st.trip,
                            "circuit open"
                        );
                    }
                    apply(&b, &st);
                }
                Err(e) => {
                    tracing::debug!(backend = %b.name, error = %e, "breaker store call failed");
                    me.count_locally(&b, &failure);
                }
            }
        });
    }

    /// A successful attempt. Only a probe (or a success on a backend this replica still
    /// believes tripped) costs a store call: it closes the circuit for everyone.
    pub fn success(self: &Arc<Self>, b: &Arc<Backend>, probe: bool) {
        // A request sent before the trip may still succeed: that never cuts a trip short.
        if probe {
            b.circuit.close();
        } else if !b.circuit.close_if_half_open(now_ms()) {
            return;
        }
        let (store, b) = (self.store.clone(), b.clone());
        tokio::spawn(async move {
            match store.breaker_close(&b.name).await {
                Ok(true) => tracing::info!(backend = %b.name, "circuit closed"),
                Ok(false) => {}
                Err(e) => tracing::debug!(backend = %b.name, error = %e, "breaker close failed"),
            }
        });
    }

    /// Whether this request may be the probe of a half-open backend (true for one request in
    /// the cluster per trip).
    pub async fn try_probe(&self, b: &Backend) -> bool {
        if !b.circuit.may_ask_probe(now_ms()) {
            return false;
        }
        let lease_ms = b.config.timeouts.first_byte_ms + 1_000;
        // No store to agree with: this replica probes for itself.
        self.store
            .breaker_probe(&b.name, lease_ms)
            .await
            .unwrap_or(true)
    }

    /// The breaker's verdict while the store is unreachable: a window per replica.
    fn count_locally(&self, b: &Backend, f: &BreakerFailure) {
        let now = now_ms();
        if let Some(ms) = f.trip_for_ms.or(f.probe.then_some(f.trip_ms)) {
            b.circuit.trip(now.saturating_add(ms));
            return;
        }
        let mut w = self.local.lock();
        let q = w.entry(b.name.clone()).or_default();
        q.push_back(now);
        while q.front().is_some_and(|t| *t + f.window_ms <= now) {
            q.pop_front();
        }
        if q.len() >= f.failures as usize {
            q.clear();
            b.circuit.trip(now.saturating_add(f.trip_ms));
            tracing::info!(backend = %b.name, trip_ms = f.trip_ms, "circuit open (local count)");
        }
    }

    /// The backend's reported utilization (0..1): above its `spill_utilization`, new requests
    /// go to the next priority group for a moment, before it starts answering 429.
    pub fn utilization(&self, b: &Backend, u: f64) {
        if let Some(limit) = b.config.spill_utilization
            && u > limit
        {
            b.circuit.spill(now_ms());
        }
    }
}

/// Mirrors a stored circuit into the backend's local state.
fn apply(b: &Backend, st: &BreakerState) {
    b.circuit.apply(st, now_ms());
}

//! The `local` failure policy: while the shared store is unreachable, this replica enforces its
//! share (1/N, N from heartbeats) of every known consumer's limits in its own memory store. The
//! shares come from the configuration and from what the store last said ([`Learned`]). A
//! flapping store never hands out a fresh allowance more than once a minute.

use super::Limits;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tollgate_common::config::OnError;
use tollgate_quota::{Admission, Budget, ConsumerRecord, Period, Store};

/// The local counters start afresh at most this often.
const RESET_EVERY_MS: u64 = 60_000;

/// What this replica last learned of a consumer's limits from the shared store, so it can
/// keep enforcing a share of them while the store is unreachable (`on_error = "local"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Learned {
    team: String,
    tpm: Option<u64>,
    /// Quota left in the current window at the last admission.
    quota_left: Option<u64>,
    quota_period: Period,
}

impl Limits {
    /// Writes this replica's share (1/N) of every known consumer's limits into the local store
    /// and starts its counters afresh.
    pub(super) fn rebuild_local(&self) {
        let n = self.replicas().max(1) as u64;
        let share = |v: Option<u64>| v.map(|v| v.div_ceil(n));
        let learned = self.learned.lock().clone();
        let mut records: HashMap<String, ConsumerRecord> = self
            .seeds
            .records()
            .map(|c| {
                let mut r = c.clone();
                r.tpm = share(r.tpm);
                r.quota = share(r.quota);
                r.budget = r.budget.map(|b| Budget {
                    limit_nano: b.limit_nano.div_ceil(n),
                    ..b
                });
                (r.id.clone(), r)
            })
            .collect();
        for (id, l) in learned {
            let base = self.seeds.record(&id).cloned().unwrap_or_default();
            records.insert(
                id.clone(),
                ConsumerRecord {
                    id,
                    team: l.team,
                    tpm: share(l.tpm),
                    quota: share(l.quota_left),
                    quota_period: l.quota_period,
                    models: base.models,
                    disabled: base.disabled,
                    budget: base.budget.map(|b| Budget {
                        limit_nano: b.limit_nano.div_ceil(n),
                        ..b
                    }),
                },
            );
        }
        let local = self.local.clone();
        // A flapping store must not hand out a fresh allowance on every failure: the local
        // counters start afresh at most once a minute.
        let now = self.clock.now_ms();
        let last = self.local_reset_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= RESET_EVERY_MS
            && self
                .local_reset_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            local.reset_counters();
        }
        for r in records.values() {
            // The memory store answers at once; this never waits.
            let _ = futures::FutureExt::now_or_never(local.put_consumer(r));
        }
    }

    pub(super) fn learn(&self, consumer: &str, a: &Admission) {
        if self.policy.on_error != OnError::Local {
            return;
        }
        let l = Learned {
            team: a.team.clone(),
            tpm: a.tpm,
            quota_left: a.remaining_quota.map(|q| q.max(0) as u64),
            quota_period: a.quota_period,
        };
        let mut g = self.learned.lock();
        match g.get_mut(consumer) {
            Some(old) if *old == l => {}
            Some(old) => *old = l,
            None => {
                g.insert(consumer.to_string(), l);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Policy;
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;
    use std::time::Duration;
    use tollgate_quota::{AnyStore, Decision, LimitDefaults, MemoryStore, ReserveRequest};

    fn limits(clock: Arc<ManualClock>) -> Arc<Limits> {
        let policy = Policy {
            on_error: OnError::Local,
            defaults: LimitDefaults::default(),
            timeout: Duration::from_millis(50),
            max_degraded_ms: 30_000,
            currency: "EUR".into(),
        };
        let rec = ConsumerRecord {
            id: "c".into(),
            quota: Some(1_000),
            quota_period: Period::Month,
            ..ConsumerRecord::default()
        };
        Limits::with_clock(
            AnyStore::Memory(MemoryStore::new()),
            policy,
            vec![(rec, vec![])],
            clock,
        )
    }

    async fn quota_left(l: &Limits, tokens: u64) -> Option<i64> {
        let req = ReserveRequest {
            consumer: "c",
            model: "m",
            tokens,
            defaults: &l.policy.defaults,
            require_record: true,
            id: tollgate_quota::new_reservation_id(),
            background: false,
            cost_nano: 0,
        };
        match l.local.reserve(&req).await.unwrap() {
            Decision::Admitted(a) => a.remaining_quota,
            other => panic!("{other:?}"),
        }
    }

    /// The local share is the configured limit over the live replicas, and a flapping store
    /// does not hand out a fresh share more than once a minute: counters reset on the first
    /// rebuild, not on one 30 s later, and again after a minute.
    #[tokio::test]
    async fn local_shares_reset_at_most_once_a_minute() {
        let clock = ManualClock::at(10_000_000);
        let l = limits(clock.clone());
        l.replicas.store(4, Ordering::Relaxed);
        l.rebuild_local();
        assert_eq!(
            quota_left(&l, 100).await,
            Some(250 - 100),
            "a quarter of 1000"
        );
        clock.advance(30_000);
        l.rebuild_local();
        assert_eq!(
            quota_left(&l, 0).await,
            Some(150),
            "no fresh share within a minute"
        );
        clock.advance(31_000);
        l.rebuild_local();
        assert_eq!(
            quota_left(&l, 0).await,
            Some(250),
            "a fresh share after a minute"
        );
    }
}

//! Leases: slices of a busy consumer's bucket and quota that a replica reserves in the store
//! ahead of use (a normal reservation, so the cluster can never over-admit), then admits from
//! without a store call until the slice is spent or [`LEASE_MS`] old; what is left goes back.
//! An operator's lowered limit or `disabled 1` therefore applies within [`LEASE_MS`].
//!
//! Under `on_error = "escrow"` a lease is also what a replica may still spend while the store
//! is unreachable: it was debited before the fault, so spending it cannot over-admit.

use std::collections::{HashMap, HashSet};
use tollgate_quota::Admission;

/// How long a lease lives.
pub const LEASE_MS: u64 = 250;
/// Requests per second on this replica that make a consumer busy enough to lease.
const BUSY_RPS: u64 = 20;

/// One leased slice.
pub struct Lease {
    /// The store's reservation id of the slice.
    pub id: u64,
    /// The model it was leased for (a lease passed that model's allow-list only).
    pub model: String,
    pub left: u64,
    pub expires_ms: u64,
    pub admission: Admission,
}

/// Requests and an amount (tokens, or money for a team) in this second and the last: what
/// makes a consumer or a team busy enough to lease, and the size of the next slice.
#[derive(Default)]
pub(super) struct Demand {
    second: u64,
    reqs: u64,
    amount: u64,
    last_reqs: u64,
    last_amount: u64,
}

impl Demand {
    pub(super) fn record(&mut self, now_ms: u64, amount: u64) {
        let sec = now_ms / 1000;
        if sec != self.second {
            (self.last_reqs, self.last_amount) = if sec == self.second + 1 {
                (self.reqs, self.amount)
            } else {
                (0, 0)
            };
            (self.second, self.reqs, self.amount) = (sec, 0, 0);
        }
        self.reqs += 1;
        self.amount += amount;
    }

    pub(super) fn busy(&self) -> bool {
        self.reqs.max(self.last_reqs) >= BUSY_RPS
    }

    /// A quarter second of the recent demand.
    pub(super) fn quarter_second(&self) -> u64 {
        self.amount.max(self.last_amount) / 4
    }

    /// Whether nothing was recorded in the last two seconds.
    pub(super) fn idle(&self, now_ms: u64) -> bool {
        self.second + 2 < now_ms / 1000
    }
}

/// A consumer's demand and its limits as last admitted (sizes the next lease).
#[derive(Default)]
struct Rate {
    demand: Demand,
    admission: Option<Admission>,
}

/// Leases by consumer and model (a lease passed the model allow-list for that model only).
pub type Key = (String, String);

/// What a request found.
pub enum Take {
    /// Admitted from the lease; the admission's remaining counts include the lease.
    Admitted(Admission),
    /// No lease covers it. `ask`: the consumer is busy and nobody is asking for a lease yet
    /// (the caller now is: it must call [`Leases::asked`] when done).
    Miss { ask: bool },
}

#[derive(Default)]
pub struct Leases {
    active: HashMap<Key, Lease>,
    rates: HashMap<String, Rate>,
    /// Lease requests in flight, so a busy consumer asks once at a time.
    asking: HashSet<Key>,
    /// Expired leases the store did not take back yet (retried with the next expired ones).
    unreturned: Vec<(String, Lease)>,
}

impl Leases {
    /// Counts the request and admits it from a lease that covers it. An expired lease is
    /// spent only with `spend_expired` (the store is unreachable and it is still debited there).
    pub fn take(&mut self, key: &Key, tokens: u64, now_ms: u64, spend_expired: bool) -> Take {
        self.rates
            .entry(key.0.clone())
            .or_default()
            .demand
            .record(now_ms, tokens);
        if let Some(l) = self.active.get_mut(key)
            && (l.expires_ms > now_ms || spend_expired)
            && l.left >= tokens
            && l.admission.budget.is_none()
        {
            l.left -= tokens;
            let mut a = l.admission.clone();
            a.remaining_tpm = a.remaining_tpm.map(|r| r + l.left as i64);
            a.remaining_quota = a.remaining_quota.map(|r| r + l.left as i64);
            return Take::Admitted(a);
        }
        // A consumer with a budget never leases: each request's money is reserved on its own.
        let busy = self.rates.get(&key.0).is_some_and(|r| {
            r.demand.busy() && r.admission.as_ref().is_none_or(|a| a.budget.is_none())
        });
        let ask = busy && self.asking.insert(key.clone());
        Take::Miss { ask }
    }

    /// Remembers the consumer's limits as the store last admitted them.
    pub fn admitted(&mut self, consumer: &str, a: &Admission) {
        if let Some(r) = self.rates.get_mut(consumer) {
            r.admission = Some(a.clone());
        }
    }

    /// The size of the next lease: a quarter second of the consumer's recent demand, at most
    /// 1/20 of its per-minute limit and 1/50 of the quota it has left when they are known (a
    /// replica that never reached the store in time learns them from the lease's answer).
    pub fn size(&self, key: &Key) -> u64 {
        let Some(rate) = self.rates.get(&key.0) else {
            return 0;
        };
        let mut size = rate.demand.quarter_second();
        if let Some(last) = &rate.admission {
            if let Some(t) = last.tpm {
                size = size.min(t / 20);
            }
            if let Some(q) = last.remaining_quota {
                size = size.min(q.max(0) as u64 / 50);
            }
        }
        size
    }

    /// The ask for `key` is over; a granted lease replaces the old one, which is returned.
    pub fn asked(&mut self, key: &Key, granted: Option<Lease>) -> Option<Lease> {
        self.asking.remove(key);
        granted.and_then(|l| self.active.insert(key.clone(), l))
    }

    /// Takes the leases expired by `now_ms` (all of them with `all`), to be returned.
    pub fn expired(&mut self, now_ms: u64, all: bool) -> Vec<(String, Lease)> {
        let keys: Vec<Key> = self
            .active
            .iter()
            .filter(|(_, l)| all || l.expires_ms <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        // Idle consumers' rates go too, so the map does not grow without bound.
        self.rates.retain(|_, r| !r.demand.idle(now_ms));
        let mut out = std::mem::take(&mut self.unreturned);
        out.extend(
            keys.into_iter()
                .filter_map(|k| self.active.remove(&k).map(|l| (k.0, l))),
        );
        out
    }

    /// Leases the store could not take back: spendable again while no newer lease covers
    /// their consumer and model (the store is unreachable and they are still debited there),
    /// and returned with the next sweep.
    pub fn put_back(&mut self, leases: Vec<(String, Lease)>) {
        for (consumer, l) in leases {
            match self.active.entry((consumer.clone(), l.model.clone())) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    self.unreturned.push((consumer, l))
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(l);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(tpm: u64, quota_left: i64) -> Admission {
        Admission {
            team: "t".into(),
            remaining_tpm: Some(tpm as i64 / 2),
            remaining_quota: Some(quota_left),
            window: 0,
            tpm: Some(tpm),
            quota: Some(1_000_000),
            quota_period: Default::default(),
            budget: None,
        }
    }

    fn key() -> Key {
        ("c".into(), "m".into())
    }

    /// A consumer becomes busy at 20 requests a second; one ask at a time; the lease admits
    /// what it covers, until it is spent or expired (unless the store is unreachable).
    #[test]
    fn lease_arithmetic() {
        let mut l = Leases::default();
        for i in 0..19 {
            assert!(matches!(
                l.take(&key(), 100, 1_000 + i, false),
                Take::Miss { ask: false }
            ));
        }
        assert!(matches!(
            l.take(&key(), 100, 1_019, false),
            Take::Miss { ask: true }
        ));
        assert!(matches!(
            l.take(&key(), 100, 1_020, false),
            Take::Miss { ask: false }
        ));
        // Limits unknown yet: a quarter second of demand (21 × 100 tokens).
        assert_eq!(l.size(&key()), 525);
        l.admitted("c", &admission(60_000, 1_000_000));
        // 21 requests × 100 tokens this second: a quarter is 525; tpm/20 = 3000.
        assert_eq!(l.size(&key()), 525);
        l.admitted("c", &admission(6_000, 1_000_000));
        assert_eq!(l.size(&key()), 300, "tpm / 20");
        l.admitted("c", &admission(60_000, 10_000));
        assert_eq!(l.size(&key()), 200, "quota left / 50");

        let lease = Lease {
            id: 7,
            model: "m".into(),
            left: 250,
            expires_ms: 1_300,
            admission: admission(60_000, 10_000),
        };
        assert!(l.asked(&key(), Some(lease)).is_none());
        match l.take(&key(), 100, 1_100, false) {
            Take::Admitted(a) => assert_eq!(a.remaining_quota, Some(10_000 + 150)),
            _ => panic!("the lease covers it"),
        }
        assert!(matches!(
            l.take(&key(), 100, 1_100, false),
            Take::Admitted(_)
        ));
        assert!(
            matches!(l.take(&key(), 100, 1_100, false), Take::Miss { .. }),
            "50 left is not enough"
        );
        assert!(
            matches!(l.take(&key(), 50, 1_300, false), Take::Miss { .. }),
            "expired"
        );
        assert!(
            matches!(l.take(&key(), 50, 1_300, true), Take::Admitted(_)),
            "an expired lease is still spent while the store is unreachable"
        );
        let back = l.expired(1_300, false);
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].1.id, back[0].1.left), (7, 0));
        assert!(l.expired(1_300, true).is_empty());
    }
}

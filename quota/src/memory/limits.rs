//! Reservations and settlements in memory: the twins of `reserve.lua` and `settle.lua`,
//! decision for decision, with the reservation records of `tg:resv:{ID}:RID`.

use super::{Inner, MemoryStore, UsageKey};
use crate::model::*;
use crate::{BudgetUse, Result};

#[derive(Clone, Copy)]
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) ts_us: u64,
}

#[derive(Clone, Copy)]
pub(super) struct QuotaUse {
    pub(super) window: u64,
    pub(super) used: i64,
}

#[derive(Clone, Copy)]
pub(super) enum Record {
    Live {
        tokens: u64,
        window: u64,
        tpm: Option<u64>,
        /// The cost debited from the budget, and its window (`None`: no budget).
        cost: u64,
        bwindow: Option<u64>,
        expires_us: u64,
    },
    Tombstone {
        expires_us: u64,
    },
}

impl Record {
    fn expires_us(&self) -> u64 {
        match self {
            Record::Live { expires_us, .. } | Record::Tombstone { expires_us } => *expires_us,
        }
    }
}

impl Inner {
    /// Drops records past their expiry (Redis's PX).
    fn expire_records(&mut self, now_us: u64) {
        while let Some((at, _)) = self.record_expiry.front()
            && *at <= now_us
        {
            let Some((_, key)) = self.record_expiry.pop_front() else {
                break;
            };
            if self
                .reservations
                .get(&key)
                .is_some_and(|r| r.expires_us() <= now_us)
            {
                self.reservations.remove(&key);
            }
        }
    }

    fn put_record(&mut self, key: (String, u64), record: Record) {
        self.record_expiry
            .push_back((record.expires_us(), key.clone()));
        self.reservations.insert(key, record);
    }

    /// The bucket and quota moved by `delta` (actual − reserved), as `settle.lua` does.
    fn correct(&mut self, consumer: &str, delta: i64, tpm: Option<u64>, window: u64, now_us: u64) {
        if delta == 0 {
            return;
        }
        if let Some(t) = tpm {
            let level = refill(self.buckets.get(consumer).copied(), t, now_us);
            let level = (level - delta as f64).min(t as f64);
            self.buckets.insert(
                consumer.to_string(),
                Bucket {
                    tokens: level,
                    ts_us: now_us,
                },
            );
        }
        if let Some(q) = self.quotas.get_mut(consumer)
            && (q.window == window || window == ANY_WINDOW)
        {
            q.used = (q.used + delta).max(0);
        }
    }

    /// The consumer's budget spend moved by `delta` (nano-units), as `settle.lua` does.
    fn correct_money(&mut self, consumer: &str, delta: i64, bwindow: Option<u64>) {
        let Some(w) = bwindow else { return };
        if delta == 0 {
            return;
        }
        if let Some(q) = self.spends.get_mut(consumer)
            && (q.window == w || w == ANY_WINDOW)
        {
            q.used = (q.used + delta).max(0);
        }
    }
}

/// How long a reservation record or tombstone lives, in microseconds.
const RECORD_TTL_US: u64 = crate::RESERVATION_TTL_MS * 1000;

/// Refilled bucket level at `now_us` (absent = full).
fn refill(b: Option<Bucket>, tpm: u64, now_us: u64) -> f64 {
    let cap = tpm as f64;
    match b {
        None => cap,
        Some(b) => {
            let elapsed = now_us.saturating_sub(b.ts_us) as f64;
            (b.tokens + elapsed * cap / 60_000_000.0).min(cap)
        }
    }
}

impl MemoryStore {
    pub(super) fn reserve_now(&self, req: &ReserveRequest<'_>) -> Result<Decision> {
        let now_us = self.clock.now_us();
        let now_s = now_us / 1_000_000;
        let mut g = self.inner.lock();
        let rec = g.consumers.get(req.consumer);
        if rec.is_none() && req.require_record {
            return Ok(Decision::UnknownConsumer);
        }
        let budget = rec.and_then(|r| r.budget);
        let (team, tpm, quota, period) = match rec {
            Some(r) => {
                if r.disabled {
                    return Ok(Decision::Disabled);
                }
                if !r.models.is_empty() && !r.models.iter().any(|m| m == req.model) {
                    return Ok(Decision::ModelNotAllowed);
                }
                let period = if r.quota.is_some() {
                    r.quota_period
                } else {
                    req.defaults.quota_period
                };
                (
                    r.team.clone(),
                    r.tpm.or(req.defaults.tpm),
                    r.quota.or(req.defaults.quota),
                    period,
                )
            }
            None => (
                String::new(),
                req.defaults.tpm,
                req.defaults.quota,
                req.defaults.quota_period,
            ),
        };
        let tokens = req.tokens as i64;
        let (window, window_end) = window_bounds(period, now_s);

        // A replay of a reservation already made (or abandoned): never debit twice.
        g.expire_records(now_us);
        match g.reservations.get(&(req.consumer.to_string(), req.id)) {
            Some(Record::Tombstone { .. }) => return Ok(Decision::Cancelled),
            Some(Record::Live { window: w, .. }) => {
                return Ok(Decision::Admitted(Admission {
                    team,
                    remaining_tpm: None,
                    remaining_quota: None,
                    window: *w,
                    tpm,
                    quota,
                    quota_period: period,
                    budget: None,
                }));
            }
            None => {}
        }

        // Quota first: a spent quota outlasts any per-minute wait.
        let mut used = 0;
        if quota.is_some() {
            used = match g.quotas.get(req.consumer) {
                Some(q) if q.window == window => q.used,
                _ => 0,
            };
        }
        if let Some(q) = quota
            && used + tokens > q as i64
        {
            return Ok(Decision::QuotaExceeded {
                retry_after_ms: (window_end - now_s).max(1) * 1000,
                remaining_quota: q as i64 - used,
            });
        }

        // The budget: a spent budget outlasts any per-minute wait too.
        let cost = req.cost_nano as i64;
        let mut spent = 0;
        let mut bwindow = None;
        if let Some(b) = budget {
            let (w, end) = window_bounds(b.period, now_s);
            bwindow = Some((w, end));
            spent = match g.spends.get(req.consumer) {
                Some(q) if q.window == w => q.used,
                _ => 0,
            };
            if let Some(refusal) = b.refuse(spent, cost, end, now_s) {
                return Ok(Decision::BudgetExceeded(refusal));
            }
        }

        let mut level = 0.0;
        if let Some(t) = tpm {
            if t == 0 {
                // A zero limit refuses everything (an operator's off switch for traffic).
                return Ok(Decision::RateLimited {
                    retry_after_ms: 60_000,
                    remaining_tpm: 0,
                });
            }
            level = refill(g.buckets.get(req.consumer).copied(), t, now_us);
            // A request larger than the whole bucket passes when the bucket is full.
            let need = (req.tokens.min(t)) as f64;
            if level < need {
                let deficit = need - level;
                let retry_after_ms = if t == 0 {
                    60_000
                } else {
                    ((deficit * 60_000.0 / t as f64).ceil() as u64).max(1)
                };
                return Ok(Decision::RateLimited {
                    retry_after_ms,
                    remaining_tpm: level.floor() as i64,
                });
            }
        }

        // Admitted: debit both.
        let mut remaining_tpm = None;
        if tpm.is_some() {
            level -= req.tokens as f64;
            g.buckets.insert(
                req.consumer.to_string(),
                Bucket {
                    tokens: level,
                    ts_us: now_us,
                },
            );
            remaining_tpm = Some(level.floor() as i64);
        }
        let mut remaining_quota = None;
        if let Some(q) = quota {
            g.quotas.insert(
                req.consumer.to_string(),
                QuotaUse {
                    window,
                    used: used + tokens,
                },
            );
            remaining_quota = Some(q as i64 - used - tokens);
        }
        let mut budget_use = None;
        if let (Some(b), Some((w, end))) = (budget, bwindow) {
            g.spends.insert(
                req.consumer.to_string(),
                QuotaUse {
                    window: w,
                    used: spent + cost,
                },
            );
            budget_use = Some(BudgetUse {
                limit_nano: b.limit_nano,
                spent_nano: spent + cost,
                window: w,
                window_end: end,
                period: b.period,
                action: b.action,
            });
        }
        g.put_record(
            (req.consumer.to_string(), req.id),
            Record::Live {
                tokens: req.tokens,
                window,
                tpm,
                cost: req.cost_nano,
                bwindow: bwindow.map(|(w, _)| w),
                expires_us: now_us + RECORD_TTL_US,
            },
        );
        Ok(Decision::Admitted(Admission {
            team,
            remaining_tpm,
            remaining_quota,
            window,
            tpm,
            quota,
            quota_period: period,
            budget: budget_use,
        }))
    }

    pub(super) fn settle_now(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        let now_us = self.clock.now_us();
        let mut g = self.inner.lock();
        if !g.settled.insert(batch_id) {
            return Ok(());
        }
        g.settled_order.push_back(batch_id);
        if g.settled_order.len() > 100_000
            && let Some(old) = g.settled_order.pop_front()
        {
            g.settled.remove(&old);
        }
        g.expire_records(now_us);
        let tombstone = Record::Tombstone {
            expires_us: now_us + RECORD_TTL_US,
        };
        for s in batch {
            match s.end {
                ReservationEnd::Abandoned { id } => {
                    let key = (s.consumer.clone(), id);
                    if let Some(Record::Live {
                        tokens,
                        window,
                        tpm,
                        cost,
                        bwindow,
                        ..
                    }) = g.reservations.get(&key).copied()
                    {
                        g.correct(&s.consumer, -(tokens as i64), tpm, window, now_us);
                        g.correct_money(&s.consumer, -(cost as i64), bwindow);
                    }
                    g.put_record(key, tombstone);
                }
                ReservationEnd::None => {
                    let delta = s.actual as i64 - s.reserved as i64;
                    g.correct(&s.consumer, delta, s.tpm, s.window, now_us);
                    let money = s.money.actual as i64 - s.money.reserved as i64;
                    g.correct_money(&s.consumer, money, Some(s.money.window));
                }
                ReservationEnd::Settled { id, retried } => {
                    // Only a live record is corrected: settling it twice corrects it once.
                    let key = (s.consumer.clone(), id);
                    if let Some(Record::Live { bwindow, .. }) = g.reservations.get(&key).copied() {
                        let delta = s.actual as i64 - s.reserved as i64;
                        g.correct(&s.consumer, delta, s.tpm, s.window, now_us);
                        let money = s.money.actual as i64 - s.money.reserved as i64;
                        g.correct_money(&s.consumer, money, bwindow);
                    }
                    if retried {
                        g.put_record(key, tombstone);
                    } else {
                        g.reservations.remove(&key);
                    }
                }
            }
            if let Some(t) = &s.money.team {
                g.settle_team(t, &s.money, now_us);
            }
            if let Some(u) = &s.usage {
                let k = UsageKey {
                    day: u.day,
                    consumer: s.consumer.clone(),
                    team: u.team.clone(),
                    model: u.model.clone(),
                    backend: u.backend.clone(),
                };
                g.usage.entry(k).or_default().add(&u.counts);
                g.dims.add(&s.consumer, u);
            }
        }
        Ok(())
    }
}

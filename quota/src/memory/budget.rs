//! Budgets in memory beyond the consumer's own reservation: the twins of `team_reserve.lua`
//! and `team_settle.lua`, team records, spend counters, and alert claims.

use super::limits::QuotaUse;
use super::{Inner, MemoryStore};
use crate::model::*;
use crate::{
    BudgetScope, BudgetUse, Money, Result, TeamCharge, TeamDecision, TeamRecord, TeamReserve,
};

/// A team step's reservation record (`tg:tresv:{TEAM}:RID`), kept with its expiry (unix µs).
#[derive(Clone, Copy)]
pub(super) enum TeamRec {
    Live { cost: u64, window: u64 },
    Tombstone,
}

const RECORD_TTL_US: u64 = crate::RESERVATION_TTL_MS * 1000;

impl Inner {
    /// The team's record, unless expired (Redis's PX).
    fn team_rec(&mut self, team: &str, id: u64, now_us: u64) -> Option<TeamRec> {
        if self.team_records.len() > 100_000 {
            self.team_records
                .retain(|_, (_, expires_us)| *expires_us > now_us);
        }
        let key = (team.to_string(), id);
        match self.team_records.get(&key) {
            Some((r, expires_us)) if *expires_us > now_us => Some(*r),
            Some(_) => {
                self.team_records.remove(&key);
                None
            }
            None => None,
        }
    }

    fn correct_team(&mut self, team: &str, delta: i64, window: u64) {
        if delta == 0 {
            return;
        }
        if let Some(q) = self.team_spends.get_mut(team)
            && (q.window == window || window == ANY_WINDOW)
        {
            q.used = (q.used + delta).max(0);
        }
    }

    /// The team part of one settlement, as `team_settle.lua` does it.
    pub(super) fn settle_team(&mut self, t: &TeamCharge, money: &Money, now_us: u64) {
        let delta = money.actual as i64 - t.reserved as i64;
        let (id, abandon, tombstone) = match t.end {
            ReservationEnd::None => {
                self.correct_team(&t.team, delta, t.window);
                return;
            }
            ReservationEnd::Settled { id, retried } => (id, false, retried),
            ReservationEnd::Abandoned { id } => (id, true, true),
        };
        if let Some(TeamRec::Live { cost, window, .. }) = self.team_rec(&t.team, id, now_us) {
            let d = if abandon { -(cost as i64) } else { delta };
            self.correct_team(&t.team, d, window);
        }
        let key = (t.team.clone(), id);
        if tombstone {
            let expires_us = now_us + RECORD_TTL_US;
            self.team_records
                .insert(key, (TeamRec::Tombstone, expires_us));
        } else {
            self.team_records.remove(&key);
        }
    }
}

impl MemoryStore {
    pub(super) fn reserve_team_now(&self, req: &TeamReserve<'_>) -> Result<TeamDecision> {
        let now_us = self.clock.now_us();
        let now_s = now_us / 1_000_000;
        let mut g = self.inner.lock();
        let Some(b) = g.teams.get(req.team).and_then(|t| t.budget) else {
            return Ok(TeamDecision::NoBudget);
        };
        let (window, window_end) = window_bounds(b.period, now_s);
        let spent = match g.team_spends.get(req.team) {
            Some(q) if q.window == window => q.used,
            _ => 0,
        };
        let use_at = |spent: i64, window: u64| BudgetUse {
            limit_nano: b.limit_nano,
            spent_nano: spent,
            window,
            window_end,
            period: b.period,
            action: b.action,
        };
        // A replay of a reservation already made (or abandoned): never debit twice.
        match g.team_rec(req.team, req.id, now_us) {
            Some(TeamRec::Tombstone) => return Ok(TeamDecision::Cancelled),
            Some(TeamRec::Live { window: w, .. }) => {
                return Ok(TeamDecision::Admitted(use_at(spent, w)));
            }
            None => {}
        }
        let cost = req.cost_nano as i64;
        if let Some(refusal) = b.refuse(spent, cost, window_end, now_s) {
            return Ok(TeamDecision::Exceeded(refusal));
        }
        g.team_spends.insert(
            req.team.to_string(),
            QuotaUse {
                window,
                used: spent + cost,
            },
        );
        g.team_records.insert(
            (req.team.to_string(), req.id),
            (
                TeamRec::Live {
                    cost: req.cost_nano,
                    window,
                },
                now_us + RECORD_TTL_US,
            ),
        );
        Ok(TeamDecision::Admitted(use_at(spent + cost, window)))
    }

    pub(super) fn seed_team_now(&self, team: &TeamRecord) -> bool {
        let mut g = self.inner.lock();
        if team.budget.is_none() || g.teams.contains_key(&team.id) {
            return false;
        }
        g.teams.insert(team.id.clone(), team.clone());
        true
    }

    pub(super) fn put_team_now(&self, team: &TeamRecord) {
        let mut g = self.inner.lock();
        if team.budget.is_none() {
            // Redis keeps no empty hash.
            g.teams.remove(&team.id);
        } else {
            g.teams.insert(team.id.clone(), team.clone());
        }
    }

    pub(super) fn spend_now(&self, scope: BudgetScope, id: &str) -> Option<(u64, i64)> {
        let g = self.inner.lock();
        let map = match scope {
            BudgetScope::Consumer => &g.spends,
            BudgetScope::Team => &g.team_spends,
        };
        map.get(id).map(|q| (q.window, q.used))
    }

    pub(super) fn claim_alert_now(&self, name: &str, ttl_ms: u64) -> bool {
        let now_us = self.clock.now_us();
        let mut g = self.inner.lock();
        if g.alerts.len() > 100_000 {
            g.alerts.retain(|_, exp| *exp > now_us);
        }
        match g.alerts.get(name) {
            Some(exp) if *exp > now_us => false,
            _ => {
                g.alerts
                    .insert(name.to_string(), now_us + ttl_ms.max(1) * 1000);
                true
            }
        }
    }

    pub(super) fn release_alert_now(&self, name: &str) {
        self.inner.lock().alerts.remove(name);
    }
}

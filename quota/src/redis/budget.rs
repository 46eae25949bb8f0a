//! Budgets in Redis beyond the consumer's own reservation: the team step (`team_reserve.lua`,
//! in the team's slot), team records (`tg:team:{TEAM}`), the spend counters the usage report
//! reads, and the team part of settle batches (`team_settle.lua`, one call per team).

use super::RedisStore;
use super::codec::{decode_budget, decode_team_decision, team_fields};
use super::connection::{eval, evalsha};
use super::keys::*;
use crate::model::*;
use crate::{BudgetScope, Result, TeamDecision, TeamRecord, TeamReserve};
use redis::Cmd;
use std::collections::HashMap;

impl RedisStore {
    pub(super) async fn team_reserve(&self, req: &TeamReserve<'_>) -> Result<TeamDecision> {
        let (t, s, r) = (
            team_key(req.team),
            team_spend_key(req.team),
            team_reservation_key(req.team, req.id),
        );
        let mut cmd = evalsha(&self.inner.team_reserve, &[&t, &s, &r]);
        cmd.arg(req.cost_nano)
            .arg(self.inner.opts.time_offset_ms)
            .arg(crate::RESERVATION_TTL_MS);
        let mut conn = self.conn();
        let run = eval(&mut conn, &self.inner.team_reserve, &cmd);
        let v: Vec<String> = if req.background {
            self.background(run).await?
        } else {
            self.hot(run).await?
        };
        decode_team_decision(&v)
    }

    pub(super) async fn team_seed(&self, team: &TeamRecord) -> Result<bool> {
        let fields = team_fields(team);
        if fields.is_empty() {
            return Ok(false);
        }
        let key = team_key(&team.id);
        let mut cmd = evalsha(&self.inner.seed, &[&key]);
        for (f, v) in fields {
            cmd.arg(f).arg(v);
        }
        let mut conn = self.conn();
        let written: i64 = self.admin(eval(&mut conn, &self.inner.seed, &cmd)).await?;
        Ok(written == 1)
    }

    pub(super) async fn team_put(&self, team: &TeamRecord) -> Result<()> {
        let key = team_key(&team.id);
        let fields = team_fields(team);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !fields.is_empty() {
            pipe.hset_multiple(&key, &fields).ignore();
        }
        let mut conn = self.conn();
        self.admin(pipe.exec_async(&mut conn)).await
    }

    pub(super) async fn team_get(&self, id: &str) -> Result<Option<TeamRecord>> {
        let mut cmd = redis::cmd("HGETALL");
        let key = team_key(id);
        cmd.arg(&key);
        let h: HashMap<String, String> = self.admin_cmd(cmd).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(TeamRecord {
            id: id.to_string(),
            budget: decode_budget(&key, &h)?,
        }))
    }

    pub(super) async fn read_spend(
        &self,
        scope: BudgetScope,
        id: &str,
    ) -> Result<Option<(u64, i64)>> {
        let key = match scope {
            BudgetScope::Consumer => spend_key(id),
            BudgetScope::Team => team_spend_key(id),
        };
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg("w").arg("spent");
        let (w, spent): (Option<u64>, Option<i64>) = self.admin_cmd(cmd).await?;
        Ok(w.map(|w| (w, spent.unwrap_or(0))))
    }

    /// The `team_settle.lua` calls of a batch: one per team, each team's corrections in order.
    /// Each with the key that routes it (the team's slot).
    pub(super) fn team_settle_commands(
        &self,
        batch_id: u64,
        batch: &[Settlement],
    ) -> Vec<(String, Cmd)> {
        let mut teams: Vec<(&str, Vec<&Settlement>)> = Vec::new();
        for s in batch {
            let Some(t) = &s.money.team else { continue };
            let delta = s.money.actual != t.reserved;
            if !delta && t.end == ReservationEnd::None {
                continue;
            }
            match teams.iter_mut().find(|(id, _)| *id == t.team) {
                Some((_, v)) => v.push(s),
                None => teams.push((&t.team, vec![s])),
            }
        }
        teams
            .into_iter()
            .map(|(team, list)| {
                let mut keys = vec![team_spend_key(team), team_settled_key(team, batch_id)];
                // Each settlement's reservation key, if it has one, and the index its arguments
                // give for it (0: none).
                let ends: Vec<(&Settlement, &TeamCharge, usize, &str)> = list
                    .iter()
                    .filter_map(|s| s.money.team.as_ref().map(|t| (*s, t)))
                    .map(|(s, t)| {
                        let (rid, mode) = match t.end {
                            ReservationEnd::None => (None, "c"),
                            ReservationEnd::Settled { id, retried } => {
                                (Some(id), if retried { "r" } else { "c" })
                            }
                            ReservationEnd::Abandoned { id } => (Some(id), "a"),
                        };
                        let index = match rid {
                            Some(id) => {
                                keys.push(team_reservation_key(team, id));
                                keys.len()
                            }
                            None => 0,
                        };
                        (s, t, index, mode)
                    })
                    .collect();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let mut cmd = evalsha(&self.inner.team_settle, &keys);
                cmd.arg(crate::RESERVATION_TTL_MS).arg(ends.len());
                for (s, t, index, mode) in ends {
                    cmd.arg(index)
                        .arg(mode)
                        .arg(s.money.actual as i64 - t.reserved as i64);
                    if t.window == ANY_WINDOW {
                        cmd.arg("any");
                    } else {
                        cmd.arg(t.window);
                    }
                }
                (team_spend_key(team), cmd)
            })
            .collect()
    }
}

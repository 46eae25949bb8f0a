//! Settle batches: the settlements of a batch grouped per consumer (each consumer's
//! corrections in order, its usage summed per day × team × model × backend), one
//! `settle.lua` call per consumer, and one `team_settle.lua` call per team whose budget a
//! settlement corrects, all in one pipeline. A call lost to NOSCRIPT is sent again
//! alone after the script is loaded; a batch is applied once per id (`tg:settled:{ID}:<batch>`).

use super::RedisStore;
use super::codec::opt_arg;
use super::connection::{evalsha, is_noscript};
use super::keys::{bucket_key, quota_key, reservation_key, settled_key, spend_key, usage_key};
use crate::Result;
use crate::model::*;
use redis::{Cmd, Value};
use std::collections::HashMap;

/// One consumer's part of a batch.
#[derive(Default)]
struct Group<'a> {
    corrections: Vec<&'a Settlement>,
    /// Usage per (day, `team|model|backend`).
    usage: Vec<((u32, String), UsageCounts)>,
}

impl Group<'_> {
    fn add_usage(&mut self, u: &UsageDelta) {
        let field = format!("{}|{}|{}", u.team, u.model, u.backend);
        match self
            .usage
            .iter_mut()
            .find(|(k, _)| k.0 == u.day && k.1 == field)
        {
            Some((_, t)) => t.add(&u.counts),
            None => self.usage.push(((u.day, field), u.counts)),
        }
    }
}

impl RedisStore {
    pub(super) async fn settle_batch(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        // Group by consumer, keeping each consumer's corrections in order.
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<(&str, Group<'_>)> = Vec::new();
        for s in batch {
            let i = *index.entry(&s.consumer).or_insert_with(|| {
                groups.push((&s.consumer, Group::default()));
                groups.len() - 1
            });
            let g = &mut groups[i].1;
            if s.actual != s.reserved
                || s.end != ReservationEnd::None
                || s.money.actual != s.money.reserved
            {
                g.corrections.push(s);
            }
            if let Some(u) = &s.usage {
                g.add_usage(u);
            }
        }
        let mut cmds: Vec<Cmd> = groups
            .iter()
            .filter(|(_, g)| !(g.corrections.is_empty() && g.usage.is_empty()))
            .map(|(id, g)| self.settle_command(id, batch_id, g))
            .collect();
        cmds.extend(self.team_settle_commands(batch_id, batch));
        if cmds.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let scripts = [&self.inner.settle, &self.inner.team_settle];
        self.background(async move {
            let mut pending: Vec<&Cmd> = cmds.iter().collect();
            for attempt in 0..2 {
                let mut pipe = redis::pipe();
                for c in &pending {
                    pipe.add_command((*c).clone());
                }
                let results: Vec<redis::RedisResult<Value>> =
                    pipe.ignore_errors().query_async(&mut conn).await?;
                let mut retry = Vec::new();
                for (c, r) in pending.iter().zip(results) {
                    match r {
                        Ok(_) => {}
                        // Only the calls that did not run are sent again: a retry never
                        // applies a settlement twice.
                        Err(e) if is_noscript(&e) && attempt == 0 => retry.push(*c),
                        Err(e) => return Err(e),
                    }
                }
                if retry.is_empty() {
                    break;
                }
                for script in scripts {
                    script.load_async(&mut conn).await?;
                }
                pending = retry;
            }
            Ok(())
        })
        .await
    }

    /// The `settle.lua` call of one consumer's group (see the script's header for the layout).
    fn settle_command(&self, id: &str, batch_id: u64, g: &Group<'_>) -> Cmd {
        let retention = u64::from(self.inner.opts.usage_retention_days) * 86_400;
        let mut keys = vec![
            bucket_key(id),
            quota_key(id),
            settled_key(id, batch_id),
            spend_key(id),
        ];
        let mut days: Vec<u32> = Vec::new();
        for ((day, _), _) in &g.usage {
            if !days.contains(day) {
                days.push(*day);
                keys.push(usage_key(id, *day));
            }
        }
        let first_record = keys.len() + 1;
        for s in &g.corrections {
            if let ReservationEnd::Settled { id: r, .. } | ReservationEnd::Abandoned { id: r } =
                s.end
            {
                keys.push(reservation_key(id, r));
            }
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = evalsha(&self.inner.settle, &keys);
        cmd.arg(self.inner.opts.time_offset_ms)
            .arg(retention)
            .arg(g.corrections.len())
            .arg(crate::RESERVATION_TTL_MS);
        let mut record = first_record;
        for s in &g.corrections {
            let (key, mode) = match s.end {
                ReservationEnd::None => (0, "c"),
                ReservationEnd::Settled { retried: false, .. } => (record, "c"),
                ReservationEnd::Settled { retried: true, .. } => (record, "r"),
                ReservationEnd::Abandoned { .. } => (record, "a"),
            };
            if key > 0 {
                record += 1;
            }
            cmd.arg(key)
                .arg(mode)
                .arg(s.actual as i64 - s.reserved as i64);
            opt_arg(&mut cmd, s.tpm);
            if s.window == ANY_WINDOW {
                cmd.arg("any");
            } else {
                cmd.arg(s.window);
            }
            cmd.arg(s.money.actual as i64 - s.money.reserved as i64);
            if s.money.window == ANY_WINDOW {
                cmd.arg("any");
            } else {
                cmd.arg(s.money.window);
            }
        }
        for ((day, field), v) in &g.usage {
            let k = 5 + days.iter().position(|d| d == day).unwrap_or(0);
            cmd.arg(k).arg(field).arg(&v.to_array()[..]);
        }
        cmd
    }
}

//! The showback read: every `tg:usage:*` key in a range of days, found with `SCAN` and read with
//! pipelined `HGETALL`s. An admin path (O(keyspace)), never on the request path.

use super::RedisStore;
use super::keys::{parse_usage_field, parse_usage_key};
use crate::model::*;
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};

impl RedisStore {
    pub(super) async fn scan_usage(&self, since: u32, until: u32) -> Result<Vec<UsageRow>> {
        let mut conn = self.conn();
        let mut keys = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let cmd = redis::cmd("SCAN")
                .cursor_arg(cursor)
                .arg("MATCH")
                .arg("tg:usage:*")
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, batch): (u64, Vec<String>) = self.admin(cmd.query_async(&mut conn)).await?;
            for k in batch {
                if parse_usage_key(&k).is_some_and(|(_, d)| d >= since && d <= until) {
                    keys.insert(k);
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let mut rows: HashMap<(u32, &str, &str, &str, &str), UsageRow> = HashMap::new();
        let mut hashes = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(200) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.hgetall(k);
            }
            let got: Vec<HashMap<String, String>> = self.admin(pipe.query_async(&mut conn)).await?;
            hashes.extend(chunk.iter().zip(got));
        }
        for (key, h) in &hashes {
            let Some((consumer, day)) = parse_usage_key(key) else {
                continue;
            };
            for (field, value) in h {
                let Some((team, model, backend, metric)) = parse_usage_field(field) else {
                    continue;
                };
                let v: u64 = value.parse().map_err(|_| {
                    Error::Protocol(format!("{key} field {field} is not a count: {value}"))
                })?;
                let r = rows
                    .entry((day, consumer, team, model, backend))
                    .or_insert_with(|| UsageRow {
                        day,
                        consumer: consumer.to_string(),
                        team: team.to_string(),
                        model: model.to_string(),
                        backend: backend.to_string(),
                        ..UsageRow::default()
                    });
                let c = r.counts.at_mut(metric);
                *c = c.saturating_add(v);
            }
        }
        let mut rows: Vec<UsageRow> = rows.into_values().collect();
        rows.sort_by(|a, b| {
            (a.day, &a.consumer, &a.model, &a.backend, &a.team).cmp(&(
                b.day,
                &b.consumer,
                &b.model,
                &b.backend,
                &b.team,
            ))
        });
        Ok(rows)
    }
}

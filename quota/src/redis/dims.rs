//! The dimension read of the showback report: every `tg:dims:*` key in a range of days, found
//! with `SCAN` (on every master of a cluster) and read with pipelined `HGETALL`s. An admin
//! path, never on the request path; the writes are `settle.lua`'s.

use super::RedisStore;
use super::conn::per_slot;
use super::keys::{parse_dims_field, parse_dims_key};
use crate::model::*;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};

impl RedisStore {
    pub(super) async fn scan_dims(&self, since: u32, until: u32) -> Result<Vec<DimRow>> {
        let conn = self.conn();
        let mut keys: Vec<String> = self
            .scan_all("tg:dims:*")
            .await?
            .into_iter()
            .filter(|k| parse_dims_key(k).is_some_and(|(_, d)| d >= since && d <= until))
            .collect();
        keys.sort();
        keys.dedup();
        let mut rows: BTreeMap<(u32, String, String, String, String), UsageCounts> =
            BTreeMap::new();
        for chunk in keys.chunks(200) {
            let reads = chunk
                .iter()
                .map(|k| (k.clone(), redis::cmd("HGETALL").arg(k).to_owned()))
                .collect();
            for (key, r) in chunk.iter().zip(self.admin(per_slot(&conn, reads)).await?) {
                let v = r.map_err(|e| self.error(e))?;
                let h: HashMap<String, String> =
                    redis::from_redis_value(v).map_err(|e| self.error(e.into()))?;
                let Some((consumer, day)) = parse_dims_key(key) else {
                    continue;
                };
                for (field, value) in &h {
                    let Some((dim, val, team, metric)) = parse_dims_field(field) else {
                        continue;
                    };
                    let n: u64 = value.parse().map_err(|_| {
                        Error::Protocol(format!("{key} field {field} is not a count: {value}"))
                    })?;
                    let k = (day, consumer.into(), dim.into(), val.into(), team.into());
                    let c = rows.entry(k).or_default();
                    let m = c.at_mut(metric);
                    *m = m.saturating_add(n);
                }
            }
        }
        Ok(rows
            .into_iter()
            .map(|((day, consumer, dimension, value, team), counts)| DimRow {
                day,
                consumer,
                team,
                dimension,
                value,
                counts,
            })
            .collect())
    }
}

//! The showback read: every `tg:usage:*` key in a range of days, found with `SCAN` (on every
//! master of a cluster) and read with pipelined `HGETALL`s. An admin path (O(keyspace)), never
//! on the request path.

use super::RedisStore;
use super::conn::{Conn, per_slot};
use super::keys::{parse_usage_field, parse_usage_key};
use crate::model::*;
use crate::{Error, Result};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use std::collections::{HashMap, HashSet};

impl RedisStore {
    pub(super) async fn scan_usage(&self, since: u32, until: u32) -> Result<Vec<UsageRow>> {
        let conn = self.conn();
        let mut keys = HashSet::new();
        for k in self.scan_all("tg:usage:*").await? {
            if parse_usage_key(&k).is_some_and(|(_, d)| d >= since && d <= until) {
                keys.insert(k);
            }
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let mut rows: HashMap<(u32, &str, &str, &str, &str), UsageRow> = HashMap::new();
        let mut hashes = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(200) {
            let reads = chunk
                .iter()
                .map(|k| (k.clone(), redis::cmd("HGETALL").arg(k).to_owned()))
                .collect();
            for (k, r) in chunk.iter().zip(self.admin(per_slot(&conn, reads)).await?) {
                let v = r.map_err(|e| self.error(e))?;
                let h: HashMap<String, String> =
                    redis::from_redis_value(v).map_err(|e| self.error(e.into()))?;
                hashes.push((k, h));
            }
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

impl RedisStore {
    /// Every key matching `pattern`: one `SCAN` walk per master of a cluster (each master holds
    /// only its slots' keys), or of the one server. Fails rather than answer a partial list
    /// when some slots have no reachable master.
    pub(super) async fn scan_all(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let masters = match &mut conn {
            Conn::Cluster(c) => {
                let nodes = c
                    .route_command(
                        redis::cmd("CLUSTER").arg("NODES").to_owned(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await
                    .map_err(|e| self.error(e))?;
                let text: String =
                    redis::from_redis_value(nodes).map_err(|e| self.error(e.into()))?;
                cluster_masters(&text)?
                    .into_iter()
                    .map(|(host, port)| {
                        Some(RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host,
                            port,
                        }))
                    })
                    .collect()
            }
            _ => vec![None],
        };
        let mut keys = Vec::new();
        for route in masters {
            let mut cursor = 0u64;
            loop {
                let cmd = redis::cmd("SCAN")
                    .cursor_arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .to_owned();
                let (next, batch): (u64, Vec<String>) = match (&route, &mut conn) {
                    (Some(r), Conn::Cluster(c)) => {
                        let v = self.admin(c.route_command(cmd, r.clone())).await?;
                        redis::from_redis_value(v).map_err(|e| self.error(e.into()))?
                    }
                    _ => self.admin(cmd.query_async(&mut conn)).await?,
                };
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(keys)
    }
}

/// The address of every master serving slots, from `CLUSTER NODES`; an error when a master
/// that serves slots is failing (its keys cannot be read until a replica takes over).
fn cluster_masters(nodes: &str) -> Result<Vec<(String, u16)>> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].split(',').any(|x| x == "master") {
            continue;
        }
        let failed = f[2].split(',').any(|x| x == "fail" || x == "fail?");
        if failed {
            return Err(Error::Unavailable(format!(
                "cluster master {} is failing; its slots cannot be read until a replica takes over",
                f[1]
            )));
        }
        let addr = f[1].split(['@', ',']).next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        let port = port
            .parse()
            .map_err(|_| Error::Protocol(format!("CLUSTER NODES address {addr:?}")))?;
        out.push((host.to_string(), port));
    }
    if out.is_empty() {
        return Err(Error::Protocol("CLUSTER NODES lists no master".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Masters serving slots are found with their addresses; a failing one is an error, not a
    /// silently partial report; replicas and slot-less masters are skipped.
    #[test]
    fn cluster_masters_from_nodes() {
        let nodes = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                     b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                     c3 127.0.0.1:7003@17003,host slave a1 0 0 1 connected\n\
                     d4 127.0.0.1:7004@17004 master - 0 0 4 connected\n";
        assert_eq!(
            cluster_masters(nodes).unwrap(),
            vec![("127.0.0.1".into(), 7000), ("127.0.0.1".into(), 7001)]
        );
        let failing = "a1 127.0.0.1:7000@17000 master,fail - 0 0 1 connected 0-5460\n";
        assert!(matches!(
            cluster_masters(failing),
            Err(Error::Unavailable(_))
        ));
    }
}

//! What a connection is, whatever the deployment: one server ([`ConnectionManager`], reconnecting
//! on its own), a Redis Cluster (the cluster client: MOVED/ASK and topology changes handled, a
//! multiplexed link to every master), or the master the sentinels name ([`SentinelConn`],
//! found again after a failover). All three speak [`ConnectionLike`], so every script call,
//! command and pipeline is written once; [`per_slot`] splits a pipeline whose commands live in
//! different slots, which a cluster refuses as one.

use super::sentinel::SentinelConn;
use futures::FutureExt as _;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// One connection of the store's pool.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
}

impl Conn {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// Runs `cmds` (each with the key that routes it) and answers each command's result, in order.
/// On one server they are one pipeline; on a cluster, one pipeline per slot, all concurrently
/// (a cluster refuses a pipeline that spans slots). A failed command does not fail the others;
/// a failed link fails its whole pipeline.
pub(crate) async fn per_slot(
    conn: &Conn,
    cmds: Vec<(String, Cmd)>,
) -> RedisResult<Vec<RedisResult<Value>>> {
    let n = cmds.len();
    let mut groups: Vec<(Route, Vec<usize>, Pipeline)> = Vec::new();
    for (i, (key, cmd)) in cmds.into_iter().enumerate() {
        // Without a cluster everything is one group.
        let route = if conn.is_cluster() {
            Route::with_key(key.as_bytes(), SlotAddr::Master)
        } else {
            Route::new(0, SlotAddr::Master)
        };
        let g = match groups.iter().position(|(r, _, _)| *r == route) {
            Some(g) => g,
            None => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                groups.push((route, Vec::new(), pipe));
                groups.len() - 1
            }
        };
        groups[g].1.push(i);
        groups[g].2.add_command(cmd);
    }
    let runs = groups.into_iter().map(|(_, at, pipe)| {
        let mut c = conn.clone();
        async move {
            let r: RedisResult<Vec<RedisResult<Value>>> = pipe.query_async(&mut c).await;
            (at, r)
        }
        .boxed()
    });
    let mut out: Vec<Option<RedisResult<Value>>> = (0..n).map(|_| None).collect();
    for (at, r) in futures::future::join_all(runs).await {
        let results = r?;
        for (i, v) in at.into_iter().zip(results) {
            out[i] = Some(v);
        }
    }
    Ok(out
        .into_iter()
        .map(|v| v.unwrap_or(Ok(Value::Nil)))
        .collect())
}

//! The Redis store: the cluster's shared state, so N replicas enforce limits as one process
//! would. Every request-path operation is one round trip: `reserve` is one EVALSHA of
//! `quota/lua/reserve.lua`, and `settle` sends one EVALSHA of `quota/lua/settle.lua` per
//! consumer in the batch, pipelined. The scripts are the memory store's logic line for line;
//! the conformance suite (`tests/tests/conformance.rs`) holds the two together.
//!
//! - [`connection`]: connections, deadlines, EVALSHA, error mapping and scrubbing.
//! - [`keys`]: the whole key schema (a contract, documented in `docs/REDIS.md`).
//! - [`codec`]: script arguments and answers, consumer hashes, circuit rows.
//! - [`settle`]: settle batches, pipelined per consumer.
//! - [`scan`]: the usage report's read.
//! - [`budget`]: the team step of a reservation, team records, budget spend, alert claims.
//! - [`pubsub`]: circuit changes pushed to every replica.
//! - [`tools`]: MCP tool-call limits (`tool_call.lua`).
//!
//! Connections are multiplexed and used round-robin: they beat a checkout pool here, since
//! deadpool-redis PINGs on every checkout, which would double the round trips of the hot path.

mod budget;
mod codec;
mod conn;
pub(crate) mod connection;
mod dims;
mod keys;
mod pubsub;
mod scan;
mod sentinel;
mod settle;
mod target;
mod tools;

pub use keys::BREAKER_CHANNEL;
pub use target::{Credentials, Topology};

use crate::model::*;
use crate::{BudgetScope, Error, Result, Store, TeamDecision, TeamRecord, TeamReserve};
use codec::*;
use conn::{Conn, per_slot};
use connection::{eval, evalsha};
use keys::*;
use pubsub::breaker_listener;
use redis::Script;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const RESERVE_LUA: &str = include_str!("../../lua/reserve.lua");
const SETTLE_LUA: &str = include_str!("../../lua/settle.lua");
const SEED_LUA: &str = include_str!("../../lua/seed_consumer.lua");
const BREAKER_FAILURE_LUA: &str = include_str!("../../lua/breaker_failure.lua");
const BREAKER_PROBE_LUA: &str = include_str!("../../lua/breaker_probe.lua");
const BREAKER_CLOSE_LUA: &str = include_str!("../../lua/breaker_close.lua");
const HEARTBEAT_LUA: &str = include_str!("../../lua/heartbeat.lua");
const TEAM_RESERVE_LUA: &str = include_str!("../../lua/team_reserve.lua");
const TEAM_SETTLE_LUA: &str = include_str!("../../lua/team_settle.lua");

/// How to reach Redis and how long to wait for it.
#[derive(Clone, Debug)]
pub struct RedisOpts {
    /// Deadline of one operation on the request path (round trip included); past it the
    /// caller gets [`Error::Timeout`] and applies its `on_error` policy.
    pub timeout: Duration,
    /// Deadline of work off the request path (settle batches, heartbeats, lease reserves):
    /// a slow link delays it but does not fail it, since slow is not down.
    pub background_timeout: Duration,
    /// Multiplexed connections used round-robin (at least 1).
    pub pool_size: usize,
    /// Added to Redis `TIME` in the scripts: a test hook to place "now" near a window boundary.
    /// Always 0 in production.
    pub time_offset_ms: i64,
    /// How long daily usage totals (`tg:usage:{ID}:YYYYMMDD`) are kept.
    pub usage_retention_days: u32,
    /// Confirm every settle batch with `WAIT 1` and re-send unconfirmed ones (same batch id),
    /// so a failover that promotes a replica loses no usage. On for cluster and sentinel
    /// deployments; off for one server, which may have no replica to wait for.
    pub confirm_writes: bool,
    /// How long a settle batch waits for a replica's acknowledgement (off the request path).
    pub confirm_timeout: Duration,
}

impl Default for RedisOpts {
    fn default() -> Self {
        RedisOpts {
            timeout: Duration::from_millis(50),
            background_timeout: Duration::from_secs(2),
            pool_size: 16,
            time_offset_ms: 0,
            usage_retention_days: 400,
            confirm_writes: false,
            confirm_timeout: Duration::from_millis(100),
        }
    }
}

/// A [`Store`] in Redis: one server, a Redis Cluster, or a Sentinel-managed master
/// ([`Topology`]). Every script touches one hash slot, so every operation routes to one master.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Vec<Conn>,
    /// Settle batches and their `WAIT` only (see [`settle`]).
    settle_conn: Conn,
    next: AtomicUsize,
    opts: RedisOpts,
    /// Credentials from the URL, scrubbed from every error message.
    secrets: Vec<String>,
    reserve: Script,
    settle: Script,
    seed: Script,
    breaker_failure: Script,
    breaker_probe: Script,
    breaker_close: Script,
    heartbeat: Script,
    team_reserve: Script,
    team_settle: Script,
    /// Where the breaker listener subscribes.
    listen: target::Listen,
    /// Settle batches applied but not yet confirmed by a replica (`WAIT`), re-sent under
    /// their ids until one is (see [`settle`]).
    confirm: parking_lot::Mutex<settle::Confirm>,
    /// Circuit changes from the pub/sub listener (started on first subscription).
    events: tokio::sync::broadcast::Sender<BreakerState>,
    listening: std::sync::atomic::AtomicBool,
    /// Makes each counted failure a distinct member of the window's sorted set.
    failure_seq: AtomicUsize,
    instance: String,
}

impl Store for RedisStore {
    async fn lookup_key(&self, key_sha256: &str) -> Result<Option<String>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(api_key(key_sha256));
        self.hot_cmd(cmd).await
    }

    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<Decision> {
        let (c, b, q, r, m) = (
            consumer_key(req.consumer),
            bucket_key(req.consumer),
            quota_key(req.consumer),
            reservation_key(req.consumer, req.id),
            spend_key(req.consumer),
        );
        let mut cmd = evalsha(&self.inner.reserve, &[&c, &b, &q, &r, &m]);
        cmd.arg(req.model)
            .arg(req.tokens)
            .arg(if req.require_record { "1" } else { "0" });
        opt_arg(&mut cmd, req.defaults.tpm);
        opt_arg(&mut cmd, req.defaults.quota);
        cmd.arg(req.defaults.quota_period.as_str())
            .arg(self.inner.opts.time_offset_ms)
            .arg(crate::RESERVATION_TTL_MS)
            .arg(req.cost_nano);
        let mut conn = self.conn();
        let run = eval(&mut conn, &self.inner.reserve, &cmd);
        let v: Vec<String> = if req.background {
            self.background(run).await?
        } else {
            self.hot(run).await?
        };
        decode_decision(&v)
    }

    async fn settle(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        self.settle_batch(batch_id, batch).await
    }

    async fn seed_consumer(
        &self,
        consumer: &ConsumerRecord,
        key_hashes: &[String],
    ) -> Result<bool> {
        let key = consumer_key(&consumer.id);
        let mut cmd = evalsha(&self.inner.seed, &[&key]);
        for (f, v) in record_fields(consumer) {
            cmd.arg(f).arg(v);
        }
        let mut conn = self.conn();
        let written: i64 = self.admin(eval(&mut conn, &self.inner.seed, &cmd)).await?;
        if !key_hashes.is_empty() {
            // Key mappings live in many slots: one pipeline per slot on a cluster.
            let sets = key_hashes
                .iter()
                .map(|h| {
                    let key = api_key(h);
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(&key).arg(&consumer.id).arg("NX");
                    (key, cmd)
                })
                .collect();
            for r in self.admin(per_slot(&conn, sets)).await? {
                r.map_err(|e| self.error(e))?;
            }
            // The marker only after the keys are written: a key the marker names but the store
            // lacks is a revoked key, never one that failed to be written.
            let cmd = redis::cmd("SADD")
                .arg(seed_keys_key(&consumer.id))
                .arg(key_hashes)
                .to_owned();
            self.admin(cmd.exec_async(&mut conn)).await?;
        }
        Ok(written == 1)
    }

    async fn key_was_seeded(&self, consumer: &str, key_sha256: &str) -> Result<bool> {
        let mut cmd = redis::cmd("SISMEMBER");
        cmd.arg(seed_keys_key(consumer)).arg(key_sha256);
        self.hot_cmd(cmd).await
    }

    async fn mark_seeded(&self) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(SEEDED_KEY).arg("1");
        self.admin_cmd(cmd).await
    }

    async fn is_seeded(&self) -> Result<bool> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(SEEDED_KEY);
        self.admin_cmd(cmd).await
    }

    async fn put_consumer(&self, consumer: &ConsumerRecord) -> Result<()> {
        let key = consumer_key(&consumer.id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(&key)
            .ignore()
            .hset_multiple(&key, &record_fields(consumer))
            .ignore();
        let mut conn = self.conn();
        self.admin(pipe.exec_async(&mut conn)).await
    }

    async fn put_key(&self, key_sha256: &str, consumer: &str) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(api_key(key_sha256)).arg(consumer);
        self.admin_cmd(cmd).await
    }

    async fn get_consumer(&self, id: &str) -> Result<Option<ConsumerRecord>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(consumer_key(id));
        let h: HashMap<String, String> = self.hot_cmd(cmd).await?;
        if h.is_empty() {
            return Ok(None);
        }
        decode_record(id, h).map(Some)
    }

    async fn usage(&self, since: u32, until: u32) -> Result<Vec<UsageRow>> {
        self.scan_usage(since, until).await
    }

    async fn dimension_usage(&self, since: u32, until: u32) -> Result<Vec<DimRow>> {
        self.scan_dims(since, until).await
    }

    async fn heartbeat(&self, replica: &str, ttl_ms: u64) -> Result<u32> {
        let mut conn = self.conn();
        let mut cmd = evalsha(&self.inner.heartbeat, &[REPLICAS_KEY]);
        cmd.arg(replica).arg(ttl_ms);
        let n: u32 = self
            .background(eval(&mut conn, &self.inner.heartbeat, &cmd))
            .await?;
        Ok(n.max(1))
    }

    async fn breaker_failure(&self, backend: &str, f: &BreakerFailure) -> Result<BreakerState> {
        let mut conn = self.conn();
        let (k1, k2) = (breaker_key(backend), bfail_key(backend));
        let mut cmd = evalsha(&self.inner.breaker_failure, &[&k1, &k2]);
        let seq = self.inner.failure_seq.fetch_add(1, Ordering::Relaxed);
        let f = f.bounded();
        cmd.arg(f.failures)
            .arg(f.window_ms)
            .arg(f.trip_ms)
            .arg(f.trip_for_ms.map(|v| v.to_string()).unwrap_or_default())
            .arg(if f.probe { "1" } else { "0" })
            .arg(BREAKER_CHANNEL)
            .arg(format!("{}:{seq}", self.inner.instance))
            .arg(MAX_TRIP_MS);
        let v: Vec<String> = self
            .hot(eval(&mut conn, &self.inner.breaker_failure, &cmd))
            .await?;
        let bad = || Error::Protocol(format!("breaker_failure.lua returned {v:?}"));
        Ok(BreakerState {
            backend: backend.to_string(),
            open_until_ms: v.first().and_then(|s| s.parse().ok()).ok_or_else(bad)?,
            trip: v.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?,
            now_ms: v.get(2).and_then(|s| s.parse().ok()).ok_or_else(bad)?,
        })
    }

    async fn breaker_close(&self, backend: &str) -> Result<bool> {
        let mut conn = self.conn();
        let (k1, k2) = (breaker_key(backend), bfail_key(backend));
        let mut cmd = evalsha(&self.inner.breaker_close, &[&k1, &k2]);
        cmd.arg(BREAKER_CHANNEL).arg(MAX_TRIP_MS);
        let n: i64 = self
            .hot(eval(&mut conn, &self.inner.breaker_close, &cmd))
            .await?;
        Ok(n == 1)
    }

    async fn breaker_probe(&self, backend: &str, lease_ms: u64) -> Result<bool> {
        let mut conn = self.conn();
        let k1 = breaker_key(backend);
        let mut cmd = evalsha(&self.inner.breaker_probe, &[&k1]);
        cmd.arg(lease_ms.max(1)).arg(MAX_TRIP_MS);
        let n: i64 = self
            .hot(eval(&mut conn, &self.inner.breaker_probe, &cmd))
            .await?;
        Ok(n == 1)
    }

    async fn breaker_states(&self, backends: &[String]) -> Result<Vec<BreakerState>> {
        let mut conn = self.conn();
        let (secs, micros): (u64, u64) = self
            .admin(redis::cmd("TIME").query_async(&mut conn))
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        let reads = backends
            .iter()
            .map(|b| {
                let key = breaker_key(b);
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(&key).arg("open_until").arg("trip");
                (key, cmd)
            })
            .collect();
        // Read as text: one row this version could not have written must not fail the others.
        let mut rows: Vec<(Option<String>, Option<String>)> = Vec::with_capacity(backends.len());
        for r in self.admin(per_slot(&conn, reads)).await? {
            let v = r.map_err(|e| self.error(e))?;
            rows.push(redis::from_redis_value(v).map_err(|e| self.error(e.into()))?);
        }
        Ok(backends
            .iter()
            .zip(rows)
            .filter_map(|(b, (o, t))| {
                let state = parse_breaker_row(b, o.as_deref(), t.as_deref(), now_ms);
                if state.is_none() {
                    tracing::warn!(backend = %b, open_until = ?o, trip = ?t,
                        "circuit state in the store is not valid; skipped");
                }
                state
            })
            .collect())
    }

    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState> {
        let rx = self.inner.events.subscribe();
        if !self.inner.listening.swap(true, Ordering::SeqCst) {
            tokio::spawn(breaker_listener(
                self.inner.listen.clone(),
                self.inner.events.clone(),
            ));
        }
        rx
    }

    async fn reserve_team(&self, req: &TeamReserve<'_>) -> Result<TeamDecision> {
        self.team_reserve(req).await
    }

    async fn seed_team(&self, team: &TeamRecord) -> Result<bool> {
        self.team_seed(team).await
    }

    async fn put_team(&self, team: &TeamRecord) -> Result<()> {
        self.team_put(team).await
    }

    async fn get_team(&self, id: &str) -> Result<Option<TeamRecord>> {
        self.team_get(id).await
    }

    async fn spend(&self, scope: BudgetScope, id: &str) -> Result<Option<(u64, i64)>> {
        self.read_spend(scope, id).await
    }

    async fn claim_alert(&self, name: &str, ttl_ms: u64) -> Result<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(alert_key(name))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1));
        let set: Option<String> = self.admin_cmd(cmd).await?;
        Ok(set.is_some())
    }

    async fn release_alert(&self, name: &str) -> Result<()> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(alert_key(name));
        self.admin_cmd(cmd).await
    }

    async fn tool_call(&self, req: &crate::ToolCallRequest<'_>) -> Result<crate::ToolDecision> {
        self.tool_call_lua(req).await
    }

    async fn add_tool_usage(&self, rows: &[crate::ToolUsage]) -> Result<()> {
        self.add_tool_usage_redis(rows).await
    }

    async fn tool_usage(&self, since: u32, until: u32) -> Result<Vec<crate::ToolUsage>> {
        self.scan_tool_usage(since, until).await
    }

    async fn ping(&self) -> Result<()> {
        self.hot_cmd::<String>(redis::cmd("PING")).await.map(|_| ())
    }

    fn consumer_partition(&self, consumer: &str) -> u16 {
        if self.inner.conns[0].is_cluster() {
            key_slot(consumer.as_bytes())
        } else {
            0
        }
    }

    fn key_partition(&self, key_sha256: &str) -> u16 {
        if self.inner.conns[0].is_cluster() {
            key_slot(api_key(key_sha256).as_bytes())
        } else {
            0
        }
    }
}

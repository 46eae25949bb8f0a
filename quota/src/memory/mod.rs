//! The in-memory store: the embedded default for one replica and the local fallback while Redis
//! is unreachable. Its semantics are the Redis scripts', line for line (see `quota/lua/`); the
//! conformance suite holds the two together.
//!
//! - [`limits`] (this folder's `limits.rs`): reservations, settlements and their records, the
//!   twins of `reserve.lua` and `settle.lua`.
//! - [`breaker`]: circuits, the twins of the `breaker_*.lua` scripts.
//! - [`budget`]: the team step and team settlements (twins of `team_*.lua`), alert claims.
//! - [`tools`]: MCP tool-call limits (twin of `tool_call.lua`).
//! - [`dims`]: per-dimension usage with its cap (the twin of the `dims` part of `settle.lua`).
//!
//! Everything is behind one short mutex, never held across an await.

mod breaker;
mod budget;
mod dims;
mod limits;
mod tools;

use crate::model::*;
use crate::{BudgetScope, Result, Store, TeamDecision, TeamRecord, TeamReserve};
use breaker::Circuit;
use limits::{Bucket, QuotaUse, Record};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Where the memory store takes its time from (unix microseconds).
pub trait Clock: Send + Sync + 'static {
    fn now_us(&self) -> u64;
}

/// The system clock, shifted by an adjustable offset (tests move time forward with it).
#[derive(Debug, Default)]
pub struct SystemClock {
    offset_us: AtomicI64,
}

impl SystemClock {
    pub fn advance_ms(&self, ms: i64) {
        self.offset_us.fetch_add(ms * 1000, Ordering::SeqCst);
    }
}

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        (t + self.offset_us.load(Ordering::Relaxed)).max(0) as u64
    }
}

#[derive(Default)]
struct Inner {
    circuits: HashMap<String, Circuit>,
    /// Settle batches already applied (bounded), so a retried batch applies once.
    settled: std::collections::HashSet<u64>,
    settled_order: std::collections::VecDeque<u64>,
    consumers: HashMap<String, ConsumerRecord>,
    keys: HashMap<String, String>,
    buckets: HashMap<String, Bucket>,
    quotas: HashMap<String, QuotaUse>,
    usage: HashMap<UsageKey, UsageCounts>,
    /// Per-dimension usage (`tg:dims:{ID}:YYYYMMDD`).
    dims: dims::Dims,
    /// Key hashes seeded from configuration, per consumer (`tg:seedkeys:{ID}`).
    seeded_keys: HashMap<String, std::collections::HashSet<String>>,
    seeded: bool,
    /// Reservation records by (consumer, id), as `tg:resv:{ID}:RID` in Redis.
    reservations: HashMap<(String, u64), Record>,
    /// When each record was last written, oldest first, so expired ones are dropped.
    record_expiry: std::collections::VecDeque<(u64, (String, u64))>,
    /// Consumers' budget spend (`tg:spend:{ID}`).
    spends: HashMap<String, QuotaUse>,
    /// Teams (`tg:team:{TEAM}`), their spend and their step's records.
    teams: HashMap<String, TeamRecord>,
    team_spends: HashMap<String, QuotaUse>,
    team_records: HashMap<(String, u64), (budget::TeamRec, u64)>,
    /// Alert claims and when they expire (unix us).
    alerts: HashMap<String, u64>,
    /// MCP tool calls per consumer (`tg:toolrate:{ID}`, `tg:toolquota:{ID}`).
    tool_use: HashMap<String, tools::ToolUse>,
    /// Tool-call totals by (day, consumer, team, server, tool): (calls, errors).
    tool_totals: HashMap<crate::tools::ToolUsageKey, (u64, u64)>,
}

/// A reservation the store remembers: what it debited, or a tombstone.

#[derive(Clone, PartialEq, Eq, Hash)]
struct UsageKey {
    day: u32,
    consumer: String,
    team: String,
    model: String,
    backend: String,
}

#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    clock: Arc<dyn Clock>,
    events: tokio::sync::broadcast::Sender<BreakerState>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock::default()))
    }

    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            inner: Arc::default(),
            clock,
            events: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// Forgets every bucket and quota counter (keeps consumers, keys and usage). Used when the
    /// local fallback hands enforcement back to Redis.
    pub fn reset_counters(&self) {
        let mut g = self.inner.lock();
        g.buckets.clear();
        g.quotas.clear();
        g.spends.clear();
        g.team_spends.clear();
        g.tool_use.clear();
    }
}

impl Store for MemoryStore {
    async fn lookup_key(&self, key_sha256: &str) -> Result<Option<String>> {
        Ok(self.inner.lock().keys.get(key_sha256).cloned())
    }

    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<Decision> {
        self.reserve_now(req)
    }

    async fn settle(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        self.settle_now(batch_id, batch)
    }

    async fn seed_consumer(
        &self,
        consumer: &ConsumerRecord,
        key_hashes: &[String],
    ) -> Result<bool> {
        let mut g = self.inner.lock();
        for k in key_hashes {
            g.keys
                .entry(k.clone())
                .or_insert_with(|| consumer.id.clone());
        }
        g.seeded_keys
            .entry(consumer.id.clone())
            .or_default()
            .extend(key_hashes.iter().cloned());
        if g.consumers.contains_key(&consumer.id) {
            return Ok(false);
        }
        g.consumers.insert(consumer.id.clone(), consumer.clone());
        Ok(true)
    }

    async fn key_was_seeded(&self, consumer: &str, key_sha256: &str) -> Result<bool> {
        Ok(self
            .inner
            .lock()
            .seeded_keys
            .get(consumer)
            .is_some_and(|k| k.contains(key_sha256)))
    }

    async fn mark_seeded(&self) -> Result<()> {
        self.inner.lock().seeded = true;
        Ok(())
    }

    async fn is_seeded(&self) -> Result<bool> {
        Ok(self.inner.lock().seeded)
    }

    async fn put_consumer(&self, consumer: &ConsumerRecord) -> Result<()> {
        self.inner
            .lock()
            .consumers
            .insert(consumer.id.clone(), consumer.clone());
        Ok(())
    }

    async fn put_key(&self, key_sha256: &str, consumer: &str) -> Result<()> {
        self.inner
            .lock()
            .keys
            .insert(key_sha256.to_string(), consumer.to_string());
        Ok(())
    }

    async fn get_consumer(&self, id: &str) -> Result<Option<ConsumerRecord>> {
        Ok(self.inner.lock().consumers.get(id).cloned())
    }

    async fn usage(&self, since: u32, until: u32) -> Result<Vec<UsageRow>> {
        let g = self.inner.lock();
        let mut rows: Vec<UsageRow> = g
            .usage
            .iter()
            .filter(|(k, _)| k.day >= since && k.day <= until)
            .map(|(k, v)| UsageRow {
                day: k.day,
                consumer: k.consumer.clone(),
                team: k.team.clone(),
                model: k.model.clone(),
                backend: k.backend.clone(),
                counts: *v,
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.day, &a.consumer, &a.model, &a.backend).cmp(&(
                b.day,
                &b.consumer,
                &b.model,
                &b.backend,
            ))
        });
        Ok(rows)
    }

    async fn dimension_usage(&self, since: u32, until: u32) -> Result<Vec<DimRow>> {
        Ok(self.inner.lock().dims.rows(since, until))
    }

    async fn heartbeat(&self, _replica: &str, _ttl_ms: u64) -> Result<u32> {
        Ok(1)
    }

    async fn breaker_failure(&self, backend: &str, f: &BreakerFailure) -> Result<BreakerState> {
        self.breaker_failure_now(backend, f)
    }

    async fn breaker_close(&self, backend: &str) -> Result<bool> {
        self.breaker_close_now(backend)
    }

    async fn breaker_probe(&self, backend: &str, lease_ms: u64) -> Result<bool> {
        self.breaker_probe_now(backend, lease_ms)
    }

    async fn breaker_states(&self, backends: &[String]) -> Result<Vec<BreakerState>> {
        self.breaker_states_now(backends)
    }

    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState> {
        self.events.subscribe()
    }

    async fn reserve_team(&self, req: &TeamReserve<'_>) -> Result<TeamDecision> {
        self.reserve_team_now(req)
    }

    async fn seed_team(&self, team: &TeamRecord) -> Result<bool> {
        Ok(self.seed_team_now(team))
    }

    async fn put_team(&self, team: &TeamRecord) -> Result<()> {
        self.put_team_now(team);
        Ok(())
    }

    async fn get_team(&self, id: &str) -> Result<Option<TeamRecord>> {
        Ok(self.inner.lock().teams.get(id).cloned())
    }

    async fn spend(&self, scope: BudgetScope, id: &str) -> Result<Option<(u64, i64)>> {
        Ok(self.spend_now(scope, id))
    }

    async fn claim_alert(&self, name: &str, ttl_ms: u64) -> Result<bool> {
        Ok(self.claim_alert_now(name, ttl_ms))
    }

    async fn release_alert(&self, name: &str) -> Result<()> {
        self.release_alert_now(name);
        Ok(())
    }

    async fn tool_call(&self, req: &crate::ToolCallRequest<'_>) -> Result<crate::ToolDecision> {
        Ok(self.tool_call_mem(req))
    }

    async fn add_tool_usage(&self, rows: &[crate::ToolUsage]) -> Result<()> {
        self.add_tool_usage_mem(rows);
        Ok(())
    }

    async fn tool_usage(&self, since: u32, until: u32) -> Result<Vec<crate::ToolUsage>> {
        Ok(self.tool_usage_mem(since, until))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

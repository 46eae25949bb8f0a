//! Store selection: the [`AnyStore`] the configuration asks for (`[store] kind`), so that the
//! gateway and the CLI hold one type whatever the store, and every operation dispatches to it.

use crate::{
    BreakerFailure, BreakerState, BudgetScope, ConsumerRecord, Decision, Error, MemoryStore,
    RedisOpts, RedisStore, ReserveRequest, Result, Settlement, Store, TeamDecision, TeamRecord,
    TeamReserve, UsageRow,
};
use std::time::Duration;
use tollgate_common::config::{StoreConfig, StoreKind};

/// The variable that overrides `store.url` (a secret or a per-replica address).
pub const REDIS_URL_ENV: &str = "TOLLGATE_REDIS_URL";

/// The configured store: memory (one replica) or Redis (a cluster).
#[derive(Clone)]
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Memory($s) => $e,
            AnyStore::Redis($s) => $e,
        }
    };
}

impl Store for AnyStore {
    async fn lookup_key(&self, key_sha256: &str) -> Result<Option<String>> {
        delegate!(self, s => s.lookup_key(key_sha256).await)
    }
    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<Decision> {
        delegate!(self, s => s.reserve(req).await)
    }
    async fn settle(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        delegate!(self, s => s.settle(batch_id, batch).await)
    }
    async fn seed_consumer(
        &self,
        consumer: &ConsumerRecord,
        key_hashes: &[String],
    ) -> Result<bool> {
        delegate!(self, s => s.seed_consumer(consumer, key_hashes).await)
    }
    async fn key_was_seeded(&self, consumer: &str, key_sha256: &str) -> Result<bool> {
        delegate!(self, s => s.key_was_seeded(consumer, key_sha256).await)
    }
    async fn mark_seeded(&self) -> Result<()> {
        delegate!(self, s => s.mark_seeded().await)
    }
    async fn is_seeded(&self) -> Result<bool> {
        delegate!(self, s => s.is_seeded().await)
    }
    async fn put_consumer(&self, consumer: &ConsumerRecord) -> Result<()> {
        delegate!(self, s => s.put_consumer(consumer).await)
    }
    async fn put_key(&self, key_sha256: &str, consumer: &str) -> Result<()> {
        delegate!(self, s => s.put_key(key_sha256, consumer).await)
    }
    async fn get_consumer(&self, id: &str) -> Result<Option<ConsumerRecord>> {
        delegate!(self, s => s.get_consumer(id).await)
    }
    async fn usage(&self, since: u32, until: u32) -> Result<Vec<UsageRow>> {
        delegate!(self, s => s.usage(since, until).await)
    }
    async fn heartbeat(&self, replica: &str, ttl_ms: u64) -> Result<u32> {
        delegate!(self, s => s.heartbeat(replica, ttl_ms).await)
    }
    async fn breaker_failure(
        &self,
        backend: &str,
        failure: &BreakerFailure,
    ) -> Result<BreakerState> {
        delegate!(self, s => s.breaker_failure(backend, failure).await)
    }
    async fn breaker_close(&self, backend: &str) -> Result<bool> {
        delegate!(self, s => s.breaker_close(backend).await)
    }
    async fn breaker_probe(&self, backend: &str, lease_ms: u64) -> Result<bool> {
        delegate!(self, s => s.breaker_probe(backend, lease_ms).await)
    }
    async fn breaker_states(&self, backends: &[String]) -> Result<Vec<BreakerState>> {
        delegate!(self, s => s.breaker_states(backends).await)
    }
    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState> {
        delegate!(self, s => s.breaker_events())
    }
    async fn reserve_team(&self, req: &TeamReserve<'_>) -> Result<TeamDecision> {
        delegate!(self, s => s.reserve_team(req).await)
    }
    async fn seed_team(&self, team: &TeamRecord) -> Result<bool> {
        delegate!(self, s => s.seed_team(team).await)
    }
    async fn put_team(&self, team: &TeamRecord) -> Result<()> {
        delegate!(self, s => s.put_team(team).await)
    }
    async fn get_team(&self, id: &str) -> Result<Option<TeamRecord>> {
        delegate!(self, s => s.get_team(id).await)
    }
    async fn spend(&self, scope: BudgetScope, id: &str) -> Result<Option<(u64, i64)>> {
        delegate!(self, s => s.spend(scope, id).await)
    }
    async fn claim_alert(&self, name: &str, ttl_ms: u64) -> Result<bool> {
        delegate!(self, s => s.claim_alert(name, ttl_ms).await)
    }
    async fn release_alert(&self, name: &str) -> Result<()> {
        delegate!(self, s => s.release_alert(name).await)
    }
    async fn ping(&self) -> Result<()> {
        delegate!(self, s => s.ping().await)
    }
}

/// Connects the store `[store]` describes: the memory store, or Redis at `store.url` (unless
/// `TOLLGATE_REDIS_URL` is set), waiting for it to answer.
pub async fn connect(config: &StoreConfig) -> Result<AnyStore> {
    Ok(match config.kind {
        StoreKind::Memory => AnyStore::Memory(MemoryStore::new()),
        StoreKind::Redis => {
            let url = std::env::var(REDIS_URL_ENV).unwrap_or_else(|_| config.url.clone());
            let opts = RedisOpts {
                timeout: Duration::from_millis(config.timeout_ms),
                pool_size: config.pool_size,
                usage_retention_days: config.usage_retention_days.min(u32::MAX as u64) as u32,
                ..Default::default()
            };
            AnyStore::Redis(RedisStore::connect(&url, opts).await.map_err(|e| match e {
                Error::Unavailable(m) => Error::Unavailable(format!("store.url: {m}")),
                other => other,
            })?)
        }
    })
}

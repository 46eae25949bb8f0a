//! Store selection: the [`AnyStore`] the configuration asks for (`[store] kind`), so that the
//! gateway and the CLI hold one type whatever the store, and every operation dispatches to it.

use crate::{
    BreakerFailure, BreakerState, BudgetScope, ConsumerRecord, Credentials, Decision, DimRow,
    Error, MemoryStore, RedisOpts, RedisStore, ReserveRequest, Result, Settlement, Store,
    TeamDecision, TeamRecord, TeamReserve, Topology, UsageRow,
};
use std::time::Duration;
use tollgate_common::config::{StoreConfig, StoreKind, secret_from_env};

/// The variable that overrides `store.url` (a secret or a per-replica address).
pub const REDIS_URL_ENV: &str = "TOLLGATE_REDIS_URL";
/// The variable that overrides `store.urls` (cluster seed nodes) or `store.sentinels`,
/// comma-separated.
pub const REDIS_URLS_ENV: &str = "TOLLGATE_REDIS_URLS";

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
    async fn dimension_usage(&self, since: u32, until: u32) -> Result<Vec<DimRow>> {
        delegate!(self, s => s.dimension_usage(since, until).await)
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
    async fn tool_call(&self, req: &crate::ToolCallRequest<'_>) -> Result<crate::ToolDecision> {
        delegate!(self, s => s.tool_call(req).await)
    }
    async fn add_tool_usage(&self, rows: &[crate::ToolUsage]) -> Result<()> {
        delegate!(self, s => s.add_tool_usage(rows).await)
    }
    async fn tool_usage(&self, since: u32, until: u32) -> Result<Vec<crate::ToolUsage>> {
        delegate!(self, s => s.tool_usage(since, until).await)
    }
    async fn ping(&self) -> Result<()> {
        delegate!(self, s => s.ping().await)
    }
    fn consumer_partition(&self, consumer: &str) -> u16 {
        delegate!(self, s => s.consumer_partition(consumer))
    }
    fn key_partition(&self, key_sha256: &str) -> u16 {
        delegate!(self, s => s.key_partition(key_sha256))
    }
}

/// Connects the store `[store]` describes: the memory store, or Redis — one server at
/// `store.url` (unless `TOLLGATE_REDIS_URL` is set), a cluster through `store.urls`, or the
/// master the `store.sentinels` name (either list overridden by `TOLLGATE_REDIS_URLS`) —
/// waiting for it to answer. Passwords come from the variables `store.password_env` and
/// `store.sentinel_password_env` name, the CA from `store.ca_file`.
pub async fn connect(config: &StoreConfig) -> Result<AnyStore> {
    if config.kind == StoreKind::Memory {
        return Ok(AnyStore::Memory(MemoryStore::new()));
    }
    let (topology, key) = topology(config, |v| std::env::var(v).ok())?;
    let creds = credentials(config)?;
    let opts = RedisOpts {
        timeout: Duration::from_millis(config.timeout_ms),
        pool_size: config.pool_size,
        usage_retention_days: config.usage_retention_days.min(u32::MAX as u64) as u32,
        // A failover promotes a replica that may lack the last writes: confirm usage.
        confirm_writes: config.kind != StoreKind::Redis,
        ..Default::default()
    };
    let store = RedisStore::open(&topology, &creds, opts)
        .await
        .map_err(|e| match e {
            Error::Unavailable(m) => Error::Unavailable(format!("{key}: {m}")),
            other => other,
        })?;
    Ok(AnyStore::Redis(store))
}

/// The deployment `[store]` describes, with the environment's overrides (`env` reads a
/// variable); also the config key to name in errors.
fn topology(
    config: &StoreConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Topology, &'static str)> {
    let list = |key: &'static str, configured: &[String]| -> Result<Vec<String>> {
        let urls: Vec<String> = match env(REDIS_URLS_ENV) {
            Some(v) if !v.trim().is_empty() => v
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            _ => configured.to_vec(),
        };
        if urls.is_empty() {
            return Err(Error::Unavailable(format!(
                "{key}: no URLs (set it, or {REDIS_URLS_ENV})"
            )));
        }
        Ok(urls)
    };
    Ok(match config.kind {
        StoreKind::Memory | StoreKind::Redis => (
            Topology::Single(env(REDIS_URL_ENV).unwrap_or_else(|| config.url.clone())),
            "store.url",
        ),
        StoreKind::RedisCluster => (
            Topology::Cluster(list("store.urls", &config.urls)?),
            "store.urls",
        ),
        StoreKind::RedisSentinel => (
            Topology::Sentinel {
                sentinels: list("store.sentinels", &config.sentinels)?,
                master_name: config.master_name.clone(),
            },
            "store.sentinels",
        ),
    })
}

/// User, passwords (from the variables the config names) and CA of `[store]`.
fn credentials(config: &StoreConfig) -> Result<Credentials> {
    let secret = |key: &str, var: &Option<String>| -> Result<Option<String>> {
        var.as_deref()
            .map(|v| {
                secret_from_env(v)
                    .map(|s| s.expose().to_string())
                    .map_err(|m| Error::Unavailable(format!("{key}: {m}")))
            })
            .transpose()
    };
    let ca_pem = config
        .ca_file
        .as_ref()
        .map(|p| {
            std::fs::read(p).map_err(|e| {
                Error::Unavailable(format!("store.ca_file: cannot read {}: {e}", p.display()))
            })
        })
        .transpose()?;
    Ok(Credentials {
        username: config.username.clone(),
        password: secret("store.password_env", &config.password_env)?,
        sentinel_password: secret("store.sentinel_password_env", &config.sentinel_password_env)?,
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kind: StoreKind) -> StoreConfig {
        StoreConfig {
            kind,
            url: "redis://a:1".into(),
            urls: vec!["redis://c1:7000".into(), "redis://c2:7000".into()],
            sentinels: vec!["redis://s1:26379".into()],
            ..StoreConfig::default()
        }
    }

    /// `TOLLGATE_REDIS_URL` overrides `url` for kind `redis` only; `TOLLGATE_REDIS_URLS`
    /// (comma-separated, spaces ignored) overrides `urls` or `sentinels`; an empty list is an
    /// error naming the key.
    #[test]
    fn environment_overrides() {
        let none = |_: &str| None;
        let both = |v: &str| match v {
            REDIS_URL_ENV => Some("redis://env:1".to_string()),
            _ => Some(" redis://e1:1, redis://e2:2 ,".to_string()),
        };
        let single = |c: &StoreConfig, env: &dyn Fn(&str) -> Option<String>| match topology(c, env)
            .unwrap()
            .0
        {
            Topology::Single(u) => u,
            other => panic!("{other:?}"),
        };
        assert_eq!(single(&config(StoreKind::Redis), &none), "redis://a:1");
        assert_eq!(single(&config(StoreKind::Redis), &both), "redis://env:1");
        let Topology::Cluster(urls) = topology(&config(StoreKind::RedisCluster), none).unwrap().0
        else {
            panic!("not a cluster")
        };
        assert_eq!(urls, ["redis://c1:7000", "redis://c2:7000"]);
        let Topology::Cluster(urls) = topology(&config(StoreKind::RedisCluster), both).unwrap().0
        else {
            panic!("not a cluster")
        };
        assert_eq!(urls, ["redis://e1:1", "redis://e2:2"]);
        let (
            Topology::Sentinel {
                sentinels,
                master_name,
            },
            key,
        ) = topology(&config(StoreKind::RedisSentinel), both).unwrap()
        else {
            panic!("not sentinel")
        };
        assert_eq!(
            (sentinels.len(), master_name.as_str(), key),
            (2, "mymaster", "store.sentinels")
        );
        let mut empty = config(StoreKind::RedisCluster);
        empty.urls.clear();
        let err = topology(&empty, none).unwrap_err().to_string();
        assert!(
            err.contains("store.urls") && err.contains(REDIS_URLS_ENV),
            "{err}"
        );
    }

    /// A password variable that is not set is an error naming the key and the variable,
    /// never a silent anonymous login.
    #[test]
    fn missing_password_variable() {
        let mut c = config(StoreKind::Redis);
        c.password_env = Some("TOLLGATE_TEST_SURELY_UNSET_PW".into());
        let err = credentials(&c).unwrap_err().to_string();
        assert!(
            err.contains("store.password_env") && err.contains("TOLLGATE_TEST_SURELY_UNSET_PW"),
            "{err}"
        );
    }
}

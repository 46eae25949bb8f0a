//! `[store]` (where shared state lives, and what to do when it is unreachable), `[limits]`
//! (estimates and defaults) and `[[consumers]]`.

use crate::types::{BudgetAction, Period};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Memory,
    /// One Redis (or Valkey) server at `url`.
    Redis,
    /// A Redis Cluster reached through the seed nodes in `urls`.
    RedisCluster,
    /// The master that the sentinels in `sentinels` name for `master_name`, followed across
    /// failovers.
    RedisSentinel,
}

impl StoreKind {
    /// Whether state is shared through some Redis (every kind but `memory`).
    pub fn is_redis(self) -> bool {
        self != StoreKind::Memory
    }

    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
            StoreKind::RedisCluster => "redis_cluster",
            StoreKind::RedisSentinel => "redis_sentinel",
        }
    }
}

/// What a replica does while the shared store is unreachable or too slow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Spend only allowances obtained from the store before the fault (leases, already
    /// debited), else answer 503: never more than the limits plus one request per replica.
    #[default]
    Escrow,
    /// Keep enforcing with a per-replica bucket (limit divided by live replicas): available,
    /// but it may over-admit when only some replicas lose the store.
    Local,
    FailOpen,
    FailClosed,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `redis://host:port/db`, `rediss://…` (TLS) or `redis+unix:///path.sock` (kind `redis`);
    /// `TOLLGATE_REDIS_URL` overrides.
    pub url: String,
    /// Seed nodes of a Redis Cluster (kind `redis_cluster`); any live one finds the rest.
    /// `TOLLGATE_REDIS_URLS` (comma-separated) overrides.
    pub urls: Vec<String>,
    /// Sentinels watching the master (kind `redis_sentinel`); `TOLLGATE_REDIS_URLS` overrides.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// The variable holding the sentinels' own password (`requirepass` of the sentinels).
    pub sentinel_password_env: Option<String>,
    /// ACL user of the data nodes (the password comes from `password_env`).
    pub username: Option<String>,
    /// The variable holding the data nodes' password (ACL user's, or `requirepass`).
    pub password_env: Option<String>,
    /// PEM file of the CA that signed the servers' certificates, for `rediss://` URLs that a
    /// private CA signed (otherwise the system's roots are trusted).
    pub ca_file: Option<std::path::PathBuf>,
    pub on_error: OnError,
    /// A store command slower than this counts as a store failure.
    pub timeout_ms: u64,
    pub pool_size: usize,
    /// Days that daily usage totals are kept.
    pub usage_retention_days: u64,
    /// A replica degraded for longer than this logs at error level once a minute.
    pub max_degraded_ms: u64,
    /// `/readyz` answers 503 once a replica has been degraded for `max_degraded_ms`, so a load
    /// balancer sends its traffic elsewhere.
    pub unready_when_degraded: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            url: "redis://127.0.0.1:6379".into(),
            urls: Vec::new(),
            sentinels: Vec::new(),
            master_name: "mymaster".into(),
            sentinel_password_env: None,
            username: None,
            password_env: None,
            ca_file: None,
            on_error: OnError::Escrow,
            timeout_ms: 50,
            pool_size: 4,
            usage_retention_days: 400,
            max_degraded_ms: 30_000,
            unready_when_degraded: false,
        }
    }
}

/// How requests are estimated and how unknown (JWT-only) consumers are limited.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Completion tokens reserved when a request sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// Tokens per minute for a consumer that has no limit of its own (none = unlimited).
    pub default_tpm: Option<u64>,
    /// Period quota for a consumer that has none of its own (none = unlimited).
    pub default_quota: Option<u64>,
    pub default_quota_period: Period,
    /// How long a key → consumer lookup is cached on a replica (revocation delay).
    pub key_cache_ms: u64,
    /// Busy consumers' tokens are leased to a replica in slices (debited in Redis first, at most
    /// 250 ms old), so most of their requests skip the store round trip.
    pub lease: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_max_tokens: 1024,
            default_tpm: None,
            default_quota: None,
            default_quota_period: Period::Month,
            key_cache_ms: 1000,
            lease: true,
        }
    }
}

/// Every field but `id` may be left out (its default); a missing or empty `id` is refused by
/// validation, naming the consumer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    pub id: String,
    pub team: Option<String>,
    pub tpm: Option<u64>,
    pub quota: Option<u64>,
    pub quota_period: Period,
    /// Models this consumer may use; empty = all.
    pub models: Vec<String>,
    pub key_sha256: Vec<String>,
    /// Name of an environment variable holding a plain key (hashed at start-up).
    pub key_env: Option<String>,
    pub disabled: bool,
    /// The consumer's own budget in money per `budget_period` (on top of its team's).
    pub budget: Option<f64>,
    pub budget_period: Period,
    pub budget_action: BudgetAction,
    /// MCP tools this consumer may see and call (`server.tool` globs); none by default.
    pub mcp_tools: Vec<String>,
    /// MCP tool calls in any rolling minute (the `tg:consumer:{ID}` field wins when set).
    pub tool_calls_per_min: Option<u64>,
    /// MCP tool calls per `quota_period` (the `tg:consumer:{ID}` field wins when set).
    pub tool_calls_quota: Option<u64>,
}

impl StoreConfig {
    /// The URL shapes and required names of the chosen kind; errors name the key at fault.
    pub(crate) fn validate(&self) -> Result<(), super::ConfigError> {
        use super::ConfigError;
        let tcp = |u: &str| u.starts_with("redis://") || u.starts_with("rediss://");
        match self.kind {
            StoreKind::Memory => {}
            StoreKind::Redis => {
                if !(tcp(&self.url)
                    || self.url.starts_with("redis+unix://")
                    || self.url.starts_with("unix://"))
                {
                    return Err(ConfigError::new(
                        "store.url",
                        "expected redis://, rediss:// or redis+unix:// URL",
                    ));
                }
            }
            StoreKind::RedisCluster | StoreKind::RedisSentinel => {
                let (key, urls) = if self.kind == StoreKind::RedisCluster {
                    ("store.urls", &self.urls)
                } else {
                    ("store.sentinels", &self.sentinels)
                };
                // Empty is allowed here: `TOLLGATE_REDIS_URLS` may supply them at start.
                if let Some((i, _)) = urls.iter().enumerate().find(|(_, u)| !tcp(u)) {
                    return Err(ConfigError::new(
                        format!("{key}[{i}]"),
                        "expected a redis:// or rediss:// URL",
                    ));
                }
                if self.kind == StoreKind::RedisSentinel && self.master_name.trim().is_empty() {
                    return Err(ConfigError::new(
                        "store.master_name",
                        "name the master the sentinels monitor",
                    ));
                }
            }
        }
        if self.username.is_some() && self.password_env.is_none() {
            return Err(ConfigError::new(
                "store.username",
                "an ACL user needs `password_env`",
            ));
        }
        Ok(())
    }
}

//! Token limits and quotas: the reservation on the request path and the store behind it.
//!
//! One store call per request ([`Limits::reserve`]): the store reads the consumer's current
//! limits, refills the per-minute bucket, checks the period quota and debits the estimate, all
//! atomically. The correction to actual usage happens later, off the latency path, in the usage
//! worker (`usage.rs`). When the store fails, `store.on_error` decides: `local` keeps enforcing
//! with this replica's own in-memory store, `fail_open` admits, `fail_closed` answers 503.

use crate::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tollgate_common::config::OnError;
use tollgate_quota::{
    Admission, BreakerFailure, BreakerState, ConsumerRecord, Decision, LimitDefaults, MemoryStore,
    RedisStore, ReserveRequest, Settlement, Store, UsageRow,
};

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
    async fn lookup_key(&self, key_sha256: &str) -> tollgate_quota::Result<Option<String>> {
        delegate!(self, s => s.lookup_key(key_sha256).await)
    }
    async fn reserve(&self, req: &ReserveRequest<'_>) -> tollgate_quota::Result<Decision> {
        delegate!(self, s => s.reserve(req).await)
    }
    async fn settle(&self, batch: &[Settlement]) -> tollgate_quota::Result<()> {
        delegate!(self, s => s.settle(batch).await)
    }
    async fn seed_consumer(
        &self,
        consumer: &ConsumerRecord,
        key_hashes: &[String],
    ) -> tollgate_quota::Result<bool> {
        delegate!(self, s => s.seed_consumer(consumer, key_hashes).await)
    }
    async fn put_consumer(&self, consumer: &ConsumerRecord) -> tollgate_quota::Result<()> {
        delegate!(self, s => s.put_consumer(consumer).await)
    }
    async fn put_key(&self, key_sha256: &str, consumer: &str) -> tollgate_quota::Result<()> {
        delegate!(self, s => s.put_key(key_sha256, consumer).await)
    }
    async fn get_consumer(&self, id: &str) -> tollgate_quota::Result<Option<ConsumerRecord>> {
        delegate!(self, s => s.get_consumer(id).await)
    }
    async fn usage(&self, since: u32, until: u32) -> tollgate_quota::Result<Vec<UsageRow>> {
        delegate!(self, s => s.usage(since, until).await)
    }
    async fn heartbeat(&self, replica: &str, ttl_ms: u64) -> tollgate_quota::Result<u32> {
        delegate!(self, s => s.heartbeat(replica, ttl_ms).await)
    }
    async fn breaker_failure(
        &self,
        backend: &str,
        failure: &BreakerFailure,
    ) -> tollgate_quota::Result<BreakerState> {
        delegate!(self, s => s.breaker_failure(backend, failure).await)
    }
    async fn breaker_close(&self, backend: &str) -> tollgate_quota::Result<bool> {
        delegate!(self, s => s.breaker_close(backend).await)
    }
    async fn breaker_probe(&self, backend: &str, lease_ms: u64) -> tollgate_quota::Result<bool> {
        delegate!(self, s => s.breaker_probe(backend, lease_ms).await)
    }
    async fn breaker_states(
        &self,
        backends: &[String],
    ) -> tollgate_quota::Result<Vec<BreakerState>> {
        delegate!(self, s => s.breaker_states(backends).await)
    }
    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState> {
        delegate!(self, s => s.breaker_events())
    }
    async fn ping(&self) -> tollgate_quota::Result<()> {
        delegate!(self, s => s.ping().await)
    }
}

/// A reservation made for one request, to be settled once.
#[derive(Clone, Debug)]
pub struct Reserved {
    pub admission: Admission,
    pub tokens: u64,
    /// Made in this replica's fallback store (settle there too), or not made at all
    /// (`fail_open`: nothing to settle).
    pub place: Placement,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Shared,
    Local,
    Nowhere,
}

pub struct Limits {
    pub store: AnyStore,
    /// This replica's own store, used while the shared store is unreachable (`on_error = local`).
    pub local: MemoryStore,
    pub on_error: OnError,
    pub defaults: LimitDefaults,
    degraded: AtomicBool,
}

impl Limits {
    pub fn new(store: AnyStore, on_error: OnError, defaults: LimitDefaults) -> Arc<Self> {
        Arc::new(Limits {
            store,
            local: MemoryStore::new(),
            on_error,
            defaults,
            degraded: AtomicBool::new(false),
        })
    }

    /// Whether the last store call failed and the fallback policy is in force.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn mark(&self, failed: bool, what: &str, err: Option<&tollgate_quota::Error>) {
        let was = self.degraded.swap(failed, Ordering::Relaxed);
        match (was, failed) {
            (false, true) => tracing::warn!(
                error = %err.map(|e| e.to_string()).unwrap_or_default(),
                policy = ?self.on_error,
                "store unreachable during {what}; fallback policy in force"
            ),
            (true, false) => tracing::info!("store reachable again; shared limits in force"),
            _ => {}
        }
    }

    pub async fn lookup_key(&self, hex: &str) -> Result<Option<String>, Error> {
        match self.store.lookup_key(hex).await {
            Ok(v) => {
                self.mark(false, "key lookup", None);
                Ok(v)
            }
            Err(e) => {
                self.mark(true, "key lookup", Some(&e));
                match self.on_error {
                    OnError::FailClosed => Err(Error::StoreUnavailable),
                    _ => self
                        .local
                        .lookup_key(hex)
                        .await
                        .map_err(|_| Error::StoreUnavailable),
                }
            }
        }
    }

    /// The consumer's record (`None` when unknown or the store is unreachable).
    pub async fn get_consumer(&self, id: &str) -> Option<ConsumerRecord> {
        match self.store.get_consumer(id).await {
            Ok(r) => r,
            Err(_) => self.local.get_consumer(id).await.ok().flatten(),
        }
    }

    /// Debits `tokens` for the consumer, or says why not.
    pub async fn reserve(
        &self,
        consumer: &str,
        model: &str,
        tokens: u64,
        require_record: bool,
    ) -> Result<Reserved, Error> {
        let req = ReserveRequest {
            consumer,
            model,
            tokens,
            defaults: &self.defaults,
            require_record,
        };
        let (decision, place) = match self.store.reserve(&req).await {
            Ok(d) => {
                self.mark(false, "reserve", None);
                (d, Placement::Shared)
            }
            Err(e) => {
                self.mark(true, "reserve", Some(&e));
                match self.on_error {
                    OnError::FailClosed => return Err(Error::StoreUnavailable),
                    OnError::FailOpen => {
                        let admission = Admission {
                            team: String::new(),
                            remaining_tpm: None,
                            remaining_quota: None,
                            window: 0,
                            tpm: None,
                            quota: None,
                            quota_period: Default::default(),
                        };
                        return Ok(Reserved {
                            admission,
                            tokens,
                            place: Placement::Nowhere,
                        });
                    }
                    OnError::Local => {
                        let d = self
                            .local
                            .reserve(&req)
                            .await
                            .map_err(|_| Error::StoreUnavailable)?;
                        (d, Placement::Local)
                    }
                }
            }
        };
        match decision {
            Decision::Admitted(admission) => Ok(Reserved {
                admission,
                tokens,
                place,
            }),
            Decision::RateLimited { retry_after_ms, .. } => {
                Err(Error::RateLimited { retry_after_ms })
            }
            Decision::QuotaExceeded { retry_after_ms } => {
                Err(Error::QuotaExceeded { retry_after_ms })
            }
            Decision::ModelNotAllowed => Err(Error::ModelNotAllowed(model.to_string())),
            Decision::Disabled => Err(Error::ConsumerDisabled),
            Decision::UnknownConsumer => Err(Error::Unauthenticated),
        }
    }
}

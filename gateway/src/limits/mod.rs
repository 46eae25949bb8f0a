//! Token limits and quotas: the reservation on the request path and the store behind it.
//!
//! One store call per request ([`Limits::reserve`]): the store reads the consumer's current
//! limits, refills the per-minute bucket, checks the period quota and debits the estimate, all
//! atomically. The correction to actual usage happens later, off the latency path, in the usage
//! worker (`usage.rs`). When the store fails, `store.on_error` decides: `local` keeps enforcing
//! with this replica's own in-memory store, `fail_open` admits, `fail_closed` answers 503.

use crate::error::Error;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use tollgate_common::config::OnError;
use tollgate_quota::{
    Admission, BreakerFailure, BreakerState, ConsumerRecord, Decision, LimitDefaults, MemoryStore,
    Period, RedisStore, ReserveRequest, Settlement, Store, UsageRow,
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
    async fn settle(&self, batch_id: u64, batch: &[Settlement]) -> tollgate_quota::Result<()> {
        delegate!(self, s => s.settle(batch_id, batch).await)
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

/// What this replica last learned of a consumer's limits from the shared store, so it can
/// keep enforcing a share of them while the store is unreachable.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Learned {
    team: String,
    tpm: Option<u64>,
    /// Quota left in the current window at the last admission.
    quota_left: Option<u64>,
    quota_period: Period,
}

/// How long the shared store is left alone after it failed, before the next request tries it.
const STORE_RETRY_MS: u64 = 250;

pub struct Limits {
    pub store: AnyStore,
    /// This replica's own store, used while the shared store is unreachable (`on_error = local`).
    pub local: MemoryStore,
    pub on_error: OnError,
    pub defaults: LimitDefaults,
    degraded: AtomicBool,
    /// Until this time (unix ms) requests skip the shared store and use the fallback, so an
    /// outage costs one store timeout per interval, not one per request.
    retry_at_ms: AtomicU64,
    /// Live replicas as last counted; the local fallback enforces 1/N of each limit.
    replicas: AtomicU32,
    learned: Mutex<HashMap<String, Learned>>,
    /// Consumers from the configuration (their model allow-lists hold during an outage too).
    configured: HashMap<String, ConsumerRecord>,
    /// The same with their key hashes, seeded again (only where absent) whenever the store
    /// comes back, in case it came back empty.
    seeds: Arc<Vec<(ConsumerRecord, Vec<String>)>>,
    /// When the local fallback's counters were last started afresh (unix ms).
    local_reset_ms: AtomicU64,
    /// Leases of busy consumers' tokens (`None`: leasing is off, e.g. the memory store).
    leases: Option<Mutex<Leases>>,
}

/// How long a lease lives: an operator's lowered limit or `disabled 1` applies within this.
pub const LEASE_MS: u64 = 250;
/// Requests per second on this replica that make a consumer busy enough to lease.
const BUSY_RPS: u64 = 20;

/// A slice of a busy consumer's bucket and quota, debited in the store ahead of use so the
/// cluster can never over-admit; this replica admits from it without a store call until it is
/// spent or [`LEASE_MS`] old, then returns what is left.
struct Lease {
    left: u64,
    expires_ms: u64,
    admission: Admission,
}

#[derive(Default)]
struct Rate {
    second: u64,
    reqs: u64,
    tokens: u64,
    last_reqs: u64,
    last_tokens: u64,
}

impl Rate {
    fn record(&mut self, now_ms: u64, tokens: u64) {
        let sec = now_ms / 1000;
        if sec != self.second {
            (self.last_reqs, self.last_tokens) = if sec == self.second + 1 {
                (self.reqs, self.tokens)
            } else {
                (0, 0)
            };
            (self.second, self.reqs, self.tokens) = (sec, 0, 0);
        }
        self.reqs += 1;
        self.tokens += tokens;
    }
}

#[derive(Default)]
struct Leases {
    /// By consumer and model (a lease passed the model allow-list for that model only).
    active: HashMap<(String, String), Lease>,
    rates: HashMap<String, Rate>,
    /// Lease requests in flight, so a busy consumer asks once at a time.
    asking: std::collections::HashSet<(String, String)>,
}

impl Limits {
    pub fn new(
        store: AnyStore,
        on_error: OnError,
        defaults: LimitDefaults,
        seeds: Vec<(ConsumerRecord, Vec<String>)>,
    ) -> Arc<Self> {
        Arc::new(Limits {
            store,
            local: MemoryStore::new(),
            on_error,
            defaults,
            degraded: AtomicBool::new(false),
            retry_at_ms: AtomicU64::new(0),
            replicas: AtomicU32::new(1),
            learned: Mutex::new(HashMap::new()),
            configured: seeds
                .iter()
                .map(|(c, _)| (c.id.clone(), c.clone()))
                .collect(),
            seeds: Arc::new(seeds),
            local_reset_ms: AtomicU64::new(0),
            leases: None,
        })
    }

    /// Whether the last store call failed and the fallback policy is in force.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Counts this replica in and learns how many are alive (every second, from `server`).
    pub async fn heartbeat(&self, replica: &str) {
        if let Ok(n) = self.store.heartbeat(replica, 5_000).await {
            let was = self.replicas.swap(n.max(1), Ordering::Relaxed);
            if was != n && self.degraded() {
                self.rebuild_local();
            }
        }
    }

    /// Whether to try the shared store now (always, unless it failed moments ago).
    fn try_shared(&self) -> bool {
        !self.degraded() || crate::routing::now_ms() >= self.retry_at_ms.load(Ordering::Relaxed)
    }

    fn mark(&self, failed: bool, what: &str, err: Option<&tollgate_quota::Error>) {
        if failed {
            self.retry_at_ms
                .store(crate::routing::now_ms() + STORE_RETRY_MS, Ordering::Relaxed);
        }
        let was = self.degraded.swap(failed, Ordering::Relaxed);
        match (was, failed) {
            (false, true) => {
                tracing::warn!(
                    error = %err.map(|e| e.to_string()).unwrap_or_default(),
                    policy = ?self.on_error,
                    replicas = self.replicas(),
                    "store unreachable during {what}; fallback policy in force"
                );
                if self.on_error == OnError::Local {
                    self.rebuild_local();
                }
            }
            (true, false) => {
                tracing::info!("store reachable again; shared limits in force");
                // A store that lost its data (no persistence) gets the configured consumers back.
                let (store, seeds) = (self.store.clone(), self.seeds.clone());
                tokio::spawn(async move {
                    for (rec, keys) in seeds.iter() {
                        let _ = store.seed_consumer(rec, keys).await;
                    }
                });
            }
            _ => {}
        }
    }

    /// Writes this replica's share (1/N) of every known consumer's limits into the local store
    /// and starts its counters afresh.
    fn rebuild_local(&self) {
        let n = self.replicas().max(1) as u64;
        let share = |v: Option<u64>| v.map(|v| v.div_ceil(n));
        let learned = self.learned.lock().clone();
        let mut records: HashMap<String, ConsumerRecord> = self
            .configured
            .values()
            .map(|c| {
                let mut r = c.clone();
                r.tpm = share(r.tpm);
                r.quota = share(r.quota);
                (r.id.clone(), r)
            })
            .collect();
        for (id, l) in learned {
            let base = self.configured.get(&id).cloned().unwrap_or_default();
            records.insert(
                id.clone(),
                ConsumerRecord {
                    id,
                    team: l.team,
                    tpm: share(l.tpm),
                    quota: share(l.quota_left),
                    quota_period: l.quota_period,
                    models: base.models,
                    disabled: base.disabled,
                },
            );
        }
        let local = self.local.clone();
        // A flapping store must not hand out a fresh allowance on every failure: the local
        // counters start afresh at most once a minute.
        let now = crate::routing::now_ms();
        let last = self.local_reset_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .local_reset_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            local.reset_counters();
        }
        for r in records.values() {
            // The memory store answers at once; this never waits.
            let _ = futures::FutureExt::now_or_never(local.put_consumer(r));
        }
    }

    fn learn(&self, consumer: &str, a: &Admission) {
        if self.on_error != OnError::Local {
            return;
        }
        let l = Learned {
            team: a.team.clone(),
            tpm: a.tpm,
            quota_left: a.remaining_quota.map(|q| q.max(0) as u64),
            quota_period: a.quota_period,
        };
        let mut g = self.learned.lock();
        match g.get_mut(consumer) {
            Some(old) if *old == l => {}
            Some(old) => *old = l,
            None => {
                g.insert(consumer.to_string(), l);
            }
        }
    }

    pub async fn lookup_key(&self, hex: &str) -> Result<Option<String>, Error> {
        if self.try_shared() {
            match self.store.lookup_key(hex).await {
                Ok(v) => {
                    self.mark(false, "key lookup", None);
                    return Ok(v);
                }
                Err(e) => self.mark(true, "key lookup", Some(&e)),
            }
        }
        match self.on_error {
            OnError::FailClosed => Err(Error::StoreUnavailable),
            _ => self
                .local
                .lookup_key(hex)
                .await
                .map_err(|_| Error::StoreUnavailable),
        }
    }

    /// The consumer's record (`None` when unknown or the store is unreachable).
    pub async fn get_consumer(&self, id: &str) -> Option<ConsumerRecord> {
        match self.store.get_consumer(id).await {
            Ok(r) => r,
            Err(_) => self.local.get_consumer(id).await.ok().flatten(),
        }
    }

    /// Turns leasing on (the Redis store: it saves busy consumers a round trip per request).
    pub fn with_leases(mut self: Arc<Self>) -> Arc<Self> {
        if let Some(me) = Arc::get_mut(&mut self) {
            me.leases = Some(Mutex::new(Leases::default()));
        }
        self
    }

    /// Debits `tokens` for the consumer, or says why not: from this replica's lease when the
    /// consumer is busy and has one, else with one store call.
    pub async fn reserve(
        self: &Arc<Self>,
        consumer: &str,
        model: &str,
        tokens: u64,
        require_record: bool,
    ) -> Result<Reserved, Error> {
        let Some(leases) = &self.leases else {
            return self
                .reserve_direct(consumer, model, tokens, require_record)
                .await;
        };
        let now = crate::routing::now_ms();
        let key = (consumer.to_string(), model.to_string());
        let mut want_lease = false;
        {
            let mut g = leases.lock();
            g.rates
                .entry(consumer.to_string())
                .or_default()
                .record(now, tokens);
            if let Some(l) = g.active.get_mut(&key)
                && l.expires_ms > now
                && l.left >= tokens
                && !self.degraded()
            {
                l.left -= tokens;
                let mut admission = l.admission.clone();
                admission.remaining_tpm = admission.remaining_tpm.map(|r| r + l.left as i64);
                admission.remaining_quota = admission.remaining_quota.map(|r| r + l.left as i64);
                return Ok(Reserved {
                    admission,
                    tokens,
                    place: Placement::Shared,
                });
            }
            let rate = &g.rates[consumer];
            if rate.reqs.max(rate.last_reqs) >= BUSY_RPS && !g.asking.contains(&key) {
                g.asking.insert(key.clone());
                want_lease = true;
            }
        }
        let r = self
            .reserve_direct(consumer, model, tokens, require_record)
            .await;
        match (&r, want_lease) {
            (Ok(res), true) if res.place == Placement::Shared => {
                self.clone()
                    .acquire_lease(key, res.admission.clone(), require_record);
            }
            (_, true) => {
                leases.lock().asking.remove(&key);
            }
            _ => {}
        }
        r
    }

    /// Asks the store for a lease in the background: a quarter second of the consumer's recent
    /// use, at most 1/20 of its per-minute limit and 1/50 of the quota it has left.
    fn acquire_lease(
        self: Arc<Self>,
        key: (String, String),
        last: Admission,
        require_record: bool,
    ) {
        tokio::spawn(async move {
            let Some(leases) = &self.leases else { return };
            let size = {
                let g = leases.lock();
                let rate = g.rates.get(&key.0);
                let per_sec = rate.map(|r| r.tokens.max(r.last_tokens)).unwrap_or(0);
                let mut size = per_sec / 4;
                if let Some(t) = last.tpm {
                    size = size.min(t / 20);
                }
                if let Some(q) = last.remaining_quota {
                    size = size.min(q.max(0) as u64 / 50);
                }
                size
            };
            let mut granted = None;
            if size > 0 {
                let req = ReserveRequest {
                    consumer: &key.0,
                    model: &key.1,
                    tokens: size,
                    defaults: &self.defaults,
                    require_record,
                };
                if let Ok(Decision::Admitted(a)) = self.store.reserve(&req).await {
                    granted = Some(Lease {
                        left: size,
                        expires_ms: crate::routing::now_ms() + LEASE_MS,
                        admission: a,
                    });
                }
            }
            let old = {
                let mut g = leases.lock();
                g.asking.remove(&key);
                match granted {
                    Some(l) => g.active.insert(key.clone(), l),
                    None => None,
                }
            };
            if let Some(old) = old {
                self.return_leases(vec![(key.0, old)]).await;
            }
        });
    }

    /// Returns what expired leases (all of them with `all`) did not use.
    pub async fn sweep_leases(&self, all: bool) {
        let Some(leases) = &self.leases else { return };
        let now = crate::routing::now_ms();
        let expired: Vec<(String, Lease)> = {
            let mut g = leases.lock();
            let keys: Vec<(String, String)> = g
                .active
                .iter()
                .filter(|(_, l)| all || l.expires_ms <= now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| g.active.remove(&k).map(|l| (k.0, l)))
                .collect()
        };
        self.return_leases(expired).await;
    }

    async fn return_leases(&self, leases: Vec<(String, Lease)>) {
        let batch: Vec<Settlement> = leases
            .into_iter()
            .filter(|(_, l)| l.left > 0)
            .map(|(consumer, l)| Settlement {
                consumer,
                reserved: l.left,
                actual: 0,
                window: l.admission.window,
                tpm: l.admission.tpm,
                usage: None,
            })
            .collect();
        if batch.is_empty() {
            return;
        }
        let id = tollgate_quota::new_batch_id();
        for _ in 0..3 {
            if self.store.settle(id, &batch).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // Unreturned lease tokens only make the consumer wait longer; nothing is over-admitted.
        tracing::debug!(leases = batch.len(), "could not return unused lease tokens");
    }

    /// Debits `tokens` for the consumer with one store call, or says why not.
    async fn reserve_direct(
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
        let mut shared = None;
        if self.try_shared() {
            match self.store.reserve(&req).await {
                Ok(d) => {
                    self.mark(false, "reserve", None);
                    if let Decision::Admitted(a) = &d {
                        self.learn(consumer, a);
                    }
                    shared = Some(d);
                }
                Err(e) => self.mark(true, "reserve", Some(&e)),
            }
        }
        let (decision, place) = match shared {
            Some(d) => (d, Placement::Shared),
            None => match self.on_error {
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
                    let n = self.replicas().max(1) as u64;
                    let defaults = LimitDefaults {
                        tpm: self.defaults.tpm.map(|v| v.div_ceil(n)),
                        quota: self.defaults.quota.map(|v| v.div_ceil(n)),
                        quota_period: self.defaults.quota_period,
                    };
                    let local_req = ReserveRequest {
                        defaults: &defaults,
                        ..req
                    };
                    let d = self
                        .local
                        .reserve(&local_req)
                        .await
                        .map_err(|_| Error::StoreUnavailable)?;
                    (d, Placement::Local)
                }
            },
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

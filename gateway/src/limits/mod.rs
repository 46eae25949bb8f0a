//! Token limits and quotas: the reservation on the request path and the store behind it.
//!
//! One store call per request ([`Limits::reserve`]), or none for a busy consumer served from a
//! [lease](lease): the store reads the consumer's current limits, refills the per-minute
//! bucket, checks the period quota and debits the estimate, all atomically. The correction to
//! actual usage happens later, off the latency path, in the usage worker (`usage.rs`).
//!
//! Every reservation carries an id, so the store applies it at most once: a reserve that gets
//! no answer within half of `store.timeout_ms` is sent once more with the same id (slow is not
//! down), and one that gets no answer at all is *abandoned*: the usage worker later tells the
//! store to refund whatever it debited, if it ever ran. No debit outlives its request.
//!
//! When the store cannot be reached, `store.on_error` decides:
//! - `escrow` (default): spend only what was obtained from the store before the fault (leases,
//!   already debited), else 503 with `retry-after`. The cluster never admits more than its
//!   limits plus one request per replica, whichever links fail.
//! - `local`: this replica's own in-memory store with a 1/N share of each limit (N from
//!   heartbeats): available, but replicas that lose the store while others keep it may admit
//!   their shares on top of what the store admits.
//! - `fail_open` admits; `fail_closed` answers 503.

mod lease;
mod refusals;
mod seed;

pub use lease::LEASE_MS;

use crate::error::Error;
use crate::routing::now_ms;
use lease::{Key, Lease, Leases, Take};
use parking_lot::Mutex;
use refusals::Refusals;
use seed::Seeds;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tollgate_common::config::OnError;
use tollgate_quota::{
    Admission, BreakerFailure, BreakerState, ConsumerRecord, Decision, LimitDefaults, MemoryStore,
    Period, RedisStore, ReservationEnd, ReserveRequest, Settlement, Store, UsageRow,
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
    async fn key_was_seeded(
        &self,
        consumer: &str,
        key_sha256: &str,
    ) -> tollgate_quota::Result<bool> {
        delegate!(self, s => s.key_was_seeded(consumer, key_sha256).await)
    }
    async fn mark_seeded(&self) -> tollgate_quota::Result<()> {
        delegate!(self, s => s.mark_seeded().await)
    }
    async fn is_seeded(&self) -> tollgate_quota::Result<bool> {
        delegate!(self, s => s.is_seeded().await)
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
    /// What settling does with the store's record of it (none for lease slices).
    pub end: ReservationEnd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Shared,
    Local,
    Nowhere,
}

/// What this replica last learned of a consumer's limits from the shared store, so it can
/// keep enforcing a share of them while the store is unreachable (`on_error = "local"`).
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

/// Whether the shared store answers, and since when it does not.
#[derive(Default)]
struct Health {
    degraded: AtomicBool,
    /// When the current degradation began (unix ms; 0 = healthy).
    since_ms: AtomicU64,
    /// Until this time (unix ms) requests skip the shared store, so an outage costs one store
    /// timeout per interval, not one per request.
    retry_at_ms: AtomicU64,
    /// When a long degradation was last logged at error level.
    logged_ms: AtomicU64,
}

/// The store settings the limits need.
#[derive(Clone, Debug)]
pub struct Policy {
    pub on_error: OnError,
    pub defaults: LimitDefaults,
    /// `store.timeout_ms`: a reserve unanswered for half of it is sent once more.
    pub timeout: Duration,
    /// `store.max_degraded_ms`: past it a degraded replica logs at error level once a minute.
    pub max_degraded_ms: u64,
}

pub struct Limits {
    pub store: AnyStore,
    /// This replica's own store, used while the shared store is unreachable (`on_error = local`).
    pub local: MemoryStore,
    pub policy: Policy,
    health: Health,
    /// Live replicas as last counted; the local fallback enforces 1/N of each limit.
    replicas: AtomicU32,
    learned: Mutex<HashMap<String, Learned>>,
    /// Consumers and keys from the configuration, and whether the store holds them.
    pub seeds: Seeds,
    /// When the local fallback's counters were last started afresh (unix ms).
    local_reset_ms: AtomicU64,
    /// Leases of busy consumers' tokens (`None`: leasing is off, e.g. the memory store).
    leases: Option<Mutex<Leases>>,
    refusals: Refusals,
    /// Reservations given up on (no answer from the store), for the usage worker to refund.
    abandoned: Mutex<Vec<Settlement>>,
}

impl Limits {
    pub fn new(
        store: AnyStore,
        policy: Policy,
        seeds: Vec<(ConsumerRecord, Vec<String>)>,
    ) -> Arc<Self> {
        Arc::new(Limits {
            store,
            local: MemoryStore::new(),
            policy,
            health: Health::default(),
            replicas: AtomicU32::new(1),
            learned: Mutex::new(HashMap::new()),
            seeds: Seeds::new(seeds),
            local_reset_ms: AtomicU64::new(0),
            leases: None,
            refusals: Refusals::default(),
            abandoned: Mutex::new(Vec::new()),
        })
    }

    /// Turns leasing on (the Redis store: it saves busy consumers a round trip per request).
    pub fn with_leases(mut self: Arc<Self>) -> Arc<Self> {
        if let Some(me) = Arc::get_mut(&mut self) {
            me.leases = Some(Mutex::new(Leases::default()));
        }
        self
    }

    /// Whether the last store call failed and the fallback policy is in force.
    pub fn degraded(&self) -> bool {
        self.health.degraded.load(Ordering::Relaxed)
    }

    /// How long the store has been unreachable (zero when it answers).
    pub fn degraded_for(&self) -> Duration {
        let since = self.health.since_ms.load(Ordering::Relaxed);
        if !self.degraded() || since == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms().saturating_sub(since))
    }

    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Counts this replica in and learns how many are alive (every second, from `server`);
    /// reports a degradation that lasts longer than `store.max_degraded_ms`.
    pub async fn heartbeat(&self, replica: &str) {
        if let Ok(n) = self.store.heartbeat(replica, 5_000).await {
            let was = self.replicas.swap(n.max(1), Ordering::Relaxed);
            if was != n && self.degraded() && self.policy.on_error == OnError::Local {
                self.rebuild_local();
            }
        }
        let long = self.degraded_for();
        if long.as_millis() as u64 > self.policy.max_degraded_ms {
            let now = now_ms();
            let last = self.health.logged_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 60_000 {
                self.health.logged_ms.store(now, Ordering::Relaxed);
                tracing::error!(
                    degraded_s = long.as_secs(),
                    policy = ?self.policy.on_error,
                    "the store has been unreachable for longer than store.max_degraded_ms"
                );
            }
        }
    }

    /// Whether to try the shared store now (always, unless it failed moments ago).
    fn try_shared(&self) -> bool {
        !self.degraded() || now_ms() >= self.health.retry_at_ms.load(Ordering::Relaxed)
    }

    fn mark(&self, failed: bool, what: &str, err: Option<&tollgate_quota::Error>) {
        let now = now_ms();
        if failed {
            self.health
                .retry_at_ms
                .store(now + STORE_RETRY_MS, Ordering::Relaxed);
        }
        let was = self.health.degraded.swap(failed, Ordering::Relaxed);
        match (was, failed) {
            (false, true) => {
                self.health.since_ms.store(now, Ordering::Relaxed);
                tracing::warn!(
                    error = %err.map(|e| e.to_string()).unwrap_or_default(),
                    policy = ?self.policy.on_error,
                    replicas = self.replicas(),
                    "store unreachable during {what}; fallback policy in force"
                );
                if self.policy.on_error == OnError::Local {
                    self.rebuild_local();
                }
            }
            (true, false) => {
                self.health.since_ms.store(0, Ordering::Relaxed);
                tracing::info!("store reachable again; shared limits in force");
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
            .seeds
            .records()
            .map(|c| {
                let mut r = c.clone();
                r.tpm = share(r.tpm);
                r.quota = share(r.quota);
                (r.id.clone(), r)
            })
            .collect();
        for (id, l) in learned {
            let base = self.seeds.record(&id).cloned().unwrap_or_default();
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
        let now = now_ms();
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
        if self.policy.on_error != OnError::Local {
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

    /// The consumer a key hash belongs to. A configured key the store no longer maps is told
    /// apart by the seed marker: revoked by an operator (`None`), or lost with the store's data
    /// (seeded again, and valid). While the store is unreachable, configured keys are known
    /// from the configuration and any other key cannot be checked: 503, never a 401 that
    /// clients would take as final.
    pub async fn lookup_key(&self, hex: &str) -> Result<Option<String>, Error> {
        let owner = self.seeds.owner(hex);
        if self.try_shared() {
            match self.store.lookup_key(hex).await {
                Ok(Some(found)) => {
                    self.mark(false, "key lookup", None);
                    return Ok(Some(found));
                }
                Ok(None) => {
                    self.mark(false, "key lookup", None);
                    let Some(owner) = owner else {
                        return Ok(None);
                    };
                    return match self.seeds.restore_key(&self.store, owner, hex).await {
                        Ok(true) => Ok(Some(owner.to_string())),
                        Ok(false) => Ok(None),
                        Err(e) => {
                            self.mark(true, "key lookup", Some(&e));
                            Err(Error::StoreUnavailable)
                        }
                    };
                }
                Err(e) => self.mark(true, "key lookup", Some(&e)),
            }
        }
        match owner {
            Some(owner) => Ok(Some(owner.to_string())),
            None => Err(Error::StoreUnavailable),
        }
    }

    /// The consumer's record (`None` when unknown or the store is unreachable).
    pub async fn get_consumer(&self, id: &str) -> Option<ConsumerRecord> {
        match self.store.get_consumer(id).await {
            Ok(r) => r,
            Err(_) => self.local.get_consumer(id).await.ok().flatten(),
        }
    }

    /// A refusal this replica saw moments ago and would see again: checked before the prompt is
    /// read (`at_least = None`: only a disabled consumer) and before it is tokenized (with the
    /// fewest tokens the request can need).
    pub fn refused(&self, consumer: &str, at_least: Option<u64>) -> Option<Error> {
        self.refusals.check(consumer, at_least, now_ms())
    }

    /// Reservations given up on since the last call, for the usage worker to send.
    pub fn take_abandoned(&self) -> Vec<Settlement> {
        std::mem::take(&mut *self.abandoned.lock())
    }

    fn abandon(&self, consumer: &str, id: u64) {
        self.abandoned.lock().push(Settlement {
            consumer: consumer.to_string(),
            end: ReservationEnd::Abandoned { id },
            reserved: 0,
            actual: 0,
            window: 0,
            tpm: None,
            usage: None,
        });
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
        let key: Key = (consumer.to_string(), model.to_string());
        // While the store is unreachable under escrow, what a lease still holds is spent even
        // past its age: it is debited in the store, and admin changes cannot be read anyway.
        let escrow_degraded = self.degraded() && self.policy.on_error == OnError::Escrow;
        let ask = match leases.lock().take(&key, tokens, now_ms(), escrow_degraded) {
            Take::Admitted(admission) => {
                return Ok(Reserved {
                    admission,
                    tokens,
                    place: Placement::Shared,
                    end: ReservationEnd::None,
                });
            }
            Take::Miss { ask } => ask,
        };
        let r = self
            .reserve_direct(consumer, model, tokens, require_record)
            .await;
        if let Ok(res) = &r
            && res.place == Placement::Shared
        {
            leases.lock().admitted(consumer, &res.admission);
        }
        // A busy consumer asks for a lease: after an admission, or when the store was too slow
        // for this request (a lease is reserved with the background deadline: slow is not down).
        let may_lease = match &r {
            Ok(res) => res.place == Placement::Shared,
            Err(Error::StoreUnavailable) => self.policy.on_error == OnError::Escrow,
            Err(_) => false,
        };
        if ask {
            if may_lease {
                self.clone().acquire_lease(key, require_record);
            } else {
                leases.lock().asked(&key, None);
            }
        }
        r
    }

    /// Reserves a lease in the background.
    fn acquire_lease(self: Arc<Self>, key: Key, require_record: bool) {
        tokio::spawn(async move {
            let Some(leases) = &self.leases else { return };
            let size = leases.lock().size(&key);
            tracing::debug!(consumer = %key.0, size, "asking for a lease");
            let mut granted = None;
            if size > 0 {
                let id = tollgate_quota::new_reservation_id();
                let req = ReserveRequest {
                    consumer: &key.0,
                    model: &key.1,
                    tokens: size,
                    defaults: &self.policy.defaults,
                    require_record,
                    id,
                    background: true,
                };
                match self.store.reserve(&req).await {
                    Ok(Decision::Admitted(a)) => {
                        leases.lock().admitted(&key.0, &a);
                        granted = Some(Lease {
                            id,
                            model: key.1.clone(),
                            left: size,
                            expires_ms: now_ms() + LEASE_MS,
                            admission: a,
                        });
                    }
                    Ok(d) => {
                        tracing::debug!(consumer = %key.0, size, decision = ?d, "lease refused");
                        // What the store said stands for this replica's next requests too.
                        self.remember(&key.0, &d);
                    }
                    Err(e) => {
                        tracing::debug!(consumer = %key.0, size, error = %e, "lease not granted");
                        self.abandon(&key.0, id);
                    }
                }
            }
            let old = leases.lock().asked(&key, granted);
            if let Some(old) = old
                && let Err(kept) = self.return_leases(vec![(key.0, old)]).await
            {
                leases.lock().put_back(kept);
            }
        });
    }

    /// Returns what expired leases (all of them with `all`) did not use. Leases the store does
    /// not take back are kept: under escrow they are what this replica may still spend.
    pub async fn sweep_leases(&self, all: bool) {
        let Some(leases) = &self.leases else { return };
        let expired = leases.lock().expired(now_ms(), all);
        if let Err(kept) = self.return_leases(expired).await
            && !all
        {
            leases.lock().put_back(kept);
        }
    }

    /// Gives the unused part of leases back to the store (one settle batch, retried with its
    /// id); on failure hands the leases back.
    async fn return_leases(
        &self,
        leases: Vec<(String, Lease)>,
    ) -> Result<(), Vec<(String, Lease)>> {
        if leases.is_empty() {
            return Ok(());
        }
        // Spent leases settle too: the store forgets their records.
        let batch: Vec<Settlement> = leases
            .iter()
            .map(|(consumer, l)| Settlement {
                consumer: consumer.clone(),
                end: ReservationEnd::Settled {
                    id: l.id,
                    retried: false,
                },
                reserved: l.left,
                actual: 0,
                window: l.admission.window,
                tpm: l.admission.tpm,
                usage: None,
            })
            .collect();
        let id = tollgate_quota::new_batch_id();
        for _ in 0..3 {
            if self.store.settle(id, &batch).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Unreturned lease tokens only make the consumer wait longer; nothing is over-admitted.
        tracing::debug!(
            leases = batch.len(),
            "could not return unused lease tokens yet"
        );
        Err(leases)
    }

    /// One reserve with the hot deadline, sent once more (same id) when it is not answered
    /// within half of it; the first answer wins. Returns the decision and whether it was sent
    /// twice.
    async fn hedged(
        &self,
        req: &ReserveRequest<'_>,
    ) -> Result<(Decision, bool), tollgate_quota::Error> {
        let first = self.store.reserve(req);
        tokio::pin!(first);
        let first_err = tokio::select! {
            r = &mut first => match r {
                Ok(d) => return Ok((d, false)),
                Err(e) => Some(e),
            },
            _ = tokio::time::sleep(self.policy.timeout / 2) => None,
        };
        let second = self.store.reserve(req);
        tokio::pin!(second);
        if first_err.is_some() {
            return second.await.map(|d| (d, true));
        }
        tokio::select! {
            r = &mut first => match r {
                Ok(d) => Ok((d, true)),
                Err(_) => second.await.map(|d| (d, true)),
            },
            r = &mut second => match r {
                Ok(d) => Ok((d, true)),
                Err(_) => first.await.map(|d| (d, true)),
            },
        }
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
            defaults: &self.policy.defaults,
            require_record,
            id: tollgate_quota::new_reservation_id(),
            background: false,
        };
        let mut shared = None;
        if self.try_shared() {
            match self.hedged(&req).await {
                Ok((d, retried)) => {
                    self.mark(false, "reserve", None);
                    shared = Some((d, retried));
                }
                Err(e) => {
                    self.mark(true, "reserve", Some(&e));
                    // It may still run when the store wakes: have it refunded.
                    self.abandon(consumer, req.id);
                }
            }
        }
        let Some((decision, retried)) = shared else {
            return self.degraded_reserve(&req).await;
        };
        if decision == Decision::UnknownConsumer && self.seeds.record(consumer).is_some() {
            // A configured consumer the store lost (it restarted empty): seed it, ask again.
            let again = ReserveRequest {
                id: tollgate_quota::new_reservation_id(),
                ..req.clone()
            };
            match self.seeds.restore_consumer(&self.store, consumer).await {
                Ok(_) => match self.hedged(&again).await {
                    Ok((d, r)) => return self.decided(d, r, &again, tokens),
                    Err(e) => {
                        self.mark(true, "reserve", Some(&e));
                        self.abandon(consumer, again.id);
                        return self.degraded_reserve(&again).await;
                    }
                },
                Err(e) => {
                    self.mark(true, "seeding", Some(&e));
                    return Err(Error::StoreUnavailable);
                }
            }
        }
        self.decided(decision, retried, &req, tokens)
    }

    /// The outcome of a reservation the store decided.
    fn decided(
        &self,
        decision: Decision,
        retried: bool,
        req: &ReserveRequest<'_>,
        tokens: u64,
    ) -> Result<Reserved, Error> {
        let (consumer, model) = (req.consumer, req.model);
        match decision {
            Decision::Admitted(admission) => {
                self.learn(consumer, &admission);
                self.refusals.admitted(consumer);
                Ok(Reserved {
                    admission,
                    tokens,
                    place: Placement::Shared,
                    end: ReservationEnd::Settled {
                        id: req.id,
                        retried,
                    },
                })
            }
            other => {
                self.remember(consumer, &other);
                refusal(other, model)
            }
        }
    }

    /// Remembers a refusal that will stand for a moment (a spent quota, a disabled consumer).
    fn remember(&self, consumer: &str, d: &Decision) {
        let now = now_ms();
        match d {
            Decision::QuotaExceeded {
                retry_after_ms,
                remaining_quota,
            } => self
                .refusals
                .quota(consumer, *remaining_quota, *retry_after_ms, now),
            Decision::Disabled => self.refusals.disabled(consumer, now),
            _ => {}
        }
    }

    /// A reservation while the store is unreachable, as `store.on_error` says.
    async fn degraded_reserve(&self, req: &ReserveRequest<'_>) -> Result<Reserved, Error> {
        let (decision, place) = match self.policy.on_error {
            OnError::Escrow | OnError::FailClosed => return Err(Error::StoreUnavailable),
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
                    tokens: req.tokens,
                    place: Placement::Nowhere,
                    end: ReservationEnd::None,
                });
            }
            OnError::Local => {
                let n = self.replicas().max(1) as u64;
                let d = &self.policy.defaults;
                let defaults = LimitDefaults {
                    tpm: d.tpm.map(|v| v.div_ceil(n)),
                    quota: d.quota.map(|v| v.div_ceil(n)),
                    quota_period: d.quota_period,
                };
                let local_req = ReserveRequest {
                    defaults: &defaults,
                    ..req.clone()
                };
                let d = self
                    .local
                    .reserve(&local_req)
                    .await
                    .map_err(|_| Error::StoreUnavailable)?;
                (d, Placement::Local)
            }
        };
        match decision {
            Decision::Admitted(admission) => Ok(Reserved {
                admission,
                tokens: req.tokens,
                place,
                end: ReservationEnd::None,
            }),
            other => refusal(other, req.model),
        }
    }
}

/// The error for a store's refusal.
fn refusal(d: Decision, model: &str) -> Result<Reserved, Error> {
    Err(match d {
        Decision::RateLimited { retry_after_ms, .. } => Error::RateLimited { retry_after_ms },
        Decision::QuotaExceeded { retry_after_ms, .. } => Error::QuotaExceeded { retry_after_ms },
        Decision::ModelNotAllowed => Error::ModelNotAllowed(model.to_string()),
        Decision::Disabled => Error::ConsumerDisabled,
        Decision::UnknownConsumer => Error::Unauthenticated,
        // Our own id was abandoned before the store saw it: as if the store had not answered.
        Decision::Cancelled => Error::StoreUnavailable,
        Decision::Admitted(_) => Error::Internal("an admission treated as a refusal".into()),
    })
}

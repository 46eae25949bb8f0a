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
//!
//! - [`reserve`]: the reservation (lease, hedged store call, failure policy).
//! - [`lease`]: busy consumers' leased slices.
//! - [`health`]: whether the store answers, and since when.
//! - [`local`]: the `local` policy's per-replica shares.
//! - [`refusals`]: refusals remembered for a moment, checked before tokenizing.
//! - [`seed`]: configured consumers kept in the store.
//! - [`team`]: the team step (a team's budget, in the team's own slot) and compensation.

mod health;
mod lease;
mod local;
mod refusals;
mod reserve;
mod seed;
mod team;
mod team_lease;

pub use team::TeamReserved;

pub use lease::LEASE_MS;

use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use health::{Change, Health};
use lease::Leases;
use parking_lot::Mutex;
use refusals::Refusals;
use seed::Seeds;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tollgate_common::config::OnError;
use tollgate_quota::{
    Admission, AnyStore, ConsumerRecord, LimitDefaults, MemoryStore, ReservationEnd, Settlement,
    Store,
};

/// What a request asks the limits for: its consumer, model, estimated tokens and cost.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    pub consumer: &'a str,
    pub model: &'a str,
    pub tokens: u64,
    /// The estimate's cost at the highest prices among the model's backends (nano-units).
    pub cost_nano: u64,
    /// The consumer must have a record in the store (keys and consumers configured so).
    pub require_record: bool,
}

/// A reservation made for one request, to be settled once.
#[derive(Clone, Debug)]
pub struct Reserved {
    pub admission: Admission,
    pub tokens: u64,
    /// The estimate's cost (nano-units) debited from the consumer's budget (0 without one).
    pub cost_nano: u64,
    /// The team step, when the consumer's team has a budget.
    pub team: Option<TeamReserved>,
    /// The team step was skipped (the store did not answer it in time): this team's budget,
    /// if it has one, is charged the actual cost at settle.
    pub charge_team: Option<String>,
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

/// The store settings the limits need.
#[derive(Clone, Debug)]
pub struct Policy {
    pub on_error: OnError,
    pub defaults: LimitDefaults,
    /// `store.timeout_ms`: a reserve unanswered for half of it is sent once more.
    pub timeout: Duration,
    /// `store.max_degraded_ms`: past it a degraded replica logs at error level once a minute.
    pub max_degraded_ms: u64,
    /// `pricing.currency`, for the messages of spent budgets.
    pub currency: Arc<str>,
}

pub struct Limits {
    pub store: AnyStore,
    clock: Arc<dyn Clock>,
    /// This replica's own store, used while the shared store is unreachable (`on_error = local`).
    pub local: MemoryStore,
    pub policy: Policy,
    health: Health,
    /// Live replicas as last counted; the local fallback enforces 1/N of each limit.
    replicas: AtomicU32,
    learned: Mutex<HashMap<String, local::Learned>>,
    /// Consumers and keys from the configuration, and whether the store holds them.
    pub seeds: Seeds,
    /// When the local fallback's counters were last started afresh (unix ms).
    local_reset_ms: AtomicU64,
    /// Leases of busy consumers' tokens (`None`: leasing is off, e.g. the memory store).
    leases: Option<Mutex<Leases>>,
    /// Slices of busy teams' budgets (on and off with `leases`).
    team_leases: Option<Mutex<team_lease::TeamLeases>>,
    refusals: Refusals,
    /// Reservations given up on (no answer from the store), for the usage worker to refund.
    abandoned: Mutex<Vec<Settlement>>,
    /// Which teams have a budget, as last seen (the team step is skipped for the others).
    teams: team::Teams,
}

impl Limits {
    pub fn new(
        store: AnyStore,
        policy: Policy,
        seeds: Vec<(ConsumerRecord, Vec<String>)>,
    ) -> Arc<Self> {
        Self::with_clock(store, policy, seeds, Arc::new(SystemClock))
    }

    /// [`new`](Self::new) with a clock (tests move time by hand).
    pub fn with_clock(
        store: AnyStore,
        policy: Policy,
        seeds: Vec<(ConsumerRecord, Vec<String>)>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(Limits {
            store,
            clock,
            local: MemoryStore::new(),
            policy,
            health: Health::default(),
            replicas: AtomicU32::new(1),
            learned: Mutex::new(HashMap::new()),
            seeds: Seeds::new(seeds),
            local_reset_ms: AtomicU64::new(0),
            leases: None,
            team_leases: None,
            refusals: Refusals::default(),
            abandoned: Mutex::new(Vec::new()),
            teams: team::Teams::default(),
        })
    }

    /// Turns leasing on (the Redis store: it saves busy consumers a round trip per request).
    pub fn with_leases(mut self: Arc<Self>) -> Arc<Self> {
        if let Some(me) = Arc::get_mut(&mut self) {
            me.leases = Some(Mutex::new(Leases::default()));
            me.team_leases = Some(Mutex::new(team_lease::TeamLeases::default()));
        }
        self
    }

    /// Whether the last store call failed and the fallback policy is in force.
    pub fn degraded(&self) -> bool {
        self.health.degraded()
    }

    /// How long the store has been unreachable (zero when it answers).
    pub fn degraded_for(&self) -> Duration {
        self.health.degraded_for(self.clock.now_ms())
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
        if self
            .health
            .log_long(self.clock.now_ms(), self.policy.max_degraded_ms)
        {
            tracing::error!(
                degraded_s = self.degraded_for().as_secs(),
                policy = ?self.policy.on_error,
                "the store has been unreachable for longer than store.max_degraded_ms"
            );
        }
    }

    /// Whether to try partition `part` of the shared store now (always, unless it failed
    /// moments ago).
    fn try_shared(&self, part: u16) -> bool {
        self.health.try_shared(part, self.clock.now_ms())
    }

    /// The partition (cluster slot) of a consumer's keys.
    fn consumer_part(&self, consumer: &str) -> u16 {
        self.store.consumer_partition(consumer)
    }

    fn mark(&self, part: u16, failed: bool, what: &str, err: Option<&tollgate_quota::Error>) {
        match self.health.mark(part, failed, self.clock.now_ms()) {
            Some(Change::Degraded) => {
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
            Some(Change::Recovered) => {
                tracing::info!("store reachable again; shared limits in force");
            }
            None => {}
        }
    }

    /// The consumer a key hash belongs to. A configured key the store no longer maps is told
    /// apart by the seed marker: revoked by an operator (`None`), or lost with the store's data
    /// (seeded again, and valid). While the store is unreachable, configured keys are known
    /// from the configuration and any other key cannot be checked: 503, never a 401 that
    /// clients would take as final.
    pub async fn lookup_key(&self, hex: &str) -> Result<Option<String>, Error> {
        let owner = self.seeds.owner(hex);
        let part = self.store.key_partition(hex);
        if self.try_shared(part) {
            match self.store.lookup_key(hex).await {
                Ok(Some(found)) => {
                    self.mark(part, false, "key lookup", None);
                    return Ok(Some(found));
                }
                Ok(None) => {
                    self.mark(part, false, "key lookup", None);
                    let Some(owner) = owner else {
                        return Ok(None);
                    };
                    return match self.seeds.restore_key(&self.store, owner, hex).await {
                        Ok(true) => Ok(Some(owner.to_string())),
                        Ok(false) => Ok(None),
                        Err(e) => {
                            self.mark(part, true, "key lookup", Some(&e));
                            Err(Error::StoreUnavailable)
                        }
                    };
                }
                Err(e) => self.mark(part, true, "key lookup", Some(&e)),
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
        self.refusals.check(consumer, at_least, self.clock.now_ms())
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
            money: Default::default(),
        });
    }
}

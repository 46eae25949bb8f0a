//! The in-memory store: the embedded default for one replica and the local fallback while Redis
//! is unreachable. Its semantics are the Redis scripts', line for line (see `quota/lua/`); the
//! conformance suite holds the two together.

use crate::model::*;
use crate::{Result, Store};
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

#[derive(Default, Clone)]
struct Circuit {
    open_until_ms: u64,
    trip: u64,
    probe_trip: Option<u64>,
    probe_at_ms: u64,
    failures: std::collections::VecDeque<u64>,
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
    usage: HashMap<UsageKey, UsageTotals>,
    /// Key hashes seeded from configuration, per consumer (`tg:seedkeys:{ID}`).
    seeded_keys: HashMap<String, std::collections::HashSet<String>>,
    seeded: bool,
    /// Reservation records by (consumer, id), as `tg:resv:{ID}:RID` in Redis.
    reservations: HashMap<(String, u64), Record>,
    /// When each record was last written, oldest first, so expired ones are dropped.
    record_expiry: std::collections::VecDeque<(u64, (String, u64))>,
}

/// A reservation the store remembers: what it debited, or a tombstone.
#[derive(Clone, Copy)]
enum Record {
    Live {
        tokens: u64,
        window: u64,
        tpm: Option<u64>,
        expires_us: u64,
    },
    Tombstone {
        expires_us: u64,
    },
}

impl Record {
    fn expires_us(&self) -> u64 {
        match self {
            Record::Live { expires_us, .. } | Record::Tombstone { expires_us } => *expires_us,
        }
    }
}

impl Inner {
    /// Drops records past their expiry (Redis's PX).
    fn expire_records(&mut self, now_us: u64) {
        while let Some((at, _)) = self.record_expiry.front()
            && *at <= now_us
        {
            let Some((_, key)) = self.record_expiry.pop_front() else {
                break;
            };
            if self
                .reservations
                .get(&key)
                .is_some_and(|r| r.expires_us() <= now_us)
            {
                self.reservations.remove(&key);
            }
        }
    }

    fn put_record(&mut self, key: (String, u64), record: Record) {
        self.record_expiry
            .push_back((record.expires_us(), key.clone()));
        self.reservations.insert(key, record);
    }

    /// The bucket and quota moved by `delta` (actual − reserved), as `settle.lua` does.
    fn correct(&mut self, consumer: &str, delta: i64, tpm: Option<u64>, window: u64, now_us: u64) {
        if delta == 0 {
            return;
        }
        if let Some(t) = tpm {
            let level = refill(self.buckets.get(consumer).copied(), t, now_us);
            let level = (level - delta as f64).min(t as f64);
            self.buckets.insert(
                consumer.to_string(),
                Bucket {
                    tokens: level,
                    ts_us: now_us,
                },
            );
        }
        if let Some(q) = self.quotas.get_mut(consumer)
            && (q.window == window || window == ANY_WINDOW)
        {
            q.used = (q.used + delta).max(0);
        }
    }
}

/// How long a reservation record or tombstone lives, in microseconds.
const RECORD_TTL_US: u64 = crate::RESERVATION_TTL_MS * 1000;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    ts_us: u64,
}

#[derive(Clone, Copy)]
struct QuotaUse {
    window: u64,
    used: i64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct UsageKey {
    day: u32,
    consumer: String,
    team: String,
    model: String,
    backend: String,
}

#[derive(Clone, Copy, Default)]
struct UsageTotals {
    input: u64,
    output: u64,
    cached_input: u64,
    requests: u64,
    cost_pico: u64,
}

/// A [`Store`] held in this process.
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
    }

    /// Takes the usage totals accumulated so far, leaving none (the fallback's hand-over).
    pub fn drain_usage(&self) -> Vec<UsageRow> {
        let mut g = self.inner.lock();
        g.usage.drain().map(|(k, v)| row(k, v)).collect()
    }
}

fn row(k: UsageKey, v: UsageTotals) -> UsageRow {
    UsageRow {
        day: k.day,
        consumer: k.consumer,
        team: k.team,
        model: k.model,
        backend: k.backend,
        input: v.input,
        output: v.output,
        cached_input: v.cached_input,
        requests: v.requests,
        cost_pico: v.cost_pico,
    }
}

/// Refilled bucket level at `now_us` (absent = full).
fn refill(b: Option<Bucket>, tpm: u64, now_us: u64) -> f64 {
    let cap = tpm as f64;
    match b {
        None => cap,
        Some(b) => {
            let elapsed = now_us.saturating_sub(b.ts_us) as f64;
            (b.tokens + elapsed * cap / 60_000_000.0).min(cap)
        }
    }
}

impl Store for MemoryStore {
    async fn lookup_key(&self, key_sha256: &str) -> Result<Option<String>> {
        Ok(self.inner.lock().keys.get(key_sha256).cloned())
    }

    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<Decision> {
        let now_us = self.clock.now_us();
        let now_s = now_us / 1_000_000;
        let mut g = self.inner.lock();
        let rec = g.consumers.get(req.consumer);
        if rec.is_none() && req.require_record {
            return Ok(Decision::UnknownConsumer);
        }
        let (team, tpm, quota, period) = match rec {
            Some(r) => {
                if r.disabled {
                    return Ok(Decision::Disabled);
                }
                if !r.models.is_empty() && !r.models.iter().any(|m| m == req.model) {
                    return Ok(Decision::ModelNotAllowed);
                }
                let period = if r.quota.is_some() {
                    r.quota_period
                } else {
                    req.defaults.quota_period
                };
                (
                    r.team.clone(),
                    r.tpm.or(req.defaults.tpm),
                    r.quota.or(req.defaults.quota),
                    period,
                )
            }
            None => (
                String::new(),
                req.defaults.tpm,
                req.defaults.quota,
                req.defaults.quota_period,
            ),
        };
        let tokens = req.tokens as i64;
        let (window, window_end) = window_bounds(period, now_s);

        // A replay of a reservation already made (or abandoned): never debit twice.
        g.expire_records(now_us);
        match g.reservations.get(&(req.consumer.to_string(), req.id)) {
            Some(Record::Tombstone { .. }) => return Ok(Decision::Cancelled),
            Some(Record::Live { window: w, .. }) => {
                return Ok(Decision::Admitted(Admission {
                    team,
                    remaining_tpm: None,
                    remaining_quota: None,
                    window: *w,
                    tpm,
                    quota,
                    quota_period: period,
                }));
            }
            None => {}
        }

        // Quota first: a spent quota outlasts any per-minute wait.
        let mut used = 0;
        if quota.is_some() {
            used = match g.quotas.get(req.consumer) {
                Some(q) if q.window == window => q.used,
                _ => 0,
            };
        }
        if let Some(q) = quota
            && used + tokens > q as i64
        {
            return Ok(Decision::QuotaExceeded {
                retry_after_ms: (window_end - now_s).max(1) * 1000,
                remaining_quota: q as i64 - used,
            });
        }

        let mut level = 0.0;
        if let Some(t) = tpm {
            if t == 0 {
                // A zero limit refuses everything (an operator's off switch for traffic).
                return Ok(Decision::RateLimited {
                    retry_after_ms: 60_000,
                    remaining_tpm: 0,
                });
            }
            level = refill(g.buckets.get(req.consumer).copied(), t, now_us);
            // A request larger than the whole bucket passes when the bucket is full.
            let need = (req.tokens.min(t)) as f64;
            if level < need {
                let deficit = need - level;
                let retry_after_ms = if t == 0 {
                    60_000
                } else {
                    ((deficit * 60_000.0 / t as f64).ceil() as u64).max(1)
                };
                return Ok(Decision::RateLimited {
                    retry_after_ms,
                    remaining_tpm: level.floor() as i64,
                });
            }
        }

        // Admitted: debit both.
        let mut remaining_tpm = None;
        if tpm.is_some() {
            level -= req.tokens as f64;
            g.buckets.insert(
                req.consumer.to_string(),
                Bucket {
                    tokens: level,
                    ts_us: now_us,
                },
            );
            remaining_tpm = Some(level.floor() as i64);
        }
        let mut remaining_quota = None;
        if let Some(q) = quota {
            g.quotas.insert(
                req.consumer.to_string(),
                QuotaUse {
                    window,
                    used: used + tokens,
                },
            );
            remaining_quota = Some(q as i64 - used - tokens);
        }
        g.put_record(
            (req.consumer.to_string(), req.id),
            Record::Live {
                tokens: req.tokens,
                window,
                tpm,
                expires_us: now_us + RECORD_TTL_US,
            },
        );
        Ok(Decision::Admitted(Admission {
            team,
            remaining_tpm,
            remaining_quota,
            window,
            tpm,
            quota,
            quota_period: period,
        }))
    }

    async fn settle(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        let now_us = self.clock.now_us();
        let mut g = self.inner.lock();
        if !g.settled.insert(batch_id) {
            return Ok(());
        }
        g.settled_order.push_back(batch_id);
        if g.settled_order.len() > 100_000
            && let Some(old) = g.settled_order.pop_front()
        {
            g.settled.remove(&old);
        }
        g.expire_records(now_us);
        let tombstone = Record::Tombstone {
            expires_us: now_us + RECORD_TTL_US,
        };
        for s in batch {
            match s.end {
                ReservationEnd::Abandoned { id } => {
                    let key = (s.consumer.clone(), id);
                    if let Some(Record::Live {
                        tokens,
                        window,
                        tpm,
                        ..
                    }) = g.reservations.get(&key).copied()
                    {
                        g.correct(&s.consumer, -(tokens as i64), tpm, window, now_us);
                    }
                    g.put_record(key, tombstone);
                }
                ReservationEnd::None => {
                    let delta = s.actual as i64 - s.reserved as i64;
                    g.correct(&s.consumer, delta, s.tpm, s.window, now_us);
                }
                ReservationEnd::Settled { id, retried } => {
                    // Only a live record is corrected: settling it twice corrects it once.
                    let key = (s.consumer.clone(), id);
                    if let Some(Record::Live { .. }) = g.reservations.get(&key) {
                        let delta = s.actual as i64 - s.reserved as i64;
                        g.correct(&s.consumer, delta, s.tpm, s.window, now_us);
                    }
                    if retried {
                        g.put_record(key, tombstone);
                    } else {
                        g.reservations.remove(&key);
                    }
                }
            }
            if let Some(u) = &s.usage {
                let k = UsageKey {
                    day: u.day,
                    consumer: s.consumer.clone(),
                    team: u.team.clone(),
                    model: u.model.clone(),
                    backend: u.backend.clone(),
                };
                let t = g.usage.entry(k).or_default();
                t.input += u.input;
                t.output += u.output;
                t.cached_input += u.cached_input;
                t.requests += u.requests;
                t.cost_pico += u.cost_pico;
            }
        }
        Ok(())
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
            .map(|(k, v)| row(k.clone(), *v))
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

    async fn heartbeat(&self, _replica: &str, _ttl_ms: u64) -> Result<u32> {
        Ok(1)
    }

    async fn breaker_failure(&self, backend: &str, f: &BreakerFailure) -> Result<BreakerState> {
        let f = &f.bounded();
        let now = self.clock.now_us() / 1000;
        let mut g = self.inner.lock();
        let c = g.circuits.entry(backend.to_string()).or_default();
        let mut trip_for = f.trip_for_ms.or(f.probe.then_some(f.trip_ms));
        if trip_for.is_none() {
            c.failures.push_back(now);
            while c.failures.front().is_some_and(|t| *t + f.window_ms <= now) {
                c.failures.pop_front();
            }
            if c.failures.len() >= f.failures as usize {
                trip_for = Some(f.trip_ms);
            }
        }
        let mut changed = false;
        if let Some(ms) = trip_for {
            let until = now + ms;
            if until > c.open_until_ms {
                if c.open_until_ms <= now {
                    c.trip += 1;
                }
                c.open_until_ms = until;
                c.failures.clear();
                changed = true;
            }
        }
        let state = BreakerState {
            backend: backend.to_string(),
            open_until_ms: c.open_until_ms,
            trip: c.trip,
            now_ms: now,
        };
        drop(g);
        if changed {
            let _ = self.events.send(state.clone());
        }
        Ok(state)
    }

    async fn breaker_close(&self, backend: &str) -> Result<bool> {
        let now = self.clock.now_us() / 1000;
        let mut g = self.inner.lock();
        let Some(c) = g.circuits.get_mut(backend) else {
            return Ok(false);
        };
        if c.open_until_ms == 0 {
            return Ok(false);
        }
        c.open_until_ms = 0;
        c.probe_trip = None;
        c.failures.clear();
        let state = BreakerState {
            backend: backend.to_string(),
            open_until_ms: 0,
            trip: c.trip,
            now_ms: now,
        };
        drop(g);
        let _ = self.events.send(state);
        Ok(true)
    }

    async fn breaker_probe(&self, backend: &str, lease_ms: u64) -> Result<bool> {
        let now = self.clock.now_us() / 1000;
        let mut g = self.inner.lock();
        let Some(c) = g.circuits.get_mut(backend) else {
            return Ok(false);
        };
        if c.open_until_ms == 0 || c.open_until_ms > now {
            return Ok(false);
        }
        if c.probe_trip == Some(c.trip) && now.saturating_sub(c.probe_at_ms) < lease_ms.max(1) {
            return Ok(false);
        }
        c.probe_trip = Some(c.trip);
        c.probe_at_ms = now;
        Ok(true)
    }

    async fn breaker_states(&self, backends: &[String]) -> Result<Vec<BreakerState>> {
        let now = self.clock.now_us() / 1000;
        let g = self.inner.lock();
        Ok(backends
            .iter()
            .map(|b| {
                let c = g.circuits.get(b).cloned().unwrap_or_default();
                BreakerState {
                    backend: b.clone(),
                    open_until_ms: c.open_until_ms,
                    trip: c.trip,
                    now_ms: now,
                }
            })
            .collect())
    }

    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState> {
        self.events.subscribe()
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

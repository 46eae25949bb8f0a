//! Everything tollgate keeps in the shared store: consumers and their keys, per-minute token
//! buckets, period quotas, and daily usage totals.
//!
//! [`Store`] has two implementations with identical semantics, proven by one conformance suite
//! (`tests/conformance.rs`) run against both:
//! - [`RedisStore`]: the cluster store. Every operation on the request path is one Lua script
//!   (`quota/lua/*.lua`) run with EVALSHA, so N replicas enforce limits as one process would.
//! - [`MemoryStore`]: the embedded default for a single replica, and the per-replica fallback
//!   when Redis is unreachable.
//!
//! The answer cache ([`cache`]) keeps its own entries the same two ways: in Redis (exact entries
//! and a RediSearch vector index) and in memory.
//!
//! Time always comes from the store (Redis `TIME`, or the memory store's [`Clock`]), never from
//! the calling replica.

#![forbid(unsafe_code)]

mod budget;
pub mod cache;
mod memory;
mod model;
pub(crate) mod redis;
mod store;
mod tools;

pub use budget::*;
pub use memory::{Clock, MemoryStore, SystemClock};
pub use model::*;
pub use redis::{BREAKER_CHANNEL, Credentials, RedisOpts, RedisStore, Topology};
pub use store::{AnyStore, REDIS_URL_ENV, REDIS_URLS_ENV, connect};
pub use tools::*;

use std::future::Future;

/// Why a store operation failed. Every variant is the store's fault, never the client's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store unreachable: {0}")]
    Unavailable(String),
    #[error("store timed out")]
    Timeout,
    #[error("store answered something unexpected: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A fresh id for a settle batch (random, so replicas never collide).
pub fn new_batch_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// A fresh reservation id (random and never 0, so replicas never collide).
pub fn new_reservation_id() -> u64 {
    new_batch_id().max(1)
}

/// How long the store remembers a reservation that was never settled (its replica died), and a
/// tombstone of an abandoned or retried one.
pub const RESERVATION_TTL_MS: u64 = 3_600_000;

/// The shared store. All methods are safe to call concurrently from many replicas.
pub trait Store: Send + Sync + 'static {
    /// The consumer a key hash (lowercase SHA-256 hex) belongs to.
    fn lookup_key(&self, key_sha256: &str) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Reads the consumer's current limits, refills its bucket, checks the model and the
    /// period quota, and debits `tokens` from both bucket and quota — all or nothing, atomically.
    /// Idempotent per [`ReserveRequest::id`]: a second reserve with the same id debits nothing
    /// (it answers `Admitted` while the first is unsettled, `Cancelled` once it was abandoned).
    fn reserve(&self, req: &ReserveRequest<'_>) -> impl Future<Output = Result<Decision>> + Send;

    /// Corrects earlier reservations by (actual − reserved) and adds usage totals. Batched:
    /// one call may carry many settlements. A batch is applied at most once per `batch_id`
    /// (see [`new_batch_id`]): a caller that lost the reply retries the same batch safely.
    fn settle(
        &self,
        batch_id: u64,
        batch: &[Settlement],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Writes a consumer from configuration only if the store has none by that id, and each
    /// key hash only if it is not already mapped; then records the key hashes as seeded (see
    /// [`key_was_seeded`](Store::key_was_seeded)). Returns whether the consumer was written.
    fn seed_consumer(
        &self,
        consumer: &ConsumerRecord,
        key_hashes: &[String],
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Whether `key_sha256` was seeded for `consumer` from configuration (the seed marker,
    /// `tg:seedkeys:{ID}`). A configured key that the store no longer maps was then revoked by
    /// an operator (`DEL tg:key:<hash>`); without the marker the store lost it (a restart
    /// without persistence) and it is seeded again.
    fn key_was_seeded(
        &self,
        consumer: &str,
        key_sha256: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Marks that every configured consumer was seeded (`tg:seeded`).
    fn mark_seeded(&self) -> impl Future<Output = Result<()>> + Send;

    /// Whether the mark of [`mark_seeded`](Store::mark_seeded) is still there: false once the
    /// store lost its data, so that replicas seed it again without waiting for a failure.
    fn is_seeded(&self) -> impl Future<Output = Result<bool>> + Send;

    /// Writes a consumer record, replacing any stored one (the admin path; operators may also
    /// use `HSET` directly).
    fn put_consumer(&self, consumer: &ConsumerRecord) -> impl Future<Output = Result<()>> + Send;

    /// Maps a key hash to a consumer (overwrites).
    fn put_key(&self, key_sha256: &str, consumer: &str) -> impl Future<Output = Result<()>> + Send;

    /// The consumer's stored record, if any.
    fn get_consumer(&self, id: &str)
    -> impl Future<Output = Result<Option<ConsumerRecord>>> + Send;

    /// Daily usage totals for `since..=until` (days as `YYYYMMDD`).
    fn usage(&self, since: u32, until: u32) -> impl Future<Output = Result<Vec<UsageRow>>> + Send;

    /// Per-dimension usage rows for `since..=until` (see [`DimUsage`]).
    fn dimension_usage(
        &self,
        since: u32,
        until: u32,
    ) -> impl Future<Output = Result<Vec<DimRow>>> + Send;

    /// Registers `replica` as alive for `ttl_ms` and returns how many replicas are alive
    /// (at least 1). Replicas use the count to share a limit while the store is unreachable.
    fn heartbeat(&self, replica: &str, ttl_ms: u64) -> impl Future<Output = Result<u32>> + Send;

    /// Counts a failure of a backend in its rolling window and trips its circuit when the
    /// window holds `failures` of them — or at once for `trip_for_ms` (a `retry-after`), or at
    /// once when the failure is a probe's. Returns the circuit as it now is.
    fn breaker_failure(
        &self,
        backend: &str,
        failure: &BreakerFailure,
    ) -> impl Future<Output = Result<BreakerState>> + Send;

    /// Closes a backend's half-open circuit (a probe, or a request after the trip, succeeded).
    /// A circuit still open stays open: a success of a request sent before the trip does not
    /// cut it short. Returns whether anything changed.
    fn breaker_close(&self, backend: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Asks to probe a backend whose trip has ended. True for exactly one caller per trip
    /// cluster-wide (another caller gets a second chance only if the probe is not resolved
    /// within `lease_ms`, e.g. its replica died).
    fn breaker_probe(
        &self,
        backend: &str,
        lease_ms: u64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The circuits of these backends as stored now.
    fn breaker_states(
        &self,
        backends: &[String],
    ) -> impl Future<Output = Result<Vec<BreakerState>>> + Send;

    /// Circuit changes made by any replica, as they happen (Redis pub/sub; in-process for the
    /// memory store). Lost messages are healed by periodic [`Store::breaker_states`] reads.
    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState>;

    /// The team step of a reservation, in the team's own slot: reads the team's budget and
    /// debits `cost_nano` from it, atomically; [`TeamDecision::NoBudget`] when it has none.
    /// Idempotent per [`TeamReserve::id`] like [`reserve`](Store::reserve); settled and
    /// abandoned through [`Money::team`] in a settle batch.
    fn reserve_team(
        &self,
        req: &TeamReserve<'_>,
    ) -> impl Future<Output = Result<TeamDecision>> + Send;

    /// Writes a team from configuration only if the store has none by that id (the store
    /// wins afterwards, like consumers). Returns whether it was written.
    fn seed_team(&self, team: &TeamRecord) -> impl Future<Output = Result<bool>> + Send;

    /// Writes a team record, replacing any stored one.
    fn put_team(&self, team: &TeamRecord) -> impl Future<Output = Result<()>> + Send;

    /// The team's stored record, if any.
    fn get_team(&self, id: &str) -> impl Future<Output = Result<Option<TeamRecord>>> + Send;

    /// What a consumer's or team's budget counter holds: (window start, spent nano-units), or
    /// `None` when nothing was counted yet.
    fn spend(
        &self,
        scope: BudgetScope,
        id: &str,
    ) -> impl Future<Output = Result<Option<(u64, i64)>>> + Send;

    /// Claims the alert `name` (`tg:alert:<name>`) for `ttl_ms`: true for exactly one caller
    /// cluster-wide until it expires or is released, so an alert fires once per threshold and
    /// window however many replicas see it.
    fn claim_alert(&self, name: &str, ttl_ms: u64) -> impl Future<Output = Result<bool>> + Send;

    /// Releases a claim (an alert that could not be delivered may fire again).
    fn release_alert(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Admits or refuses one MCP tool call against the consumer's rolling-minute limit and
    /// period quota ([`ToolCallRequest`]), counting it in both when admitted — atomically.
    fn tool_call(
        &self,
        req: &ToolCallRequest<'_>,
    ) -> impl Future<Output = Result<ToolDecision>> + Send;

    /// Adds tool calls to the daily totals (`tg:toolusage:{ID}:YYYYMMDD`), off the request
    /// path. Not idempotent: a caller that lost the reply does not retry.
    fn add_tool_usage(&self, rows: &[ToolUsage]) -> impl Future<Output = Result<()>> + Send;

    /// Daily tool-call totals for `since..=until` (days as `YYYYMMDD`), one row per day,
    /// consumer, team, server and tool.
    fn tool_usage(
        &self,
        since: u32,
        until: u32,
    ) -> impl Future<Output = Result<Vec<ToolUsage>>> + Send;

    /// A cheap round trip to tell whether the store is reachable.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// The part of the store that holds a consumer's keys: its Redis Cluster slot, or 0 when
    /// one server holds everything. A replica tracks reachability per part, so a master that
    /// died puts only its own consumers under `on_error`.
    fn consumer_partition(&self, _consumer: &str) -> u16 {
        0
    }

    /// The part of the store that holds a key mapping (`tg:key:<hash>`), as above.
    fn key_partition(&self, _key_sha256: &str) -> u16 {
        0
    }
}

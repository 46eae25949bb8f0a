//! Who may be served from the cache: a hit skips the reservation, which is where a consumer's
//! record (disabled, allowed models) is otherwise checked. So the cache keeps, per replica, the
//! record of each caller it served, and reads it again from the store once it is older than
//! [`MAX_AGE_MS`]: an operator's `disabled 1` or a narrowed `models` list applies to hits
//! within that time too.

use crate::limits::Limits;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_quota::ConsumerRecord;

/// The oldest record a hit may be served on.
pub const MAX_AGE_MS: u64 = 250;

/// Records kept at most (a bound against many one-off JWT callers); the map is cleared past it.
const MAX_CALLERS: usize = 100_000;

/// When a record was read (ms) and what it was (`None`: the store has none).
type Seen = (u64, Option<ConsumerRecord>);

#[derive(Default)]
pub struct Callers {
    seen: Mutex<HashMap<Arc<str>, Seen>>,
}

impl Callers {
    /// The caller's record, at most [`MAX_AGE_MS`] old (`None`: the store has none).
    pub async fn record(
        &self,
        limits: &Limits,
        consumer: &Arc<str>,
        now_ms: u64,
    ) -> Option<ConsumerRecord> {
        if let Some((at, rec)) = self.seen.lock().get(consumer)
            && now_ms.saturating_sub(*at) <= MAX_AGE_MS
        {
            return rec.clone();
        }
        let rec = limits.get_consumer(consumer).await;
        let mut seen = self.seen.lock();
        if seen.len() >= MAX_CALLERS {
            seen.clear();
        }
        seen.insert(consumer.clone(), (now_ms, rec.clone()));
        rec
    }
}

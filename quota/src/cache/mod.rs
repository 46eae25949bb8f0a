//! The answer cache's storage: exact entries by key, and (semantic caches) the prompt vectors
//! of those entries searched for the nearest one inside a partition. Two implementations with
//! the same semantics, held together by `tests/tests/cache_conformance.rs`:
//!
//! - [`RedisCache`]: entries as hashes `tg:cache:{CACHE:PART}:e:KEY` with a TTL, a
//!   per-partition order (`…:order`) for `max_entries`, a per-cache order (`tg:cache:{CACHE}:all`)
//!   for `max_total_entries`, and a RediSearch HNSW cosine index over the vectors with a TAG
//!   field for the partition (`tg:cacheidx:CACHE:DIM`). The exact layer works on any
//!   Redis/Valkey; the vector layer needs the search module.
//! - [`MemoryCache`]: the in-process twin (brute-force cosine), for the memory store.
//!
//! A partition id is a hash of the request's `vary_by` values ([`partition_id`]), so a cache
//! never mixes what its configuration keeps apart, and ids are safe in keys and TAG queries.

mod memory;
mod redis;
mod reply;
mod writer;

pub use memory::MemoryCache;
pub use redis::RedisCache;

use crate::Result;
use sha2::{Digest, Sha256};

/// One answer to keep.
#[derive(Clone, Debug, Default)]
pub struct NewEntry<'a> {
    pub cache: &'a str,
    pub partition: &'a str,
    /// The exact key (hex).
    pub key: &'a str,
    /// The stored answer (opaque bytes to the store).
    pub answer: &'a [u8],
    /// The prompt's embedding and text (semantic caches); `None` keeps the entry exact-only.
    pub vector: Option<&'a [f32]>,
    pub prompt: &'a str,
    pub ttl_ms: u64,
    pub max_entries: u64,
    pub max_total_entries: u64,
}

/// The nearest stored prompt in a partition.
#[derive(Clone, Debug, PartialEq)]
pub struct Nearest {
    pub key: String,
    /// Cosine distance, 1 − cosine similarity: 0 for the same direction.
    pub distance: f64,
    pub prompt: String,
    pub answer: Vec<u8>,
}

/// What a cache holds now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheStats {
    /// Live entries in every partition.
    pub entries: u64,
    /// Vectors in the search index and its memory, when there is one.
    pub indexed: Option<u64>,
    pub index_bytes: Option<u64>,
}

/// The partition id of a request: a hash of its `vary_by` values (`label=value` pairs, in the
/// configuration's order). The same function serves `tollgate cache purge --partition`.
pub fn partition_id<'a>(values: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = Sha256::new();
    for (k, v) in values {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

/// The cosine distance of two vectors (1 − cos); 1 when either is zero or their sizes differ.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return 1.0;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 1.0;
    }
    1.0 - dot / (na.sqrt() * nb.sqrt())
}

/// The cache store the configuration asks for.
#[derive(Clone)]
pub enum AnyCache {
    Memory(MemoryCache),
    Redis(RedisCache),
}

impl AnyCache {
    /// The stored answer under `key`, if it lives.
    pub async fn get(&self, cache: &str, partition: &str, key: &str) -> Result<Option<Vec<u8>>> {
        match self {
            AnyCache::Memory(m) => Ok(m.get(cache, partition, key)),
            AnyCache::Redis(r) => r.get(cache, partition, key).await,
        }
    }

    /// The `k` nearest live entries with a vector in the partition, nearest first.
    pub async fn nearest(
        &self,
        cache: &str,
        partition: &str,
        vector: &[f32],
        k: usize,
    ) -> Result<Vec<Nearest>> {
        match self {
            AnyCache::Memory(m) => Ok(m.nearest(cache, partition, vector, k)),
            AnyCache::Redis(r) => r.nearest(cache, partition, vector, k).await,
        }
    }

    /// Stores an entry (replacing one under the same key), then evicts the oldest beyond
    /// `max_entries` in its partition and `max_total_entries` in the cache.
    pub async fn put(&self, e: &NewEntry<'_>) -> Result<()> {
        match self {
            AnyCache::Memory(m) => {
                m.put(e);
                Ok(())
            }
            AnyCache::Redis(r) => r.put(e).await,
        }
    }

    /// Removes every entry of the cache, or of one partition. Returns how many.
    pub async fn purge(&self, cache: &str, partition: Option<&str>) -> Result<u64> {
        match self {
            AnyCache::Memory(m) => Ok(m.purge(cache, partition)),
            AnyCache::Redis(r) => r.purge(cache, partition).await,
        }
    }

    pub async fn stats(&self, cache: &str) -> Result<CacheStats> {
        match self {
            AnyCache::Memory(m) => Ok(m.stats(cache)),
            AnyCache::Redis(r) => r.stats(cache).await,
        }
    }

    /// Whether the store can search vectors (always, in memory; Redis needs the search module).
    pub async fn has_vector_search(&self) -> Result<bool> {
        match self {
            AnyCache::Memory(_) => Ok(true),
            AnyCache::Redis(r) => r.has_vector_search().await,
        }
    }
}

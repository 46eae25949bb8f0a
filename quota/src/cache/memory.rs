//! The in-process answer cache: the twin of [`RedisCache`](super::RedisCache) for a gateway
//! on the memory store. Entries expire after their TTL, each partition keeps its newest
//! `max_entries` and each cache its newest `max_total_entries`, and the nearest neighbour is
//! found by brute-force cosine distance over the partition's live vectors. One short mutex,
//! never held across an await.

use super::{CacheStats, Nearest, NewEntry, cosine_distance};
use crate::{Clock, SystemClock};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

struct Entry {
    answer: Vec<u8>,
    vector: Option<Vec<f32>>,
    prompt: String,
    expires_us: u64,
    /// Its place in the orders: expiry (µs), then a sequence number. With one TTL per cache
    /// that is also the order of insertion, as in Redis (scores are expiry times there too).
    order: (u64, u64),
}

#[derive(Default)]
struct Partition {
    entries: HashMap<String, Entry>,
    order: BTreeMap<(u64, u64), String>,
}

#[derive(Default)]
struct Cache {
    partitions: HashMap<String, Partition>,
    /// Every entry of the cache, soonest to expire first: (order) → (partition, key).
    all: BTreeMap<(u64, u64), (String, String)>,
}

impl Cache {
    fn remove(&mut self, partition: &str, key: &str) {
        if let Some(p) = self.partitions.get_mut(partition)
            && let Some(e) = p.entries.remove(key)
        {
            p.order.remove(&e.order);
            self.all.remove(&e.order);
            if p.entries.is_empty() {
                self.partitions.remove(partition);
            }
        }
    }

    /// Drops what has expired: the orders are by expiry, so from the front.
    fn expire(&mut self, now_us: u64) {
        while let Some(((at, _), (p, k))) = self.all.first_key_value() {
            if *at > now_us {
                break;
            }
            let (p, k) = (p.clone(), k.clone());
            self.remove(&p, &k);
        }
    }
}

/// The in-process answer cache.
#[derive(Clone)]
pub struct MemoryCache {
    clock: Arc<dyn Clock>,
    inner: Arc<Mutex<(HashMap<String, Cache>, u64)>>,
}

impl Default for MemoryCache {
    fn default() -> Self {
        MemoryCache::with_clock(Arc::new(SystemClock::default()))
    }
}

impl MemoryCache {
    pub fn new() -> MemoryCache {
        MemoryCache::default()
    }

    /// A cache whose time comes from `clock` (tests move it forward past TTLs).
    pub fn with_clock(clock: Arc<dyn Clock>) -> MemoryCache {
        MemoryCache {
            clock,
            inner: Arc::new(Mutex::new((HashMap::new(), 0))),
        }
    }

    pub fn get(&self, cache: &str, partition: &str, key: &str) -> Option<Vec<u8>> {
        let now = self.clock.now_us();
        let g = self.inner.lock();
        let e =
            g.0.get(cache)?
                .partitions
                .get(partition)?
                .entries
                .get(key)?;
        (e.expires_us > now).then(|| e.answer.clone())
    }

    pub fn nearest(&self, cache: &str, partition: &str, vector: &[f32], k: usize) -> Vec<Nearest> {
        let now = self.clock.now_us();
        let g = self.inner.lock();
        let Some(p) = g.0.get(cache).and_then(|c| c.partitions.get(partition)) else {
            return Vec::new();
        };
        let mut all: Vec<Nearest> = p
            .entries
            .iter()
            .filter(|(_, e)| e.expires_us > now)
            .filter_map(|(key, e)| {
                let v = e.vector.as_ref().filter(|v| v.len() == vector.len())?;
                Some(Nearest {
                    key: key.clone(),
                    distance: cosine_distance(vector, v),
                    prompt: e.prompt.clone(),
                    answer: e.answer.clone(),
                })
            })
            .collect();
        all.sort_by(|a, b| {
            a.distance
                .total_cmp(&b.distance)
                .then_with(|| a.key.cmp(&b.key))
        });
        all.truncate(k.max(1));
        all
    }

    pub fn put(&self, e: &NewEntry<'_>) {
        let now = self.clock.now_us();
        let mut g = self.inner.lock();
        g.1 += 1;
        let expires_us = now.saturating_add(e.ttl_ms.saturating_mul(1000));
        let order = (expires_us, g.1);
        let c = g.0.entry(e.cache.to_string()).or_default();
        c.expire(now);
        c.remove(e.partition, e.key);
        let p = c.partitions.entry(e.partition.to_string()).or_default();
        p.entries.insert(
            e.key.to_string(),
            Entry {
                answer: e.answer.to_vec(),
                vector: e.vector.map(<[f32]>::to_vec),
                prompt: e.prompt.to_string(),
                expires_us,
                order,
            },
        );
        p.order.insert(order, e.key.to_string());
        c.all
            .insert(order, (e.partition.to_string(), e.key.to_string()));
        while c
            .partitions
            .get(e.partition)
            .is_some_and(|p| p.entries.len() as u64 > e.max_entries)
        {
            let Some(oldest) = c.partitions[e.partition].order.values().next().cloned() else {
                break;
            };
            c.remove(e.partition, &oldest);
        }
        while c.all.len() as u64 > e.max_total_entries {
            let Some((p, k)) = c.all.values().next().cloned() else {
                break;
            };
            c.remove(&p, &k);
        }
    }

    pub fn purge(&self, cache: &str, partition: Option<&str>) -> u64 {
        let now = self.clock.now_us();
        let mut g = self.inner.lock();
        let Some(c) = g.0.get_mut(cache) else {
            return 0;
        };
        c.expire(now);
        let victims: Vec<(String, String)> = c
            .all
            .values()
            .filter(|(p, _)| partition.is_none_or(|want| want == p))
            .cloned()
            .collect();
        for (p, k) in &victims {
            c.remove(p, k);
        }
        victims.len() as u64
    }

    pub fn stats(&self, cache: &str) -> CacheStats {
        let now = self.clock.now_us();
        let mut g = self.inner.lock();
        let Some(c) = g.0.get_mut(cache) else {
            return CacheStats::default();
        };
        c.expire(now);
        let vectors: Vec<usize> = c
            .partitions
            .values()
            .flat_map(|p| p.entries.values())
            .filter_map(|e| e.vector.as_ref().map(Vec::len))
            .collect();
        CacheStats {
            entries: c.all.len() as u64,
            indexed: Some(vectors.len() as u64),
            index_bytes: Some(vectors.iter().map(|n| (*n * 4) as u64).sum()),
        }
    }
}

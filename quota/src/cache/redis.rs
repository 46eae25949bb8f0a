//! The answer cache in Redis: one Lua script stores entries and bounds their partitions and
//! the whole cache (`quota/lua/cache_put.lua`), off the request path, one call per batch of
//! the writer ([`super::writer`]). A lookup is one command: `HGET` of the exact entry, or
//! one `FT.SEARCH … KNN k` that returns the nearest entries' distances, prompts and answers.
//!
//! The vector index is created on first use, per vector size (`tg:cacheidx:CACHE:DIM`), over
//! the hashes under `tg:cache:{CACHE:` (`FT.CREATE … ON HASH PREFIX … SCHEMA part TAG v VECTOR
//! HNSW … DISTANCE_METRIC COSINE`); expired hashes leave it on their own.

use super::reply::{parse_info, parse_search};
use super::{CacheStats, Nearest, NewEntry};
use crate::redis::connection::{scrub, url_secrets};
use crate::{Error, Result};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script, ScriptInvocation, Value};
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const PUT_LUA: &str = include_str!("../../lua/cache_put.lua");

/// The hash of one entry.
pub fn entry_key(cache: &str, partition: &str, key: &str) -> String {
    ["tg:cache:{", cache, ":", partition, "}:e:", key].concat()
}

/// The partition's order of entries (by expiry).
pub fn order_key(cache: &str, partition: &str) -> String {
    ["tg:cache:{", cache, ":", partition, "}:order"].concat()
}

/// The cache's order of every entry (by expiry), members `PART:KEY`.
pub fn total_key(cache: &str) -> String {
    ["tg:cache:{", cache, "}:all"].concat()
}

/// The vector index of a cache, per vector size.
pub fn index_name(cache: &str, dim: usize) -> String {
    format!("tg:cacheidx:{cache}:{dim}")
}

/// The prefix of every entry hash of a cache (what its index covers).
pub fn entry_prefix(cache: &str) -> String {
    format!("tg:cache:{{{cache}:")
}

/// The answer cache on a Redis (or Valkey) server.
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    conn: ConnectionManager,
    /// The writer's queue, started with the first entry stored.
    writer: OnceLock<super::writer::Queue>,
    secrets: Vec<String>,
    put: Script,
    /// Indexes this process has created or seen (name).
    indexes: Mutex<HashSet<String>>,
    /// Deadline of store and admin commands (lookups carry the caller's own).
    timeout: Duration,
}

impl RedisCache {
    /// Connects lazily (the gateway starts while Redis is down); fails only on a bad URL.
    pub fn connect_lazy(url: &str, timeout: Duration) -> Result<RedisCache> {
        let secrets = url_secrets(url);
        let client = Client::open(url)
            .map_err(|e| Error::Unavailable(scrub(&secrets, format!("bad redis url: {e}"))))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| Error::Unavailable(scrub(&secrets, e.to_string())))?;
        Ok(RedisCache {
            inner: Arc::new(Inner {
                conn,
                writer: OnceLock::new(),
                secrets,
                put: Script::new(PUT_LUA),
                indexes: Mutex::new(HashSet::new()),
                timeout,
            }),
        })
    }

    pub(super) fn from_inner(inner: Arc<Inner>) -> RedisCache {
        RedisCache { inner }
    }

    /// The script that stores an entry.
    pub(super) fn script(&self) -> &Script {
        &self.inner.put
    }

    pub(super) fn error(&self, e: RedisError) -> Error {
        if e.is_timeout() {
            return Error::Timeout;
        }
        let msg = scrub(&self.inner.secrets, e.to_string());
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            Error::Unavailable(msg)
        } else {
            Error::Protocol(msg)
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.inner.conn.clone();
        match tokio::time::timeout(self.inner.timeout, cmd.query_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// `HGET` of the entry's answer: one round trip.
    pub async fn get(&self, cache: &str, partition: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(entry_key(cache, partition, key)).arg("a");
        self.run(&cmd).await
    }

    /// One `FT.SEARCH` for the `k` nearest inside the partition's TAG, nearest first. An
    /// index that does not exist yet (nothing stored with vectors of this size) has none.
    pub async fn nearest(
        &self,
        cache: &str,
        partition: &str,
        vector: &[f32],
        k: usize,
    ) -> Result<Vec<Nearest>> {
        let k = k.max(1);
        let mut cmd = redis::cmd("FT.SEARCH");
        cmd.arg(index_name(cache, vector.len()))
            // A wider HNSW search than the default (10) keeps the approximate neighbours close
            // to the exact ones the memory cache finds.
            .arg(format!(
                "(@part:{{{partition}}})=>[KNN {k} @v $q EF_RUNTIME {} AS d]",
                (k * 20).max(100)
            ))
            .arg("PARAMS")
            .arg(2)
            .arg("q")
            .arg(vector_bytes(vector))
            .arg("SORTBY")
            .arg("d")
            .arg("RETURN")
            .arg(3)
            .arg("d")
            .arg("p")
            .arg("a")
            .arg("LIMIT")
            .arg(0)
            .arg(k)
            .arg("DIALECT")
            .arg(2);
        let v: Value = match self.run(&cmd).await {
            Ok(v) => v,
            Err(Error::Protocol(m)) if is_missing_index(&m) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        parse_search(&v, &entry_prefix(cache))
    }

    /// Stores the entry and bounds its partition, then bounds the whole cache (through the
    /// writer: with whatever other entries are waiting, in one round trip).
    pub async fn put(&self, e: &NewEntry<'_>) -> Result<()> {
        let vector = e.vector.map(vector_bytes).unwrap_or_default();
        if let Some(v) = e.vector {
            self.ensure_index(e.cache, v.len()).await?;
        }
        let queue = self
            .inner
            .writer
            .get_or_init(|| super::writer::start(&self.inner));
        super::writer::put(queue, e, vector).await
    }

    /// One `cache_put.lua` call (loaded again first when the server lost it: a restart,
    /// `SCRIPT FLUSH`).
    pub(super) async fn invoke(&self, call: &ScriptInvocation<'_>) -> Result<Vec<String>> {
        let mut conn = self.inner.conn.clone();
        match tokio::time::timeout(self.inner.timeout, call.invoke_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Creates the cache's index for vectors of `dim` floats unless it exists.
    async fn ensure_index(&self, cache: &str, dim: usize) -> Result<()> {
        let name = index_name(cache, dim);
        if self.inner.indexes.lock().contains(&name) {
            return Ok(());
        }
        let mut cmd = redis::cmd("FT.CREATE");
        cmd.arg(&name)
            .arg("ON")
            .arg("HASH")
            .arg("PREFIX")
            .arg(1)
            .arg(entry_prefix(cache))
            .arg("SCHEMA")
            .arg("part")
            .arg("TAG")
            .arg("v")
            .arg("VECTOR")
            .arg("HNSW")
            .arg(6)
            .arg("TYPE")
            .arg("FLOAT32")
            .arg("DIM")
            .arg(dim)
            .arg("DISTANCE_METRIC")
            .arg("COSINE");
        match self.run::<Value>(&cmd).await {
            Ok(_) => {}
            Err(Error::Protocol(m)) if m.to_ascii_lowercase().contains("already exists") => {}
            Err(e) => return Err(e),
        }
        self.inner.indexes.lock().insert(name);
        Ok(())
    }

    /// Deletes every entry of the cache (or of one partition) with SCAN and UNLINK, and the
    /// orders that tracked them.
    pub async fn purge(&self, cache: &str, partition: Option<&str>) -> Result<u64> {
        let pattern = match partition {
            Some(p) => format!("tg:cache:{{{cache}:{p}}}:*"),
            None => format!("{}*", entry_prefix(cache)),
        };
        let mut cursor: u64 = 0;
        let mut entries = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = self.run(&scan).await?;
            entries += keys.iter().filter(|k| k.contains("}:e:")).count() as u64;
            if !keys.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                for k in &keys {
                    // One key per command: entries of different partitions live in different
                    // slots.
                    unlink.arg(k);
                    let _: i64 = self.run(&unlink).await?;
                    unlink = redis::cmd("UNLINK");
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        match partition {
            None => {
                let mut del = redis::cmd("UNLINK");
                del.arg(total_key(cache));
                let _: i64 = self.run(&del).await?;
            }
            Some(p) => {
                // Members of this partition leave the total; the rest stay.
                let members: Vec<String> = self
                    .run(redis::cmd("ZRANGE").arg(total_key(cache)).arg(0).arg(-1))
                    .await?;
                let prefix = format!("{p}:");
                for m in members.iter().filter(|m| m.starts_with(&prefix)) {
                    let _: i64 = self
                        .run(redis::cmd("ZREM").arg(total_key(cache)).arg(m))
                        .await?;
                }
            }
        }
        Ok(entries)
    }

    /// Live entries (the total order after dropping expired members) and the vector index's
    /// size from `FT.INFO` when the cache has one.
    pub async fn stats(&self, cache: &str) -> Result<CacheStats> {
        let now_us = {
            let (s, us): (u64, u64) = self.run(&redis::cmd("TIME")).await?;
            s * 1_000_000 + us
        };
        let entries: u64 = self
            .run(
                redis::cmd("ZCOUNT")
                    .arg(total_key(cache))
                    .arg(format!("({now_us}"))
                    .arg("+inf"),
            )
            .await?;
        let mut stats = CacheStats {
            entries,
            ..CacheStats::default()
        };
        let names: Vec<String> = match self.run(&redis::cmd("FT._LIST")).await {
            Ok(n) => n,
            Err(Error::Protocol(_)) => return Ok(stats),
            Err(e) => return Err(e),
        };
        let prefix = format!("tg:cacheidx:{cache}:");
        for name in names.iter().filter(|n| n.starts_with(&prefix)) {
            let info: Value = self.run(redis::cmd("FT.INFO").arg(name)).await?;
            let (docs, mb) = parse_info(&info);
            *stats.indexed.get_or_insert(0) += docs;
            *stats.index_bytes.get_or_insert(0) += (mb * 1_048_576.0) as u64;
        }
        Ok(stats)
    }

    /// Whether the server answers `FT._LIST` (the search module is loaded).
    pub async fn has_vector_search(&self) -> Result<bool> {
        match self.run::<Value>(&redis::cmd("FT._LIST")).await {
            Ok(_) => Ok(true),
            Err(Error::Protocol(m)) if m.to_ascii_lowercase().contains("unknown command") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn is_missing_index(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("no such index") || m.contains("unknown index") || m.contains("not found")
}

/// The little-endian `f32` bytes RediSearch expects of a FLOAT32 vector.
pub fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

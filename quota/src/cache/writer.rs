//! Storing answers in batches. Every [`RedisCache::put`] queues its entry for one writer task
//! per cache connection, which sends what has queued up together: one `cache_put.lua` call
//! stores the whole batch, entry by entry (the entry, its partition's bound and the cache's).
//! A busy gateway so stores N answers in one round trip and one script run instead of N: the
//! script reads the clock, drops expired members and counts each order once per batch.

use super::NewEntry;
use super::redis::{Inner, RedisCache, entry_key, order_key, total_key};
use crate::{Error, Result};
use redis::{Script, ScriptInvocation};
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot};

/// Most entries in one batch.
const BATCH: usize = 64;
/// Entries waiting for the writer before more are refused (the cache is best effort: a
/// refused entry is counted as a store failure, the request was served anyway).
const QUEUE: usize = 4096;

/// An entry the writer owns, with who waits for its result.
pub(super) struct Job {
    cache: String,
    partition: String,
    key: String,
    answer: Vec<u8>,
    vector: Vec<u8>,
    prompt: String,
    ttl_ms: u64,
    max_entries: u64,
    max_total_entries: u64,
    done: oneshot::Sender<Result<()>>,
}

/// The queue of one cache connection's writer.
pub(super) type Queue = mpsc::Sender<Job>;

/// Starts the writer of `inner`'s connection. It holds the connection weakly: it ends once
/// every handle of the cache is gone.
pub(super) fn start(inner: &Arc<Inner>) -> Queue {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(Arc::downgrade(inner), rx));
    tx
}

/// Queues `e` (its vector already as bytes) and waits for the writer's answer.
pub(super) async fn put(queue: &Queue, e: &NewEntry<'_>, vector: Vec<u8>) -> Result<()> {
    let (done, answer) = oneshot::channel();
    let job = Job {
        cache: e.cache.to_string(),
        partition: e.partition.to_string(),
        key: e.key.to_string(),
        answer: e.answer.to_vec(),
        vector,
        prompt: e.prompt.to_string(),
        ttl_ms: e.ttl_ms,
        max_entries: e.max_entries,
        max_total_entries: e.max_total_entries,
        done,
    };
    queue
        .try_send(job)
        .map_err(|_| Error::Unavailable("the cache's write queue is full".into()))?;
    answer
        .await
        .unwrap_or_else(|_| Err(Error::Unavailable("the cache's writer stopped".into())))
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let cache = RedisCache::from_inner(inner);
        let result = write(&cache, &jobs).await;
        for job in jobs.drain(..) {
            let _ = job.done.send(result.as_ref().map_err(same).copied());
        }
    }
}

/// Writes a batch: one script call for every entry, so one answer for all of them (the script
/// answers two values per entry).
async fn write(cache: &RedisCache, jobs: &[Job]) -> Result<()> {
    let call = call(cache.script(), jobs);
    let out = cache.invoke(&call).await?;
    if out.len() != 2 * jobs.len() {
        return Err(Error::Protocol(format!(
            "cache_put.lua answered {} values for {} entries",
            out.len(),
            jobs.len()
        )));
    }
    Ok(())
}

fn call<'a>(put: &'a Script, jobs: &[Job]) -> ScriptInvocation<'a> {
    let mut inv = put.prepare_invoke();
    for j in jobs {
        inv.key(entry_key(&j.cache, &j.partition, &j.key))
            .key(order_key(&j.cache, &j.partition))
            .key(total_key(&j.cache))
            .arg(j.ttl_ms)
            .arg(j.max_entries)
            .arg(&j.key)
            .arg(&j.answer)
            .arg(&j.prompt)
            .arg(&j.partition)
            .arg(&j.vector)
            .arg(&j.cache)
            .arg(j.max_total_entries);
    }
    inv
}

/// The same error again, for every entry of a batch that failed.
fn same(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Timeout => Error::Timeout,
        Error::Protocol(m) => Error::Protocol(m.clone()),
    }
}

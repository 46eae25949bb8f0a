//! Configured consumers and their keys, and keeping them in the store: seeded at start (only
//! where absent: once seeded, the store wins over the file), retried until it succeeds, and
//! seeded again whenever the store lost its data. A configured key is never refused because
//! the store lost it, while an operator's `DEL tg:key:<hash>` still revokes it: the seed marker
//! (`tg:seedkeys:{ID}`) tells the two apart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tollgate_quota::AnyStore;
use tollgate_quota::{ConsumerRecord, Store};

/// How often a seeded store is checked for lost data (`tg:seeded`).
const CHECK_EVERY: Duration = Duration::from_secs(2);

pub struct Seeds {
    consumers: Vec<(ConsumerRecord, Vec<String>)>,
    by_id: HashMap<String, usize>,
    /// Configured key hash → consumer id.
    owners: HashMap<String, String>,
    /// Every configured consumer is in the store.
    done: AtomicBool,
}

impl Seeds {
    pub fn new(consumers: Vec<(ConsumerRecord, Vec<String>)>) -> Seeds {
        let by_id = consumers
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (c.id.clone(), i))
            .collect();
        let owners = consumers
            .iter()
            .flat_map(|(c, keys)| keys.iter().map(|k| (k.clone(), c.id.clone())))
            .collect();
        Seeds {
            done: AtomicBool::new(consumers.is_empty()),
            consumers,
            by_id,
            owners,
        }
    }

    pub fn records(&self) -> impl Iterator<Item = &ConsumerRecord> {
        self.consumers.iter().map(|(c, _)| c)
    }

    pub fn record(&self, id: &str) -> Option<&ConsumerRecord> {
        self.by_id.get(id).map(|i| &self.consumers[*i].0)
    }

    /// The configured consumer a key hash belongs to.
    pub fn owner(&self, hex: &str) -> Option<&str> {
        self.owners.get(hex).map(String::as_str)
    }

    /// Whether every configured consumer is known to be in the store.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// A configured key the store does not map: `Ok(false)` when an operator revoked it (the
    /// marker names it), else the store lost it and its consumer is seeded again (`Ok(true)`).
    pub async fn restore_key(
        &self,
        store: &AnyStore,
        owner: &str,
        hex: &str,
    ) -> tollgate_quota::Result<bool> {
        if store.key_was_seeded(owner, hex).await? {
            return Ok(false);
        }
        if let Some(i) = self.by_id.get(owner) {
            let (rec, keys) = &self.consumers[*i];
            store.seed_consumer(rec, keys).await?;
            tracing::warn!(consumer = %owner, "a configured key was missing from the store; seeded again");
        }
        Ok(true)
    }

    /// Seeds one configured consumer again (its record vanished from the store). Returns
    /// whether it is a configured consumer.
    pub async fn restore_consumer(
        &self,
        store: &AnyStore,
        id: &str,
    ) -> tollgate_quota::Result<bool> {
        let Some(i) = self.by_id.get(id) else {
            return Ok(false);
        };
        let (rec, keys) = &self.consumers[*i];
        store.seed_consumer(rec, keys).await?;
        tracing::warn!(consumer = %id, "a configured consumer was missing from the store; seeded again");
        Ok(true)
    }

    /// Seeds every configured consumer (where absent) and marks the store seeded.
    pub async fn seed_all(&self, store: &impl Store) -> tollgate_quota::Result<()> {
        for (rec, keys) in &self.consumers {
            store.seed_consumer(rec, keys).await?;
        }
        store.mark_seeded().await?;
        self.done.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Keeps the store seeded, for as long as the gateway runs: retries a failed seeding with
    /// backoff, and seeds again when the store lost its data (a restart without persistence,
    /// noticed within [`CHECK_EVERY`] even if no request failed).
    pub async fn keep_seeded(&self, store: AnyStore) {
        if self.consumers.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.done() {
                tokio::time::sleep(CHECK_EVERY).await;
                if let Ok(false) = store.is_seeded().await {
                    tracing::warn!("the store lost the configured consumers; seeding again");
                    self.done.store(false, Ordering::Relaxed);
                }
                continue;
            }
            match self.seed_all(&store).await {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                    tracing::info!(
                        consumers = self.consumers.len(),
                        "configured consumers seeded"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "could not seed the configured consumers; retrying (their keys get 503 until it succeeds)");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

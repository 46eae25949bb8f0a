//! The answer cache (`[[cache]]`): repeated and similar prompts answered from answers the
//! whole cluster shares. It sits after authentication and before the reservation:
//!
//! ```text
//! auth ─► cache lookup ─► reserve ─► route ─► forward ─► settle ─► cache store
//!         (exact key, then the nearest prompt in           (complete answers only,
//!          the partition; a hit reserves nothing)           off the request path)
//! ```
//!
//! The first `[[cache]]` whose `models`, `consumers`/`teams` match applies. Its partition is
//! the request's `vary_by` values (and the operation), so what the configuration keeps apart
//! never meets. A hit is served only to a caller known, not disabled and allowed the model
//! by a record this replica read within 250 ms ([`callers`]). Every failure — the store, the
//! index or the embeddings backend slow, down or refusing — is a bypass within
//! `lookup_timeout_ms`, counted, and logged once a minute. See `docs/CACHE.md`.
//!
//! - [`key`]: what may be cached, the exact key, the text the semantic layer embeds.
//! - [`safety`]: a near prompt with other numbers or negations never hits.
//! - [`answer`]: the stored answer, assembled from streams, replayed as JSON or SSE
//!   ([`replay`]: the event streams).
//! - [`embed`]: the embeddings call.
//! - [`lookup`]: the lookup and the hit's response and usage record.
//! - [`store`]: keeping a miss's answer once its response completed.
//! - [`callers`]: the per-replica record of callers (≤ 250 ms old).
//! - [`stats`]: the cache's counters and gauges for `/metrics`.

mod answer;
mod callers;
mod embed;
mod key;
mod lookup;
mod plain;
mod replay;
mod safety;
mod stats;
mod store;

pub use answer::Stored;
pub use lookup::{Decision, Hit, Outcome};
pub use stats::CacheMetrics;
pub use store::{Pending, Recorder};

use crate::limits::{Placement, Reserved};
use crate::routing::Routes;
use crate::usage::Finished;
use anyhow::Context as _;
use callers::Callers;
use embed::Embedder;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tollgate_common::config::{CacheConfig, CacheMode, Config, StoreKind, VaryBy};
use tollgate_quota::cache::{AnyCache, MemoryCache, RedisCache};
use tollgate_quota::{Admission, ReservationEnd};

/// One `[[cache]]`, ready to serve.
pub struct Rule {
    pub config: CacheConfig,
    pub name: Arc<str>,
    /// The `vary_by` values to read, each with its label in the partition id.
    vary: Vec<(VaryBy, String)>,
    pub store: AnyCache,
    embedder: Option<Embedder>,
}

impl Rule {
    fn semantic(&self) -> bool {
        self.config.mode == CacheMode::Semantic
    }

    fn covers(&self, model: &str, consumer: &str, team: &str) -> bool {
        let c = &self.config;
        let model_ok = c.models.is_empty() || c.models.iter().any(|m| m == model);
        let who_ok = (c.consumers.is_empty() && c.teams.is_empty())
            || c.consumers.iter().any(|x| x == consumer)
            || c.teams.iter().any(|x| x == team);
        model_ok && who_ok
    }
}

/// What the cache shares with its background work.
pub struct Shared {
    pub client: reqwest::Client,
    pub usage_tx: mpsc::UnboundedSender<Finished>,
    pub metrics: CacheMetrics,
    quiet: Quiet,
}

/// Every configured cache.
pub struct Caches {
    rules: Vec<Arc<Rule>>,
    callers: Callers,
    shared: Arc<Shared>,
}

impl Caches {
    /// Builds each `[[cache]]` on its store: `store_url`, else the `[store]` Redis, else one
    /// in-process cache shared by every rule. Semantic mode on a Redis without the search module
    /// refuses to start, saying so.
    pub async fn build(
        config: &Config,
        routes: &Routes,
        client: reqwest::Client,
        usage_tx: mpsc::UnboundedSender<Finished>,
    ) -> anyhow::Result<Caches> {
        let memory = AnyCache::Memory(MemoryCache::new());
        let mut rules = Vec::new();
        for (i, c) in config.cache.iter().enumerate() {
            let timeout = Duration::from_millis(config.store.timeout_ms.max(1000));
            let store_url = match (&c.store_url, config.store.kind) {
                (Some(u), _) => Some(u.clone()),
                (None, StoreKind::Redis) => Some(
                    std::env::var(tollgate_quota::REDIS_URL_ENV)
                        .unwrap_or_else(|_| config.store.url.clone()),
                ),
                (None, StoreKind::Memory) => None,
                // Refused when the config is validated; stated again for the type checker.
                (None, StoreKind::RedisCluster | StoreKind::RedisSentinel) => {
                    anyhow::bail!(
                        "cache[{i}].store_url: needed with store.kind = {:?}",
                        config.store.kind.as_str()
                    )
                }
            };
            let store = match &store_url {
                Some(u) => AnyCache::Redis(
                    RedisCache::connect_lazy(u, timeout)
                        .with_context(|| format!("cache[{i}].store_url"))?,
                ),
                None => memory.clone(),
            };
            if c.mode == CacheMode::Semantic {
                match store.has_vector_search().await {
                    Ok(true) => {}
                    Ok(false) => anyhow::bail!(
                        "cache[{i}] ({}): mode = \"semantic\" needs a Redis with the search module \
                         (Redis Stack, Redis 8+, or Valkey with search): the {} does not know \
                         FT.CREATE/FT.SEARCH. Point `store_url` at one, or use mode = \"exact\", \
                         which works on any Redis.",
                        c.name,
                        if c.store_url.is_some() {
                            "cache's store_url"
                        } else {
                            "[store] Redis"
                        }
                    ),
                    Err(e) => tracing::warn!(cache = %c.name, error = %e,
                        "could not check the cache store for vector search; semantic lookups bypass until it answers"),
                }
            }
            let embedder = match (&c.embeddings_backend, &c.embeddings_model) {
                (Some(b), Some(m)) => Some(Embedder {
                    backend: routes
                        .backends
                        .iter()
                        .find(|x| &*x.name == b.as_str())
                        .cloned()
                        .with_context(|| format!("cache[{i}].embeddings_backend"))?,
                    model: m.clone(),
                }),
                _ => None,
            };
            rules.push(Arc::new(Rule {
                name: Arc::from(c.name.as_str()),
                vary: c
                    .vary()
                    .into_iter()
                    .map(|v| {
                        let label = v.label();
                        (v, label)
                    })
                    .collect(),
                config: c.clone(),
                store,
                embedder,
            }));
        }
        let metrics = CacheMetrics::new(rules.iter().map(|r| r.name.clone()).collect());
        Ok(Caches {
            rules,
            callers: Callers::default(),
            shared: Arc::new(Shared {
                client,
                usage_tx,
                metrics,
                quiet: Quiet::default(),
            }),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.shared.metrics
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// Refreshes the entry and index gauges every `every` (a background task).
    pub async fn watch_stats(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            for r in &self.rules {
                if let Ok(s) = r.store.stats(&r.name).await {
                    self.shared.metrics.set_stats(&r.name, &s);
                }
            }
        }
    }
}

/// A reservation of nothing: what a hit (or an embedding call) settles against.
pub fn unreserved(team: &str) -> Reserved {
    Reserved {
        admission: Admission::unlimited(team.to_string()),
        tokens: 0,
        cost_nano: 0,
        place: Placement::Nowhere,
        end: ReservationEnd::None,
        team: None,
        charge_team: None,
    }
}

/// Logs a cache failure at most once a minute (per replica), with how many were not logged.
#[derive(Default)]
struct Quiet {
    last_ms: AtomicU64,
    muted: AtomicU64,
}

impl Quiet {
    fn warn(&self, cache: &str, what: &str, error: &dyn std::fmt::Display) {
        let now = crate::clock::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let muted = self.muted.swap(0, Ordering::Relaxed);
            tracing::warn!(cache, error = %error, also_since_last_log = muted,
                "cache {what} failed; requests bypass the cache (logged once a minute)");
        } else {
            self.muted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

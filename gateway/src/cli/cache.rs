//! `tollgate cache purge` and `tollgate cache stats`: admin of the answer cache, on the store
//! each `[[cache]]` uses (its `store_url`, else the `[store]` Redis). A memory-store cache lives
//! inside the running gateway and is purged by restarting it.

use crate::request::Operation;
use anyhow::Context as _;
use std::time::Duration;
use tollgate_common::config::{CacheConfig, Config, StoreKind, VaryBy};
use tollgate_quota::cache::{AnyCache, RedisCache, partition_id};

fn store_of(config: &Config, c: &CacheConfig) -> anyhow::Result<AnyCache> {
    let url = match (&c.store_url, config.store.kind) {
        (Some(u), _) => u.clone(),
        (None, StoreKind::Redis) => std::env::var(tollgate_quota::REDIS_URL_ENV)
            .unwrap_or_else(|_| config.store.url.clone()),
        (None, StoreKind::Memory) => anyhow::bail!(
            "cache {:?} lives in the gateway's memory (store.kind = \"memory\"); restart the \
             gateway to empty it",
            c.name
        ),
        (None, StoreKind::RedisCluster | StoreKind::RedisSentinel) => anyhow::bail!(
            "cache {:?} needs a store_url with store.kind = {:?}",
            c.name,
            config.store.kind.as_str()
        ),
    };
    Ok(AnyCache::Redis(RedisCache::connect_lazy(
        &url,
        Duration::from_secs(5),
    )?))
}

fn selected<'a>(config: &'a Config, name: Option<&str>) -> anyhow::Result<Vec<&'a CacheConfig>> {
    let all: Vec<&CacheConfig> = config
        .cache
        .iter()
        .filter(|c| name.is_none_or(|n| n == c.name))
        .collect();
    if all.is_empty() {
        anyhow::bail!(
            "no [[cache]]{} in the configuration",
            name.map(|n| format!(" named {n:?}")).unwrap_or_default()
        );
    }
    Ok(all)
}

/// The partition ids of `spec` (`team=finance,header:x-tenant=acme`: every `vary_by` of the
/// cache, by label), one per operation a partition can hold.
pub fn partitions_of(c: &CacheConfig, spec: &str) -> anyhow::Result<Vec<String>> {
    let mut given = std::collections::HashMap::new();
    for pair in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("{pair:?}: expected LABEL=VALUE"))?;
        let k = VaryBy::parse(k.trim())
            .with_context(|| format!("{k:?} is not a vary_by label"))?
            .label();
        given.insert(k, v.trim().to_string());
    }
    let mut values = Vec::new();
    for v in c.vary() {
        let label = v.label();
        let value = given.remove(&label).with_context(|| {
            format!(
                "cache {:?} varies by {:?}: give {label}=VALUE",
                c.name, c.vary_by
            )
        })?;
        values.push((label, value));
    }
    if let Some(extra) = given.keys().next() {
        anyhow::bail!("cache {:?} does not vary by {extra:?}", c.name);
    }
    Ok([
        Operation::Chat,
        Operation::Completions,
        Operation::Responses,
    ]
    .into_iter()
    .map(|op| {
        let all = values.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        partition_id(std::iter::once(("op", op.path())).chain(all))
    })
    .collect())
}

pub async fn purge(
    config: &Config,
    name: Option<&str>,
    partition: Option<&str>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    for c in selected(config, name)? {
        let store = store_of(config, c)?;
        let mut n = 0;
        match partition {
            None => n += store.purge(&c.name, None).await?,
            Some(spec) => {
                for p in partitions_of(c, spec)? {
                    n += store.purge(&c.name, Some(&p)).await?;
                }
            }
        }
        out.push_str(&format!("{}: {n} entries purged\n", c.name));
    }
    Ok(out)
}

pub async fn stats(config: &Config, name: Option<&str>) -> anyhow::Result<String> {
    let mut out = String::new();
    for c in selected(config, name)? {
        let s = store_of(config, c)?.stats(&c.name).await?;
        out.push_str(&format!(
            "{}: {} entries{}\n",
            c.name,
            s.entries,
            match (s.indexed, s.index_bytes) {
                (Some(v), Some(b)) => format!(", {v} vectors indexed, index {b} bytes"),
                _ => String::new(),
            }
        ));
    }
    Ok(out)
}

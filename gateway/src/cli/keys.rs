//! `tollgate keys create`: a new random key, its SHA-256 stored (Redis) or printed for the
//! configuration (memory store). The key itself is printed once and never stored.

use super::load_config;
use crate::server;
use rand::Rng;
use std::path::Path;
use tollgate_common::key_hash;
use tollgate_quota::Store;

/// A new random subscription key.
pub fn new_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("tg-{body}")
}

pub(super) async fn keys_create(consumer: &str, config: Option<&Path>) -> anyhow::Result<()> {
    let key = new_key();
    let hash = key_hash(&key);
    let config = config.map(load_config).transpose()?;
    match config {
        Some(c) if c.store.kind.is_redis() => {
            let store = server::connect_store(&c).await?;
            if store.get_consumer(consumer).await?.is_none() {
                eprintln!(
                    "warning: consumer {consumer:?} has no record in the store yet; the key works once it has one"
                );
            }
            store.put_key(&hash, consumer).await?;
            println!("{key}");
            eprintln!("stored tg:key:{hash} -> {consumer}");
        }
        _ => {
            println!("{key}");
            eprintln!(
                "the memory store lives inside the gateway process; add the hash to the consumer in the config:\n\
                 [[consumers]]\nid = \"{consumer}\"\nkey_sha256 = [\"{hash}\"]"
            );
        }
    }
    Ok(())
}

//! The verification keys of `[auth.jwt]`: a JWKS from `jwks_file` or `jwks_url`, cached for
//! its `Cache-Control: max-age`, refreshed in the background, fetched once more on demand when a
//! token names an unknown `kid` (single-flight, at most once per [`ON_DEMAND_INTERVAL`]). A
//! failed fetch keeps the keys already known.

use super::jwt::{ON_DEMAND_INTERVAL, Reject};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use parking_lot::RwLock;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a fetched JWKS is used when it carries no `max-age`, and the bounds on `max-age`.
pub(super) const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);
pub(super) const MIN_MAX_AGE: Duration = Duration::from_secs(5);
pub(super) const MAX_MAX_AGE: Duration = Duration::from_secs(86_400);
/// Retry delay of the background refresh after a failed fetch.
pub(super) const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// Largest JWKS document read.
pub(super) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One verification key and what it may verify.
pub(super) struct Key {
    pub(super) key: DecodingKey,
    pub(super) family: AlgorithmFamily,
    /// The EC curve, for ES256 vs ES384.
    pub(super) curve: Option<EllipticCurve>,
    /// The JWK's own `alg`, when it declares one.
    pub(super) alg: Option<Algorithm>,
}

impl Key {
    pub(super) fn from_jwk(jwk: &Jwk) -> Option<Key> {
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            return None;
        }
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
            AlgorithmParameters::OctetKeyPair(_) => (AlgorithmFamily::Ed, None),
            // Symmetric (`oct`) and unknown keys are never used.
            _ => return None,
        };
        let alg = match jwk.common.key_algorithm {
            // An `alg` that names no signature algorithm (`RSA-OAEP`, ...) rules the key out.
            Some(a) => Some(
                serde_json::to_value(a)
                    .ok()?
                    .as_str()?
                    .parse::<Algorithm>()
                    .ok()?,
            ),
            None => None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(Key {
            key,
            family,
            curve,
            alg,
        })
    }

    pub(super) fn fits(&self, alg: Algorithm) -> bool {
        let curve_ok = match (alg, &self.curve) {
            (Algorithm::ES256, Some(c)) => *c == EllipticCurve::P256,
            (Algorithm::ES384, Some(c)) => *c == EllipticCurve::P384,
            _ => true,
        };
        alg.family() == self.family && curve_ok && self.alg.is_none_or(|a| a == alg)
    }
}

pub(super) enum Source {
    Url {
        url: String,
        client: reqwest::Client,
    },
    File(String),
}

#[derive(Default)]
pub(super) struct KeySet {
    pub(super) by_kid: HashMap<String, Arc<Key>>,
    /// Keys without a `kid`, usable only when the set holds exactly one key.
    pub(super) anonymous: Vec<Arc<Key>>,
}

impl KeySet {
    pub(super) fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    pub(super) fn get(&self, kid: Option<&str>) -> Option<Arc<Key>> {
        match kid {
            Some(k) => self.by_kid.get(k).cloned(),
            None if self.len() == 1 => self.by_kid.values().chain(&self.anonymous).next().cloned(),
            None => None,
        }
    }
}

/// The verification keys and how they are kept current.
pub(super) struct Jwks {
    pub(super) source: Source,
    pub(super) keys: RwLock<Arc<KeySet>>,
    pub(super) next_refresh: parking_lot::Mutex<Instant>,
    /// Held during an on-demand fetch (single flight); holds when the last one started.
    pub(super) on_demand: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    pub(super) fn new(source: Source) -> Jwks {
        Jwks {
            source,
            keys: RwLock::new(Arc::new(KeySet::default())),
            next_refresh: parking_lot::Mutex::new(Instant::now()),
            on_demand: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) fn set_next_refresh(&self, after: Duration) {
        *self.next_refresh.lock() = Instant::now() + after;
    }

    /// The key for `kid`, fetching the JWKS once more (rate-limited) when it is unknown.
    pub(super) async fn key_for(&self, kid: Option<&str>) -> Result<Arc<Key>, Reject> {
        if let Some(k) = self.keys.read().get(kid) {
            return Ok(k);
        }
        let Some(kid) = kid else {
            return Err(Reject::UnknownKey);
        };
        if kid.len() > 256 {
            return Err(Reject::UnknownKey);
        }
        let mut last = self.on_demand.lock().await;
        // Another request may have fetched it while this one waited.
        if let Some(k) = self.keys.read().get(Some(kid)) {
            return Ok(k);
        }
        if last.is_some_and(|t| t.elapsed() < ON_DEMAND_INTERVAL) {
            return Err(Reject::UnknownKey);
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(max_age) => self.set_next_refresh(max_age),
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh for an unknown kid failed; keeping the known keys")
            }
        }
        self.keys.read().get(Some(kid)).ok_or(Reject::UnknownKey)
    }

    /// Fetches (or reads) the JWKS and replaces the key set; returns how long it is fresh.
    /// On failure the known keys stay.
    pub(super) async fn fetch(&self) -> anyhow::Result<Duration> {
        let (body, max_age) = match &self.source {
            Source::File(path) => (tokio::fs::read(path).await?, DEFAULT_MAX_AGE),
            Source::Url { url, client } => {
                let resp = client
                    .get(url)
                    .header("accept", "application/json")
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    anyhow::bail!("JWKS endpoint answered {}", resp.status().as_u16());
                }
                let max_age = resp
                    .headers()
                    .get(http::header::CACHE_CONTROL)
                    .and_then(|v| v.to_str().ok())
                    .map(cache_max_age)
                    .unwrap_or(DEFAULT_MAX_AGE);
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    anyhow::bail!("JWKS document too large");
                }
                let body = resp.bytes().await?;
                if body.len() > MAX_JWKS_BYTES {
                    anyhow::bail!("JWKS document too large");
                }
                (body.to_vec(), max_age)
            }
        };
        let set = parse_jwks(&body)?;
        tracing::debug!(keys = set.len(), "JWKS loaded");
        *self.keys.write() = Arc::new(set);
        Ok(max_age)
    }

    /// Refetches a URL's JWKS when its `max-age` runs out, until the owner is dropped.
    pub(super) async fn refresh_loop(this: std::sync::Weak<Jwks>) {
        loop {
            let at = match this.upgrade() {
                Some(j) => *j.next_refresh.lock(),
                None => return,
            };
            tokio::time::sleep_until(at).await;
            let Some(j) = this.upgrade() else { return };
            if *j.next_refresh.lock() > Instant::now() {
                continue; // an on-demand fetch moved it
            }
            match j.fetch().await {
                Ok(max_age) => j.set_next_refresh(max_age),
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the known keys");
                    j.set_next_refresh(RETRY_AFTER_FAILURE);
                }
            }
        }
    }
}

/// The keys of a JWKS document; keys that cannot verify anything are skipped.
pub(super) fn parse_jwks(body: &[u8]) -> anyhow::Result<KeySet> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<Value>,
    }
    let doc: Doc =
        serde_json::from_slice(body).map_err(|_| anyhow::anyhow!("JWKS is not a JSON key set"))?;
    let mut set = KeySet::default();
    for k in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(k) else {
            continue;
        };
        let Some(key) = Key::from_jwk(&jwk) else {
            continue;
        };
        match &jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid.clone(), Arc::new(key));
            }
            None => set.anonymous.push(Arc::new(key)),
        }
    }
    Ok(set)
}

/// `max-age` of a `Cache-Control` value (no-cache/no-store: the minimum), bounded.
pub(super) fn cache_max_age(v: &str) -> Duration {
    let mut age = None;
    for d in v.split(',').map(str::trim) {
        let d = d.to_ascii_lowercase();
        if d == "no-cache" || d == "no-store" {
            return MIN_MAX_AGE;
        }
        if let Some(n) = d.strip_prefix("max-age=") {
            age = n
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age.unwrap_or(DEFAULT_MAX_AGE)
        .clamp(MIN_MAX_AGE, MAX_MAX_AGE)
}

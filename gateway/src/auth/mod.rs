//! Who is calling: a subscription key (`api-key`, `Ocp-Apim-Subscription-Key` or
//! `Authorization: Bearer`) hashed with SHA-256 and looked up in the store. Keys exist only as
//! hashes; the plain key is dropped once hashed and never logged or forwarded.
//!
//! Lookups are cached per replica for `limits.key_cache_ms` (default 1 s), so a key revoked in
//! the store stops working everywhere within that time, and a flood of bad keys costs the store
//! one lookup per key per interval.
//!
//! [`Auth`] applies `auth.mode`: keys only, JWTs only ([`crate::jwt`]), both together (APIM's
//! subscription key + JWT: the key names the consumer, the token must be valid), or either (a
//! bearer value shaped like a JWT is validated as one, anything else is a key).

mod jwks;
pub mod jwt;

pub use jwt::JwtAuth;

use crate::error::Error;
use crate::limits::Limits;
use http::HeaderMap;
use jwt::{Identity, looks_like_jwt};
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_common::config::AuthMode;

/// Longest credential we look at; anything longer is rejected unhashed.
const MAX_CREDENTIAL_LEN: usize = 4096;
/// Entries kept before the cache starts over (a bound against key-spraying).
const MAX_CACHED_KEYS: usize = 100_000;

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub consumer: Arc<str>,
    /// Team from a token claim (JWT); otherwise the store's record decides.
    pub team: Option<String>,
    /// Whether the consumer must have a store record (key callers must; JWT callers need not).
    pub require_record: bool,
    /// The validated JWT, when the mode asked for one: its `model_claims` still apply.
    pub jwt: Option<Arc<Identity>>,
}

impl Caller {
    /// Whether the caller's token carries the claims `model` requires (`auth.jwt.model_claims`).
    pub fn may_use(&self, model: &str) -> bool {
        self.jwt.as_ref().is_none_or(|j| j.may_use(model))
    }
}

/// The credential headers a client may use, all removed before a request reaches a backend.
pub const CREDENTIAL_HEADERS: [&str; 3] = ["api-key", "authorization", "ocp-apim-subscription-key"];

/// The subscription key in the request, if any.
pub fn subscription_key(headers: &HeaderMap) -> Option<&str> {
    header_key(headers).or_else(|| bearer(headers))
}

/// A key in `api-key` or `Ocp-Apim-Subscription-Key`.
fn header_key(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get("api-key")
        .or_else(|| headers.get("ocp-apim-subscription-key"))?;
    Some(v.to_str().ok().map(str::trim).unwrap_or_default())
}

/// The value of `Authorization: Bearer`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Authentication as `auth.mode` asks.
pub struct Auth {
    mode: AuthMode,
    keys: KeyAuth,
    /// Present whenever the mode involves JWTs (the config is validated so).
    jwt: Option<JwtAuth>,
}

impl Auth {
    pub fn new(mode: AuthMode, keys: KeyAuth, jwt: Option<JwtAuth>) -> Self {
        Auth { mode, keys, jwt }
    }

    /// The caller of a model route: a token issued for the MCP audience only is refused.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        limits: &Limits,
    ) -> Result<Caller, Error> {
        let caller = self.authenticate_mcp(headers, limits).await?;
        if caller.jwt.as_ref().is_some_and(|j| j.mcp_only) {
            tracing::debug!("JWT rejected: its audience is the MCP routes'");
            return Err(Error::Unauthenticated);
        }
        Ok(caller)
    }

    /// The caller of an MCP route: `auth.jwt.mcp_audience` is accepted beside `audience`.
    pub async fn authenticate_mcp(
        &self,
        headers: &HeaderMap,
        limits: &Limits,
    ) -> Result<Caller, Error> {
        match self.mode {
            AuthMode::Key => self.keys.authenticate(headers, limits).await,
            AuthMode::Jwt => self.jwt_caller(bearer(headers)).await,
            AuthMode::KeyAndJwt => {
                // The token is checked first: it costs no store call.
                let identity = self.token(bearer(headers)).await?;
                let key = header_key(headers).ok_or(Error::Unauthenticated)?;
                let mut caller = self.keys.authenticate_key(key, limits).await?;
                caller.jwt = Some(identity);
                Ok(caller)
            }
            AuthMode::KeyOrJwt => match (header_key(headers), bearer(headers)) {
                (None, Some(b)) if looks_like_jwt(b) => self.jwt_caller(Some(b)).await,
                _ => self.keys.authenticate(headers, limits).await,
            },
        }
    }

    async fn token(&self, token: Option<&str>) -> Result<Arc<Identity>, Error> {
        let jwt = self.jwt.as_ref().ok_or(Error::Unauthenticated)?;
        Ok(jwt.validate(token.unwrap_or_default()).await?)
    }

    /// A caller known by its token alone: limited by its store record or the `[limits]` defaults.
    async fn jwt_caller(&self, token: Option<&str>) -> Result<Caller, Error> {
        let identity = self.token(token).await?;
        let consumer = identity.consumer.clone().ok_or(jwt::Reject::Consumer)?;
        Ok(Caller {
            consumer,
            team: identity.team.clone(),
            require_record: false,
            jwt: Some(identity),
        })
    }
}

struct Cached {
    consumer: Option<Arc<str>>,
    at: Instant,
}

pub struct KeyAuth {
    ttl: Duration,
    cache: RwLock<HashMap<[u8; 32], Cached>>,
}

impl KeyAuth {
    pub fn new(ttl: Duration) -> Self {
        KeyAuth {
            ttl,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Resolves the request's subscription key to a caller.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        limits: &Limits,
    ) -> Result<Caller, Error> {
        let key = subscription_key(headers).ok_or(Error::Unauthenticated)?;
        self.authenticate_key(key, limits).await
    }

    async fn authenticate_key(&self, key: &str, limits: &Limits) -> Result<Caller, Error> {
        if key.is_empty() || key.len() > MAX_CREDENTIAL_LEN {
            return Err(Error::Unauthenticated);
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let consumer = self.lookup(digest, limits).await?;
        let consumer = consumer.ok_or(Error::Unauthenticated)?;
        Ok(Caller {
            consumer,
            team: None,
            require_record: true,
            jwt: None,
        })
    }

    async fn lookup(&self, digest: [u8; 32], limits: &Limits) -> Result<Option<Arc<str>>, Error> {
        if !self.ttl.is_zero()
            && let Some(c) = self.cache.read().get(&digest)
            && c.at.elapsed() < self.ttl
        {
            return Ok(c.consumer.clone());
        }
        let hex = hex::encode(digest);
        match limits.lookup_key(&hex).await {
            Ok(found) => {
                let consumer: Option<Arc<str>> = found.map(Arc::from);
                if !self.ttl.is_zero() {
                    let mut w = self.cache.write();
                    if w.len() >= MAX_CACHED_KEYS {
                        w.clear();
                    }
                    w.insert(
                        digest,
                        Cached {
                            consumer: consumer.clone(),
                            at: Instant::now(),
                        },
                    );
                }
                Ok(consumer)
            }
            Err(e) => {
                // The store is down: a key we knew keeps working (revocations wait for recovery).
                if let Some(c) = self.cache.read().get(&digest) {
                    return Ok(c.consumer.clone());
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &'static str, v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, v.parse().unwrap());
        m
    }

    /// All three header styles carry the key; other schemes do not.
    #[test]
    fn key_headers() {
        assert_eq!(subscription_key(&h("api-key", "k1")), Some("k1"));
        assert_eq!(
            subscription_key(&h("ocp-apim-subscription-key", "k2")),
            Some("k2")
        );
        assert_eq!(
            subscription_key(&h("authorization", "Bearer k3")),
            Some("k3")
        );
        assert_eq!(
            subscription_key(&h("authorization", "bearer  k4 ")),
            Some("k4")
        );
        assert_eq!(subscription_key(&h("authorization", "Basic abc")), None);
        assert_eq!(subscription_key(&HeaderMap::new()), None);
    }
}

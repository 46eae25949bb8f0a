//! JWT bearer tokens validated like Azure APIM's `validate-jwt` (`[auth.jwt]`): the signature
//! against the JWKS key named by the token's `kid`, an algorithm from the allow-list (asymmetric
//! only: never `HS*`, never `none`), `exp`/`nbf` with `leeway_s`, `iss`, `aud`, and the
//! configured `required_claims`. A valid token yields an [`Identity`]: the consumer (from
//! `consumer_claim`), the team (from `team_claim`) and the models its claims do not reach
//! (`model_claims`).
//!
//! Keys come from `jwks_file` or `jwks_url`. A fetched JWKS is cached for its `Cache-Control:
//! max-age` and refreshed in the background; a token with an unknown `kid` triggers one
//! refresh (single-flight, at most once per [`ON_DEMAND_INTERVAL`]), so a key rotation works
//! without a restart. A failed fetch keeps the keys already known.
//!
//! Every rejection is the same generic 401 for the client; the reason ([`Reject`]) is logged
//! at debug level, never with the token. Validated tokens are cached by their SHA-256 for a
//! short while so a client reusing its token costs one hash, not one signature check.

use super::jwks::*;
use crate::error::Error;
use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation, errors::ErrorKind};
use parking_lot::RwLock;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tollgate_common::config::JwtConfig;

/// Longest token looked at; longer is rejected before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Shortest time between two JWKS fetches triggered by unknown `kid`s.
pub const ON_DEMAND_INTERVAL: Duration = Duration::from_secs(10);
/// How long a validated token is remembered (never past its `exp`).
const CACHE_FOR_SECS: u64 = 60;
const MAX_CACHED_TOKENS: usize = 10_000;
/// Longest consumer id or team taken from a claim.
const MAX_ID_LEN: usize = 256;

/// Why a token was rejected: for the debug log and tests, never for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    Missing,
    TooLarge,
    Malformed,
    /// `none`, `HS*`, or an algorithm outside the allow-list.
    Algorithm,
    UnknownKey,
    /// The key's type, curve or declared `alg` does not fit the token's `alg`.
    KeyMismatch,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// A registered claim (`exp`, `iss`, `aud`) is absent or malformed.
    MissingClaim,
    /// A `required_claims` entry is absent or has another value.
    RequiredClaim,
    /// The consumer claim is absent or not a usable id.
    Consumer,
}

impl From<Reject> for Error {
    fn from(r: Reject) -> Error {
        tracing::debug!(reason = ?r, "JWT rejected");
        Error::Unauthenticated
    }
}

/// What a valid token says about its caller.
#[derive(Debug)]
pub struct Identity {
    /// From `consumer_claim`; absent only where the mode lets a key name the consumer.
    pub consumer: Option<Arc<str>>,
    /// From `team_claim`, when set and present.
    pub team: Option<String>,
    /// Models of `model_claims` whose claims this token does not carry.
    pub models_denied: Vec<String>,
    /// The token's audience is only `mcp_audience`: good for the MCP routes, not the model ones.
    pub mcp_only: bool,
    /// MCP tool patterns from `tools_claim` (a list of strings, or one space-separated string).
    pub tools: Option<Vec<String>>,
    /// The token's claims, for `jwt:CLAIM` dimensions (`[telemetry] dimensions`).
    pub claims: Map<String, Value>,
}

impl Identity {
    pub fn may_use(&self, model: &str) -> bool {
        !self.models_denied.iter().any(|m| m == model)
    }
}

/// Validates bearer JWTs against the configured issuer, audience and keys.
pub struct JwtAuth {
    config: JwtConfig,
    allowed: Vec<Algorithm>,
    jwks: Arc<Jwks>,
    cache: RwLock<HashMap<[u8; 32], Cached>>,
    /// The background JWKS refresh (URL sources only); aborted with the gateway.
    refresh_task: Option<tokio::task::AbortHandle>,
}

struct Cached {
    identity: Arc<Identity>,
    /// Unix seconds after which the token is validated again.
    until: u64,
}

impl Drop for JwtAuth {
    fn drop(&mut self) {
        if let Some(t) = self.refresh_task.take() {
            t.abort();
        }
    }
}

impl JwtAuth {
    /// Loads the JWKS (a URL that cannot be fetched yet only warns: its keys arrive with the
    /// next refresh) and, for a URL, starts the background refresh.
    pub async fn start(config: &JwtConfig) -> anyhow::Result<JwtAuth> {
        let mut allowed = Vec::new();
        for a in &config.algorithms {
            let alg: Algorithm = a
                .parse()
                .map_err(|_| anyhow::anyhow!("auth.jwt.algorithms: unknown {a:?}"))?;
            if alg.family() == AlgorithmFamily::Hmac {
                anyhow::bail!(
                    "auth.jwt.algorithms: {a:?} is symmetric; only asymmetric algorithms are accepted"
                );
            }
            allowed.push(alg);
        }
        let source = match (&config.jwks_url, &config.jwks_file) {
            (Some(url), _) => Source::Url {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| anyhow::anyhow!("auth.jwt: building the JWKS client: {e}"))?,
            },
            (None, Some(path)) => Source::File(path.clone()),
            (None, None) => anyhow::bail!("auth.jwt.jwks_url: set jwks_url or jwks_file"),
        };
        let jwks = Arc::new(Jwks::new(source));
        match jwks.fetch().await {
            Ok(max_age) => jwks.set_next_refresh(max_age),
            Err(e) if matches!(jwks.source, Source::File(_)) => {
                anyhow::bail!("auth.jwt.jwks_file: {e}")
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS not loaded at start-up; JWTs are rejected until it is");
                jwks.set_next_refresh(MIN_MAX_AGE);
            }
        }
        let refresh_task = matches!(jwks.source, Source::Url { .. })
            .then(|| tokio::spawn(Jwks::refresh_loop(Arc::downgrade(&jwks))).abort_handle());
        Ok(JwtAuth {
            config: config.clone(),
            allowed,
            jwks,
            cache: RwLock::new(HashMap::new()),
            refresh_task,
        })
    }

    /// Validates `token`; the identity may lack a consumer (see [`Identity::consumer`]).
    pub async fn validate(&self, token: &str) -> Result<Arc<Identity>, Reject> {
        if token.is_empty() {
            return Err(Reject::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Reject::TooLarge);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(c) = self.cache.read().get(&digest)
            && now < c.until
        {
            return Ok(c.identity.clone());
        }
        let (identity, exp) = self.validate_uncached(token).await?;
        let identity = Arc::new(identity);
        let until = exp
            .saturating_add(self.config.leeway_s)
            .min(now + CACHE_FOR_SECS);
        let mut w = self.cache.write();
        if w.len() >= MAX_CACHED_TOKENS {
            w.retain(|_, c| now < c.until);
            if w.len() >= MAX_CACHED_TOKENS {
                w.clear();
            }
        }
        w.insert(
            digest,
            Cached {
                identity: identity.clone(),
                until,
            },
        );
        Ok(identity)
    }

    async fn validate_uncached(&self, token: &str) -> Result<(Identity, u64), Reject> {
        // `decode_header` fails for `alg: none` and any name jsonwebtoken does not know.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Reject::Malformed)?;
        if !self.allowed.contains(&header.alg) {
            return Err(Reject::Algorithm);
        }
        let key = self.jwks.key_for(header.kid.as_deref()).await?;
        if !key.fits(header.alg) {
            return Err(Reject::KeyMismatch);
        }
        let mut v = Validation::new(header.alg);
        v.leeway = self.config.leeway_s;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.set_issuer(&[&self.config.issuer]);
        match &self.config.mcp_audience {
            Some(mcp) => v.set_audience(&[&self.config.audience, mcp]),
            None => v.set_audience(&[&self.config.audience]),
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map_err(|e| match e
                .kind()
            {
                ErrorKind::InvalidSignature => Reject::Signature,
                ErrorKind::ExpiredSignature => Reject::Expired,
                ErrorKind::ImmatureSignature => Reject::NotYetValid,
                ErrorKind::InvalidIssuer => Reject::Issuer,
                ErrorKind::InvalidAudience => Reject::Audience,
                ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Reject::Algorithm,
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                    Reject::MissingClaim
                }
                ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => Reject::KeyMismatch,
                _ => Reject::Malformed,
            })?;
        let claims = data.claims;
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .map(|e| e.max(0.0) as u64)
            .unwrap_or(0);
        if !satisfies(&claims, &self.config.required_claims) {
            return Err(Reject::RequiredClaim);
        }
        let claim = |name: &str| claims.get(name).and_then(claim_id);
        let consumer = claim(&self.config.consumer_claim).map(Arc::from);
        let team = self
            .config
            .team_claim
            .as_deref()
            .and_then(claim)
            .map(String::from);
        let models_denied = self
            .config
            .model_claims
            .iter()
            .filter(|(_, required)| !satisfies(&claims, required))
            .map(|(model, _)| model.clone())
            .collect();
        let audience = &self.config.audience;
        let mcp_only = !match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(audience)),
            _ => false,
        };
        let tools = self
            .config
            .tools_claim
            .as_deref()
            .and_then(|c| claims.get(c))
            .map(|v| match v {
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
                Value::String(s) => s.split_whitespace().map(String::from).collect(),
                _ => Vec::new(),
            });
        Ok((
            Identity {
                consumer,
                team,
                models_denied,
                mcp_only,
                tools,
                claims,
            },
            exp,
        ))
    }
}

/// Whether every `required` claim is present with that value (or, for an array, contains it).
fn satisfies(claims: &Map<String, Value>, required: &BTreeMap<String, String>) -> bool {
    required.iter().all(|(name, want)| match claims.get(name) {
        Some(Value::Array(items)) => items.iter().any(|v| scalar_eq(v, want)),
        Some(v) => scalar_eq(v, want),
        None => false,
    })
}

fn scalar_eq(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        Value::Bool(b) => want == if *b { "true" } else { "false" },
        Value::Number(n) => n.to_string() == want,
        _ => false,
    }
}

/// A claim usable as a consumer id or team: a short string of letters, digits and `-_.@:`
/// (it becomes part of store keys and metric labels).
fn claim_id(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'));
    ok.then_some(s)
}

/// Whether a bearer value has the shape of a JWT (three base64url parts, a JSON header).
pub fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ")
        && s.bytes().filter(|b| *b == b'.').count() == 2
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `max-age` is honoured within bounds; no-cache means refetch soon.
    #[test]
    fn cache_control() {
        assert_eq!(
            cache_max_age("public, max-age=3600"),
            Duration::from_secs(3600)
        );
        assert_eq!(cache_max_age("max-age=1"), MIN_MAX_AGE);
        assert_eq!(cache_max_age("max-age=99999999"), MAX_MAX_AGE);
        assert_eq!(cache_max_age("no-store"), MIN_MAX_AGE);
        assert_eq!(cache_max_age("private"), DEFAULT_MAX_AGE);
    }

    /// Required claims match a value or an array member, nothing else.
    #[test]
    fn required_claims() {
        let claims = json!({"roles": ["reader", "gpt4"], "tier": "gold", "admin": true, "n": 3});
        let claims = claims.as_object().unwrap();
        let req = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(satisfies(
            claims,
            &req(&[("roles", "gpt4"), ("tier", "gold")])
        ));
        assert!(satisfies(claims, &req(&[("admin", "true"), ("n", "3")])));
        assert!(!satisfies(claims, &req(&[("roles", "writer")])));
        assert!(!satisfies(claims, &req(&[("tier", "gol")])));
        assert!(!satisfies(claims, &req(&[("missing", "x")])));
        assert!(satisfies(claims, &req(&[])));
    }

    /// Only plain ids become consumers; a JWT is told apart from an opaque key.
    #[test]
    fn ids_and_shapes() {
        assert_eq!(claim_id(&json!("app-1@tenant")), Some("app-1@tenant"));
        assert_eq!(claim_id(&json!("a{b}")), None);
        assert_eq!(claim_id(&json!("")), None);
        assert_eq!(claim_id(&json!(5)), None);
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(!looks_like_jwt("tg-test-key-team-a"));
        assert!(!looks_like_jwt("eyJ.only-one-dot"));
    }

    /// Symmetric keys in a JWKS are ignored; an RSA key never verifies an EC algorithm.
    #[test]
    fn jwks_keys() {
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "r1", "n": "sXch", "e": "AQAB", "alg": "RS256", "use": "sig"},
            {"kty": "weird", "kid": "w"}
        ]});
        let set = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert!(set.get(Some("sym")).is_none());
        assert!(set.get(Some("w")).is_none());
        let k = set.get(Some("r1")).unwrap();
        assert!(k.fits(Algorithm::RS256));
        assert!(!k.fits(Algorithm::PS256), "the JWK declares RS256");
        assert!(!k.fits(Algorithm::ES256));
        assert!(
            set.get(None).is_some(),
            "one key: a token without kid may use it"
        );
    }
}

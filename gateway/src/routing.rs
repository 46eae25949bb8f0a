//! Which backend serves a request. A model's backends form priority groups (PTU = 1,
//! PAYG = 2, ...); the best group with an available backend serves, chosen by weight inside
//! the group; lower groups only when every backend above is tripped or has failed this request.
//! Routing reads circuit state from a local cache, so it costs no store call.

use crate::credentials::{Timing, TokenProvider, TokenSource};
use crate::error::Error;
use crate::secrets::Secrets;
use http::HeaderValue;
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tollgate_common::Secret;
use tollgate_common::config::{BackendApi, BackendAuth, BackendConfig, Config, secret_from_env};

/// A backend's credential, ready to put on a request.
#[derive(Clone, Debug)]
pub enum Credential {
    None,
    /// Header name and value, marked sensitive so hyper never logs it.
    Header(&'static str, HeaderValue),
    /// `Authorization: Bearer` with the current token of an OAuth2 / managed-identity source.
    Token(Arc<TokenProvider>),
}

impl Credential {
    fn from_config(b: &BackendConfig) -> anyhow::Result<Credential> {
        let header = |name: &'static str, value: String| -> anyhow::Result<Credential> {
            let mut v = HeaderValue::from_str(&value).map_err(|_| {
                anyhow::anyhow!("backend {}: credential is not a valid header", b.name)
            })?;
            v.set_sensitive(true);
            Ok(Credential::Header(name, v))
        };
        let env = |var: &str| -> anyhow::Result<Secret> {
            secret_from_env(var).map_err(|e| anyhow::anyhow!("backends.{}.auth: {e}", b.name))
        };
        match &b.auth {
            BackendAuth::None => Ok(Credential::None),
            BackendAuth::ApiKey { key_env } => {
                let key = env(key_env)?;
                match b.api {
                    BackendApi::Azure => header("api-key", key.expose().to_string()),
                    BackendApi::Openai => {
                        header("authorization", format!("Bearer {}", key.expose()))
                    }
                }
            }
            BackendAuth::Bearer { token_env } => header(
                "authorization",
                format!("Bearer {}", env(token_env)?.expose()),
            ),
            BackendAuth::Oauth2ClientCredentials {
                token_url,
                client_id,
                client_secret_env,
                scope,
            } => {
                let source = TokenSource::Oauth2 {
                    token_url: token_url.clone(),
                    client_id: client_id.clone(),
                    client_secret: env(client_secret_env)?,
                    scope: scope.clone(),
                };
                Ok(Credential::Token(Arc::new(TokenProvider::new(
                    &b.name,
                    source,
                    Timing::default(),
                ))))
            }
            BackendAuth::AzureManagedIdentity {
                endpoint,
                resource,
                client_id,
            } => {
                let source = TokenSource::ManagedIdentity {
                    endpoint: endpoint.clone(),
                    resource: resource.clone(),
                    client_id: client_id.clone(),
                };
                Ok(Credential::Token(Arc::new(TokenProvider::new(
                    &b.name,
                    source,
                    Timing::default(),
                ))))
            }
        }
    }
}

/// Prices in micro-units per one million tokens (so cost in pico-units is tokens × price).
#[derive(Clone, Copy, Debug, Default)]
pub struct PriceMicros {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// A configured backend and its live state.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub config: BackendConfig,
    /// `url` without a trailing `/` (and without a trailing `/v1` for OpenAI-style backends,
    /// which the gateway adds itself).
    pub base: String,
    pub credential: Credential,
    pub price: PriceMicros,
    /// Parsed URLs per (operation, model) for the backend's own `api_version`.
    pub urls: HashMap<(crate::request::Operation, String), reqwest::Url>,
    /// Circuit open until this unix time (ms, this replica's clock); 0 = closed.
    pub open_until_ms: AtomicU64,
    /// The store says the circuit tripped and has not closed since: once `open_until_ms`
    /// passes it is half-open, and only a probe may go.
    pub tripped: AtomicBool,
    /// The last trip number seen from the store.
    pub trip_seen: AtomicU64,
    /// When this replica last asked for the probe lease (unix ms).
    pub probe_asked_ms: AtomicU64,
    /// Deprioritised until then (unix ms): it reported utilization above `spill_utilization`.
    pub spill_until_ms: AtomicU64,
    /// Every secret the gateway holds (shared by all backends): none of them may pass from
    /// this backend's answers to a client.
    pub secrets: Arc<Secrets>,
    pub limits: ResponseLimits,
}

/// What one response may cost a replica (`server.max_response_bytes`,
/// `server.max_sse_event_bytes`): set server-wide, kept with each backend so that forwarding
/// needs nothing else.
#[derive(Clone, Copy, Debug)]
pub struct ResponseLimits {
    pub max_response_bytes: u64,
    pub max_sse_event_bytes: usize,
}

impl Backend {
    /// The URL for an operation on this backend.
    /// The URL for an operation on a model, parsed once at start-up for the backend's own
    /// `api_version`; another version (the client's) is built on the spot.
    pub fn target(
        &self,
        op: crate::request::Operation,
        model: &str,
        api_version: &str,
    ) -> Result<reqwest::Url, Error> {
        if api_version == self.config.api_version
            && let Some(u) = self.urls.get(&(op, model.to_string()))
        {
            return Ok(u.clone());
        }
        reqwest::Url::parse(&self.url(op, self.deployment(model), api_version))
            .map_err(|_| Error::bad_request("api-version is not valid in a URL"))
    }

    pub fn url(
        &self,
        op: crate::request::Operation,
        deployment: &str,
        api_version: &str,
    ) -> String {
        use crate::request::Operation;
        match (self.config.api, op) {
            (BackendApi::Openai, _) => format!("{}/v1/{}", self.base, op.path()),
            (BackendApi::Azure, Operation::Responses) => {
                format!("{}/openai/v1/responses", self.base)
            }
            (BackendApi::Azure, _) => format!(
                "{}/openai/deployments/{}/{}?api-version={}",
                self.base,
                deployment,
                op.path(),
                api_version
            ),
        }
    }

    /// This backend's own name for a model.
    pub fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.config
            .deployments
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }

    pub fn is_open(&self, now_ms: u64) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn trip_until(&self, until_ms: u64) {
        self.open_until_ms.fetch_max(until_ms, Ordering::Relaxed);
    }
}

fn price_micros(p: f64) -> u64 {
    (p * 1_000_000.0).round() as u64
}

struct Group {
    members: Vec<(usize, u32)>,
}

/// Every backend, and per model the priority groups that serve it.
pub struct Routes {
    pub backends: Vec<Arc<Backend>>,
    pools: HashMap<String, Vec<Group>>,
}

impl Routes {
    pub fn from_config(config: &Config) -> anyhow::Result<Routes> {
        let mut built = Vec::new();
        for b in &config.backends {
            let mut base = b.url.trim_end_matches('/').to_string();
            if b.api == BackendApi::Openai && base.ends_with("/v1") {
                base.truncate(base.len() - 3);
            }
            let price = PriceMicros {
                input: price_micros(b.price.input_per_1m),
                output: price_micros(b.price.output_per_1m),
                cached_input: price_micros(
                    b.price.cached_input_per_1m.unwrap_or(b.price.input_per_1m),
                ),
            };
            let mut backend = Backend {
                name: Arc::from(b.name.as_str()),
                credential: Credential::from_config(b)?,
                config: b.clone(),
                base,
                price,
                urls: HashMap::new(),
                open_until_ms: AtomicU64::new(0),
                tripped: AtomicBool::new(false),
                trip_seen: AtomicU64::new(0),
                probe_asked_ms: AtomicU64::new(0),
                spill_until_ms: AtomicU64::new(0),
                secrets: Arc::default(),
                limits: ResponseLimits {
                    max_response_bytes: config.server.max_response_bytes,
                    max_sse_event_bytes: config.server.max_sse_event_bytes,
                },
            };
            for model in &b.models {
                for op in crate::request::Operation::ALL {
                    let url = backend.url(op, backend.deployment(model), &b.api_version);
                    let parsed = reqwest::Url::parse(&url).map_err(|e| {
                        anyhow::anyhow!("backends.{}: {url} is not a valid URL: {e}", b.name)
                    })?;
                    backend.urls.insert((op, model.clone()), parsed);
                }
            }
            built.push(backend);
        }
        let providers = built
            .iter()
            .filter_map(|b| match &b.credential {
                Credential::Token(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        let secrets = Arc::new(Secrets::from_config(config, providers));
        let backends: Vec<Arc<Backend>> = built
            .into_iter()
            .map(|mut b| {
                b.secrets = secrets.clone();
                Arc::new(b)
            })
            .collect();
        let mut pools: HashMap<String, Vec<Group>> = HashMap::new();
        for model in config.models() {
            let mut by_priority: Vec<(u32, Vec<(usize, u32)>)> = Vec::new();
            for (i, b) in backends.iter().enumerate() {
                if !b.config.models.contains(&model) {
                    continue;
                }
                let p = b.config.priority;
                match by_priority.iter_mut().find(|(q, _)| *q == p) {
                    Some((_, m)) => m.push((i, b.config.weight)),
                    None => by_priority.push((p, vec![(i, b.config.weight)])),
                }
            }
            by_priority.sort_by_key(|(p, _)| *p);
            pools.insert(
                model,
                by_priority
                    .into_iter()
                    .map(|(_, members)| Group { members })
                    .collect(),
            );
        }
        Ok(Routes { backends, pools })
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.pools.contains_key(model)
    }

    pub fn models(&self) -> impl Iterator<Item = &String> {
        self.pools.keys()
    }

    /// The backends to try for `model`, in order: the available ones of each priority group in a
    /// weighted-random order, best group first. Tripped backends are left out; when every
    /// backend is tripped the error says when the first one reopens.
    pub fn plan(&self, model: &str, now_ms: u64) -> Result<Vec<Candidate>, Error> {
        let groups = self
            .pools
            .get(model)
            .ok_or_else(|| Error::ModelNotFound(model.to_string()))?;
        let mut plan = Vec::with_capacity(4);
        let mut spilling = Vec::new();
        let mut rng = rand::rng();
        let mut first_reopen = u64::MAX;
        for g in groups {
            let mut open: Vec<(usize, u32)> = Vec::with_capacity(g.members.len());
            for &(i, w) in &g.members {
                let b = &self.backends[i];
                let until = b.open_until_ms.load(Ordering::Relaxed);
                if until > now_ms {
                    first_reopen = first_reopen.min(until);
                } else {
                    open.push((i, w));
                }
            }
            // Weighted order without replacement.
            while !open.is_empty() {
                let total: u64 = open.iter().map(|(_, w)| *w as u64).sum();
                let mut pick = rng.random_range(0..total);
                let mut idx = 0;
                for (k, (_, w)) in open.iter().enumerate() {
                    if pick < *w as u64 {
                        idx = k;
                        break;
                    }
                    pick -= *w as u64;
                }
                let (i, _) = open.swap_remove(idx);
                let b = &self.backends[i];
                let c = Candidate {
                    backend: b.clone(),
                    half_open: b.tripped.load(Ordering::Relaxed),
                };
                if b.spill_until_ms.load(Ordering::Relaxed) > now_ms {
                    spilling.push(c);
                } else {
                    plan.push(c);
                }
            }
        }
        // A backend near saturation serves only when the groups below cannot.
        plan.extend(spilling);
        if plan.is_empty() {
            let retry_after_ms = (first_reopen != u64::MAX).then(|| first_reopen - now_ms);
            return Err(Error::NoBackend { retry_after_ms });
        }
        Ok(plan)
    }

    /// When the first tripped backend of `model` reopens, from now (ms).
    pub fn reopen_in_ms(&self, model: &str, now_ms: u64) -> Option<u64> {
        let groups = self.pools.get(model)?;
        groups
            .iter()
            .flat_map(|g| g.members.iter())
            .map(|(i, _)| self.backends[*i].open_until_ms.load(Ordering::Relaxed))
            .filter(|u| *u > now_ms)
            .min()
            .map(|u| u - now_ms)
    }
}

/// A backend to try, in plan order.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub backend: Arc<Backend>,
    /// Its circuit is half-open: it may serve only as the trip's probe.
    pub half_open: bool,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml).unwrap()
    }

    const TWO_TIERS: &str = r#"
[[backends]]
name = "ptu"
url = "http://127.0.0.1:1/"
models = ["m"]
priority = 1
[[backends]]
name = "payg-a"
url = "http://127.0.0.1:2"
models = ["m"]
priority = 2
weight = 3
[[backends]]
name = "payg-b"
url = "http://127.0.0.1:3/v1"
api = "openai"
models = ["m"]
priority = 2
weight = 1
"#;

    /// The best priority group comes first; weights order the group; tripped backends drop out.
    #[test]
    fn priority_then_weight() {
        let r = Routes::from_config(&config(TWO_TIERS)).unwrap();
        let mut first_payg = HashMap::new();
        for _ in 0..4000 {
            let plan = r.plan("m", 1).unwrap();
            assert_eq!(&*plan[0].backend.name, "ptu");
            assert_eq!(plan.len(), 3);
            *first_payg
                .entry(plan[1].backend.name.to_string())
                .or_insert(0) += 1;
        }
        let a = first_payg["payg-a"] as f64 / 4000.0;
        assert!((0.70..0.80).contains(&a), "weight 3:1 gave {a}");
        r.backends[0].trip_until(10_000);
        let plan = r.plan("m", 5_000).unwrap();
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|c| c.backend.name.starts_with("payg")));
        r.backends[1].trip_until(20_000);
        r.backends[2].trip_until(15_000);
        match r.plan("m", 5_000) {
            Err(Error::NoBackend { retry_after_ms }) => assert_eq!(retry_after_ms, Some(5_000)),
            other => panic!("{:?}", other.map(|p| p.len())),
        }
        assert!(matches!(r.plan("x", 0), Err(Error::ModelNotFound(_))));
    }

    /// URLs follow each API's shape; a trailing /v1 in an OpenAI base is not doubled.
    #[test]
    fn urls() {
        use crate::request::Operation;
        let r = Routes::from_config(&config(TWO_TIERS)).unwrap();
        assert_eq!(
            r.backends[0].url(Operation::Chat, "dep", "2024-10-21"),
            "http://127.0.0.1:1/openai/deployments/dep/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            r.backends[2].url(Operation::Embeddings, "x", "v"),
            "http://127.0.0.1:3/v1/embeddings"
        );
    }
}

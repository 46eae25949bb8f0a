//! Which backend serves a request. A model's backends form priority groups (PTU = 1,
//! PAYG = 2, ...); the best group with an available backend serves, chosen by weight inside
//! the group; lower groups only when every backend above is tripped or has failed this request.
//! Routing reads circuit state from a local cache, so it costs no store call.

//!
//! - [`backend`]: a configured backend (URLs, credential, prices, limits).
//! - [`circuit`]: the one owner of a backend's circuit state on this replica.
//! - [`breaker`]: counting failures and sharing circuit changes through the store.

mod backend;
pub mod breaker;
pub mod circuit;

pub use backend::{Backend, PriceMicros, ResponseLimits};
pub use breaker::Breakers;
pub use circuit::{Circuit, CircuitState};

use crate::credentials::Credential;
use crate::error::Error;
use crate::secrets::Secrets;
use backend::price_micros;
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_common::config::{BackendApi, Config};

struct Group {
    members: Vec<(usize, u32)>,
}

/// Every backend, and per model the priority groups that serve it.
pub struct Routes {
    pub backends: Vec<Arc<Backend>>,
    pools: HashMap<String, Vec<Group>>,
    /// Per model, the highest input and output price among its backends: a request's cost is
    /// reserved at these, since the route is chosen after reserving.
    max_prices: HashMap<String, PriceMicros>,
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
                circuit: Circuit::default(),
                secrets: Arc::default(),
                limits: ResponseLimits {
                    max_response_bytes: config.server.max_response_bytes,
                    max_sse_event_bytes: config.server.max_sse_event_bytes,
                },
            };
            for model in &b.models {
                for op in crate::request::Operation::ALL {
                    let url = backend.url(op, backend.deployment(model), &b.api_version);
                    let parsed = http::Uri::try_from(url.as_str()).map_err(|e| {
                        anyhow::anyhow!("backends.{}: {url} is not a valid URL: {e}", b.name)
                    })?;
                    backend
                        .urls
                        .entry(op)
                        .or_default()
                        .insert(model.clone(), parsed);
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
        let mut max_prices: HashMap<String, PriceMicros> = HashMap::new();
        for model in config.models() {
            let mut max = PriceMicros::default();
            for b in backends.iter().filter(|b| b.config.models.contains(&model)) {
                max.input = max.input.max(b.price.input).max(b.price.cached_input);
                max.output = max.output.max(b.price.output);
            }
            max_prices.insert(model.clone(), max);
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
        Ok(Routes {
            backends,
            pools,
            max_prices,
        })
    }

    /// The most a request of `model` may cost (nano-units, rounded up): its tokens at the
    /// highest prices among the model's backends.
    pub fn max_cost_nano(&self, model: &str, input: u64, output: u64) -> u64 {
        let p = self.max_prices.get(model).copied().unwrap_or_default();
        let pico = input
            .saturating_mul(p.input)
            .saturating_add(output.saturating_mul(p.output));
        tollgate_quota::nano_from_pico(pico)
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
            let mut open: Vec<(usize, u32, bool)> = Vec::with_capacity(g.members.len());
            for &(i, w) in &g.members {
                match self.backends[i].circuit.state(now_ms) {
                    CircuitState::Open { until_ms } => first_reopen = first_reopen.min(until_ms),
                    CircuitState::HalfOpen => open.push((i, w, true)),
                    CircuitState::Closed => open.push((i, w, false)),
                }
            }
            // Weighted order without replacement.
            while !open.is_empty() {
                let total: u64 = open.iter().map(|(_, w, _)| *w as u64).sum();
                let mut pick = rng.random_range(0..total);
                let mut idx = 0;
                for (k, (_, w, _)) in open.iter().enumerate() {
                    if pick < *w as u64 {
                        idx = k;
                        break;
                    }
                    pick -= *w as u64;
                }
                let (i, _, half_open) = open.swap_remove(idx);
                let b = &self.backends[i];
                let c = Candidate {
                    backend: b.clone(),
                    half_open,
                };
                if b.circuit.spilling(now_ms) {
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
}

/// A backend to try, in plan order.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub backend: Arc<Backend>,
    /// Its circuit is half-open: it may serve only as the trip's probe.
    pub half_open: bool,
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
        r.backends[0].circuit.hold(10_000);
        let plan = r.plan("m", 5_000).unwrap();
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|c| c.backend.name.starts_with("payg")));
        r.backends[1].circuit.hold(20_000);
        r.backends[2].circuit.hold(15_000);
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

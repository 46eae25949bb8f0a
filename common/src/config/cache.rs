//! `[[cache]]`: answers kept for repeated (exact) and similar (semantic) prompts. The first
//! `[[cache]]` that matches a request, in file order, applies; see `docs/CACHE.md`.

use super::{ConfigError, valid_name_char};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Only a request identical after normalization hits.
    #[default]
    Exact,
    /// The exact layer first, then the nearest stored prompt in the partition.
    Semantic,
}

/// One `[[cache]]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub name: String,
    /// Models it applies to; empty = every chat, completions and responses model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Consumers it applies to; empty (and no `teams`) = everyone.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Teams it applies to; with `consumers`, a request matching either list applies.
    #[serde(default)]
    pub teams: Vec<String>,
    #[serde(default)]
    pub mode: CacheMode,
    /// Largest cosine distance (1 − cosine similarity) of a semantic hit: lower is stricter.
    #[serde(default = "default_threshold")]
    pub score_threshold: f64,
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    /// What splits the cache into partitions that never share entries: `consumer`, `team`,
    /// `model`, `header:<name>`. Default `["team"]`: teams never share answers.
    #[serde(default = "default_vary_by")]
    pub vary_by: Vec<String>,
    /// Semantic layer only: system messages are left out of the embedded text (they are always
    /// part of the exact key).
    #[serde(default)]
    pub ignore_system_messages: bool,
    /// Semantic layer only: how many of the last messages are embedded.
    #[serde(default = "default_max_messages")]
    pub max_message_count: usize,
    /// A `[[backends]]` name serving `/v1/embeddings` (semantic mode).
    #[serde(default)]
    pub embeddings_backend: Option<String>,
    #[serde(default)]
    pub embeddings_model: Option<String>,
    /// Entries kept per partition; the oldest is evicted first.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Entries kept in the whole cache (every partition); the oldest is evicted first.
    #[serde(default = "default_max_total")]
    pub max_total_entries: u64,
    /// A lookup slower than this is abandoned and the request bypasses the cache.
    #[serde(default = "default_lookup_timeout")]
    pub lookup_timeout_ms: u64,
    /// Requests carrying tools or tool results are cached only when set.
    #[serde(default)]
    pub cache_tools: bool,
    /// Requests with a `temperature` above this are not cached (their answers are meant to vary).
    #[serde(default = "default_max_temperature")]
    pub max_temperature: f64,
    /// A Redis of its own for this cache (a standalone one with the search module); default:
    /// the `[store]`.
    #[serde(default)]
    pub store_url: Option<String>,
}

fn default_threshold() -> f64 {
    0.05
}
fn default_ttl() -> u64 {
    3600
}
fn default_vary_by() -> Vec<String> {
    vec!["team".into()]
}
fn default_max_messages() -> usize {
    10
}
fn default_max_entries() -> u64 {
    10_000
}
fn default_max_total() -> u64 {
    1_000_000
}
fn default_lookup_timeout() -> u64 {
    50
}
fn default_max_temperature() -> f64 {
    0.7
}

/// One dimension a cache's partitions vary by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaryBy {
    Consumer,
    Team,
    Model,
    /// A request header, by its lowercase name.
    Header(String),
}

impl VaryBy {
    pub fn parse(s: &str) -> Option<VaryBy> {
        match s {
            "consumer" => Some(VaryBy::Consumer),
            "team" => Some(VaryBy::Team),
            "model" => Some(VaryBy::Model),
            _ => {
                let name = s.strip_prefix("header:")?.trim().to_ascii_lowercase();
                let ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
                ok.then_some(VaryBy::Header(name))
            }
        }
    }

    /// The label of this dimension in a partition's description (`team`, `header:x-tenant`).
    pub fn label(&self) -> String {
        match self {
            VaryBy::Consumer => "consumer".into(),
            VaryBy::Team => "team".into(),
            VaryBy::Model => "model".into(),
            VaryBy::Header(h) => format!("header:{h}"),
        }
    }
}

impl CacheConfig {
    /// The parsed `vary_by` (validated at load, so nothing is dropped here).
    pub fn vary(&self) -> Vec<VaryBy> {
        self.vary_by
            .iter()
            .filter_map(|s| VaryBy::parse(s))
            .collect()
    }

    pub(super) fn check(
        &self,
        i: usize,
        backends: &[super::BackendConfig],
    ) -> Result<(), ConfigError> {
        let at = |k: &str| format!("cache[{i}].{k}");
        if self.name.is_empty() || !self.name.chars().all(valid_name_char) {
            return Err(ConfigError::new(
                at("name"),
                "use letters, digits, '-', '_', '.'",
            ));
        }
        if !self.score_threshold.is_finite() || !(0.0..=2.0).contains(&self.score_threshold) {
            return Err(ConfigError::new(
                at("score_threshold"),
                "a cosine distance within 0..2 (lower is stricter)",
            ));
        }
        if !self.max_temperature.is_finite() || self.max_temperature < 0.0 {
            return Err(ConfigError::new(
                at("max_temperature"),
                "must be a finite number >= 0",
            ));
        }
        for (k, v) in [
            ("ttl_s", self.ttl_s),
            ("max_entries", self.max_entries),
            ("max_total_entries", self.max_total_entries),
            ("lookup_timeout_ms", self.lookup_timeout_ms),
            ("max_message_count", self.max_message_count as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::new(at(k), "must be > 0"));
            }
        }
        if self.ttl_s > 366 * 86_400 {
            return Err(ConfigError::new(at("ttl_s"), "at most a year"));
        }
        for (k, v) in self.vary_by.iter().enumerate() {
            if VaryBy::parse(v).is_none() {
                return Err(ConfigError::new(
                    format!("cache[{i}].vary_by[{k}]"),
                    format!(
                        "{v:?}: expected \"consumer\", \"team\", \"model\" or \"header:<name>\""
                    ),
                ));
            }
        }
        if let Some(u) = &self.store_url
            && !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("redis+unix://")
                || u.starts_with("unix://"))
        {
            return Err(ConfigError::new(
                at("store_url"),
                "expected redis://, rediss:// or redis+unix:// URL",
            ));
        }
        match (&self.embeddings_backend, self.mode) {
            (None, CacheMode::Semantic) => {
                return Err(ConfigError::new(
                    at("embeddings_backend"),
                    "semantic mode needs a [[backends]] name serving /v1/embeddings",
                ));
            }
            (Some(b), _) => {
                let Some(backend) = backends.iter().find(|x| &x.name == b) else {
                    return Err(ConfigError::new(
                        at("embeddings_backend"),
                        format!("no [[backends]] is named {b:?}"),
                    ));
                };
                match &self.embeddings_model {
                    None => {
                        return Err(ConfigError::new(
                            at("embeddings_model"),
                            "semantic mode needs the embeddings model to ask for",
                        ));
                    }
                    Some(m) if !backend.models.contains(m) => {
                        return Err(ConfigError::new(
                            at("embeddings_model"),
                            format!("backend {b:?} does not serve {m:?}"),
                        ));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

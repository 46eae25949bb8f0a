//! The configuration schema (TOML). One struct per section, unknown keys rejected, explicit
//! defaults, and [`Config::validate`] run once at load so the rest of the code can trust it.
//! [`Config::from_toml`] reports the offending key by its path (`backends[1].breaker.failures`).
//!
//! - [`server`]: `[server]`; [`store`]: `[store]`, `[limits]`, `[[consumers]]`;
//!   [`backend`]: `[[backends]]`; [`cache`]: `[[cache]]`; [`auth`]: `[auth]`, `[auth.jwt]`;
//!   [`telemetry`]: `[telemetry]`; [`money`]: `[pricing]`, `[[teams]]`, `[[alerts]]`;
//!   [`mcp`]: `[[mcp_servers]]`, `[mcp]`;
//!   [`validate`]: the checks serde cannot make.

mod auth;
mod backend;
mod cache;
mod mcp;
mod money;
mod server;
mod store;
mod telemetry;
mod validate;

pub use auth::*;
pub use backend::*;
pub use cache::*;
pub use mcp::*;
pub use money::*;
pub use server::*;
pub use store::*;
pub use telemetry::*;

use crate::secret::Secret;
use serde::Deserialize;
/// A configuration error that names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `backends[0].url`.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[[cache]]`, in file order: the first that matches a request applies.
    #[serde(default)]
    pub cache: Vec<CacheConfig>,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub teams: Vec<TeamConfig>,
    #[serde(default)]
    pub alerts: Vec<AlertConfig>,
    /// `[[mcp_servers]]`: the MCP servers behind `/mcp` and `/mcp/{server}`.
    #[serde(default)]
    pub mcp_servers: Vec<McpServerConfig>,
    #[serde(default)]
    pub mcp: McpConfig,
}

impl Config {
    /// Parses and validates a TOML document. Errors name the offending key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("(document)", e.to_string().trim().to_string()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::new(path, inner.message().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Every model some backend serves, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .backends
            .iter()
            .flat_map(|b| b.models.iter().cloned())
            .collect();
        m.sort();
        m.dedup();
        m
    }
}

/// The longest a circuit may stay open in one trip (`breaker.trip_ms`,
/// `breaker.max_retry_after_ms`); the store enforces the same bound.
pub const MAX_TRIP_MS: u64 = 86_400_000;

/// Most client connections `server.max_connections` may allow.
pub const MAX_CONNECTIONS: usize = 1_000_000;

pub(crate) fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')
}

/// Reads a secret from the environment, naming the variable (not the value) when it is missing.
pub fn secret_from_env(var: &str) -> Result<Secret, String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
        _ => Err(format!("environment variable {var} is not set")),
    }
}

#[cfg(test)]
mod tests;

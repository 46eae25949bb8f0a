//! `[[mcp_servers]]` and `[mcp]`: the MCP servers the gateway fronts, and how MCP sessions are
//! kept. A consumer's MCP fields (`mcp_tools`, `tool_calls_per_min`, `tool_calls_quota`) live in
//! [`ConsumerConfig`](super::ConsumerConfig); the JWT ones (`tools_claim`, `mcp_audience`) in
//! [`JwtConfig`](super::JwtConfig).

use super::{BackendAuth, Config, ConfigError};
use serde::Deserialize;
use std::collections::HashSet;

/// One upstream MCP server over streamable HTTP.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// The `{server}` of `/mcp/{server}` and the prefix of its tools on `/mcp` (`name__tool`).
    pub name: String,
    /// The server's MCP endpoint, e.g. `http://127.0.0.1:9100/mcp`.
    pub url: String,
    /// The credential the gateway sends it (the client's never is).
    #[serde(default)]
    pub auth: BackendAuth,
    /// Which of its tools are exposed at all (globs on the tool name).
    #[serde(default = "all_tools")]
    pub tools: Vec<String>,
    /// The longest one exchange with it may take (a call, a list, an initialize).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn all_tools() -> Vec<String> {
    vec!["*".into()]
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// `[mcp]`: sessions and the HTTP checks of the MCP routes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// An environment variable holding the key that seals session ids (any string; it is
    /// hashed to 32 bytes). Every replica needs the same one for sessions to move between
    /// them; unset = a random key per process (a warning says so).
    pub session_key_env: Option<String>,
    /// Origins allowed besides the request's own host and localhost (`https://app.example`).
    pub allowed_origins: Vec<String>,
    /// The largest JSON-RPC message accepted from a client.
    pub max_message_bytes: usize,
    /// How long a session id stays valid after `initialize`.
    pub session_ttl_s: u64,
    /// The public URL of `/mcp` (the protected resource in OAuth metadata); unset = derived
    /// from the request's `Host` (and `X-Forwarded-Proto`).
    pub resource_url: Option<String>,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            session_key_env: None,
            allowed_origins: Vec::new(),
            max_message_bytes: 4 * 1024 * 1024,
            session_ttl_s: 86_400,
            resource_url: None,
        }
    }
}

impl Config {
    /// The checks of `[[mcp_servers]]`, `[mcp]` and the consumers' MCP fields.
    pub(crate) fn validate_mcp(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, s) in self.mcp_servers.iter().enumerate() {
            let at = |k: &str| format!("mcp_servers[{i}].{k}");
            let ok = !s.name.is_empty()
                && !s.name.contains("__")
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
            if !ok {
                return Err(ConfigError::new(
                    at("name"),
                    "use letters, digits, '-' and '_' (not \"__\", which separates server and tool on /mcp)",
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("duplicate MCP server {:?}", s.name),
                ));
            }
            let parsed = s.url.parse::<http::Uri>().ok();
            if !parsed.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            }) {
                return Err(ConfigError::new(
                    at("url"),
                    "expected an http:// or https:// URL",
                ));
            }
            if parsed.is_some_and(|u| u.authority().is_some_and(|a| a.as_str().contains('@'))) {
                return Err(ConfigError::new(
                    at("url"),
                    "credentials in the URL are not allowed; use `auth`",
                ));
            }
            if s.timeout_ms == 0 {
                return Err(ConfigError::new(at("timeout_ms"), "must be > 0"));
            }
            if s.tools.iter().any(|t| t.is_empty()) {
                return Err(ConfigError::new(at("tools"), "empty pattern"));
            }
        }
        for (i, c) in self.consumers.iter().enumerate() {
            for (k, p) in c.mcp_tools.iter().enumerate() {
                if !p.contains('.') {
                    return Err(ConfigError::new(
                        format!("consumers[{i}].mcp_tools[{k}]"),
                        format!("{p:?}: expected server.tool (globs allowed, e.g. \"tickets.*\")"),
                    ));
                }
            }
        }
        if self.mcp.max_message_bytes == 0 {
            return Err(ConfigError::new("mcp.max_message_bytes", "must be > 0"));
        }
        if self.mcp.session_ttl_s == 0 {
            return Err(ConfigError::new("mcp.session_ttl_s", "must be > 0"));
        }
        Ok(())
    }
}

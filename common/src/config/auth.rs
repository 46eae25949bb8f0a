//! `[auth]` and `[auth.jwt]`: how callers authenticate.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    #[default]
    Key,
    Jwt,
    KeyAndJwt,
    KeyOrJwt,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub mode: AuthMode,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    #[serde(default)]
    pub team_claim: Option<String>,
    /// Claims every token must carry, with the value they must have (or contain, for arrays).
    #[serde(default)]
    pub required_claims: BTreeMap<String, String>,
    /// Extra claims required per model (e.g. a role).
    #[serde(default)]
    pub model_claims: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// A claim listing the MCP tools (`server.tool` globs) of callers without a consumer record.
    #[serde(default)]
    pub tools_claim: Option<String>,
    /// An audience accepted on the MCP routes only (MCP clients ask for tokens whose audience
    /// is the `/mcp` URL).
    #[serde(default)]
    pub mcp_audience: Option<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "PS256".into()]
}

fn default_consumer_claim() -> String {
    "azp".into()
}

fn default_leeway() -> u64 {
    60
}

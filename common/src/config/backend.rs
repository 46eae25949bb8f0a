//! `[[backends]]`: where models are served, with what credential, price, breaker and timeouts.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendApi {
    /// Azure OpenAI: `/openai/deployments/{deployment}/...?api-version=`, `api-key` header.
    #[default]
    Azure,
    /// OpenAI and every OpenAI-compatible server: `/v1/...`, model in the body.
    Openai,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub api: BackendApi,
    pub models: Vec<String>,
    /// This backend's own deployment (or model) name per model, when it differs.
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub auth: BackendAuth,
    #[serde(default)]
    pub price: Price,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// `api-version` sent to an Azure backend when the client gave none.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Send new requests to the next group once this backend reports a deployment
    /// utilization (0..1) above this.
    #[serde(default)]
    pub spill_utilization: Option<f64>,
    /// A provisioned backend's fixed price per month: `tollgate usage` allocates it (prorated
    /// by days) to the teams by their share of its tokens. Such a backend is a PTU in reports.
    #[serde(default)]
    pub monthly_cost: Option<f64>,
    /// The tokens per minute the PTU was sized for: reports show its utilization.
    #[serde(default)]
    pub capacity_tpm: Option<u64>,
}

fn one() -> u32 {
    1
}

fn default_api_version() -> String {
    "2024-10-21".into()
}

/// A backend's credential, injected by the gateway. Secrets come from environment variables.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendAuth {
    #[default]
    None,
    ApiKey {
        key_env: String,
        /// The header the key is sent in; unset = the backend's usual one (`api-key` for
        /// Azure and MCP servers, `Authorization: Bearer` for OpenAI-style backends).
        #[serde(default)]
        header: Option<String>,
    },
    Bearer {
        token_env: String,
    },
    Oauth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret_env: String,
        #[serde(default)]
        scope: Option<String>,
    },
    AzureManagedIdentity {
        #[serde(default = "default_imds")]
        endpoint: String,
        #[serde(default = "default_resource")]
        resource: String,
        #[serde(default)]
        client_id: Option<String>,
    },
}

fn default_imds() -> String {
    "http://169.254.169.254/metadata/identity/oauth2/token".into()
}

fn default_resource() -> String {
    "https://cognitiveservices.azure.com".into()
}

/// Prices in currency units per one million tokens.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Price {
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    /// Price for cached prompt tokens; defaults to `input_per_1m`.
    pub cached_input_per_1m: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub failures: u32,
    pub window_ms: u64,
    pub trip_ms: u64,
    pub statuses: Vec<u16>,
    /// Trip for exactly the backend's `retry-after(-ms)` on a 429.
    pub accept_retry_after: bool,
    /// The longest `retry-after(-ms)` believed: a longer one trips for this long.
    pub max_retry_after_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            window_ms: 10_000,
            trip_ms: 30_000,
            statuses: vec![429, 500, 502, 503, 504],
            accept_retry_after: true,
            max_retry_after_ms: 300_000,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub connect_ms: u64,
    /// Until the response headers arrive.
    pub first_byte_ms: u64,
    /// Longest silence between two chunks of a response body.
    pub idle_ms: u64,
    /// Longest a whole response may take, from sending the request to its last byte.
    pub max_response_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 2_000,
            first_byte_ms: 60_000,
            idle_ms: 60_000,
            max_response_ms: 600_000,
        }
    }
}

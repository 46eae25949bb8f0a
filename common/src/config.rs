//! The configuration schema (TOML). One struct per section, unknown keys rejected, explicit
//! defaults, and [`Config::validate`] run once at load so the rest of the code can trust it.
//! [`Config::from_toml`] reports the offending key by its path (`backends[1].breaker.failures`).

use crate::secret::Secret;
use crate::types::Period;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};

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
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    /// Adds `x-tollgate-backend` and `x-tollgate-consumer` to responses.
    pub debug_headers: bool,
    /// How long SIGTERM waits for in-flight requests (streams included) before exiting.
    pub shutdown_grace_ms: u64,
    /// A request's head must arrive within this long of the connection opening or of its
    /// first byte (a client trickling headers is cut off).
    pub header_timeout_ms: u64,
    /// A request's body must arrive within this long of its head (else 408).
    pub body_timeout_ms: u64,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout_ms: u64,
    /// Most client connections open at once; lowered at start-up when the process's
    /// file-descriptor limit could not hold them and their backend connections.
    pub max_connections: usize,
    /// Longest server-sent event accepted from a backend; a longer one ends the stream with an
    /// error event.
    pub max_sse_event_bytes: usize,
    /// Most bytes of one backend response passed to a client.
    pub max_response_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            debug_headers: false,
            shutdown_grace_ms: 30_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            max_sse_event_bytes: 1024 * 1024,
            max_response_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

/// What a replica does while the shared store is unreachable or too slow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Spend only allowances obtained from the store before the fault (leases, already
    /// debited), else answer 503: never more than the limits plus one request per replica.
    #[default]
    Escrow,
    /// Keep enforcing with a per-replica bucket (limit divided by live replicas): available,
    /// but it may over-admit when only some replicas lose the store.
    Local,
    FailOpen,
    FailClosed,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `redis://host:port/db` or `redis+unix:///path.sock`; `TOLLGATE_REDIS_URL` overrides.
    pub url: String,
    pub on_error: OnError,
    /// A store command slower than this counts as a store failure.
    pub timeout_ms: u64,
    pub pool_size: usize,
    /// Days that daily usage totals are kept.
    pub usage_retention_days: u64,
    /// A replica degraded for longer than this logs at error level once a minute.
    pub max_degraded_ms: u64,
    /// `/readyz` answers 503 once a replica has been degraded for `max_degraded_ms`, so a load
    /// balancer sends its traffic elsewhere.
    pub unready_when_degraded: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            url: "redis://127.0.0.1:6379".into(),
            on_error: OnError::Escrow,
            timeout_ms: 50,
            pool_size: 4,
            usage_retention_days: 400,
            max_degraded_ms: 30_000,
            unready_when_degraded: false,
        }
    }
}

/// How requests are estimated and how unknown (JWT-only) consumers are limited.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Completion tokens reserved when a request sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// Tokens per minute for a consumer that has no limit of its own (none = unlimited).
    pub default_tpm: Option<u64>,
    /// Period quota for a consumer that has none of its own (none = unlimited).
    pub default_quota: Option<u64>,
    pub default_quota_period: Period,
    /// How long a key → consumer lookup is cached on a replica (revocation delay).
    pub key_cache_ms: u64,
    /// Busy consumers' tokens are leased to a replica in slices (debited in Redis first, at most
    /// 250 ms old), so most of their requests skip the store round trip.
    pub lease: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_max_tokens: 1024,
            default_tpm: None,
            default_quota: None,
            default_quota_period: Period::Month,
            key_cache_ms: 1000,
            lease: true,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub id: String,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub quota: Option<u64>,
    #[serde(default)]
    pub quota_period: Period,
    /// Models this consumer may use; empty = all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub key_sha256: Vec<String>,
    /// Name of an environment variable holding a plain key (hashed at start-up).
    #[serde(default)]
    pub key_env: Option<String>,
    #[serde(default)]
    pub disabled: bool,
}

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

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP protobuf endpoint; unset = export off.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "tollgate".into(),
        }
    }
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

    /// Checks everything serde cannot: references, ranges, uniqueness, URL shapes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new("server.listen", "expected IP:PORT"));
        }
        for (k, v) in [
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
            ("server.max_connections", self.server.max_connections as u64),
            (
                "server.max_sse_event_bytes",
                self.server.max_sse_event_bytes as u64,
            ),
            ("server.max_response_bytes", self.server.max_response_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::new(k, "must be > 0"));
            }
        }
        if self.server.max_connections > MAX_CONNECTIONS {
            return Err(ConfigError::new(
                "server.max_connections",
                format!("at most {MAX_CONNECTIONS}"),
            ));
        }
        if self.store.kind == StoreKind::Redis
            && !(self.store.url.starts_with("redis://")
                || self.store.url.starts_with("rediss://")
                || self.store.url.starts_with("redis+unix://")
                || self.store.url.starts_with("unix://"))
        {
            return Err(ConfigError::new(
                "store.url",
                "expected redis://, rediss:// or redis+unix:// URL",
            ));
        }
        if self.store.timeout_ms == 0 {
            return Err(ConfigError::new("store.timeout_ms", "must be > 0"));
        }
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let at = |k: &str| format!("backends[{i}].{k}");
            if b.name.is_empty() || !b.name.chars().all(valid_name_char) {
                return Err(ConfigError::new(
                    at("name"),
                    "use letters, digits, '-', '_', '.'",
                ));
            }
            if !names.insert(b.name.as_str()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("duplicate backend {:?}", b.name),
                ));
            }
            if !(b.url.starts_with("http://") || b.url.starts_with("https://")) || b.url.len() < 10
            {
                return Err(ConfigError::new(
                    at("url"),
                    "expected an http:// or https:// URL",
                ));
            }
            if let Some(problem) = url_problem(&b.url) {
                return Err(ConfigError::new(at("url"), problem));
            }
            if b.models.is_empty() {
                return Err(ConfigError::new(at("models"), "list at least one model"));
            }
            for m in b.deployments.keys() {
                if !b.models.contains(m) {
                    return Err(ConfigError::new(
                        at("deployments"),
                        format!("{m:?} is not in this backend's models"),
                    ));
                }
            }
            if b.weight == 0 {
                return Err(ConfigError::new(at("weight"), "must be > 0"));
            }
            if b.breaker.failures == 0 {
                return Err(ConfigError::new(at("breaker.failures"), "must be > 0"));
            }
            if b.breaker.trip_ms > MAX_TRIP_MS {
                return Err(ConfigError::new(
                    at("breaker.trip_ms"),
                    format!("at most {MAX_TRIP_MS} (a day)"),
                ));
            }
            if b.breaker.max_retry_after_ms == 0 || b.breaker.max_retry_after_ms > MAX_TRIP_MS {
                return Err(ConfigError::new(
                    at("breaker.max_retry_after_ms"),
                    format!("must be within 1..={MAX_TRIP_MS} (a day)"),
                ));
            }
            if b.breaker.statuses.iter().any(|s| !(100..=599).contains(s)) {
                return Err(ConfigError::new(
                    at("breaker.statuses"),
                    "HTTP statuses are 100..599",
                ));
            }
            for (k, v) in [
                ("price.input_per_1m", b.price.input_per_1m),
                ("price.output_per_1m", b.price.output_per_1m),
                (
                    "price.cached_input_per_1m",
                    b.price.cached_input_per_1m.unwrap_or(0.0),
                ),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(ConfigError::new(at(k), "must be a finite number >= 0"));
                }
            }
            if let Some(u) = b.spill_utilization
                && !(0.0..=1.0).contains(&u)
            {
                return Err(ConfigError::new(
                    at("spill_utilization"),
                    "must be within 0..1",
                ));
            }
            if b.timeouts.connect_ms == 0
                || b.timeouts.first_byte_ms == 0
                || b.timeouts.idle_ms == 0
                || b.timeouts.max_response_ms == 0
            {
                return Err(ConfigError::new(at("timeouts"), "timeouts must be > 0"));
            }
        }
        let served = self.models();
        let mut ids = HashSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let at = |k: &str| format!("consumers[{i}].{k}");
            if c.id.is_empty() || !c.id.chars().all(valid_name_char) {
                return Err(ConfigError::new(
                    at("id"),
                    "use letters, digits, '-', '_', '.'",
                ));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(ConfigError::new(
                    at("id"),
                    format!("duplicate consumer {:?}", c.id),
                ));
            }
            for (k, m) in c.models.iter().enumerate() {
                if !served.contains(m) {
                    return Err(ConfigError::new(
                        format!("consumers[{i}].models[{k}]"),
                        format!("no backend serves {m:?}"),
                    ));
                }
            }
            for (k, h) in c.key_sha256.iter().enumerate() {
                if h.len() != 64 || !h.chars().all(|ch| ch.is_ascii_hexdigit()) {
                    return Err(ConfigError::new(
                        format!("consumers[{i}].key_sha256[{k}]"),
                        "expected 64 hex characters (sha256 of the key)",
                    ));
                }
            }
        }
        let needs_jwt = matches!(
            self.auth.mode,
            AuthMode::Jwt | AuthMode::KeyAndJwt | AuthMode::KeyOrJwt
        );
        match (&self.auth.jwt, needs_jwt) {
            (None, true) => {
                return Err(ConfigError::new("auth.jwt", "required by this auth.mode"));
            }
            (Some(j), _) => {
                if j.jwks_url.is_none() && j.jwks_file.is_none() {
                    return Err(ConfigError::new(
                        "auth.jwt.jwks_url",
                        "set jwks_url or jwks_file",
                    ));
                }
                const KNOWN: [&str; 9] = [
                    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
                ];
                for a in &j.algorithms {
                    if !KNOWN.contains(&a.as_str()) {
                        return Err(ConfigError::new(
                            "auth.jwt.algorithms",
                            format!("{a:?} is not an asymmetric algorithm tollgate accepts"),
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(())
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

/// Why a backend URL cannot be a base the gateway appends paths to: credentials in it (they
/// would be sent, and logged, as part of the URL), or a query or fragment (the appended path
/// would land inside it).
fn url_problem(url: &str) -> Option<&'static str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Some("credentials in the URL are not allowed; use `auth`");
    }
    if authority.is_empty() {
        return Some("expected a host");
    }
    if url.contains('#') {
        return Some("a URL fragment (#...) is not allowed");
    }
    if url.contains('?') {
        return Some("a query string (?...) is not allowed; the gateway builds the path and query");
    }
    None
}

fn valid_name_char(c: char) -> bool {
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
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
[[consumers]]
id = "team-a"
key_sha256 = ["ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]
[[backends]]
name = "ptu-1"
url = "http://127.0.0.1:9001"
models = ["gpt-4o"]
deployments = { "gpt-4o" = "gpt4o-ptu" }
auth = { type = "api_key", key_env = "PTU_KEY" }
breaker = { failures = 3, window_ms = 10000, trip_ms = 30000, statuses = [429, 500], accept_retry_after = true }
"#;

    /// A full config parses with its defaults filled in.
    #[test]
    fn parses_a_good_config() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.backends[0].priority, 1);
        assert_eq!(c.backends[0].deployments["gpt-4o"], "gpt4o-ptu");
        assert!(matches!(c.backends[0].auth, BackendAuth::ApiKey { .. }));
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
    }

    /// A typo is an error that names the key's path.
    #[test]
    fn unknown_key_is_named() {
        let bad = GOOD.replace("failures = 3", "failures = 3, falures = 2");
        let e = Config::from_toml(&bad).unwrap_err();
        assert_eq!(e.path, "backends[0].breaker.falures");
        assert!(e.message.contains("falures"), "{e}");
        let e = Config::from_toml("[server]\nlisten_addr = \"x\"").unwrap_err();
        assert!(e.message.contains("listen_addr"), "{e}");
    }

    /// Bad values name their key.
    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml(&GOOD.replace("\"127.0.0.1:0\"", "\"nope\"")).unwrap_err();
        assert_eq!(e.path, "server.listen");
        let e = Config::from_toml(&GOOD.replace("[429, 500]", "[429, 900]")).unwrap_err();
        assert_eq!(e.path, "backends[0].breaker.statuses");
        let e = Config::from_toml(&GOOD.replace("\"api_key\"", "\"magic\"")).unwrap_err();
        assert!(e.path.starts_with("backends[0].auth"), "{e}");
        let e = Config::from_toml(&GOOD.replace("ba7816", "zz7816")).unwrap_err();
        assert_eq!(e.path, "consumers[0].key_sha256[0]");
        let e = Config::from_toml(&GOOD.replace("weight = 1", "")).map(|_| ());
        assert!(e.is_ok());
        let e = Config::from_toml(&format!("{GOOD}weight = 0\n")).unwrap_err();
        assert_eq!(e.path, "backends[0].weight");
    }

    /// A backend URL is a base for paths: no credentials, query or fragment in it.
    #[test]
    fn backend_url_is_a_plain_base() {
        for bad in [
            "http://user:pw@127.0.0.1:9001",
            "http://key@127.0.0.1:9001/",
            "http://127.0.0.1:9001/#frag",
            "http://127.0.0.1:9001/x?a=1",
            "http:///nohost/path",
        ] {
            let e = Config::from_toml(&GOOD.replace("http://127.0.0.1:9001", bad)).unwrap_err();
            assert_eq!(e.path, "backends[0].url", "{bad}: {e}");
            assert!(!e.message.contains("pw"), "{e}");
        }
        let ok = GOOD.replace("http://127.0.0.1:9001", "https://a.example.com/base/v1/");
        assert!(Config::from_toml(&ok).is_ok());
    }

    /// A consumer's models must be served by some backend: a typo denies nothing silently.
    #[test]
    fn consumer_models_must_be_served() {
        let bad = GOOD.replace(
            "id = \"team-a\"",
            "id = \"team-a\"\nmodels = [\"gpt-4o\", \"gpt4o\"]",
        );
        let e = Config::from_toml(&bad).unwrap_err();
        assert_eq!(e.path, "consumers[0].models[1]");
    }

    /// The hardening limits have their documented defaults and refuse 0 or unbounded values.
    #[test]
    fn hardening_defaults_and_bounds() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.server.header_timeout_ms, 10_000);
        assert_eq!(c.server.body_timeout_ms, 30_000);
        assert_eq!(c.server.idle_timeout_ms, 60_000);
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.max_sse_event_bytes, 1024 * 1024);
        assert_eq!(c.server.max_response_bytes, 256 * 1024 * 1024);
        assert_eq!(c.backends[0].breaker.max_retry_after_ms, 300_000);
        assert_eq!(c.backends[0].timeouts.max_response_ms, 600_000);
        let e = Config::from_toml(&GOOD.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nheader_timeout_ms = 0",
        ))
        .unwrap_err();
        assert_eq!(e.path, "server.header_timeout_ms");
        let e = Config::from_toml(&GOOD.replace(
            "accept_retry_after = true",
            "accept_retry_after = true, max_retry_after_ms = 999999999999",
        ))
        .unwrap_err();
        assert_eq!(e.path, "backends[0].breaker.max_retry_after_ms");
    }
}

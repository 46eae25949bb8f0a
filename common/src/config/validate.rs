//! The checks serde cannot make: references, ranges, uniqueness, URL shapes. Each error names
//! the key at fault.

use super::*;
use std::collections::HashSet;

impl Config {
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
        self.store.validate()?;
        self.telemetry.validate()?;
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
                ("monthly_cost", b.monthly_cost.unwrap_or(0.0)),
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
            if b.capacity_tpm == Some(0) {
                return Err(ConfigError::new(at("capacity_tpm"), "must be > 0"));
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
        let mut caches = HashSet::new();
        for (i, c) in self.cache.iter().enumerate() {
            c.check(i, &self.backends)?;
            // The cache speaks to one server (its vector index lives on one node): on a
            // cluster or behind sentinels it needs a server of its own.
            if c.store_url.is_none()
                && matches!(
                    self.store.kind,
                    StoreKind::RedisCluster | StoreKind::RedisSentinel
                )
            {
                return Err(ConfigError::new(
                    format!("cache[{i}].store_url"),
                    format!(
                        "with store.kind = {:?} a cache needs a store_url of one Redis server \
                         (the cache does not run on a cluster or through sentinels yet)",
                        self.store.kind.as_str()
                    ),
                ));
            }
            if !caches.insert(c.name.as_str()) {
                return Err(ConfigError::new(
                    format!("cache[{i}].name"),
                    format!("duplicate cache {:?}", c.name),
                ));
            }
        }
        self.validate_mcp()?;
        self.validate_money()
    }
}

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

//! `[telemetry]`: OTLP export, and the dimensions beyond the consumer that usage is broken
//! down by (the end user, an application header, a JWT claim).

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP protobuf endpoint; unset = export off.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Where each dimension's value comes from: `body:FIELD` (a top-level string field of the
    /// request, such as OpenAI's `user`), `header:NAME`, `jwt:CLAIM`; optionally named,
    /// `name=source`. Unnamed, `body:user`, `header:x-user-id` and `jwt:sub` are the `user`
    /// dimension (the first present wins) and any other source is named after its key.
    pub dimensions: Vec<String>,
    /// Distinct values kept per dimension, consumer and day; later ones count as `other`, so a
    /// client sending random values cannot grow Redis without bound.
    pub dimension_cap: u32,
    /// Days the per-dimension usage totals are kept.
    pub dimension_retention_days: u32,
    /// Dimension names that may also be Prometheus labels (their cardinality is unbounded
    /// otherwise; the cap applies per replica).
    pub prometheus_dimensions: Vec<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "tollgate".into(),
            dimensions: Vec::new(),
            dimension_cap: 1000,
            dimension_retention_days: 90,
            prometheus_dimensions: Vec::new(),
        }
    }
}

/// Where a dimension's value is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimensionFrom {
    /// A top-level string (or number) field of the JSON request body.
    Body(String),
    /// A request header (lower case).
    Header(String),
    /// A claim of the caller's validated JWT.
    Jwt(String),
}

/// One configured source of a dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimensionSource {
    pub name: String,
    pub from: DimensionFrom,
}

/// Sources that are the end user unless named otherwise.
const USER_SOURCES: [&str; 3] = ["body:user", "header:x-user-id", "jwt:sub"];

impl DimensionSource {
    /// Parses `[name=]kind:key`; the error says what is wrong.
    pub fn parse(spec: &str) -> Result<DimensionSource, String> {
        let (name, source) = match spec.split_once('=') {
            Some((n, s)) => (Some(n.trim()), s.trim()),
            None => (None, spec.trim()),
        };
        let (kind, key) = source
            .split_once(':')
            .ok_or_else(|| format!("{spec:?}: expected body:FIELD, header:NAME or jwt:CLAIM"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{spec:?}: the key after {kind:?} is empty"));
        }
        let from = match kind.trim() {
            "body" => DimensionFrom::Body(key.to_string()),
            "header" => DimensionFrom::Header(key.to_ascii_lowercase()),
            "jwt" => DimensionFrom::Jwt(key.to_string()),
            k => {
                return Err(format!(
                    "{spec:?}: unknown source {k:?} (body, header or jwt)"
                ));
            }
        };
        let name = match name {
            Some(n) => n.to_string(),
            None if USER_SOURCES.contains(&source.to_ascii_lowercase().as_str()) => "user".into(),
            None => key.to_ascii_lowercase(),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
        if name.is_empty() || name.len() > 40 || !name.chars().all(valid) {
            return Err(format!(
                "{spec:?}: a dimension name is 1-40 of [A-Za-z0-9._-], got {name:?}"
            ));
        }
        Ok(DimensionSource { name, from })
    }
}

impl TelemetryConfig {
    /// The parsed `dimensions` (validated at start-up, so this does not fail then).
    pub fn dimension_sources(&self) -> Result<Vec<DimensionSource>, String> {
        self.dimensions
            .iter()
            .map(|d| DimensionSource::parse(d))
            .collect()
    }

    /// The distinct dimension names, in the order they are first configured.
    pub fn dimension_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for s in self.dimension_sources().unwrap_or_default() {
            if !names.contains(&s.name) {
                names.push(s.name);
            }
        }
        names
    }
}

//! `[telemetry]`: OTLP export, and the dimensions usage is broken down by beyond the consumer
//! (`dimensions`: the end user, the calling app), their retention, their cap and the few
//! allowed on Prometheus.

use super::{ConfigError, valid_name_char};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP protobuf endpoint; unset = export off.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Where each dimension's value comes from: `body:FIELD`, `header:NAME`, `jwt:CLAIM`, or
    /// `name=source` to name it. `body:user`, `header:x-user-id` and `jwt:sub` are all the
    /// dimension `user` (the first present wins); others are named after their field.
    pub dimensions: Vec<String>,
    /// How long the per-dimension usage rows (`tg:dims:{ID}:YYYYMMDD`) are kept.
    pub dimension_retention_days: u32,
    /// Distinct values kept per dimension, consumer and day; later ones count as `other`, so a
    /// client sending random user ids cannot grow Redis without bound.
    pub dimension_cap: u32,
    /// Dimensions allowed as Prometheus labels (each bounded by `dimension_cap`, then `other`).
    pub prometheus_dimensions: Vec<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "tollgate".into(),
            dimensions: Vec::new(),
            dimension_retention_days: 35,
            dimension_cap: 1000,
            prometheus_dimensions: Vec::new(),
        }
    }
}

/// Where a dimension's value is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimensionSource {
    /// A top-level field of the JSON request body (a string or a number).
    Body(String),
    /// A request header (name lowercased).
    Header(String),
    /// A claim of the caller's validated JWT.
    Jwt(String),
}

/// One `[telemetry] dimensions` entry, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dimension {
    pub name: String,
    pub source: DimensionSource,
}

/// The sources that all mean the end user: the dimension `user`.
const USER_SOURCES: [&str; 3] = ["body:user", "header:x-user-id", "jwt:sub"];

impl TelemetryConfig {
    /// The configured dimensions, in order (several may share a name: the first present wins).
    pub fn parsed_dimensions(&self) -> Result<Vec<Dimension>, ConfigError> {
        self.dimensions
            .iter()
            .enumerate()
            .map(|(i, d)| {
                parse_dimension(d)
                    .map_err(|m| ConfigError::new(format!("telemetry.dimensions[{i}]"), m))
            })
            .collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let dims = self.parsed_dimensions()?;
        if self.dimension_cap == 0 {
            return Err(ConfigError::new("telemetry.dimension_cap", "must be > 0"));
        }
        if !self.dimensions.is_empty() && self.dimension_retention_days == 0 {
            return Err(ConfigError::new(
                "telemetry.dimension_retention_days",
                "must be > 0",
            ));
        }
        for (i, p) in self.prometheus_dimensions.iter().enumerate() {
            if !dims.iter().any(|d| &d.name == p) {
                return Err(ConfigError::new(
                    format!("telemetry.prometheus_dimensions[{i}]"),
                    format!("{p:?} is not a dimension of telemetry.dimensions"),
                ));
            }
        }
        Ok(())
    }
}

fn parse_dimension(entry: &str) -> Result<Dimension, String> {
    let (name, spec) = match entry.split_once('=') {
        Some((n, s)) => (Some(n.trim()), s.trim()),
        None => (None, entry.trim()),
    };
    let (kind, field) = spec
        .split_once(':')
        .ok_or("expected body:FIELD, header:NAME or jwt:CLAIM (optionally name=source)")?;
    if field.is_empty() || field.len() > 128 || field.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{spec:?}: the field must be 1 to 128 printable characters"
        ));
    }
    let source = match kind {
        "body" => DimensionSource::Body(field.to_string()),
        "header" => {
            if http_token(field) {
                DimensionSource::Header(field.to_ascii_lowercase())
            } else {
                return Err(format!("{field:?} is not a header name"));
            }
        }
        "jwt" => DimensionSource::Jwt(field.to_string()),
        other => return Err(format!("{other:?}: expected body, header or jwt")),
    };
    let spec = format!("{kind}:{}", field.to_ascii_lowercase());
    let name = match name {
        Some(n) => n.to_string(),
        None if USER_SOURCES.contains(&spec.as_str()) => "user".to_string(),
        None => field.to_ascii_lowercase(),
    };
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid_name_char) {
        return Err(format!(
            "dimension name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' (or name it: name=source)"
        ));
    }
    Ok(Dimension { name, source })
}

fn http_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(list: &[&str]) -> Result<Vec<Dimension>, ConfigError> {
        TelemetryConfig {
            dimensions: list.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .parsed_dimensions()
    }

    /// The three user sources are the dimension `user`; others take their field's name, or
    /// the name given; a bad entry names its index.
    #[test]
    fn dimensions_parse_and_name() {
        let d = dims(&[
            "body:user",
            "header:X-User-Id",
            "jwt:sub",
            "header:x-app",
            "tenant=jwt:tid",
        ])
        .unwrap();
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["user", "user", "user", "x-app", "tenant"]);
        assert_eq!(d[1].source, DimensionSource::Header("x-user-id".into()));
        assert_eq!(d[4].source, DimensionSource::Jwt("tid".into()));
        let e = dims(&["body:user", "cookie:x"]).unwrap_err();
        assert_eq!(e.path, "telemetry.dimensions[1]");
        assert!(dims(&["header:bad header"]).is_err());
        assert!(dims(&["a|b=header:x"]).is_err());
        assert!(dims(&["body:"]).is_err());
    }

    /// Prometheus may only carry configured dimensions; the cap must be positive.
    #[test]
    fn prometheus_dimensions_must_be_configured() {
        let mut t = TelemetryConfig {
            dimensions: vec!["header:x-app".into()],
            prometheus_dimensions: vec!["x-app".into()],
            ..Default::default()
        };
        assert!(t.validate().is_ok());
        t.prometheus_dimensions = vec!["user".into()];
        let e = t.validate().unwrap_err();
        assert_eq!(e.path, "telemetry.prometheus_dimensions[0]");
        t.prometheus_dimensions.clear();
        t.dimension_cap = 0;
        assert_eq!(t.validate().unwrap_err().path, "telemetry.dimension_cap");
    }
}

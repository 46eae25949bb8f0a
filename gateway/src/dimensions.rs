//! Dimensions beyond the consumer (`[telemetry] dimensions`): the end user, the calling app.
//! Read once at admission from the body (a top-level field), a header or a JWT claim into the
//! request's record; the usage worker puts them on the span, the usage log record and the
//! store's per-dimension rows (capped per consumer and day, the rest counted as `other`), and
//! on Prometheus only when allow-listed.
//!
//! Values are cleaned before they go anywhere: no `|` (the store's field separator), no
//! control characters, at most [`MAX_DIM_VALUE`] bytes.

use crate::auth::jwt::Identity;
use http::HeaderMap;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::fmt;
use std::sync::Arc;
use tollgate_common::config::{DimensionSource, TelemetryConfig};
use tollgate_quota::{DimUsage, MAX_DIM_VALUE};

/// A request's dimension values: (dimension, value), one per dimension at most.
pub type DimValues = Vec<(Arc<str>, String)>;

/// The configured dimensions, ready to read requests.
#[derive(Debug, Default)]
pub struct Dimensions {
    sources: Vec<(Arc<str>, DimensionSource)>,
    /// The body fields to look up (empty: the body is not read again).
    body_fields: Vec<String>,
    cap: u32,
    retention_days: u32,
}

impl Dimensions {
    /// From a validated `[telemetry]` (an entry that does not parse is left out).
    pub fn from_config(t: &TelemetryConfig) -> Dimensions {
        let sources: Vec<(Arc<str>, DimensionSource)> = t
            .parsed_dimensions()
            .unwrap_or_default()
            .into_iter()
            .map(|d| (Arc::from(d.name.as_str()), d.source))
            .collect();
        let mut body_fields: Vec<String> = Vec::new();
        for (_, s) in &sources {
            if let DimensionSource::Body(f) = s
                && !body_fields.contains(f)
            {
                body_fields.push(f.clone());
            }
        }
        Dimensions {
            sources,
            body_fields,
            cap: t.dimension_cap,
            retention_days: t.dimension_retention_days,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The request's values; for a dimension with several sources the first present wins.
    pub fn extract(&self, headers: &HeaderMap, body: &[u8], jwt: Option<&Identity>) -> DimValues {
        let mut out = DimValues::new();
        if self.sources.is_empty() {
            return out;
        }
        let body_values = if self.body_fields.is_empty() {
            Vec::new()
        } else {
            body_lookup(body, &self.body_fields)
        };
        for (name, source) in &self.sources {
            if out.iter().any(|(n, _)| n == name) {
                continue;
            }
            let value = match source {
                DimensionSource::Header(h) => headers
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .and_then(clean),
                DimensionSource::Body(f) => self
                    .body_fields
                    .iter()
                    .position(|x| x == f)
                    .and_then(|i| body_values.get(i).cloned().flatten()),
                DimensionSource::Jwt(c) => jwt
                    .and_then(|j| j.claims.get(c))
                    .and_then(scalar)
                    .as_deref()
                    .and_then(clean),
            };
            if let Some(v) = value {
                out.push((name.clone(), v));
            }
        }
        out
    }

    /// The store's part of a request's values: them, the cap and the retention.
    pub fn usage(&self, values: &DimValues) -> Option<DimUsage> {
        (!values.is_empty()).then(|| DimUsage {
            values: values
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
            cap: self.cap,
            retention_days: self.retention_days,
        })
    }
}

/// A value as kept: trimmed, `|` made `_`, control characters dropped, at most
/// [`MAX_DIM_VALUE`] bytes (cut at a character boundary); `None` when nothing is left.
pub fn clean(v: &str) -> Option<String> {
    let mut out = String::new();
    for c in v.trim().chars().filter(|c| !c.is_control()) {
        let c = if c == '|' { '_' } else { c };
        if out.len() + c.len_utf8() > MAX_DIM_VALUE {
            break;
        }
        out.push(c);
    }
    let out = out.trim_end().to_string();
    (!out.is_empty()).then_some(out)
}

/// A string, number or boolean as text; other JSON values are not dimension values.
fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The cleaned values of top-level body `fields`, in one walk of the top-level object (other
/// fields skipped without being kept). A body that is not a JSON object yields nothing (the
/// request parser has refused it already).
fn body_lookup(body: &[u8], fields: &[String]) -> Vec<Option<String>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    Lookup(fields)
        .deserialize(&mut de)
        .unwrap_or_else(|_| vec![None; fields.len()])
}

struct Lookup<'f>(&'f [String]);

impl<'de> DeserializeSeed<'de> for Lookup<'_> {
    type Value = Vec<Option<String>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Lookup<'_> {
    type Value = Vec<Option<String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut out = vec![None; self.0.len()];
        while let Some(i) = m.next_key_seed(KeyIndex(self.0))? {
            match i {
                Some(i) => {
                    let v: serde_json::Value = m.next_value()?;
                    out[i] = scalar(&v).as_deref().and_then(clean);
                }
                None => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// A key's position among the wanted fields.
struct KeyIndex<'f>(&'f [String]);

impl<'de> DeserializeSeed<'de> for KeyIndex<'_> {
    type Value = Option<usize>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|f| f == k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(list: &[&str]) -> Dimensions {
        Dimensions::from_config(&TelemetryConfig {
            dimensions: list.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    /// The user comes from the body, else a header, else the token; other dimensions by name;
    /// values are cleaned; absent or non-scalar values are left out.
    #[test]
    fn extracts_in_order_and_cleans() {
        let d = dims(&["body:user", "header:x-user-id", "jwt:sub", "header:x-app"]);
        let mut h = HeaderMap::new();
        h.insert("x-user-id", "from-header".parse().unwrap());
        h.insert("x-app", " web|mobile ".parse().unwrap());
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"al\u0007ice"}"#;
        let v = d.extract(&h, body, None);
        let v: Vec<(&str, &str)> = v.iter().map(|(n, v)| (&**n, v.as_str())).collect();
        assert_eq!(v, [("user", "alice"), ("x-app", "web_mobile")]);
        let v = d.extract(&h, br#"{"user":{"id":1},"model":"m"}"#, None);
        assert_eq!(v[0].1, "from-header");
        let jwt = Identity {
            consumer: None,
            team: None,
            models_denied: Vec::new(),
            mcp_only: false,
            tools: None,
            claims: serde_json::json!({"sub": 42}).as_object().cloned().unwrap(),
        };
        let v = d.extract(&HeaderMap::new(), b"not json", Some(&jwt));
        assert_eq!(v.len(), 1);
        assert_eq!((&*v[0].0, v[0].1.as_str()), ("user", "42"));
        assert!(dims(&[]).extract(&h, body, None).is_empty());
    }

    /// Long values are cut at a character boundary within the limit; blank ones are absent.
    #[test]
    fn clean_bounds_values() {
        let long = "é".repeat(100);
        let c = clean(&long).unwrap();
        assert!(c.len() <= MAX_DIM_VALUE && c.len() >= MAX_DIM_VALUE - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
        assert_eq!(clean(" \n\t "), None);
        assert_eq!(clean("a|b\r\nc"), Some("a_bc".into()));
    }
}

//! OpenAPI schema objects (already `$ref`-free) into the JSON Schema MCP tools carry: 3.0's
//! `nullable` and boolean `exclusiveMinimum`/`exclusiveMaximum` become their JSON Schema forms,
//! and the OpenAPI-only keywords (`discriminator`, `xml`, `externalDocs`) are dropped. Also
//! which media types are JSON, and which response schema is a tool's output schema.

use super::document::{Document, Version};
use serde_json::{Map, Value, json};

/// The keywords whose value is one schema.
const ONE: &[&str] = &[
    "items",
    "additionalProperties",
    "not",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "if",
    "then",
    "else",
];
/// The keywords whose value is a list of schemas.
const LIST: &[&str] = &["allOf", "anyOf", "oneOf", "prefixItems"];
/// The keywords whose value maps names to schemas.
const MAP: &[&str] = &[
    "properties",
    "patternProperties",
    "$defs",
    "dependentSchemas",
];
/// OpenAPI's own keywords, meaningless to a JSON Schema validator.
const DROP: &[&str] = &["discriminator", "xml", "externalDocs"];

/// `schema` as JSON Schema.
pub fn json_schema(schema: &Value, version: Version) -> Value {
    let Value::Object(m) = schema else {
        return schema.clone();
    };
    let mut out = Map::with_capacity(m.len());
    for (k, v) in m {
        let k = k.as_str();
        if DROP.contains(&k) || (version == Version::V30 && k == "nullable") {
            continue;
        }
        let v = if ONE.contains(&k) {
            json_schema(v, version)
        } else if LIST.contains(&k) {
            match v {
                Value::Array(a) => {
                    Value::Array(a.iter().map(|s| json_schema(s, version)).collect())
                }
                other => other.clone(),
            }
        } else if MAP.contains(&k) {
            match v {
                Value::Object(props) => Value::Object(
                    props
                        .iter()
                        .map(|(name, s)| (name.clone(), json_schema(s, version)))
                        .collect(),
                ),
                other => other.clone(),
            }
        } else {
            v.clone()
        };
        out.insert(k.to_string(), v);
    }
    if version == Version::V30 {
        from_30(m, &mut out);
    }
    Value::Object(out)
}

/// 3.0's forms: `nullable: true` widens `type` with `"null"`; `exclusiveMinimum: true` with
/// `minimum: n` is `exclusiveMinimum: n` (and the same for maximum).
fn from_30(m: &Map<String, Value>, out: &mut Map<String, Value>) {
    if m.get("nullable") == Some(&Value::Bool(true)) {
        match out.get("type").cloned() {
            Some(Value::String(t)) => {
                out.insert("type".into(), json!([t, "null"]));
            }
            Some(_) => {}
            // No type: anything goes already, null included; an enum must admit null.
            None => {}
        }
        if let Some(Value::Array(e)) = out.get_mut("enum")
            && !e.contains(&Value::Null)
        {
            e.push(Value::Null);
        }
    }
    for (flag, bound) in [
        ("exclusiveMinimum", "minimum"),
        ("exclusiveMaximum", "maximum"),
    ] {
        match out.get(flag) {
            Some(Value::Bool(true)) => {
                if let Some(n) = out.remove(bound) {
                    out.insert(flag.into(), n);
                } else {
                    out.remove(flag);
                }
            }
            Some(Value::Bool(false)) => {
                out.remove(flag);
            }
            _ => {}
        }
    }
}

/// Whether `schema` describes only objects (what MCP allows as an `outputSchema`).
pub fn is_object(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object")
}

/// `schema` with `description` set when it has none (a parameter's description goes on its
/// property).
pub fn described(mut schema: Value, description: Option<&str>) -> Value {
    if let (Value::Object(m), Some(d)) = (&mut schema, description)
        && !m.contains_key("description")
    {
        m.insert("description".into(), Value::String(d.to_string()));
    }
    schema
}

/// `application/json`, `application/merge-patch+json`, with or without parameters.
pub fn is_json(media: &str) -> bool {
    let m = media
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
}

/// The schema of the first 2xx JSON response (`200`..`299` in order, then `2XX`), when it
/// describes an object.
pub fn output_schema(doc: &Document, op: &Map<String, Value>) -> Option<Value> {
    let responses = op.get("responses")?.as_object()?;
    let mut codes: Vec<&String> = responses
        .keys()
        .filter(|c| {
            c.len() == 3 && c.starts_with('2') && c[1..].bytes().all(|b| b.is_ascii_digit())
        })
        .collect();
    codes.sort();
    codes.extend(responses.keys().filter(|c| c.eq_ignore_ascii_case("2XX")));
    for code in codes {
        let content = responses[code].get("content").and_then(Value::as_object);
        let Some((_, media)) = content.and_then(|c| c.iter().find(|(m, _)| is_json(m))) else {
            continue;
        };
        let schema = json_schema(media.get("schema")?, doc.version);
        return is_object(&schema).then_some(schema);
    }
    None
}

//! Tool arguments checked against the tool's input schema before any request is sent. A focused
//! validator (the `jsonschema` crate is not in the workspace's dependency set) for the keywords
//! OpenAPI documents use: `type` (one or a list), `enum`, `const`, `required`, `properties`,
//! `additionalProperties`, `items`, `minItems`/`maxItems`, `minLength`/`maxLength`,
//! `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`, `allOf`/`anyOf`/`oneOf`/`not`.
//! Not checked (the upstream still is): `pattern`, `format`, `multipleOf`, `uniqueItems`,
//! `patternProperties`, conditionals. The first failure is reported with the path of the field.

use serde_json::{Map, Value};

/// Nesting of arguments checked; deeper is refused (a bound on work per call).
const MAX_DEPTH: usize = 64;

/// `Ok`, or what is wrong with which field (`body.items[0].qty: expected integer, got string`).
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "arguments", 0)
}

fn check(schema: &Value, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{at}: nested too deeply"));
    }
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: not allowed")),
        Value::Object(s) => s,
        _ => return Ok(()),
    };
    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(t) => is_type(v, t),
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(|t| is_type(v, t)),
            _ => true,
        };
        if !ok {
            return Err(format!(
                "{at}: expected {}, got {}",
                show_type(t),
                type_of(v)
            ));
        }
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(v)
    {
        return Err(format!(
            "{at}: must be one of {}",
            Value::Array(options.clone())
        ));
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        return Err(format!("{at}: must be {c}"));
    }
    match v {
        Value::Object(m) => object(s, m, at, depth)?,
        Value::Array(items) => array(s, items, at, depth)?,
        Value::String(text) => {
            let n = text.chars().count() as u64;
            if s.get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|min| n < min)
            {
                return Err(format!("{at}: shorter than {} characters", s["minLength"]));
            }
            if s.get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|max| n > max)
            {
                return Err(format!("{at}: longer than {} characters", s["maxLength"]));
            }
        }
        Value::Number(n) => number(s, n.as_f64().unwrap_or(f64::NAN), at)?,
        _ => {}
    }
    combinators(s, v, at, depth)
}

fn object(
    s: &Map<String, Value>,
    m: &Map<String, Value>,
    at: &str,
    depth: usize,
) -> Result<(), String> {
    if let Some(Value::Array(required)) = s.get("required") {
        for r in required.iter().filter_map(Value::as_str) {
            if !m.contains_key(r) {
                return Err(format!("{}: required", field(at, r)));
            }
        }
    }
    let props = s.get("properties").and_then(Value::as_object);
    for (k, child) in m {
        let here = field(at, k);
        match props.and_then(|p| p.get(k)) {
            Some(ps) => check(ps, child, &here, depth + 1)?,
            None => match s.get("additionalProperties") {
                Some(Value::Bool(false)) => return Err(format!("{here}: unknown field")),
                Some(extra) => check(extra, child, &here, depth + 1)?,
                None => {}
            },
        }
    }
    Ok(())
}

fn array(s: &Map<String, Value>, items: &[Value], at: &str, depth: usize) -> Result<(), String> {
    let n = items.len() as u64;
    if s.get("minItems")
        .and_then(Value::as_u64)
        .is_some_and(|min| n < min)
    {
        return Err(format!("{at}: fewer than {} items", s["minItems"]));
    }
    if s.get("maxItems")
        .and_then(Value::as_u64)
        .is_some_and(|max| n > max)
    {
        return Err(format!("{at}: more than {} items", s["maxItems"]));
    }
    if let Some(item_schema) = s.get("items") {
        for (i, item) in items.iter().enumerate() {
            check(item_schema, item, &format!("{at}[{i}]"), depth + 1)?;
        }
    }
    Ok(())
}

fn number(s: &Map<String, Value>, x: f64, at: &str) -> Result<(), String> {
    let bound = |k: &str| s.get(k).and_then(Value::as_f64);
    if let Some(min) = bound("minimum")
        && x < min
    {
        return Err(format!("{at}: must be at least {min}"));
    }
    if let Some(max) = bound("maximum")
        && x > max
    {
        return Err(format!("{at}: must be at most {max}"));
    }
    if let Some(min) = bound("exclusiveMinimum")
        && x <= min
    {
        return Err(format!("{at}: must be more than {min}"));
    }
    if let Some(max) = bound("exclusiveMaximum")
        && x >= max
    {
        return Err(format!("{at}: must be less than {max}"));
    }
    Ok(())
}

fn combinators(s: &Map<String, Value>, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    let list = |k: &str| s.get(k).and_then(Value::as_array);
    if let Some(all) = list("allOf") {
        for sub in all {
            check(sub, v, at, depth + 1)?;
        }
    }
    if let Some(any) = list("anyOf")
        && !any.iter().any(|sub| check(sub, v, at, depth + 1).is_ok())
    {
        return Err(format!("{at}: matches none of the allowed shapes (anyOf)"));
    }
    if let Some(one) = list("oneOf") {
        let n = one
            .iter()
            .filter(|sub| check(sub, v, at, depth + 1).is_ok())
            .count();
        if n != 1 {
            return Err(format!(
                "{at}: matches {n} of the oneOf shapes, not exactly one"
            ));
        }
    }
    if let Some(not) = s.get("not")
        && check(not, v, at, depth + 1).is_ok()
    {
        return Err(format!("{at}: matches a shape that is not allowed (not)"));
    }
    Ok(())
}

/// `arguments.x` at the top, `body.x` below it.
fn field(at: &str, key: &str) -> String {
    if at == "arguments" {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn show_type(t: &Value) -> String {
    match t {
        Value::String(s) => s.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        other => other.to_string(),
    }
}

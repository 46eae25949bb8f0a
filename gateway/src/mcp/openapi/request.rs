//! A tool call's arguments into the parts of the HTTP request: the URL (path parameters
//! percent-encoded as one path segment each, query parameters form-style with arrays repeated
//! or, with `explode: false`, joined by `,`),
//! the header parameters and the JSON body. Nothing here can leave the templated path: every
//! byte of a path value outside `[A-Za-z0-9-._~]` is encoded (`/` as `%2F`), a value made only
//! of dots is refused (URL parsers treat `%2E%2E` as `..`), and the URL, once parsed, must have
//! exactly the path that was built.

use super::operations::{In, Tool};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// The request a call becomes, before the credential.
#[derive(Debug)]
pub struct Prepared {
    pub method: http::Method,
    pub url: reqwest::Url,
    pub headers: HeaderMap,
    pub body: Option<Vec<u8>>,
}

/// Builds the request of `tool` on `base` (`http://host:port[/prefix]`, no trailing `/`) from
/// arguments that already passed the input schema. `Err` is the invalid-params message.
pub fn prepare(base: &str, tool: &Tool, args: &Map<String, Value>) -> Result<Prepared, String> {
    let path = render_path(&tool.path, args)?;
    let mut url = reqwest::Url::parse(&format!("{base}{path}"))
        .map_err(|e| format!("the request URL is not valid: {e}"))?;
    let base_path = reqwest::Url::parse(base)
        .map(|b| b.path().trim_end_matches('/').to_string())
        .map_err(|e| format!("the base URL is not valid: {e}"))?;
    if url.path() != format!("{base_path}{path}") {
        return Err("the path arguments would change the request path outside its template".into());
    }
    let mut pairs: Vec<(&str, String)> = Vec::new();
    let mut headers = HeaderMap::new();
    for p in &tool.params {
        let Some(v) = args.get(&p.name).filter(|v| !v.is_null()) else {
            continue;
        };
        match p.location {
            In::Path => {}
            In::Query => match v {
                Value::Array(items) if p.explode => {
                    pairs.extend(items.iter().map(|i| (p.name.as_str(), text(i))));
                }
                Value::Array(items) => {
                    let joined = items.iter().map(text).collect::<Vec<_>>().join(",");
                    pairs.push((p.name.as_str(), joined));
                }
                other => pairs.push((p.name.as_str(), text(other))),
            },
            In::Header => {
                let name = HeaderName::from_bytes(p.name.as_bytes())
                    .map_err(|_| format!("{}: not a valid header name", p.name))?;
                let value = match v {
                    Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
                    other => text(other),
                };
                let value = HeaderValue::from_str(&value)
                    .map_err(|_| format!("{}: not a valid header value", p.name))?;
                headers.insert(name, value);
            }
        }
    }
    if !pairs.is_empty() {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, &v);
        }
    }
    let body = match (&tool.body, args.get("body")) {
        (Some(media), Some(b)) => {
            let media = HeaderValue::from_str(media)
                .map_err(|_| "the body's media type is not a valid header".to_string())?;
            headers.insert(http::header::CONTENT_TYPE, media);
            Some(serde_json::to_vec(b).map_err(|e| format!("body: {e}"))?)
        }
        _ => None,
    };
    Ok(Prepared {
        method: tool.method.clone(),
        url,
        headers,
        body,
    })
}

/// The template with each `{name}` replaced by its encoded argument; the literal parts are
/// encoded only where a URL needs it (spaces, non-ASCII), `/` kept.
pub fn render_path(template: &str, args: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        encode_into(&mut out, &rest[..open], true);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            encode_into(&mut out, &rest[open..], true);
            return Ok(out);
        };
        let name = &after[..close];
        let value = args.get(name).ok_or_else(|| format!("{name}: required"))?;
        out.push_str(&path_value(name, value)?);
        rest = &after[close + 1..];
    }
    encode_into(&mut out, rest, true);
    Ok(out)
}

/// One path parameter's value as an encoded segment (an array: items joined by `,`, the
/// OpenAPI `simple` style).
fn path_value(name: &str, v: &Value) -> Result<String, String> {
    let raw: Vec<String> = match v {
        Value::Array(items) => items.iter().map(text).collect(),
        Value::Object(_) | Value::Null => {
            return Err(format!(
                "{name}: a path parameter must be a string, number or boolean"
            ));
        }
        other => vec![text(other)],
    };
    let joined = raw.join(",");
    if joined.is_empty() {
        return Err(format!("{name}: a path parameter must not be empty"));
    }
    if joined.chars().all(|c| c == '.') {
        return Err(format!(
            "{name}: {joined:?} is not allowed as a path parameter"
        ));
    }
    let mut out = String::with_capacity(joined.len());
    for (i, part) in raw.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        encode_into(&mut out, part, false);
    }
    Ok(out)
}

/// Percent-encodes `s` onto `out`: unreserved characters (`A-Z a-z 0-9 - . _ ~`) stay; with
/// `literal` (the document's own path text) also `/` and the characters a path may carry as
/// they are (`!$&'()*+,;=:@%`).
pub fn encode_into(out: &mut String, s: &str, literal: bool) {
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (literal && b"/!$&'()*+,;=:@%".contains(&b));
        if keep {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// A scalar as text; anything else as compact JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

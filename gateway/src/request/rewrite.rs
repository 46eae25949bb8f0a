//! The body a backend gets: the client's bytes as they came, unless the backend needs another
//! `model`, the gateway must ask for `stream_options.include_usage`, or it caps an output the
//! client left uncapped. Then the top-level fields are copied verbatim and only those change.

use crate::error::Error;
use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::value::RawValue;

/// The body for a backend: the original bytes, unless the backend needs another `model`, the
/// gateway must ask for `stream_options.include_usage`, or it caps the output the client left
/// uncapped (`output_cap`: the field and the tokens). Top-level values are copied verbatim.
pub fn rewrite_body(
    body: &Bytes,
    set_model: Option<&str>,
    include_usage: bool,
    output_cap: Option<(&str, u64)>,
) -> Result<Bytes, Error> {
    if set_model.is_none() && !include_usage && output_cap.is_none() {
        return Ok(body.clone());
    }
    let mut map: IndexMap<String, Box<RawValue>> = serde_json::from_slice(body)
        .map_err(|e| Error::bad_request(format!("invalid request body: {e}")))?;
    let to_raw = |v: serde_json::Value| {
        serde_json::value::to_raw_value(&v).map_err(|e| Error::Internal(e.to_string()))
    };
    if let Some(m) = set_model {
        map.insert("model".into(), to_raw(serde_json::Value::String(m.into()))?);
    }
    if let Some((field, tokens)) = output_cap {
        map.insert(field.into(), to_raw(serde_json::Value::from(tokens))?);
    }
    if include_usage {
        let mut opts: serde_json::Map<String, serde_json::Value> = match map.get("stream_options") {
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or_default(),
            None => serde_json::Map::new(),
        };
        opts.insert("include_usage".into(), serde_json::Value::Bool(true));
        map.insert(
            "stream_options".into(),
            to_raw(serde_json::Value::Object(opts))?,
        );
    }
    serde_json::to_vec(&map)
        .map(Bytes::from)
        .map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rewriting keeps every other field and merges into existing stream_options.
    #[test]
    fn rewrite_keeps_fields() {
        let b =
            Bytes::from_static(br#"{"model":"a","messages":[{"x":1}],"stream_options":{"foo":2}}"#);
        assert_eq!(rewrite_body(&b, None, false, None).unwrap(), b);
        let out =
            rewrite_body(&b, Some("dep-a"), true, Some(("max_completion_tokens", 9))).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "dep-a");
        assert_eq!(v["messages"][0]["x"], 1);
        assert_eq!(v["max_completion_tokens"], 9);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"foo":2,"include_usage":true})
        );
    }
}

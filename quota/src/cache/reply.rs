//! Reading the search module's replies: `FT.SEARCH` (the nearest entry) and `FT.INFO` (the
//! index's size), in RESP2 or RESP3 shapes.

use super::Nearest;
use crate::{Error, Result};
use redis::Value;

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Double(d) => Some(d.to_string().into_bytes()),
        _ => None,
    }
}

/// Reads `[total, key, [field, value, ...], key, [...], ...]` of a `FT.SEARCH … RETURN 3 d p a`,
/// nearest first.
pub(super) fn parse_search(v: &Value, prefix: &str) -> Result<Vec<Nearest>> {
    let Value::Array(items) = v else {
        return Err(Error::Protocol("FT.SEARCH answered a non-array".into()));
    };
    let mut out = Vec::new();
    for pair in items.get(1..).unwrap_or_default().chunks(2) {
        let (Some(doc), Some(Value::Array(fields))) = (pair.first(), pair.get(1)) else {
            continue;
        };
        if let Some(n) = parse_doc(doc, fields, prefix)? {
            out.push(n);
        }
    }
    out.sort_by(|a, b| {
        a.distance
            .total_cmp(&b.distance)
            .then_with(|| a.key.cmp(&b.key))
    });
    Ok(out)
}

fn parse_doc(doc: &Value, fields: &[Value], prefix: &str) -> Result<Option<Nearest>> {
    let doc = bytes_of(doc).map(|b| String::from_utf8_lossy(&b).into_owned());
    let key = doc
        .as_deref()
        .and_then(|d| d.strip_prefix(prefix))
        .and_then(|rest| rest.split_once("}:e:"))
        .map(|(_, k)| k.to_string())
        .unwrap_or_default();
    let mut out = Nearest {
        key,
        distance: 1.0,
        prompt: String::new(),
        answer: Vec::new(),
    };
    let mut have_answer = false;
    for pair in fields.chunks(2) {
        let (Some(name), Some(value)) = (pair.first().and_then(bytes_of), pair.get(1)) else {
            continue;
        };
        let Some(value) = bytes_of(value) else {
            continue;
        };
        match name.as_slice() {
            b"d" => {
                out.distance = String::from_utf8_lossy(&value)
                    .parse::<f64>()
                    .map_err(|_| Error::Protocol("FT.SEARCH distance is not a number".into()))?;
            }
            b"p" => out.prompt = String::from_utf8_lossy(&value).into_owned(),
            b"a" => {
                out.answer = value;
                have_answer = true;
            }
            _ => {}
        }
    }
    // An entry deleted between the search and its read has no answer: not a candidate.
    Ok(have_answer.then_some(out))
}

/// `num_docs` and `vector_index_sz_mb` of an `FT.INFO` answer.
pub(super) fn parse_info(v: &Value) -> (u64, f64) {
    let Value::Array(items) = v else {
        return (0, 0.0);
    };
    let mut docs = 0;
    let mut mb = 0.0;
    for pair in items.chunks(2) {
        let (Some(name), Some(value)) = (pair.first().and_then(bytes_of), pair.get(1)) else {
            continue;
        };
        let text = bytes_of(value).map(|b| String::from_utf8_lossy(&b).into_owned());
        match name.as_slice() {
            b"num_docs" => docs = text.and_then(|t| t.parse().ok()).unwrap_or(0),
            b"vector_index_sz_mb" => mb = text.and_then(|t| t.parse().ok()).unwrap_or(0.0),
            _ => {}
        }
    }
    (docs, mb)
}

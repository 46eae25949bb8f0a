//! What of a request the cache looks at: whether it may be cached at all ([`inspect`]), its
//! exact key (a hash of the operation, the model and the body normalized: every parameter
//! that changes the answer kept, transport-only fields dropped, text whitespace collapsed,
//! object keys sorted), and the text the semantic layer embeds.

use crate::request::Operation;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tollgate_common::config::{CacheConfig, CacheMode};

/// Why a request that a `[[cache]]` covers is not cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `n > 1`: several answers are asked for, one would be replayed.
    Choices,
    /// Tools or tool results, without `cache_tools = true`.
    Tools,
    /// `temperature` above the cache's `max_temperature`.
    Temperature,
    /// A Responses request continuing a stored conversation (`previous_response_id`).
    Conversation,
    /// The body is not a JSON object the cache can read.
    Unreadable,
    /// The body is larger than the cache keys (4 MiB).
    TooLarge,
}

impl Skip {
    pub fn reason(self) -> &'static str {
        match self {
            Skip::Choices => "n>1",
            Skip::Tools => "tools",
            Skip::Temperature => "temperature",
            Skip::Conversation => "previous_response_id",
            Skip::Unreadable => "unreadable",
            Skip::TooLarge => "too_large",
        }
    }
}

/// Fields that change how an answer travels, never what it says.
const TRANSPORT_ONLY: [&str; 8] = [
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// A request the cache may serve: its exact key and the text its semantic layer embeds.
#[derive(Clone, Debug)]
pub struct Keyed {
    /// Hex SHA-256 (128 bits) of the normalized request.
    pub key: String,
    /// The prompt text for the semantic layer (its last `max_message_count` messages, system
    /// messages dropped when `ignore_system_messages`).
    pub text: String,
}

/// Reads the body once: refuses what must not be cached, else keys it.
pub fn inspect(op: Operation, model: &str, body: &[u8], rule: &CacheConfig) -> Result<Keyed, Skip> {
    let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(body) else {
        return Err(Skip::Unreadable);
    };
    if doc.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(Skip::Choices);
    }
    if !rule.cache_tools && uses_tools(&doc) {
        return Err(Skip::Tools);
    }
    // An explicit temperature above the bound asks for variety; a request that sets none is
    // cached (most FAQ and support clients set none).
    if doc
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t > rule.max_temperature)
    {
        return Err(Skip::Temperature);
    }
    if doc
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(Skip::Conversation);
    }
    let text = match rule.mode {
        CacheMode::Semantic => semantic_text(op, &doc, rule),
        CacheMode::Exact => String::new(),
    };
    for f in TRANSPORT_ONLY {
        doc.remove(f);
    }
    doc.remove("model");
    if doc.get("n").and_then(Value::as_u64) == Some(1) {
        doc.remove("n");
    }
    for f in ["messages", "prompt", "input", "instructions"] {
        if let Some(v) = doc.get_mut(f) {
            normalize_text(v);
        }
    }
    let mut canon = Vec::with_capacity(body.len());
    canonical(&Value::Object(doc), &mut canon);
    let mut h = Sha256::new();
    h.update(b"tollgate-cache-v1\0");
    h.update(op.path().as_bytes());
    h.update([0]);
    h.update(model.as_bytes());
    h.update([0]);
    h.update(&canon);
    Ok(Keyed {
        key: hex::encode(&h.finalize()[..16]),
        text,
    })
}

/// Tool definitions, or tool calls and results in the conversation.
fn uses_tools(doc: &Map<String, Value>) -> bool {
    if ["tools", "functions", "tool_choice", "function_call"]
        .iter()
        .any(|f| doc.get(*f).is_some_and(|v| !v.is_null()))
    {
        return true;
    }
    let items = doc
        .get("messages")
        .or_else(|| doc.get("input"))
        .and_then(Value::as_array);
    items.is_some_and(|items| {
        items.iter().any(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
            let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
            matches!(role, "tool" | "function")
                || m.get("tool_calls").is_some_and(|v| !v.is_null())
                || m.get("function_call").is_some_and(|v| !v.is_null())
                || kind.contains("function_call")
                || kind.contains("tool")
        })
    })
}

/// Collapses runs of whitespace in every string and trims it: "Hello  world \n" and
/// "Hello world" are the same prompt.
fn normalize_text(v: &mut Value) {
    match v {
        Value::String(s) if !is_collapsed(s) => {
            *s = s.split_whitespace().collect::<Vec<_>>().join(" ");
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_text),
        Value::Object(o) => o.values_mut().for_each(normalize_text),
        _ => {}
    }
}

/// Whether `s` is already what collapsing its whitespace gives (words separated by single
/// spaces, none at either end): most prompts are, and then nothing is allocated.
fn is_collapsed(s: &str) -> bool {
    let mut after_space = true;
    for c in s.chars() {
        if c.is_whitespace() {
            if c != ' ' || after_space {
                return false;
            }
            after_space = true;
        } else {
            after_space = false;
        }
    }
    !after_space || s.is_empty()
}

/// JSON with object keys sorted, so the key does not depend on the client's field order.
/// Written straight into `out` (no string per key or value).
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                canonical(&o[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// The text of one message's content: a string, or the text parts of an array.
fn content_text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                _ => p.get("text").and_then(Value::as_str),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The prompt text the semantic layer embeds: one `role: text` line per message kept.
pub fn semantic_text(op: Operation, doc: &Map<String, Value>, rule: &CacheConfig) -> String {
    let mut lines: Vec<String> = Vec::new();
    let system = |role: &str| matches!(role, "system" | "developer");
    match op {
        Operation::Completions => match doc.get("prompt") {
            Some(Value::String(s)) => lines.push(s.clone()),
            Some(Value::Array(a)) => {
                lines.extend(a.iter().filter_map(|p| p.as_str().map(str::to_string)))
            }
            _ => {}
        },
        _ => {
            if op == Operation::Responses
                && !rule.ignore_system_messages
                && let Some(i) = doc.get("instructions").and_then(Value::as_str)
            {
                lines.push(format!("system: {i}"));
            }
            match doc.get("messages").or_else(|| doc.get("input")) {
                Some(Value::String(s)) => lines.push(format!("user: {s}")),
                Some(Value::Array(items)) => {
                    let kept: Vec<String> = items
                        .iter()
                        .filter_map(|m| {
                            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                            if rule.ignore_system_messages && system(role) {
                                return None;
                            }
                            let text = m.get("content").map(content_text).unwrap_or_default();
                            Some(format!("{role}: {text}"))
                        })
                        .collect();
                    let skip = kept.len().saturating_sub(rule.max_message_count);
                    lines.extend(kept.into_iter().skip(skip));
                }
                _ => {}
            }
        }
    }
    lines
        .join("\n")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `Cache-Control` asks of the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// `no-cache`: do not answer from the cache.
    pub no_lookup: bool,
    /// `no-store`: do not keep this answer.
    pub no_store: bool,
}

pub fn control(headers: &http::HeaderMap) -> Control {
    let mut c = Control::default();
    for v in headers.get_all(http::header::CACHE_CONTROL) {
        for d in v.to_str().unwrap_or_default().split(',') {
            match d.trim().to_ascii_lowercase().as_str() {
                "no-cache" => c.no_lookup = true,
                "no-store" => c.no_store = true,
                _ => {}
            }
        }
    }
    c
}

#[cfg(test)]
#[path = "key_tests.rs"]
mod tests;

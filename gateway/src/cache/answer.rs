//! A stored answer and its replay. What is kept is the answer as a non-streaming client would
//! have got it (the chat completion, the text completion, the Responses `response` object),
//! the usage the backend reported and which backend produced it. A streamed miss is assembled
//! into that shape once the stream has completed ([`Stored::from_sse`]); a hit is replayed as
//! JSON with a fresh `id` and `created` ([`Stored::json`]) or as a valid event stream
//! ([`Stored::sse`]): role chunk, content chunks, finish chunk, the usage chunk only when the
//! client asked for `include_usage`, then `[DONE]`.
//!
//! Never stored: errors, answers cut short or failed (no finish reason, no `[DONE]`, a
//! Responses status other than `completed`), content-filtered answers, answers without usage,
//! and more than one choice.

use super::replay;
use crate::request::Operation;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tollgate_common::TokenUsage;

/// Largest answer kept (bytes of the backend's response).
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    /// The backend that produced the answer (its prices value a hit's savings).
    pub backend: String,
    pub input: u64,
    pub output: u64,
    #[serde(default)]
    pub cached: u64,
    /// The non-streaming answer.
    pub body: Value,
}

impl Stored {
    pub fn usage(&self) -> TokenUsage {
        TokenUsage {
            input: self.input,
            output: self.output,
            cached_input: self.cached,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Option<Stored> {
        serde_json::from_slice(b).ok()
    }

    /// A complete JSON answer, if it may be kept.
    pub fn from_json(op: Operation, backend: &str, body: &[u8]) -> Option<Stored> {
        let v: Value = serde_json::from_slice(body).ok()?;
        Stored::checked(op, backend, v)
    }

    fn checked(op: Operation, backend: &str, body: Value) -> Option<Stored> {
        if filtered(&body) {
            return None;
        }
        match op {
            Operation::Chat | Operation::Completions => {
                let choices = body.get("choices")?.as_array()?;
                if choices.len() != 1 {
                    return None;
                }
                match choices[0].get("finish_reason").and_then(Value::as_str) {
                    None | Some("content_filter") => return None,
                    _ => {}
                }
            }
            Operation::Responses => {
                if body.get("status").and_then(Value::as_str) != Some("completed") {
                    return None;
                }
            }
            Operation::Embeddings => return None,
        }
        let u = body.get("usage")?;
        let n = |k: &str| u.get(k).and_then(Value::as_u64);
        let (input, output) = match op {
            Operation::Responses => (n("input_tokens")?, n("output_tokens")?),
            _ => (n("prompt_tokens")?, n("completion_tokens").unwrap_or(0)),
        };
        let cached = u
            .get("prompt_tokens_details")
            .or_else(|| u.get("input_tokens_details"))
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Some(Stored {
            backend: backend.to_string(),
            input,
            output,
            cached,
            body,
        })
    }

    /// Assembles a streamed answer from the backend's events, if it completed.
    pub fn from_sse(op: Operation, backend: &str, stream: &[u8]) -> Option<Stored> {
        let text = std::str::from_utf8(stream).ok()?;
        let mut done = false;
        let mut events = Vec::new();
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            events.push(serde_json::from_str::<Value>(data).ok()?);
        }
        match op {
            Operation::Responses => {
                let completed = events.iter().rev().find(|e| {
                    e.get("type").and_then(Value::as_str) == Some("response.completed")
                })?;
                Stored::checked(op, backend, completed.get("response")?.clone())
            }
            Operation::Chat | Operation::Completions if done => {
                Stored::checked(op, backend, assemble(op, &events)?)
            }
            _ => None,
        }
    }

    /// The answer as JSON, with a fresh id and creation time.
    pub fn json(&self, op: Operation) -> Bytes {
        let mut body = self.body.clone();
        refresh(op, &mut body);
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The answer as a server-sent event stream.
    pub fn sse(&self, op: Operation, include_usage: bool) -> Bytes {
        let mut body = self.body.clone();
        refresh(op, &mut body);
        let mut out = String::new();
        match op {
            Operation::Responses => replay::responses_events(&body, &mut out),
            _ => replay::chunks(op, &body, include_usage, &mut out),
        }
        Bytes::from(out)
    }
}

/// Whether any content filter result says something was filtered.
fn filtered(v: &Value) -> bool {
    match v {
        Value::Object(o) => {
            o.get("filtered").and_then(Value::as_bool) == Some(true) || o.values().any(filtered)
        }
        Value::Array(a) => a.iter().any(filtered),
        _ => false,
    }
}

/// Fresh `id` and `created` (`created_at`), as a new answer would have.
fn refresh(op: Operation, body: &mut Value) {
    let now = crate::clock::now_ms() / 1000;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let Some(o) = body.as_object_mut() else {
        return;
    };
    match op {
        Operation::Chat => {
            o.insert("id".into(), json!(format!("chatcmpl-{id}")));
            o.insert("created".into(), json!(now));
        }
        Operation::Completions => {
            o.insert("id".into(), json!(format!("cmpl-{id}")));
            o.insert("created".into(), json!(now));
        }
        Operation::Responses => {
            o.insert("id".into(), json!(format!("resp_{id}")));
            o.insert("created_at".into(), json!(now));
            // Output items carry ids of the original response too.
            if let Some(items) = o.get_mut("output").and_then(Value::as_array_mut) {
                for (i, item) in items.iter_mut().enumerate() {
                    if let Some(io) = item.as_object_mut()
                        && io.contains_key("id")
                    {
                        io.insert("id".into(), json!(format!("msg_{id}{i}")));
                    }
                }
            }
        }
        Operation::Embeddings => {}
    }
}

/// The non-streaming object a chat or completions stream adds up to.
fn assemble(op: Operation, events: &[Value]) -> Option<Value> {
    let mut head: Option<&Value> = None;
    let mut content = String::new();
    let mut refusal = String::new();
    let mut role = "assistant".to_string();
    let mut finish: Option<String> = None;
    let mut usage: Option<Value> = None;
    let mut tools: Vec<Map<String, Value>> = Vec::new();
    for e in events {
        if let Some(u) = e.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let Some(choices) = e.get("choices").and_then(Value::as_array) else {
            continue;
        };
        for c in choices {
            if c.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                return None;
            }
            head.get_or_insert(e);
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                finish = Some(f.to_string());
            }
            if filtered(c) {
                return None;
            }
            if op == Operation::Completions {
                if let Some(t) = c.get("text").and_then(Value::as_str) {
                    content.push_str(t);
                }
                continue;
            }
            let Some(d) = c.get("delta") else { continue };
            if let Some(r) = d.get("role").and_then(Value::as_str) {
                role = r.to_string();
            }
            if let Some(t) = d.get("content").and_then(Value::as_str) {
                content.push_str(t);
            }
            if let Some(t) = d.get("refusal").and_then(Value::as_str) {
                refusal.push_str(t);
            }
            for tc in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = tc.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if i > 128 {
                    return None;
                }
                while tools.len() <= i {
                    tools.push(Map::new());
                }
                let t = &mut tools[i];
                for k in ["id", "type"] {
                    if let Some(v) = tc.get(k).filter(|v| !v.is_null()) {
                        t.insert(k.into(), v.clone());
                    }
                }
                if let Some(f) = tc.get("function") {
                    let fun = t
                        .entry("function")
                        .or_insert_with(|| json!({"name": "", "arguments": ""}));
                    for k in ["name", "arguments"] {
                        if let Some(piece) = f.get(k).and_then(Value::as_str) {
                            let cur = fun.get(k).and_then(Value::as_str).unwrap_or_default();
                            fun[k] = json!(format!("{cur}{piece}"));
                        }
                    }
                }
            }
        }
    }
    let head = head?;
    let finish = finish?;
    let mut out = Map::new();
    for k in [
        "id",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
    ] {
        if let Some(v) = head.get(k).filter(|v| !v.is_null()) {
            out.insert(k.into(), v.clone());
        }
    }
    let choice = if op == Operation::Completions {
        out.insert("object".into(), json!("text_completion"));
        json!({"index": 0, "text": content, "logprobs": null, "finish_reason": finish})
    } else {
        out.insert("object".into(), json!("chat.completion"));
        let mut msg = Map::new();
        msg.insert("role".into(), json!(role));
        msg.insert(
            "content".into(),
            if content.is_empty() && !tools.is_empty() {
                Value::Null
            } else {
                json!(content)
            },
        );
        msg.insert(
            "refusal".into(),
            if refusal.is_empty() {
                Value::Null
            } else {
                json!(refusal)
            },
        );
        if !tools.is_empty() {
            msg.insert(
                "tool_calls".into(),
                Value::Array(tools.into_iter().map(Value::Object).collect()),
            );
        }
        json!({"index": 0, "message": msg, "logprobs": null, "finish_reason": finish})
    };
    out.insert("choices".into(), json!([choice]));
    out.insert("usage".into(), usage?);
    Some(Value::Object(out))
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;

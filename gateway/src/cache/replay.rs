//! Replaying a stored answer as the event stream a streaming client expects: chat and
//! completions chunks (role, content in pieces, tool calls, finish, the usage chunk only when
//! asked, `[DONE]`), and the Responses API's typed events (created, in progress, each output
//! item with its text as deltas, completed).

use crate::request::Operation;
use serde_json::{Map, Value, json};

/// Largest piece of text in one replayed stream chunk.
const CHUNK_CHARS: usize = 64;

/// Pieces of at most [`CHUNK_CHARS`] characters (never splitting a character).
fn pieces(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut count = 0;
    for (i, _) in s.char_indices() {
        if count == CHUNK_CHARS {
            out.push(&s[start..i]);
            start = i;
            count = 0;
        }
        count += 1;
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

fn data(out: &mut String, v: &Value) {
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
}

/// A chat or completions stream of the stored answer.
pub(super) fn chunks(op: Operation, body: &Value, include_usage: bool, out: &mut String) {
    let chat = op == Operation::Chat;
    let mut base = Map::new();
    for k in ["id", "created", "model", "system_fingerprint"] {
        if let Some(v) = body.get(k) {
            base.insert(k.into(), v.clone());
        }
    }
    base.insert(
        "object".into(),
        json!(if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        }),
    );
    let usage_null = include_usage.then_some(Value::Null);
    let chunk = |choice: Value| {
        let mut c = base.clone();
        c.insert("choices".into(), json!([choice]));
        if let Some(u) = &usage_null {
            c.insert("usage".into(), u.clone());
        }
        Value::Object(c)
    };
    let choice = body.get("choices").and_then(|c| c.get(0));
    let finish = choice
        .and_then(|c| c.get("finish_reason"))
        .cloned()
        .unwrap_or(json!("stop"));
    if chat {
        let msg = choice.and_then(|c| c.get("message"));
        let role = msg
            .and_then(|m| m.get("role"))
            .cloned()
            .unwrap_or(json!("assistant"));
        data(
            out,
            &chunk(
                json!({"index": 0, "delta": {"role": role, "content": ""}, "logprobs": null, "finish_reason": null}),
            ),
        );
        let text = msg
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        for p in pieces(text) {
            data(
                out,
                &chunk(
                    json!({"index": 0, "delta": {"content": p}, "logprobs": null, "finish_reason": null}),
                ),
            );
        }
        if let Some(r) = msg.and_then(|m| m.get("refusal")).and_then(Value::as_str) {
            data(
                out,
                &chunk(
                    json!({"index": 0, "delta": {"refusal": r}, "logprobs": null, "finish_reason": null}),
                ),
            );
        }
        if let Some(calls) = msg
            .and_then(|m| m.get("tool_calls"))
            .and_then(Value::as_array)
        {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut c = c.clone();
                    c["index"] = json!(i);
                    c
                })
                .collect();
            data(
                out,
                &chunk(
                    json!({"index": 0, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null}),
                ),
            );
        }
        data(
            out,
            &chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})),
        );
    } else {
        let text = choice
            .and_then(|c| c.get("text"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        for p in pieces(text) {
            data(
                out,
                &chunk(json!({"index": 0, "text": p, "logprobs": null, "finish_reason": null})),
            );
        }
        data(
            out,
            &chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})),
        );
    }
    if include_usage {
        let mut c = base.clone();
        c.insert("choices".into(), json!([]));
        c.insert(
            "usage".into(),
            body.get("usage").cloned().unwrap_or(Value::Null),
        );
        data(out, &Value::Object(c));
    }
    out.push_str("data: [DONE]\n\n");
}

/// A Responses event stream of the stored response: created, in progress, each output item
/// (text as deltas), completed.
pub(super) fn responses_events(body: &Value, out: &mut String) {
    let mut seq = 0u64;
    let mut event = |out: &mut String, kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(seq);
        seq += 1;
        out.push_str("event: ");
        out.push_str(kind);
        out.push('\n');
        data(out, &v);
    };
    let mut pending = body.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    event(
        out,
        "response.created",
        json!({"response": pending.clone()}),
    );
    event(out, "response.in_progress", json!({"response": pending}));
    let items = body
        .get("output")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, item) in items.iter().enumerate() {
        let id = item.get("id").cloned().unwrap_or(Value::Null);
        let parts = item
            .get("content")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut added = item.clone();
        if added.get("content").is_some() {
            added["content"] = json!([]);
        }
        if added.get("status").is_some() {
            added["status"] = json!("in_progress");
        }
        event(
            out,
            "response.output_item.added",
            json!({"output_index": i, "item": added}),
        );
        for (j, part) in parts.iter().enumerate() {
            let text = part.get("text").and_then(Value::as_str);
            let mut empty = part.clone();
            if text.is_some() {
                empty["text"] = json!("");
            }
            event(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": i, "content_index": j, "part": empty}),
            );
            if let Some(text) = text {
                for p in pieces(text) {
                    event(
                        out,
                        "response.output_text.delta",
                        json!({"item_id": id, "output_index": i, "content_index": j, "delta": p, "logprobs": []}),
                    );
                }
                event(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": i, "content_index": j, "text": text, "logprobs": []}),
                );
            }
            event(
                out,
                "response.content_part.done",
                json!({"item_id": id, "output_index": i, "content_index": j, "part": part}),
            );
        }
        event(
            out,
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        );
    }
    event(out, "response.completed", json!({"response": body}));
}

//! The JSON the mock answers with, in the shapes of the real OpenAI / Azure OpenAI APIs: whole
//! responses for chat completions, completions, embeddings and the Responses API, the SSE
//! frames of their streaming forms, and the OpenAI error body.
//!
//! Everything here is pure: [`Reply`] holds what one answer needs, and each method returns a
//! body or a frame, so the handler in `mock` only decides *when* to send them.

use bytes::Bytes;
use serde_json::{Value, json};

use super::{embeddings, tokens};

/// The API operation a route serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// What one successful answer is made of.
pub(crate) struct Reply {
    pub(crate) op: Op,
    /// Unique per answer, e.g. `chatcmpl-mock-7`.
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// `"length"` when the request capped the output, `"stop"` otherwise.
    pub(crate) finish_reason: &'static str,
    /// False with `--no-usage`: no usage anywhere.
    pub(crate) usage: bool,
    /// The client asked for `stream_options.include_usage` (and usage is on): chunks carry
    /// `"usage": null` and a final usage chunk is sent, as OpenAI does.
    pub(crate) stream_usage: bool,
    /// The texts to embed (one vector per input item), their size and encoding.
    pub(crate) embeddings: embeddings::Request,
}

impl Reply {
    fn usage_json(&self) -> Value {
        let (p, c) = (self.prompt_tokens, self.completion_tokens);
        match self.op {
            Op::Responses => json!({"input_tokens": p, "output_tokens": c, "total_tokens": p + c}),
            Op::Embeddings => json!({"prompt_tokens": p, "total_tokens": p}),
            Op::Chat | Op::Completions => {
                json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
            }
        }
    }

    fn with_usage(&self, mut body: Value) -> Value {
        if self.usage {
            body["usage"] = self.usage_json();
        }
        body
    }

    /// The whole non-streamed response body.
    pub(crate) fn body(&self) -> Value {
        let text = tokens::completion_text(self.completion_tokens);
        let body = match self.op {
            Op::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": self.finish_reason}],
            }),
            Op::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null,
                             "finish_reason": self.finish_reason}],
            }),
            Op::Embeddings => {
                let data: Vec<Value> = (0..self.embeddings.texts.len())
                    .map(|index| {
                        json!({"object": "embedding", "index": index,
                                        "embedding": self.embeddings.embedding(index)})
                    })
                    .collect();
                json!({"object": "list", "data": data, "model": self.model})
            }
            Op::Responses => self.response_object("completed", &text),
        };
        self.with_usage(body)
    }

    fn response_object(&self, status: &str, text: &str) -> Value {
        let output = if status == "completed" {
            json!([{"type": "message", "id": self.item_id(), "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}])
        } else {
            json!([])
        };
        json!({"id": self.id, "object": "response", "created_at": self.created,
               "status": status, "model": self.model, "output": output})
    }

    fn item_id(&self) -> String {
        format!("msg_{}", self.id)
    }

    /// Frames sent as soon as the stream opens: the chat role delta, `response.created`.
    pub(crate) fn stream_open(&self) -> Option<Bytes> {
        match self.op {
            Op::Chat => Some(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)),
            Op::Responses => {
                let response = self.response_object("in_progress", "");
                Some(event(
                    "response.created",
                    json!({"response": response, "sequence_number": 0}),
                ))
            }
            Op::Completions | Op::Embeddings => None,
        }
    }

    /// The frame carrying content token `i` (0-based).
    pub(crate) fn stream_token(&self, i: u64) -> Bytes {
        let word = tokens::word(i);
        match self.op {
            Op::Responses => event(
                "response.output_text.delta",
                json!({"item_id": self.item_id(), "output_index": 0, "content_index": 0,
                       "delta": word, "sequence_number": i + 1}),
            ),
            Op::Completions => self.text_chunk(word, Value::Null),
            Op::Chat | Op::Embeddings => self.chunk(json!({"content": word}), Value::Null),
        }
    }

    /// The frames that close a stream that sent every token.
    pub(crate) fn stream_close(&self) -> Vec<Bytes> {
        let finish = Value::from(self.finish_reason);
        let mut frames = Vec::with_capacity(3);
        if self.op == Op::Responses {
            let text = tokens::completion_text(self.completion_tokens);
            let seq = self.completion_tokens + 1;
            frames.push(event(
                "response.output_text.done",
                json!({"item_id": self.item_id(), "output_index": 0, "content_index": 0,
                       "text": text, "sequence_number": seq}),
            ));
            let response = self.with_usage(self.response_object("completed", &text));
            frames.push(event(
                "response.completed",
                json!({"response": response, "sequence_number": seq + 1}),
            ));
            return frames;
        }
        frames.push(match self.op {
            Op::Completions => self.text_chunk("", finish),
            _ => self.chunk(json!({}), finish),
        });
        if self.stream_usage {
            let object = self.chunk_object();
            frames.push(data(&json!({
                "id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage_json(),
            })));
        }
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        frames
    }

    fn chunk_object(&self) -> &'static str {
        match self.op {
            Op::Completions => "text_completion",
            _ => "chat.completion.chunk",
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Value) -> Bytes {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null,
                         "finish_reason": finish_reason}],
        });
        if self.stream_usage {
            chunk["usage"] = Value::Null;
        }
        data(&chunk)
    }

    fn text_chunk(&self, text: &str, finish_reason: Value) -> Bytes {
        let mut chunk = json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": null,
                         "finish_reason": finish_reason}],
        });
        if self.stream_usage {
            chunk["usage"] = Value::Null;
        }
        data(&chunk)
    }
}

/// An SSE `data:` frame.
fn data(value: &Value) -> Bytes {
    let mut frame = b"data: ".to_vec();
    // Serializing a `Value` cannot fail.
    serde_json::to_writer(&mut frame, value).unwrap_or_default();
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// A Responses API SSE event: `event: <type>` plus `data:` carrying the same `type`.
fn event(kind: &str, mut value: Value) -> Bytes {
    value["type"] = Value::from(kind);
    let mut frame = format!("event: {kind}\n").into_bytes();
    frame.extend_from_slice(&data(&value));
    Bytes::from(frame)
}

/// The OpenAI error body `{"error":{"message","type","param","code"}}`.
pub(crate) fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

use super::*;
use serde_json::json;

fn sse(events: &[Value], done: bool) -> Vec<u8> {
    let mut s = String::new();
    for e in events {
        s.push_str(&format!("data: {e}\n\n"));
    }
    if done {
        s.push_str("data: [DONE]\n\n");
    }
    s.into_bytes()
}

fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn usage() -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
}

/// A completed stream is assembled into the chat completion a JSON client gets, tool calls
/// merged from their pieces; replaying it streams the same content and tool calls back.
#[test]
fn a_stream_assembles_and_replays() {
    let events = [
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Hel"}), None),
        chunk(json!({"content": "lo"}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "look", "arguments": "{\"q\":"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            None,
        ),
        chunk(json!({}), Some("tool_calls")),
        usage(),
    ];
    let s = Stored::from_sse(Operation::Chat, "ptu", &sse(&events, true)).unwrap();
    assert_eq!((s.input, s.output, s.backend.as_str()), (7, 3, "ptu"));
    let msg = &s.body["choices"][0]["message"];
    assert_eq!(msg["content"], "Hello");
    assert_eq!(msg["tool_calls"][0]["function"]["arguments"], "{\"q\":1}");
    assert_eq!(s.body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(s.body["object"], "chat.completion");

    let back = String::from_utf8(s.sse(Operation::Chat, false).to_vec()).unwrap();
    assert!(back.ends_with("data: [DONE]\n\n"));
    assert!(!back.contains("\"usage\""), "no usage chunk unless asked");
    let again = Stored::from_sse(
        Operation::Chat,
        "ptu",
        String::from_utf8(s.sse(Operation::Chat, true).to_vec())
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(again.body["choices"], s.body["choices"]);
    assert_eq!(again.body["usage"], s.body["usage"]);
    let json: Value = serde_json::from_slice(&s.json(Operation::Chat)).unwrap();
    assert_ne!(json["id"], "c1", "a replay has a fresh id");
    assert!(json["id"].as_str().unwrap().starts_with("chatcmpl-"));
}

/// Never stored: a stream without `[DONE]` or a finish reason (cut), a content-filtered
/// answer, an answer without usage, several choices, an incomplete response, errors.
#[test]
fn what_is_never_stored() {
    let ok = [chunk(json!({"content": "Hi"}), Some("stop")), usage()];
    assert!(Stored::from_sse(Operation::Chat, "b", &sse(&ok, true)).is_some());
    assert!(Stored::from_sse(Operation::Chat, "b", &sse(&ok, false)).is_none());
    let cut = [chunk(json!({"content": "Hi"}), None), usage()];
    assert!(Stored::from_sse(Operation::Chat, "b", &sse(&cut, true)).is_none());
    let filtered = [
        chunk(json!({"content": "Hi"}), Some("content_filter")),
        usage(),
    ];
    assert!(Stored::from_sse(Operation::Chat, "b", &sse(&filtered, true)).is_none());
    let no_usage = [chunk(json!({"content": "Hi"}), Some("stop"))];
    assert!(Stored::from_sse(Operation::Chat, "b", &sse(&no_usage, true)).is_none());

    let body = |extra: Value| {
        let mut b = json!({"id": "x", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        serde_json::to_vec(&b).unwrap()
    };
    assert!(Stored::from_json(Operation::Chat, "b", &body(json!({}))).is_some());
    let azure_filtered = body(json!({"prompt_filter_results": [{"prompt_index": 0,
        "content_filter_results": {"hate": {"filtered": true, "severity": "high"}}}]}));
    assert!(Stored::from_json(Operation::Chat, "b", &azure_filtered).is_none());
    let two = body(json!({"choices": [
        {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
        {"index": 1, "message": {"content": "b"}, "finish_reason": "stop"}]}));
    assert!(Stored::from_json(Operation::Chat, "b", &two).is_none());
    assert!(Stored::from_json(Operation::Chat, "b", br#"{"error": {"message": "x"}}"#).is_none());
    assert!(Stored::from_json(Operation::Chat, "b", &body(json!({}))[..20]).is_none());
    let incomplete = json!({"id": "resp_1", "object": "response", "status": "incomplete",
        "output": [], "usage": {"input_tokens": 1, "output_tokens": 1}});
    assert!(
        Stored::from_json(Operation::Responses, "b", incomplete.to_string().as_bytes()).is_none()
    );
    assert!(Stored::from_json(Operation::Embeddings, "b", &body(json!({}))).is_none());
}

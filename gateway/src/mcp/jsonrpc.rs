//! JSON-RPC 2.0 as MCP uses it: telling a client's message apart (request, notification,
//! response), the error answers the gateway itself gives, and the ids of an upstream's
//! requests to the client on the federated route (`"<server>:<json id>"`), so the client's
//! answer finds its way back to the upstream that asked, on any replica.
//!
//! Messages stay `serde_json::Value`s: the gateway reads the few fields it routes on and
//! forwards the rest untouched, so fields of protocol revisions newer than this code pass
//! through unchanged.

use serde_json::{Value, json};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// The gateway's own errors: an upstream down, slow or garbled; a limit reached.
pub const SERVER_ERROR: i64 = -32000;
/// A tool call refused by `tool_calls_per_min` or `tool_calls_quota`.
pub const LIMIT_ERROR: i64 = -32029;

/// What a client sent.
#[derive(Debug)]
pub enum Message {
    Request {
        id: Value,
        method: String,
        msg: Value,
    },
    Notification {
        method: String,
        msg: Value,
    },
    /// An answer to a request an upstream sent the client.
    Response {
        id: Value,
        msg: Value,
    },
}

/// Parses a client's message; the error is the JSON-RPC error to answer with.
pub fn parse(body: &[u8]) -> Result<Message, Value> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| error(Value::Null, PARSE_ERROR, "parse error"))?;
    classify(v)
}

fn classify(v: Value) -> Result<Message, Value> {
    let invalid = |why: &str| error(Value::Null, INVALID_REQUEST, why);
    let obj = match &v {
        Value::Object(o) => o,
        Value::Array(_) => return Err(invalid("batches are not supported")),
        _ => return Err(invalid("expected a JSON-RPC message")),
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid("expected \"jsonrpc\": \"2.0\""));
    }
    let id = obj.get("id").cloned();
    if let Some(id) = &id
        && !(id.is_string() || id.is_i64() || id.is_u64())
    {
        return Err(invalid("an id is a string or an integer"));
    }
    match (obj.get("method"), id) {
        (Some(Value::String(m)), Some(id)) => Ok(Message::Request {
            id,
            method: m.clone(),
            msg: v,
        }),
        (Some(Value::String(m)), None) => Ok(Message::Notification {
            method: m.clone(),
            msg: v,
        }),
        (Some(_), _) => Err(invalid("the method is a string")),
        (None, Some(id)) if obj.contains_key("result") || obj.contains_key("error") => {
            Ok(Message::Response { id, msg: v })
        }
        _ => Err(invalid("neither a request, a notification nor a response")),
    }
}

/// A JSON-RPC error answer.
pub fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// A JSON-RPC error answer with `data`.
pub fn error_data(id: Value, code: i64, message: &str, data: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
}

/// A JSON-RPC result answer.
pub fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// The id the client sees for a request `server` sent it on the federated route.
pub fn wrap_id(server: &str, id: &Value) -> Value {
    Value::String(format!("{server}:{id}"))
}

/// The server and original id of a federated request id ([`wrap_id`]); none for an id the
/// gateway did not make.
pub fn unwrap_id(id: &Value) -> Option<(&str, Value)> {
    let (server, raw) = id.as_str()?.split_once(':')?;
    let original: Value = serde_json::from_str(raw).ok()?;
    (original.is_string() || original.is_i64() || original.is_u64()).then_some((server, original))
}

/// Whether an upstream's message is a request (it has an id and a method).
pub fn is_request(msg: &Value) -> bool {
    msg.get("method").is_some() && msg.get("id").is_some_and(|i| !i.is_null())
}

/// Whether an upstream's message answers the request `id`.
pub fn answers(msg: &Value, id: &Value) -> bool {
    msg.get("method").is_none() && msg.get("id") == Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests, notifications and responses are told apart; malformed input gets -32700 or
    /// -32600, never a panic.
    #[test]
    fn classifies() {
        let r = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
        assert!(matches!(r, Message::Request { ref method, .. } if method == "tools/list"));
        let n = parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(matches!(n, Message::Notification { .. }));
        let a = parse(br#"{"jsonrpc":"2.0","id":"x","result":{}}"#).unwrap();
        assert!(matches!(a, Message::Response { .. }));
        let code = |b: &[u8]| parse(b).unwrap_err()["error"]["code"].as_i64().unwrap();
        assert_eq!(code(b"{not json"), PARSE_ERROR);
        assert_eq!(code(b""), PARSE_ERROR);
        assert_eq!(code(b"[]"), INVALID_REQUEST);
        assert_eq!(code(b"42"), INVALID_REQUEST);
        assert_eq!(code(br#"{"id":1,"method":"x"}"#), INVALID_REQUEST);
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#),
            INVALID_REQUEST
        );
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","id":1,"method":7}"#),
            INVALID_REQUEST
        );
        assert_eq!(code(br#"{"jsonrpc":"2.0","id":1}"#), INVALID_REQUEST);
    }

    /// A federated request id names its server and round-trips the original id exactly.
    #[test]
    fn ids_round_trip() {
        for id in [json!(0), json!(17), json!("abc"), json!("a:b\"c")] {
            let w = wrap_id("tickets", &id);
            let (server, back) = unwrap_id(&w).unwrap();
            assert_eq!(server, "tickets");
            assert_eq!(back, id);
        }
        assert_eq!(unwrap_id(&json!(5)), None);
        assert_eq!(unwrap_id(&json!("no-colon")), None);
        assert_eq!(unwrap_id(&json!("s:{\"x\":1}")), None);
        assert_eq!(unwrap_id(&json!("s:not json")), None);
    }
}

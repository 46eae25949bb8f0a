//! Unit tests of the OpenAPI → MCP conversion, one file per module.

mod document;
mod load;
mod names;
mod operations;
mod request;
mod schema;
mod validate;

use super::document::Document;

/// A document from YAML text that must parse.
fn doc(yaml: &str) -> Document {
    match Document::parse(yaml, false) {
        Ok(d) => d,
        Err(p) => panic!("test document does not parse: {} {}", p.at, p.what),
    }
}

/// What the MCP layer needs to share the tools between tasks and await a call in a handler.
#[test]
fn tools_are_shareable_and_calls_are_send() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<super::OpenApiTools>();
    send_sync::<super::Catalog>();
    // Compiles only while a call's future is `Send` (axum handlers need that).
    fn _call_is_send(t: &super::OpenApiTools) -> impl std::future::Future + Send + '_ {
        t.call("tool", serde_json::Value::Null)
    }
}

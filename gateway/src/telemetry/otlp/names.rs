//! The trace id a client sent (for the usage record, with or without OTLP) and the GenAI
//! semantic-convention names of operations and providers.

use crate::request::Operation;
use http::HeaderMap;
use tollgate_common::config::BackendApi;

/// The trace id of a client's `traceparent`, if well formed by the same rules as the span's
/// parent (lowercase hex, neither id all zeros): with OTLP on or off, a usage record names the
/// same trace.
pub fn incoming_trace_id(headers: &HeaderMap) -> String {
    let mut id = String::new();
    if let Some((trace, ..)) = super::span::parse_traceparent(headers) {
        super::span::push_hex(&mut id, &trace);
    }
    id
}

/// `gen_ai.operation.name` of an operation.
pub fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Chat | Operation::Responses => "chat",
        Operation::Completions => "text_completion",
        Operation::Embeddings => "embeddings",
    }
}

/// `gen_ai.provider.name` (and the older `gen_ai.system`) of a backend kind.
pub fn provider_name(api: BackendApi) -> &'static str {
    match api {
        BackendApi::Azure => "azure.ai.openai",
        BackendApi::Openai => "openai",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A well-formed traceparent yields its trace id; junk, uppercase and the all-zero id yield
    /// none.
    #[test]
    fn incoming_trace_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(incoming_trace_id(&h), "");
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(incoming_trace_id(&h), "4bf92f3577b34da6a3ce929d0e0e4736");
        // W3C trace context allows lowercase hex only; the span ignores such a parent too.
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(incoming_trace_id(&h), "");
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        assert_eq!(incoming_trace_id(&h), "");
        h.insert("traceparent", HeaderValue::from_static("nonsense"));
        assert_eq!(incoming_trace_id(&h), "");
    }
}

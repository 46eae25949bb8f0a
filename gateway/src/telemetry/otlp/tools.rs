//! MCP tool calls in OTLP: a span per call (`gen_ai.operation.name = execute_tool`, named
//! `execute_tool <tool>` as the GenAI conventions name it) continuing the client's trace, and
//! the `tollgate.mcp.tool_calls` counter and `tollgate.mcp.tool_call.duration` histogram.

use super::{Otel, RequestSpan};
use http::HeaderMap;
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::time::SystemTime;

impl Otel {
    /// The span of one tool call, a child of the client's `traceparent` when it sent one.
    pub fn start_tool_span(&self, headers: &HeaderMap, tool: &str) -> RequestSpan {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(format!("execute_tool {tool}"))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            span,
            start: SystemTime::now(),
        }
    }

    /// Counts one finished call and its duration (labels: server, consumer, team, outcome).
    pub fn tool_call(&self, server: &str, consumer: &str, team: &str, outcome: &str, secs: f64) {
        let meter = self.meter_provider.meter("tollgate");
        let attrs = [
            KeyValue::new("mcp.server", server.to_string()),
            KeyValue::new("tollgate.consumer", consumer.to_string()),
            KeyValue::new("tollgate.team", team.to_string()),
            KeyValue::new("tollgate.outcome", outcome.to_string()),
        ];
        meter
            .u64_counter("tollgate.mcp.tool_calls")
            .with_description("MCP tool calls by server, consumer, team and outcome")
            .build()
            .add(1, &attrs);
        meter
            .f64_histogram("tollgate.mcp.tool_call.duration")
            .with_unit("s")
            .with_description("MCP tool calls from request to answer")
            .build()
            .record(secs, &attrs[..1]);
    }
}

impl RequestSpan {
    /// Ends a tool call's span with its attributes.
    pub fn end_tool(mut self, server: &str, tool: &str, consumer: &str, team: &str, outcome: &str) {
        self.span.set_attributes([
            KeyValue::new("gen_ai.operation.name", "execute_tool"),
            KeyValue::new("gen_ai.tool.name", tool.to_string()),
            KeyValue::new("mcp.server", server.to_string()),
            KeyValue::new("tollgate.consumer", consumer.to_string()),
            KeyValue::new("tollgate.team", team.to_string()),
            KeyValue::new("tollgate.outcome", outcome.to_string()),
        ]);
        if outcome != "ok" {
            self.span.set_status(Status::error(outcome.to_string()));
        }
        self.span.end();
    }
}

//! MCP tool calls in OTLP: a span per call (`gen_ai.operation.name = execute_tool`, named
//! `execute_tool <tool>` as the GenAI conventions name it) continuing the client's trace, and
//! the `tollgate.mcp.tool_calls` counter and `tollgate.mcp.tool_call.duration` histogram.

use super::wire::Value;
use super::{Otel, RequestSpan};
use std::time::SystemTime;

impl Otel {
    /// Counts one finished call and its duration (labels: server, consumer, team, outcome).
    pub fn tool_call(&self, server: &str, consumer: &str, team: &str, outcome: &str, secs: f64) {
        self.aggregates
            .tool_call(server, consumer, team, outcome, secs);
    }
}

impl RequestSpan {
    /// Ends a tool call's span with its attributes.
    pub fn end_tool(self, server: &str, tool: &str, consumer: &str, team: &str, outcome: &str) {
        let error = (outcome != "ok").then_some(outcome);
        self.end(&["execute_tool ", tool], SystemTime::now(), error, |m| {
            m.attr(9, "gen_ai.operation.name", Value::Str("execute_tool"));
            m.attr(9, "gen_ai.tool.name", Value::Str(tool));
            m.attr(9, "mcp.server", Value::Str(server));
            m.attr(9, "tollgate.consumer", Value::Str(consumer));
            m.attr(9, "tollgate.team", Value::Str(team));
            m.attr(9, "tollgate.outcome", Value::Str(outcome));
        });
    }
}

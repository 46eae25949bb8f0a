//! `tools/call`: the limit check (one atomic store step: `tool_calls_per_min`,
//! `tool_calls_quota`), the call relayed, and its outcome recorded once it is known — in
//! `/metrics`, in the usage totals (`tollgate usage --by server|tool`), and as an OTLP span
//! (`gen_ai.operation.name = execute_tool`) continuing the client's trace.
//!
//! A refused call is answered in-band (a JSON-RPC error naming the limit, with
//! `error.data.retry_after_ms`): a transport error would end the client's session.

use super::McpState;
use super::json;
use super::jsonrpc::{self, LIMIT_ERROR};
use super::serve::{Who, fault_response, relay};
use super::upstream::{Carry, Upstream};
use crate::clock::now_ms;
use bytes::Bytes;
use http::HeaderMap;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;
use tollgate_common::config::OnError;
use tollgate_quota::{Store, ToolCallRequest, ToolDecision, ToolUsage};

/// Most tool names per server kept as metric labels; later ones count as `other`.
const MAX_TOOL_LABELS: usize = 200;
/// Upper bounds (seconds) of the duration histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// What an unknown tool — or one outside the caller's allow-list — gets.
pub fn unknown_tool(id: Value, tool: &str) -> Value {
    jsonrpc::error(
        id,
        jsonrpc::INVALID_PARAMS,
        &format!("Unknown tool: {tool}"),
    )
}

/// How a call ended, as metrics and spans name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The tool answered with a JSON-RPC error or `isError: true`.
    Error,
    /// The upstream was down, slow or garbled.
    UpstreamError,
    /// A limit refused it.
    Refused,
    /// The client went away before the answer.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Refused => "refused",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome an answer carries.
    pub fn of(answer: &Value) -> Outcome {
        if answer.get("error").is_some() {
            let code = answer["error"]["code"].as_i64();
            if code == Some(jsonrpc::SERVER_ERROR)
                && answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("MCP server "))
            {
                return Outcome::UpstreamError;
            }
            return Outcome::Error;
        }
        if answer["result"]["isError"].as_bool() == Some(true) {
            Outcome::Error
        } else {
            Outcome::Ok
        }
    }
}

/// A duration histogram: counts per bucket (cumulative), sum, count.
type Buckets = ([u64; BUCKETS.len()], f64, u64);

/// Tool-call counters and durations for `/metrics`. Labels come from configuration (servers)
/// and from the tools upstreams listed (bounded per server), never from arbitrary input.
pub struct ToolMetrics {
    /// Tools each server listed: only these are labels.
    listed: Mutex<HashMap<String, HashSet<String>>>,
    calls: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// Per server: bucket counts, sum, count.
    durations: Mutex<BTreeMap<String, Buckets>>,
}

impl ToolMetrics {
    pub fn new(upstreams: &[Arc<Upstream>]) -> ToolMetrics {
        ToolMetrics {
            listed: Mutex::new(
                upstreams
                    .iter()
                    .map(|u| (u.name.clone(), HashSet::new()))
                    .collect(),
            ),
            calls: Mutex::default(),
            durations: Mutex::default(),
        }
    }

    /// Tools a server listed become labels (up to [`MAX_TOOL_LABELS`]).
    pub fn listed(&self, server: &str, tools: &[Value]) {
        let mut g = self.listed.lock();
        if let Some(set) = g.get_mut(server) {
            for t in tools.iter().filter_map(|t| t["name"].as_str()) {
                if set.len() < MAX_TOOL_LABELS {
                    set.insert(t.to_string());
                }
            }
        }
    }

    /// The label of `tool`: its name when the server listed it or it ran successfully (so it
    /// exists; learnt up to [`MAX_TOOL_LABELS`]), else `other`.
    fn label(&self, server: &str, tool: &str, ran: bool) -> String {
        let mut g = self.listed.lock();
        let Some(set) = g.get_mut(server) else {
            return "other".into();
        };
        if ran && set.len() < MAX_TOOL_LABELS {
            set.insert(tool.to_string());
        }
        if set.contains(tool) {
            tool.to_string()
        } else {
            "other".into()
        }
    }

    pub fn record(&self, server: &str, tool: &str, outcome: Outcome, secs: Option<f64>) {
        let tool = self.label(server, tool, outcome == Outcome::Ok);
        *self
            .calls
            .lock()
            .entry((server.to_string(), tool, outcome.as_str()))
            .or_default() += 1;
        if let Some(secs) = secs {
            let mut d = self.durations.lock();
            let e = d
                .entry(server.to_string())
                .or_insert(([0; BUCKETS.len()], 0.0, 0));
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    e.0[i] += 1;
                }
            }
            e.1 += secs;
            e.2 += 1;
        }
    }

    /// The Prometheus text of the counters and the histogram.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP tollgate_mcp_tool_calls_total MCP tool calls by server, tool and outcome\n\
             # TYPE tollgate_mcp_tool_calls_total counter\n",
        );
        for ((server, tool, outcome), n) in self.calls.lock().iter() {
            let _ = writeln!(
                out,
                "tollgate_mcp_tool_calls_total{{server=\"{server}\",tool=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(tool)
            );
        }
        out.push_str(
            "# HELP tollgate_mcp_tool_call_duration_seconds MCP tool calls from request to answer, by server\n\
             # TYPE tollgate_mcp_tool_call_duration_seconds histogram\n",
        );
        for (server, (buckets, sum, count)) in self.durations.lock().iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tollgate_mcp_tool_call_duration_seconds_bucket{{server=\"{server}\",le=\"{b}\"}} {}",
                    buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "tollgate_mcp_tool_call_duration_seconds_bucket{{server=\"{server}\",le=\"+Inf\"}} {count}\n\
                 tollgate_mcp_tool_call_duration_seconds_sum{{server=\"{server}\"}} {sum}\n\
                 tollgate_mcp_tool_call_duration_seconds_count{{server=\"{server}\"}} {count}"
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One admitted call's bookkeeping: recorded exactly once, when its answer passes or (as
/// `cancelled`) when the client leaves first.
struct Record {
    s: McpState,
    server: String,
    tool: String,
    consumer: String,
    team: String,
    started: Instant,
    span: Option<crate::telemetry::RequestSpan>,
    done: bool,
}

impl Record {
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        self.s
            .mcp
            .metrics
            .record(&self.server, &self.tool, outcome, Some(secs));
        if let Some(span) = self.span.take() {
            span.end_tool(
                &self.server,
                &self.tool,
                &self.consumer,
                &self.team,
                outcome.as_str(),
            );
        }
        if let Some(otel) = &self.s.gw.telemetry.otel {
            otel.tool_call(
                &self.server,
                &self.consumer,
                &self.team,
                outcome.as_str(),
                secs,
            );
        }
        let row = ToolUsage {
            day: tollgate_quota::day_of(now_ms() / 1000),
            consumer: self.consumer.clone(),
            team: self.team.clone(),
            server: self.server.clone(),
            tool: self
                .s
                .mcp
                .metrics
                .label(&self.server, &self.tool, outcome == Outcome::Ok),
            calls: 1,
            errors: u64::from(outcome != Outcome::Ok),
        };
        let store = self.s.gw.limits.store.clone();
        // Off the request path; the totals are a report, not a limit.
        tokio::spawn(async move {
            if let Err(e) = store.add_tool_usage(&[row]).await {
                tracing::warn!(error = %e, "could not add MCP tool usage");
            }
        });
        tracing::debug!(
            target: "tollgate::usage",
            server = %self.server, tool = %self.tool, consumer = %self.consumer,
            team = %self.team, outcome = outcome.as_str(),
            latency_ms = (secs * 1000.0) as u64, "tool call"
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
}

/// The limits step: `None` admits, `Some(answer)` refuses in-band.
async fn check_limits(s: &McpState, who: &Who, id: &Value) -> Option<Value> {
    let req = ToolCallRequest {
        consumer: &who.caller.consumer,
        per_min: who.tools.per_min,
        quota: who.tools.quota,
        quota_period: who.tools.period,
        require_record: who.caller.require_record,
    };
    let refuse = |limit: &str, n: u64, retry_after_ms: u64| {
        let msg = format!("tool call refused: {limit} = {n} reached; retry in {retry_after_ms} ms");
        jsonrpc::error_data(
            id.clone(),
            LIMIT_ERROR,
            &msg,
            json!({"limit": limit, "value": n, "retry_after_ms": retry_after_ms}),
        )
    };
    match s.gw.limits.store.tool_call(&req).await {
        Ok(ToolDecision::Admitted { .. }) => None,
        Ok(ToolDecision::RateLimited {
            retry_after_ms,
            limit,
        }) => Some(refuse("tool_calls_per_min", limit, retry_after_ms)),
        Ok(ToolDecision::QuotaExceeded {
            retry_after_ms,
            limit,
        }) => Some(refuse("tool_calls_quota", limit, retry_after_ms)),
        Ok(ToolDecision::Disabled) => Some(jsonrpc::error(
            id.clone(),
            LIMIT_ERROR,
            "tool call refused: the consumer is disabled",
        )),
        Ok(ToolDecision::UnknownConsumer) => Some(jsonrpc::error(
            id.clone(),
            LIMIT_ERROR,
            "tool call refused: unknown consumer",
        )),
        Err(e) if s.gw.config.store.on_error == OnError::FailClosed => {
            tracing::warn!(error = %e, "store unavailable; MCP tool call refused (fail_closed)");
            Some(jsonrpc::error_data(
                id.clone(),
                jsonrpc::SERVER_ERROR,
                "tool call refused: the limits store is unavailable",
                json!({"retry_after_ms": 1000}),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "store unavailable; MCP tool call admitted unlimited");
            None
        }
    }
}

/// A `tools/call` already allow-listed: limited, relayed, recorded. `wrap`: the federated
/// route (the upstream's own requests get ids naming it).
#[allow(clippy::too_many_arguments)]
pub async fn call(
    s: &McpState,
    who: &Who,
    u: &Arc<Upstream>,
    carry: &Carry<'_>,
    id: Value,
    body: Bytes,
    tool: &str,
    wrap: bool,
    headers: &HeaderMap,
) -> axum::response::Response {
    if let Some(refusal) = check_limits(s, who, &id).await {
        s.mcp.metrics.record(&u.name, tool, Outcome::Refused, None);
        return json(refusal);
    }
    let span = s.gw.telemetry.otel.as_ref().map(|o| o.start_span(headers));
    let mut carry = carry.clone();
    if let Some(tp) = span.as_ref().map(|sp| sp.traceparent()) {
        carry.traceparent = Some(tp);
    }
    let mut record = Record {
        s: s.clone(),
        server: u.name.clone(),
        tool: tool.to_string(),
        consumer: who.caller.consumer.to_string(),
        team: who.team.clone(),
        started: Instant::now(),
        span,
        done: false,
    };
    if let Some(rest) = &u.rest {
        let answer = super::rest::call(rest, id, &body, tool).await;
        record.finish(Outcome::of(&answer));
        return json(answer);
    }
    match s.mcp.send(u, &carry, body).await {
        Ok(Some(reply)) => {
            let observe = Box::new(move |answer: &Value| {
                let mut record = record;
                record.finish(Outcome::of(answer));
            });
            relay(reply, id, u, Some(observe), wrap)
        }
        Ok(None) => {
            record.finish(Outcome::UpstreamError);
            json(super::upstream::Fault::Garbage("no answer".into()).to_jsonrpc(&u.name, id))
        }
        Err(f) => {
            record.finish(Outcome::UpstreamError);
            fault_response(&u.name, f, id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outcomes: JSON-RPC errors, `isError` results, the gateway's upstream faults, success.
    #[test]
    fn outcomes() {
        let ok = json!({"jsonrpc": "2.0", "id": 1, "result": {"content": []}});
        let tool_error = json!({"jsonrpc": "2.0", "id": 1, "result": {"isError": true}});
        let rpc_error = jsonrpc::error(json!(1), jsonrpc::INVALID_PARAMS, "bad");
        let fault = super::super::upstream::Fault::Timeout(5).to_jsonrpc("t1", json!(1));
        assert_eq!(Outcome::of(&ok), Outcome::Ok);
        assert_eq!(Outcome::of(&tool_error), Outcome::Error);
        assert_eq!(Outcome::of(&rpc_error), Outcome::Error);
        assert_eq!(Outcome::of(&fault), Outcome::UpstreamError);
    }

    /// Tool labels stay bounded: listed or successfully run tools by name, others `other`.
    #[test]
    fn labels_are_bounded() {
        let m = ToolMetrics {
            listed: Mutex::new([("t1".to_string(), HashSet::new())].into()),
            calls: Mutex::default(),
            durations: Mutex::default(),
        };
        m.listed("t1", &[json!({"name": "search"})]);
        m.record("t1", "search", Outcome::Error, Some(0.02));
        m.record("t1", "made-up", Outcome::Error, None);
        m.record("t1", "ran", Outcome::Ok, Some(0.2));
        m.record("nope", "x", Outcome::Ok, None);
        let text = m.render();
        for line in [
            "tollgate_mcp_tool_calls_total{server=\"t1\",tool=\"search\",outcome=\"error\"} 1",
            "tollgate_mcp_tool_calls_total{server=\"t1\",tool=\"other\",outcome=\"error\"} 1",
            "tollgate_mcp_tool_calls_total{server=\"t1\",tool=\"ran\",outcome=\"ok\"} 1",
            "tollgate_mcp_tool_calls_total{server=\"nope\",tool=\"other\",outcome=\"ok\"} 1",
            "tollgate_mcp_tool_call_duration_seconds_bucket{server=\"t1\",le=\"0.025\"} 1",
            "tollgate_mcp_tool_call_duration_seconds_count{server=\"t1\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        for _ in 0..MAX_TOOL_LABELS + 10 {
            m.record(
                "t1",
                &format!("n{}", m.calls.lock().len()),
                Outcome::Ok,
                None,
            );
        }
        assert!(m.listed.lock()["t1"].len() <= MAX_TOOL_LABELS);
    }
}

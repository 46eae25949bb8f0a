//! What the gateway tells operators about each request, behind one [`Telemetry::record`]:
//! Prometheus counters at `/metrics` ([`prometheus`]), OTLP spans, metrics and usage log records
//! when `telemetry.otlp_endpoint` is set ([`otlp`]), and one `tollgate::usage` debug event. The
//! usage worker calls it once per request, off the request path, when the tokens are known.

mod histogram;
pub mod otlp;
pub mod prometheus;
mod series;

pub use otlp::{Otel, RequestSpan, incoming_trace_id};
pub use prometheus::Metrics;

use crate::dimensions::Dimensions;
use crate::record::RequestRecord;
use http::HeaderMap;
use std::sync::Arc;
use tollgate_common::TokenUsage;
use tollgate_quota::{BudgetScope, BudgetUse};

/// Every telemetry sink.
#[derive(Clone)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    /// OTLP export, when configured.
    pub otel: Option<Arc<Otel>>,
    /// `[telemetry] dimensions`: read at admission, kept with the usage.
    pub dims: Arc<Dimensions>,
}

impl Telemetry {
    /// Starts a request's span (continuing the client's `traceparent`) when OTLP is on.
    pub fn start_span(&self, headers: &HeaderMap) -> Option<RequestSpan> {
        self.otel.as_ref().map(|o| o.start_span(headers))
    }

    /// Reports one finished request: counters, the span (ended here), the usage event.
    pub fn record(
        &self,
        r: &RequestRecord,
        usage: &TokenUsage,
        cost_pico: u64,
        span: Option<RequestSpan>,
    ) {
        self.metrics.record(r, usage, cost_pico);
        if let Some(otel) = &self.otel {
            otel.record(r, usage, cost_pico, span);
        }
        let (a, o) = (&r.admitted, &r.observed);
        tracing::debug!(
            target: "tollgate::usage",
            request_id = %a.request_id,
            trace_id = %a.trace_id,
            consumer = %a.consumer,
            team = %a.team,
            model = %a.model,
            backend = r.backend_name().unwrap_or("-"),
            priority = o.backend.as_ref().map(|b| b.config.priority),
            input_tokens = usage.input,
            output_tokens = usage.output,
            cached_tokens = usage.cached_input,
            cost_pico,
            status = o.status,
            stream = a.stream,
            latency_ms = r.duration.as_millis() as u64,
            ttft_ms = o.first_byte.map(|d| d.as_millis() as u64),
            "usage"
        );
    }

    /// A budget after an admission: gauges in `/metrics` and OTLP.
    pub fn budget(&self, scope: BudgetScope, id: &str, b: &BudgetUse, currency: &str) {
        // OTLP exports the same rows as gauges.
        self.metrics.budget(scope, id, b, currency);
    }

    /// Settlements dropped because the buffer was full.
    pub fn usage_dropped(&self, n: u64) {
        self.metrics.usage_dropped(n);
    }
}

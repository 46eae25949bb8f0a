//! OTLP export (HTTP/protobuf to `telemetry.otlp_endpoint`): one span per request with GenAI
//! semantic-convention attributes, GenAI and tollgate metrics, one log record per usage record.
//!
//! The request path only starts a span ([`Otel::start_span`]: continue the client's
//! `traceparent`, pick a span id) and carries it with the request's meter; everything else —
//! attributes, metrics, the usage log record, ending the span — happens in the usage worker
//! once the tokens are known ([`Otel::record`]). The SDK's batch processors queue in bounded
//! memory and export from their own threads, so a slow or dead collector never blocks or fails
//! a request: what does not fit is dropped, and a failing export costs one warning a minute.
//! Exports go through the gateway's own reqwest client on the gateway's runtime
//! ([`ExportClient`]). [`Otel::shutdown`] flushes everything at exit, after the usage worker
//! has accounted the last requests.

//!
//! - [`span`]: the request span, `traceparent` in and out, GenAI names.
//! - [`export`]: the exporters' HTTP client.
//! - [`tools`]: MCP tool-call spans and metrics.

mod export;
mod span;
mod tools;

pub use span::{RequestSpan, incoming_trace_id, operation_name, provider_name};

use crate::record::RequestRecord;
use anyhow::Context as _;
use export::ExportClient;
use http::HeaderMap;
use opentelemetry::KeyValue;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider as _};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tollgate_common::TokenUsage;
use tollgate_common::config::TelemetryConfig;

/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds buckets for request duration and time to first token.
const SECONDS_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Token-count buckets, as the GenAI semantic conventions advise.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// The OTLP pipelines and the instruments the usage worker records into.
pub struct Otel {
    tracer: SdkTracer,
    logger: SdkLogger,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    logger_provider: SdkLoggerProvider,
    /// `gen_ai.client.token.usage`: tokens per request, by `gen_ai.token.type`.
    token_usage: Histogram<u64>,
    /// `tollgate.tokens`: the showback counter by consumer, team, model, backend and type.
    tokens: Counter<u64>,
    /// `tollgate.cost`: cost in pico-units by consumer, team, model and backend.
    cost: Counter<u64>,
    /// `tollgate.requests`: metered requests by consumer, team, model, backend and status.
    requests: Counter<u64>,
    /// `gen_ai.client.operation.duration`: request to end of response, seconds.
    duration: Histogram<f64>,
    /// `tollgate.budget.limit`, `.spent`, `.remaining`: budgets by scope and id, in the price
    /// currency, as this replica last saw them.
    budget_limit: Gauge<f64>,
    budget_spent: Gauge<f64>,
    budget_remaining: Gauge<f64>,
    /// `gen_ai.server.time_to_first_token`: request to the backend's first response byte.
    ttft: Histogram<f64>,
}

impl Otel {
    /// Starts the three pipelines when `telemetry.otlp_endpoint` is set; `None` otherwise.
    /// Must run inside the gateway's Tokio runtime: exports are sent from it.
    pub fn start(config: &TelemetryConfig) -> anyhow::Result<Option<Arc<Otel>>> {
        let Some(endpoint) = config.otlp_endpoint.as_deref() else {
            return Ok(None);
        };
        let base = endpoint.trim_end_matches('/');
        let client = ExportClient::new()?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();

        // One builder shape for the three signals: HTTP/protobuf through the gateway's client.
        macro_rules! exporter {
            ($kind:ident, $path:literal, $what:literal) => {
                opentelemetry_otlp::$kind::builder()
                    .with_http()
                    .with_http_client(client.clone())
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(format!("{base}/v1/{}", $path))
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
                    .context(concat!("telemetry.otlp_endpoint: ", $what, " exporter"))?
            };
        }
        let spans = exporter!(SpanExporter, "traces", "traces");
        let metrics = exporter!(MetricExporter, "metrics", "metrics");
        let logs = exporter!(LogExporter, "logs", "logs");

        // Batch intervals and queue sizes follow the standard OTEL_BSP_*, OTEL_BLRP_* and
        // OTEL_METRIC_EXPORT_INTERVAL variables.
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_periodic_exporter(metrics)
            .with_resource(resource.clone())
            .build();
        let logger_provider = SdkLoggerProvider::builder()
            .with_batch_exporter(logs)
            .with_resource(resource)
            .build();

        let meter = meter_provider.meter("tollgate");
        let otel = Otel {
            tracer: tracer_provider.tracer("tollgate"),
            logger: logger_provider.logger("tollgate"),
            token_usage: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Tokens used per request, by gen_ai.token.type")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            tokens: meter
                .u64_counter("tollgate.tokens")
                .with_unit("{token}")
                .with_description("Tokens used, by consumer, team, model, backend and type")
                .build(),
            cost: meter
                .u64_counter("tollgate.cost")
                .with_unit("pico")
                .with_description("Cost in pico-units (1e-12 of the price currency)")
                .build(),
            requests: meter
                .u64_counter("tollgate.requests")
                .with_unit("{request}")
                .with_description("Metered requests, by consumer, team, model, backend, status")
                .build(),
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("Time from request to end of response")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            ttft: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description("Time from request to the backend's first response byte")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            budget_limit: meter
                .f64_gauge("tollgate.budget.limit")
                .with_description("Budget per window, in the price currency")
                .build(),
            budget_spent: meter
                .f64_gauge("tollgate.budget.spent")
                .with_description(
                    "Budget spent in the current window (reservations in flight included)",
                )
                .build(),
            budget_remaining: meter
                .f64_gauge("tollgate.budget.remaining")
                .with_description("Budget left in the current window")
                .build(),
            tracer_provider,
            meter_provider,
            logger_provider,
        };
        tracing::info!(endpoint = base, "OTLP export on");
        Ok(Some(Arc::new(otel)))
    }

    /// A budget after an admission: the three gauges, by scope, id, period and currency.
    pub fn budget(
        &self,
        scope: &'static str,
        id: &str,
        limit: f64,
        spent: f64,
        period: &'static str,
        currency: &str,
    ) {
        let attrs = [
            KeyValue::new("tollgate.budget.scope", scope),
            KeyValue::new("tollgate.budget.id", id.to_string()),
            KeyValue::new("tollgate.budget.period", period),
            KeyValue::new("tollgate.currency", currency.to_string()),
        ];
        self.budget_limit.record(limit, &attrs);
        self.budget_spent.record(spent, &attrs);
        self.budget_remaining.record(limit - spent, &attrs);
    }

    /// Starts the request's span, continuing the client's `traceparent` when it has one.
    pub fn start_span(&self, headers: &HeaderMap) -> RequestSpan {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder("gateway")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            span,
            start: SystemTime::now(),
        }
    }

    /// Records one usage record: ends its span with the GenAI attributes, adds to the metrics
    /// and emits the usage log record. Runs in the usage worker.
    pub fn record(
        &self,
        r: &RequestRecord,
        u: &TokenUsage,
        cost_pico: u64,
        span: Option<RequestSpan>,
    ) {
        let (adm, o) = (&r.admitted, &r.observed);
        let op = operation_name(adm.op);
        let (backend, provider, response_model, priority) = match &o.backend {
            Some(b) => (
                b.name.to_string(),
                provider_name(b.config.api),
                b.deployment(&adm.model).to_string(),
                b.config.priority as i64,
            ),
            None => ("-".to_string(), "-", String::new(), 0),
        };
        let status = o.status as i64;
        let mut span_ids = None;
        if let Some(mut s) = span {
            s.span.update_name(format!("{op} {}", adm.model));
            let mut attrs = vec![
                KeyValue::new("gen_ai.operation.name", op),
                KeyValue::new("gen_ai.request.model", adm.model.clone()),
                KeyValue::new("tollgate.consumer", adm.consumer.to_string()),
                KeyValue::new("tollgate.team", adm.team.clone()),
                KeyValue::new("tollgate.backend", backend.clone()),
                KeyValue::new("tollgate.request_id", adm.request_id.clone()),
                KeyValue::new("tollgate.stream", adm.stream),
                KeyValue::new("tollgate.cost_pico", cost_pico as i64),
                KeyValue::new("tollgate.failovers", o.failovers as i64),
                KeyValue::new("http.response.status_code", status),
                KeyValue::new("gen_ai.usage.input_tokens", u.input as i64),
                KeyValue::new("gen_ai.usage.output_tokens", u.output as i64),
            ];
            if o.backend.is_some() {
                attrs.extend([
                    KeyValue::new("gen_ai.provider.name", provider),
                    KeyValue::new("gen_ai.system", provider),
                    KeyValue::new("gen_ai.response.model", response_model.clone()),
                    KeyValue::new("tollgate.priority", priority),
                ]);
            }
            if u.cached_input > 0 {
                attrs.push(KeyValue::new(
                    "gen_ai.usage.cache_read.input_tokens",
                    u.cached_input as i64,
                ));
            }
            if let Some(c) = &o.cache {
                attrs.push(KeyValue::new("tollgate.cache.name", c.cache.to_string()));
                attrs.push(KeyValue::new("tollgate.cache.result", c.result));
                if let Some(d) = c.distance {
                    attrs.push(KeyValue::new("tollgate.cache.distance", d));
                }
            }
            if let Some(s) = &o.saved {
                attrs.push(KeyValue::new(
                    "tollgate.cache.saved_tokens",
                    s.total().min(i64::MAX as u64) as i64,
                ));
            }
            if let Some(t) = o.first_byte {
                attrs.push(KeyValue::new(
                    "tollgate.ttft_ms",
                    t.as_millis().min(i64::MAX as u128) as i64,
                ));
            }
            attrs.extend(
                adm.dims
                    .iter()
                    .map(|(k, v)| KeyValue::new(format!("tollgate.dimension.{k}"), v.clone())),
            );
            s.span.set_attributes(attrs);
            if o.status >= 500 {
                s.span
                    .set_status(Status::error(format!("status {}", o.status)));
            }
            let sc = s.span.span_context();
            span_ids = Some((sc.trace_id(), sc.span_id(), sc.trace_flags()));
            s.span.end_with_timestamp(s.start + r.duration);
        }

        // Metrics: the semantic-convention attributes on the GenAI instruments, the bounded
        // showback labels on tollgate's own.
        let mut gen_ai = vec![
            KeyValue::new("gen_ai.operation.name", op),
            KeyValue::new("gen_ai.request.model", adm.model.clone()),
        ];
        if o.backend.is_some() {
            gen_ai.push(KeyValue::new("gen_ai.provider.name", provider));
            gen_ai.push(KeyValue::new(
                "gen_ai.response.model",
                response_model.clone(),
            ));
        }
        let showback = [
            KeyValue::new("tollgate.consumer", adm.consumer.to_string()),
            KeyValue::new("tollgate.team", adm.team.clone()),
            KeyValue::new("gen_ai.request.model", adm.model.clone()),
            KeyValue::new("tollgate.backend", backend.clone()),
        ];
        for (kind, v) in [("input", u.input), ("output", u.output)] {
            if o.backend.is_some() || v > 0 {
                let mut a = gen_ai.clone();
                a.push(KeyValue::new("gen_ai.token.type", kind));
                self.token_usage.record(v, &a);
            }
        }
        for (kind, v) in [
            ("input", u.input),
            ("output", u.output),
            ("cached_input", u.cached_input),
        ] {
            if v > 0 {
                let mut a = showback.to_vec();
                a.push(KeyValue::new("gen_ai.token.type", kind));
                self.tokens.add(v, &a);
            }
        }
        if cost_pico > 0 {
            self.cost.add(cost_pico, &showback);
        }
        let mut a = showback.to_vec();
        a.push(KeyValue::new("http.response.status_code", status));
        self.requests.add(1, &a);
        let mut d = gen_ai.clone();
        d.push(KeyValue::new("http.response.status_code", status));
        self.duration.record(r.duration.as_secs_f64(), &d);
        if let Some(t) = o.first_byte {
            self.ttft.record(t.as_secs_f64(), &gen_ai);
        }

        // The usage record as one log record.
        let mut rec = self.logger.create_log_record();
        rec.set_event_name("tollgate.usage");
        rec.set_severity_number(Severity::Info);
        rec.set_severity_text("INFO");
        rec.set_timestamp(SystemTime::now());
        rec.set_body("usage".into());
        let text = |v: String| AnyValue::from(v);
        let int = |v: i64| AnyValue::from(v);
        let attrs: [(&'static str, AnyValue); 20] = [
            ("request_id", text(adm.request_id.clone())),
            ("trace_id", text(adm.trace_id.clone())),
            ("consumer", text(adm.consumer.to_string())),
            ("team", text(adm.team.clone())),
            ("model", text(adm.model.clone())),
            ("operation", text(op.into())),
            ("backend", text(backend)),
            ("provider", text(provider.into())),
            ("response_model", text(response_model)),
            ("priority", int(priority)),
            ("input_tokens", int(u.input as i64)),
            ("output_tokens", int(u.output as i64)),
            ("cached_input_tokens", int(u.cached_input as i64)),
            ("cost_pico", int(cost_pico as i64)),
            ("status", int(status)),
            ("stream", AnyValue::from(adm.stream)),
            ("complete", AnyValue::from(o.complete)),
            ("failovers", int(o.failovers as i64)),
            ("latency_ms", int(r.duration.as_millis() as i64)),
            (
                "ttft_ms",
                int(o.first_byte.map_or(-1, |t| t.as_millis() as i64)),
            ),
        ];
        rec.add_attributes(attrs);
        rec.add_attributes(
            adm.dims
                .iter()
                .map(|(k, v)| (format!("dimension.{k}"), AnyValue::from(v.clone()))),
        );
        if let Some((t, s, f)) = span_ids {
            rec.set_trace_context(t, s, Some(f));
        }
        self.logger.emit(rec);
    }

    /// Flushes and stops the pipelines (after the usage worker has finished), bounded by
    /// `within` whatever state the collector is in.
    pub async fn shutdown(self: Arc<Self>, within: Duration) {
        let work = tokio::task::spawn_blocking(move || {
            for (signal, r) in [
                ("traces", self.tracer_provider.shutdown()),
                ("metrics", self.meter_provider.shutdown()),
                ("logs", self.logger_provider.shutdown()),
            ] {
                // A dead collector was already reported by the export client.
                if let Err(e) = r {
                    tracing::debug!(signal, error = %e, "OTLP flush at shutdown failed");
                }
            }
        });
        if tokio::time::timeout(within, work).await.is_err() {
            tracing::warn!("OTLP flush at shutdown timed out; some telemetry is lost");
        }
    }
}

//! OTLP export (HTTP/protobuf to `telemetry.otlp_endpoint`): one span per request with GenAI
//! semantic-convention attributes, GenAI and tollgate metrics, one log record per usage record.
//!
//! The request path only starts a span ([`Otel::start_span`]: continue the client's
//! `traceparent`, pick a span id) and carries it in the usage [`Outcome`]; everything else —
//! attributes, metrics, the usage log record, ending the span — happens in the usage worker
//! once the tokens are known ([`Otel::record`]). The SDK's batch processors queue in bounded
//! memory and export from their own threads, so a slow or dead collector never blocks or fails
//! a request: what does not fit is dropped, and a failing export costs one warning a minute.
//! Exports go through the gateway's own reqwest client on the gateway's runtime
//! ([`ExportClient`]). [`Otel::shutdown`] flushes everything at exit, after the usage worker
//! has accounted the last requests.

use crate::request::Operation;
use crate::usage::Outcome;
use anyhow::Context as _;
use http::{HeaderMap, HeaderValue};
use opentelemetry::KeyValue;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, Tracer as _, TracerProvider as _,
};
use opentelemetry_http::{Bytes, HeaderExtractor, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tollgate_common::TokenUsage;
use tollgate_common::config::{BackendApi, TelemetryConfig};

/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one "export failed" warning per this many seconds.
const WARN_EVERY_S: u64 = 60;
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
    /// `gen_ai.server.time_to_first_token`: request to the backend's first response byte.
    ttft: Histogram<f64>,
}

/// The span of one request, from its start on the request path to its end in the usage worker.
#[derive(Debug)]
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    start: SystemTime,
}

impl RequestSpan {
    /// The W3C `traceparent` naming this span: sent to the backend and back to the client.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        let sc = self.span.span_context();
        sc.is_valid().then(|| traceparent(sc)).flatten()
    }

    /// The trace id in hex, for the usage record.
    pub fn trace_id(&self) -> String {
        self.span.span_context().trace_id().to_string()
    }

    /// Ends a span whose request failed before it was metered (auth, bad input, limits).
    pub fn fail(mut self, status: u16, code: &'static str) {
        self.span.set_attributes([
            KeyValue::new("http.response.status_code", status as i64),
            KeyValue::new("error.type", code),
        ]);
        if status >= 500 {
            self.span.set_status(Status::error(code));
        }
        self.span.end();
    }
}

fn traceparent(sc: &SpanContext) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
    .ok()
}

/// The trace id of a client's `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
pub fn incoming_trace_id(headers: &HeaderMap) -> String {
    let Some(v) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return String::new();
    };
    let mut parts = v.trim().split('-');
    match (parts.next(), parts.next()) {
        (Some(ver), Some(id))
            if ver.len() == 2
                && id.len() == 32
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && id.bytes().any(|b| b != b'0') =>
        {
            id.to_ascii_lowercase()
        }
        _ => String::new(),
    }
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

        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{base}/v1/traces"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .context("telemetry.otlp_endpoint: traces exporter")?;
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(client.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{base}/v1/metrics"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .context("telemetry.otlp_endpoint: metrics exporter")?;
        let logs = opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{base}/v1/logs"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .context("telemetry.otlp_endpoint: logs exporter")?;

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
            tracer_provider,
            meter_provider,
            logger_provider,
        };
        tracing::info!(endpoint = base, "OTLP export on");
        Ok(Some(Arc::new(otel)))
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
    pub fn record(&self, o: &mut Outcome, u: &TokenUsage, cost_pico: u64) {
        let op = operation_name(o.op);
        let (backend, provider, response_model, priority) = match &o.backend {
            Some(b) => (
                b.name.to_string(),
                provider_name(b.config.api),
                b.deployment(&o.model).to_string(),
                b.config.priority as i64,
            ),
            None => ("-".to_string(), "-", String::new(), 0),
        };
        let status = o.status as i64;
        let mut span_ids = None;
        if let Some(mut s) = o.span.take() {
            s.span.update_name(format!("{op} {}", o.model));
            let mut attrs = vec![
                KeyValue::new("gen_ai.operation.name", op),
                KeyValue::new("gen_ai.request.model", o.model.clone()),
                KeyValue::new("tollgate.consumer", o.consumer.to_string()),
                KeyValue::new("tollgate.team", o.team.clone()),
                KeyValue::new("tollgate.backend", backend.clone()),
                KeyValue::new("tollgate.request_id", o.request_id.clone()),
                KeyValue::new("tollgate.stream", o.stream),
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
            if let Some(t) = o.first_byte {
                attrs.push(KeyValue::new(
                    "tollgate.ttft_ms",
                    t.as_millis().min(i64::MAX as u128) as i64,
                ));
            }
            s.span.set_attributes(attrs);
            if o.status >= 500 {
                s.span
                    .set_status(Status::error(format!("status {}", o.status)));
            }
            let sc = s.span.span_context();
            span_ids = Some((sc.trace_id(), sc.span_id(), sc.trace_flags()));
            s.span.end_with_timestamp(s.start + o.duration);
        }

        // Metrics: the semantic-convention attributes on the GenAI instruments, the bounded
        // showback labels on tollgate's own.
        let mut gen_ai = vec![
            KeyValue::new("gen_ai.operation.name", op),
            KeyValue::new("gen_ai.request.model", o.model.clone()),
        ];
        if o.backend.is_some() {
            gen_ai.push(KeyValue::new("gen_ai.provider.name", provider));
            gen_ai.push(KeyValue::new(
                "gen_ai.response.model",
                response_model.clone(),
            ));
        }
        let showback = [
            KeyValue::new("tollgate.consumer", o.consumer.to_string()),
            KeyValue::new("tollgate.team", o.team.clone()),
            KeyValue::new("gen_ai.request.model", o.model.clone()),
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
        self.duration.record(o.duration.as_secs_f64(), &d);
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
            ("request_id", text(o.request_id.clone())),
            ("trace_id", text(o.trace_id.clone())),
            ("consumer", text(o.consumer.to_string())),
            ("team", text(o.team.clone())),
            ("model", text(o.model.clone())),
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
            ("stream", AnyValue::from(o.stream)),
            ("complete", AnyValue::from(o.complete)),
            ("failovers", int(o.failovers as i64)),
            ("latency_ms", int(o.duration.as_millis() as i64)),
            (
                "ttft_ms",
                int(o.first_byte.map_or(-1, |t| t.as_millis() as i64)),
            ),
        ];
        rec.add_attributes(attrs);
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

/// The OTLP exporters' HTTP client: the SDK's batch threads hand each export to the gateway's
/// runtime, where reqwest sends it. Failures are reported at most once a minute.
#[derive(Clone, Debug)]
struct ExportClient {
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
    /// Unix seconds of the last failure warning (0 = never).
    warned_at: Arc<AtomicU64>,
}

impl ExportClient {
    fn new() -> anyhow::Result<ExportClient> {
        let rt = tokio::runtime::Handle::try_current()
            .context("OTLP export needs the gateway's Tokio runtime")?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(EXPORT_TIMEOUT)
            .no_proxy()
            .build()
            .context("building the OTLP HTTP client")?;
        Ok(ExportClient {
            client,
            rt,
            warned_at: Arc::default(),
        })
    }

    fn warn(&self, what: &str, detail: &str) {
        let now = crate::routing::now_ms() / 1000;
        let last = self.warned_at.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_EVERY_S)
            && self
                .warned_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                endpoint = what,
                error = detail,
                "OTLP export failed; telemetry is dropped until the collector answers \
                 (requests are not affected; next warning in {WARN_EVERY_S} s at most)"
            );
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let req = self
            .client
            .request(parts.method, &url)
            .headers(parts.headers)
            .body(body);
        let sent = self.rt.spawn(async move {
            let resp = req.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        });
        let (status, headers, body) = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let detail = if e.is_connect() {
                    "connection failed"
                } else if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                };
                self.warn(&url, detail);
                return Err(Box::new(e));
            }
            Err(e) => return Err(Box::new(e)),
        };
        if !status.is_success() {
            self.warn(&url, &format!("collector answered {}", status.as_u16()));
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed traceparent yields its trace id; junk and the all-zero id yield none.
    #[test]
    fn incoming_trace_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(incoming_trace_id(&h), "");
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(incoming_trace_id(&h), "4bf92f3577b34da6a3ce929d0e0e4736");
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        assert_eq!(incoming_trace_id(&h), "");
        h.insert("traceparent", HeaderValue::from_static("nonsense"));
        assert_eq!(incoming_trace_id(&h), "");
    }
}

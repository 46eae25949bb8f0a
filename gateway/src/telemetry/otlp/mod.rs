//! OTLP export (HTTP/protobuf to `telemetry.otlp_endpoint`): one span per request with GenAI
//! semantic-convention attributes, GenAI and tollgate metrics, one log record per usage record.
//!
//! The request path only starts a span ([`Otel::start_span`]: continue the client's
//! `traceparent`, pick a span id, decide sampling) and carries it with the request's meter;
//! everything else happens in the usage worker once the tokens are known ([`Otel::record`]):
//! the span and the usage log record are encoded straight into their export batches (protobuf
//! written directly, [`wire`]), and the metrics add to in-place aggregates ([`metrics`]). One
//! task per signal exports a batch when it is full or the schedule delay passes, through the
//! gateway's own reqwest client, so a slow or dead collector never blocks or fails a request:
//! what does not fit is dropped, and a failing export costs one warning a minute.
//! [`Otel::shutdown`] flushes everything at exit, after the usage worker has accounted the
//! last requests.
//!
//! This replaces the OpenTelemetry SDK on this path (same names, attributes and `OTEL_*`
//! variables): the SDK's per-request span, log record and eight attribute-set lookups cost
//! about a fifth of the gateway's CPU per request (`docs/BENCHMARKS.md`).
//!
//! - [`names`]: the client's trace id, GenAI names.
//! - [`span`]: the request span, W3C trace context, the sampler.
//! - [`env`]: the `OTEL_*` variables.
//! - [`export`]: batching queues and the export client.
//! - [`metrics`]: metric aggregates and their export request.
//! - [`tools`]: MCP tool-call spans and metrics.
//! - [`wire`]: the protobuf encoder.

mod env;
mod export;
mod metrics;
mod names;
mod span;
mod tools;
mod wire;

pub use names::{incoming_trace_id, operation_name, provider_name};
pub use span::RequestSpan;

use super::Metrics;
use crate::record::RequestRecord;
use anyhow::Context as _;
use env::{env_ms, env_pairs};
use export::{Limits, Pipeline, Queue, Sender};
use http::HeaderMap;
use metrics::{Aggregates, Finished};
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use parking_lot::Mutex;
use prost::Message as _;
use span::{Sampler, unix_nanos};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_common::TokenUsage;
use tollgate_common::config::TelemetryConfig;
use wire::{Pb, Value};

/// How long one export may take before it is abandoned (`OTEL_EXPORTER_OTLP_TIMEOUT`).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// `SeverityNumber::SEVERITY_NUMBER_INFO`.
const SEVERITY_INFO: u64 = 9;

/// The OTLP pipelines and the metric aggregates the usage worker records into.
pub struct Otel {
    sampler: Sampler,
    spans: Arc<Pipeline>,
    logs: Arc<Pipeline>,
    aggregates: Aggregates,
    metrics_sender: Sender,
    metrics_interval: Duration,
    resource: Resource,
    scope: InstrumentationScope,
    /// The budgets `/metrics` shows, exported as gauges.
    prometheus: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Otel {
    /// Starts the three pipelines when `telemetry.otlp_endpoint` is set; `None` otherwise.
    /// Must run inside the gateway's Tokio runtime: exports are sent from it. `prometheus`
    /// holds the budgets exported as gauges.
    pub fn start(
        config: &TelemetryConfig,
        prometheus: &Arc<Metrics>,
    ) -> anyhow::Result<Option<Arc<Otel>>> {
        let Some(endpoint) = config.otlp_endpoint.as_deref() else {
            return Ok(None);
        };
        let base = endpoint.trim_end_matches('/');
        let timeout = env_ms(
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            EXPORT_TIMEOUT.as_millis() as u64,
        );
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            .no_proxy()
            .build()
            .context("building the OTLP HTTP client")?;

        // The resource: OTEL_RESOURCE_ATTRIBUTES, then what the gateway sets (service.name
        // from the config wins, as it did with the SDK).
        let mut attrs: Vec<(String, String)> = Vec::new();
        for (k, v) in env_pairs("OTEL_RESOURCE_ATTRIBUTES") {
            // A key given twice: the last value (OTLP forbids repeated keys).
            attrs.retain(|(key, _)| *key != k);
            attrs.push((k, v));
        }
        for (k, v) in [
            ("service.name", config.service_name.as_str()),
            ("service.version", env!("CARGO_PKG_VERSION")),
            ("telemetry.sdk.name", "tollgate"),
            ("telemetry.sdk.language", "rust"),
            ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ] {
            attrs.retain(|(key, _)| key != k);
            attrs.push((k.to_string(), v.to_string()));
        }
        let resource = Resource {
            attributes: attrs.iter().map(|(k, v)| metrics::str_kv(k, v)).collect(),
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "tollgate".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let (resource_bytes, scope_bytes): (Arc<[u8]>, Arc<[u8]>) = (
            resource.encode_to_vec().into(),
            scope.encode_to_vec().into(),
        );
        let warned_at = Arc::new(AtomicU64::new(0));
        let sender = |signal: &str, upper: &str| -> Sender {
            // The signal's own variable replaces the general one, as in the SDKs; an entry
            // that is not a valid header is skipped with a warning.
            let var = [
                format!("OTEL_EXPORTER_OTLP_{upper}_HEADERS"),
                "OTEL_EXPORTER_OTLP_HEADERS".to_string(),
            ]
            .into_iter()
            .find(|v| std::env::var_os(v).is_some());
            let mut headers = HeaderMap::new();
            for (k, v) in var.as_deref().map(env_pairs).unwrap_or_default() {
                let name = http::HeaderName::try_from(k.as_str());
                match (name, http::HeaderValue::try_from(v.as_str())) {
                    (_, _) if v.is_empty() => {}
                    (Ok(name), Ok(value)) => {
                        headers.insert(name, value);
                    }
                    _ => tracing::warn!(
                        variable = var.as_deref().unwrap_or_default(),
                        header = %k,
                        "not a valid HTTP header: skipped"
                    ),
                }
            }
            Sender {
                client: client.clone(),
                url: format!("{base}/v1/{signal}"),
                headers,
                warned_at: warned_at.clone(),
            }
        };
        let pipeline = |signal: &'static str, upper: &str, limits: Limits| {
            Arc::new(Pipeline {
                queue: Arc::new(Queue::new(limits)),
                sender: sender(signal, upper),
                resource: resource_bytes.clone(),
                scope: scope_bytes.clone(),
                signal,
            })
        };
        // Batch intervals and queue sizes follow the standard OTEL_BSP_*, OTEL_BLRP_* and
        // OTEL_METRIC_EXPORT_INTERVAL variables, with the SDKs' defaults.
        let spans = pipeline("traces", "TRACES", Limits::from_env("OTEL_BSP", 5000));
        let logs = pipeline("logs", "LOGS", Limits::from_env("OTEL_BLRP", 1000));
        let (stop, _) = watch::channel(false);
        let otel = Arc::new(Otel {
            sampler: Sampler::from_env(),
            aggregates: Aggregates::new(unix_nanos(SystemTime::now())),
            metrics_sender: sender("metrics", "METRICS"),
            metrics_interval: env_ms("OTEL_METRIC_EXPORT_INTERVAL", 60_000),
            resource,
            scope,
            prometheus: prometheus.clone(),
            spans,
            logs,
            stop,
            tasks: Mutex::default(),
        });
        let tasks = vec![
            tokio::spawn(run(otel.spans.clone(), otel.stop.subscribe())),
            tokio::spawn(run(otel.logs.clone(), otel.stop.subscribe())),
            tokio::spawn(run_metrics(Arc::downgrade(&otel), otel.stop.subscribe())),
        ];
        *otel.tasks.lock() = tasks;
        tracing::info!(endpoint = base, "OTLP export on");
        Ok(Some(otel))
    }

    /// Starts the request's span, continuing the client's `traceparent` when it has one.
    pub fn start_span(&self, headers: &HeaderMap) -> RequestSpan {
        RequestSpan::start(headers, self.sampler, &self.spans.queue)
    }

    /// Records one usage record: ends its span with the GenAI attributes, adds to the metrics
    /// and queues the usage log record. Runs in the usage worker.
    pub fn record(
        &self,
        r: &RequestRecord,
        u: &TokenUsage,
        cost_pico: u64,
        span: Option<RequestSpan>,
    ) {
        let (adm, o) = (&r.admitted, &r.observed);
        let op = operation_name(adm.op);
        let (backend, served, priority) = match &o.backend {
            Some(b) => (
                &*b.name,
                Some((provider_name(b.config.api), b.deployment(&adm.model))),
                i64::from(b.config.priority),
            ),
            None => ("-", None, 0),
        };
        let status = i64::from(o.status);
        let ids = span.as_ref().map(|s| s.ids());
        if let Some(s) = span {
            let end = s.after(r.duration);
            let error = (o.status >= 500).then(|| format!("status {}", o.status));
            s.end(&[op, " ", &adm.model], end, error.as_deref(), |m| {
                let a = |m: &mut Pb<'_>, k: &str, v: Value<'_>| m.attr(9, k, v);
                a(m, "gen_ai.operation.name", Value::Str(op));
                a(m, "gen_ai.request.model", Value::Str(&adm.model));
                a(m, "tollgate.consumer", Value::Str(&adm.consumer));
                a(m, "tollgate.team", Value::Str(&adm.team));
                a(m, "tollgate.backend", Value::Str(backend));
                a(m, "tollgate.request_id", Value::Str(&adm.request_id));
                a(m, "tollgate.stream", Value::Bool(adm.stream));
                a(m, "tollgate.cost_pico", Value::Int(cost_pico as i64));
                a(m, "tollgate.failovers", Value::Int(i64::from(o.failovers)));
                a(m, "http.response.status_code", Value::Int(status));
                a(m, "gen_ai.usage.input_tokens", Value::Int(u.input as i64));
                a(m, "gen_ai.usage.output_tokens", Value::Int(u.output as i64));
                if let Some((provider, response_model)) = served {
                    a(m, "gen_ai.provider.name", Value::Str(provider));
                    a(m, "gen_ai.system", Value::Str(provider));
                    a(m, "gen_ai.response.model", Value::Str(response_model));
                    a(m, "tollgate.priority", Value::Int(priority));
                }
                if u.cached_input > 0 {
                    let v = Value::Int(u.cached_input as i64);
                    a(m, "gen_ai.usage.cache_read.input_tokens", v);
                }
                if let Some(c) = &o.cache {
                    a(m, "tollgate.cache.name", Value::Str(&c.cache));
                    a(m, "tollgate.cache.result", Value::Str(c.result));
                    if let Some(d) = c.distance {
                        a(m, "tollgate.cache.distance", Value::Double(d));
                    }
                }
                if let Some(s) = &o.saved {
                    let v = Value::Int(s.total().min(i64::MAX as u64) as i64);
                    a(m, "tollgate.cache.saved_tokens", v);
                }
                if let Some(t) = o.first_byte {
                    let v = Value::Int(t.as_millis().min(i64::MAX as u128) as i64);
                    a(m, "tollgate.ttft_ms", v);
                }
                for (k, v) in &adm.dims {
                    m.attr2(9, "tollgate.dimension.", k, Value::Str(v));
                }
            });
        }

        self.aggregates.record(&Finished {
            op,
            model: &adm.model,
            served,
            consumer: &adm.consumer,
            team: &adm.team,
            backend,
            status: o.status,
            input: u.input,
            output: u.output,
            cached_input: u.cached_input,
            cost_pico,
            duration_s: r.duration.as_secs_f64(),
            ttft_s: o.first_byte.map(|t| t.as_secs_f64()),
        });

        // The usage record as one log record (ScopeLogs.log_records, field 2).
        let now = unix_nanos(SystemTime::now());
        self.logs.queue.push(|buf| {
            Pb(buf).message(2, |m| {
                m.fixed64(1, now);
                m.varint(2, SEVERITY_INFO);
                m.str(3, "INFO");
                m.value(5, Value::Str("usage"));
                let a = |m: &mut Pb<'_>, k: &str, v: Value<'_>| m.attr(6, k, v);
                a(m, "request_id", Value::Str(&adm.request_id));
                a(m, "trace_id", Value::Str(&adm.trace_id));
                a(m, "consumer", Value::Str(&adm.consumer));
                a(m, "team", Value::Str(&adm.team));
                a(m, "model", Value::Str(&adm.model));
                a(m, "operation", Value::Str(op));
                a(m, "backend", Value::Str(backend));
                a(m, "provider", Value::Str(served.map_or("-", |s| s.0)));
                a(m, "response_model", Value::Str(served.map_or("", |s| s.1)));
                a(m, "priority", Value::Int(priority));
                a(m, "input_tokens", Value::Int(u.input as i64));
                a(m, "output_tokens", Value::Int(u.output as i64));
                a(m, "cached_input_tokens", Value::Int(u.cached_input as i64));
                a(m, "cost_pico", Value::Int(cost_pico as i64));
                a(m, "status", Value::Int(status));
                a(m, "stream", Value::Bool(adm.stream));
                a(m, "complete", Value::Bool(o.complete));
                a(m, "failovers", Value::Int(i64::from(o.failovers)));
                a(m, "latency_ms", Value::Int(r.duration.as_millis() as i64));
                let ttft = o.first_byte.map_or(-1, |t| t.as_millis() as i64);
                a(m, "ttft_ms", Value::Int(ttft));
                for (k, v) in &adm.dims {
                    m.attr2(6, "dimension.", k, Value::Str(v));
                }
                if let Some((trace, span, flags)) = ids {
                    m.fixed32(8, u32::from(flags));
                    m.bytes(9, &trace);
                    m.bytes(10, &span);
                }
                m.fixed64(11, now);
                m.str(12, "tollgate.usage");
            });
        });
    }

    /// `/metrics` lines: spans and usage log records dropped because the export queue was full
    /// (a collector too slow for the traffic).
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP tollgate_otlp_dropped_total OTLP records dropped because the export queue was full\n\
             # TYPE tollgate_otlp_dropped_total counter\n\
             tollgate_otlp_dropped_total{{signal=\"traces\"}} {}\n\
             tollgate_otlp_dropped_total{{signal=\"logs\"}} {}",
            self.spans.queue.dropped_total(),
            self.logs.queue.dropped_total()
        );
    }

    /// Sends the metrics as of now.
    async fn export_metrics(&self) {
        let req = self.aggregates.export(
            &self.resource,
            &self.scope,
            self.prometheus.budget_rows(),
            unix_nanos(SystemTime::now()),
        );
        if !req.resource_metrics[0].scope_metrics[0].metrics.is_empty() {
            self.metrics_sender.send(req.encode_to_vec()).await;
        }
    }

    /// Flushes everything (after the usage worker has finished) and stops the export tasks,
    /// bounded by `within` whatever state the collector is in.
    pub async fn shutdown(self: Arc<Self>, within: Duration) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock());
        // The tasks finish the export they are in (a batch is taken under the queue's lock, so
        // nothing is sent twice or lost) while the rest is flushed beside them.
        let work = async {
            tokio::join!(
                async {
                    for t in tasks {
                        let _ = t.await;
                    }
                },
                self.spans.flush(true),
                self.logs.flush(true),
                self.export_metrics()
            );
        };
        if tokio::time::timeout(within, work).await.is_err() {
            tracing::warn!("OTLP flush at shutdown timed out; some telemetry is lost");
        }
    }
}

/// A span or log pipeline's export task: a batch when one is full or every schedule delay,
/// until shutdown (which flushes what is left).
async fn run(p: Arc<Pipeline>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(p.queue.delay());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while !*stop.borrow() {
        let all = tokio::select! {
            _ = tick.tick() => true,
            _ = p.queue.full() => false,
            _ = stop.changed() => return,
        };
        p.flush(all).await;
    }
}

/// The metrics export task: every `OTEL_METRIC_EXPORT_INTERVAL`, until shutdown.
async fn run_metrics(otel: std::sync::Weak<Otel>, mut stop: watch::Receiver<bool>) {
    let Some(interval) = otel.upgrade().map(|o| o.metrics_interval) else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(o) = otel.upgrade() else { return };
        o.export_metrics().await;
    }
}

//! OTLP metrics, aggregated in place: one finished request updates two series (the GenAI
//! one and the showback one) under one short lock, allocating nothing once they exist; the
//! export task turns the cumulative totals into an `ExportMetricsServiceRequest` every
//! `OTEL_METRIC_EXPORT_INTERVAL` and at shutdown.
//!
//! - `gen_ai.client.token.usage` (histogram, by `gen_ai.token.type`),
//!   `gen_ai.client.operation.duration` (by status) and `gen_ai.server.time_to_first_token`:
//!   by operation, request model, provider and response model;
//! - `tollgate.tokens` (by type), `tollgate.cost` (pico-units) and `tollgate.requests` (by
//!   status): by consumer, team, model and backend;
//! - `tollgate.budget.limit`, `.spent`, `.remaining`: gauges from the budgets `/metrics` shows;
//! - `tollgate.mcp.tool_calls` and `tollgate.mcp.tool_call.duration`: MCP tool calls.

use indexmap::{Equivalent, IndexMap};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use parking_lot::Mutex;
use std::hash::Hash;

/// Seconds buckets for request duration, time to first token and tool calls.
const SECONDS_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Token-count buckets, as the GenAI semantic conventions advise.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// One histogram series: bucket counts (one more than the bounds), sum, count, min, max.
#[derive(Clone, Debug)]
struct Hist {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
    min: f64,
    max: f64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Hist {
        Hist {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn record(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn point(&self, attributes: Vec<KeyValue>, start: u64, now: u64) -> HistogramDataPoint {
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: self.count,
            sum: Some(self.sum),
            bucket_counts: self.counts.clone(),
            explicit_bounds: self.bounds.to_vec(),
            min: (self.count > 0).then_some(self.min),
            max: (self.count > 0).then_some(self.max),
            ..Default::default()
        }
    }
}

/// A series key of owned strings, looked up by a borrowed twin ([`Equivalent`]) so that a
/// request allocates nothing once its series exists.
macro_rules! series_key {
    ($owned:ident, $borrowed:ident { $($s:ident),* ; $($c:ident : $t:ty),* }) => {
        #[derive(Clone, Debug, Hash, PartialEq, Eq)]
        struct $owned { $($s: Box<str>,)* $($c: $t,)* }
        #[derive(Hash)]
        struct $borrowed<'a> { $($s: &'a str,)* $($c: $t,)* }
        impl Equivalent<$owned> for $borrowed<'_> {
            fn equivalent(&self, k: &$owned) -> bool {
                $(self.$s == &*k.$s &&)* $(self.$c == k.$c &&)* true
            }
        }
        impl $borrowed<'_> {
            fn to_owned(&self) -> $owned {
                $owned { $($s: self.$s.into(),)* $($c: self.$c,)* }
            }
        }
    };
}

series_key!(GenKey, GenRef { model, response_model; op: &'static str, provider: Option<&'static str> });
series_key!(ShowKey, ShowRef { consumer, team, model, backend; });
series_key!(ToolKey, ToolRef { server, consumer, team, outcome; });

struct GenAgg {
    /// Tokens per request: input, output.
    usage: [Hist; 2],
    /// Duration by status code.
    duration: Vec<(u16, Hist)>,
    ttft: Hist,
}

#[derive(Default)]
struct ShowAgg {
    /// input, output, cached input.
    tokens: [u64; 3],
    cost_pico: u64,
    requests: Vec<(u16, u64)>,
}

#[derive(Default)]
struct State {
    gen_ai: IndexMap<GenKey, GenAgg>,
    showback: IndexMap<ShowKey, ShowAgg>,
    tool_calls: IndexMap<ToolKey, u64>,
    tool_duration: IndexMap<Box<str>, Hist>,
}

/// What one finished request adds.
pub(super) struct Finished<'a> {
    pub op: &'static str,
    pub model: &'a str,
    /// Provider and response model when a backend served it.
    pub served: Option<(&'static str, &'a str)>,
    pub consumer: &'a str,
    pub team: &'a str,
    pub backend: &'a str,
    pub status: u16,
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cost_pico: u64,
    pub duration_s: f64,
    pub ttft_s: Option<f64>,
}

/// A budget gauge row: scope, id, limit, spent, period, currency.
pub(super) type BudgetRow = (&'static str, String, f64, f64, &'static str, String);

/// The cumulative metric state of this process.
pub(super) struct Aggregates {
    state: Mutex<State>,
    /// When the process started counting (every point's start time), Unix nanoseconds.
    start: u64,
}

fn get<'m, K: Hash + Eq, Q: Hash + Equivalent<K> + ?Sized, V>(
    m: &'m mut IndexMap<K, V>,
    key: &Q,
    new: impl FnOnce() -> (K, V),
) -> &'m mut V {
    let i = match m.get_index_of(key) {
        Some(i) => i,
        None => {
            let (k, v) = new();
            m.insert_full(k, v).0
        }
    };
    &mut m[i]
}

pub(super) fn str_kv(key: &str, v: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

fn int_kv(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn with(mut base: Vec<KeyValue>, kv: KeyValue) -> Vec<KeyValue> {
    base.push(kv);
    base
}

fn metric(name: &str, unit: &str, description: &str, data: metric::Data) -> Metric {
    Metric {
        name: name.to_string(),
        unit: unit.to_string(),
        description: description.to_string(),
        data: Some(data),
        ..Default::default()
    }
}

fn sum(points: Vec<NumberDataPoint>) -> metric::Data {
    metric::Data::Sum(Sum {
        data_points: points,
        aggregation_temporality: AggregationTemporality::Cumulative as i32,
        is_monotonic: true,
    })
}

fn hist(points: Vec<HistogramDataPoint>) -> metric::Data {
    metric::Data::Histogram(Histogram {
        data_points: points,
        aggregation_temporality: AggregationTemporality::Cumulative as i32,
    })
}

impl Aggregates {
    pub(super) fn new(start: u64) -> Aggregates {
        Aggregates {
            state: Mutex::default(),
            start,
        }
    }

    pub(super) fn record(&self, f: &Finished<'_>) {
        let mut st = self.state.lock();
        let g = GenRef {
            model: f.model,
            response_model: f.served.map_or("", |s| s.1),
            op: f.op,
            provider: f.served.map(|s| s.0),
        };
        let agg = get(&mut st.gen_ai, &g, || {
            (
                g.to_owned(),
                GenAgg {
                    usage: [Hist::new(&TOKEN_BUCKETS), Hist::new(&TOKEN_BUCKETS)],
                    duration: Vec::new(),
                    ttft: Hist::new(&SECONDS_BUCKETS),
                },
            )
        });
        for (h, v) in agg.usage.iter_mut().zip([f.input, f.output]) {
            if f.served.is_some() || v > 0 {
                h.record(v as f64);
            }
        }
        match agg.duration.iter_mut().find(|(s, _)| *s == f.status) {
            Some((_, h)) => h.record(f.duration_s),
            None => {
                let mut h = Hist::new(&SECONDS_BUCKETS);
                h.record(f.duration_s);
                agg.duration.push((f.status, h));
            }
        }
        if let Some(t) = f.ttft_s {
            agg.ttft.record(t);
        }
        let s = ShowRef {
            consumer: f.consumer,
            team: f.team,
            model: f.model,
            backend: f.backend,
        };
        let agg = get(&mut st.showback, &s, || (s.to_owned(), ShowAgg::default()));
        for (t, v) in agg
            .tokens
            .iter_mut()
            .zip([f.input, f.output, f.cached_input])
        {
            *t = t.saturating_add(v);
        }
        agg.cost_pico = agg.cost_pico.saturating_add(f.cost_pico);
        match agg.requests.iter_mut().find(|(s, _)| *s == f.status) {
            Some((_, n)) => *n += 1,
            None => agg.requests.push((f.status, 1)),
        }
    }

    /// One finished MCP tool call.
    pub(super) fn tool_call(
        &self,
        server: &str,
        consumer: &str,
        team: &str,
        outcome: &str,
        secs: f64,
    ) {
        let mut st = self.state.lock();
        let k = ToolRef {
            server,
            consumer,
            team,
            outcome,
        };
        *get(&mut st.tool_calls, &k, || (k.to_owned(), 0)) += 1;
        get(&mut st.tool_duration, server, || {
            (server.into(), Hist::new(&SECONDS_BUCKETS))
        })
        .record(secs);
    }

    /// The export request of every metric with data, as of `now` (Unix nanoseconds).
    pub(super) fn export(
        &self,
        resource: &Resource,
        scope: &InstrumentationScope,
        budgets: Vec<BudgetRow>,
        now: u64,
    ) -> ExportMetricsServiceRequest {
        let start = self.start;
        let st = self.state.lock();
        let number = |attributes: Vec<KeyValue>, v: number_data_point::Value| NumberDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: now,
            value: Some(v),
            ..Default::default()
        };
        let mut metrics = Vec::new();

        // GenAI instruments.
        let (mut usage, mut duration, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
        for (k, a) in &st.gen_ai {
            let mut base = vec![
                str_kv("gen_ai.operation.name", k.op),
                str_kv("gen_ai.request.model", &k.model),
            ];
            if let Some(p) = k.provider {
                base.push(str_kv("gen_ai.provider.name", p));
                base.push(str_kv("gen_ai.response.model", &k.response_model));
            }
            for (h, kind) in a.usage.iter().zip(["input", "output"]) {
                if h.count > 0 {
                    let attrs = with(base.clone(), str_kv("gen_ai.token.type", kind));
                    usage.push(h.point(attrs, start, now));
                }
            }
            for (status, h) in &a.duration {
                let attrs = with(
                    base.clone(),
                    int_kv("http.response.status_code", i64::from(*status)),
                );
                duration.push(h.point(attrs, start, now));
            }
            if a.ttft.count > 0 {
                ttft.push(a.ttft.point(base, start, now));
            }
        }
        for (name, unit, desc, points) in [
            (
                "gen_ai.client.token.usage",
                "{token}",
                "Tokens used per request, by gen_ai.token.type",
                usage,
            ),
            (
                "gen_ai.client.operation.duration",
                "s",
                "Time from request to end of response",
                duration,
            ),
            (
                "gen_ai.server.time_to_first_token",
                "s",
                "Time from request to the backend's first response byte",
                ttft,
            ),
        ] {
            if !points.is_empty() {
                metrics.push(metric(name, unit, desc, hist(points)));
            }
        }

        // Showback counters.
        let (mut tokens, mut cost, mut requests) = (Vec::new(), Vec::new(), Vec::new());
        for (k, a) in &st.showback {
            let base = vec![
                str_kv("tollgate.consumer", &k.consumer),
                str_kv("tollgate.team", &k.team),
                str_kv("gen_ai.request.model", &k.model),
                str_kv("tollgate.backend", &k.backend),
            ];
            for (v, kind) in a.tokens.iter().zip(["input", "output", "cached_input"]) {
                if *v > 0 {
                    let attrs = with(base.clone(), str_kv("gen_ai.token.type", kind));
                    tokens.push(number(attrs, number_data_point::Value::AsInt(*v as i64)));
                }
            }
            if a.cost_pico > 0 {
                let v = number_data_point::Value::AsInt(a.cost_pico.min(i64::MAX as u64) as i64);
                cost.push(number(base.clone(), v));
            }
            for (status, n) in &a.requests {
                let attrs = with(
                    base.clone(),
                    int_kv("http.response.status_code", i64::from(*status)),
                );
                requests.push(number(attrs, number_data_point::Value::AsInt(*n as i64)));
            }
        }
        for (name, unit, desc, points) in [
            (
                "tollgate.tokens",
                "{token}",
                "Tokens used, by consumer, team, model, backend and type",
                tokens,
            ),
            (
                "tollgate.cost",
                "pico",
                "Cost in pico-units (1e-12 of the price currency)",
                cost,
            ),
            (
                "tollgate.requests",
                "{request}",
                "Metered requests, by consumer, team, model, backend, status",
                requests,
            ),
        ] {
            if !points.is_empty() {
                metrics.push(metric(name, unit, desc, sum(points)));
            }
        }

        // Budgets, as this replica last saw them.
        if !budgets.is_empty() {
            for (name, desc, pick) in [
                (
                    "tollgate.budget.limit",
                    "Budget per window, in the price currency",
                    0,
                ),
                (
                    "tollgate.budget.spent",
                    "Budget spent in the current window (reservations in flight included)",
                    1,
                ),
                (
                    "tollgate.budget.remaining",
                    "Budget left in the current window",
                    2,
                ),
            ] {
                let points = budgets
                    .iter()
                    .map(|(scope, id, limit, spent, period, currency)| {
                        let v = [*limit, *spent, limit - spent][pick];
                        let attrs = vec![
                            str_kv("tollgate.budget.scope", scope),
                            str_kv("tollgate.budget.id", id),
                            str_kv("tollgate.budget.period", period),
                            str_kv("tollgate.currency", currency),
                        ];
                        NumberDataPoint {
                            attributes: attrs,
                            time_unix_nano: now,
                            value: Some(number_data_point::Value::AsDouble(v)),
                            ..Default::default()
                        }
                    })
                    .collect();
                metrics.push(metric(
                    name,
                    "",
                    desc,
                    metric::Data::Gauge(Gauge {
                        data_points: points,
                    }),
                ));
            }
        }

        // MCP tool calls.
        if !st.tool_calls.is_empty() {
            let points = st
                .tool_calls
                .iter()
                .map(|(k, n)| {
                    let attrs = vec![
                        str_kv("mcp.server", &k.server),
                        str_kv("tollgate.consumer", &k.consumer),
                        str_kv("tollgate.team", &k.team),
                        str_kv("tollgate.outcome", &k.outcome),
                    ];
                    number(attrs, number_data_point::Value::AsInt(*n as i64))
                })
                .collect();
            metrics.push(metric(
                "tollgate.mcp.tool_calls",
                "{call}",
                "MCP tool calls by server, consumer, team and outcome",
                sum(points),
            ));
            let points = st
                .tool_duration
                .iter()
                .map(|(server, h)| h.point(vec![str_kv("mcp.server", server)], start, now))
                .collect();
            metrics.push(metric(
                "tollgate.mcp.tool_call.duration",
                "s",
                "MCP tool calls from request to answer",
                hist(points),
            ));
        }

        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope.clone()),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished<'a>(status: u16, input: u64, served: bool) -> Finished<'a> {
        Finished {
            op: "chat",
            model: "gpt-4o",
            served: served.then_some(("openai", "gpt-4o-2024")),
            consumer: "c",
            team: "t",
            backend: if served { "payg" } else { "-" },
            status,
            input,
            output: 3,
            cached_input: 0,
            cost_pico: 5,
            duration_s: 0.05,
            ttft_s: served.then_some(0.01),
        }
    }

    fn points<'r>(req: &'r ExportMetricsServiceRequest, name: &str) -> &'r metric::Data {
        let m = &req.resource_metrics[0].scope_metrics[0].metrics;
        m.iter()
            .find(|m| m.name == name)
            .and_then(|m| m.data.as_ref())
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    /// Requests of one series add up; histograms count every observation in the right bucket;
    /// another status is another point; the export is a valid protobuf message.
    #[test]
    fn aggregates_export() {
        let a = Aggregates::new(1);
        a.record(&finished(200, 10, true));
        a.record(&finished(200, 20, true));
        a.record(&finished(429, 0, false));
        a.tool_call("s", "c", "t", "ok", 0.03);
        let req = a.export(
            &Resource::default(),
            &InstrumentationScope::default(),
            vec![],
            2,
        );
        let metric::Data::Sum(s) = points(&req, "tollgate.requests") else {
            panic!()
        };
        let mut by_status: Vec<i64> = s
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(n)) => n,
                _ => 0,
            })
            .collect();
        by_status.sort();
        assert_eq!(by_status, [1, 2]);
        let metric::Data::Histogram(h) = points(&req, "gen_ai.client.token.usage") else {
            panic!()
        };
        let input = h
            .data_points
            .iter()
            .find(|p| {
                p.attributes.iter().any(|kv| {
                    kv.key == "gen_ai.token.type"
                        && kv.value
                            == Some(AnyValue {
                                value: Some(any_value::Value::StringValue("input".into())),
                            })
                })
            })
            .unwrap();
        assert_eq!((input.count, input.sum), (2, Some(30.0)));
        // Upper bounds are inclusive: 10 is in (4, 16], 20 in (16, 64].
        assert_eq!(input.bucket_counts[2], 1);
        assert_eq!(input.bucket_counts[3], 1);
        assert_eq!(input.bucket_counts.len(), TOKEN_BUCKETS.len() + 1);
        assert!(matches!(
            points(&req, "tollgate.mcp.tool_calls"),
            metric::Data::Sum(_)
        ));
        use prost::Message as _;
        let bytes = req.encode_to_vec();
        assert_eq!(
            ExportMetricsServiceRequest::decode(&bytes[..]).unwrap(),
            req
        );
    }
}

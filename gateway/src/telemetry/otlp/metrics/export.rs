//! The metrics export request: the cumulative points of every series with data.

use super::{Aggregates, BudgetRow, Hist};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

impl Hist {
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

pub(in crate::telemetry::otlp) fn str_kv(key: &str, v: &str) -> KeyValue {
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

/// A counter's value (OTLP's integers are signed).
fn count(v: u64) -> number_data_point::Value {
    number_data_point::Value::AsInt(v.min(i64::MAX as u64) as i64)
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

/// Each group that has points, as one metric of the kind `data` makes.
fn add<P>(
    metrics: &mut Vec<Metric>,
    groups: [(&str, &str, &str, Vec<P>); 3],
    data: fn(Vec<P>) -> metric::Data,
) {
    for (name, unit, desc, points) in groups {
        if !points.is_empty() {
            metrics.push(metric(name, unit, desc, data(points)));
        }
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
    /// The export request of every metric with data, as of `now` (Unix nanoseconds).
    pub(in crate::telemetry::otlp) fn export(
        &self,
        resource: &Resource,
        scope: &InstrumentationScope,
        budgets: Vec<BudgetRow>,
        now: u64,
    ) -> ExportMetricsServiceRequest {
        let start = self.start;
        // A copy: the usage worker and tool calls are not held up while the request is built.
        let st = self.state.lock().clone();
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
        add(
            &mut metrics,
            [
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
            ],
            hist,
        );

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
                    tokens.push(number(attrs, count(*v)));
                }
            }
            if a.cost_pico > 0 {
                let v = count(a.cost_pico);
                cost.push(number(base.clone(), v));
            }
            for (status, n) in &a.requests {
                let attrs = with(
                    base.clone(),
                    int_kv("http.response.status_code", i64::from(*status)),
                );
                requests.push(number(attrs, count(*n)));
            }
        }
        add(
            &mut metrics,
            [
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
            ],
            sum,
        );

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
                    number(attrs, count(*n))
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
    use super::super::{Finished, TOKEN_BUCKETS};
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

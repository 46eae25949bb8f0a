//! A fake OTLP collector for end-to-end tests: an HTTP server on a free port that accepts
//! OTLP/HTTP protobuf on `/v1/traces`, `/v1/metrics` and `/v1/logs`, decodes each body with
//! `opentelemetry-proto`, and keeps what arrived flattened into plain records (hex ids,
//! attribute maps as JSON values) so a test can assert on them without walking the protobuf
//! tree. Point a gateway at it with `[telemetry] otlp_endpoint = receiver.url()`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use parking_lot::Mutex;
use prost::Message as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Attributes as a map of key to JSON value (strings, integers, booleans, doubles).
pub type Attrs = BTreeMap<String, Value>;

/// One span as exported.
#[derive(Clone, Debug)]
pub struct SpanRec {
    pub name: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP `SpanKind` number (2 = server).
    pub kind: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Attrs,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    pub resource: Attrs,
}

/// One data point of a metric.
#[derive(Clone, Debug)]
pub struct PointRec {
    pub metric: String,
    pub unit: String,
    pub attributes: Attrs,
    /// Sum and gauge value; for histograms, the sum of the recorded values.
    pub value: f64,
    /// Histograms only: how many values were recorded.
    pub count: u64,
    pub is_histogram: bool,
}

/// One log record.
#[derive(Clone, Debug)]
pub struct LogRec {
    pub event_name: String,
    pub body: Value,
    pub severity_number: i32,
    pub attributes: Attrs,
    pub trace_id: String,
    pub span_id: String,
}

#[derive(Default)]
struct Seen {
    spans: Vec<SpanRec>,
    /// Every export's points, in arrival order (cumulative metrics repeat in each export).
    points: Vec<Vec<PointRec>>,
    logs: Vec<LogRec>,
    /// Request count per path, decodable or not.
    posts: BTreeMap<String, u64>,
    /// Bodies that did not decode.
    bad: u64,
    /// The request headers of the last export (any signal).
    headers: axum::http::HeaderMap,
}

/// The running fake collector; stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Option<oneshot::Sender<()>>,
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/metrics", post(metrics))
            .route("/v1/logs", post(logs))
            .with_state(seen.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(OtlpReceiver {
            addr,
            seen,
            stop: Some(tx),
        })
    }

    /// The base URL for `telemetry.otlp_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<SpanRec> {
        self.seen.lock().spans.clone()
    }

    pub fn logs(&self) -> Vec<LogRec> {
        self.seen.lock().logs.clone()
    }

    /// The points of the most recent export that carried `metric` (metrics are cumulative, so
    /// the last export holds the totals).
    pub fn latest_points(&self, metric: &str) -> Vec<PointRec> {
        let seen = self.seen.lock();
        seen.points
            .iter()
            .rev()
            .find(|batch| batch.iter().any(|p| p.metric == metric))
            .map(|batch| {
                batch
                    .iter()
                    .filter(|p| p.metric == metric)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every metric name seen so far.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .seen
            .lock()
            .points
            .iter()
            .flatten()
            .map(|p| p.metric.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Requests received on `path` (`/v1/traces`, ...).
    pub fn posts(&self, path: &str) -> u64 {
        self.seen.lock().posts.get(path).copied().unwrap_or(0)
    }

    /// Bodies that were not valid OTLP protobuf.
    /// A request header of the last export.
    pub fn header(&self, name: &str) -> Option<String> {
        let s = self.seen.lock();
        s.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn bad_bodies(&self) -> u64 {
        self.seen.lock().bad
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn proto_response(body: Vec<u8>) -> axum::response::Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        body,
    )
        .into_response()
}

/// Counts one export to `path` and keeps its headers.
fn arrived(seen: &Mutex<Seen>, path: &str, headers: axum::http::HeaderMap) {
    let mut s = seen.lock();
    *s.posts.entry(path.into()).or_default() += 1;
    s.headers = headers;
}

fn bad(seen: &Mutex<Seen>) -> axum::response::Response {
    seen.lock().bad += 1;
    StatusCode::BAD_REQUEST.into_response()
}

async fn traces(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    arrived(&seen, "/v1/traces", headers);
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return bad(&seen);
    };
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs
            .resource
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(SpanRec {
                    name: s.name,
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    kind: s.kind,
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    attributes: attrs(&s.attributes),
                    status_code: s.status.map(|st| st.code).unwrap_or(0),
                    resource: resource.clone(),
                });
            }
        }
    }
    seen.lock().spans.extend(out);
    proto_response(ExportTraceServiceResponse::default().encode_to_vec())
}

async fn metrics(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    arrived(&seen, "/v1/metrics", headers);
    let Ok(req) = ExportMetricsServiceRequest::decode(body) else {
        return bad(&seen);
    };
    let mut batch = Vec::new();
    for rm in req.resource_metrics {
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let point =
                    |attributes: &[KeyValue], value: f64, count: u64, hist: bool| PointRec {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        attributes: attrs(attributes),
                        value,
                        count,
                        is_histogram: hist,
                    };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsInt(i)) => *i as f64,
                    Some(number_data_point::Value::AsDouble(d)) => *d,
                    None => 0.0,
                };
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            batch.push(point(&p.attributes, number(&p.value), 0, false));
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            batch.push(point(&p.attributes, number(&p.value), 0, false));
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            batch.push(point(&p.attributes, p.sum.unwrap_or(0.0), p.count, true));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    seen.lock().points.push(batch);
    proto_response(ExportMetricsServiceResponse::default().encode_to_vec())
}

async fn logs(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    arrived(&seen, "/v1/logs", headers);
    let Ok(req) = ExportLogsServiceRequest::decode(body) else {
        return bad(&seen);
    };
    let mut out = Vec::new();
    for rl in req.resource_logs {
        for sl in rl.scope_logs {
            for l in sl.log_records {
                out.push(LogRec {
                    event_name: l.event_name,
                    body: l.body.as_ref().map(any).unwrap_or(Value::Null),
                    severity_number: l.severity_number,
                    attributes: attrs(&l.attributes),
                    trace_id: hex::encode(&l.trace_id),
                    span_id: hex::encode(&l.span_id),
                });
            }
        }
    }
    seen.lock().logs.extend(out);
    proto_response(ExportLogsServiceResponse::default().encode_to_vec())
}

fn attrs(kvs: &[KeyValue]) -> Attrs {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(any).unwrap_or(Value::Null),
            )
        })
        .collect()
}

fn any(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => Value::from(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(any_value::Value::ArrayValue(a)) => Value::Array(a.values.iter().map(any).collect()),
        Some(any_value::Value::KvlistValue(l)) => Value::Object(
            l.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        kv.value.as_ref().map(any).unwrap_or(Value::Null),
                    )
                })
                .collect(),
        ),
        Some(any_value::Value::BytesValue(b)) => Value::from(hex::encode(b)),
        _ => Value::Null,
    }
}

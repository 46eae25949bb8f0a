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

mod export;

pub(super) use export::str_kv;

use indexmap::{Equivalent, IndexMap};
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

#[derive(Clone)]
struct GenAgg {
    /// Tokens per request: input, output.
    usage: [Hist; 2],
    /// Duration by status code.
    duration: Vec<(u16, Hist)>,
    ttft: Hist,
}

#[derive(Clone, Default)]
struct ShowAgg {
    /// input, output, cached input.
    tokens: [u64; 3],
    cost_pico: u64,
    requests: Vec<(u16, u64)>,
}

#[derive(Clone, Default)]
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
}

//! Metrics in Prometheus text at `/metrics`: requests, tokens and cost by
//! consumer/team/model/backend, errors by code, failovers, request duration and time to first
//! token as histograms by model and backend ([`super::histogram`]), and the build.
//!
//! Label values come only from configuration and the store (consumer ids, models that some
//! backend serves, backend names), never from arbitrary client input, so cardinality stays
//! bounded; the one exception, allow-listed dimensions, is capped per dimension (`other`). Token metrics are updated by the usage worker, off the request path.

use super::histogram::{DURATION_BUCKETS, Histogram, TTFT_BUCKETS};
use super::series::{Finished, Series, escape};
use crate::record::RequestRecord;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use tollgate_common::TokenUsage;
use tollgate_common::config::TelemetryConfig;
use tollgate_quota::{BudgetScope, BudgetUse, OTHER_DIM_VALUE, units_from_nano};

type Labels = Vec<(&'static str, String)>;

/// Budget gauge rows: scope → id → (limit, spent, period, currency).
type BudgetRows = BTreeMap<&'static str, BTreeMap<String, (f64, f64, &'static str, String)>>;

pub struct Metrics {
    /// Requests, tokens, cost, backend responses and failovers ([`Series`]).
    series: Series,
    /// Every other counter (errors by code, allow-listed dimensions).
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    /// Budgets as this replica last saw them: scope → id → (limit, spent, period, currency).
    budgets: Mutex<BudgetRows>,
    /// Request to end of response, by model and backend.
    duration: Histogram,
    /// Request to the backend's first response byte, by model and backend.
    ttft: Histogram,
    usage_dropped: AtomicU64,
    estimated_bytes: AtomicU64,
    /// `[telemetry] prometheus_dimensions`: the only dimensions that become labels.
    dims: AllowedDims,
}

/// Allow-listed dimensions and the values this replica labels with, at most `cap` per
/// dimension (later values are labelled `other`): client input never grows the series count
/// without bound.
#[derive(Default)]
struct AllowedDims {
    names: Vec<String>,
    cap: usize,
    seen: Mutex<BTreeMap<String, std::collections::BTreeSet<String>>>,
}

impl AllowedDims {
    /// The label value for `value` of `dim`, or `None` when `dim` is not allowed.
    fn label(&self, dim: &str, value: &str) -> Option<String> {
        if !self.names.iter().any(|n| n == dim) {
            return None;
        }
        let mut seen = self.seen.lock();
        let values = seen.entry(dim.to_string()).or_default();
        if values.contains(value) || values.len() < self.cap && values.insert(value.to_string()) {
            Some(value.to_string())
        } else {
            Some(OTHER_DIM_VALUE.to_string())
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            series: Series::default(),
            counters: Mutex::default(),
            budgets: Mutex::default(),
            duration: Histogram::new(
                "tollgate_request_duration_seconds",
                "Time from request to end of response, by model and backend",
                ["model", "backend"],
                &DURATION_BUCKETS,
            ),
            ttft: Histogram::new(
                "tollgate_time_to_first_token_seconds",
                "Time from request to the backend's first response byte, by model and backend",
                ["model", "backend"],
                &TTFT_BUCKETS,
            ),
            usage_dropped: AtomicU64::default(),
            estimated_bytes: AtomicU64::default(),
            dims: AllowedDims::default(),
        }
    }
}

const HELP: [(&str, &str); 10] = [
    (
        "tollgate_requests_total",
        "Requests that reached a reservation, by outcome",
    ),
    (
        "tollgate_tokens_total",
        "Tokens used, by consumer, team, model, backend and kind",
    ),
    (
        "tollgate_cost_pico_total",
        "Cost in pico-units (1e-12 of the price currency)",
    ),
    (
        "tollgate_errors_total",
        "Error responses by OpenAI error code",
    ),
    (
        "tollgate_failovers_total",
        "Attempts moved to another backend",
    ),
    (
        "tollgate_backend_requests_total",
        "Responses used from each backend",
    ),
    (
        "tollgate_dimension_requests_total",
        "Requests by allow-listed dimension value (telemetry.prometheus_dimensions)",
    ),
    (
        "tollgate_dimension_tokens_total",
        "Tokens used by allow-listed dimension value and kind",
    ),
    (
        "tollgate_usage_dropped_total",
        "Usage settlements dropped because the buffer was full",
    ),
    (
        "tollgate_estimate_text_bytes_total",
        "Prompt text tokenized for reservation estimates (the CPU spent on estimates)",
    ),
];

impl Metrics {
    /// Labels the allow-listed `prometheus_dimensions`, bounded by `dimension_cap`.
    pub fn with_dimensions(mut self, t: &TelemetryConfig) -> Metrics {
        self.dims = AllowedDims {
            names: t.prometheus_dimensions.clone(),
            cap: t.dimension_cap as usize,
            seen: Mutex::default(),
        };
        self
    }

    fn add(&self, name: &'static str, labels: Labels, v: u64) {
        if v == 0 {
            return;
        }
        let mut counters = self.counters.lock();
        let c = counters.entry((name, labels)).or_default();
        *c = c.saturating_add(v);
    }

    /// An error answered before a request was metered.
    pub fn error(&self, code: &'static str) {
        self.add("tollgate_errors_total", vec![("code", code.to_string())], 1);
    }

    pub fn usage_dropped(&self, n: u64) {
        self.usage_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Prompt text about to be tokenized for an estimate.
    pub fn estimate_text(&self, bytes: usize) {
        self.estimated_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn record(&self, r: &RequestRecord, u: &TokenUsage, cost_pico: u64) {
        let (a, o) = (&r.admitted, &r.observed);
        let backend = r.backend_name().unwrap_or("-");
        self.series.record(&Finished {
            consumer: &a.consumer,
            team: &a.team,
            model: &a.model,
            backend,
            status: o.status,
            served: o.backend.is_some(),
            usage: u,
            cost_pico,
            failovers: o.failovers as u64,
        });
        for (dim, value) in &a.dims {
            let Some(value) = self.dims.label(dim, value) else {
                continue;
            };
            let l = || vec![("dimension", dim.to_string()), ("value", value.clone())];
            self.add("tollgate_dimension_requests_total", l(), 1);
            for (kind, v) in [("input", u.input), ("output", u.output)] {
                let mut l = l();
                l.push(("type", kind.to_string()));
                self.add("tollgate_dimension_tokens_total", l, v);
            }
        }
        self.duration.observe([&a.model, backend], r.duration);
        if let Some(t) = o.first_byte {
            self.ttft.observe([&a.model, backend], t);
        }
    }

    /// A budget after an admission (spend includes reservations in flight).
    /// Called on every admission with a budget: allocates nothing once the row exists.
    pub fn budget(&self, scope: BudgetScope, id: &str, b: &BudgetUse, currency: &str) {
        let (limit, spent, period) = (
            units_from_nano(b.limit_nano as i64),
            units_from_nano(b.spent_nano),
            b.period.as_str(),
        );
        let mut m = self.budgets.lock();
        let rows = m.entry(scope.as_str()).or_default();
        match rows.get_mut(id) {
            Some(row) => {
                (row.0, row.1, row.2) = (limit, spent, period);
                if row.3 != currency {
                    row.3 = currency.to_string();
                }
            }
            None => {
                rows.insert(id.to_string(), (limit, spent, period, currency.to_string()));
            }
        }
    }

    /// Every budget row: scope, id, limit, spent, period, currency (OTLP's gauges).
    pub fn budget_rows(&self) -> Vec<(&'static str, String, f64, f64, &'static str, String)> {
        let m = self.budgets.lock();
        m.iter()
            .flat_map(|(scope, rows)| {
                rows.iter().map(|(id, (limit, spent, period, currency))| {
                    (
                        *scope,
                        id.clone(),
                        *limit,
                        *spent,
                        *period,
                        currency.clone(),
                    )
                })
            })
            .collect()
    }

    fn render_budgets(&self, out: &mut String) {
        let budgets = self.budgets.lock().clone();
        for (name, help) in [
            (
                "tollgate_budget_limit",
                "Budget per window, in the price currency",
            ),
            (
                "tollgate_budget_spent",
                "Budget spent in the current window (reservations in flight included)",
            ),
            (
                "tollgate_budget_remaining",
                "Budget left in the current window",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let rows = budgets
                .iter()
                .flat_map(|(s, rows)| rows.iter().map(move |r| (s, r)));
            for (scope, (id, (limit, spent, period, currency))) in rows {
                let v = match name {
                    "tollgate_budget_limit" => *limit,
                    "tollgate_budget_spent" => *spent,
                    _ => limit - spent,
                };
                let _ = writeln!(
                    out,
                    "{name}{{scope=\"{scope}\",id=\"{}\",period=\"{period}\",currency=\"{}\"}} {v}",
                    escape(id),
                    escape(currency)
                );
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::with_capacity(4096);
        let counters = self.counters.lock().clone();
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let single = match name {
                "tollgate_usage_dropped_total" => Some(&self.usage_dropped),
                "tollgate_estimate_text_bytes_total" => Some(&self.estimated_bytes),
                _ => None,
            };
            if let Some(v) = single {
                let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
                continue;
            }
            if self.series.render(name, &mut out) {
                continue;
            }
            for ((n, labels), v) in counters.iter().filter(|((n, _), _)| *n == name) {
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(out, "{n}{{{}}} {v}", l.join(","));
            }
        }
        self.render_budgets(&mut out);
        self.duration.render(&mut out);
        self.ttft.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP tollgate_build_info The running build (always 1)\n\
             # TYPE tollgate_build_info gauge\n\
             tollgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out.push_str(extra);
        out
    }
}

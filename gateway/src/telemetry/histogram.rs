//! Prometheus histograms of request latency, with buckets suited to LLM traffic (a first token
//! in tens of milliseconds, a whole answer in up to minutes), one series per pair of label
//! values (model and backend). Recording is lock-free once a series exists and allocates
//! nothing: the borrowed values are looked up under a read lock, then buckets, sum and count
//! are atomics.

use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Request duration buckets (seconds): from a cached or tiny answer to a long reasoning one.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Time-to-first-token buckets (seconds).
pub const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0,
];

/// One series: cumulative only when rendered.
struct Series {
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// Series by the first label's value, then the second's.
type ByLabels = BTreeMap<Box<str>, BTreeMap<Box<str>, Arc<Series>>>;

/// A histogram family: one name, two labels, fixed buckets, a series per pair of values.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    labels: [&'static str; 2],
    bounds: &'static [f64],
    series: RwLock<ByLabels>,
}

impl Histogram {
    pub fn new(
        name: &'static str,
        help: &'static str,
        labels: [&'static str; 2],
        bounds: &'static [f64],
    ) -> Histogram {
        Histogram {
            name,
            help,
            labels,
            bounds,
            series: RwLock::default(),
        }
    }

    /// One observation of the series labelled `values` (in the order of the labels).
    pub fn observe(&self, values: [&str; 2], d: Duration) {
        let [a, b] = values;
        let existing = self.series.read().get(a).and_then(|m| m.get(b)).cloned();
        let s = match existing {
            Some(s) => s,
            None => self
                .series
                .write()
                .entry(a.into())
                .or_default()
                .entry(b.into())
                .or_insert_with(|| {
                    Arc::new(Series {
                        buckets: self.bounds.iter().map(|_| AtomicU64::new(0)).collect(),
                        sum_us: AtomicU64::new(0),
                        count: AtomicU64::new(0),
                    })
                })
                .clone(),
        };
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            s.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        s.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        s.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition: `_bucket` (cumulative, `le` ending with `+Inf`), `_sum`, `_count`.
    pub fn render(&self, out: &mut String) {
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", self.help);
        let [ka, kb] = self.labels;
        let series = self.series.read();
        let all = series
            .iter()
            .flat_map(|(a, m)| m.iter().map(move |(b, s)| (a, b, s)));
        for (a, b, s) in all {
            let (a, b) = (super::series::escape(a), super::series::escape(b));
            let l = format!("{ka}=\"{a}\",{kb}=\"{b}\",");
            let mut acc = 0;
            for (b, n) in self.bounds.iter().zip(&s.buckets) {
                acc += n.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{{l}le=\"{b}\"}} {acc}");
            }
            let count = s.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{l}le=\"+Inf\"}} {count}");
            let labels = l.trim_end_matches(',');
            let sum = s.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets are cumulative and end with +Inf = count; a value beyond every bucket counts
    /// only in +Inf; sum is in seconds.
    #[test]
    fn cumulative_buckets() {
        let h = Histogram::new("x_seconds", "help", ["model", "backend"], &[0.1, 1.0]);
        h.observe(["m", "b"], Duration::from_millis(50));
        h.observe(["m", "b"], Duration::from_millis(500));
        h.observe(["m", "b"], Duration::from_secs(5));
        h.observe(["a", "b\""], Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("# TYPE x_seconds histogram"));
        assert!(
            out.contains("x_seconds_bucket{model=\"m\",backend=\"b\",le=\"0.1\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{model=\"m\",backend=\"b\",le=\"1\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{model=\"m\",backend=\"b\",le=\"+Inf\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_sum{model=\"m\",backend=\"b\"} 5.55"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_count{model=\"m\",backend=\"b\"} 3"),
            "{out}"
        );
        // Series sorted by model then backend; values escaped.
        let first = out.find("model=\"a\",backend=\"b\\\"\"").expect(&out);
        assert!(first < out.find("model=\"m\"").unwrap(), "{out}");
    }
}

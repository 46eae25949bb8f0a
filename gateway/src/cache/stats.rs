//! The cache's Prometheus series: `tollgate_cache_requests_total{cache,result}` (hit, miss,
//! bypass), hits by layer, tokens saved and cost avoided, failures by stage, answers stored or
//! refused, and gauges of entries and of the vector index's size (refreshed in the background).
//! Label values come only from the configuration and fixed names.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use tollgate_quota::cache::CacheStats;

type Key = (&'static str, Arc<str>, &'static str);

pub struct CacheMetrics {
    names: Vec<Arc<str>>,
    counters: Mutex<BTreeMap<Key, u64>>,
    gauges: Mutex<BTreeMap<Arc<str>, CacheStats>>,
}

const HELP: [(&str, &str, &str); 7] = [
    (
        "tollgate_cache_skips_total",
        "reason",
        "Requests a [[cache]] covered but must not serve (n>1, tools, temperature, previous_response_id)",
    ),
    (
        "tollgate_cache_requests_total",
        "result",
        "Requests a [[cache]] covered, by result (hit, miss, bypass)",
    ),
    (
        "tollgate_cache_hits_total",
        "layer",
        "Cache hits by layer (exact, semantic)",
    ),
    (
        "tollgate_cache_tokens_saved_total",
        "kind",
        "Tokens replayed from the cache instead of generated (input, output)",
    ),
    (
        "tollgate_cache_cost_avoided_pico_total",
        "kind",
        "Cost of the replayed tokens at the backend that produced them, in pico-units",
    ),
    (
        "tollgate_cache_failures_total",
        "stage",
        "Cache failures that made a request bypass the cache or an answer go unstored",
    ),
    (
        "tollgate_cache_stores_total",
        "result",
        "Answers of misses: stored, or not storable (cut, filtered, errors)",
    ),
];

impl CacheMetrics {
    pub fn new(names: Vec<Arc<str>>) -> CacheMetrics {
        CacheMetrics {
            names,
            counters: Mutex::default(),
            gauges: Mutex::default(),
        }
    }

    pub fn add(&self, series: &'static str, cache: &Arc<str>, label: &'static str, v: u64) {
        if v == 0 {
            return;
        }
        let mut c = self.counters.lock();
        let e = c.entry((series, cache.clone(), label)).or_default();
        *e = e.saturating_add(v);
    }

    pub fn count(&self, series: &'static str, cache: &Arc<str>, label: &'static str) {
        self.add(series, cache, label, 1);
    }

    pub fn get(&self, series: &'static str, cache: &str, label: &str) -> u64 {
        self.counters
            .lock()
            .iter()
            .filter(|((s, c, l), _)| *s == series && &**c == cache && *l == label)
            .map(|(_, v)| *v)
            .sum()
    }

    pub fn set_stats(&self, cache: &Arc<str>, s: &CacheStats) {
        self.gauges.lock().insert(cache.clone(), s.clone());
    }

    /// The Prometheus text of every cache series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.names.is_empty() {
            return out;
        }
        let counters = self.counters.lock();
        for (series, label, help) in HELP {
            let _ = writeln!(out, "# HELP {series} {help}\n# TYPE {series} counter");
            for ((s, cache, l), v) in counters.iter() {
                if *s == series {
                    let _ = writeln!(out, "{series}{{cache=\"{cache}\",{label}=\"{l}\"}} {v}");
                }
            }
        }
        drop(counters);
        let gauges = self.gauges.lock();
        out.push_str(
            "# HELP tollgate_cache_entries Live entries per cache\n# TYPE tollgate_cache_entries gauge\n",
        );
        for (cache, s) in gauges.iter() {
            let _ = writeln!(
                out,
                "tollgate_cache_entries{{cache=\"{cache}\"}} {}",
                s.entries
            );
        }
        out.push_str("# HELP tollgate_cache_index_bytes Memory of the cache's vector index\n# TYPE tollgate_cache_index_bytes gauge\n");
        for (cache, s) in gauges.iter() {
            if let Some(b) = s.index_bytes {
                let _ = writeln!(out, "tollgate_cache_index_bytes{{cache=\"{cache}\"}} {b}");
            }
        }
        out
    }
}

//! The per-request counters of `/metrics`: requests, tokens, cost and backend responses by
//! consumer, team, model, backend (and status), and failovers by model. One request updates
//! them all with one map lookup under one short lock, and allocates nothing once its series
//! exists (the lookup borrows the request's strings; only a new series copies them).

use indexmap::{Equivalent, IndexMap};
use parking_lot::Mutex;
use std::fmt::Write;
use tollgate_common::TokenUsage;

/// One series: the labels every per-request counter shares.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    consumer: Box<str>,
    team: Box<str>,
    model: Box<str>,
    backend: Box<str>,
    status: u16,
}

/// A [`Key`] borrowed from a request: hashes as the owned key does (same fields, same order).
#[derive(Hash)]
struct KeyRef<'a> {
    consumer: &'a str,
    team: &'a str,
    model: &'a str,
    backend: &'a str,
    status: u16,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, k: &Key) -> bool {
        self.status == k.status
            && self.consumer == &*k.consumer
            && self.team == &*k.team
            && self.model == &*k.model
            && self.backend == &*k.backend
    }
}

impl KeyRef<'_> {
    fn to_owned(&self) -> Key {
        Key {
            consumer: self.consumer.into(),
            team: self.team.into(),
            model: self.model.into(),
            backend: self.backend.into(),
            status: self.status,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests: u64,
    input: u64,
    output: u64,
    cached_input: u64,
    cost_pico: u64,
    /// Responses a backend served (not cache hits, not refusals).
    served: u64,
}

/// What one finished request adds.
pub struct Finished<'a> {
    pub consumer: &'a str,
    pub team: &'a str,
    pub model: &'a str,
    /// `-` when no backend is named.
    pub backend: &'a str,
    pub status: u16,
    /// A backend served the response.
    pub served: bool,
    pub usage: &'a TokenUsage,
    pub cost_pico: u64,
    pub failovers: u64,
}

#[derive(Default)]
pub struct Series {
    counts: Mutex<IndexMap<Key, Counts>>,
    failovers: Mutex<IndexMap<Box<str>, u64>>,
}

impl Series {
    pub fn record(&self, f: &Finished<'_>) {
        let key = KeyRef {
            consumer: f.consumer,
            team: f.team,
            model: f.model,
            backend: f.backend,
            status: f.status,
        };
        {
            let mut counts = self.counts.lock();
            let c = match counts.get_mut(&key) {
                Some(c) => c,
                None => counts.entry(key.to_owned()).or_default(),
            };
            c.requests += 1;
            c.input = c.input.saturating_add(f.usage.input);
            c.output = c.output.saturating_add(f.usage.output);
            c.cached_input = c.cached_input.saturating_add(f.usage.cached_input);
            c.cost_pico = c.cost_pico.saturating_add(f.cost_pico);
            c.served += u64::from(f.served);
        }
        if f.failovers > 0 {
            let mut m = self.failovers.lock();
            match m.get_mut(f.model) {
                Some(n) => *n += f.failovers,
                None => {
                    m.insert(f.model.into(), f.failovers);
                }
            }
        }
    }

    /// Writes the samples of `name` if it is one of these counters (the caller wrote its
    /// `# HELP`/`# TYPE` lines); `false` when it is not. Series are sorted; zero samples of a
    /// series (no cached input, no cost) are left out, as the other counters do.
    pub fn render(&self, name: &str, out: &mut String) -> bool {
        match name {
            "tollgate_requests_total" | "tollgate_tokens_total" | "tollgate_cost_pico_total" => {}
            "tollgate_backend_requests_total" => {
                let mut by_backend: Vec<((Box<str>, u16), u64)> = Vec::new();
                for (k, c) in self.sorted() {
                    if c.served == 0 {
                        continue;
                    }
                    match by_backend
                        .iter_mut()
                        .find(|((b, s), _)| *b == k.backend && *s == k.status)
                    {
                        Some((_, n)) => *n += c.served,
                        None => by_backend.push(((k.backend.clone(), k.status), c.served)),
                    }
                }
                by_backend.sort();
                for ((backend, status), n) in by_backend {
                    let _ = writeln!(
                        out,
                        "{name}{{backend=\"{}\",status=\"{status}\"}} {n}",
                        escape(&backend)
                    );
                }
                return true;
            }
            "tollgate_failovers_total" => {
                let mut m: Vec<(Box<str>, u64)> = self
                    .failovers
                    .lock()
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                m.sort();
                for (model, n) in m {
                    let _ = writeln!(out, "{name}{{model=\"{}\"}} {n}", escape(&model));
                }
                return true;
            }
            _ => return false,
        }
        for (k, c) in self.sorted() {
            let labels = format!(
                "consumer=\"{}\",team=\"{}\",model=\"{}\",backend=\"{}\"",
                escape(&k.consumer),
                escape(&k.team),
                escape(&k.model),
                escape(&k.backend)
            );
            match name {
                "tollgate_requests_total" => {
                    let _ = writeln!(
                        out,
                        "{name}{{{labels},status=\"{}\"}} {}",
                        k.status, c.requests
                    );
                }
                "tollgate_tokens_total" => {
                    for (kind, v) in [
                        ("input", c.input),
                        ("output", c.output),
                        ("cached_input", c.cached_input),
                    ] {
                        if v > 0 {
                            let _ = writeln!(out, "{name}{{{labels},type=\"{kind}\"}} {v}");
                        }
                    }
                }
                _ => {
                    if c.cost_pico > 0 {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", c.cost_pico);
                    }
                }
            }
        }
        true
    }

    fn sorted(&self) -> Vec<(Key, Counts)> {
        let mut v: Vec<(Key, Counts)> = self
            .counts
            .lock()
            .iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// A label value escaped for the Prometheus text format.
pub(super) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished<'a>(consumer: &'a str, status: u16, usage: &'a TokenUsage) -> Finished<'a> {
        Finished {
            consumer,
            team: "t",
            model: "gpt-4o",
            backend: "ptu",
            status,
            served: status == 200,
            usage,
            cost_pico: 7,
            failovers: 1,
        }
    }

    /// Requests of one series add up in one sample per counter; another status is another
    /// series; failovers and backend responses are summed by their own labels.
    #[test]
    fn series_add_up_and_render() {
        let s = Series::default();
        let u = TokenUsage {
            input: 10,
            output: 3,
            ..TokenUsage::default()
        };
        s.record(&finished("a\"b", 200, &u));
        s.record(&finished("a\"b", 200, &u));
        s.record(&finished("c", 429, &TokenUsage::default()));
        let mut out = String::new();
        for name in [
            "tollgate_requests_total",
            "tollgate_tokens_total",
            "tollgate_cost_pico_total",
            "tollgate_backend_requests_total",
            "tollgate_failovers_total",
        ] {
            assert!(s.render(name, &mut out));
        }
        assert!(!s.render("tollgate_errors_total", &mut out));
        let base = "consumer=\"a\\\"b\",team=\"t\",model=\"gpt-4o\",backend=\"ptu\"";
        for line in [
            format!("tollgate_requests_total{{{base},status=\"200\"}} 2"),
            format!("tollgate_tokens_total{{{base},type=\"input\"}} 20"),
            format!("tollgate_tokens_total{{{base},type=\"output\"}} 6"),
            format!("tollgate_cost_pico_total{{{base}}} 14"),
            "tollgate_backend_requests_total{backend=\"ptu\",status=\"200\"} 2".to_string(),
            "tollgate_failovers_total{model=\"gpt-4o\"} 3".to_string(),
            "tollgate_requests_total{consumer=\"c\",team=\"t\",model=\"gpt-4o\",backend=\"ptu\",status=\"429\"} 1".to_string(),
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line}:\n{out}");
        }
        assert!(
            !out.contains("cached_input"),
            "zero samples are left out:\n{out}"
        );
        assert!(!out.contains("status=\"429\"} 0"), "{out}");
    }
}

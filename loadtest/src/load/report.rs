//! The numbers a load run produces: samples are folded into HDR histograms as requests finish,
//! and [`LoadReport`] is the result, printed as a human summary (`Display`) or as one JSON
//! object (`Serialize`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histograms can hold: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// The result of one load run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests that finished (any status, or a transport error).
    pub requests: u64,
    /// Wall time from the first send to the last request finishing.
    pub duration_s: f64,
    /// `requests / duration_s`.
    pub rps: f64,
    /// Latency to the end of the body; in open-loop runs measured from the *intended* send
    /// time, so a stalled server cannot hide its queueing (no coordinated omission).
    pub latency_us: Percentiles,
    /// Count per HTTP status code, plus `"error"` for transport errors (connect, timeout).
    pub status: BTreeMap<String, u64>,
    /// Time to the first content token of a stream; `null` unless `--stream`.
    pub ttft_us: Option<Percentiles>,
    /// Streamed content chunks per second over the whole run; `null` unless `--stream`.
    pub tokens_per_sec: Option<f64>,
    /// Streamed content chunks received in total.
    pub output_tokens: u64,
    /// Open-loop sends skipped because too many requests were outstanding.
    pub dropped: u64,
    /// Responses whose status arrived but whose body then failed (e.g. a cut stream).
    pub body_errors: u64,
    /// The requested open-loop rate, if any.
    pub target_rps: Option<f64>,
    /// The closed-loop worker count, if any.
    pub concurrency: Option<usize>,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What one finished request contributes.
pub(crate) struct Sample {
    /// `None` for a transport error.
    pub(crate) status: Option<u16>,
    pub(crate) latency: Duration,
    pub(crate) ttft: Option<Duration>,
    pub(crate) tokens: u64,
    pub(crate) body_error: bool,
}

/// Running totals; one per run, behind a short lock.
pub(crate) struct Recorder {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    status: BTreeMap<u16, u64>,
    errors: u64,
    tokens: u64,
    body_errors: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("fixed, valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(MAX_US)
        .clamp(1, MAX_US)
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Recorder {
            latency: histogram(),
            ttft: histogram(),
            status: BTreeMap::new(),
            errors: 0,
            tokens: 0,
            body_errors: 0,
        }
    }

    pub(crate) fn record(&mut self, sample: &Sample) {
        match sample.status {
            Some(code) => {
                *self.status.entry(code).or_default() += 1;
                self.latency.saturating_record(micros(sample.latency));
            }
            None => self.errors += 1,
        }
        if let Some(ttft) = sample.ttft {
            self.ttft.saturating_record(micros(ttft));
        }
        self.tokens += sample.tokens;
        self.body_errors += u64::from(sample.body_error);
    }

    pub(crate) fn report(
        &self,
        elapsed: Duration,
        stream: bool,
        dropped: u64,
        target_rps: Option<f64>,
        concurrency: Option<usize>,
    ) -> LoadReport {
        let requests = self.latency.len() + self.errors;
        let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let mut status: BTreeMap<String, u64> = self
            .status
            .iter()
            .map(|(code, n)| (code.to_string(), *n))
            .collect();
        if self.errors > 0 {
            status.insert("error".into(), self.errors);
        }
        LoadReport {
            requests,
            duration_s: elapsed.as_secs_f64(),
            rps: requests as f64 / secs,
            latency_us: Percentiles::of(&self.latency),
            status,
            ttft_us: (stream && !self.ttft.is_empty()).then(|| Percentiles::of(&self.ttft)),
            tokens_per_sec: stream.then(|| self.tokens as f64 / secs),
            output_tokens: self.tokens,
            dropped,
            body_errors: self.body_errors,
            target_rps,
            concurrency,
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn write_percentiles(f: &mut fmt::Formatter<'_>, label: &str, p: &Percentiles) -> fmt::Result {
    writeln!(
        f,
        "{label:<9} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max)
    )
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match (self.target_rps, self.concurrency) {
            (Some(rate), _) => format!("open loop at {rate} rps"),
            (None, Some(n)) => format!("closed loop, {n} workers"),
            (None, None) => "unknown mode".into(),
        };
        writeln!(
            f,
            "{} requests in {:.2} s ({mode}): {:.1} rps",
            self.requests, self.duration_s, self.rps
        )?;
        write_percentiles(f, "latency", &self.latency_us)?;
        if let Some(ttft) = &self.ttft_us {
            write_percentiles(f, "ttft", ttft)?;
        }
        if let Some(tps) = self.tokens_per_sec {
            writeln!(
                f,
                "tokens    {} streamed, {tps:.1} tokens/s",
                self.output_tokens
            )?;
        }
        let status: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(f, "status    {}", status.join(", "))?;
        if self.dropped > 0 || self.body_errors > 0 {
            writeln!(
                f,
                "dropped   {} (too many outstanding); body errors {}",
                self.dropped, self.body_errors
            )?;
        }
        Ok(())
    }
}

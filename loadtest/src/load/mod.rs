//! An HTTP load generator for OpenAI-style endpoints (tollgate, or the mock directly).
//!
//! With `--rate` it runs an *open loop*: request `i` is due at `start + i / rate`, each is its
//! own task, and latency is measured from that intended time, so a server that stalls is
//! charged for the queue it causes (no coordinated omission). Outstanding requests are capped
//! and sends beyond the cap are counted as dropped. With `--concurrency N` it runs a *closed
//! loop* of N workers sending back to back. Results go into HDR histograms ([`LoadReport`]).

mod report;
mod sse;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use parking_lot::Mutex;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;

pub use report::{LoadReport, Percentiles};
use report::{Recorder, Sample};

use crate::mock::completion_text;

/// How the key is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HeaderStyle {
    /// `Authorization: Bearer KEY` (OpenAI style).
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure OpenAI style).
    ApiKey,
    /// `Ocp-Apim-Subscription-Key: KEY` (Azure API Management style).
    Subscription,
}

/// A load run's parameters; also the `tollgate-load` command line.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["rate", "concurrency"])))]
pub struct LoadOpts {
    /// Base URL of the target, e.g. `http://127.0.0.1:8080`.
    #[arg(long)]
    pub url: String,
    /// Key sent with every request (unless `--keys-file` is given).
    #[arg(long, required_unless_present = "keys_file")]
    pub key: Option<String>,
    /// Open loop: requests per second, sent on schedule whatever the responses do.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: this many workers, each sending its next request when the last finished.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Ask for streamed responses and measure time to first token and tokens/s.
    #[arg(long)]
    pub stream: bool,
    /// Prompt size in tokens, as the mock counts them (chat framing included).
    #[arg(long, default_value_t = 100)]
    pub prompt_tokens: u64,
    /// `max_tokens` (`max_output_tokens` for `/responses`).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u64,
    #[arg(long, default_value = "gpt-4o")]
    pub model: String,
    /// Request path appended to `--url`; the body follows the operation it ends with
    /// (chat/completions, completions, embeddings, responses).
    #[arg(long, default_value = "/v1/chat/completions")]
    pub path: String,
    /// Lines `KEY [MODEL]`, used round-robin: several consumers and models in one run.
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = HeaderStyle::Bearer)]
    pub header_style: HeaderStyle,
    /// Open loop: most requests outstanding at once; sends beyond it are dropped and counted.
    #[arg(long, default_value_t = 10_000)]
    pub max_outstanding: usize,
    /// Per-request timeout in seconds (a timeout counts as status "error").
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Every request a different body (`"seed": N`, N the run's start in µs since the epoch
    /// plus the request's number): an answer cache in front of the target misses every time,
    /// also across runs, and the prompt stays the same size.
    #[arg(long)]
    pub unique: bool,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts {
            url: "http://127.0.0.1:8080".into(),
            key: Some("test-key".into()),
            rate: None,
            concurrency: Some(1),
            duration: 10.0,
            stream: false,
            prompt_tokens: 100,
            max_tokens: 16,
            model: "gpt-4o".into(),
            path: "/v1/chat/completions".into(),
            keys_file: None,
            header_style: HeaderStyle::Bearer,
            max_outstanding: 10_000,
            timeout: 60.0,
            unique: false,
        }
    }
}

/// One prepared request variant: a credential and a body, reused for every send.
struct Target {
    auth: (HeaderName, HeaderValue),
    body: Bytes,
}

/// Everything a request task needs, shared by all of them.
struct Shared {
    client: reqwest::Client,
    url: String,
    targets: Vec<Target>,
    stream: bool,
    /// `--unique`: the first request's seed.
    unique: Option<u64>,
    recorder: Mutex<Recorder>,
}

/// Runs the load described by `opts` and returns its report.
pub async fn run(opts: LoadOpts) -> anyhow::Result<LoadReport> {
    if !(opts.duration > 0.0 && opts.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    let targets = targets(&opts)?;
    let pool = match (opts.rate, opts.concurrency) {
        (Some(_), _) => opts.max_outstanding.min(4096),
        (None, Some(n)) => n,
        (None, None) => bail!("give --rate or --concurrency"),
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs_f64(opts.timeout))
        .build()
        .context("building the HTTP client")?;
    let shared = Arc::new(Shared {
        client,
        url: format!("{}{}", opts.url.trim_end_matches('/'), opts.path),
        targets,
        stream: opts.stream,
        unique: opts.unique.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64)
        }),
        recorder: Mutex::new(Recorder::new()),
    });
    let duration = Duration::from_secs_f64(opts.duration);
    let start = Instant::now();
    let dropped = match (opts.rate, opts.concurrency) {
        (Some(rate), _) => {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number");
            }
            open_loop(&shared, rate, start, duration, opts.max_outstanding).await?
        }
        (None, Some(workers)) => {
            closed_loop(&shared, workers.max(1), start + duration).await;
            0
        }
        (None, None) => 0,
    };
    let elapsed = start.elapsed();
    let report = shared.recorder.lock().report(
        elapsed,
        opts.stream,
        dropped,
        opts.rate,
        opts.concurrency.filter(|_| opts.rate.is_none()),
    );
    Ok(report)
}

/// Sends on a fixed schedule; returns how many sends were dropped at the outstanding cap.
///
/// The schedule is kept by a dedicated thread: `std::thread::sleep` wakes within tens of
/// microseconds, where tokio's 1 ms timer wheel would add up to a millisecond of the
/// generator's own lateness to every latency measured from the intended time.
async fn open_loop(
    shared: &Arc<Shared>,
    rate: f64,
    start: Instant,
    duration: Duration,
    cap: usize,
) -> anyhow::Result<u64> {
    let outstanding = Arc::new(Outstanding::default());
    let runtime = tokio::runtime::Handle::current();
    let pacer = {
        let (shared, outstanding) = (Arc::clone(shared), Arc::clone(&outstanding));
        std::thread::Builder::new()
            .name("tollgate-load-pacer".into())
            .spawn(move || {
                let mut dropped = 0;
                for i in 0u64.. {
                    let offset = Duration::from_secs_f64(i as f64 / rate);
                    if offset >= duration {
                        break;
                    }
                    let intended = start + offset;
                    if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if outstanding.count.load(Ordering::Acquire) >= cap {
                        dropped += 1;
                        continue;
                    }
                    let slot = outstanding.enter();
                    let shared = Arc::clone(&shared);
                    runtime.spawn(async move {
                        send(&shared, i, intended).await;
                        drop(slot);
                    });
                }
                dropped
            })
            .context("starting the pacer thread")?
    };
    let dropped = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .context("joining the pacer thread")?
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    // Every request has its own timeout, so this ends.
    outstanding.drained().await;
    Ok(dropped)
}

/// Open-loop requests still running, and a wake-up for when the last one finishes.
#[derive(Default)]
struct Outstanding {
    count: AtomicUsize,
    idle: Notify,
}

impl Outstanding {
    fn enter(self: &Arc<Self>) -> Slot {
        self.count.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(self))
    }

    async fn drained(&self) {
        while self.count.load(Ordering::Acquire) > 0 {
            self.idle.notified().await;
        }
    }
}

/// One outstanding request; releases its count when dropped (finished or cancelled).
struct Slot(Arc<Outstanding>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

async fn closed_loop(shared: &Arc<Shared>, workers: usize, deadline: Instant) {
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let shared = Arc::clone(shared);
        tasks.spawn(async move {
            let mut i = w as u64;
            while Instant::now() < deadline {
                send(&shared, i, Instant::now()).await;
                i += workers as u64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Sends request number `i`, timing it from `intended`, and records the outcome.
async fn send(shared: &Shared, i: u64, intended: Instant) {
    let target = &shared.targets[(i % shared.targets.len() as u64) as usize];
    let request = shared
        .client
        .post(&shared.url)
        .header(target.auth.0.clone(), target.auth.1.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(match shared.unique {
            Some(first) => seeded(&target.body, first + i),
            None => target.body.clone(),
        });
    let mut sample = Sample {
        status: None,
        latency: Duration::ZERO,
        ttft: None,
        tokens: 0,
        body_error: false,
    };
    if let Ok(response) = request.send().await {
        sample.status = Some(response.status().as_u16());
        let streamed = shared.stream && response.status().is_success();
        let mut body = response.bytes_stream();
        let mut counter = sse::SseCounter::default();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) if streamed => {
                    let tokens = counter.feed(&chunk);
                    if tokens > 0 && sample.ttft.is_none() {
                        sample.ttft = Some(intended.elapsed());
                    }
                    sample.tokens += tokens;
                }
                Ok(_) => {}
                Err(_) => {
                    sample.body_error = true;
                    break;
                }
            }
        }
        sample.latency = intended.elapsed();
    }
    shared.recorder.lock().record(&sample);
}

/// The request variants: one per `--keys-file` line, or just `--key` with `--model`.
fn targets(opts: &LoadOpts) -> anyhow::Result<Vec<Target>> {
    let mut pairs = Vec::new();
    if let Some(path) = &opts.keys_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or_default().to_owned();
            let model = words.next().unwrap_or(&opts.model).to_owned();
            pairs.push((key, model));
        }
        if pairs.is_empty() {
            bail!("{} holds no keys", path.display());
        }
    } else {
        let key = opts
            .key
            .clone()
            .context("--key or --keys-file is required")?;
        pairs.push((key, opts.model.clone()));
    }
    pairs
        .into_iter()
        .map(|(key, model)| {
            let auth = match opts.header_style {
                HeaderStyle::Bearer => (reqwest::header::AUTHORIZATION, format!("Bearer {key}")),
                HeaderStyle::ApiKey => (HeaderName::from_static("api-key"), key),
                HeaderStyle::Subscription => {
                    (HeaderName::from_static("ocp-apim-subscription-key"), key)
                }
            };
            let value =
                HeaderValue::try_from(auth.1).context("the key is not a valid header value")?;
            let body = serde_json::to_vec(&request_body(opts, &model))?;
            Ok(Target {
                auth: (auth.0, value),
                body: Bytes::from(body),
            })
        })
        .collect()
}

/// `body` (a JSON object) with `"seed": i` added as its last member.
fn seeded(body: &Bytes, i: u64) -> Bytes {
    let end = body.len().saturating_sub(1);
    let mut b = Vec::with_capacity(body.len() + 32);
    b.extend_from_slice(&body[..end]);
    b.extend_from_slice(format!(",\"seed\":{i}}}").as_bytes());
    Bytes::from(b)
}

/// A body for the operation `opts.path` names, whose prompt the mock counts as
/// `opts.prompt_tokens` (chat framing of 6 tokens included, so at least 7 for chat).
fn request_body(opts: &LoadOpts, model: &str) -> Value {
    let path = opts.path.split('?').next().unwrap_or_default();
    let framing = crate::mock::TOKENS_PER_MESSAGE + crate::mock::TOKENS_PER_REPLY;
    if path.ends_with("/chat/completions") {
        let content = completion_text(opts.prompt_tokens.saturating_sub(framing).max(1));
        json!({"model": model, "messages": [{"role": "user", "content": content}],
               "max_tokens": opts.max_tokens, "stream": opts.stream})
    } else if path.ends_with("/completions") {
        json!({"model": model, "prompt": completion_text(opts.prompt_tokens),
               "max_tokens": opts.max_tokens, "stream": opts.stream})
    } else if path.ends_with("/embeddings") {
        json!({"model": model, "input": completion_text(opts.prompt_tokens)})
    } else {
        json!({"model": model, "input": completion_text(opts.prompt_tokens),
               "max_output_tokens": opts.max_tokens, "stream": opts.stream})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, MockOpts, count_prompt_tokens};

    /// The generated chat body carries exactly `--prompt-tokens` by the mock's counting rule.
    #[test]
    fn chat_body_has_requested_prompt_tokens() {
        let opts = LoadOpts {
            prompt_tokens: 100,
            ..LoadOpts::default()
        };
        assert_eq!(count_prompt_tokens(&request_body(&opts, "m")), 100);
    }

    /// `--unique` bodies differ by their seed only: still JSON, the same prompt.
    #[test]
    fn seeded_bodies_differ_by_the_seed() {
        let body =
            Bytes::from(serde_json::to_vec(&request_body(&LoadOpts::default(), "m")).unwrap());
        let a: Value = serde_json::from_slice(&seeded(&body, 7)).unwrap();
        let b: Value = serde_json::from_slice(&seeded(&body, 8)).unwrap();
        assert_eq!(a["seed"], 7);
        assert_eq!(b["seed"], 8);
        assert_eq!(a["messages"], b["messages"]);
        assert_eq!(count_prompt_tokens(&a), 100);
    }

    /// A one-second run against the in-process mock, open and closed loop, gets 200s.
    #[tokio::test]
    async fn run_against_mock_counts_200s() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(mock::serve(listener, MockOpts::default(), async move {
            let _ = stopped.await;
        }));

        let open = LoadOpts {
            url: url.clone(),
            rate: Some(200.0),
            concurrency: None,
            duration: 1.0,
            stream: true,
            ..LoadOpts::default()
        };
        let report = run(open).await.unwrap();
        assert!(
            report.status.get("200").copied().unwrap_or(0) > 100,
            "{report:?}"
        );
        assert_eq!(report.output_tokens, report.requests * 16);
        assert!(report.ttft_us.is_some());

        let closed = LoadOpts {
            url,
            concurrency: Some(4),
            duration: 0.5,
            ..LoadOpts::default()
        };
        let report = run(closed).await.unwrap();
        assert!(
            report.status.get("200").copied().unwrap_or(0) > 0,
            "{report:?}"
        );
        assert_eq!(report.requests, report.status["200"]);
        assert!(report.ttft_us.is_none());
        drop(stop);
    }
}

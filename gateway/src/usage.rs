//! Settle and account: what each request really used, off the latency path.
//!
//! The pipeline hands a [`Meter`] along with the request; whatever way the request ends —
//! a complete response, a backend failure, an error, a client that disconnects mid-stream — the
//! meter's drop sends an [`Outcome`] to the usage worker. The worker counts tokens the backend
//! did not report (tiktoken, off the runtime for long text), corrects the reservation by
//! (actual − estimate), prices the usage, folds it into the daily totals in the same store
//! write, updates metrics and emits one usage event. Store writes are batched: one pipeline for
//! whatever arrived while the previous write was in flight. Writes that fail are kept (bounded)
//! and retried; what overflows is counted and logged, never dropped silently.

use crate::limits::{Limits, Placement, Reserved};
use crate::otel::{Otel, RequestSpan};
use crate::request::Operation;
use crate::routing::Backend;
use crate::telemetry::Metrics;
use crate::tokens::Tokenizer;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tollgate_common::TokenUsage;
use tollgate_quota::{Settlement, Store, UsageDelta, day_of};

/// Most settlements held for retry while the store is unreachable.
const MAX_PENDING: usize = 200_000;
/// Most completion text kept for counting when the backend reports no usage.
const MAX_TEXT: usize = 4 * 1024 * 1024;

/// Everything known about a request once it is over.
#[derive(Debug)]
pub struct Outcome {
    pub request_id: String,
    pub consumer: Arc<str>,
    pub team: String,
    pub model: String,
    pub op: Operation,
    pub stream: bool,
    pub backend: Option<Arc<Backend>>,
    pub reserved: Option<Reserved>,
    /// Usage as the backend reported it.
    pub reported: Option<TokenUsage>,
    /// Prompt tokens as the gateway counted them (used when the backend reports none).
    pub prompt_tokens: u64,
    /// Completion text seen, for counting when the backend reports no usage.
    pub text: String,
    /// HTTP status the client got (0 = the client went away first).
    pub status: u16,
    /// The response body ended as the backend ended it.
    pub complete: bool,
    pub started: Instant,
    pub first_byte: Option<Duration>,
    pub duration: Duration,
    pub failovers: u32,
    /// W3C trace id (hex) of the request: the gateway span's, else the client's; empty if none.
    pub trace_id: String,
    /// The request's OTLP span, ended by the usage worker once the tokens are known.
    pub span: Option<RequestSpan>,
}

/// Follows one request and reports its [`Outcome`] exactly once, on drop.
pub struct Meter {
    outcome: Option<Outcome>,
    tx: Option<mpsc::UnboundedSender<Outcome>>,
}

impl Meter {
    pub fn new(tx: mpsc::UnboundedSender<Outcome>, outcome: Outcome) -> Meter {
        Meter {
            outcome: Some(outcome),
            tx: Some(tx),
        }
    }

    /// A meter that reports nothing: what is left behind when a meter moves into a response body.
    pub fn detached() -> Meter {
        Meter {
            outcome: None,
            tx: None,
        }
    }

    pub fn get(&mut self) -> &mut Outcome {
        // The outcome is only taken in `drop`.
        self.outcome.get_or_insert_with(unreachable_outcome)
    }

    pub fn push_text(&mut self, s: &str) {
        let o = self.get();
        if o.text.len() + s.len() <= MAX_TEXT {
            o.text.push_str(s);
        }
    }
}

fn unreachable_outcome() -> Outcome {
    Outcome {
        request_id: String::new(),
        consumer: Arc::from(""),
        team: String::new(),
        model: String::new(),
        op: Operation::Chat,
        stream: false,
        backend: None,
        reserved: None,
        reported: None,
        prompt_tokens: 0,
        text: String::new(),
        status: 0,
        complete: false,
        started: Instant::now(),
        first_byte: None,
        duration: Duration::ZERO,
        failovers: 0,
        trace_id: String::new(),
        span: None,
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let (Some(mut o), Some(tx)) = (self.outcome.take(), self.tx.take()) {
            o.duration = o.started.elapsed();
            // The worker is gone only after shutdown's final flush; nothing left to settle then.
            let _ = tx.send(o);
        }
    }
}

/// Tokens actually used: the backend's report, else our own count of what was served.
pub async fn resolve_usage(o: &mut Outcome, tokenizer: &Tokenizer) -> TokenUsage {
    if let Some(u) = o.reported {
        return u;
    }
    let served = o.backend.is_some() && (200..300).contains(&o.status) || !o.text.is_empty();
    if !served {
        return TokenUsage::default();
    }
    let text = std::mem::take(&mut o.text);
    let output = if text.is_empty() {
        0
    } else {
        tokenizer.count_text(text).await
    };
    TokenUsage {
        input: o.prompt_tokens,
        output,
        cached_input: 0,
    }
}

/// Cost in pico-units: tokens × price per 1M tokens in micro-units.
pub fn cost_pico(u: &TokenUsage, b: &Backend) -> u64 {
    let cached = u.cached_input.min(u.input);
    ((u.input - cached).saturating_mul(b.price.input))
        .saturating_add(cached.saturating_mul(b.price.cached_input))
        .saturating_add(u.output.saturating_mul(b.price.output))
}

/// The worker's inputs and outputs.
pub struct UsageWorker {
    pub limits: Arc<Limits>,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Tokenizer,
    /// OTLP export (span end, metrics, the usage log record), when configured.
    pub otel: Option<Arc<Otel>>,
}

impl UsageWorker {
    /// Runs until every sender is gone, then flushes what is pending (bounded by `flush_for`).
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Outcome>, flush_for: Duration) {
        let mut pending = Pending::default();
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 1024) => {
                    if n == 0 {
                        break;
                    }
                    for o in batch.drain(..) {
                        self.account(o, &mut pending).await;
                    }
                    self.flush(&mut pending).await;
                }
                _ = retry.tick() => self.flush(&mut pending).await,
            }
        }
        let deadline = Instant::now() + flush_for;
        while !pending.is_empty() && Instant::now() < deadline {
            self.flush(&mut pending).await;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if !pending.is_empty() {
            tracing::error!(
                settlements = pending.len(),
                "shutting down with usage the store could not take; it is lost"
            );
        }
    }

    async fn account(&self, mut o: Outcome, pending: &mut Pending) {
        let usage = resolve_usage(&mut o, &self.tokenizer).await;
        let cost = o
            .backend
            .as_ref()
            .map(|b| cost_pico(&usage, b))
            .unwrap_or(0);
        self.metrics.record_outcome(&o, &usage, cost);
        if let Some(otel) = &self.otel {
            otel.record(&mut o, &usage, cost);
        }
        let backend_name = o.backend.as_ref().map(|b| b.name.to_string());
        tracing::debug!(
            target: "tollgate::usage",
            request_id = %o.request_id,
            trace_id = %o.trace_id,
            consumer = %o.consumer,
            team = %o.team,
            model = %o.model,
            backend = backend_name.as_deref().unwrap_or("-"),
            priority = o.backend.as_ref().map(|b| b.config.priority),
            input_tokens = usage.input,
            output_tokens = usage.output,
            cached_tokens = usage.cached_input,
            cost_pico = cost,
            status = o.status,
            stream = o.stream,
            latency_ms = o.duration.as_millis() as u64,
            ttft_ms = o.first_byte.map(|d| d.as_millis() as u64),
            "usage"
        );
        let Some(reserved) = o.reserved.take() else {
            return;
        };
        let actual = usage.total();
        let served = o.backend.is_some() && actual > 0;
        let delta = served.then(|| UsageDelta {
            day: day_of(crate::routing::now_ms() / 1000),
            team: o.team.clone(),
            model: o.model.clone(),
            backend: backend_name.unwrap_or_default(),
            input: usage.input,
            output: usage.output,
            cached_input: usage.cached_input,
            requests: 1,
            cost_pico: cost,
        });
        let consumer = o.consumer.to_string();
        match reserved.place {
            Placement::Shared => pending.push_back(Settlement {
                consumer,
                end: reserved.end,
                reserved: reserved.tokens,
                actual,
                window: reserved.admission.window,
                tpm: reserved.admission.tpm,
                usage: delta,
            }),
            Placement::Local | Placement::Nowhere => {
                if reserved.place == Placement::Local {
                    // Correct the local bucket now.
                    let local = Settlement {
                        consumer: consumer.clone(),
                        end: Default::default(),
                        reserved: reserved.tokens,
                        actual,
                        window: reserved.admission.window,
                        tpm: reserved.admission.tpm,
                        usage: None,
                    };
                    let _ = self
                        .limits
                        .local
                        .settle(tollgate_quota::new_batch_id(), &[local])
                        .await;
                }
                // Admitted without the shared store (`local` or `fail_open`): its quota is
                // charged and the usage totals written once it is back, so the outage's usage
                // is neither lost nor spent a second time.
                pending.push_back(Settlement {
                    consumer,
                    end: Default::default(),
                    reserved: 0,
                    actual,
                    window: tollgate_quota::ANY_WINDOW,
                    tpm: None,
                    usage: delta,
                });
            }
        }
        let over = pending.len().saturating_sub(MAX_PENDING);
        if over > 0 {
            let dropped = pending.drop_oldest(over);
            self.metrics.usage_dropped(dropped as u64);
            tracing::error!(dropped, "usage buffer full while the store is unreachable");
        }
    }

    async fn flush(&self, pending: &mut Pending) {
        // Reservations the store did not answer in time: refunded if they ever ran.
        for s in self.limits.take_abandoned() {
            pending.push_back(s);
        }
        pending.seal();
        while let Some((id, batch)) = pending.batches.front() {
            match self.limits.store.settle(*id, batch).await {
                Ok(()) => {
                    pending.batches.pop_front();
                }
                Err(e) => {
                    // Retried with the same id: the store applies a batch at most once.
                    tracing::debug!(error = %e, queued = pending.len(), "settle failed; will retry");
                    return;
                }
            }
        }
    }
}

/// Settlements waiting for the store: sealed batches (each keeps its id across retries) and
/// the open one still filling.
#[derive(Default)]
struct Pending {
    batches: VecDeque<(u64, Vec<Settlement>)>,
    open: Vec<Settlement>,
}

impl Pending {
    fn push_back(&mut self, s: Settlement) {
        self.open.push(s);
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.open.is_empty()
    }

    fn len(&self) -> usize {
        self.batches.iter().map(|(_, b)| b.len()).sum::<usize>() + self.open.len()
    }

    /// Closes the open batch into sealed ones of at most 512 settlements.
    fn seal(&mut self) {
        for chunk in std::mem::take(&mut self.open).chunks(512) {
            self.batches
                .push_back((tollgate_quota::new_batch_id(), chunk.to_vec()));
        }
    }

    /// Drops the oldest `n` settlements (whole batches first); returns how many went.
    fn drop_oldest(&mut self, n: usize) -> usize {
        let mut dropped = 0;
        while dropped < n {
            match self.batches.pop_front() {
                Some((_, b)) => dropped += b.len(),
                None => {
                    let k = (n - dropped).min(self.open.len());
                    self.open.drain(..k);
                    dropped += k;
                    break;
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cost is exact integer pico-units: uncached input, cached input (at its own price, or the
    /// input price when none is set) and output each at their price per 1M tokens.
    #[test]
    fn cost_uses_the_cached_price_for_cached_tokens() {
        let config = tollgate_common::Config::from_toml(
            r#"
[[backends]]
name = "payg"
url = "http://127.0.0.1:1"
models = ["gpt-4o"]
price = { input_per_1m = 2.5, output_per_1m = 10.0, cached_input_per_1m = 1.25 }
[[backends]]
name = "plain"
url = "http://127.0.0.1:2"
models = ["gpt-4o"]
price = { input_per_1m = 0.15, output_per_1m = 0.6 }
"#,
        )
        .unwrap();
        let routes = crate::routing::Routes::from_config(&config).unwrap();
        let (payg, plain) = (&routes.backends[0], &routes.backends[1]);
        let u = TokenUsage {
            input: 1000,
            output: 200,
            cached_input: 400,
        };
        assert_eq!(
            cost_pico(&u, payg),
            600 * 2_500_000 + 400 * 1_250_000 + 200 * 10_000_000
        );
        // No cached price: cached tokens cost the input price.
        assert_eq!(cost_pico(&u, plain), 1000 * 150_000 + 200 * 600_000);
        // Cached beyond input (a bad report) never underflows.
        let odd = TokenUsage {
            input: 10,
            output: 0,
            cached_input: 50,
        };
        assert_eq!(cost_pico(&odd, payg), 10 * 1_250_000);
    }
}

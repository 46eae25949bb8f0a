//! Settle and account: what each request really used, off the latency path.
//!
//! The pipeline hands a [`Meter`] along with the request; when the request is over, its drop
//! sends the [`RequestRecord`] here. The worker counts tokens the backend did not report
//! (tiktoken, off the runtime for long text), corrects the reservation by (actual − estimate),
//! prices the usage, folds it into the daily totals in the same store write, and reports it
//! ([`Telemetry::record`]: Prometheus, OTLP, one usage event). Store writes are batched: one
//! pipeline for whatever arrived in the last [`FLUSH_GAP`] (a quiet replica's request is
//! written at once). Writes that fail are kept ([`pending`], bounded) and retried with their
//! batch id; what overflows is counted and logged, never dropped silently.
//!
//! - [`meter`]: the meter that reports a request once.
//! - [`pending`]: the settlements waiting for the store.

mod meter;
mod pending;

pub use meter::{Finished, Meter};

use crate::clock::now_ms;
use crate::estimate::Tokenizer;
use crate::limits::{Limits, Placement};
use crate::record::RequestRecord;
use crate::routing::Backend;
use crate::telemetry::Telemetry;
use pending::{MAX_PENDING, Pending};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tollgate_common::TokenUsage;
use tollgate_quota::{
    ANY_WINDOW, Money, ReservationEnd, Settlement, Store, TeamCharge, UsageCounts, UsageDelta,
    day_of, nano_from_pico,
};

/// Tokens actually used: the backend's report, else our own count of what was served (the
/// prompt as estimated, the text streamed).
pub async fn resolve_usage(r: &mut RequestRecord, tokenizer: &Tokenizer) -> TokenUsage {
    let o = &mut r.observed;
    if let Some(u) = o.reported {
        return u;
    }
    if !o.served() && o.text.is_empty() {
        return TokenUsage::default();
    }
    let text = std::mem::take(&mut o.text);
    let output = if text.is_empty() {
        0
    } else {
        tokenizer.count_text(text).await
    };
    TokenUsage {
        input: r.admitted.prompt_tokens,
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

/// Shortest time between two settle writes while requests keep coming.
const FLUSH_GAP: Duration = Duration::from_millis(10);
/// Settlements that are written at once, whatever the gap.
const FLUSH_AT: usize = 512;

/// The worker's inputs and outputs.
pub struct UsageWorker {
    pub limits: Arc<Limits>,
    pub telemetry: Telemetry,
    pub tokenizer: Tokenizer,
}

impl UsageWorker {
    /// Runs until every sender is gone, then flushes what is pending (bounded by `flush_for`).
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Finished>, flush_for: Duration) {
        let mut pending = Pending::default();
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        // Flushes are at least FLUSH_GAP apart unless FLUSH_AT settlements wait: a busy
        // replica writes one batch (one settle marker per consumer) per gap, not one per few
        // requests; a quiet one writes each request's at once.
        let mut last_flush = tokio::time::Instant::now()
            .checked_sub(FLUSH_GAP)
            .unwrap_or_else(tokio::time::Instant::now);
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 1024) => {
                    if n == 0 {
                        break;
                    }
                    for f in batch.drain(..) {
                        self.account(f, &mut pending).await;
                    }
                    let now = tokio::time::Instant::now();
                    if pending.len() >= FLUSH_AT || now >= last_flush + FLUSH_GAP {
                        self.flush(&mut pending).await;
                        (last_flush, due) = (now, None);
                    } else {
                        due.get_or_insert(last_flush + FLUSH_GAP);
                    }
                }
                _ = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                    self.flush(&mut pending).await;
                    (last_flush, due) = (tokio::time::Instant::now(), None);
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

    async fn account(&self, f: Finished, pending: &mut Pending) {
        let Finished { mut record, span } = f;
        // A cache hit used nothing: its tokens are counted as saved, priced at the backend
        // that produced the stored answer.
        let saved = record.observed.saved;
        let usage = match saved {
            Some(_) => TokenUsage::default(),
            None => resolve_usage(&mut record, &self.tokenizer).await,
        };
        let cost = record
            .observed
            .backend
            .as_ref()
            .map(|b| cost_pico(&usage, b))
            .unwrap_or(0);
        let saved_cost = record.observed.saved_cost_pico;
        self.telemetry.record(&record, &usage, cost, span);
        let (a, o) = (&record.admitted, &record.observed);
        let actual = usage.total();
        let served = (o.backend.is_some() && actual > 0) || saved.is_some();
        let delta = served.then(|| UsageDelta {
            day: day_of(now_ms() / 1000),
            team: a.team.clone(),
            model: a.model.clone(),
            backend: record.backend_name().unwrap_or_default().to_string(),
            counts: UsageCounts {
                input: usage.input,
                output: usage.output,
                cached_input: usage.cached_input,
                requests: 1,
                cost_pico: cost,
                saved_tokens: saved.map(|u| u.total()).unwrap_or(0),
                saved_cost_pico: saved_cost,
            },
            dims: self.telemetry.dims.usage(&a.dims),
        });
        let reserved = &a.reserved;
        let consumer = a.consumer.to_string();
        // Money is charged only for what a backend served, like the usage totals.
        let cost_nano = if served { nano_from_pico(cost) } else { 0 };
        match reserved.place {
            Placement::Shared => pending.push_back(Settlement {
                consumer,
                end: reserved.end,
                reserved: reserved.tokens,
                actual,
                window: reserved.admission.window,
                tpm: reserved.admission.tpm,
                usage: delta,
                money: Money {
                    reserved: reserved.cost_nano,
                    actual: cost_nano,
                    window: reserved.admission.budget.map_or(0, |b| b.window),
                    team: match (&reserved.team, &reserved.charge_team) {
                        (Some(t), _) => Some(TeamCharge {
                            team: t.team.clone(),
                            // A slice's request has no record: its estimate was debited with
                            // the slice, and is corrected like this.
                            end: match t.id {
                                Some(id) => ReservationEnd::Settled { id, retried: false },
                                None => ReservationEnd::None,
                            },
                            window: t.budget.window,
                            reserved: t.cost_nano,
                        }),
                        // The team step was skipped: charge what was served, like an outage.
                        (None, Some(team)) => Some(TeamCharge {
                            team: team.clone(),
                            end: ReservationEnd::None,
                            window: ANY_WINDOW,
                            reserved: 0,
                        }),
                        (None, None) => None,
                    },
                },
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
                        money: Money {
                            reserved: reserved.cost_nano,
                            actual: cost_nano,
                            window: reserved.admission.budget.map_or(0, |b| b.window),
                            team: None,
                        },
                    };
                    let _ = self
                        .limits
                        .local
                        .settle(tollgate_quota::new_batch_id(), &[local])
                        .await;
                }
                // Admitted without the shared store (`local` or `fail_open`): its quota and
                // budgets are charged and the usage totals written once it is back, so the
                // outage's usage is neither lost nor spent a second time.
                let team =
                    (!a.team.is_empty() && self.limits.team_has_budget(&a.team)).then(|| {
                        TeamCharge {
                            team: a.team.clone(),
                            end: ReservationEnd::None,
                            window: ANY_WINDOW,
                            reserved: 0,
                        }
                    });
                pending.push_back(Settlement {
                    consumer,
                    end: Default::default(),
                    reserved: 0,
                    actual,
                    window: ANY_WINDOW,
                    tpm: None,
                    usage: delta,
                    money: Money {
                        reserved: 0,
                        actual: cost_nano,
                        window: ANY_WINDOW,
                        team,
                    },
                });
            }
        }
        let over = pending.len().saturating_sub(MAX_PENDING);
        if over > 0 {
            let dropped = pending.drop_oldest(over);
            self.telemetry.usage_dropped(dropped as u64);
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

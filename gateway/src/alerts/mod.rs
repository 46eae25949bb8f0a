//! Alerts: webhooks told when a budget or a token quota crosses a threshold, a backend's circuit
//! opens, or a replica loses the store (`[[alerts]]`). Off the request path: the pipeline only
//! compares a fraction with the thresholds and, for a threshold not yet seen on this replica in
//! this window, hands an [`Event`] to a bounded queue (never waiting; a full queue drops it with
//! a warning). The [`deliver`] worker claims each alert in the store (`tg:alert:...`, `SET NX`
//! until the window ends), so each threshold fires once per window across the cluster, and
//! posts it with a timeout and retries; a dead or hanging webhook never slows a request.
//!
//! Circuit openings come from the store's circuit events (every replica sees them; the claim
//! per trip picks one), store degradation from this replica's own health (it cannot reach the
//! store to deduplicate, so each degraded replica says so once per degradation).
//!
//! - [`deliver`]: the worker, the claim, the webhook call.

pub mod deliver;

use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tollgate_common::Secret;
use tollgate_common::config::{AlertEvent, Config};
use tollgate_quota::{BudgetScope, BudgetUse, Period, units_from_nano, window_bounds};

/// Events waiting for the worker; beyond this they are dropped (with a warning).
const QUEUE: usize = 1024;
/// Memo entries before ended windows are forgotten.
const MAX_MEMO: usize = 10_000;

/// One `[[alerts]]` entry, ready to use.
pub struct Rule {
    url: Secret,
    /// Short hash of the URL: names the rule's claims (two rules to one URL share them).
    tag: String,
    teams: Vec<String>,
    consumers: Vec<String>,
    /// Ascending.
    thresholds: Vec<f64>,
    events: Vec<AlertEvent>,
    timeout_ms: u64,
    retries: u32,
}

impl Rule {
    fn in_scope(&self, team: &str, consumer: &str) -> bool {
        (self.teams.is_empty() && self.consumers.is_empty())
            || self.teams.iter().any(|t| t == team)
            || self.consumers.iter().any(|c| c == consumer)
    }

    /// Platform events (circuits, the store) go to rules without a team or consumer scope.
    fn platform(&self, event: AlertEvent) -> bool {
        self.teams.is_empty() && self.consumers.is_empty() && self.events.contains(&event)
    }
}

/// What the worker delivers.
#[derive(Debug)]
pub struct Event {
    /// Index of the rule in [`Alerts::rules`].
    rule: usize,
    /// The claim's name (`None`: no cluster-wide claim, e.g. the store is unreachable).
    claim: Option<String>,
    /// How long the claim lives (until the window ends, + a day).
    claim_ms: u64,
    body: serde_json::Value,
}

/// A budget or quota as seen by one admission (or refusal).
pub struct Use<'a> {
    pub event: AlertEvent,
    pub scope: &'a str,
    pub id: &'a str,
    pub team: &'a str,
    pub consumer: &'a str,
    pub used: f64,
    pub limit: f64,
    /// "EUR", or "tokens".
    pub unit: &'a str,
    /// `None` when a refusal did not say (a spent token quota).
    pub period: Option<Period>,
    /// End of the window (unix seconds): part of every claim's name.
    pub window_end: u64,
}

/// The alerting rules and the queue to the worker.
pub struct Alerts {
    rules: Vec<Rule>,
    tx: Option<mpsc::Sender<Event>>,
    currency: Arc<str>,
    /// (rule, event, id, window end) → thresholds already queued on this replica.
    memo: Mutex<HashMap<(usize, AlertEvent, String, u64), usize>>,
}

impl Alerts {
    /// The rules of `[[alerts]]` (URLs from `url` or `url_env`); errors name the key.
    pub fn from_config(config: &Config) -> anyhow::Result<(Alerts, Option<mpsc::Receiver<Event>>)> {
        let mut rules = Vec::new();
        for (i, a) in config.alerts.iter().enumerate() {
            let url = match (&a.url, &a.url_env) {
                (Some(u), _) => u.clone(),
                (None, Some(var)) => tollgate_common::config::secret_from_env(var)
                    .map_err(|e| anyhow::anyhow!("alerts[{i}].url_env: {e}"))?,
                (None, None) => anyhow::bail!("alerts[{i}].url: set url or url_env"),
            };
            if reqwest::Url::parse(url.expose()).is_err() {
                anyhow::bail!("alerts[{i}].url: not a valid URL");
            }
            use sha2::Digest;
            let tag = hex::encode(&sha2::Sha256::digest(url.expose().as_bytes())[..6]);
            let mut thresholds = a.thresholds.clone();
            thresholds.sort_by(f64::total_cmp);
            thresholds.dedup();
            rules.push(Rule {
                url,
                tag,
                teams: a.teams.clone(),
                consumers: a.consumers.clone(),
                thresholds,
                events: a.events.clone(),
                timeout_ms: a.timeout_ms,
                retries: a.retries,
            });
        }
        let (tx, rx) = if rules.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel(QUEUE);
            (Some(tx), Some(rx))
        };
        let alerts = Alerts {
            rules,
            tx,
            currency: config.pricing.currency.as_str().into(),
            memo: Mutex::default(),
        };
        Ok((alerts, rx))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// A budget after an admission.
    pub fn budget(&self, scope: BudgetScope, id: &str, team: &str, consumer: &str, b: &BudgetUse) {
        if self.is_empty() {
            return;
        }
        self.observe(&Use {
            event: AlertEvent::Budget,
            scope: scope.as_str(),
            id,
            team,
            consumer,
            used: units_from_nano(b.spent_nano),
            limit: units_from_nano(b.limit_nano as i64),
            unit: &self.currency,
            period: Some(b.period),
            window_end: b.window_end,
        });
    }

    /// A limit that refused a request: every threshold up to 100 % is crossed (`used` is
    /// taken as `limit`), in the window that ends when the refusal says to retry.
    pub fn refused(&self, u: Use<'_>, retry_after_ms: u64, now_ms: u64) {
        if self.is_empty() {
            return;
        }
        self.observe(&Use {
            used: u.limit,
            window_end: window_end_after(now_ms, retry_after_ms),
            ..u
        });
    }

    /// A consumer's token quota after an admission.
    pub fn quota(
        &self,
        consumer: &str,
        team: &str,
        quota: u64,
        remaining: i64,
        period: Period,
        window: u64,
    ) {
        if self.is_empty() {
            return;
        }
        self.observe(&Use {
            event: AlertEvent::Quota,
            scope: "consumer",
            id: consumer,
            team,
            consumer,
            used: (quota as i64 - remaining).max(0) as f64,
            limit: quota as f64,
            unit: "tokens",
            period: Some(period),
            window_end: window_bounds(period, window).1,
        });
    }

    /// Compares a use with every rule's thresholds and queues what this replica has not
    /// queued yet in this window.
    pub fn observe(&self, u: &Use<'_>) {
        let fraction = if u.limit > 0.0 { u.used / u.limit } else { 1.0 };
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.events.contains(&u.event) || !rule.in_scope(u.team, u.consumer) {
                continue;
            }
            let crossed = rule
                .thresholds
                .iter()
                .take_while(|t| **t <= fraction)
                .count();
            if crossed == 0 {
                continue;
            }
            let key = (i, u.event, format!("{}:{}", u.scope, u.id), u.window_end);
            let done = {
                let mut memo = self.memo.lock();
                if memo.len() >= MAX_MEMO {
                    let now_s = crate::clock::now_ms() / 1000;
                    memo.retain(|k, _| k.3 > now_s);
                    if memo.len() >= MAX_MEMO {
                        memo.clear();
                    }
                }
                let seen = memo.entry(key).or_insert(0);
                let done = *seen;
                *seen = done.max(crossed);
                done
            };
            for t in &rule.thresholds[done.min(crossed)..crossed] {
                let claim = format!(
                    "{}:{}:{}:{}:{}:{}",
                    rule.tag,
                    u.event.as_str(),
                    u.scope,
                    u.id,
                    t,
                    u.window_end
                );
                let now_s = crate::clock::now_ms() / 1000;
                let claim_ms = u.window_end.saturating_sub(now_s).saturating_add(86_400) * 1000;
                self.send(Event {
                    rule: i,
                    claim: Some(claim),
                    claim_ms,
                    body: threshold_body(u, *t),
                });
            }
        }
    }

    /// A backend's circuit opened (one alert per trip, cluster-wide).
    pub fn circuit_opened(&self, backend: &str, trip: u64, open_for_ms: u64) {
        let text = format!(
            "tollgate: the circuit of backend {backend} opened for {} s (trip {trip}): its \
             traffic fails over to the next priority group",
            open_for_ms.div_ceil(1000)
        );
        let body = json!({"text": text, "event": "circuit", "backend": backend, "trip": trip,
            "open_for_ms": open_for_ms});
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.platform(AlertEvent::Circuit) {
                self.send(Event {
                    rule: i,
                    claim: Some(format!("{}:circuit:{backend}:{trip}", rule.tag)),
                    claim_ms: 86_400_000,
                    body: body.clone(),
                });
            }
        }
    }

    /// This replica lost the store and runs under `store.on_error`.
    pub fn store_degraded(&self, replica: &str, policy: &str) {
        let text = format!(
            "tollgate: replica {replica} cannot reach the store; store.on_error = {policy} is in \
             force"
        );
        let body = json!({"text": text, "event": "store", "replica": replica, "policy": policy});
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.platform(AlertEvent::Store) {
                self.send(Event {
                    rule: i,
                    claim: None,
                    claim_ms: 0,
                    body: body.clone(),
                });
            }
        }
    }

    fn send(&self, e: Event) {
        if let Some(tx) = &self.tx
            && tx.try_send(e).is_err()
        {
            tracing::warn!("alert queue full; an alert was dropped");
        }
    }
}

/// The end (unix seconds) of a window that a refusal says ends in `retry_after_ms`: windows
/// end on whole hours, so rounding to the nearest 10 minutes gives every replica the same end
/// despite clock skew and the time the answer took.
fn window_end_after(now_ms: u64, retry_after_ms: u64) -> u64 {
    let end = now_ms.saturating_add(retry_after_ms) / 1000;
    (end + 300) / 600 * 600
}

fn threshold_body(u: &Use<'_>, t: f64) -> serde_json::Value {
    let pct = (t * 100.0).round();
    let (used, limit) = if u.unit == "tokens" {
        (format!("{:.0}", u.used), format!("{:.0}", u.limit))
    } else {
        (format!("{:.2}", u.used), format!("{:.2}", u.limit))
    };
    let what = match u.event {
        AlertEvent::Quota => "token quota",
        _ => "budget",
    };
    let per = u
        .period
        .map(|p| format!(" per {}", p.as_str()))
        .unwrap_or_default();
    let text = if u.limit <= 0.0 {
        format!("tollgate: {} {} has spent its {what}", u.scope, u.id)
    } else if u.used >= u.limit {
        format!(
            "tollgate: {} {} has spent its {what} ({limit} {}{per})",
            u.scope, u.id, u.unit
        )
    } else {
        format!(
            "tollgate: {} {} has used {pct}% of its {what} ({used} of {limit} {}{per})",
            u.scope, u.id, u.unit
        )
    };
    json!({
        "text": text,
        "event": u.event.as_str(),
        "scope": u.scope,
        "id": u.id,
        "team": u.team,
        "consumer": if u.scope == "consumer" { Some(u.consumer) } else { None },
        "threshold": t,
        "used": u.used,
        "limit": u.limit,
        "unit": u.unit,
        "period": u.period.map(|p| p.as_str()),
        "window_end": chrono::DateTime::from_timestamp(u.window_end as i64, 0)
            .map(|d| d.to_rfc3339())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests;

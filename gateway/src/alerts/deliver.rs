//! The alert worker: claims each event in the store (once per threshold and window, or per
//! circuit trip, cluster-wide) and posts it to its webhook, each delivery in a task of its own
//! (at most [`MAX_IN_FLIGHT`] at once) with a per-attempt timeout and retries. An alert that
//! could not be delivered releases its claim, so a later crossing (on any replica) tries again.
//! Also watches circuit openings (the store's circuit events) and this replica's store health.

use super::{Alerts, Event};
use crate::limits::Limits;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tollgate_common::config::OnError;
use tollgate_quota::Store;

/// Deliveries in flight at once; beyond, events wait in the queue (never a request).
pub const MAX_IN_FLIGHT: usize = 32;

/// Runs the worker until the queue closes.
pub async fn run(
    alerts: Arc<Alerts>,
    limits: Arc<Limits>,
    mut rx: mpsc::Receiver<Event>,
    client: reqwest::Client,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(e) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (alerts, limits, client) = (alerts.clone(), limits.clone(), client.clone());
        tokio::spawn(async move {
            deliver_one(&alerts, &limits, &client, e).await;
            drop(permit);
        });
    }
}

async fn deliver_one(alerts: &Alerts, limits: &Limits, client: &reqwest::Client, e: Event) {
    let Some(rule) = alerts.rules.get(e.rule) else {
        return;
    };
    if let Some(name) = &e.claim {
        match limits.store.claim_alert(name, e.claim_ms).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                // Without the store there is no deduplication: better twice than never.
                tracing::warn!(error = %err, "could not claim an alert; sending it anyway");
            }
        }
    }
    let timeout = Duration::from_millis(rule.timeout_ms);
    let mut wait = Duration::from_secs(1);
    for attempt in 0..=rule.retries {
        let sent = client
            .post(rule.url.expose())
            .timeout(timeout)
            .json(&e.body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(
                status = r.status().as_u16(),
                attempt,
                "alert webhook refused"
            ),
            // Never the URL: it is a secret.
            Err(err) => tracing::warn!(error = %err.without_url(), attempt, "alert webhook failed"),
        }
        if attempt < rule.retries {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    tracing::error!(
        event = %e.body["event"],
        "alert not delivered after {} attempts",
        rule.retries + 1
    );
    if let Some(name) = &e.claim {
        let _ = limits.store.release_alert(name).await;
    }
}

/// Circuit openings, from the store's circuit events: every replica sees them, the claim per
/// trip makes one of them send it.
pub async fn watch_circuits(alerts: Arc<Alerts>, limits: Arc<Limits>) {
    let mut events = limits.store.breaker_events();
    loop {
        match events.recv().await {
            Ok(st) if st.open_until_ms > st.now_ms => {
                alerts.circuit_opened(&st.backend, st.trip, st.open_for_ms());
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// This replica's store health, once a second: one alert per degradation.
pub async fn watch_store(alerts: Arc<Alerts>, limits: Arc<Limits>, replica: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut was = false;
    loop {
        tick.tick().await;
        let now = limits.degraded();
        if now && !was {
            let policy = match limits.policy.on_error {
                OnError::Escrow => "escrow",
                OnError::Local => "local",
                OnError::FailOpen => "fail_open",
                OnError::FailClosed => "fail_closed",
            };
            alerts.store_degraded(&replica, policy);
        }
        was = now;
    }
}

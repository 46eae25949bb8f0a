//! Circuit changes over pub/sub: one listener per process subscribes to
//! [`BREAKER_CHANNEL`] (reconnecting with backoff) and forwards each change to the replica's
//! routing. Lost messages are healed by the periodic full read of the circuits.
//!
//! On a Redis Cluster the channel is an ordinary (not sharded) one: the breaker scripts
//! `PUBLISH` on the master of the backend's slot, and Redis broadcasts it over the cluster bus
//! to every node, so the listener subscribes on any one node and moves to the next seed node
//! when that one fails. Under Sentinel it subscribes on the current master.

use super::codec::parse_breaker_message;
use super::keys::BREAKER_CHANNEL;
use super::target::Listen;
use crate::model::BreakerState;
use std::time::Duration;

/// Listens on the breaker channel, reconnecting with backoff, forwarding to `tx`.
pub(super) async fn breaker_listener(
    listen: Listen,
    tx: tokio::sync::broadcast::Sender<BreakerState>,
) {
    use futures::StreamExt as _;
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        if tx.receiver_count() == 0 {
            return;
        }
        let pubsub = match listen.client(attempt).await {
            Ok(c) => c.get_async_pubsub().await,
            Err(e) => Err(e),
        };
        attempt += 1;
        match pubsub {
            Ok(mut ps) => {
                if ps.subscribe(BREAKER_CHANNEL).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    let mut stream = ps.on_message();
                    while let Some(msg) = stream.next().await {
                        if let Ok(text) = msg.get_payload::<String>()
                            && let Some(state) = parse_breaker_message(&text)
                        {
                            let _ = tx.send(state);
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "breaker channel: cannot connect"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

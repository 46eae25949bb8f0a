//! Circuit changes over pub/sub: one listener per process subscribes to
//! [`BREAKER_CHANNEL`] (reconnecting with backoff) and forwards each change to the replica's
//! routing. Lost messages are healed by the periodic full read of the circuits.

use super::codec::parse_breaker_message;
use super::keys::BREAKER_CHANNEL;
use crate::model::BreakerState;
use redis::Client;
use std::time::Duration;

/// Listens on the breaker channel, reconnecting with backoff, forwarding to `tx`.
pub(super) async fn breaker_listener(
    client: Client,
    tx: tokio::sync::broadcast::Sender<BreakerState>,
) {
    use futures::StreamExt as _;
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.receiver_count() == 0 {
            return;
        }
        match client.get_async_pubsub().await {
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

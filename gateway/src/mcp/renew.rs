//! Upstream sessions that ended under a live client session (the upstream restarted, or
//! expired its session): the next request that gets the upstream's 404 initializes a new
//! upstream session (with the client's capabilities, kept in the sealed session) and is sent
//! again, so the client never notices. The client keeps its session id (clients take a new one
//! only from `initialize`), so each replica remembers old → new upstream ids (bounded); another
//! replica that meets the old id renews it the same way.

use super::Mcp;
use super::upstream::{Carry, Fault, Reply, Upstream};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use sha2::Digest as _;
use std::collections::HashMap;

/// Renewals remembered per replica before the map starts over.
const MAX_RENEWED: usize = 10_000;

/// Old upstream session id → the one that replaced it, per server; and the client sessions
/// ended (DELETE) through this replica.
#[derive(Default)]
pub struct Renewed {
    map: Mutex<HashMap<(String, String), String>>,
    ended: Mutex<std::collections::HashSet<[u8; 32]>>,
}

impl Renewed {
    /// Marks a client session id as ended on this replica (its later requests get 404 here).
    pub fn end(&self, session_id: &str) {
        let mut g = self.ended.lock();
        if g.len() >= MAX_RENEWED {
            g.clear();
        }
        g.insert(sha2::Sha256::digest(session_id.as_bytes()).into());
    }

    /// Whether the client session id was ended through this replica.
    pub fn ended(&self, session_id: &str) -> bool {
        let digest: [u8; 32] = sha2::Sha256::digest(session_id.as_bytes()).into();
        self.ended.lock().contains(&digest)
    }

    /// The upstream session id to use for `id` on `server`.
    pub fn current(&self, server: &str, id: &str) -> Option<String> {
        self.map
            .lock()
            .get(&(server.to_string(), id.to_string()))
            .cloned()
    }

    fn set(&self, server: &str, old: &str, new: String) {
        let mut g = self.map.lock();
        if g.len() >= MAX_RENEWED {
            g.clear();
        }
        g.insert((server.to_string(), old.to_string()), new);
    }
}

impl Mcp {
    /// POSTs one message to `u` within the client's session: with the renewed upstream
    /// session when there is one, and renewing it once when the upstream lost it.
    pub async fn send(
        &self,
        u: &Upstream,
        carry: &Carry<'_>,
        body: Bytes,
    ) -> Result<Option<Reply>, Fault> {
        let Some(original) = carry.session else {
            return u.post(&self.client, carry, body).await;
        };
        let current = self.renewed.current(&u.name, original);
        let mut c = carry.clone();
        c.session = Some(current.as_deref().unwrap_or(original));
        match u.post(&self.client, &c, body.clone()).await {
            Err(Fault::SessionGone) => {
                let fresh = self.reinitialize(u, &c).await?;
                self.renewed.set(&u.name, original, fresh.clone());
                tracing::info!(server = %u.name, "MCP upstream session renewed");
                c.session = Some(&fresh);
                u.post(&self.client, &c, body).await
            }
            r => r,
        }
    }

    /// A new upstream session for the client's (its version and capabilities); the fault of
    /// the original request when the upstream refuses.
    async fn reinitialize(&self, u: &Upstream, carry: &Carry<'_>) -> Result<String, Fault> {
        let id = json!("tollgate-renew");
        let init = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
            "protocolVersion": carry.version.unwrap_or(super::VERSIONS[super::VERSIONS.len() - 1]),
            "capabilities": carry.capabilities.cloned().unwrap_or_else(|| json!({})),
            "clientInfo": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")}}});
        let fresh = Carry {
            session: None,
            ..carry.clone()
        };
        let run = async {
            let reply = u
                .post(&self.client, &fresh, Bytes::from(init.to_string()))
                .await?;
            let mut reply = reply.ok_or(Fault::SessionGone)?;
            let session = reply.session.take().ok_or(Fault::SessionGone)?;
            while let Some(m) = reply.messages.next().await {
                let m: Value = m?;
                if super::jsonrpc::answers(&m, &id) {
                    if m.get("error").is_some() {
                        return Err(Fault::SessionGone);
                    }
                    break;
                }
            }
            let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
            let with = Carry {
                session: Some(&session),
                ..carry.clone()
            };
            u.post(&self.client, &with, Bytes::from(done.to_string()))
                .await?;
            Ok(session)
        };
        tokio::time::timeout(u.timeout, run)
            .await
            .unwrap_or(Err(Fault::Timeout(u.timeout.as_millis() as u64)))
    }
}

//! Stateless sessions: the `Mcp-Session-Id` the client holds is the session itself, sealed
//! with ChaCha20-Poly1305 under a key every replica shares (`mcp.session_key_env`). It carries
//! the consumer, the route, the protocol version, each upstream's own session id and the
//! expiry, so any replica can continue a session without a store round trip, and a made-up or
//! altered id fails to open (the client gets 404 and initializes again, as the spec says).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bound to every sealed id: an id from another use of the same key never opens.
const AAD: &[u8] = b"tollgate-mcp-session-v1";
/// Longest session id looked at.
const MAX_ID_LEN: usize = 8 * 1024;

/// One upstream's part of a session.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpstreamSession {
    /// The `[[mcp_servers]]` name.
    #[serde(rename = "s")]
    pub server: String,
    /// Its `Mcp-Session-Id`; none for a server that keeps no sessions.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The protocol version it negotiated.
    #[serde(rename = "v")]
    pub version: String,
}

/// What a session id carries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// The consumer that initialized it: another caller cannot use it.
    #[serde(rename = "c")]
    pub consumer: String,
    /// The server of `/mcp/{server}`, or none for the federated `/mcp`.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The version negotiated with the client.
    #[serde(rename = "v")]
    pub version: String,
    #[serde(rename = "u")]
    pub upstreams: Vec<UpstreamSession>,
    /// Unix seconds after which the id is refused.
    #[serde(rename = "e")]
    pub expires: u64,
    /// The client's `initialize` capabilities, to renew an upstream session with.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<serde_json::Value>,
}

impl Session {
    /// A session of `/mcp/{server}` with its one upstream (`upstream_id`: the upstream's own
    /// session id, none for a server without sessions), refused after `expires` (unix s).
    pub fn one_server(
        consumer: &str,
        server: &str,
        upstream_id: Option<String>,
        version: String,
        expires: u64,
    ) -> Session {
        Session {
            consumer: consumer.to_string(),
            route: Some(server.to_string()),
            version: version.clone(),
            upstreams: vec![UpstreamSession {
                server: server.to_string(),
                id: upstream_id,
                version,
            }],
            expires,
            capabilities: None,
        }
    }

    pub fn upstream(&self, server: &str) -> Option<&UpstreamSession> {
        self.upstreams.iter().find(|u| u.server == server)
    }
}

/// Seals and opens session ids.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl Sealer {
    /// A sealer keyed by `secret` (any string: its SHA-256 is the key).
    pub fn new(secret: &[u8]) -> Sealer {
        let key: [u8; 32] = Sha256::digest(secret).into();
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        }
    }

    /// A sealer with a random key: sessions live only as long as this process.
    pub fn random() -> Sealer {
        let secret: [u8; 32] = rand::random();
        Sealer::new(&secret)
    }

    pub fn seal(&self, s: &Session) -> String {
        let plain = serde_json::to_vec(s).unwrap_or_default();
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The session an id carries, if it was sealed with this key and has not expired at
    /// `now_s` (unix seconds).
    pub fn open(&self, id: &str, now_s: u64) -> Option<Session> {
        if id.len() > MAX_ID_LEN {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(id.as_bytes()).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, sealed) = raw.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: AAD,
                },
            )
            .ok()?;
        let s: Session = serde_json::from_slice(&plain).ok()?;
        (now_s < s.expires).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            consumer: "agent-1".into(),
            route: None,
            version: "2025-06-18".into(),
            upstreams: vec![UpstreamSession {
                server: "tickets".into(),
                id: Some("abc".into()),
                version: "2025-06-18".into(),
            }],
            expires: 1_000,
            capabilities: Some(serde_json::json!({"sampling": {}})),
        }
    }

    /// A sealed id opens to the same session with the same key, on any replica.
    #[test]
    fn seal_and_open() {
        let a = Sealer::new(b"k");
        let b = Sealer::new(b"k");
        let id = a.seal(&session());
        assert_eq!(b.open(&id, 999), Some(session()));
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(a.seal(&session()), id, "a fresh nonce every time");
    }

    /// Tampered, made-up, foreign-key and expired ids do not open.
    #[test]
    fn refuses_bad_ids() {
        let a = Sealer::new(b"k");
        let id = a.seal(&session());
        let mut bytes = URL_SAFE_NO_PAD.decode(&id).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(a.open(&URL_SAFE_NO_PAD.encode(&bytes), 999), None);
        bytes[last] ^= 1;
        bytes[20] ^= 0x80;
        assert_eq!(a.open(&URL_SAFE_NO_PAD.encode(&bytes), 999), None);
        assert_eq!(Sealer::new(b"other").open(&id, 999), None);
        assert_eq!(a.open(&id, 1_000), None, "expired");
        assert_eq!(a.open("made-up", 0), None);
        assert_eq!(a.open("", 0), None);
        assert_eq!(a.open("!!!", 0), None);
        assert_eq!(a.open(&"A".repeat(20_000), 0), None);
    }
}

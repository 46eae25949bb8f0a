//! `[server]`: listening, request and response bounds, connection limits.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    /// Adds `x-tollgate-backend` and `x-tollgate-consumer` to responses.
    pub debug_headers: bool,
    /// How long SIGTERM waits for in-flight requests (streams included) before exiting.
    pub shutdown_grace_ms: u64,
    /// A request's head must arrive within this long of the connection opening or of its
    /// first byte (a client trickling headers is cut off).
    pub header_timeout_ms: u64,
    /// A request's body must arrive within this long of its head (else 408).
    pub body_timeout_ms: u64,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout_ms: u64,
    /// Most client connections open at once; lowered at start-up when the process's
    /// file-descriptor limit could not hold them and their backend connections.
    pub max_connections: usize,
    /// Longest server-sent event accepted from a backend; a longer one ends the stream with an
    /// error event.
    pub max_sse_event_bytes: usize,
    /// Most bytes of one backend response passed to a client.
    pub max_response_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            debug_headers: false,
            shutdown_grace_ms: 30_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            max_sse_event_bytes: 1024 * 1024,
            max_response_bytes: 256 * 1024 * 1024,
        }
    }
}

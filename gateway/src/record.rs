//! The record of one request, handed from stage to stage: what admission decided
//! ([`Admitted`], fixed once the tokens are reserved) and what was observed while proxying
//! ([`Observed`], filled by forwarding and by the response tap). The usage worker settles,
//! prices and reports it once the request is over ([`RequestRecord`]).

use crate::dimensions::DimValues;
use crate::limits::Reserved;
use crate::request::Operation;
use crate::routing::Backend;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_common::TokenUsage;

/// Most completion text kept for counting when the backend reports no usage.
pub const MAX_TEXT: usize = 4 * 1024 * 1024;

/// What admission decided. Later stages read it and never change it.
#[derive(Debug)]
pub struct Admitted {
    pub request_id: String,
    pub consumer: Arc<str>,
    pub team: String,
    pub model: String,
    pub op: Operation,
    pub stream: bool,
    pub reserved: Reserved,
    /// Prompt tokens as the gateway estimated them (settled from when the backend reports none).
    pub prompt_tokens: u64,
    pub started: Instant,
    /// W3C trace id (hex) of the request: the gateway span's, else the client's; empty if none.
    pub trace_id: String,
    /// `[telemetry] dimensions` values, read once at admission.
    pub dims: DimValues,
}

/// What was observed while the request was proxied.
#[derive(Debug, Default)]
pub struct Observed {
    /// The backend whose answer reached the client.
    pub backend: Option<Arc<Backend>>,
    /// Usage as the backend reported it.
    pub reported: Option<TokenUsage>,
    /// Completion text seen, for counting when the backend reports no usage.
    pub text: String,
    /// HTTP status the client got (0 = the client went away first).
    pub status: u16,
    /// The response body ended as the backend ended it.
    pub complete: bool,
    pub first_byte: Option<Duration>,
    /// Attempts moved to another backend.
    pub failovers: u32,
    /// A cache hit's tokens: replayed from a stored answer, not generated (nothing used).
    pub saved: Option<TokenUsage>,
    /// The backend that produced the replayed answer (named even if no longer configured).
    pub saved_backend: Option<String>,
    /// What the saved tokens cost at that backend, in pico-units.
    pub saved_cost_pico: u64,
    /// What a `[[cache]]` did for the request.
    pub cache: Option<CacheNote>,
}

/// What a `[[cache]]` did for a request, for its span.
#[derive(Clone, Debug)]
pub struct CacheNote {
    pub cache: Arc<str>,
    /// `hit`, `miss` or `bypass`.
    pub result: &'static str,
    /// Cosine distance of a semantic hit.
    pub distance: Option<f64>,
}

impl Observed {
    /// Keeps completion text for counting, up to [`MAX_TEXT`].
    pub fn push_text(&mut self, s: &str) {
        if self.text.len() + s.len() <= MAX_TEXT {
            self.text.push_str(s);
        }
    }

    /// Whether the backend's answer reached the client as a success.
    pub fn served(&self) -> bool {
        self.backend.is_some() && (200..300).contains(&self.status)
    }
}

/// A request once it is over.
#[derive(Debug)]
pub struct RequestRecord {
    pub admitted: Admitted,
    pub observed: Observed,
    pub duration: Duration,
}

impl RequestRecord {
    pub fn backend_name(&self) -> Option<&str> {
        self.observed
            .backend
            .as_ref()
            .map(|b| &*b.name)
            .or(self.observed.saved_backend.as_deref())
    }
}

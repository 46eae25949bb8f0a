//! Reading usage from a response body on its way through: a JSON body is kept (whole up to
//! 1 MiB, else its tail) and read at its end; a stream of server-sent events is split into
//! events as they complete, each read for usage and text, the usage-only chunk the client did
//! not ask for dropped, everything else passed on byte for byte.

use crate::record::Observed;
use crate::request::Operation;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use std::borrow::Cow;
use tollgate_common::TokenUsage;

/// More tokens than any model's context holds by a wide margin: a report beyond it is a
/// backend fault, never usage to charge.
pub const MAX_REPORTED_TOKENS: u64 = 100_000_000;

/// The usage object in every shape the APIs use.
#[derive(Debug, Default, Deserialize)]
pub struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
}

#[derive(Debug, Default, Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl UsageFields {
    /// The usage, unless a number in it is beyond [`MAX_REPORTED_TOKENS`] (logged; the caller
    /// then counts the request itself).
    pub fn to_usage(&self) -> Option<TokenUsage> {
        let input = self.prompt_tokens.or(self.input_tokens).unwrap_or(0);
        let output = self
            .completion_tokens
            .or(self.output_tokens)
            .or_else(|| self.total_tokens.map(|t| t.saturating_sub(input)))
            .unwrap_or(0);
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        if [input, output, cached, self.total_tokens.unwrap_or(0)]
            .iter()
            .any(|n| *n > MAX_REPORTED_TOKENS)
        {
            tracing::warn!(
                input,
                output,
                cached,
                "backend reported impossible usage; counting the request instead"
            );
            return None;
        }
        Some(TokenUsage {
            input,
            output,
            cached_input: cached,
        })
    }
}

/// How a response body is read.
pub enum Mode {
    /// A JSON body: usage read at the end.
    Json(JsonScan),
    /// Server-sent events: usage and text read per event.
    Sse(SseScan),
}

impl Mode {
    pub fn sse(hide_usage_chunk: bool, op: Operation, max_event: usize) -> Mode {
        Mode::Sse(SseScan {
            pending: BytesMut::new(),
            scanned: 0,
            max_event,
            hide_usage_chunk,
            op,
        })
    }

    pub fn json() -> Mode {
        Mode::Json(JsonScan::default())
    }
}

/// Keeps a non-streamed body (whole up to [`FULL_LIMIT`], else its tail) to read usage at the end.
#[derive(Default)]
pub struct JsonScan {
    buf: Vec<u8>,
    truncated: bool,
}

const FULL_LIMIT: usize = 1024 * 1024;
const TAIL: usize = 64 * 1024;

impl JsonScan {
    pub(super) fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > FULL_LIMIT {
            let cut = self.buf.len() - TAIL;
            self.buf.drain(..cut);
            self.truncated = true;
        }
    }

    pub(super) fn finish(&mut self, obs: &mut Observed) {
        #[derive(Deserialize)]
        struct Whole<'a> {
            #[serde(default)]
            usage: Option<UsageFields>,
            #[serde(borrow, default)]
            choices: Option<Vec<Choice<'a>>>,
            #[serde(default)]
            output: Option<Vec<OutputItem>>,
        }
        #[derive(Deserialize)]
        struct OutputItem {
            #[serde(default)]
            content: Option<Vec<OutputText>>,
        }
        #[derive(Deserialize)]
        struct OutputText {
            #[serde(default)]
            text: Option<String>,
        }
        if !self.truncated {
            if let Ok(w) = serde_json::from_slice::<Whole<'_>>(&self.buf) {
                if let Some(u) = w.usage.and_then(|u| u.to_usage()) {
                    obs.reported = Some(u);
                    return;
                }
                for c in w.choices.unwrap_or_default() {
                    if let Some(t) = c.message.and_then(|m| m.content).or(c.text) {
                        obs.push_text(&t);
                    }
                }
                for item in w.output.unwrap_or_default() {
                    for t in item.content.unwrap_or_default() {
                        if let Some(t) = t.text {
                            obs.push_text(&t);
                        }
                    }
                }
            }
            return;
        }
        // A large body (embeddings): `usage` is near the end; read the object after the key.
        if let Some(pos) = memchr::memmem::rfind(&self.buf, b"\"usage\"") {
            let rest = &self.buf[pos + 7..];
            let start = rest.iter().position(|c| *c == b'{');
            if let Some(s) = start {
                let mut de = serde_json::Deserializer::from_slice(&rest[s..]);
                if let Ok(u) = UsageFields::deserialize(&mut de) {
                    obs.reported = u.to_usage();
                }
            }
        }
    }
}

/// A choice of a whole answer (`message`, or `text` for completions) or of a stream chunk
/// (`delta`, or `text`).
#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    message: Option<Delta<'a>>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// Splits an SSE stream into events, reads usage and text from them, and drops the usage-only
/// chunk the client did not ask for. Everything else passes byte for byte.
pub struct SseScan {
    pending: BytesMut,
    /// How far `pending` has been searched for an event's end (an event that arrives in many
    /// chunks is not searched from its start each time).
    scanned: usize,
    /// Longest event held while waiting for its end.
    max_event: usize,
    hide_usage_chunk: bool,
    op: Operation,
}

/// An event grew past `server.max_sse_event_bytes` without ending.
#[derive(Debug)]
pub(super) struct EventTooLong;

/// End of the first event in `buf` (after its blank line), if complete.
fn event_end(buf: &[u8]) -> Option<usize> {
    let a = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    let b = memchr::memmem::find(buf, b"\n\r\n").map(|i| i + 3);
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

impl SseScan {
    pub(super) fn feed(
        &mut self,
        chunk: &[u8],
        obs: &mut Observed,
    ) -> Result<Option<Bytes>, EventTooLong> {
        self.pending.extend_from_slice(chunk);
        let mut out: Option<BytesMut> = None;
        let mut kept_first: Option<Bytes> = None;
        loop {
            // An end marker may straddle the previous chunk: look back two bytes.
            let from = self.scanned.saturating_sub(2);
            let Some(end) = event_end(&self.pending[from..]).map(|e| e + from) else {
                self.scanned = self.pending.len();
                break;
            };
            self.scanned = 0;
            let ev = self.pending.split_to(end).freeze();
            if self.inspect(&ev, obs) {
                match (&mut out, &kept_first) {
                    (None, None) => kept_first = Some(ev),
                    (None, Some(first)) => {
                        let mut b = BytesMut::with_capacity(first.len() + ev.len());
                        b.extend_from_slice(first);
                        b.extend_from_slice(&ev);
                        out = Some(b);
                    }
                    (Some(b), _) => b.extend_from_slice(&ev),
                }
            }
        }
        if self.pending.len() > self.max_event {
            self.pending = BytesMut::new();
            return Err(EventTooLong);
        }
        Ok(match out {
            Some(b) => Some(b.freeze()),
            None => kept_first,
        })
    }

    /// Whether the event goes on to the client.
    fn inspect(&mut self, ev: &[u8], obs: &mut Observed) -> bool {
        let mut data: Cow<'_, [u8]> = Cow::Borrowed(&[]);
        for line in ev.split(|c| *c == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(d) = line.strip_prefix(b"data:") {
                let d = d.strip_prefix(b" ").unwrap_or(d);
                data = if data.is_empty() {
                    Cow::Borrowed(d)
                } else {
                    let mut v = data.into_owned();
                    v.push(b'\n');
                    v.extend_from_slice(d);
                    Cow::Owned(v)
                };
            }
        }
        if data.is_empty() || data.as_ref() == b"[DONE]" {
            return true;
        }
        #[derive(Deserialize)]
        struct Chunk<'a> {
            #[serde(borrow, default)]
            choices: Option<Vec<Choice<'a>>>,
            #[serde(default)]
            usage: Option<UsageFields>,
            #[serde(rename = "type", borrow, default)]
            kind: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            delta: Option<Cow<'a, str>>,
            #[serde(default)]
            response: Option<ResponseObj>,
        }
        #[derive(Deserialize)]
        struct ResponseObj {
            #[serde(default)]
            usage: Option<UsageFields>,
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(&data) else {
            return true;
        };
        if self.op == Operation::Responses {
            match chunk.kind.as_deref() {
                Some("response.output_text.delta") => {
                    if let Some(d) = &chunk.delta {
                        obs.push_text(d);
                    }
                }
                Some("response.completed") | Some("response.incomplete") => {
                    if let Some(u) = chunk.response.and_then(|r| r.usage) {
                        obs.reported = u.to_usage();
                    }
                }
                _ => {}
            }
            return true;
        }
        let choices = chunk.choices.unwrap_or_default();
        for c in &choices {
            if let Some(t) = c
                .delta
                .as_ref()
                .and_then(|d| d.content.as_deref())
                .or(c.text.as_deref())
            {
                obs.push_text(t);
            }
        }
        if let Some(u) = chunk.usage {
            obs.reported = u.to_usage();
            if self.hide_usage_chunk && choices.is_empty() {
                return false;
            }
        }
        true
    }

    pub(super) fn finish(&mut self, obs: &mut Observed) -> Option<Bytes> {
        // A trailing event without its blank line goes on as the backend sent it — unless it
        // is the usage chunk the client did not ask for.
        if self.pending.is_empty() {
            return None;
        }
        let ev = self.pending.split().freeze();
        self.inspect(&ev, obs).then_some(ev)
    }
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;

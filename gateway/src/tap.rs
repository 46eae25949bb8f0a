//! The response body on its way to the client: a [`Tap`] passes the backend's bytes through as
//! they come (SSE events forwarded as each completes, never the whole stream buffered), reads
//! the usage from them, and settles the request however the body ends.
//!
//! It is also where one backend's answer is kept from exhausting a replica ([`Bounds`]): a
//! silence longer than `timeouts.idle_ms`, a response that outlasts `timeouts.max_response_ms`
//! or outgrows `server.max_response_bytes`, or a server-sent event longer than
//! `server.max_sse_event_bytes` ends the body — a stream with an OpenAI-style error event, a
//! JSON body with a cut the client's HTTP library reports. Usage the backend reports beyond
//! [`MAX_REPORTED_TOKENS`] is not believed: the gateway counts the request itself.

use crate::request::Operation;
use crate::usage::Meter;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use serde::Deserialize;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tollgate_common::{ApiError, ErrorKind, TokenUsage};

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
    fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > FULL_LIMIT {
            let cut = self.buf.len() - TAIL;
            self.buf.drain(..cut);
            self.truncated = true;
        }
    }

    fn finish(&mut self, meter: &mut Meter) {
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
        struct Choice<'a> {
            #[serde(borrow, default)]
            message: Option<Delta<'a>>,
            #[serde(borrow, default)]
            text: Option<Cow<'a, str>>,
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
                    meter.get().reported = Some(u);
                    return;
                }
                for c in w.choices.unwrap_or_default() {
                    if let Some(t) = c.message.and_then(|m| m.content).or(c.text) {
                        meter.push_text(&t);
                    }
                }
                for item in w.output.unwrap_or_default() {
                    for t in item.content.unwrap_or_default() {
                        if let Some(t) = t.text {
                            meter.push_text(&t);
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
                    meter.get().reported = u.to_usage();
                }
            }
        }
    }
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
struct EventTooLong;

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
    fn feed(&mut self, chunk: &[u8], meter: &mut Meter) -> Result<Option<Bytes>, EventTooLong> {
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
            if self.inspect(&ev, meter) {
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
    fn inspect(&mut self, ev: &[u8], meter: &mut Meter) -> bool {
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
            choices: Option<Vec<ChunkChoice<'a>>>,
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
        struct ChunkChoice<'a> {
            #[serde(borrow, default)]
            delta: Option<Delta<'a>>,
            #[serde(borrow, default)]
            text: Option<Cow<'a, str>>,
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
                        meter.push_text(d);
                    }
                }
                Some("response.completed") | Some("response.incomplete") => {
                    if let Some(u) = chunk.response.and_then(|r| r.usage) {
                        meter.get().reported = u.to_usage();
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
                meter.push_text(t);
            }
        }
        if let Some(u) = chunk.usage {
            meter.get().reported = u.to_usage();
            if self.hide_usage_chunk && choices.is_empty() {
                return false;
            }
        }
        true
    }

    fn finish(&mut self, meter: &mut Meter) -> Option<Bytes> {
        // A trailing event without its blank line goes on as the backend sent it — unless it
        // is the usage chunk the client did not ask for.
        if self.pending.is_empty() {
            return None;
        }
        let ev = self.pending.split().freeze();
        self.inspect(&ev, meter).then_some(ev)
    }
}

/// What one response may cost a replica.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Longest silence between two chunks (`timeouts.idle_ms`).
    pub idle: Duration,
    /// When the response must have ended (`timeouts.max_response_ms` after the send).
    pub deadline: tokio::time::Instant,
    /// Most bytes passed on (`server.max_response_bytes`).
    pub max_bytes: u64,
}

/// The response body on its way to the client: backend bytes in, the same bytes out (less a
/// hidden usage chunk), usage recorded, [`Bounds`] enforced, settled when it ends or drops.
pub struct Tap {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    bounds: Bounds,
    /// Fires at the next silence limit or at the deadline, whichever comes first (one timer).
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Bytes received from the backend so far.
    received: u64,
    mode: Mode,
    meter: Option<Meter>,
    done: bool,
}

impl Tap {
    pub fn new(
        inner: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
        mode: Mode,
        meter: Meter,
        bounds: Bounds,
    ) -> Tap {
        Tap {
            inner: Box::pin(inner),
            timer: Box::pin(tokio::time::sleep_until(
                (tokio::time::Instant::now() + bounds.idle).min(bounds.deadline),
            )),
            bounds,
            received: 0,
            mode,
            meter: Some(meter),
            done: false,
        }
    }

    /// Ends the body early: settles what was seen, and tells the client — an error event in
    /// a stream, a failed body otherwise.
    fn cut(&mut self, why: &'static str) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.done = true;
        tracing::warn!(reason = why, "backend response cut short");
        // Dropping the meter settles what was seen; `complete` stays false.
        self.meter.take();
        match self.mode {
            Mode::Sse(_) => {
                // `event: error` with an OpenAI error body: what the OpenAI SDKs raise on, for
                // chat streams and Responses streams alike.
                let api = ApiError::new(ErrorKind::BadGateway, why);
                let mut ev = b"event: error\ndata: ".to_vec();
                ev.extend_from_slice(&api.body());
                ev.extend_from_slice(b"\n\n");
                Poll::Ready(Some(Ok(Bytes::from(ev))))
            }
            Mode::Json(_) => Poll::Ready(Some(Err(std::io::Error::other(why)))),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // hyper stops polling once it has written `content-length` bytes, so a JSON body may
        // end here without the stream's end being seen: read its usage now.
        if let (Some(meter), Mode::Json(j)) = (self.meter.as_mut(), &mut self.mode) {
            j.finish(meter);
        }
    }
}

impl Stream for Tap {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let next = tokio::time::Instant::now() + this.bounds.idle;
                    this.timer.as_mut().reset(next.min(this.bounds.deadline));
                    this.received = this.received.saturating_add(chunk.len() as u64);
                    if this.received > this.bounds.max_bytes {
                        return this.cut("the backend response is larger than the gateway allows");
                    }
                    let Some(meter) = this.meter.as_mut() else {
                        return Poll::Ready(None);
                    };
                    let out = match &mut this.mode {
                        Mode::Json(j) => {
                            j.feed(&chunk);
                            Some(chunk)
                        }
                        Mode::Sse(s) => match s.feed(&chunk, meter) {
                            Ok(out) => out,
                            Err(EventTooLong) => {
                                return this.cut(
                                    "the backend sent an event longer than the gateway allows",
                                );
                            }
                        },
                    };
                    match out {
                        Some(b) if !b.is_empty() => return Poll::Ready(Some(Ok(b))),
                        _ => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    tracing::warn!(error = %e, "backend response body failed mid-way");
                    // Dropping the meter settles what was seen; the client sees the stream cut.
                    this.meter.take();
                    return Poll::Ready(Some(Err(std::io::Error::other("backend stream failed"))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let mut tail = None;
                    if let Some(mut meter) = this.meter.take() {
                        match &mut this.mode {
                            Mode::Json(j) => j.finish(&mut meter),
                            Mode::Sse(s) => tail = s.finish(&mut meter),
                        }
                        meter.get().complete = true;
                    }
                    return Poll::Ready(tail.map(Ok));
                }
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        if tokio::time::Instant::now() >= this.bounds.deadline {
                            return this
                                .cut("the backend response took longer than the gateway allows");
                        }
                        this.done = true;
                        tracing::warn!("backend response idle timeout");
                        this.meter.take();
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "backend idle timeout",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(max_event: usize) -> SseScan {
        SseScan {
            pending: BytesMut::new(),
            scanned: 0,
            max_event,
            hide_usage_chunk: false,
            op: Operation::Chat,
        }
    }

    /// Events split across chunks (their end marker too) come out whole, once each; an event
    /// that grows past the limit without ending is refused and its bytes released.
    #[test]
    fn sse_events_reassemble_and_are_bounded() {
        let mut meter = Meter::detached();
        let mut s = scan(64);
        assert_eq!(s.feed(b"data: {\"a\":1}\n", &mut meter).unwrap(), None);
        let out = s.feed(b"\ndata: {\"b\"", &mut meter).unwrap().unwrap();
        assert_eq!(&out[..], b"data: {\"a\":1}\n\n");
        let out = s.feed(b":2}\r\n\r\n", &mut meter).unwrap().unwrap();
        assert_eq!(&out[..], b"data: {\"b\":2}\r\n\r\n");
        assert!(s.feed(&[b'x'; 40], &mut meter).unwrap().is_none());
        assert!(s.feed(&[b'x'; 40], &mut meter).is_err());
        assert!(s.pending.is_empty());
    }

    /// Usage numbers no model could produce are refused; sane ones pass.
    #[test]
    fn impossible_usage_is_refused() {
        let u: UsageFields =
            serde_json::from_str(r#"{"prompt_tokens":18446744073709551615,"completion_tokens":5}"#)
                .unwrap();
        assert_eq!(u.to_usage(), None);
        let u: UsageFields =
            serde_json::from_str(r#"{"prompt_tokens":10,"total_tokens":18446744073709551615}"#)
                .unwrap();
        assert_eq!(u.to_usage(), None);
        let u: UsageFields =
            serde_json::from_str(r#"{"prompt_tokens":10,"completion_tokens":5}"#).unwrap();
        assert_eq!(u.to_usage().map(|u| u.total()), Some(15));
    }
}

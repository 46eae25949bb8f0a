//! Forwarding: send the request to the planned backends in turn until one answers, then stream
//! its response to the client through a [`Tap`] that reads usage on the way.
//!
//! Failover happens only before the first byte reaches the client: a 429, 5xx, connect error or
//! first-byte timeout moves on to the next backend. Once a response starts, its bytes pass
//! through as they come (SSE events forwarded as each completes, never the whole stream
//! buffered); the only change is that the usage-only chunk the gateway asked for is hidden from
//! a client that did not ask for it. Dropping the response (a client that disconnects) drops
//! the backend call and settles the tokens already generated.

use crate::auth::CREDENTIAL_HEADERS;
use crate::breaker::Breakers;
use crate::error::Error;
use crate::request::{ClientRequest, Operation, RouteStyle, rewrite_body};
use crate::routing::{Backend, Candidate, Credential};
use crate::usage::Meter;
use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde::Deserialize;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tollgate_common::TokenUsage;
use tollgate_common::config::BackendApi;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `host`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client headers never sent on.
fn is_dropped_request_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n)
        || CREDENTIAL_HEADERS.contains(&n)
        || n == "host"
        || n == "content-length"
        || n == "cookie"
        // The gateway reads usage from the body, so it asks backends for identity encoding.
        || n == "accept-encoding"
        || n.starts_with("x-tollgate-")
}

/// Backend response headers never passed back.
fn is_dropped_response_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n) || n == "set-cookie" || n.starts_with("x-ratelimit-")
}

/// Most backends one request is sent to (the first try and its failovers).
pub const MAX_ATTEMPTS: usize = 4;

/// Which backend served a response (a response extension, for debug headers).
#[derive(Clone, Debug)]
pub struct ServedBy(pub Arc<str>);

/// Why one attempt failed, and whether another backend may help.
enum AttemptError {
    /// Failover: the backend is saturated or broken.
    Retryable {
        err: Error,
        retry_after_ms: Option<u64>,
    },
}

/// The forwarding context of one request.
pub struct Forward<'a> {
    pub client: &'a reqwest::Client,
    pub breakers: &'a Arc<Breakers>,
    pub req: &'a ClientRequest,
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
}

impl Forward<'_> {
    /// Tries the candidates of `plan` in order (a half-open one only if this request wins its
    /// probe), at most [`MAX_ATTEMPTS`] sends; returns the first usable response.
    pub async fn run(&self, plan: &[Candidate], meter: &mut Meter) -> Result<Response, Error> {
        let mut last: Option<Error> = None;
        let mut retry_after: Option<u64> = None;
        let mut attempts = 0;
        for c in plan {
            if attempts == MAX_ATTEMPTS {
                break;
            }
            let backend = &c.backend;
            if c.half_open && !self.breakers.try_probe(backend).await {
                // Another replica (or request) is probing it; keep away until it reports.
                retry_after = Some(retry_after.map_or(1_000, |r: u64| r.min(1_000)));
                continue;
            }
            if attempts > 0 {
                meter.get().failovers += 1;
            }
            attempts += 1;
            match self.attempt(backend, c.half_open, meter).await {
                Ok(resp) => return Ok(resp),
                Err(AttemptError::Retryable {
                    err,
                    retry_after_ms,
                }) => {
                    tracing::debug!(backend = %backend.name, error = %err, "backend attempt failed");
                    if let Some(ms) = retry_after_ms {
                        retry_after = Some(retry_after.map_or(ms, |r: u64| r.min(ms)));
                    }
                    last = Some(err);
                }
            }
        }
        Err(match last {
            Some(Error::NoBackend { .. }) | None => Error::NoBackend {
                retry_after_ms: retry_after,
            },
            Some(e) => e,
        })
    }

    async fn attempt(
        &self,
        b: &Arc<Backend>,
        probe: bool,
        meter: &mut Meter,
    ) -> Result<Response, AttemptError> {
        let req = self.req;
        let deployment = b.deployment(&req.model);
        let set_model = match (b.config.api, req.op, &req.style) {
            // Azure's deployment route ignores the body's model, except the v1 responses route.
            (BackendApi::Azure, Operation::Responses, _) => Some(deployment),
            (BackendApi::Azure, _, _) => None,
            (BackendApi::Openai, _, RouteStyle::AzureDeployment { .. }) => Some(deployment),
            (BackendApi::Openai, _, _) => (deployment != req.model).then_some(deployment),
        };
        let include_usage = req.stream && req.op.needs_include_usage() && !req.client_include_usage;
        let body =
            rewrite_body(&req.body, set_model, include_usage, req.output_cap).map_err(|err| {
                AttemptError::Retryable {
                    err,
                    retry_after_ms: None,
                }
            })?;
        let api_version = match &req.style {
            RouteStyle::AzureDeployment {
                api_version: Some(v),
                ..
            } => v.as_str(),
            _ => b.config.api_version.as_str(),
        };
        let url =
            b.target(req.op, &req.model, api_version)
                .map_err(|err| AttemptError::Retryable {
                    err,
                    retry_after_ms: None,
                })?;

        let mut headers = HeaderMap::with_capacity(self.headers.len() + 2);
        for (k, v) in self.headers {
            if !is_dropped_request_header(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(self.request_id) {
            headers.insert("x-request-id", v);
        }
        if probe {
            // Marks the one request the cluster sends to a half-open backend.
            headers.insert("x-tollgate-probe", HeaderValue::from_static("1"));
        }
        match &b.credential {
            Credential::None => {}
            Credential::Header(name, value) => {
                headers.insert(*name, value.clone());
            }
            Credential::Token(p) => {
                // Never waits while a valid token exists; no token is not the backend's fault.
                let v = p.header().await.map_err(|err| AttemptError::Retryable {
                    err,
                    retry_after_ms: None,
                })?;
                headers.insert(header::AUTHORIZATION, v);
            }
        }

        let timeouts = b.config.timeouts;
        let send = self.client.post(url).headers(headers).body(body).send();
        let result =
            tokio::time::timeout(Duration::from_millis(timeouts.first_byte_ms), send).await;
        let resp = match result {
            Err(_) => {
                self.breakers.failure(b, None, None, probe);
                return Err(AttemptError::Retryable {
                    err: Error::UpstreamTimeout,
                    retry_after_ms: None,
                });
            }
            Ok(Err(e)) => {
                self.breakers.failure(b, None, None, probe);
                let err = if e.is_timeout() {
                    Error::UpstreamTimeout
                } else {
                    Error::Upstream(format!("{}: {}", b.name, describe(&e)))
                };
                return Err(AttemptError::Retryable {
                    err,
                    retry_after_ms: None,
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
        {
            let retry_after_ms = retry_after_ms(resp.headers());
            self.breakers
                .failure(b, Some(status.as_u16()), retry_after_ms, probe);
            let err = if status == StatusCode::TOO_MANY_REQUESTS {
                Error::NoBackend { retry_after_ms }
            } else {
                Error::Upstream(format!("{} answered {}", b.name, status.as_u16()))
            };
            return Err(AttemptError::Retryable {
                err,
                retry_after_ms,
            });
        }
        self.breakers.success(b, probe);
        if let Some(u) = utilization(resp.headers()) {
            self.breakers.utilization(b, u);
        }

        let o = meter.get();
        o.backend = Some(b.clone());
        o.status = status.as_u16();
        o.first_byte = Some(o.started.elapsed());

        let mut out = Response::builder()
            .status(status)
            .extension(ServedBy(b.name.clone()));
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if let Some(h) = out.headers_mut() {
            for (k, v) in resp.headers() {
                if !(is_dropped_response_header(k) || is_sse && k == header::CONTENT_LENGTH) {
                    h.append(k.clone(), v.clone());
                }
            }
        }
        let mode = if !status.is_success() {
            Mode::Passthrough
        } else if is_sse {
            Mode::Sse(SseScan {
                pending: BytesMut::new(),
                hide_usage_chunk: include_usage,
                op: req.op,
            })
        } else {
            Mode::Json(JsonScan::default())
        };
        let tap = Tap {
            inner: Box::pin(resp.bytes_stream()),
            idle: Duration::from_millis(timeouts.idle_ms),
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(timeouts.idle_ms))),
            mode,
            meter: Some(std::mem::replace(meter, Meter::detached())),
            done: false,
        };
        out.body(Body::from_stream(tap))
            .map_err(|e| AttemptError::Retryable {
                err: Error::Internal(e.to_string()),
                retry_after_ms: None,
            })
    }
}

/// A transport error, described without its URL or any detail a backend could have echoed.
fn describe(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    }
}

/// `retry-after-ms`, else `retry-after` (seconds), from a backend response.
pub fn retry_after_ms(h: &HeaderMap) -> Option<u64> {
    let num = |name: &str| h.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = num("retry-after-ms") {
        return Some(ms.max(0.0) as u64);
    }
    num("retry-after").map(|s| (s.max(0.0) * 1000.0) as u64)
}

/// `azure-openai-deployment-utilization` as a fraction (the header carries a percentage).
pub fn utilization(h: &HeaderMap) -> Option<f64> {
    let v = h
        .get("azure-openai-deployment-utilization")?
        .to_str()
        .ok()?;
    let n: f64 = v.trim().trim_end_matches('%').trim().parse().ok()?;
    Some(n / 100.0)
}

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
    pub fn to_usage(&self) -> TokenUsage {
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
        TokenUsage {
            input,
            output,
            cached_input: cached,
        }
    }
}

enum Mode {
    Passthrough,
    Json(JsonScan),
    Sse(SseScan),
}

/// Keeps a non-streamed body (whole up to [`FULL_LIMIT`], else its tail) to read usage at the end.
#[derive(Default)]
struct JsonScan {
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
                if let Some(u) = w.usage {
                    meter.get().reported = Some(u.to_usage());
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
                    meter.get().reported = Some(u.to_usage());
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
struct SseScan {
    pending: BytesMut,
    hide_usage_chunk: bool,
    op: Operation,
}

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
    fn feed(&mut self, chunk: &[u8], meter: &mut Meter) -> Option<Bytes> {
        self.pending.extend_from_slice(chunk);
        let mut out: Option<BytesMut> = None;
        let mut kept_first: Option<Bytes> = None;
        while let Some(end) = event_end(&self.pending) {
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
        match out {
            Some(b) => Some(b.freeze()),
            None => kept_first,
        }
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
                        meter.get().reported = Some(u.to_usage());
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
            meter.get().reported = Some(u.to_usage());
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

/// The response body on its way to the client: backend bytes in, the same bytes out (less a
/// hidden usage chunk), usage recorded, idle timeout enforced, settled when it ends or drops.
pub struct Tap {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    mode: Mode,
    meter: Option<Meter>,
    done: bool,
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
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                    let Some(meter) = this.meter.as_mut() else {
                        return Poll::Ready(None);
                    };
                    let out = match &mut this.mode {
                        Mode::Passthrough => Some(chunk),
                        Mode::Json(j) => {
                            j.feed(&chunk);
                            Some(chunk)
                        }
                        Mode::Sse(s) => s.feed(&chunk, meter),
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
                            Mode::Passthrough => {}
                            Mode::Json(j) => j.finish(&mut meter),
                            Mode::Sse(s) => tail = s.finish(&mut meter),
                        }
                        meter.get().complete = true;
                    }
                    return Poll::Ready(tail.map(Ok));
                }
                Poll::Pending => {
                    if this.sleep.as_mut().poll(cx).is_ready() {
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

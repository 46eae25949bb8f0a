//! One upstream MCP server over streamable HTTP: a POST of one message whose answer is JSON or
//! an SSE stream of messages, the GET stream, and DELETE. The gateway's own credential goes on
//! every request; of the client's headers only the protocol version and the trace context are
//! carried (its `Authorization` and keys never are). SSE is parsed incrementally, each event
//! bounded in size.

use super::jsonrpc;
use super::openapi::OpenApiTools;
use crate::credentials::Credential;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use http::{HeaderMap, HeaderValue};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The largest SSE event or JSON body taken from an upstream.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// What went wrong talking to an upstream: always the upstream's fault, told to the client as
/// a JSON-RPC error naming the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Down(String),
    Timeout(u64),
    Garbage(String),
    Status(u16),
    /// The upstream no longer knows the session (expired, restarted): 404.
    SessionGone,
}

impl Fault {
    pub fn describe(&self, server: &str) -> String {
        match self {
            Fault::Down(e) => format!("MCP server {server} is unreachable: {e}"),
            Fault::Timeout(ms) => format!("MCP server {server} did not answer within {ms} ms"),
            Fault::Garbage(e) => format!("MCP server {server} answered something unreadable: {e}"),
            Fault::Status(s) => format!("MCP server {server} answered HTTP {s}"),
            Fault::SessionGone => format!("MCP server {server} no longer knows this session"),
        }
    }

    /// The error message the client gets for the request `id`.
    pub fn to_jsonrpc(&self, server: &str, id: Value) -> Value {
        jsonrpc::error(id, jsonrpc::SERVER_ERROR, &self.describe(server))
    }
}

/// An upstream's answer to a POST or GET.
pub struct Reply {
    /// `Mcp-Session-Id` it set (on `initialize`).
    pub session: Option<String>,
    /// It answered `application/json` (one message) rather than a stream.
    pub json: bool,
    pub messages: BoxStream<'static, Result<Value, Fault>>,
}

/// A configured `[[mcp_servers]]` entry, ready to call.
pub struct Upstream {
    pub name: String,
    pub url: String,
    /// Which of its tools are exposed (globs).
    pub tools: Vec<String>,
    pub timeout: Duration,
    pub credential: Credential,
    /// Set for a REST API exported from its OpenAPI document (`openapi`): the gateway answers
    /// for it ([`super::rest`]); there is no MCP endpoint, `url` is empty.
    pub rest: Option<Arc<OpenApiTools>>,
}

/// What the gateway carries to an upstream besides the message.
#[derive(Default, Clone)]
pub struct Carry<'a> {
    pub session: Option<&'a str>,
    pub version: Option<&'a str>,
    pub traceparent: Option<HeaderValue>,
    /// The client's capabilities, to initialize a replacement session with ([`super::renew`]).
    pub capabilities: Option<&'a Value>,
}

impl Upstream {
    async fn headers(&self, carry: &Carry<'_>) -> Result<HeaderMap, Fault> {
        let mut h = HeaderMap::new();
        if let Some(s) = carry.session.and_then(|s| HeaderValue::from_str(s).ok()) {
            h.insert("mcp-session-id", s);
        }
        if let Some(v) = carry.version.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert("mcp-protocol-version", v);
        }
        if let Some(tp) = &carry.traceparent {
            h.insert("traceparent", tp.clone());
        }
        match &self.credential {
            Credential::None => {}
            Credential::Header(name, v) => {
                h.insert(*name, v.clone());
            }
            Credential::Token(p) => {
                let v = p
                    .header()
                    .await
                    .map_err(|_| Fault::Down("no valid credential for it yet".into()))?;
                h.insert(http::header::AUTHORIZATION, v);
            }
        }
        Ok(h)
    }

    /// POSTs one message. `Ok(None)`: accepted without an answer (a notification or response).
    pub async fn post(
        &self,
        client: &reqwest::Client,
        carry: &Carry<'_>,
        body: Bytes,
    ) -> Result<Option<Reply>, Fault> {
        if self.rest.is_some() {
            return Err(Fault::Garbage("a REST API, not an MCP server".into()));
        }
        let headers = self.headers(carry).await?;
        let req = client
            .post(&self.url)
            .headers(headers)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .body(body);
        let resp = self.send(req).await?;
        match resp.status().as_u16() {
            202 | 204 => Ok(None),
            200 => self.reply(resp).map(Some),
            404 if carry.session.is_some() => Err(Fault::SessionGone),
            s => Err(Fault::Status(s)),
        }
    }

    /// Opens the upstream's own stream (GET). `Ok(None)`: it offers none (405).
    pub async fn get(
        &self,
        client: &reqwest::Client,
        carry: &Carry<'_>,
    ) -> Result<Option<Reply>, Fault> {
        if self.rest.is_some() {
            return Ok(None);
        }
        let headers = self.headers(carry).await?;
        let req = client
            .get(&self.url)
            .headers(headers)
            .header(http::header::ACCEPT, "text/event-stream");
        let resp = self.send(req).await?;
        match resp.status().as_u16() {
            200 => self.reply(resp).map(Some),
            405 => Ok(None),
            404 if carry.session.is_some() => Err(Fault::SessionGone),
            s => Err(Fault::Status(s)),
        }
    }

    /// Ends the upstream session (DELETE); a failure only logs.
    pub async fn delete(&self, client: &reqwest::Client, carry: &Carry<'_>) {
        if self.rest.is_some() {
            return;
        }
        let Ok(headers) = self.headers(carry).await else {
            return;
        };
        let req = client.delete(&self.url).headers(headers);
        if let Err(e) = self.send(req).await {
            tracing::debug!(server = %self.name, error = ?e, "MCP session DELETE failed");
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Fault> {
        match tokio::time::timeout(self.timeout, req.send()).await {
            Err(_) => Err(Fault::Timeout(self.timeout.as_millis() as u64)),
            Ok(Err(e)) => Err(Fault::Down(without_url(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn reply(&self, resp: reqwest::Response) -> Result<Reply, Fault> {
        let session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let ctype = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = resp.bytes_stream().map(|r| r.map_err(|e| without_url(&e)));
        if ctype.starts_with("text/event-stream") {
            Ok(Reply {
                session,
                json: false,
                messages: sse_messages(body.boxed()),
            })
        } else if ctype.starts_with("application/json") {
            let one = futures::stream::once(async move {
                let mut buf = BytesMut::new();
                let mut body = body;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(Fault::Down)?;
                    if buf.len() + chunk.len() > MAX_EVENT_BYTES {
                        return Err(Fault::Garbage("a body over 16 MiB".into()));
                    }
                    buf.extend_from_slice(&chunk);
                }
                serde_json::from_slice::<Value>(&buf).map_err(|_| Fault::Garbage("not JSON".into()))
            });
            Ok(Reply {
                session,
                json: true,
                messages: one.boxed(),
            })
        } else {
            Err(Fault::Garbage(format!("content-type {ctype:?}")))
        }
    }
}

/// What went wrong on the wire, without the URL (which names the upstream's address).
fn without_url(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection failed".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_body() || e.is_decode() {
        "its answer broke off".into()
    } else {
        "the request failed".into()
    }
}

/// The JSON messages of an SSE body: one per event with data (comments, pings and empty
/// priming events are skipped); an event that is not JSON or too large ends the stream with
/// [`Fault::Garbage`].
pub fn sse_messages(
    body: BoxStream<'static, Result<Bytes, String>>,
) -> BoxStream<'static, Result<Value, Fault>> {
    struct State {
        body: BoxStream<'static, Result<Bytes, String>>,
        buf: BytesMut,
        done: bool,
    }
    let state = State {
        body,
        buf: BytesMut::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(end) = event_end(&st.buf) {
                let event = st.buf.split_to(end.0);
                let _ = st.buf.split_to(end.1);
                match event_data(&event) {
                    None => continue,
                    Some(data) => {
                        return Some(match serde_json::from_slice::<Value>(&data) {
                            Ok(v) => (Ok(v), st),
                            Err(_) => {
                                st.done = true;
                                (
                                    Err(Fault::Garbage("an SSE event that is not JSON".into())),
                                    st,
                                )
                            }
                        });
                    }
                }
            }
            if st.buf.len() > MAX_EVENT_BYTES {
                st.done = true;
                return Some((Err(Fault::Garbage("an SSE event over 16 MiB".into())), st));
            }
            match st.body.next().await {
                Some(Ok(chunk)) => st.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(Fault::Down(e)), st));
                }
                None => {
                    st.done = true;
                    // A last event without its blank line still counts.
                    let rest = std::mem::take(&mut st.buf);
                    return event_data(&rest)
                        .and_then(|d| serde_json::from_slice::<Value>(&d).ok())
                        .map(|v| (Ok(v), st));
                }
            }
        }
    })
    .boxed()
}

/// Where the first event in `buf` ends: (its length, the separator's length).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The `data:` lines of one event, joined by newlines; none when it has none or only blanks.
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Vec<u8> = Vec::new();
    let mut any = false;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if any {
                data.push(b'\n');
            }
            any = true;
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    (any && data.iter().any(|b| !b.is_ascii_whitespace())).then_some(data)
}

/// Reads what is left of an answered exchange off the request path (for a moment at most), so
/// the upstream connection ends its response cleanly and goes back to the pool instead of being
/// closed: a new connection per call would cost more than the call.
pub fn drain(mut rest: BoxStream<'static, Result<Value, Fault>>) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while rest.next().await.is_some() {}
        })
        .await;
    });
}

/// One message as an SSE event for the client.
pub fn sse_event(msg: &Value) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"event: message\ndata: ");
    let _ = serde_json::to_writer(&mut out, msg);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&str]) -> BoxStream<'static, Result<Bytes, String>> {
        let v: Vec<Result<Bytes, String>> = parts
            .iter()
            .map(|p| Ok(Bytes::from(p.to_string())))
            .collect();
        futures::stream::iter(v).boxed()
    }

    /// Events split anywhere across chunks parse whole; pings and priming events are skipped.
    #[tokio::test]
    async fn sse_parses_incrementally() {
        let body = chunks(&[
            ": ping\n\nid: 1\ndata:\n\nevent: message\nda",
            "ta: {\"a\":1}\n\ndata: {\"b\":\r\ndata: 2}\r\n\r\n",
            "data: {\"c\":3}",
        ]);
        let got: Vec<_> = sse_messages(body).collect().await;
        let got: Vec<Value> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            got,
            vec![
                serde_json::json!({"a":1}),
                serde_json::json!({"b":2}),
                serde_json::json!({"c":3})
            ]
        );
    }

    /// An event that is not JSON ends the stream with a fault, not a panic or a hang.
    #[tokio::test]
    async fn sse_garbage_is_a_fault() {
        let got: Vec<_> = sse_messages(chunks(&["data: <html>\n\n", "data: {}\n\n"]))
            .collect()
            .await;
        assert_eq!(got.len(), 1);
        assert!(matches!(got[0], Err(Fault::Garbage(_))));
    }
}

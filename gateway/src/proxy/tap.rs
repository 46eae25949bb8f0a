//! The response body on its way to the client: a [`Tap`] passes the backend's bytes through as
//! they come (SSE events forwarded as each completes, never the whole stream buffered), reads
//! the usage from them, and settles the request however the body ends.
//!
//! It is also where one backend's answer is kept from exhausting a replica ([`Bounds`]): a
//! silence longer than `timeouts.idle_ms`, a response that outlasts `timeouts.max_response_ms`
//! or outgrows `server.max_response_bytes`, or a server-sent event longer than
//! `server.max_sse_event_bytes` ends the body, and so does a backend whose body fails mid-way:
//! a stream with an OpenAI-style error event after the events that arrived, a JSON body with a
//! cut the client's HTTP library reports. Usage the backend reports beyond
//! [`MAX_REPORTED_TOKENS`](super::scan::MAX_REPORTED_TOKENS) is not believed: the gateway counts the request itself.

use super::scan::{EventTooLong, Mode};
use crate::cache::Recorder;
use crate::usage::Meter;
use bytes::Bytes;
use futures::Stream;
use http_body::Body as _;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tollgate_common::{ApiError, ErrorKind};

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
    inner: Incoming,
    bounds: Bounds,
    /// Fires at the next silence limit or at the deadline, whichever comes first (one timer).
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Bytes received from the backend so far.
    received: u64,
    mode: Mode,
    meter: Option<Meter>,
    /// Copies the backend's bytes for the cache; handed the whole answer only when the
    /// response completed, dropped (nothing stored) however else it ends.
    recorder: Option<Recorder>,
    done: bool,
}

impl Tap {
    pub fn new(
        inner: Incoming,
        mode: Mode,
        meter: Meter,
        bounds: Bounds,
        recorder: Option<Recorder>,
    ) -> Tap {
        Tap {
            inner,
            timer: Box::pin(tokio::time::sleep_until(
                (tokio::time::Instant::now() + bounds.idle).min(bounds.deadline),
            )),
            bounds,
            received: 0,
            mode,
            meter: Some(meter),
            recorder,
            done: false,
        }
    }

    /// Ends the body early: settles what was seen, and tells the client — an error event in
    /// a stream, a failed body otherwise.
    fn cut(&mut self, why: &'static str) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.done = true;
        self.recorder = None;
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
            j.finish(meter.observed());
            // Stored only if what arrived parses as a whole answer.
            if let Some(r) = self.recorder.take() {
                r.finish(false);
            }
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
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry nothing the gateway reads.
                    let Ok(chunk) = frame.into_data() else {
                        continue;
                    };
                    let next = tokio::time::Instant::now() + this.bounds.idle;
                    this.timer.as_mut().reset(next.min(this.bounds.deadline));
                    this.received = this.received.saturating_add(chunk.len() as u64);
                    if this.received > this.bounds.max_bytes {
                        return this.cut("the backend response is larger than the gateway allows");
                    }
                    let Some(meter) = this.meter.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if let Some(r) = this.recorder.as_mut() {
                        r.feed(&chunk);
                    }
                    let out = match &mut this.mode {
                        Mode::Json(j) => {
                            j.feed(&chunk);
                            Some(chunk)
                        }
                        Mode::Sse(s) => match s.feed(&chunk, meter.observed()) {
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
                    tracing::debug!(error = %e, "backend response body failed mid-way");
                    // A stream ends with an error event after what arrived, so that the
                    // events already received reach the client whatever the timing (a body
                    // error makes hyper drop the connection, unflushed bytes with it).
                    return this.cut("the backend's response failed before it ended");
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let mut tail = None;
                    if let Some(mut meter) = this.meter.take() {
                        match &mut this.mode {
                            Mode::Json(j) => j.finish(meter.observed()),
                            Mode::Sse(s) => tail = s.finish(meter.observed()),
                        }
                        meter.observed().complete = true;
                        if let Some(r) = this.recorder.take() {
                            r.finish(matches!(this.mode, Mode::Sse(_)));
                        }
                    }
                    return Poll::Ready(tail.map(Ok));
                }
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        if tokio::time::Instant::now() >= this.bounds.deadline {
                            return this
                                .cut("the backend response took longer than the gateway allows");
                        }
                        return this.cut("the backend was silent longer than the gateway allows");
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

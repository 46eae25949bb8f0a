//! Forwarding: send the request to the planned backends in turn until one answers, then stream
//! its response to the client through a [`Tap`] that reads usage on the way.
//!
//! Failover happens only before the first byte reaches the client. A 429, 408 or 5xx (the
//! backend is saturated or failing), a 401, 403 or 404 (it refuses the gateway: its credential,
//! its deployment), a redirect, a connect error or a first-byte timeout moves on to the next
//! backend; when none is left the client gets a generic 502/503/504, never the backend's body.
//! Redirects are never followed: the credential and the prompt go only to the configured URL.
//! Any other 4xx is the client's own fault and reaches the client with the backend's status
//! and body, scrubbed of every secret the gateway holds. Only allow-listed client headers are
//! sent on ([`crate::headers`]).
//!
//! Once a response starts, its bytes pass through as they come; the only change is that the
//! usage-only chunk the gateway asked for is hidden from a client that did not ask for it.
//! Dropping the response (a client that disconnects) drops the backend call and settles the
//! tokens already generated.
//!
//! - [`headers`]: which request headers go to a backend, which response headers come back.
//! - [`tap`]: the response body on its way back, bounded, settled however it ends.
//! - [`scan`]: reading usage and text from JSON bodies and event streams.

mod headers;
mod scan;
mod tap;

pub use scan::{MAX_REPORTED_TOKENS, UsageFields};

use crate::credentials::Credential;
use crate::error::Error;
use crate::request::{ClientRequest, Operation, RouteStyle, rewrite_body};
use crate::routing::{Backend, Breakers, Candidate};
use crate::usage::Meter;
use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use headers::{copy_response_headers, forwarded_request_headers};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use scan::Mode;
use std::sync::Arc;
use std::time::Duration;
use tap::{Bounds, Tap};
use tokio::time::Instant;
use tollgate_common::config::BackendApi;

/// Most backends one request is sent to (the first try and its failovers).
pub const MAX_ATTEMPTS: usize = 4;

/// Largest error body from a backend passed on to a client; a larger one is replaced.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Which backend served a response (a response extension, for debug headers).
#[derive(Clone, Debug)]
pub struct ServedBy(pub Arc<str>);

/// Why one attempt failed: the error, which says whether another backend may help
/// ([`Error::may_fail_over`]), and the backend's retry hint.
struct Failed {
    err: Error,
    retry_after_ms: Option<u64>,
}

impl From<Error> for Failed {
    fn from(err: Error) -> Failed {
        Failed {
            err,
            retry_after_ms: None,
        }
    }
}

/// What a backend's status means for the request.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A success: stream it to the client.
    Serve,
    /// 429, 408, 5xx: the backend cannot serve now; its breaker counts it.
    Saturated,
    /// 401, 403, 404, a redirect, anything else odd: the backend refuses the gateway (a
    /// credential, a deployment, a moved URL). Not the client's fault, and never shown to it.
    Refused,
    /// Any other 4xx: the request itself is wrong; the client must hear why.
    ClientFault,
}

impl Verdict {
    fn of(status: StatusCode) -> Verdict {
        match status.as_u16() {
            200..=299 => Verdict::Serve,
            408 | 429 | 500..=599 => Verdict::Saturated,
            401 | 403 | 404 => Verdict::Refused,
            400..=499 => Verdict::ClientFault,
            _ => Verdict::Refused,
        }
    }
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
    /// probe), at most [`MAX_ATTEMPTS`] sends; returns the first usable response, whose body
    /// carries the meter. On failure the meter reports the status the client gets.
    pub async fn run(&self, plan: &[Candidate], mut meter: Meter) -> Result<Response, Error> {
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
                meter.observed().failovers += 1;
            }
            attempts += 1;
            meter = match self.attempt(backend, c.half_open, meter).await {
                Ok(resp) => return Ok(resp),
                Err((f, meter)) => {
                    tracing::debug!(backend = %backend.name, error = %f.err, "backend attempt failed");
                    if !f.err.may_fail_over() {
                        return Err(failed(meter, f.err));
                    }
                    if let Some(ms) = f.retry_after_ms {
                        retry_after = Some(retry_after.map_or(ms, |r: u64| r.min(ms)));
                    }
                    last = Some(f.err);
                    meter
                }
            };
        }
        let err = match last {
            Some(Error::NoBackend { .. }) | None => Error::NoBackend {
                retry_after_ms: retry_after,
            },
            Some(e) => e,
        };
        Err(failed(meter, err))
    }

    async fn attempt(
        &self,
        b: &Arc<Backend>,
        probe: bool,
        meter: Meter,
    ) -> Result<Response, (Failed, Meter)> {
        match self.send(b, probe).await {
            Ok((resp, include_usage, deadline)) => {
                self.receive(b, probe, resp, include_usage, deadline, meter)
                    .await
            }
            Err(f) => Err((f, meter)),
        }
    }

    /// Sends the request to `b` and waits for its response head.
    async fn send(
        &self,
        b: &Arc<Backend>,
        probe: bool,
    ) -> Result<(reqwest::Response, bool, Instant), Failed> {
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
        let body = rewrite_body(&req.body, set_model, include_usage, req.output_cap)?;
        let api_version = match &req.style {
            RouteStyle::AzureDeployment {
                api_version: Some(v),
                ..
            } => v.as_str(),
            _ => b.config.api_version.as_str(),
        };
        let url = b.target(req.op, &req.model, api_version)?;

        // The client chooses nothing about how the gateway's credential acts: only the
        // allow-listed headers go on.
        let mut headers = forwarded_request_headers(self.headers);
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
        let mut sent_token = None;
        match &b.credential {
            Credential::None => {}
            Credential::Header(name, value) => {
                headers.insert(*name, value.clone());
            }
            Credential::Token(p) => {
                // Never waits while a valid token exists; no token is not the backend's fault.
                let v = p.header().await?;
                sent_token = Some(v.clone());
                headers.insert(header::AUTHORIZATION, v);
            }
        }

        let timeouts = b.config.timeouts;
        let deadline = Instant::now() + Duration::from_millis(timeouts.max_response_ms);
        let first_byte =
            Duration::from_millis(timeouts.first_byte_ms.min(timeouts.max_response_ms));
        let send = self.client.post(url).headers(headers).body(body).send();
        let resp = match tokio::time::timeout(first_byte, send).await {
            Err(_) => {
                self.breakers.failure(b, None, None, probe);
                return Err(Error::UpstreamTimeout.into());
            }
            Ok(Err(e)) => {
                self.breakers.failure(b, None, None, probe);
                let err = if e.is_timeout() {
                    Error::UpstreamTimeout
                } else {
                    Error::Upstream(format!("{}: {}", b.name, describe(&e)))
                };
                return Err(err.into());
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        match Verdict::of(status) {
            Verdict::Saturated => {
                let retry_after_ms =
                    retry_after_ms(resp.headers(), b.config.breaker.max_retry_after_ms);
                self.breakers
                    .failure(b, Some(status.as_u16()), retry_after_ms, probe);
                let err = if status == StatusCode::TOO_MANY_REQUESTS {
                    Error::NoBackend { retry_after_ms }
                } else {
                    Error::Upstream(format!("{} answered {}", b.name, status.as_u16()))
                };
                Err(Failed {
                    err,
                    retry_after_ms,
                })
            }
            Verdict::Refused => {
                // Counted when `breaker.statuses` lists the status (a probe always counts).
                self.breakers.failure(b, Some(status.as_u16()), None, probe);
                if status == StatusCode::UNAUTHORIZED
                    && let (Credential::Token(p), Some(sent)) = (&b.credential, &sent_token)
                {
                    p.rejected(sent);
                }
                tracing::warn!(backend = %b.name, status = status.as_u16(),
                    "backend refused the request (credential, deployment or redirect); not passed on");
                Err(Error::Upstream(format!("{} answered {}", b.name, status.as_u16())).into())
            }
            Verdict::ClientFault | Verdict::Serve => Ok((resp, include_usage, deadline)),
        }
    }

    /// Takes a response the client will get: a success streamed through a [`Tap`] that carries
    /// the meter, or the client's own fault passed on scrubbed.
    async fn receive(
        &self,
        b: &Arc<Backend>,
        probe: bool,
        resp: reqwest::Response,
        include_usage: bool,
        deadline: Instant,
        mut meter: Meter,
    ) -> Result<Response, (Failed, Meter)> {
        let status = resp.status();
        self.breakers.success(b, probe);
        if Verdict::of(status) == Verdict::ClientFault {
            return Ok(self.client_fault(b, resp, meter, deadline).await);
        }
        if let Some(u) = utilization(resp.headers()) {
            self.breakers.utilization(b, u);
        }
        if resp
            .content_length()
            .is_some_and(|n| n > b.limits.max_response_bytes)
        {
            tracing::warn!(backend = %b.name, "backend response larger than server.max_response_bytes");
            let err = Error::ResponseTooLarge(b.name.to_string());
            return Err((err.into(), meter));
        }
        let started = meter.started();
        let o = meter.observed();
        o.backend = Some(b.clone());
        o.status = status.as_u16();
        o.first_byte = Some(started.elapsed());

        let mut out = Response::builder()
            .status(status)
            .extension(ServedBy(b.name.clone()));
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if let Some(h) = out.headers_mut() {
            // A stream may lose its hidden usage chunk, so its length is not kept.
            copy_response_headers(resp.headers(), h, &b.secrets, !is_sse);
        }
        let mode = if is_sse {
            Mode::sse(include_usage, self.req.op, b.limits.max_sse_event_bytes)
        } else {
            Mode::json()
        };
        let bounds = Bounds {
            idle: Duration::from_millis(b.config.timeouts.idle_ms),
            deadline,
            max_bytes: b.limits.max_response_bytes,
        };
        let tap = Tap::new(resp.bytes_stream(), mode, meter, bounds);
        Ok(out.body(Body::from_stream(tap)).unwrap_or_default())
    }

    /// A 4xx that is the client's own fault (a bad parameter, a content filter) reaches the
    /// client with the backend's status and body, scrubbed of every secret the gateway holds;
    /// a body too large, compressed or too slow to read is replaced by a generic one.
    async fn client_fault(
        &self,
        b: &Arc<Backend>,
        resp: reqwest::Response,
        mut meter: Meter,
        deadline: Instant,
    ) -> Response {
        let status = resp.status();
        let started = meter.started();
        let o = meter.observed();
        o.backend = Some(b.clone());
        o.status = status.as_u16();
        o.first_byte = Some(started.elapsed());
        o.complete = true;
        let mut out = Response::builder()
            .status(status)
            .extension(ServedBy(b.name.clone()));
        if let Some(h) = out.headers_mut() {
            copy_response_headers(resp.headers(), h, &b.secrets, false);
        }
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v != "identity");
        let idle = Duration::from_millis(b.config.timeouts.idle_ms);
        let body = match encoded {
            true => None,
            false => read_small_body(resp, deadline, idle).await,
        };
        let body = match body {
            Some(raw) => match b.secrets.scrub(&raw) {
                std::borrow::Cow::Borrowed(_) => raw,
                std::borrow::Cow::Owned(clean) => Bytes::from(clean),
            },
            None => {
                if let Some(h) = out.headers_mut() {
                    h.remove(header::CONTENT_ENCODING);
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                let api = tollgate_common::ApiError::new(
                    tollgate_common::ErrorKind::InvalidRequest,
                    format!("the backend rejected the request ({})", status.as_u16()),
                );
                Bytes::from(api.body())
            }
        };
        // The meter reports here: nothing more is read from this backend.
        drop(meter);
        out.body(Body::from(body)).unwrap_or_default()
    }
}

/// The meter of a request no backend served reports the status the client gets.
fn failed(mut meter: Meter, err: Error) -> Error {
    meter.observed().status = err.to_api().kind.status().as_u16();
    err
}

/// The whole body when it is at most [`MAX_ERROR_BODY`] and arrives before `deadline` with no
/// silence longer than `idle`.
async fn read_small_body(
    mut resp: reqwest::Response,
    deadline: Instant,
    idle: Duration,
) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    loop {
        let until = deadline.min(Instant::now() + idle);
        match tokio::time::timeout_at(until, resp.chunk()).await {
            Ok(Ok(Some(c))) if buf.len() + c.len() <= MAX_ERROR_BODY => buf.extend_from_slice(&c),
            Ok(Ok(None)) => return Some(buf.freeze()),
            _ => return None,
        }
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

/// `retry-after-ms`, else `retry-after` (seconds), from a backend response, in whole ms and
/// at most `max_ms`. A value that is not a finite number >= 0 (`inf`, `NaN`, a date) is
/// ignored.
pub fn retry_after_ms(h: &HeaderMap, max_ms: u64) -> Option<u64> {
    let num = |name: &str| -> Option<f64> {
        let v: f64 = h.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    let ms = match num("retry-after-ms") {
        Some(ms) => ms,
        None => num("retry-after")? * 1000.0,
    };
    // Compared as floats: `ms` may be far beyond u64 (1e300 s), or infinite after scaling.
    Some(if ms >= max_ms as f64 {
        max_ms
    } else {
        ms as u64
    })
}

/// `azure-openai-deployment-utilization` as a fraction (the header carries a percentage).
pub fn utilization(h: &HeaderMap) -> Option<f64> {
    let v = h
        .get("azure-openai-deployment-utilization")?
        .to_str()
        .ok()?;
    let n: f64 = v.trim().trim_end_matches('%').trim().parse().ok()?;
    (n.is_finite()).then_some(n / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// Retry hints are whole milliseconds, at most the configured maximum; values that are not
    /// finite numbers are ignored (the other header is used if it is sane).
    #[test]
    fn retry_after_is_bounded() {
        let max = 300_000;
        type Headers<'a> = &'a [(&'static str, &'static str)];
        let cases: [(Headers, Option<u64>); 10] = [
            (&[("retry-after", "2")], Some(2_000)),
            (&[("retry-after", "1.5")], Some(1_500)),
            (
                &[("retry-after-ms", "250"), ("retry-after", "9")],
                Some(250),
            ),
            (&[("retry-after", "999999999")], Some(max)),
            (&[("retry-after", "1e300")], Some(max)),
            (&[("retry-after-ms", "18446744073709551615")], Some(max)),
            (&[("retry-after", "inf")], None),
            (&[("retry-after", "NaN")], None),
            (
                &[("retry-after-ms", "-inf"), ("retry-after", "3")],
                Some(3_000),
            ),
            (&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], None),
        ];
        for (h, want) in cases {
            assert_eq!(retry_after_ms(&headers(h), max), want, "{h:?}");
        }
    }

    /// Every status has one meaning: success, saturation, refusal (never shown to the client),
    /// or the client's own fault.
    #[test]
    fn verdicts() {
        for (s, v) in [
            (200, Verdict::Serve),
            (204, Verdict::Serve),
            (301, Verdict::Refused),
            (302, Verdict::Refused),
            (307, Verdict::Refused),
            (308, Verdict::Refused),
            (400, Verdict::ClientFault),
            (401, Verdict::Refused),
            (403, Verdict::Refused),
            (404, Verdict::Refused),
            (408, Verdict::Saturated),
            (413, Verdict::ClientFault),
            (422, Verdict::ClientFault),
            (429, Verdict::Saturated),
            (500, Verdict::Saturated),
            (503, Verdict::Saturated),
        ] {
            assert_eq!(Verdict::of(StatusCode::from_u16(s).unwrap()), v, "{s}");
        }
    }
}

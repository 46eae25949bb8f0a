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
//! - [`answer`]: what a backend's answer means, and its hints.
//! - [`headers`]: which request headers go to a backend, which response headers come back.
//! - [`tap`]: the response body on its way back, bounded, settled however it ends.
//! - [`scan`]: reading usage and text from JSON bodies and event streams.

mod answer;
mod client;
mod headers;
mod scan;
mod tap;

pub use answer::{retry_after_ms, utilization};
pub use client::{Upstream, upstream};
pub use scan::{MAX_REPORTED_TOKENS, UsageFields};

use answer::Verdict;

use crate::credentials::Credential;
use crate::error::Error;
use crate::request::{ClientRequest, Operation, RouteStyle, rewrite_body};
use crate::routing::{Backend, Breakers, Candidate};
use crate::usage::Meter;
use axum::body::Body;
use axum::response::Response;
use headers::{copy_response_headers, forwarded_request_headers};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use scan::Mode;
use std::sync::Arc;
use std::time::Duration;
use tap::{Bounds, Tap};
use tokio::time::Instant;
use tollgate_common::config::BackendApi;

/// Most backends one request is sent to (the first try and its failovers).
pub const MAX_ATTEMPTS: usize = 4;

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

/// The forwarding context of one request.
pub struct Forward<'a> {
    pub client: &'a Upstream,
    pub breakers: &'a Arc<Breakers>,
    pub req: &'a ClientRequest,
    pub headers: &'a HeaderMap,
    pub request_id: &'a str,
    /// Where a successful answer is kept (a cache miss that may be stored).
    pub cache: Option<&'a crate::cache::Pending>,
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
    ) -> Result<(http::Response<Incoming>, bool, Instant), Failed> {
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
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = url;
        *request.headers_mut() = headers;
        let send = self.client.request(request);
        let resp = match tokio::time::timeout(first_byte, send).await {
            Err(_) => {
                self.breakers.failure(b, None, None, probe);
                return Err(Error::UpstreamTimeout.into());
            }
            Ok(Err(e)) => {
                self.breakers.failure(b, None, None, probe);
                let err = if timed_out(&e) {
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
        resp: http::Response<Incoming>,
        include_usage: bool,
        deadline: Instant,
        mut meter: Meter,
    ) -> Result<Response, (Failed, Meter)> {
        let status = resp.status();
        self.breakers.success(b, probe);
        if Verdict::of(status) == Verdict::ClientFault {
            return Ok(answer::client_fault(b, resp, meter, deadline).await);
        }
        if let Some(u) = utilization(resp.headers()) {
            self.breakers.utilization(b, u);
        }
        if resp
            .body()
            .size_hint()
            .exact()
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
        // Only a 200 is an answer worth keeping.
        let recorder = self
            .cache
            .filter(|_| status == StatusCode::OK)
            .map(|p| p.recorder(&b.name));
        let tap = Tap::new(resp.into_body(), mode, meter, bounds, recorder);
        Ok(out.body(Body::from_stream(tap)).unwrap_or_default())
    }
}

/// The meter of a request no backend served reports the status the client gets.
fn failed(mut meter: Meter, err: Error) -> Error {
    meter.observed().status = err.to_api().kind.status().as_u16();
    err
}

/// A transport error, described without its URL or any detail a backend could have echoed.
fn describe(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
}

/// The connect timeout (the connector's `connect_ms`), somewhere in the error's sources.
fn timed_out(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

//! What a backend's answer means: a success to stream, saturation (fail over, trip the
//! circuit), a refusal of the gateway itself (fail over, never shown to the client), or the
//! client's own fault (passed on, scrubbed of every secret the gateway holds); and the hints a
//! backend gives (`retry-after`, Azure's deployment utilization), read defensively.

use super::ServedBy;
use super::headers::copy_response_headers;
use crate::routing::Backend;
use crate::usage::Meter;
use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Largest error body from a backend passed on to a client; a larger one is replaced.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What a backend's status means for the request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
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
    pub(super) fn of(status: StatusCode) -> Verdict {
        match status.as_u16() {
            200..=299 => Verdict::Serve,
            408 | 429 | 500..=599 => Verdict::Saturated,
            401 | 403 | 404 => Verdict::Refused,
            400..=499 => Verdict::ClientFault,
            _ => Verdict::Refused,
        }
    }
}

/// A 4xx that is the client's own fault (a bad parameter, a content filter) reaches the
/// client with the backend's status and body, scrubbed of every secret the gateway holds;
/// a body too large, compressed or too slow to read is replaced by a generic one.
pub(super) async fn client_fault(
    b: &Arc<Backend>,
    resp: http::Response<Incoming>,
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

/// The whole body when it is at most [`MAX_ERROR_BODY`] and arrives before `deadline` with no
/// silence longer than `idle`.
async fn read_small_body(
    resp: http::Response<Incoming>,
    deadline: Instant,
    idle: Duration,
) -> Option<Bytes> {
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        let until = deadline.min(Instant::now() + idle);
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                let Ok(c) = frame.into_data() else { continue };
                if buf.len() + c.len() > MAX_ERROR_BODY {
                    return None;
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Some(buf.freeze()),
            _ => return None,
        }
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

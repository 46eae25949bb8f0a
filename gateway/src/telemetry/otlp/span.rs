//! The span of one request (continuing the client's `traceparent`, giving the backend and the
//! client the gateway's), W3C trace context in and out, and the sampler.

use super::export::Queue;
use super::wire::{Pb, Value};
use http::{HeaderMap, HeaderValue};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `SpanKind::SPAN_KIND_SERVER`.
const KIND_SERVER: u64 = 2;
/// `Status.code` `STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;
/// The W3C `sampled` trace flag.
const SAMPLED: u8 = 1;

/// The span of one request, from its start on the request path to its end in the usage worker
/// (or, for a request refused before it was metered, on the request path). Starting one is a
/// header parse and two random ids; nothing is recorded until it ends.
pub struct RequestSpan {
    pub(super) trace_id: [u8; 16],
    pub(super) span_id: [u8; 8],
    /// The client's span, when its `traceparent` was continued.
    pub(super) parent: Option<[u8; 8]>,
    /// W3C trace flags sent on (bit 0: sampled, i.e. exported).
    pub(super) flags: u8,
    /// The client's `tracestate`, kept on the exported span.
    pub(super) trace_state: Option<Box<str>>,
    pub(super) start: SystemTime,
    /// This span's `traceparent`, built once (the backend and the client both get it).
    header: HeaderValue,
    /// Where the span goes when it ends (`None`: not sampled, nothing is exported).
    pub(super) queue: Option<Arc<Queue>>,
}

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestSpan({})", self.trace_id())
    }
}

/// Which spans are exported: the standard `OTEL_TRACES_SAMPLER` (and `_ARG`) choices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Sampler {
    Always(bool),
    Ratio(f64),
    /// The parent's `sampled` flag when there is a parent, else the inner choice.
    ParentBased(Root),
}

/// The choice of a parent-based sampler for a trace's first span.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Root {
    Always(bool),
    Ratio(f64),
}

impl Sampler {
    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (default: parent-based, always
    /// on, as the OpenTelemetry SDKs do).
    pub(super) fn from_env() -> Sampler {
        // As the SDKs: unparsable means 1.0; below 0 (or NaN) samples nothing, above 1 all.
        let ratio = || {
            std::env::var("OTEL_TRACES_SAMPLER_ARG")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(1.0, |r| if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) })
        };
        match std::env::var("OTEL_TRACES_SAMPLER")
            .as_deref()
            .map(str::trim)
        {
            Ok("always_on") => Sampler::Always(true),
            Ok("always_off") => Sampler::Always(false),
            Ok("traceidratio") => Sampler::Ratio(ratio()),
            Ok("parentbased_always_off") => Sampler::ParentBased(Root::Always(false)),
            Ok("parentbased_traceidratio") => Sampler::ParentBased(Root::Ratio(ratio())),
            _ => Sampler::ParentBased(Root::Always(true)),
        }
    }

    fn sampled(self, trace_id: &[u8; 16], parent_flags: Option<u8>) -> bool {
        // The ratio test of the OpenTelemetry SDKs: the trace id's low 63 bits below the
        // ratio's share of 2^63, so every service sampling by ratio keeps the same traces.
        let by_ratio = |r: f64| {
            let low = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default()) >> 1;
            low < (r.max(0.0) * (1u64 << 63) as f64) as u64
        };
        match (self, parent_flags) {
            (Sampler::Always(on), _) => on,
            (Sampler::Ratio(r), _) => by_ratio(r),
            (Sampler::ParentBased(_), Some(f)) => f & SAMPLED != 0,
            (Sampler::ParentBased(Root::Always(on)), None) => on,
            (Sampler::ParentBased(Root::Ratio(r)), None) => by_ratio(r),
        }
    }
}

/// A parsed `traceparent`: trace id, parent span id, flags.
pub(super) type Parent = ([u8; 16], [u8; 8], u8);

/// Lowercase hex (W3C trace context allows no other) into `out`, exactly filled.
fn hex_into(s: &str, out: &mut [u8]) -> bool {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if s.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

/// A `tracestate` kept on the span: at most 32 members and 512 bytes of printable ASCII (the
/// W3C limits); anything else is dropped, as the OpenTelemetry SDKs do.
fn trace_state(v: &str) -> Option<Box<str>> {
    let ok = !v.is_empty()
        && v.len() <= 512
        && v.split(',').count() <= 32
        && v.bytes().all(|b| (0x20..0x7f).contains(&b));
    ok.then(|| Box::from(v))
}

/// The client's `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; later versions may append
/// fields), if well formed and neither id all zeros.
pub(super) fn parse_traceparent(headers: &HeaderMap) -> Option<Parent> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = v.split('-');
    let (ver, id, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let mut version = [0u8; 1];
    if !hex_into(ver, &mut version)
        || version[0] == 0xff
        || version[0] == 0 && parts.next().is_some()
    {
        return None;
    }
    let (mut t, mut s, mut f) = ([0u8; 16], [0u8; 8], [0u8; 1]);
    if !hex_into(id, &mut t) || !hex_into(span, &mut s) || !hex_into(flags, &mut f) {
        return None;
    }
    (t != [0; 16] && s != [0; 8]).then_some((t, s, f[0]))
}

impl RequestSpan {
    /// Starts a span now: a child of the client's `traceparent` when it sent a valid one.
    pub(super) fn start(headers: &HeaderMap, sampler: Sampler, queue: &Arc<Queue>) -> RequestSpan {
        let parent = parse_traceparent(headers);
        let trace_id = match parent {
            Some((t, ..)) => t,
            None => nonzero(rand::random()),
        };
        let sampled = sampler.sampled(&trace_id, parent.map(|p| p.2));
        let trace_state = parent
            .and_then(|_| headers.get("tracestate"))
            .and_then(|v| v.to_str().ok())
            .and_then(trace_state);
        let span_id = nonzero(rand::random());
        let mut tp = String::with_capacity(55);
        tp.push_str("00-");
        push_hex(&mut tp, &trace_id);
        tp.push('-');
        push_hex(&mut tp, &span_id);
        tp.push_str(if sampled { "-01" } else { "-00" });
        RequestSpan {
            trace_id,
            span_id,
            parent: parent.map(|p| p.1),
            flags: if sampled { SAMPLED } else { 0 },
            trace_state,
            start: SystemTime::now(),
            // Hex and dashes only: always a valid header value.
            header: HeaderValue::from_maybe_shared(bytes::Bytes::from(tp))
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            queue: sampled.then(|| queue.clone()),
        }
    }

    /// The W3C `traceparent` naming this span: sent to the backend and back to the client.
    pub fn traceparent(&self) -> HeaderValue {
        self.header.clone()
    }

    /// The trace id in hex, for the usage record.
    pub fn trace_id(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// Ends a span whose request failed before it was metered (auth, bad input, limits).
    pub fn fail(self, status: u16, code: &'static str) {
        self.end(
            &["gateway"],
            SystemTime::now(),
            Some(code).filter(|_| status >= 500),
            |m| {
                m.attr(9, "http.response.status_code", Value::Int(status.into()));
                m.attr(9, "error.type", Value::Str(code));
            },
        );
    }

    /// Ends the span at `end`: named `name` (its parts joined), an error status with `error` when set, and the
    /// attributes `attrs` writes (field 9 of the span).
    pub(super) fn end(
        mut self,
        name: &[&str],
        end: SystemTime,
        error: Option<&str>,
        attrs: impl FnOnce(&mut Pb<'_>),
    ) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        queue.push(|buf| {
            // ScopeSpans.spans (2): one Span.
            Pb(buf).message(2, |m| {
                m.bytes(1, &self.trace_id);
                m.bytes(2, &self.span_id);
                if let Some(ts) = &self.trace_state {
                    m.str(3, ts);
                }
                if let Some(p) = &self.parent {
                    m.bytes(4, p);
                }
                m.strs(5, name);
                m.varint(6, KIND_SERVER);
                m.fixed64(7, unix_nanos(self.start));
                m.fixed64(8, unix_nanos(end.max(self.start)));
                attrs(m);
                if let Some(msg) = error {
                    m.message(15, |s| {
                        s.str(2, msg);
                        s.varint(3, STATUS_ERROR);
                    });
                }
                // Trace flags, and whether the parent is remote (known: bit 8; remote: 9).
                let remote = if self.parent.is_some() { 0x300 } else { 0x100 };
                m.fixed32(16, u32::from(self.flags) | remote);
            });
        });
    }

    /// The span's ids for a log record: (trace id, span id, flags).
    pub(super) fn ids(&self) -> ([u8; 16], [u8; 8], u8) {
        (self.trace_id, self.span_id, self.flags)
    }

    /// The span's start plus `d`.
    pub(super) fn after(&self, d: Duration) -> SystemTime {
        self.start + d
    }
}

/// A span dropped without being ended (its request was cancelled before it was metered, or its
/// usage record was dropped) is still exported, as the SDK's spans were: named `gateway`, with
/// `error.type = cancelled`.
impl Drop for RequestSpan {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let span = RequestSpan {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            flags: self.flags,
            trace_state: self.trace_state.take(),
            start: self.start,
            header: self.header.clone(),
            queue: Some(queue),
        };
        span.end(&["gateway"], SystemTime::now(), None, |m| {
            m.attr(9, "error.type", Value::Str("cancelled"));
        });
    }
}

/// Nanoseconds since the Unix epoch.
pub(super) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

/// Random ids are never all zeros (an invalid id in W3C trace context).
fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id.iter().all(|b| *b == 0) {
        id[N - 1] = 1;
    }
    id
}

pub(super) fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(tp).unwrap());
        h
    }

    /// W3C parsing: the ids and flags of a valid header; invalid versions, zero ids, bad hex
    /// and extra fields on version 00 are ignored (a new trace starts).
    #[test]
    fn traceparent_parsing() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, f) = parse_traceparent(&headers(ok)).unwrap();
        assert_eq!(t[0], 0x4b);
        assert_eq!(s[7], 0xb7);
        assert_eq!(f, 1);
        // A later version may carry more fields.
        assert!(parse_traceparent(&headers(&format!("01{}-extra", &ok[2..]))).is_some());
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(&headers(bad)).is_none(), "{bad}");
        }
    }

    /// A `tracestate` within the W3C limits is kept; an oversized or odd one is dropped.
    #[test]
    fn trace_state_limits() {
        assert_eq!(trace_state("a=1,b=2").as_deref(), Some("a=1,b=2"));
        assert!(trace_state("").is_none());
        assert!(trace_state(&"x".repeat(513)).is_none());
        assert!(trace_state(&vec!["k=v"; 33].join(",")).is_none());
        assert!(trace_state("a=\u{7f}").is_none());
    }

    /// A span dropped before it was ended is exported once, as cancelled; an ended one once.
    #[test]
    fn dropped_spans_are_exported_once() {
        let q = Queue::for_tests();
        let s = RequestSpan::start(&HeaderMap::new(), Sampler::Always(true), &q);
        drop(s);
        let s = RequestSpan::start(&HeaderMap::new(), Sampler::Always(true), &q);
        s.fail(401, "invalid_api_key");
        assert_eq!(q.queued(), 2);
    }

    /// Parent-based sampling follows the parent's flag; the ratio sampler keeps about its
    /// share of random traces, and the same decision for the same trace id.
    #[test]
    fn sampling() {
        let id = [7u8; 16];
        let pb = Sampler::ParentBased(Root::Always(true));
        assert!(pb.sampled(&id, None));
        assert!(pb.sampled(&id, Some(1)));
        assert!(!pb.sampled(&id, Some(0)));
        assert!(!Sampler::Always(false).sampled(&id, Some(1)));
        let r = Sampler::Ratio(0.25);
        let kept = (0..20_000)
            .filter(|_| r.sampled(&rand::random(), None))
            .count();
        assert!((4_000..6_000).contains(&kept), "{kept}");
        assert_eq!(r.sampled(&id, None), r.sampled(&id, None));
        assert!(!Sampler::Ratio(0.0).sampled(&id, None));
        assert!(Sampler::Ratio(1.0).sampled(&[0xff; 16], None));
    }

    /// The span's traceparent continues the client's trace with the span's own id and the
    /// sampling decision; an unsampled parent's trace is followed but not exported.
    #[test]
    fn continues_the_clients_trace() {
        let q = Queue::for_tests();
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let s = RequestSpan::start(&headers(ok), Sampler::ParentBased(Root::Always(true)), &q);
        let tp = s.traceparent();
        let tp = tp.to_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            tp.ends_with("-01") && !tp.contains("00f067aa0ba902b7"),
            "{tp}"
        );
        assert!(s.queue.is_some());
        let off = ok.replace("-01", "-00");
        let s = RequestSpan::start(&headers(&off), Sampler::ParentBased(Root::Always(true)), &q);
        assert!(s.traceparent().to_str().unwrap().ends_with("-00"));
        assert!(s.queue.is_none(), "not sampled: nothing to export");
        let fresh = RequestSpan::start(&HeaderMap::new(), Sampler::Always(true), &q);
        assert_eq!(fresh.parent, None);
        assert_eq!(fresh.trace_id().len(), 32);
    }
}

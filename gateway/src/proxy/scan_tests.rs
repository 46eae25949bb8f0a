use super::*;
use crate::record::Observed;

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
    let mut obs = Observed::default();
    let mut s = scan(64);
    assert_eq!(s.feed(b"data: {\"a\":1}\n", &mut obs).unwrap(), None);
    let out = s.feed(b"\ndata: {\"b\"", &mut obs).unwrap().unwrap();
    assert_eq!(&out[..], b"data: {\"a\":1}\n\n");
    let out = s.feed(b":2}\r\n\r\n", &mut obs).unwrap().unwrap();
    assert_eq!(&out[..], b"data: {\"b\":2}\r\n\r\n");
    assert!(s.feed(&[b'x'; 40], &mut obs).unwrap().is_none());
    assert!(s.feed(&[b'x'; 40], &mut obs).is_err());
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

/// Comments and other fields pass through untouched; text is collected from deltas; the
/// usage-only chunk the gateway asked for is hidden from a client that did not ask, and its
/// usage read; `[DONE]` passes.
#[test]
fn sse_usage_chunk_and_text() {
    let mut obs = Observed::default();
    let mut s = SseScan {
        hide_usage_chunk: true,
        ..scan(1 << 20)
    };
    let input = concat!(
        ": keep-alive\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n"
    );
    let out = s.feed(input.as_bytes(), &mut obs).unwrap().unwrap();
    let out = std::str::from_utf8(&out).unwrap();
    assert!(out.starts_with(": keep-alive\n\n"), "{out}");
    assert!(!out.contains("usage"), "the hidden chunk went out: {out}");
    assert!(out.ends_with("data: [DONE]\n\n"));
    assert_eq!(obs.text, "Hello");
    assert_eq!(obs.reported.map(|u| (u.input, u.output)), Some((7, 2)));
    // A client that asked for usage gets the chunk.
    let mut s = scan(1 << 20);
    let chunk = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
    let out = s.feed(chunk.as_bytes(), &mut obs).unwrap().unwrap();
    assert_eq!(&out[..], chunk.as_bytes());
}

/// A trailing event without its blank line is inspected and passed on at the end; a
/// Responses stream reports usage in `response.completed`.
#[test]
fn trailing_event_and_responses_usage() {
    let mut obs = Observed::default();
    let mut s = SseScan {
        op: Operation::Responses,
        ..scan(1 << 20)
    };
    let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
    assert!(s.feed(delta.as_bytes(), &mut obs).unwrap().is_some());
    let done = "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}";
    assert!(s.feed(done.as_bytes(), &mut obs).unwrap().is_none());
    let tail = s.finish(&mut obs).unwrap();
    assert_eq!(&tail[..], done.as_bytes());
    assert_eq!(obs.text, "Hi");
    assert_eq!(obs.reported.map(|u| (u.input, u.output)), Some((3, 1)));
    assert!(s.finish(&mut obs).is_none());
}

/// A JSON body's usage is read at its end; without usage its text is kept for counting;
/// a large body's usage is found in its tail.
#[test]
fn json_usage_and_text() {
    let mut obs = Observed::default();
    let mut j = JsonScan::default();
    j.feed(br#"{"choices":[{"message":{"content":"Hello there"}}]}"#);
    j.finish(&mut obs);
    assert_eq!((obs.text.as_str(), obs.reported), ("Hello there", None));
    let mut obs = Observed::default();
    let mut j = JsonScan::default();
    let mut big = br#"{"data":[""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 2 << 20));
    big.extend_from_slice(br#""],"usage":{"prompt_tokens":42,"total_tokens":42}}"#);
    for c in big.chunks(64 * 1024) {
        j.feed(c);
    }
    j.finish(&mut obs);
    assert_eq!(obs.reported.map(|u| u.input), Some(42));
}

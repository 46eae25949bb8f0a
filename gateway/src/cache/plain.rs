//! The entry kept for a plain JSON answer, without building its tree. Most answers a cache
//! stores are plain: no escapes, no content filter that fired. For those, a typed read that
//! borrows from the bytes checks what [`Stored::from_json`] checks (one complete choice or a
//! completed response, the usage), and the entry is written around the backend's bytes as they
//! came: what [`Stored::to_bytes`] would give, up to the body's whitespace and key order, and
//! read back by [`Stored::from_bytes`] the same way. Anything the typed read cannot decide for
//! certain (an escape anywhere, a `"filtered": true` anywhere, a value of an unexpected type, a
//! repeated key) goes the general way, so both ways keep and refuse the same answers.

use super::answer::Stored;
use crate::request::Operation;
use serde::{Deserialize, Deserializer};
use std::io::Write as _;

/// The entry [`Stored::from_json`] + [`Stored::to_bytes`] would keep, if any.
pub fn entry(op: Operation, backend: &str, body: &[u8]) -> Option<Vec<u8>> {
    match read(op, body) {
        Read::Keep {
            input,
            output,
            cached,
        } => Some(write(backend, input, output, cached, body)),
        Read::Refuse => None,
        Read::Unsure => Stored::from_json(op, backend, body).map(|s| s.to_bytes()),
    }
}

/// What the typed read decided.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Keep the answer, with this usage.
    Keep {
        input: u64,
        output: u64,
        cached: u64,
    },
    /// `from_json` would refuse it too.
    Refuse,
    /// Not certain: ask `from_json`.
    Unsure,
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(borrow, default)]
    status: Option<&'a str>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    finish_reason: Option<&'a str>,
}

/// The usage as `from_json` reads it. Not `proxy::scan::UsageFields`, which reads the same
/// fields for billing with other rules: it falls back to `input_tokens_details` when
/// `prompt_tokens_details` is `null`, derives the output from `total_tokens`, and takes a
/// chat answer's input from `input_tokens`; the stored entry must keep exactly what
/// `from_json` keeps.
#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    /// Absent (`None`), `null` (`Some(None)`) or details: `from_json` takes the first of the
    /// two that is present, even when it is `null`.
    #[serde(default, deserialize_with = "present")]
    prompt_tokens_details: Option<Option<Details>>,
    #[serde(default, deserialize_with = "present")]
    input_tokens_details: Option<Option<Details>>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Details>>, D::Error> {
    Option::<Details>::deserialize(d).map(Some)
}

fn read(op: Operation, body: &[u8]) -> Read {
    if op == Operation::Embeddings {
        return Read::Refuse;
    }
    // A struct reads from a JSON array too; the answer must be an object.
    if body.trim_ascii_start().first() != Some(&b'{') || memchr::memchr(b'\\', body).is_some() {
        return Read::Unsure;
    }
    if fired_filter(body) {
        return Read::Unsure;
    }
    let Ok(a) = serde_json::from_slice::<Answer>(body) else {
        return Read::Unsure;
    };
    match op {
        Operation::Chat | Operation::Completions => {
            let choices = a.choices.unwrap_or_default();
            let finish = choices.first().and_then(|c| c.finish_reason);
            if choices.len() != 1 || matches!(finish, None | Some("content_filter")) {
                return Read::Refuse;
            }
        }
        Operation::Responses if a.status != Some("completed") => return Read::Refuse,
        _ => {}
    }
    let Some(u) = a.usage else {
        return Read::Refuse;
    };
    let (input, output) = match op {
        Operation::Responses => match (u.input_tokens, u.output_tokens) {
            (Some(i), Some(o)) => (i, o),
            _ => return Read::Refuse,
        },
        _ => match u.prompt_tokens {
            Some(i) => (i, u.completion_tokens.unwrap_or(0)),
            None => return Read::Refuse,
        },
    };
    let details = match u.prompt_tokens_details {
        Some(d) => d,
        None => u.input_tokens_details.flatten(),
    };
    let cached = details.and_then(|d| d.cached_tokens).unwrap_or(0);
    Read::Keep {
        input,
        output,
        cached,
    }
}

/// Whether some `"filtered"` key (there are no escapes: every such run of bytes is a key or a
/// whole string) is followed by `true`.
fn fired_filter(body: &[u8]) -> bool {
    const KEY: &[u8] = b"\"filtered\"";
    memchr::memmem::find_iter(body, KEY).any(|at| {
        let rest = body[at + KEY.len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"true"))
    })
}

/// `{"backend":…,"input":…,"output":…,"cached":…,"body":<the bytes>}`, the field order of
/// [`Stored`]'s own serialization.
fn write(backend: &str, input: u64, output: u64, cached: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + backend.len() + 96);
    out.extend_from_slice(b"{\"backend\":");
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, backend);
    let _ = write!(
        out,
        ",\"input\":{input},\"output\":{output},\"cached\":{cached},\"body\":"
    );
    out.extend_from_slice(body.trim_ascii());
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn keep(input: u64, output: u64, cached: u64) -> Read {
        Read::Keep {
            input,
            output,
            cached,
        }
    }

    fn fields(s: &Stored) -> (String, u64, u64, u64, Value) {
        (
            s.backend.clone(),
            s.input,
            s.output,
            s.cached,
            s.body.clone(),
        )
    }

    /// Both ways keep the same answers, the same way, and refuse the same ones.
    fn same(op: Operation, body: &[u8]) -> Option<(String, u64, u64, u64, Value)> {
        let general = Stored::from_json(op, "ptu \"a\"", body).map(|s| s.to_bytes());
        let plain = entry(op, "ptu \"a\"", body);
        let read = |b: &Option<Vec<u8>>| {
            b.as_ref()
                .map(|b| fields(&Stored::from_bytes(b).expect("an entry reads back")))
        };
        assert_eq!(
            read(&plain),
            read(&general),
            "{}",
            String::from_utf8_lossy(body)
        );
        read(&plain)
    }

    fn chat(extra: Value) -> Vec<u8> {
        let mut b = json!({"id": "x", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                "finish_reason": "stop", "content_filter_results": {"hate": {"filtered": false}}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 2}}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        serde_json::to_vec_pretty(&b).unwrap()
    }

    #[test]
    fn plain_answers_are_kept_as_they_came() {
        let body = chat(json!({}));
        assert_eq!(read(Operation::Chat, &body), keep(9, 4, 2), "the quick way");
        let (backend, input, output, cached, v) = same(Operation::Chat, &body).unwrap();
        assert_eq!(
            (backend.as_str(), input, output, cached),
            ("ptu \"a\"", 9, 4, 2)
        );
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
        let resp = json!({"id": "resp_1", "object": "response", "status": "completed", "output": [],
            "usage": {"input_tokens": 5, "output_tokens": 6, "input_tokens_details": {"cached_tokens": 1}}});
        let resp = resp.to_string().into_bytes();
        assert_eq!(read(Operation::Responses, &resp), keep(5, 6, 1));
        assert!(same(Operation::Responses, &resp).is_some());
    }

    #[test]
    fn refusals_match_the_general_way() {
        let refused = [
            chat(json!({"choices": []})),
            chat(json!({"choices": [{"finish_reason": "content_filter"}]})),
            chat(json!({"choices": [{"finish_reason": null}]})),
            chat(json!({"choices": [{"finish_reason": "stop"}, {"finish_reason": "stop"}]})),
            chat(json!({"choices": null})),
            chat(json!({"usage": null})),
            chat(json!({"usage": {"completion_tokens": 1}})),
        ];
        for b in &refused {
            assert_eq!(
                read(Operation::Chat, b),
                Read::Refuse,
                "{}",
                String::from_utf8_lossy(b)
            );
            assert!(same(Operation::Chat, b).is_none());
        }
        let incomplete =
            br#"{"status": "incomplete", "usage": {"input_tokens": 1, "output_tokens": 1}}"#;
        assert_eq!(read(Operation::Responses, incomplete), Read::Refuse);
        assert!(same(Operation::Responses, incomplete).is_none());
        assert!(same(Operation::Embeddings, &chat(json!({}))).is_none());
    }

    #[test]
    fn what_the_typed_read_cannot_decide_goes_the_general_way() {
        let general = [
            // A filter that fired, at any depth (refused either way).
            chat(json!({"prompt_filter_results": [{"content_filter_results": {"sexual": {"filtered": true}}}]})),
            // A repeated key: the general way takes the last one.
            br#"{"choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}"#.to_vec(),
            // An escape: a key spelled with one, text with one.
            br#"{"choices": [{"finish_reason": "stop", "message": {"content": "a \"b\""}}], "usage": {"prompt_tokens": 1}}"#.to_vec(),
            br#"{"choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 1}, "x": {"filt\u0065red": true}}"#.to_vec(),
            // Types the typed read does not take: the general way reads them as absent.
            chat(json!({"usage": {"prompt_tokens": 3, "completion_tokens": 1.5}})),
            chat(json!({"usage": {"prompt_tokens": 3, "prompt_tokens_details": 7}})),
            chat(json!({"choices": [{"finish_reason": 1}]})),
            chat(json!({"choices": "none"})),
            br#"[{"finish_reason": "stop"}, null, {"prompt_tokens": 1}]"#.to_vec(),
        ];
        for b in &general {
            assert_eq!(
                read(Operation::Chat, b),
                Read::Unsure,
                "{}",
                String::from_utf8_lossy(b)
            );
            same(Operation::Chat, b);
        }
        // `null` details are taken as they are, not skipped for the other field.
        let null_details = chat(
            json!({"usage": {"prompt_tokens": 3, "prompt_tokens_details": null,
            "input_tokens_details": {"cached_tokens": 2}}}),
        );
        assert_eq!(same(Operation::Chat, &null_details).unwrap().3, 0);
        let unfired = chat(json!({"x": {"filtered" : false}, "y": "filtered"}));
        assert_eq!(read(Operation::Chat, &unfired), keep(9, 4, 2));
        same(Operation::Chat, &unfired);
    }
}

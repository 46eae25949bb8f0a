//! Exact token arithmetic for the mock: how many prompt tokens a request carries and a
//! completion text of exactly `n` tokens, both under tiktoken's `o200k_base` encoding.
//!
//! The gateway estimates tokens before forwarding and settles on the `usage` the backend
//! reports; tests compare the two, so the mock's numbers must be reproducible from the request
//! alone. [`count_prompt_tokens`] is that rule, exported so tests compute expected values the
//! same way the mock does.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// Framing tokens OpenAI adds around each chat message (`<|start|>role ... <|end|>`).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Framing tokens that prime the assistant's reply once per chat request.
pub const TOKENS_PER_REPLY: u64 = 3;

/// Words that are each exactly one `o200k_base` token, leading space included; any run of them
/// is as many tokens as words (checked by a unit test).
const WORDS: [&str; 5] = [" hello", " world", " the", " quick", " fox"];

/// The `o200k_base` encoder, loaded once per process by tiktoken-rs.
fn encoder() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

/// Tokens of `text` under `o200k_base` (special-token text is counted as ordinary text).
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoder().encode_ordinary(text).len() as u64
}

/// The text of `o200k_base` token ids (invalid UTF-8 replaced); `None` when an id is not a
/// token.
pub(crate) fn decode(ids: &[u32]) -> Option<String> {
    let bytes = encoder().decode_bytes(ids).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The `o200k_base` token ids of `text`.
#[cfg(test)]
pub(crate) fn encode(text: &str) -> Vec<u32> {
    encoder().encode_ordinary(text)
}

/// The one-token word at position `i` of the completion text.
pub fn word(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

/// A text of exactly `n` `o200k_base` tokens: `" hello world the quick fox hello ..."`.
pub fn completion_text(n: u64) -> String {
    let mut text = String::with_capacity(n as usize * 7);
    for i in 0..n {
        text.push_str(word(i));
    }
    text
}

/// Prompt tokens of an OpenAI / Azure OpenAI request body, the number the mock reports as
/// `usage.prompt_tokens` (`input_tokens` for the Responses API). The rule, by field:
///
/// - `messages` (chat): for each message, the tokens of its `content` (a string, or the
///   concatenated `text` of its array parts, plus each image part at GPT-4o's tile cost: a
///   `data:` image by its size, a link as 1024×1024, `detail: low` 85) plus
///   [`TOKENS_PER_MESSAGE`]; plus [`TOKENS_PER_REPLY`] once. Roles, names and tool calls are
///   not counted.
/// - `tools` / `functions`: OpenAI's rendering of function definitions, as the OpenAI
///   cookbook counts it for GPT-4o (7 per function, its `name:description`, 3 + per property
///   3 and `name:type:description`, enum items 3 each, 12 at the end).
/// - `response_format` with a `json_schema`: the tokens of the schema's compact JSON.
/// - `prompt` (completions): tokens of the string, or the sum over an array of strings;
///   token-id arrays count their length.
/// - `input` (embeddings, responses): a string counts its tokens; an array sums its items,
///   where a string counts its tokens, a number counts 1 (one token id), an array of numbers
///   counts its length, and a message object counts like a chat message (content + 3); an
///   array holding any message object adds [`TOKENS_PER_REPLY`] once.
/// - `instructions` (responses): tokens of the string, added as is.
///
/// Only the first of `messages` / `prompt` / `input` that is present is used.
pub fn count_prompt_tokens(body: &Value) -> u64 {
    let instructions = body
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, count_tokens);
    let main = if let Some(messages) = body.get("messages") {
        count_messages(messages.as_array().map_or(&[][..], Vec::as_slice))
    } else if let Some(prompt) = body.get("prompt") {
        count_input(prompt)
    } else if let Some(input) = body.get("input") {
        count_input(input)
    } else {
        0
    };
    main + instructions + count_tools(body) + count_schema(body)
}

/// Function definitions as OpenAI renders them into the prompt (the cookbook's rule).
fn count_tools(body: &Value) -> u64 {
    let mut functions: Vec<&Value> = Vec::new();
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        functions.extend(tools.iter().filter_map(|t| t.get("function")));
    }
    if let Some(f) = body.get("functions").and_then(Value::as_array) {
        functions.extend(f);
    }
    if functions.is_empty() {
        return 0;
    }
    let mut total: i64 = 12;
    for f in functions {
        total += 7;
        total += count_tokens(&format!(
            "{}:{}",
            text(f.get("name")),
            text(f.get("description"))
        )) as i64;
        let props = f
            .pointer("/parameters/properties")
            .and_then(Value::as_object);
        if let Some(props) = props.filter(|p| !p.is_empty()) {
            total += 3;
            for (name, p) in props {
                total += 3;
                if let Some(items) = p.get("enum").and_then(Value::as_array) {
                    total -= 3;
                    for item in items {
                        total += 3 + count_tokens(item.as_str().unwrap_or("")) as i64;
                    }
                }
                let line = format!(
                    "{name}:{}:{}",
                    text(p.get("type")),
                    text(p.get("description"))
                );
                total += count_tokens(&line) as i64;
            }
        }
    }
    total.max(0) as u64
}

/// A definition's text field, without a trailing period (as OpenAI renders it).
fn text(v: Option<&Value>) -> &str {
    v.and_then(Value::as_str)
        .unwrap_or("")
        .trim_end_matches('.')
}

/// A `response_format` JSON schema: its compact JSON.
fn count_schema(body: &Value) -> u64 {
    body.pointer("/response_format/json_schema/schema")
        .map_or(0, |s| count_tokens(&s.to_string()))
}

/// GPT-4o's cost of one image part: 85 + 170 per 512-px tile after fitting in 2048 px and
/// scaling the short side to 768; a link (not fetched here) counts as 1024×1024.
fn count_image(part: &Value) -> u64 {
    let (url, detail) = match part.get("image_url") {
        Some(Value::Object(o)) => (o.get("url"), o.get("detail")),
        other => (other, part.get("detail")),
    };
    if detail.and_then(Value::as_str) == Some("low") {
        return 85;
    }
    let size = url
        .and_then(Value::as_str)
        .and_then(|u| u.strip_prefix("data:"))
        .and_then(|u| u.split_once(',').map(|(_, d)| d))
        .and_then(|d| {
            use base64::Engine as _;
            let take = (d.len() / 4 * 4).min(8192);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&d.as_bytes()[..take])
                .ok()?;
            let s = imagesize::blob_size(&bytes).ok()?;
            Some((s.width as f64, s.height as f64))
        });
    let (mut w, mut h) = size.unwrap_or((1024.0, 1024.0));
    if w > 2048.0 || h > 2048.0 {
        let s = 2048.0 / w.max(h);
        (w, h) = (w * s, h * s);
    }
    if w.min(h) > 768.0 {
        let s = 768.0 / w.min(h);
        (w, h) = (w * s, h * s);
    }
    85 + 170 * ((w / 512.0).ceil() * (h / 512.0).ceil()) as u64
}

fn count_messages(messages: &[Value]) -> u64 {
    let content: u64 = messages.iter().map(count_message).sum();
    content + TOKENS_PER_REPLY
}

fn count_message(message: &Value) -> u64 {
    let content = match message.get("content") {
        Some(Value::String(text)) => count_tokens(text),
        Some(Value::Array(parts)) => {
            let text: String = parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect();
            let images: u64 = parts
                .iter()
                .filter(|p| {
                    matches!(
                        p.get("type").and_then(Value::as_str),
                        Some("image_url" | "input_image")
                    )
                })
                .map(count_image)
                .sum();
            count_tokens(&text) + images
        }
        _ => 0,
    };
    content + TOKENS_PER_MESSAGE
}

fn count_input(input: &Value) -> u64 {
    match input {
        Value::String(text) => count_tokens(text),
        Value::Array(items) => {
            let mut total = 0;
            let mut has_messages = false;
            for item in items {
                total += match item {
                    Value::String(text) => count_tokens(text),
                    Value::Number(_) => 1,
                    Value::Array(ids) => ids.len() as u64,
                    Value::Object(_) => {
                        has_messages = true;
                        count_message(item)
                    }
                    _ => 0,
                };
            }
            total + if has_messages { TOKENS_PER_REPLY } else { 0 }
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every completion word is one token, and `completion_text(n)` is exactly `n` tokens.
    #[test]
    fn completion_text_is_n_tokens() {
        for w in WORDS {
            assert_eq!(count_tokens(w), 1, "{w:?} is not a single token");
        }
        for n in [0, 1, 2, 5, 16, 17, 100, 1000] {
            assert_eq!(count_tokens(&completion_text(n)), n, "n = {n}");
        }
    }

    /// Chat framing adds 3 per message and 3 per request; array parts count their text.
    #[test]
    fn chat_rule_counts_framing_and_parts() {
        let text = completion_text(10);
        let body = json!({"messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": [{"type": "text", "text": completion_text(4)},
                                         {"type": "text", "text": completion_text(3)}]},
        ]});
        assert_eq!(count_prompt_tokens(&body), 10 + 3 + 7 + 3 + 3);
    }

    /// Tools bill by the cookbook's rendering; images by tiles.
    #[test]
    fn tools_and_images_bill() {
        let tools = json!([{"type":"function","function":{"name":"f","description":"Do it.",
            "parameters":{"type":"object","properties":{"x":{"type":"string","description":"An x.",
            "enum":["a","b"]}}}}}]);
        let body = json!({"messages": [], "tools": tools});
        let expected = 12 + 7 + count_tokens("f:Do it") + 3 + 3 - 3
            + (3 + 1) * 2
            + count_tokens("x:string:An x");
        assert_eq!(count_prompt_tokens(&body), expected + TOKENS_PER_REPLY);
        let image = json!({"messages": [{"role":"user","content":[
            {"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]});
        assert_eq!(count_prompt_tokens(&image), 765 + 3 + 3);
    }

    /// Embedding inputs count strings by tokens and token-id arrays by length.
    #[test]
    fn input_rule_counts_strings_and_ids() {
        assert_eq!(
            count_prompt_tokens(&json!({"input": completion_text(5)})),
            5
        );
        assert_eq!(
            count_prompt_tokens(&json!({"input": [completion_text(2), completion_text(3)]})),
            5
        );
        assert_eq!(count_prompt_tokens(&json!({"input": [[1, 2, 3], [4]]})), 4);
        assert_eq!(count_prompt_tokens(&json!({"input": [1, 2, 3]})), 3);
        let responses = json!({"instructions": completion_text(2),
                               "input": [{"role": "user", "content": completion_text(4)}]});
        assert_eq!(count_prompt_tokens(&responses), 2 + 4 + 3 + 3);
    }
}

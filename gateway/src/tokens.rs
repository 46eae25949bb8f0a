//! Token counting with tiktoken: estimates for the reservation and the fallback count when a
//! backend reports no usage. The encoder (o200k_base, the GPT-4o family's) is loaded once at
//! start-up; text above [`BLOCKING_THRESHOLD`] bytes is tokenized on the blocking pool so a
//! 100k-token prompt never stalls the runtime.

use serde::Deserialize;
use serde_json::value::RawValue;
use tiktoken_rs::CoreBPE;

/// Above this many bytes of text, tokenizing moves to `spawn_blocking`.
pub const BLOCKING_THRESHOLD: usize = 8 * 1024;

/// Tokens OpenAI adds per chat message (role and framing) and once per reply.
const PER_MESSAGE: u64 = 3;
const PER_REPLY: u64 = 3;

/// The loaded encoder.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    bpe: &'static CoreBPE,
}

impl Tokenizer {
    /// Loads the encoder (once per process; later calls are free).
    pub fn load() -> Tokenizer {
        Tokenizer {
            bpe: tiktoken_rs::o200k_base_singleton(),
        }
    }

    /// Tokens in `text`, inline (for short text).
    pub fn count(&self, text: &str) -> u64 {
        self.bpe.count_ordinary(text) as u64
    }

    /// Tokens in the pieces, off the runtime when they are large.
    pub async fn count_pieces(&self, pieces: Vec<String>, framing: u64) -> u64 {
        let size: usize = pieces.iter().map(|p| p.len()).sum();
        let me = *self;
        let work = move || pieces.iter().map(|p| me.count(p)).sum::<u64>() + framing;
        if size > BLOCKING_THRESHOLD {
            tokio::task::spawn_blocking(work)
                .await
                .unwrap_or(size as u64 / 3)
        } else {
            work()
        }
    }
}

/// The text of a prompt, gathered from a request body, and the framing tokens around it.
#[derive(Debug, Default)]
pub struct PromptText {
    pub pieces: Vec<String>,
    pub framing: u64,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    name: Option<String>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

fn content_text(raw: Option<&RawValue>, out: &mut Vec<String>) {
    let Some(raw) = raw else { return };
    match serde_json::from_str::<Content>(raw.get()) {
        Ok(Content::Text(s)) => out.push(s),
        Ok(Content::Parts(parts)) => out.extend(parts.into_iter().filter_map(|p| p.text)),
        _ => {}
    }
}

impl PromptText {
    /// Chat `messages`: every message's text, 3 tokens of framing each, 3 for the reply.
    pub fn from_messages(raw: &RawValue) -> Result<PromptText, String> {
        let msgs: Vec<Message<'_>> = serde_json::from_str(raw.get())
            .map_err(|_| "'messages' must be an array of message objects".to_string())?;
        let mut out = PromptText {
            pieces: Vec::with_capacity(msgs.len()),
            framing: PER_REPLY,
        };
        for m in &msgs {
            out.framing += PER_MESSAGE;
            content_text(m.content, &mut out.pieces);
            if let Some(n) = &m.name {
                out.pieces.push(n.clone());
                out.framing += 1;
            }
            if let Some(t) = m.tool_calls {
                out.pieces.push(t.get().to_string());
            }
        }
        Ok(out)
    }

    /// A completions `prompt`, an embeddings or responses `input`: a string, an array of
    /// strings, token arrays, or (responses) message items.
    pub fn from_input(raw: &RawValue) -> PromptText {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Input<'a> {
            Text(String),
            Texts(Vec<String>),
            TokenIds(Vec<u32>),
            TokenArrays(Vec<Vec<u32>>),
            #[serde(borrow)]
            Items(Vec<Item<'a>>),
            Other(serde::de::IgnoredAny),
        }
        #[derive(Deserialize)]
        struct Item<'a> {
            #[serde(borrow, default)]
            content: Option<&'a RawValue>,
        }
        let mut out = PromptText::default();
        match serde_json::from_str::<Input<'_>>(raw.get()) {
            Ok(Input::Text(s)) => out.pieces.push(s),
            Ok(Input::Texts(v)) => out.pieces = v,
            Ok(Input::TokenIds(v)) => out.framing = v.len() as u64,
            Ok(Input::TokenArrays(v)) => out.framing = v.iter().map(|a| a.len() as u64).sum(),
            Ok(Input::Items(items)) => {
                for it in items {
                    out.framing += PER_MESSAGE;
                    content_text(it.content, &mut out.pieces);
                }
            }
            _ => out.pieces.push(raw.get().to_string()),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chat framing follows OpenAI's rule: 3 per message + 3 for the reply.
    #[tokio::test]
    async fn chat_prompt_count() {
        let t = Tokenizer::load();
        let raw: Box<RawValue> = serde_json::from_str(
            r#"[{"role":"system","content":"You are terse."},
                {"role":"user","content":[{"type":"text","text":"hello world"}]}]"#,
        )
        .unwrap();
        let p = PromptText::from_messages(&raw).unwrap();
        let n = t.count_pieces(p.pieces, p.framing).await;
        assert_eq!(n, t.count("You are terse.") + t.count("hello world") + 9);
    }

    /// A large prompt is counted off the runtime, with the same result.
    #[tokio::test]
    async fn large_prompt_same_count() {
        let t = Tokenizer::load();
        let big = "lorem ipsum dolor sit amet ".repeat(2000);
        assert_eq!(t.count_pieces(vec![big.clone()], 0).await, t.count(&big));
    }

    /// Embedding inputs in every accepted shape.
    #[test]
    fn input_shapes() {
        let raw: Box<RawValue> = serde_json::from_str("[[1,2,3],[4,5]]").unwrap();
        assert_eq!(PromptText::from_input(&raw).framing, 5);
        let raw: Box<RawValue> = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert_eq!(PromptText::from_input(&raw).pieces, vec!["a", "b"]);
    }
}

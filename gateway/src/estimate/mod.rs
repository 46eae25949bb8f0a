//! The reservation estimate: every input a backend bills, counted or conservatively
//! over-estimated, before the request is admitted. Text is tokenized (message text, names, tool
//! calls); definitions and schemas the backend renders into the prompt (`tools`, `functions`,
//! `response_format`, the Responses `text.format`, `prediction`) are tokenized as the JSON the
//! client sent, which is never shorter than what the backend renders; images cost their
//! documented tiles (the most a request could cost when the size cannot be read from the data
//! itself: an `image_url` is never fetched); audio and files are priced from their size; and
//! anything not understood counts as its raw JSON. `docs/ESTIMATE.md` tabulates each form next
//! to what the backend bills.
//!
//! What cannot be classified is refused with a 400 before anything is reserved: `messages`
//! that are not a list of message objects, content that is not a string, a list of content
//! parts or null, and content parts that are not objects (OpenAI refuses all of these too).
//!
//! - [`media`]: images, audio and files.
//! - [`tokenizer`]: tiktoken counting, linear whatever the text, off the runtime when large.

mod bpe;
mod media;
mod tokenizer;

pub use media::{ImageRule, file_tokens};
pub use tokenizer::{BLOCKING_THRESHOLD, MAX_RUN, Tokenizer};

use media::{PDF_PAGE_TEXT, audio_tokens, image_size, strip_data_url};
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Tokens OpenAI adds per chat message (role and framing) and once per reply.
pub const PER_MESSAGE: u64 = 3;
pub const PER_REPLY: u64 = 3;

/// What a prompt costs: text still to tokenize, and tokens known without tokenizing.
#[derive(Debug, Default)]
pub struct Prompt {
    pub pieces: Vec<Piece>,
    /// Framing, images, audio, token-id arrays.
    pub fixed: u64,
}

/// Something to count off the request path's runtime (it may be large).
#[derive(Debug)]
pub enum Piece {
    /// Tokenized as is.
    Text(String),
    /// The base64 of an attached file: a PDF costs its pages (text and a page image each),
    /// anything else its decoded text.
    File { base64: String, per_page: u64 },
}

impl Prompt {
    fn text(&mut self, s: impl Into<String>) {
        let s = s.into();
        if !s.is_empty() {
            self.pieces.push(Piece::Text(s));
        }
    }

    /// Anything not understood costs its JSON as sent.
    fn raw(&mut self, v: &RawValue) {
        self.text(v.get());
    }

    /// Bytes of text still to tokenize (a lower bound on tokens needs no tokenizer).
    pub fn text_bytes(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(s) => s.len(),
                Piece::File { .. } => 0,
            })
            .sum()
    }
}

/// A client error in the shape of the prompt, with the parameter at fault.
#[derive(Debug)]
pub struct Invalid {
    pub message: String,
    pub param: &'static str,
}

fn invalid(param: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        param,
    }
}

/// The top-level fields that bill input tokens besides the prompt itself.
#[derive(Default)]
pub struct Extras<'a> {
    pub tools: Option<&'a RawValue>,
    pub functions: Option<&'a RawValue>,
    pub response_format: Option<&'a RawValue>,
    pub text: Option<&'a RawValue>,
    pub prediction: Option<&'a RawValue>,
    pub tool_choice: Option<&'a RawValue>,
    pub suffix: Option<&'a RawValue>,
}

impl Extras<'_> {
    fn add_to(&self, out: &mut Prompt) {
        for v in [
            self.tools,
            self.functions,
            self.response_format,
            self.text,
            self.prediction,
            self.suffix,
        ]
        .into_iter()
        .flatten()
        {
            out.raw(v);
        }
        // `"auto"` / `"none"` cost nothing; a forced function is rendered into the prompt.
        if let Some(c) = self.tool_choice
            && c.get().trim_start().starts_with('{')
        {
            out.raw(c);
        }
    }
}

/// Chat `messages` plus the extras.
pub fn chat(messages: &RawValue, extras: &Extras<'_>, model: &str) -> Result<Prompt, Invalid> {
    let list: Vec<&RawValue> = serde_json::from_str(messages.get())
        .map_err(|_| invalid("messages", "'messages' must be an array of message objects"))?;
    let images = ImageRule::for_model(model);
    let mut out = Prompt {
        pieces: Vec::with_capacity(list.len() + 1),
        fixed: PER_REPLY,
    };
    for (i, m) in list.iter().enumerate() {
        let at = At {
            list: "messages",
            index: i,
            images,
        };
        message(m, at, &mut out)?;
    }
    extras.add_to(&mut out);
    Ok(out)
}

/// A completions `prompt` or an embeddings `input`: a string, strings, token ids or arrays of
/// them; anything else counts as its JSON.
pub fn input(raw: &RawValue, extras: &Extras<'_>) -> Prompt {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Input {
        Text(String),
        Texts(Vec<String>),
        TokenIds(Vec<u32>),
        TokenArrays(Vec<Vec<u32>>),
    }
    let mut out = Prompt::default();
    match serde_json::from_str::<Input>(raw.get()) {
        Ok(Input::Text(s)) => out.text(s),
        Ok(Input::Texts(v)) => v.into_iter().for_each(|s| out.text(s)),
        Ok(Input::TokenIds(v)) => out.fixed = v.len() as u64,
        Ok(Input::TokenArrays(v)) => out.fixed = v.iter().map(|a| a.len() as u64).sum(),
        Err(_) => out.raw(raw),
    }
    extras.add_to(&mut out);
    out
}

/// A Responses `input` (a string, or items: messages, tool calls and their outputs, ...) with
/// `instructions` and the extras.
pub fn responses(
    raw: &RawValue,
    instructions: Option<&RawValue>,
    extras: &Extras<'_>,
    model: &str,
) -> Result<Prompt, Invalid> {
    let images = ImageRule::for_model(model);
    let mut out = Prompt {
        pieces: Vec::new(),
        fixed: PER_REPLY,
    };
    if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
        out.fixed += PER_MESSAGE;
        out.text(s);
    } else {
        let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| {
            invalid(
                "input",
                "'input' must be a string or an array of input items",
            )
        })?;
        for (i, item) in items.iter().enumerate() {
            match serde_json::from_str::<Part<'_>>(item.get()) {
                Ok(k) if k.role.is_some() && k.kind.as_deref().is_none_or(|t| t == "message") => {
                    let at = At {
                        list: "input",
                        index: i,
                        images,
                    };
                    message(item, at, &mut out)?;
                }
                // Tool calls, their outputs, reasoning items, references: their JSON.
                Ok(_) => out.raw(item),
                Err(_) => {
                    return Err(invalid(
                        "input",
                        format!("input[{i}] must be an object (an input item)"),
                    ));
                }
            }
        }
    }
    if let Some(i) = instructions {
        match serde_json::from_str::<String>(i.get()) {
            Ok(s) => out.text(s),
            Err(_) => out.raw(i),
        }
    }
    extras.add_to(&mut out);
    Ok(out)
}

/// Where a message sits (for error messages) and how its model bills images.
#[derive(Clone, Copy)]
struct At {
    list: &'static str,
    index: usize,
    images: ImageRule,
}

/// One message object: its content, name, tool calls and anything else it carries.
fn message(raw: &RawValue, at: At, out: &mut Prompt) -> Result<(), Invalid> {
    let At { list, index, .. } = at;
    let not_object = || invalid(list, format!("{list}[{index}] must be a message object"));
    if !raw.get().trim_start().starts_with('{') {
        return Err(not_object());
    }
    let fields: Fields<'_> = serde_json::from_str(raw.get()).map_err(|_| not_object())?;
    out.fixed += PER_MESSAGE;
    for (key, value) in fields.0 {
        match key.as_ref() {
            // Framing: counted in PER_MESSAGE.
            "role" | "type" => {}
            "content" => content(value, at, out)?,
            "name" => {
                out.fixed += 1;
                string_or_raw(value, out);
            }
            "refusal" | "tool_call_id" => string_or_raw(value, out),
            // Tool calls, function calls, audio references and whatever else: their JSON.
            _ => {
                if value.get() != "null" {
                    out.raw(value);
                }
            }
        }
    }
    Ok(())
}

fn string_or_raw(v: &RawValue, out: &mut Prompt) {
    match serde_json::from_str::<String>(v.get()) {
        Ok(s) => out.text(s),
        Err(_) if v.get() == "null" => {}
        Err(_) => out.raw(v),
    }
}

/// A message's content: a string, null, or a list of content parts.
fn content(raw: &RawValue, at: At, out: &mut Prompt) -> Result<(), Invalid> {
    let At {
        list,
        index,
        images,
    } = at;
    let s = raw.get().trim_start();
    if s.starts_with('"') {
        string_or_raw(raw, out);
        return Ok(());
    }
    if s == "null" {
        return Ok(());
    }
    let bad_content = || {
        invalid(
            list,
            format!("{list}[{index}].content must be a string, an array of content parts, or null"),
        )
    };
    if !s.starts_with('[') {
        return Err(bad_content());
    }
    let parts: Vec<&RawValue> = serde_json::from_str(s).map_err(|_| bad_content())?;
    for (j, p) in parts.iter().enumerate() {
        if !p.get().trim_start().starts_with('{') {
            return Err(invalid(
                list,
                format!("{list}[{index}].content[{j}] must be an object (a content part)"),
            ));
        }
        part(p, images, out);
    }
    Ok(())
}

/// The fields of a content part (or a Responses input item) the estimate reads, in chat and
/// Responses shapes.
#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    /// Set on a Responses input item that is a message.
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    refusal: Option<&'a RawValue>,
    /// Chat: `{"url", "detail"}`; Responses: the URL itself.
    #[serde(borrow, default)]
    image_url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    detail: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input_audio: Option<Nested<'a>>,
    /// Chat: `{"file_data", "file_id", "filename"}`.
    #[serde(borrow, default)]
    file: Option<Nested<'a>>,
    /// Responses `input_file`.
    #[serde(borrow, default)]
    file_data: Option<Cow<'a, str>>,
}

/// The object inside a part: chat's `image_url` (`url`, `detail`), `input_audio` (`data`,
/// `format`) or `file` (`file_data`).
#[derive(Deserialize)]
struct Nested<'a> {
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    detail: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    format: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    file_data: Option<Cow<'a, str>>,
}

fn part(raw: &RawValue, images: ImageRule, out: &mut Prompt) {
    let Ok(p) = serde_json::from_str::<Part<'_>>(raw.get()) else {
        out.raw(raw);
        return;
    };
    match p.kind.as_deref() {
        Some("text" | "input_text" | "output_text") => match p.text {
            Some(t) => string_or_raw(t, out),
            None => out.raw(raw),
        },
        Some("refusal") => match p.refusal {
            Some(t) => string_or_raw(t, out),
            None => out.raw(raw),
        },
        Some("image_url" | "input_image") => {
            let (url, detail) = match p.image_url {
                Some(v) => match serde_json::from_str::<Nested<'_>>(v.get()) {
                    Ok(u) => (u.url, u.detail.or(p.detail)),
                    Err(_) => (serde_json::from_str::<Cow<'_, str>>(v.get()).ok(), p.detail),
                },
                // A `file_id`: its size is unknown here.
                None => (None, p.detail),
            };
            let low = detail.as_deref() == Some("low");
            let size = url.as_deref().and_then(image_size);
            out.fixed += images.tokens(size, low);
        }
        Some("input_audio") => match p.input_audio.and_then(|a| Some((a.data?, a.format))) {
            Some((data, format)) => out.fixed += audio_tokens(&data, format.as_deref()),
            None => out.raw(raw),
        },
        Some("file" | "input_file") => {
            let data = p.file.and_then(|f| f.file_data).or(p.file_data);
            match data {
                Some(d) => out.pieces.push(Piece::File {
                    base64: strip_data_url(&d).to_string(),
                    per_page: images.max() + PDF_PAGE_TEXT,
                }),
                // A `file_id` or `file_url`: its size is unknown here (the backend's usage
                // settles it).
                None => out.raw(raw),
            }
        }
        _ => out.raw(raw),
    }
}

/// The keys and raw values of a JSON object, in order, keys borrowed when they can be.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'a>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    out.push((k.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests;

//! What a client asked for: the operation and route style (from the path), and the few body
//! fields the gateway needs (model, stream flags, output limits, prompt text). The body is
//! never re-encoded unless the backend needs a change ([`rewrite_body`]); the original bytes
//! are forwarded otherwise.
//!
//! - [`rewrite`]: the body a backend gets, when it must differ from the client's.

mod rewrite;

pub use rewrite::rewrite_body;

use crate::error::Error;
use crate::estimate::{self, Extras, Prompt};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The OpenAI operation a route maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Chat,
        Operation::Completions,
        Operation::Embeddings,
        Operation::Responses,
    ];

    /// Path suffix shared by the OpenAI and Azure APIs.
    pub fn path(self) -> &'static str {
        match self {
            Operation::Chat => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }

    /// `gen_ai.operation.name` of the GenAI semantic conventions.
    pub fn gen_ai_name(self) -> &'static str {
        match self {
            Operation::Chat | Operation::Responses => "chat",
            Operation::Completions => "text_completion",
            Operation::Embeddings => "embeddings",
        }
    }

    /// Whether a stream of this operation reports usage only when `include_usage` is asked.
    pub fn needs_include_usage(self) -> bool {
        matches!(self, Operation::Chat | Operation::Completions)
    }
}

/// How the client addressed the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteStyle {
    /// `/v1/...`, model in the body.
    OpenAi,
    /// `/openai/v1/...`, model in the body.
    AzureV1,
    /// `/openai/deployments/{deployment}/...`: the deployment names the model.
    AzureDeployment {
        deployment: String,
        api_version: Option<String>,
    },
}

/// The parsed request.
#[derive(Debug)]
pub struct ClientRequest {
    pub op: Operation,
    pub style: RouteStyle,
    pub model: String,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_include_usage: bool,
    /// Requested completion tokens per choice, if the client set a limit.
    pub max_output: Option<u64>,
    /// Number of choices (`n`), which multiplies the completion estimate.
    pub choices: u64,
    /// Every billed input, still to be counted.
    pub prompt: Prompt,
    /// The output cap the gateway adds for the backend when the client set none: the field
    /// and the tokens reserved for each choice (set by the pipeline).
    pub output_cap: Option<(&'static str, u64)>,
    pub body: Bytes,
}

impl ClientRequest {
    /// The body field that caps output for this request: `max_completion_tokens` on chat
    /// (`max_tokens` for Azure api-versions before 2024-09-01, which lack the other),
    /// `max_tokens` on completions, `max_output_tokens` on responses; none for embeddings.
    pub fn output_cap_field(&self) -> Option<&'static str> {
        match self.op {
            Operation::Chat => match &self.style {
                RouteStyle::AzureDeployment {
                    api_version: Some(v),
                    ..
                } if v.as_str() < "2024-09-01" => Some("max_tokens"),
                _ => Some("max_completion_tokens"),
            },
            Operation::Completions => Some("max_tokens"),
            Operation::Responses => Some("max_output_tokens"),
            Operation::Embeddings => None,
        }
    }
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    functions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    response_format: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prediction: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow, default)]
    suffix: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The largest `max_tokens` accepted (no model generates more; larger values are mistakes or
/// attempts to overflow the estimate).
pub const MAX_OUTPUT_TOKENS: u64 = 1 << 24;

fn missing(field: &'static str) -> Error {
    Error::BadRequest {
        message: format!("you must provide a '{field}' parameter"),
        param: Some(field),
    }
}

/// Parses the body of a POST to one of the model routes.
pub fn parse(op: Operation, style: RouteStyle, body: Bytes) -> Result<ClientRequest, Error> {
    if body.is_empty() {
        return Err(Error::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    let first = body.iter().find(|c| !c.is_ascii_whitespace());
    if first.is_some_and(|c| *c != b'{') {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
            return Err(Error::bad_request("the request body must be a JSON object"));
        }
        return Err(Error::bad_request(
            "could not parse the JSON body: expected a JSON object",
        ));
    }
    let f: Fields<'_> = serde_json::from_slice(&body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Error::bad_request(format!("could not parse the JSON body: {e}"))
        } else {
            Error::bad_request(format!("invalid request body: {e}"))
        }
    })?;
    if let RouteStyle::AzureDeployment {
        api_version: Some(v),
        ..
    } = &style
        && (v.is_empty()
            || v.len() > 64
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(Error::BadRequest {
            message: "'api-version' must look like 2024-10-21".into(),
            param: Some("api-version"),
        });
    }
    let model = match (&style, f.model) {
        (RouteStyle::AzureDeployment { deployment, .. }, _) => deployment.clone(),
        (_, Some(m)) if !m.is_empty() => m,
        _ => return Err(missing("model")),
    };
    let extras = Extras {
        tools: f.tools,
        functions: f.functions,
        response_format: f.response_format,
        text: f.text,
        prediction: f.prediction,
        tool_choice: f.tool_choice,
        suffix: f.suffix,
    };
    let bad = |e: estimate::Invalid| Error::BadRequest {
        message: e.message,
        param: Some(e.param),
    };
    let prompt = match op {
        Operation::Chat => {
            let raw = f.messages.ok_or_else(|| missing("messages"))?;
            estimate::chat(raw, &extras, &model).map_err(bad)?
        }
        Operation::Completions => {
            estimate::input(f.prompt.ok_or_else(|| missing("prompt"))?, &extras)
        }
        Operation::Embeddings => estimate::input(f.input.ok_or_else(|| missing("input"))?, &extras),
        Operation::Responses => {
            let input = f.input.ok_or_else(|| missing("input"))?;
            estimate::responses(input, f.instructions, &extras, &model).map_err(bad)?
        }
    };
    let stream = f.stream.unwrap_or(false);
    if stream && op == Operation::Embeddings {
        return Err(Error::BadRequest {
            message: "embeddings cannot be streamed".into(),
            param: Some("stream"),
        });
    }
    let max_output = f
        .max_completion_tokens
        .or(f.max_tokens)
        .or(f.max_output_tokens);
    if max_output.is_some_and(|m| m > MAX_OUTPUT_TOKENS) {
        return Err(Error::BadRequest {
            message: format!("the output token limit must be at most {MAX_OUTPUT_TOKENS}"),
            param: Some("max_tokens"),
        });
    }
    let choices = f.n.unwrap_or(1);
    if choices == 0 || choices > 128 {
        return Err(Error::BadRequest {
            message: "'n' must be between 1 and 128".into(),
            param: Some("n"),
        });
    }
    Ok(ClientRequest {
        op,
        style,
        model,
        stream,
        client_include_usage: f
            .stream_options
            .and_then(|s| s.include_usage)
            .unwrap_or(false),
        max_output,
        choices,
        prompt,
        output_cap: None,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ClientRequest, Error> {
        parse(
            Operation::Chat,
            RouteStyle::OpenAi,
            Bytes::from(body.to_string()),
        )
    }

    /// The fields the gateway needs are read; everything else is left alone.
    #[test]
    fn reads_fields() {
        let r = chat(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":7,"n":2,"temperature":0.1}"#)
        .unwrap();
        assert_eq!(
            (r.model.as_str(), r.stream, r.client_include_usage),
            ("gpt-4o", true, true)
        );
        assert_eq!((r.max_output, r.choices), (Some(7), 2));
    }

    /// Bad bodies are 400s that say what is wrong.
    #[test]
    fn rejects_bad_bodies() {
        for (body, needle) in [
            ("", "empty"),
            ("{not json", "parse"),
            ("[1,2]", "JSON object"),
            (r#"{"messages":[]}"#, "'model'"),
            (r#"{"model":"m"}"#, "'messages'"),
            (r#"{"model":"m","messages":"hi"}"#, "array"),
            (r#"{"model":"m","messages":[],"stream":"yes"}"#, "invalid"),
            (r#"{"model":5,"messages":[]}"#, "invalid"),
            (
                r#"{"model":"m","messages":[],"max_tokens":9223372036854775808}"#,
                "at most",
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert!(matches!(e, Error::BadRequest { .. }), "{body}: {e:?}");
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
    }

    /// The Azure deployment route names the model even when the body has none.
    #[test]
    fn deployment_is_the_model() {
        let style = RouteStyle::AzureDeployment {
            deployment: "gpt-4o".into(),
            api_version: None,
        };
        let r = parse(
            Operation::Chat,
            style,
            Bytes::from_static(br#"{"messages":[]}"#),
        )
        .unwrap();
        assert_eq!(r.model, "gpt-4o");
    }
}

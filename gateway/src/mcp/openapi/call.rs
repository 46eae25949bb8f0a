//! Sending a prepared request upstream and turning the answer into a tool result: the
//! credential injected last (no argument can replace it), the whole exchange bounded by
//! `timeout_ms`, the body read up to `max_response_bytes` and cut there, redirects answered as
//! errors (the client never follows them).

use super::ToolResult;
use super::request::Prepared;
use super::schema::is_json;
use super::validate::validate;
use crate::credentials::Credential;
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;
use std::time::Duration;

/// What one exchange needs besides the request.
pub struct Limits<'a> {
    pub timeout: Duration,
    pub max_response_bytes: usize,
    /// The tool's `outputSchema`: a successful answer must then be a JSON object that fits it
    /// (MCP clients check `structuredContent` against it), else the result is an error.
    pub output_schema: Option<&'a Value>,
}

/// Sends `req` and shapes the answer; every failure is an error result, never a panic or a
/// hang past `limits.timeout`.
pub async fn send(
    client: &reqwest::Client,
    credential: &Credential,
    req: Prepared,
    limits: &Limits<'_>,
) -> ToolResult {
    let ms = limits.timeout.as_millis();
    match tokio::time::timeout(limits.timeout, exchange(client, credential, req, limits)).await {
        Ok(result) => result,
        Err(_) => ToolResult::error(
            None,
            format!("the upstream did not answer within {ms} ms (timed out)"),
        ),
    }
}

async fn exchange(
    client: &reqwest::Client,
    credential: &Credential,
    req: Prepared,
    limits: &Limits<'_>,
) -> ToolResult {
    let mut headers = req.headers;
    let mut sent_token = None;
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/json, */*;q=0.5"),
    );
    match credential {
        Credential::None => {}
        Credential::Header(name, value) => {
            headers.insert(*name, value.clone());
        }
        Credential::Token(p) => {
            // Idempotent: the refresh task starts with the first call that needs it.
            let token = match p.start() {
                Ok(()) => p.header().await.ok(),
                Err(_) => None,
            };
            let Some(v) = token else {
                return ToolResult::error(None, "the upstream credential is not available".into());
            };
            headers.insert(header::AUTHORIZATION, v.clone());
            sent_token = Some(v);
        }
    }
    let mut builder = client.request(req.method, req.url).headers(headers);
    if let Some(body) = req.body {
        builder = builder.body(body);
    }
    let mut resp = match builder.send().await {
        Ok(r) => r,
        Err(e) => {
            // Without the URL: its query carries the caller's arguments.
            let what = if e.is_connect() {
                "could not connect to the upstream"
            } else {
                "the request to the upstream failed"
            };
            return ToolResult::error(None, format!("{what}: {}", e.without_url()));
        }
    };
    let status = resp.status();
    if let (StatusCode::UNAUTHORIZED, Credential::Token(p), Some(sent)) =
        (status, credential, &sent_token)
    {
        // The upstream refused the token: the provider fetches a new one for the next call.
        p.rejected(sent);
    }
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json);
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = Vec::new();
    let mut cut = false;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = limits.max_response_bytes - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    cut = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return ToolResult::error(
                    Some(status.as_u16()),
                    format!("the upstream's answer broke off: {}", e.without_url()),
                );
            }
        }
    }
    drop(resp);
    shape(status, json, location, body, cut, limits)
}

/// The tool result of an answer that arrived (possibly cut).
fn shape(
    status: StatusCode,
    json: bool,
    location: Option<String>,
    body: Vec<u8>,
    cut: bool,
    limits: &Limits<'_>,
) -> ToolResult {
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if cut {
        text.push_str(&format!(
            "\n[response cut at {} bytes: the upstream sent more than the gateway passes on]",
            limits.max_response_bytes
        ));
    }
    let code = Some(status.as_u16());
    let reason = status.canonical_reason().unwrap_or("");
    if status.is_redirection() {
        let to = location.map(|l| format!(" to {l}")).unwrap_or_default();
        return ToolResult::error(
            code,
            format!(
                "HTTP {} {reason}: the upstream redirected{to}; redirects are not followed",
                status.as_u16()
            ),
        );
    }
    if status.is_client_error() || status.is_server_error() {
        return ToolResult::error(code, format!("HTTP {} {reason}: {text}", status.as_u16()));
    }
    if !status.is_success() {
        return ToolResult::error(
            code,
            format!("HTTP {} {reason}: unexpected status", status.as_u16()),
        );
    }
    let Some(schema) = limits.output_schema else {
        return ToolResult {
            is_error: false,
            status: code,
            text,
            structured: None,
        };
    };
    // The upstream promised an object of this schema; an answer that breaks the promise is
    // its error (a client would reject the result), passed on as text.
    let object = (json && !cut)
        .then(|| serde_json::from_slice::<Value>(&body).ok())
        .flatten()
        .filter(Value::is_object);
    let Some(object) = object else {
        return ToolResult::error(
            code,
            format!(
                "the upstream's answer is not the JSON object its response schema declares: {text}"
            ),
        );
    };
    if let Err(why) = validate(schema, &object) {
        return ToolResult::error(
            code,
            format!("the upstream's answer does not fit its response schema ({why}): {text}"),
        );
    }
    ToolResult {
        is_error: false,
        status: code,
        text,
        structured: Some(object),
    }
}

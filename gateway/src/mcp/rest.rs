//! A REST API exported as an MCP server (`[[mcp_servers]]` with `openapi`, docs/OPENAPI.md).
//! It has no MCP endpoint and no upstream session: the gateway answers `initialize`, `ping`
//! and the lists itself, and turns `tools/call` into the HTTP request ([`super::openapi`]).
//! Tool lists, allow-lists, limits, usage, metrics and spans are those of any MCP server
//! ([`super::tools`], [`super::calls`]).

use super::jsonrpc::{self, Message};
use super::openapi::{OpenApiSpec, OpenApiTools};
use super::serve::{Who, with_session};
use super::session::Session;
use super::upstream::{Carry, Upstream};
use super::{McpState, VERSIONS, json};
use crate::clock::now_ms;
use crate::credentials::Credential;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use tollgate_common::config::McpServerConfig;

/// Loads the server's document (blocking: at start). A broken document is an error naming
/// the JSON pointer of the problem; skipped operations are logged as warnings.
pub fn load(
    s: &McpServerConfig,
    doc: &str,
    credential: Credential,
) -> anyhow::Result<OpenApiTools> {
    let spec = OpenApiSpec {
        name: s.name.clone(),
        openapi: doc.into(),
        base_url: s.base_url.clone(),
        operations: s.operations.clone(),
        timeout_ms: s.timeout_ms,
        max_response_bytes: s.max_response_bytes,
    };
    let tools = OpenApiTools::new(spec, credential)?;
    let catalog = tools.catalog();
    for w in &catalog.warnings {
        tracing::warn!(server = %s.name, "{w}");
    }
    tracing::info!(server = %s.name, tools = catalog.tools.len(), "OpenAPI document loaded");
    Ok(tools)
}

/// On SIGHUP every OpenAPI document is read again, off the runtime; a document that no
/// longer loads leaves its server's tools as they were, with an error logged.
pub fn reload_on_sighup(mcp: &super::Mcp) {
    let apis: Vec<(String, Arc<OpenApiTools>)> = mcp
        .upstreams
        .iter()
        .filter_map(|u| Some((u.name.clone(), u.rest.clone()?)))
        .collect();
    if apis.is_empty() {
        return;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: OpenAPI documents load at start only");
                return;
            }
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                for (name, api) in &apis {
                    match api.reload_async().await {
                        Ok(c) => {
                            for w in &c.warnings {
                                tracing::warn!(server = %name, "{w}");
                            }
                            tracing::info!(server = %name, tools = c.tools.len(), "OpenAPI document reloaded");
                        }
                        Err(e) => tracing::error!(
                            server = %name, error = %format!("{e:#}"),
                            "OpenAPI document not reloaded; the previous tools stay"
                        ),
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(apis);
}

/// The protocol version answered to a client asking for `requested`.
pub fn negotiate(requested: Option<&str>) -> String {
    match requested {
        Some(v) if VERSIONS.contains(&v) => v.to_string(),
        _ => VERSIONS[VERSIONS.len() - 1].to_string(),
    }
}

/// `initialize` on `/mcp/{server}`: answered by the gateway; the session names the server
/// with no upstream session id.
pub fn initialize(s: &McpState, who: &Who, u: &Upstream, id: Value, msg: &Message) -> Response {
    let Message::Request { msg, .. } = msg else {
        return json(jsonrpc::error(
            id,
            jsonrpc::INVALID_REQUEST,
            "initialize is a request",
        ));
    };
    let version = negotiate(msg["params"]["protocolVersion"].as_str());
    let sess = Session {
        capabilities: Some(msg["params"]["capabilities"].clone()).filter(|c| c.is_object()),
        ..Session::one_server(
            &who.caller.consumer,
            &u.name,
            None,
            version.clone(),
            now_ms() / 1000 + s.mcp.config.session_ttl_s,
        )
    };
    let result = json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": u.name, "version": env!("CARGO_PKG_VERSION")},
    });
    with_session(json(jsonrpc::result(id, result)), &s.mcp.sealer.seal(&sess))
}

/// A message on `/mcp/{server}` within a session, for a REST upstream.
pub async fn one(
    s: &McpState,
    who: &Who,
    u: &Arc<Upstream>,
    msg: Message,
    body: Bytes,
    headers: &HeaderMap,
) -> Response {
    let Message::Request { id, method, msg } = msg else {
        // Notifications (`initialized`, `cancelled`) and answers: nothing to do.
        return StatusCode::ACCEPTED.into_response();
    };
    let carry = Carry::default();
    match method.as_str() {
        "ping" => json(jsonrpc::result(id, json!({}))),
        "tools/list" => match super::tools::list(s, who, u, &carry, &id).await {
            Ok(tools) => json(jsonrpc::result(id, json!({"tools": tools}))),
            Err(Ok(answer)) => json(answer),
            Err(Err(f)) => json(f.to_jsonrpc(&u.name, id)),
        },
        "tools/call" => {
            let tool = msg["params"]["name"].as_str().unwrap_or_default();
            if !super::tools::callable(s, who, u, &carry, tool).await {
                return json(super::calls::unknown_tool(id, tool));
            }
            super::calls::call(s, who, u, &carry, id, body, tool, false, headers).await
        }
        "resources/list" => json(jsonrpc::result(id, json!({"resources": []}))),
        "resources/templates/list" => json(jsonrpc::result(id, json!({"resourceTemplates": []}))),
        "prompts/list" => json(jsonrpc::result(id, json!({"prompts": []}))),
        _ => json(jsonrpc::error(
            id,
            jsonrpc::METHOD_NOT_FOUND,
            "Method not found",
        )),
    }
}

/// The answer to an admitted `tools/call` of `tool` (`body` is the client's message, its
/// arguments in `params.arguments`): invalid arguments are a JSON-RPC -32602 error and send
/// nothing; otherwise the HTTP exchange's tool result.
pub async fn call(rest: &OpenApiTools, id: Value, body: &Bytes, tool: &str) -> Value {
    let args = serde_json::from_slice::<Value>(body)
        .map(|m| m["params"]["arguments"].clone())
        .unwrap_or(Value::Null);
    match rest.call(tool, args).await {
        Ok(r) => jsonrpc::result(id, r.to_mcp()),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_jsonrpc()}),
    }
}

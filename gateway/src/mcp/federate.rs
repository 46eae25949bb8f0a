//! What the federated `/mcp` adds: one session over every server the caller may reach, its
//! tools named `server__tool` (agent frameworks map tool names to function names, which allow
//! only `[a-zA-Z0-9_-]`), and the upstreams' requests to the client carried with ids that
//! name their server ([`jsonrpc::wrap_id`]).
//!
//! `/mcp` federates tools (and `ping`, `logging/setLevel`); resources and prompts are served
//! per server on `/mcp/{server}`, where their URIs and names need no rewriting. On `/mcp` their
//! lists are empty and the capabilities do not announce them.

use super::json;
use super::jsonrpc::{self, Message};
use super::serve::{Who, exchange, fault_response, with_session};
use super::session::{Session, UpstreamSession};
use super::upstream::{Carry, Upstream};
use super::{McpState, VERSIONS};
use crate::clock::now_ms;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::join_all;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// Separates the server from the tool in a federated tool name.
pub const SEP: &str = "__";

/// The session's upstreams that are still configured, with their part of the session.
fn members<'a>(
    s: &'a McpState,
    who: &Who,
    sess: &'a Session,
) -> Vec<(&'a Arc<Upstream>, &'a UpstreamSession)> {
    sess.upstreams
        .iter()
        .filter(|p| who.tools.allow.reaches(&p.server))
        .filter_map(|p| s.mcp.upstream(&p.server).map(|u| (u, p)))
        .collect()
}

fn carry<'a>(sess: &'a Session, p: &'a UpstreamSession, headers: &HeaderMap) -> Carry<'a> {
    Carry {
        session: p.id.as_deref(),
        version: Some(p.version.as_str()),
        traceparent: headers.get("traceparent").cloned(),
        capabilities: sess.capabilities.as_ref(),
    }
}

/// `initialize` on `/mcp`: every server the caller reaches is initialized with the client's
/// parameters (its capabilities, so sampling and elicitation reach it); the answer is the
/// gateway's own. A server that fails is left out of the session (and its tools of the lists).
pub async fn initialize(s: &McpState, who: &Who, id: Value, msg: &Message) -> Response {
    let Message::Request { msg, .. } = msg else {
        return json(jsonrpc::error(
            id,
            jsonrpc::INVALID_REQUEST,
            "initialize is a request",
        ));
    };
    let requested = msg["params"]["protocolVersion"]
        .as_str()
        .unwrap_or_default();
    let version = if VERSIONS.contains(&requested) {
        requested.to_string()
    } else {
        VERSIONS[VERSIONS.len() - 1].to_string()
    };
    let mut init = msg.clone();
    if !init["params"].is_object() {
        init["params"] = json!({});
    }
    init["params"]["protocolVersion"] = Value::String(version.clone());
    let body = Bytes::from(init.to_string());
    let reached: Vec<&Arc<Upstream>> = s
        .mcp
        .upstreams
        .iter()
        .filter(|u| who.tools.allow.reaches(&u.name))
        .collect();
    let answers = join_all(reached.iter().map(|u| {
        let (body, id) = (body.clone(), id.clone());
        async move {
            let carry = Carry::default();
            (u, exchange(s, u, &carry, body, &id).await)
        }
    }))
    .await;
    let mut upstreams = Vec::new();
    for (u, a) in answers {
        match a {
            Ok((answer, sid)) => match answer["result"]["protocolVersion"].as_str() {
                Some(v) => upstreams.push(UpstreamSession {
                    server: u.name.clone(),
                    id: sid,
                    version: v.to_string(),
                }),
                None => tracing::warn!(server = %u.name, "MCP server refused initialize"),
            },
            Err(f) => {
                tracing::warn!(server = %u.name, fault = ?f, "MCP server left out of a federated session")
            }
        }
    }
    let sess = Session {
        consumer: who.caller.consumer.to_string(),
        route: None,
        version: version.clone(),
        upstreams,
        expires: now_ms() / 1000 + s.mcp.config.session_ttl_s,
        capabilities: Some(msg["params"]["capabilities"].clone()).filter(|c| c.is_object()),
    };
    let result = json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}, "logging": {}},
        "serverInfo": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")},
        "instructions": "tollgate federates MCP servers: tools are named <server>__<tool>.",
    });
    with_session(json(jsonrpc::result(id, result)), &s.mcp.sealer.seal(&sess))
}

/// A message on `/mcp` within a session.
pub async fn dispatch(
    s: &McpState,
    who: &Who,
    sess: &Session,
    msg: Message,
    headers: &HeaderMap,
) -> Response {
    match msg {
        Message::Request { id, method, msg } => match method.as_str() {
            "ping" => json(jsonrpc::result(id, json!({}))),
            "tools/list" => {
                let lists = join_all(members(s, who, sess).into_iter().map(|(u, p)| {
                    let id = id.clone();
                    async move {
                        let c = carry(sess, p, headers);
                        (u, super::tools::list(s, who, u, &c, &id).await)
                    }
                }))
                .await;
                let mut tools = Vec::new();
                for (u, list) in lists {
                    match list {
                        Ok(list) => tools.extend(list.into_iter().map(|mut t| {
                            let name = t["name"].as_str().unwrap_or_default();
                            t["name"] = Value::String(format!("{}{SEP}{name}", u.name));
                            t
                        })),
                        Err(e) => {
                            tracing::warn!(server = %u.name, error = ?e, "tools/list failed; its tools are left out")
                        }
                    }
                }
                json(jsonrpc::result(id, json!({"tools": tools})))
            }
            "tools/call" => call(s, who, sess, id, msg, headers).await,
            "logging/setLevel" => {
                let body = Bytes::from(msg.to_string());
                join_all(members(s, who, sess).into_iter().map(|(u, p)| {
                    let (body, id) = (body.clone(), id.clone());
                    async move { exchange(s, u, &carry(sess, p, headers), body, &id).await }
                }))
                .await;
                json(jsonrpc::result(id, json!({})))
            }
            "resources/list" => json(jsonrpc::result(id, json!({"resources": []}))),
            "resources/templates/list" => {
                json(jsonrpc::result(id, json!({"resourceTemplates": []})))
            }
            "prompts/list" => json(jsonrpc::result(id, json!({"prompts": []}))),
            _ => json(jsonrpc::error(
                id,
                jsonrpc::METHOD_NOT_FOUND,
                "Method not found",
            )),
        },
        // `initialized`, `cancelled` (the request ids are the client's own, so the server that
        // has it acts and the others ignore it), `roots/list_changed`: to every member.
        Message::Notification { msg, .. } => {
            let body = Bytes::from(msg.to_string());
            join_all(members(s, who, sess).into_iter().map(|(u, p)| {
                let body = body.clone();
                async move {
                    if let Err(f) = s.mcp.send(u, &carry(sess, p, headers), body).await {
                        tracing::debug!(server = %u.name, fault = ?f, "notification not delivered");
                    }
                }
            }))
            .await;
            StatusCode::ACCEPTED.into_response()
        }
        // The client's answer to an upstream's request: back to the server its id names.
        Message::Response { id, mut msg } => {
            let target = jsonrpc::unwrap_id(&id)
                .and_then(|(server, original)| Some((sess.upstream(server)?, original)));
            let Some((p, original)) = target else {
                return super::http_error(
                    StatusCode::BAD_REQUEST,
                    jsonrpc::error(Value::Null, jsonrpc::INVALID_REQUEST, "unknown response id"),
                );
            };
            let Some(u) = s.mcp.upstream(&p.server) else {
                return super::serve::session_not_found();
            };
            msg["id"] = original;
            let body = Bytes::from(msg.to_string());
            match s.mcp.send(u, &carry(sess, p, headers), body).await {
                Ok(_) => StatusCode::ACCEPTED.into_response(),
                Err(f) => fault_response(&u.name, f, Value::Null),
            }
        }
    }
}

/// `tools/call` of `server__tool`: to that server under its own tool name.
async fn call(
    s: &McpState,
    who: &Who,
    sess: &Session,
    id: Value,
    mut msg: Value,
    headers: &HeaderMap,
) -> Response {
    let name = msg["params"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let target = name.split_once(SEP).and_then(|(server, tool)| {
        let p = sess.upstream(server)?;
        let u = s.mcp.upstream(server)?;
        Some((u.clone(), p, tool.to_string()))
    });
    let Some((u, p, tool)) = target else {
        return json(super::calls::unknown_tool(id, &name));
    };
    if !super::tools::callable(s, who, &u, &carry(sess, p, headers), &tool).await {
        return json(super::calls::unknown_tool(id, &name));
    }
    msg["params"]["name"] = Value::String(tool.clone());
    let body = Bytes::from(msg.to_string());
    super::calls::call(
        s,
        who,
        &u,
        &carry(sess, p, headers),
        id,
        body,
        &tool,
        true,
        headers,
    )
    .await
}

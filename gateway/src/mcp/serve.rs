//! The POST path of `/mcp` and `/mcp/{server}`: checks in order (origin, caller, size, message,
//! session), then the method. For one server every method passes through except `tools/list`
//! (filtered, pages followed) and `tools/call` (allow-listed and limited, [`super::calls`]);
//! the federated route is [`super::federate`].

use super::jsonrpc::{self, Message};
use super::session::Session;
use super::upstream::{Carry, Fault, Reply, Upstream, sse_event};
use super::{McpState, VERSIONS, http_error, json};
use crate::auth::Caller;
use crate::clock::now_ms;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::time::Instant;

/// A request refused before its method: the whole answer (boxed: it is large).
pub type Refusal = Box<Response>;

/// Who is calling, with what the MCP routes need to know about them.
pub struct Who {
    pub caller: Caller,
    pub team: String,
    pub tools: Arc<super::ConsumerTools>,
}

/// Origin, then the caller. The error is the whole answer (403, 401 with a challenge).
pub async fn admit(s: &McpState, headers: &HeaderMap) -> Result<Who, Refusal> {
    if !super::origin_allowed(headers, &s.mcp.config.allowed_origins) {
        return Err(Box::new(http_error(
            StatusCode::FORBIDDEN,
            jsonrpc::error(Value::Null, jsonrpc::INVALID_REQUEST, "origin not allowed"),
        )));
    }
    let caller = match s.gw.auth.authenticate_mcp(headers, &s.gw.limits).await {
        Ok(c) => c,
        Err(e) => return Err(Box::new(super::discovery::challenge(s, headers, e))),
    };
    if let Some(e) = s.gw.limits.refused(&caller.consumer, None) {
        return Err(Box::new(e.into_response()));
    }
    let mut tools = s
        .mcp
        .consumers
        .get(&*caller.consumer)
        .cloned()
        .unwrap_or_default();
    if !s.mcp.consumers.contains_key(&*caller.consumer)
        && let Some(claimed) = caller.jwt.as_ref().and_then(|j| j.tools.as_ref())
    {
        tools = Arc::new(super::ConsumerTools {
            allow: super::glob::AllowList::new(claimed),
            ..Default::default()
        });
    }
    let team = caller
        .team
        .clone()
        .or_else(|| tools.team.clone())
        .unwrap_or_default();
    Ok(Who {
        caller,
        team,
        tools,
    })
}

/// The session a request names: 400 when it names none, 404 when it cannot be opened, has
/// expired, or belongs to another caller or route (the client then initializes again).
pub fn session_of(
    s: &McpState,
    headers: &HeaderMap,
    who: &Who,
    route: Option<&str>,
) -> Result<Session, Refusal> {
    let Some(id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
        return Err(Box::new(http_error(
            StatusCode::BAD_REQUEST,
            jsonrpc::error(
                Value::Null,
                jsonrpc::INVALID_REQUEST,
                "Mcp-Session-Id header required",
            ),
        )));
    };
    if s.mcp.renewed.ended(id) {
        return Err(Box::new(session_not_found()));
    }
    match s.mcp.sealer.open(id, now_ms() / 1000) {
        Some(sess) if *sess.consumer == *who.caller.consumer && sess.route.as_deref() == route => {
            Ok(sess)
        }
        _ => Err(Box::new(session_not_found())),
    }
}

pub fn session_not_found() -> Response {
    http_error(
        StatusCode::NOT_FOUND,
        jsonrpc::error(Value::Null, jsonrpc::INVALID_REQUEST, "session not found"),
    )
}

/// `POST /mcp` and `POST /mcp/{server}`.
pub async fn post(s: McpState, route: Option<String>, headers: HeaderMap, body: Body) -> Response {
    let who = match admit(&s, &headers).await {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let upstream = match &route {
        Some(name) => match s.mcp.upstream(name) {
            Some(u) if who.tools.allow.reaches(name) => Some(u.clone()),
            _ => {
                return http_error(
                    StatusCode::NOT_FOUND,
                    jsonrpc::error(Value::Null, jsonrpc::INVALID_REQUEST, "no such MCP server"),
                );
            }
        },
        None => None,
    };
    let limit = s.mcp.config.max_message_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                jsonrpc::error(
                    Value::Null,
                    jsonrpc::INVALID_REQUEST,
                    &format!("message larger than {limit} bytes"),
                ),
            );
        }
    };
    let msg = match jsonrpc::parse(&body) {
        Ok(m) => m,
        Err(e) => return http_error(StatusCode::BAD_REQUEST, e),
    };
    if let Message::Request { id, method, .. } = &msg {
        // The 2026 stateless revision's probe: "not found" makes clients use `initialize`.
        if method == "server/discover" {
            return json(jsonrpc::error(
                id.clone(),
                jsonrpc::METHOD_NOT_FOUND,
                "Method not found",
            ));
        }
        if method == "initialize" {
            return match &upstream {
                Some(u) if u.rest.is_some() => {
                    super::rest::initialize(&s, &who, u, id.clone(), &msg)
                }
                Some(u) => initialize_one(&s, &who, u, id.clone(), body, &headers).await,
                None => super::federate::initialize(&s, &who, id.clone(), &msg).await,
            };
        }
    }
    if let Some(v) = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        && !VERSIONS.contains(&v)
    {
        return http_error(
            StatusCode::BAD_REQUEST,
            jsonrpc::error(
                Value::Null,
                jsonrpc::INVALID_REQUEST,
                &format!("unsupported MCP-Protocol-Version {v:?}"),
            ),
        );
    }
    let sess = match session_of(&s, &headers, &who, route.as_deref()) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let traceparent = headers.get("traceparent").cloned();
    match upstream {
        Some(u) if u.rest.is_some() => super::rest::one(&s, &who, &u, msg, body, &headers).await,
        Some(u) => one(&s, &who, &sess, &u, msg, body, traceparent, &headers).await,
        None => super::federate::dispatch(&s, &who, &sess, msg, &headers).await,
    }
}

/// `initialize` on `/mcp/{server}`: passed through; the answer carries a sealed session.
async fn initialize_one(
    s: &McpState,
    who: &Who,
    u: &Arc<Upstream>,
    id: Value,
    body: Bytes,
    headers: &HeaderMap,
) -> Response {
    let carry = Carry {
        session: None,
        version: headers
            .get("mcp-protocol-version")
            .and_then(|v| v.to_str().ok()),
        traceparent: headers.get("traceparent").cloned(),
        capabilities: None,
    };
    let capabilities = serde_json::from_slice::<Value>(&body)
        .ok()
        .map(|m| m["params"]["capabilities"].clone())
        .filter(|c| c.is_object());
    let answer = match exchange(s, u, &carry, body, &id).await {
        Ok((answer, session)) => (answer, session),
        Err(f) => return json(f.to_jsonrpc(&u.name, id)),
    };
    let (answer, upstream_session) = answer;
    let Some(version) = answer["result"]["protocolVersion"]
        .as_str()
        .map(String::from)
    else {
        return json(answer);
    };
    let sess = Session {
        capabilities,
        ..Session::one_server(
            &who.caller.consumer,
            &u.name,
            upstream_session,
            version,
            now_ms() / 1000 + s.mcp.config.session_ttl_s,
        )
    };
    with_session(json(answer), &s.mcp.sealer.seal(&sess))
}

pub fn with_session(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("mcp-session-id", v);
    }
    resp
}

/// One request to an upstream, its answer collected (intermediate messages are dropped):
/// initialize and list pages. Bounded by the server's timeout.
pub async fn exchange(
    s: &McpState,
    u: &Upstream,
    carry: &Carry<'_>,
    body: Bytes,
    id: &Value,
) -> Result<(Value, Option<String>), Fault> {
    let deadline = Instant::now() + u.timeout;
    let timeout = Fault::Timeout(u.timeout.as_millis() as u64);
    let run = async {
        let reply = s.mcp.send(u, carry, body).await?;
        let Some(mut reply) = reply else {
            return Err(Fault::Garbage("no answer to a request".into()));
        };
        while let Some(m) = reply.messages.next().await {
            let m = m?;
            if jsonrpc::answers(&m, id) {
                super::upstream::drain(reply.messages);
                return Ok((m, reply.session));
            }
        }
        Err(Fault::Garbage("the stream ended without an answer".into()))
    };
    tokio::time::timeout_at(deadline, run)
        .await
        .unwrap_or(Err(timeout))
}

/// A method on `/mcp/{server}`.
#[allow(clippy::too_many_arguments)]
async fn one(
    s: &McpState,
    who: &Who,
    sess: &Session,
    u: &Arc<Upstream>,
    msg: Message,
    body: Bytes,
    traceparent: Option<HeaderValue>,
    headers: &HeaderMap,
) -> Response {
    let up = sess.upstream(&u.name);
    let carry = Carry {
        session: up.and_then(|x| x.id.as_deref()),
        version: up.map(|x| x.version.as_str()),
        traceparent,
        capabilities: sess.capabilities.as_ref(),
    };
    match msg {
        Message::Request { id, method, msg } => match method.as_str() {
            "tools/list" => match super::tools::list(s, who, u, &carry, &id).await {
                Ok(tools) => json(jsonrpc::result(id, json!({"tools": tools}))),
                Err(Ok(answer)) => json(answer),
                Err(Err(f)) => fault_response(&u.name, f, id),
            },
            "tools/call" => {
                let tool = msg["params"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if !super::tools::callable(s, who, u, &carry, &tool).await {
                    return json(super::calls::unknown_tool(id, &tool));
                }
                super::calls::call(s, who, u, &carry, id, body, &tool, false, headers).await
            }
            _ => match s.mcp.send(u, &carry, body).await {
                Ok(Some(reply)) => relay(reply, id, u, None, false),
                Ok(None) => json(Fault::Garbage("no answer".into()).to_jsonrpc(&u.name, id)),
                Err(f) => fault_response(&u.name, f, id),
            },
        },
        Message::Notification { .. } | Message::Response { .. } => {
            match s.mcp.send(u, &carry, body).await {
                Ok(_) => StatusCode::ACCEPTED.into_response(),
                Err(f) => fault_response(&u.name, f, Value::Null),
            }
        }
    }
}

/// A fault as the client sees it: 404 when the upstream lost the session (the client
/// initializes again), else a JSON-RPC error naming the server.
pub fn fault_response(server: &str, f: Fault, id: Value) -> Response {
    if f == Fault::SessionGone {
        return session_not_found();
    }
    tracing::debug!(server, fault = ?f, "MCP upstream fault");
    json(f.to_jsonrpc(server, id))
}

/// Called once with the answer to the client's request as it passes (tool-call outcomes).
pub type Observer = Box<dyn FnOnce(&Value) + Send>;

/// An upstream's answer relayed to the client: JSON as JSON, a stream as a stream, ending
/// after the answer to `id`. On the federated route (`wrap = true`) the upstream's own
/// requests get ids naming it. A stream that ends, fails or outlasts the server's timeout
/// before the answer ends with a JSON-RPC error answer instead.
pub fn relay(
    reply: Reply,
    id: Value,
    u: &Upstream,
    observe: Option<Observer>,
    wrap: bool,
) -> Response {
    let server = u.name.clone();
    let deadline = Instant::now() + u.timeout;
    let timeout_ms = u.timeout.as_millis() as u64;
    let json_reply = reply.json;
    struct St {
        messages: futures::stream::BoxStream<'static, Result<Value, Fault>>,
        observe: Option<Observer>,
        done: bool,
    }
    let st = St {
        messages: reply.messages,
        observe,
        done: false,
    };
    let out = futures::stream::unfold(st, move |mut st| {
        let (server, id) = (server.clone(), id.clone());
        async move {
            if st.done {
                return None;
            }
            let next = tokio::time::timeout_at(deadline, st.messages.next()).await;
            let mut m = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(f))) => f.to_jsonrpc(&server, id.clone()),
                Ok(None) => Fault::Garbage("the stream ended without an answer".into())
                    .to_jsonrpc(&server, id.clone()),
                Err(_) => Fault::Timeout(timeout_ms).to_jsonrpc(&server, id.clone()),
            };
            if wrap && jsonrpc::is_request(&m) {
                m["id"] = jsonrpc::wrap_id(&server, &m["id"]);
            }
            if m.get("error").is_some() && m.get("method").is_none() && m["id"].is_null() {
                m["id"] = id.clone();
            }
            if jsonrpc::answers(&m, &id) {
                st.done = true;
                if let Some(f) = st.observe.take() {
                    f(&m);
                }
                let rest = std::mem::replace(&mut st.messages, futures::stream::empty().boxed());
                super::upstream::drain(rest);
            }
            Some((m, st))
        }
    });
    if json_reply {
        let body = futures::StreamExt::take(out, 1)
            .map(|m| Ok::<_, std::convert::Infallible>(Bytes::from(m.to_string())));
        return (
            [(http::header::CONTENT_TYPE, "application/json")],
            Body::from_stream(body),
        )
            .into_response();
    }
    let body = out.map(|m| Ok::<_, std::convert::Infallible>(sse_event(&m)));
    (
        [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

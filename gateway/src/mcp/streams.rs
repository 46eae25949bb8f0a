//! GET (the server's own stream: its requests and notifications outside any POST) and DELETE
//! (end the session). On `/mcp/{server}` the upstream's stream is relayed; on `/mcp` the
//! streams of every member server are merged, their requests' ids naming their server.

use super::serve::{Who, admit, session_not_found, session_of};
use super::session::{Session, UpstreamSession};
use super::upstream::{Carry, Fault, sse_event};
use super::{Mcp, McpState, http_error, jsonrpc};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::future::join_all;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

async fn opened(
    s: &McpState,
    route: Option<&str>,
    headers: &HeaderMap,
) -> Result<(Who, Session), super::serve::Refusal> {
    let who = admit(s, headers).await?;
    if let Some(r) = route
        && (s.mcp.upstream(r).is_none() || !who.tools.allow.reaches(r))
    {
        return Err(Box::new(session_not_found()));
    }
    let sess = session_of(s, headers, &who, route)?;
    Ok((who, sess))
}

/// The session this replica renewed the client's upstream session `p` on `server` to, if any.
fn renewed_id(mcp: &Mcp, server: &str, p: &UpstreamSession) -> Option<String> {
    p.id.as_deref()
        .and_then(|id| mcp.renewed.current(server, id))
}

/// What a GET or DELETE carries for `p`: its renewed session, else its own, and its version.
fn carry_for<'a>(renewed: &'a Option<String>, p: &'a UpstreamSession) -> Carry<'a> {
    Carry {
        session: renewed.as_deref().or(p.id.as_deref()),
        version: Some(p.version.as_str()),
        traceparent: None,
        capabilities: None,
    }
}

/// `GET /mcp` and `GET /mcp/{server}`.
pub async fn get(s: McpState, route: Option<String>, headers: HeaderMap) -> Response {
    let (who, sess) = match opened(&s, route.as_deref(), &headers).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let wrap = route.is_none();
    let members: Vec<_> = sess
        .upstreams
        .iter()
        .filter(|p| who.tools.allow.reaches(&p.server))
        .filter_map(|p| s.mcp.upstream(&p.server).map(|u| (u.clone(), p.clone())))
        .collect();
    let mcp = &*s.mcp;
    let opened = join_all(members.iter().map(|(u, p)| async move {
        let renewed = renewed_id(mcp, &u.name, p);
        let carry = carry_for(&renewed, p);
        (u.name.clone(), u.get(&mcp.client, &carry).await)
    }))
    .await;
    let mut streams = Vec::new();
    for (server, r) in opened {
        match r {
            Ok(Some(reply)) => {
                let server = server.clone();
                streams.push(
                    reply
                        .messages
                        .filter_map(move |m| {
                            let server = server.clone();
                            async move {
                                let mut m = m.ok()?;
                                if wrap && jsonrpc::is_request(&m) {
                                    m["id"] = jsonrpc::wrap_id(&server, &m["id"]);
                                }
                                Some(m)
                            }
                        })
                        .boxed(),
                );
            }
            Ok(None) => {}
            Err(Fault::SessionGone) if !wrap => return session_not_found(),
            Err(f) if !wrap => {
                return http_error(
                    StatusCode::BAD_GATEWAY,
                    jsonrpc::error(Value::Null, jsonrpc::SERVER_ERROR, &f.describe(&server)),
                );
            }
            Err(f) => tracing::debug!(server, fault = ?f, "no GET stream from this server"),
        }
    }
    if streams.is_empty() {
        return http_error(
            StatusCode::METHOD_NOT_ALLOWED,
            jsonrpc::error(
                Value::Null,
                jsonrpc::INVALID_REQUEST,
                "no server stream offered",
            ),
        );
    }
    let body = futures::stream::select_all(streams)
        .map(|m| Ok::<_, std::convert::Infallible>(sse_event(&m)));
    (
        [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// `DELETE /mcp` and `DELETE /mcp/{server}`: every upstream session of it is ended, and this
/// replica answers 404 for the id from now on. The sealed id is not revoked cluster-wide:
/// another replica would start new upstream sessions for it until it expires.
pub async fn delete(s: McpState, route: Option<String>, headers: HeaderMap) -> Response {
    let (_, sess) = match opened(&s, route.as_deref(), &headers).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let mcp = &*s.mcp;
    join_all(sess.upstreams.iter().filter_map(|p| {
        let u = mcp.upstream(&p.server)?.clone();
        let client = mcp.client.clone();
        Some(async move {
            let renewed = renewed_id(mcp, &u.name, p);
            let carry = carry_for(&renewed, p);
            if carry.session.is_some() {
                u.delete(&client, &carry).await;
            }
        })
    }))
    .await;
    if let Some(id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        mcp.renewed.end(id);
    }
    StatusCode::OK.into_response()
}

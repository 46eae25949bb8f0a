//! OAuth discovery for MCP clients (RFC 9728): `/.well-known/oauth-protected-resource` names
//! the `/mcp` URL as the resource and `auth.jwt.issuer` as its authorization server; a request
//! without valid credentials gets 401 with `WWW-Authenticate: Bearer resource_metadata=…`, so
//! a client finds where to get a token.

use super::{McpState, http_error, jsonrpc};
use crate::error::Error;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{Value, json};

/// The public base URL (`scheme://host`) of this gateway as the client reached it.
fn base_url(s: &McpState, headers: &HeaderMap) -> String {
    if let Some(r) = &s.mcp.config.resource_url {
        let r = r.trim_end_matches('/');
        return r.strip_suffix("/mcp").unwrap_or(r).to_string();
    }
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(http::header::HOST))
        .and_then(|v| v.to_str().ok())
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost");
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    format!("{proto}://{host}")
}

/// The protected resource metadata.
pub fn metadata(s: &McpState, headers: &HeaderMap) -> Response {
    let base = base_url(s, headers);
    let servers: Vec<&String> = s.mcp.issuer.iter().collect();
    axum::Json(json!({
        "resource": format!("{base}/mcp"),
        "authorization_servers": servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "tollgate MCP gateway",
    }))
    .into_response()
}

/// The answer to a failed authentication on an MCP route: 401 with the challenge that points
/// at the metadata (when JWTs are accepted), any other error as the model routes give it.
pub fn challenge(s: &McpState, headers: &HeaderMap, e: Error) -> Response {
    if !matches!(e, Error::Unauthenticated) {
        return e.into_response();
    }
    let mut resp = http_error(
        StatusCode::UNAUTHORIZED,
        jsonrpc::error(
            Value::Null,
            jsonrpc::INVALID_REQUEST,
            "authentication required",
        ),
    );
    let value = if s.mcp.issuer.is_some() {
        let url = format!(
            "{}/.well-known/oauth-protected-resource/mcp",
            base_url(s, headers)
        );
        format!("Bearer resource_metadata=\"{url}\"")
    } else {
        "Bearer".to_string()
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    resp
}

//! The MCP gateway (`[[mcp_servers]]`, `/mcp`, `/mcp/{server}`): agents' tool traffic through
//! the same keys, JWTs, limits, showback and traces as model traffic.
//!
//! `/mcp/{server}` fronts one upstream MCP server; `/mcp` federates every server the caller
//! may reach, its tools named `server__tool`. Both speak streamable HTTP (POST, GET, DELETE).
//! A request passes, in order: the `Origin` check, authentication ([`crate::auth`], where
//! `auth.jwt.mcp_audience` is accepted), the message size cap, the session (a sealed id any
//! replica opens, [`session`]), then the method: `tools/list` filtered to the caller's
//! allow-list, `tools/call` allow-listed and limited ([`calls`]), everything else passed
//! through ([`serve`], [`federate`]). An upstream's own requests to the client and its
//! notifications come back on the same stream; the client's answers go to the upstream named
//! in the session, whichever replica receives them.
//!
//! - [`glob`]: tool patterns and allow-lists. [`jsonrpc`]: messages, errors, federated ids.
//! - [`session`]: sealed session ids. [`upstream`]: one upstream server, SSE parsing.
//! - [`serve`]: the POST path of both routes. [`federate`]: what `/mcp` adds.
//! - [`calls`]: `tools/call` — limits, outcome, metrics, usage, span.
//! - [`streams`]: GET and DELETE. [`discovery`]: OAuth protected-resource metadata, 401s.
//! - [`renew`]: upstream sessions renewed when an upstream lost them.
//! - [`openapi`]: REST APIs described by OpenAPI documents, exported as tools.
//! - [`tools`]: tool lists (pages, filters) and which tools exist.
//! - [`openapi`]: a REST API described by an OpenAPI document, as tools. [`rest`]: such an
//!   API as an upstream the gateway answers for (`[[mcp_servers]]` with `openapi`).

pub mod calls;
pub mod discovery;
pub mod federate;
pub mod glob;
pub mod jsonrpc;
pub mod openapi;
pub mod renew;
pub mod rest;
pub mod serve;
pub mod session;
pub mod streams;
pub mod tools;
pub mod upstream;

use crate::credentials::Credential;
use crate::gateway::Gateway;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use glob::AllowList;
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use session::Sealer;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tollgate_common::Period;
use tollgate_common::config::{BackendApi, Config, McpConfig};
use upstream::Upstream;

/// The protocol revisions reachable by the `initialize` handshake, oldest first. The stateless
/// per-request revision (2026-07-28) is not spoken yet: its `server/discover` probe is answered
/// "method not found", so clients fall back to `initialize`.
pub const VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// A configured consumer's MCP settings.
#[derive(Clone, Debug, Default)]
pub struct ConsumerTools {
    pub allow: AllowList,
    pub per_min: Option<u64>,
    pub quota: Option<u64>,
    pub period: Period,
    pub team: Option<String>,
}

/// The MCP gateway's state, built once.
pub struct Mcp {
    pub upstreams: Vec<Arc<Upstream>>,
    pub sealer: Sealer,
    pub config: McpConfig,
    /// Shared with each request (no copy of the allow-list per call).
    pub consumers: HashMap<String, Arc<ConsumerTools>>,
    pub client: reqwest::Client,
    pub metrics: Arc<calls::ToolMetrics>,
    /// `auth.jwt.issuer` when JWTs are accepted: the protected resource's authorization server.
    pub issuer: Option<String>,
    /// Upstream sessions replaced on this replica.
    pub renewed: renew::Renewed,
    /// The tools each upstream offers, as last read.
    pub known: tools::Known,
}

impl Mcp {
    /// Builds the upstreams (credentials started) and the session key.
    pub fn build(config: &Config) -> anyhow::Result<Arc<Mcp>> {
        let mut upstreams = Vec::new();
        for s in &config.mcp_servers {
            let at = format!("mcp_servers.{}", s.name);
            let credential = Credential::from_auth(&at, &s.name, BackendApi::Azure, &s.auth)?;
            if let Credential::Token(p) = &credential {
                p.start().map_err(|e| anyhow::anyhow!("{at}.auth: {e}"))?;
            }
            let rest = match &s.openapi {
                Some(doc) => Some(Arc::new(rest::load(s, doc, credential.clone())?)),
                None => None,
            };
            upstreams.push(Arc::new(Upstream {
                name: s.name.clone(),
                url: s.url.clone().unwrap_or_default(),
                tools: s.tools.clone(),
                timeout: Duration::from_millis(s.timeout_ms),
                credential,
                rest,
            }));
        }
        let sealer = match &config.mcp.session_key_env {
            Some(var) => {
                let key = tollgate_common::config::secret_from_env(var)
                    .map_err(|e| anyhow::anyhow!("mcp.session_key_env: {e}"))?;
                Sealer::new(key.expose().as_bytes())
            }
            None => {
                if !config.mcp_servers.is_empty() {
                    tracing::warn!(
                        "mcp.session_key_env is not set: MCP session ids are sealed with a random \
                         key of this process and do not survive a change of replica or a restart"
                    );
                }
                Sealer::random()
            }
        };
        let consumers = config
            .consumers
            .iter()
            .map(|c| {
                let t = ConsumerTools {
                    allow: AllowList::new(&c.mcp_tools),
                    per_min: c.tool_calls_per_min,
                    quota: c.tool_calls_quota,
                    period: c.quota_period,
                    team: c.team.clone(),
                };
                (c.id.clone(), Arc::new(t))
            })
            .collect();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // A redirect would carry the upstream's credential elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let issuer = config
            .auth
            .jwt
            .as_ref()
            .filter(|_| config.auth.mode != tollgate_common::config::AuthMode::Key)
            .map(|j| j.issuer.clone());
        Ok(Arc::new(Mcp {
            metrics: Arc::new(calls::ToolMetrics::new(&upstreams)),
            upstreams,
            sealer,
            config: config.mcp.clone(),
            consumers,
            client,
            issuer,
            renewed: renew::Renewed::default(),
            known: tools::Known::default(),
        }))
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// The state of the MCP routes.
#[derive(Clone)]
pub struct McpState {
    pub gw: Arc<Gateway>,
    pub mcp: Arc<Mcp>,
}

/// `/mcp`, `/mcp/{server}` and the OAuth protected-resource metadata.
pub fn router(gw: Arc<Gateway>, mcp: Arc<Mcp>) -> Router {
    let federated = get(|State(s): State<McpState>, h: HeaderMap| streams::get(s, None, h))
        .post(
            |State(s): State<McpState>, h: HeaderMap, b: axum::body::Body| {
                serve::post(s, None, h, b)
            },
        )
        .delete(|State(s): State<McpState>, h: HeaderMap| streams::delete(s, None, h));
    let single = get(
        |State(s): State<McpState>, Path(server): Path<String>, h: HeaderMap| {
            streams::get(s, Some(server), h)
        },
    )
    .post(
        |State(s): State<McpState>,
         Path(server): Path<String>,
         h: HeaderMap,
         b: axum::body::Body| { serve::post(s, Some(server), h, b) },
    )
    .delete(
        |State(s): State<McpState>, Path(server): Path<String>, h: HeaderMap| {
            streams::delete(s, Some(server), h)
        },
    );
    Router::new()
        .route("/mcp", federated)
        .route("/mcp/{server}", single)
        .route(
            "/.well-known/oauth-protected-resource",
            get(|State(s): State<McpState>, h: HeaderMap| async move { discovery::metadata(&s, &h) }),
        )
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(|State(s): State<McpState>, h: HeaderMap| async move { discovery::metadata(&s, &h) }),
        )
        .route(
            "/.well-known/oauth-protected-resource/mcp/{server}",
            get(|State(s): State<McpState>, h: HeaderMap| async move { discovery::metadata(&s, &h) }),
        )
        .with_state(McpState { gw, mcp })
}

/// An HTTP answer with a JSON-RPC body (errors the transport gives: 400, 403, 404, 413, ...).
pub fn http_error(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The answer for a JSON-RPC message to the client: `application/json`, 200.
pub fn json(body: Value) -> Response {
    axum::Json(body).into_response()
}

/// Whether the request's `Origin` may call: none given (not a browser), the request's own host,
/// localhost, or one of `mcp.allowed_origins`. Guards against DNS rebinding (MCP spec).
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    let Some(authority) = origin.split_once("://").map(|(_, r)| r) else {
        return false;
    };
    let host_of = |a: &str| -> String {
        let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
        if let Some(rest) = a.strip_prefix('[') {
            return rest
                .split(']')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
        }
        a.split(':').next().unwrap_or_default().to_ascii_lowercase()
    };
    let host = host_of(authority);
    if matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1") {
        return true;
    }
    let own = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.to_ascii_lowercase());
    own.is_some_and(|own| own == authority.to_ascii_lowercase() || host_of(&own) == host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    /// No Origin, the own host, localhost and configured origins pass; others do not.
    #[test]
    fn origins() {
        let allowed = vec!["https://app.example".to_string()];
        assert!(origin_allowed(&h(&[]), &allowed));
        assert!(origin_allowed(
            &h(&[
                ("origin", "http://gw.local:8080"),
                ("host", "gw.local:8080")
            ]),
            &allowed
        ));
        assert!(origin_allowed(
            &h(&[("origin", "http://localhost:3000")]),
            &allowed
        ));
        assert!(origin_allowed(
            &h(&[("origin", "http://[::1]:3000")]),
            &allowed
        ));
        assert!(origin_allowed(
            &h(&[("origin", "https://app.example")]),
            &allowed
        ));
        assert!(!origin_allowed(
            &h(&[("origin", "https://evil.example"), ("host", "gw.local")]),
            &allowed
        ));
        assert!(!origin_allowed(&h(&[("origin", "null")]), &allowed));
    }
}

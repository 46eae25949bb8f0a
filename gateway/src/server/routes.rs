//! The HTTP surface (a contract, see DESIGN.md): the model routes in their three styles,
//! `/v1/models`, and the unauthenticated `/healthz`, `/readyz` and `/metrics`.

use super::Gateway;
use crate::pipeline::{self, Incoming};
use crate::request::{Operation, RouteStyle};
use crate::routing::CircuitState;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::HeaderMap;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_quota::Store;

fn model_route(op: Operation, azure_v1: bool) -> axum::routing::MethodRouter<Arc<Gateway>> {
    post(
        move |State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body| {
            let style = if azure_v1 {
                RouteStyle::AzureV1
            } else {
                RouteStyle::OpenAi
            };
            pipeline::handle(gw, Incoming::new(op, style, headers, body))
        },
    )
}

fn deployment_route(op: Operation) -> axum::routing::MethodRouter<Arc<Gateway>> {
    post(
        move |State(gw): State<Arc<Gateway>>,
              Path(deployment): Path<String>,
              Query(q): Query<HashMap<String, String>>,
              headers: HeaderMap,
              body: Body| {
            let style = RouteStyle::AzureDeployment {
                deployment,
                api_version: q.get("api-version").cloned(),
            };
            pipeline::handle(gw, Incoming::new(op, style, headers, body))
        },
    )
}

/// Every route of the HTTP surface but the MCP ones ([`crate::mcp::router`]); `mcp` adds the
/// tool-call metrics to `/metrics`.
pub fn router(gw: Arc<Gateway>, mcp: Option<Arc<crate::mcp::calls::ToolMetrics>>) -> Router {
    use Operation::*;
    let mut r = Router::new();
    for (op, path) in [
        (Chat, "chat/completions"),
        (Completions, "completions"),
        (Embeddings, "embeddings"),
        (Responses, "responses"),
    ] {
        r = r
            .route(&format!("/v1/{path}"), model_route(op, false))
            .route(&format!("/openai/v1/{path}"), model_route(op, true));
        if op != Responses {
            r = r.route(
                &format!("/openai/deployments/{{deployment}}/{path}"),
                deployment_route(op),
            );
        }
    }
    r.route(
        "/v1/models",
        get(|State(gw): State<Arc<Gateway>>, h: HeaderMap| pipeline::models(gw, h)),
    )
    .route(
        "/openai/v1/models",
        get(|State(gw): State<Arc<Gateway>>, h: HeaderMap| pipeline::models(gw, h)),
    )
    .route(
        "/healthz",
        get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
    )
    .route("/readyz", get(readyz))
    .route(
        "/metrics",
        get(move |gw: State<Arc<Gateway>>| metrics(gw, mcp.clone())),
    )
    .fallback(|| async { crate::error::Error::RouteNotFound.into_response() })
    .method_not_allowed_fallback(|| async { crate::error::Error::MethodNotAllowed.into_response() })
    .with_state(gw)
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    use tollgate_common::config::OnError;
    let kind = gw.config.store.kind.as_str();
    let store = &gw.config.store;
    let reachable = gw.limits.store.ping().await.is_ok();
    let seeded = gw.limits.seeds.done();
    let degraded_ms = gw.limits.degraded_for().as_millis() as u64;
    let (status, mode) = match (reachable, store.on_error) {
        // The store answers but refuses the configured consumers (full, read-only): their keys
        // would fail, so this replica should not get traffic.
        (true, _) if !seeded => (503, "seeding"),
        (true, _) => (200, "shared"),
        (false, _) if store.unready_when_degraded && degraded_ms >= store.max_degraded_ms => {
            (503, "degraded")
        }
        (false, OnError::Escrow) => (200, "escrow"),
        (false, OnError::Local) => (200, "fallback_local"),
        (false, OnError::FailOpen) => (200, "fallback_open"),
        (false, OnError::FailClosed) => (503, "unavailable"),
    };
    let body = serde_json::json!({"status": if status == 200 {"ready"} else {"not_ready"},
        "store": kind, "store_reachable": reachable, "mode": mode, "seeded": seeded,
        "degraded_s": degraded_ms / 1000});
    (
        http::StatusCode::from_u16(status).unwrap_or_default(),
        axum::Json(body),
    )
        .into_response()
}

async fn metrics(
    State(gw): State<Arc<Gateway>>,
    mcp: Option<Arc<crate::mcp::calls::ToolMetrics>>,
) -> Response {
    use std::fmt::Write as _;
    let mut extra = format!(
        "# HELP tollgate_store_degraded Whether the fallback policy is in force\n\
         # TYPE tollgate_store_degraded gauge\ntollgate_store_degraded {}\n\
         # HELP tollgate_store_degraded_seconds How long the store has been unreachable (0 when it answers)\n\
         # TYPE tollgate_store_degraded_seconds gauge\ntollgate_store_degraded_seconds {:.3}\n\
         # HELP tollgate_replicas Live replicas sharing the store\n\
         # TYPE tollgate_replicas gauge\ntollgate_replicas {}\n\
         # HELP tollgate_breaker_state Circuit per backend: 0 closed, 1 open, 2 half-open\n\
         # TYPE tollgate_breaker_state gauge\n",
        gw.limits.degraded() as u8,
        gw.limits.degraded_for().as_secs_f64(),
        gw.limits.replicas(),
    );
    let now = crate::clock::now_ms();
    for b in &gw.routes.backends {
        let state: CircuitState = b.circuit.state(now);
        let _ = writeln!(
            extra,
            "tollgate_breaker_state{{backend=\"{}\"}} {}",
            b.name,
            state.gauge()
        );
    }
    // What a dashboard needs to tell PTU from PAYG and to compute a PTU's utilization.
    extra.push_str(
        "# HELP tollgate_backend_info A configured backend (always 1): its priority and whether it is a PTU (declares monthly_cost)\n\
         # TYPE tollgate_backend_info gauge\n",
    );
    for b in &gw.config.backends {
        let _ = writeln!(
            extra,
            "tollgate_backend_info{{backend=\"{}\",priority=\"{}\",ptu=\"{}\"}} 1",
            b.name,
            b.priority,
            b.monthly_cost.is_some()
        );
    }
    extra.push_str(
        "# HELP tollgate_backend_capacity_tpm The tokens per minute a PTU was sized for (capacity_tpm)\n\
         # TYPE tollgate_backend_capacity_tpm gauge\n",
    );
    for b in &gw.config.backends {
        if let Some(tpm) = b.capacity_tpm {
            let _ = writeln!(
                extra,
                "tollgate_backend_capacity_tpm{{backend=\"{}\"}} {tpm}",
                b.name
            );
        }
    }
    extra.push_str(&gw.caches.metrics().render());
    if let Some(otel) = &gw.telemetry.otel {
        otel.render_prometheus(&mut extra);
    }
    if let Some(m) = mcp {
        extra.push_str(&m.render());
    }
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.telemetry.metrics.render(&extra),
    )
        .into_response()
}

//! The request path, in order. Each step says why it sits where it does.

use crate::clock::now_ms;
use crate::error::Error;
use crate::gateway::Gateway;
use crate::proxy::Forward;
use crate::record::Admitted;
use crate::request::{self, ClientRequest, Operation, RouteStyle};
use crate::telemetry::{RequestSpan, incoming_trace_id};
use crate::usage::Meter;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue};
use std::sync::Arc;
use std::time::Instant;

/// One model request as the router hands it over.
pub struct Incoming {
    pub op: Operation,
    pub style: RouteStyle,
    pub headers: HeaderMap,
    pub body: Body,
}

impl Incoming {
    pub fn new(op: Operation, style: RouteStyle, headers: HeaderMap, body: Body) -> Incoming {
        Incoming {
            op,
            style,
            headers,
            body,
        }
    }
}

/// What the pipeline knows about a request before anything else: when it came, its id, and
/// its span (started first, so that it covers the whole request).
struct Context {
    started: Instant,
    request_id: String,
    /// Taken by the meter once the request is admitted; ended on an early error otherwise.
    span: Option<RequestSpan>,
}

/// Serves one model request and always answers with `x-request-id`.
pub async fn handle(gw: Arc<Gateway>, incoming: Incoming) -> Response {
    let Incoming {
        op,
        style,
        headers,
        body,
    } = incoming;
    // The span continues the client's `traceparent`; the backend and the client get the
    // gateway span's instead.
    let mut cx = Context {
        started: Instant::now(),
        request_id: request_id(&headers),
        span: gw.telemetry.start_span(&headers),
    };
    let traceparent = cx.span.as_ref().map(|s| s.traceparent());
    let mut resp = match serve(&gw, op, style, &headers, body, &mut cx).await {
        Ok(r) => r,
        Err(e) => {
            let api = e.to_api();
            gw.telemetry.metrics.error(api.kind.code());
            if let Some(s) = cx.span.take() {
                s.fail(api.kind.status().as_u16(), api.kind.code());
            }
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&cx.request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(tp) = traceparent {
        resp.headers_mut().insert("traceparent", tp);
    }
    resp
}

/// The client's `x-request-id` when it is sane, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn serve(
    gw: &Gateway,
    op: Operation,
    style: RouteStyle,
    headers: &HeaderMap,
    body: Body,
    cx: &mut Context,
) -> Result<Response, Error> {
    // 1. Authenticate before reading the body: an unknown caller costs nothing more, and
    //    neither does a consumer this replica just saw disabled.
    let caller = gw.auth.authenticate(headers, &gw.limits).await?;
    if let Some(e) = gw.limits.refused(&caller.consumer, None) {
        return Err(e);
    }

    // 2. Read the body, bounded: nothing larger than `server.max_body_bytes` is held.
    let body = read_body(headers, body, gw.config.server.max_body_bytes).await?;

    // 3. Parse only the fields the gateway needs (a large body off the runtime); the bytes are
    //    forwarded as they came.
    let mut req = parse(op, style, body).await?;
    //    The dimensions (end user, app) from the same body, headers and token, once.
    let dims = gw
        .telemetry
        .dims
        .extract(headers, &req.body, caller.jwt.as_deref());

    // 4. An unknown model is a 404 before any tokens are reserved.
    if !gw.routes.has_model(&req.model) {
        return Err(Error::ModelNotFound(req.model));
    }

    // 4b. A model whose `model_claims` the caller's token lacks: 403, nothing reserved.
    if !caller.may_use(&req.model) {
        return Err(Error::ModelNotAllowed(req.model));
    }

    // 4c. The cache, after the caller is known and before anything is reserved: a hit costs
    //     nothing, so it reserves nothing (served only to a caller whose record, at most
    //     250 ms old, would be admitted). A miss carries where its answer will be kept.
    let cached = if gw.caches.is_empty() {
        None
    } else {
        gw.caches
            .lookup(&gw.limits, &caller, &req, headers, &cx.request_id)
            .await
    };
    if let Some(d) = cached.as_ref().filter(|d| d.hit.is_some()) {
        let team = d.hit.as_ref().map(|h| h.team.clone()).unwrap_or_default();
        let admitted = Admitted {
            request_id: cx.request_id.clone(),
            consumer: caller.consumer.clone(),
            reserved: crate::cache::unreserved(&team),
            team,
            model: req.model.clone(),
            op,
            stream: req.stream,
            prompt_tokens: 0,
            started: cx.started,
            trace_id: match cx.span.as_ref() {
                Some(s) => s.trace_id(),
                None => incoming_trace_id(headers),
            },
            dims,
        };
        let meter = Meter::new(gw.usage_tx.clone(), admitted, cx.span.take());
        return Ok(gw.caches.serve(d, &req, &gw.routes, meter));
    }

    // 5. Estimate every billed input (text by tiktoken, off the runtime when large; tools,
    //    schemas, images, audio, files) + the output reserved, which is what the backend may
    //    write: an uncapped request is capped at the reservation.
    let per_choice = req
        .max_output
        .unwrap_or(gw.config.limits.default_max_tokens);
    if req.max_output.is_none() {
        req.output_cap = req.output_cap_field().map(|f| (f, per_choice));
    }
    let output = match op {
        Operation::Embeddings => 0,
        _ => per_choice.saturating_mul(req.choices),
    };
    //    A consumer whose quota this replica just saw spent is refused before the prompt's CPU
    //    is spent (at least one token per `MAX_RUN` bytes of text, the tokenizer's own bound).
    let at_least = output
        .saturating_add(req.prompt.fixed)
        .saturating_add((req.prompt.text_bytes() / crate::estimate::MAX_RUN) as u64);
    if let Some(e) = gw.limits.refused(&caller.consumer, Some(at_least)) {
        return Err(e);
    }
    gw.telemetry.metrics.estimate_text(req.prompt.text_bytes());
    let prompt = std::mem::take(&mut req.prompt);
    let prompt_tokens = gw.tokenizer.count_prompt(prompt).await;
    let estimate = prompt_tokens.saturating_add(output);
    //    Its cost at the highest prices among the model's backends: the route is chosen later.
    let cost_nano = gw.routes.max_cost_nano(&req.model, prompt_tokens, output);

    // 6. Reserve: the one store round trip on the path (limits, model allow-list, bucket,
    //    quota, the consumer's budget; the team's budget alongside, in the team's own slot).
    let reserved = match gw
        .limits
        .reserve(
            crate::limits::Ask {
                consumer: &caller.consumer,
                model: &req.model,
                tokens: estimate,
                cost_nano,
                require_record: caller.require_record,
            },
            caller.team.as_deref(),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            crate::budgets::refused(gw, &caller, &e);
            return Err(e);
        }
    };
    let team = caller
        .team
        .clone()
        .unwrap_or_else(|| reserved.admission.team.clone());
    let remaining_tpm = reserved.admission.remaining_tpm;
    let remaining_quota = reserved.admission.remaining_quota;
    //    Thresholds crossed and gauges moved: compared here, delivered off the path.
    let remaining_budget = crate::budgets::admitted(gw, &caller.consumer, &team, &reserved);

    // 7. From here on the meter settles the reservation however the request ends (and the
    //    usage worker ends the span, with the tokens on it).
    let trace_id = match cx.span.as_ref() {
        Some(s) => s.trace_id(),
        None => incoming_trace_id(headers),
    };
    // The backend continues the gateway's span, not the client's.
    let traceparent = cx.span.as_ref().map(|s| s.traceparent());
    let admitted = Admitted {
        request_id: cx.request_id.clone(),
        consumer: caller.consumer.clone(),
        team,
        model: req.model.clone(),
        op,
        stream: req.stream,
        reserved,
        prompt_tokens,
        started: cx.started,
        trace_id,
        dims,
    };
    let mut meter = Meter::new(gw.usage_tx.clone(), admitted, cx.span.take());
    if let Some(d) = &cached {
        meter.observed().cache = Some(d.note());
    }

    // 8. Plan from the local circuit cache (no store call), then forward with failover
    //    before the first byte.
    let result = match gw.routes.plan(&req.model, now_ms()) {
        Ok(plan) => {
            let traced;
            let headers = match traceparent {
                Some(tp) => {
                    let mut h = headers.clone();
                    h.insert("traceparent", tp);
                    traced = h;
                    &traced
                }
                None => headers,
            };
            let fwd = Forward {
                client: &gw.upstream,
                breakers: &gw.breakers,
                req: &req,
                headers,
                request_id: &cx.request_id,
                cache: cached.as_ref().and_then(|d| d.store.as_ref()),
            };
            fwd.run(&plan, meter).await
        }
        Err(e) => {
            let mut meter = meter;
            meter.observed().status = e.to_api().kind.status().as_u16();
            Err(e)
        }
    };
    let mut resp = result?;

    // 9. What the client may want to know about its limits, the cache and (when asked) the
    //    route taken.
    let h = resp.headers_mut();
    if let Some(d) = &cached {
        d.headers(h);
    }
    if let Some(t) = remaining_tpm {
        h.insert("x-ratelimit-remaining-tokens", HeaderValue::from(t.max(0)));
    }
    if let Some(q) = remaining_quota {
        h.insert("x-quota-remaining-tokens", HeaderValue::from(q.max(0)));
    }
    if let Some(v) = remaining_budget {
        h.insert("x-budget-remaining", v);
    }
    if gw.config.server.debug_headers {
        if let Some(name) = resp_backend(&resp) {
            resp.headers_mut().insert("x-tollgate-backend", name);
        }
        if let Ok(v) = HeaderValue::from_str(&caller.consumer) {
            resp.headers_mut().insert("x-tollgate-consumer", v);
        }
    }
    Ok(resp)
}

fn resp_backend(resp: &Response) -> Option<HeaderValue> {
    resp.extensions()
        .get::<crate::proxy::ServedBy>()
        .and_then(|s| HeaderValue::from_str(&s.0).ok())
}

/// `request::parse`, off the runtime when the body is large: the JSON of a 100k-token prompt
/// is about half a millisecond the other requests on this worker would wait for.
async fn parse(
    op: Operation,
    style: RouteStyle,
    body: bytes::Bytes,
) -> Result<ClientRequest, Error> {
    if body.len() <= crate::heavy::INLINE_BYTES {
        return request::parse(op, style, body);
    }
    crate::heavy::offload(body.len(), move || request::parse(op, style, body))
        .await
        .unwrap_or_else(|| Err(Error::Internal("parsing the request body failed".into())))
}

/// Reads the body up to `limit` bytes; larger is a 413 whatever the client declared.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, Error> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::BodyTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            Error::BodyTooLarge { limit }
        } else if crate::connections::is_body_timeout(&e) {
            Error::BodyTimeout
        } else {
            Error::bad_request("could not read the request body")
        }
    })
}

/// `GET /v1/models`: the models this consumer may use.
pub async fn models(gw: Arc<Gateway>, headers: HeaderMap) -> Response {
    let caller = match gw.auth.authenticate(&headers, &gw.limits).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let allowed: Option<Vec<String>> = match gw.limits.get_consumer(&caller.consumer).await {
        Some(rec) if !rec.models.is_empty() => Some(rec.models),
        _ => None,
    };
    let mut ids: Vec<&String> = gw
        .routes
        .models()
        .filter(|m| allowed.as_ref().is_none_or(|a| a.contains(m)) && caller.may_use(m))
        .collect();
    ids.sort();
    let data: Vec<serde_json::Value> = ids
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::error::ErrorKind;

    /// A body over `heavy::INLINE_BYTES` parses off the runtime with the same answers: the
    /// request, or the same 400 as inline.
    #[tokio::test]
    async fn large_bodies_parse_off_the_runtime_alike() {
        let text = "word ".repeat(80 * 1024);
        let ok =
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{text}"}}]}}"#);
        assert!(ok.len() > crate::heavy::HEAVY_BYTES);
        let req = parse(Operation::Chat, RouteStyle::OpenAi, ok.clone().into())
            .await
            .unwrap();
        assert_eq!(req.model, "gpt-4o");
        assert_eq!(req.prompt.text_bytes(), text.len());
        for (body, inline) in [
            (
                ok[..ok.len() - 3].to_string(),
                r#"{"model":"gpt-4o","mess"#.to_string(),
            ),
            (
                format!(r#"{{"model":"gpt-4o","messages":"{text}"}}"#),
                r#"{"model":"gpt-4o","messages":"hi"}"#.to_string(),
            ),
        ] {
            let far = parse(Operation::Chat, RouteStyle::OpenAi, body.into()).await;
            let near = parse(Operation::Chat, RouteStyle::OpenAi, inline.into()).await;
            let (far, near) = (far.unwrap_err().to_api(), near.unwrap_err().to_api());
            assert!(
                matches!(far.kind, ErrorKind::InvalidRequest),
                "{}",
                far.message
            );
            assert_eq!((far.kind, far.param), (near.kind, near.param));
        }
    }
}

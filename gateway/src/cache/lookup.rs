//! The lookup, on the request path after authentication: which `[[cache]]` applies, whether
//! the caller may be served from it, the exact layer (one store round trip), then for semantic
//! caches the embedding and the nearest stored prompt (one more). All of it under
//! `lookup_timeout_ms`; any failure is a bypass. A hit is answered here, recorded as a
//! request that reserved nothing and saved the stored answer's tokens.

use super::answer::Stored;
use super::embed::{Who, embed};
use super::key::{self, Keyed};
use super::store::Pending;
use super::{Caches, Rule, Shared, safety};
use crate::auth::Caller;
use crate::limits::Limits;
use crate::record::CacheNote;
use crate::request::{ClientRequest, Operation};
use crate::routing::Routes;
use crate::usage::Meter;
use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, header};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_common::config::VaryBy;
use tollgate_quota::cache::partition_id;

/// What the cache did for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        }
    }
}

/// A stored answer found for the request.
pub struct Hit {
    pub stored: Stored,
    /// The cosine distance of a semantic hit; `None` for an exact one.
    pub distance: Option<f64>,
    pub team: String,
}

/// The cache's decision for one request covered by a `[[cache]]`.
pub struct Decision {
    pub cache: Arc<str>,
    pub outcome: Outcome,
    pub hit: Option<Hit>,
    /// Where the answer goes once the response completes (`None`: not kept).
    pub store: Option<Pending>,
}

impl Decision {
    fn bypass(cache: &Arc<str>, store: Option<Pending>) -> Decision {
        Decision {
            cache: cache.clone(),
            outcome: Outcome::Bypass,
            hit: None,
            store,
        }
    }

    /// `x-tollgate-cache` (and `x-tollgate-cache-distance` on a semantic hit).
    pub fn headers(&self, h: &mut HeaderMap) {
        h.insert(
            "x-tollgate-cache",
            HeaderValue::from_static(self.outcome.label()),
        );
        if let Some(d) = self.hit.as_ref().and_then(|h| h.distance)
            && let Ok(v) = HeaderValue::from_str(&format!("{d:.6}"))
        {
            h.insert("x-tollgate-cache-distance", v);
        }
    }

    pub fn note(&self) -> CacheNote {
        CacheNote {
            cache: self.cache.clone(),
            result: self.outcome.label(),
            distance: self.hit.as_ref().and_then(|h| h.distance),
        }
    }
}

impl Caches {
    /// The decision for a request, or `None` when no `[[cache]]` covers it.
    pub async fn lookup(
        &self,
        limits: &Limits,
        caller: &Caller,
        req: &ClientRequest,
        headers: &HeaderMap,
        request_id: &str,
    ) -> Option<Decision> {
        if self.rules.is_empty() || req.op == Operation::Embeddings {
            return None;
        }
        let first = self
            .rules
            .iter()
            .find(|r| r.config.models.is_empty() || r.config.models.contains(&req.model))?;
        let limit = Duration::from_millis(first.config.lookup_timeout_ms);
        let started = Instant::now();
        let now = crate::clock::now_ms();
        let record =
            match tokio::time::timeout(limit, self.callers.record(limits, &caller.consumer, now))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    self.failed(first, "caller", &"consumer record timed out");
                    return Some(self.finish(Decision::bypass(&first.name, None)));
                }
            };
        let team = caller
            .team
            .clone()
            .or_else(|| record.as_ref().map(|r| r.team.clone()))
            .unwrap_or_else(|| caller.consumer.to_string());
        let rule = self
            .rules
            .iter()
            .find(|r| r.covers(&req.model, &caller.consumer, &team))?;
        // Served only to a caller the reservation would admit (by record; limits aside).
        let allowed = match &record {
            None => !caller.require_record,
            Some(r) => !r.disabled && (r.models.is_empty() || r.models.contains(&req.model)),
        };
        if !allowed {
            return Some(self.finish(Decision::bypass(&rule.name, None)));
        }
        let control = key::control(headers);
        let keyed = match inspect(rule, req).await {
            Ok(k) => k,
            Err(skip) => {
                let m = &self.shared.metrics;
                m.count("tollgate_cache_skips_total", &rule.name, skip.reason());
                return Some(self.finish(Decision::bypass(&rule.name, None)));
            }
        };
        let partition = partition(rule, req, caller, &team, headers);
        let pending = (!control.no_store).then(|| {
            Pending::new(
                rule.clone(),
                self.shared.clone(),
                req.op,
                &partition,
                &keyed,
                Who {
                    consumer: caller.consumer.clone(),
                    team: team.clone(),
                    request_id: request_id.to_string(),
                },
            )
        });
        if control.no_lookup {
            return Some(self.finish(Decision::bypass(&rule.name, pending)));
        }
        let who = Who {
            consumer: caller.consumer.clone(),
            team: team.clone(),
            request_id: request_id.to_string(),
        };
        let left = limit.saturating_sub(started.elapsed());
        let found =
            tokio::time::timeout(left, find(rule, &self.shared, &partition, &keyed, &who)).await;
        let d = match found {
            Err(_) => {
                self.failed(rule, "timeout", &"lookup slower than lookup_timeout_ms");
                Decision::bypass(&rule.name, None)
            }
            Ok(Err(stage)) => {
                self.failed(rule, stage.0, &stage.1);
                Decision::bypass(&rule.name, None)
            }
            Ok(Ok((Some((stored, distance)), _))) => Decision {
                cache: rule.name.clone(),
                outcome: Outcome::Hit,
                hit: Some(Hit {
                    stored,
                    distance,
                    team,
                }),
                store: None,
            },
            Ok(Ok((None, vector))) => Decision {
                cache: rule.name.clone(),
                outcome: Outcome::Miss,
                hit: None,
                store: pending.map(|p| p.with_vector(vector)),
            },
        };
        Some(self.finish(d))
    }

    fn failed(&self, rule: &Rule, stage: &'static str, e: &dyn std::fmt::Display) {
        self.shared
            .metrics
            .count("tollgate_cache_failures_total", &rule.name, stage);
        self.shared.quiet.warn(&rule.name, stage, e);
    }

    fn finish(&self, d: Decision) -> Decision {
        let m = &self.shared.metrics;
        m.count("tollgate_cache_requests_total", &d.cache, d.outcome.label());
        if let Some(h) = &d.hit {
            let layer = if h.distance.is_some() {
                "semantic"
            } else {
                "exact"
            };
            m.count("tollgate_cache_hits_total", &d.cache, layer);
        }
        d
    }

    /// Answers a hit: the stored answer replayed as the client asked (JSON, or a stream with
    /// the usage chunk only if it asked for `include_usage`), recorded by `meter` as a request
    /// that reserved nothing and saved the answer's tokens.
    pub fn serve(
        &self,
        d: &Decision,
        req: &ClientRequest,
        routes: &Routes,
        mut meter: Meter,
    ) -> Response {
        let Some(hit) = &d.hit else {
            return Response::default();
        };
        let s = &hit.stored;
        let backend = routes
            .backends
            .iter()
            .find(|b| *b.name == *s.backend)
            .cloned();
        let usage = s.usage();
        let m = &self.shared.metrics;
        m.add(
            "tollgate_cache_tokens_saved_total",
            &d.cache,
            "input",
            usage.input,
        );
        m.add(
            "tollgate_cache_tokens_saved_total",
            &d.cache,
            "output",
            usage.output,
        );
        // Priced at the backend that produced the answer (nothing if it is no longer configured).
        let (mut input_cost, mut output_cost) = (0, 0);
        if let Some(b) = &backend {
            let cached = usage.cached_input.min(usage.input);
            input_cost = (usage.input - cached)
                .saturating_mul(b.price.input)
                .saturating_add(cached.saturating_mul(b.price.cached_input));
            output_cost = usage.output.saturating_mul(b.price.output);
        }
        m.add(
            "tollgate_cache_cost_avoided_pico_total",
            &d.cache,
            "input",
            input_cost,
        );
        m.add(
            "tollgate_cache_cost_avoided_pico_total",
            &d.cache,
            "output",
            output_cost,
        );
        let elapsed = meter.started().elapsed();
        let o = meter.observed();
        // No backend served it: the producing one is named for the usage totals only.
        o.status = 200;
        o.complete = true;
        o.saved = Some(usage);
        o.saved_cost_pico = input_cost.saturating_add(output_cost);
        o.saved_backend = Some(s.backend.clone());
        o.cache = Some(d.note());
        o.first_byte = Some(elapsed);
        drop(meter);
        let (body, kind) = if req.stream {
            (s.sse(req.op, req.client_include_usage), "text/event-stream")
        } else {
            (s.json(req.op), "application/json")
        };
        let mut resp = Response::new(Body::from(body));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        if req.stream {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        d.headers(h);
        resp
    }
}

/// The partition: the operation (answers of different APIs never mix) and the `vary_by`
/// values, hashed as they are (nothing copied per request).
fn partition(
    rule: &Rule,
    req: &ClientRequest,
    caller: &Caller,
    team: &str,
    headers: &HeaderMap,
) -> String {
    let values = rule.vary.iter().map(|(v, label)| {
        let value = match v {
            VaryBy::Consumer => &*caller.consumer,
            VaryBy::Team => team,
            VaryBy::Model => req.model.as_str(),
            VaryBy::Header(h) => headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        };
        (label.as_str(), value)
    });
    partition_id(std::iter::once(("op", req.op.path())).chain(values))
}

/// The request's key: parsed inline when small, off the runtime when large
/// ([`crate::heavy::offload`]); bodies over the largest answer kept are not cached at all.
async fn inspect(rule: &Arc<Rule>, req: &ClientRequest) -> Result<Keyed, key::Skip> {
    if req.body.len() <= crate::heavy::INLINE_BYTES {
        return key::inspect(req.op, &req.model, &req.body, &rule.config);
    }
    if req.body.len() > super::answer::MAX_ANSWER_BYTES {
        return Err(key::Skip::TooLarge);
    }
    let (rule, op, model, body) = (rule.clone(), req.op, req.model.clone(), req.body.clone());
    let size = body.len();
    crate::heavy::offload(size, move || key::inspect(op, &model, &body, &rule.config))
        .await
        .unwrap_or(Err(key::Skip::Unreadable))
}

/// Nearest stored prompts considered for a semantic hit.
const CANDIDATES: usize = 3;

type Found = (Option<(Stored, Option<f64>)>, Option<Vec<f32>>);

/// The exact layer, then (semantic caches) the nearest prompt. `Err` names the failing stage.
async fn find(
    rule: &Rule,
    shared: &Shared,
    partition: &str,
    keyed: &Keyed,
    who: &Who,
) -> Result<Found, (&'static str, String)> {
    let exact = rule
        .store
        .get(&rule.name, partition, &keyed.key)
        .await
        .map_err(|e| ("store", e.to_string()))?;
    if let Some(s) = exact.as_deref().and_then(Stored::from_bytes) {
        return Ok((Some((s, None)), None));
    }
    let (Some(embedder), true) = (&rule.embedder, rule.semantic()) else {
        return Ok((None, None));
    };
    let vector = embed(embedder, shared, &keyed.text, who)
        .await
        .map_err(|e| ("embeddings", e))?;
    // A few candidates: the nearest may be refused by the safety rule while the next passes.
    let near = rule
        .store
        .nearest(&rule.name, partition, &vector, CANDIDATES)
        .await
        .map_err(|e| ("index", e.to_string()))?;
    let hit = near
        .into_iter()
        .filter(|n| n.distance <= rule.config.score_threshold)
        .find(|n| safety::compatible(&keyed.text, &n.prompt))
        .and_then(|n| Stored::from_bytes(&n.answer).map(|s| (s, Some(n.distance.max(0.0)))));
    Ok((hit, Some(vector)))
}

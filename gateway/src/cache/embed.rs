//! The semantic layer's embeddings: one `POST /embeddings` to the configured
//! `embeddings_backend`, with the backend's own credential, for the prompt text. Its usage is
//! the consumer's (recorded by the caller), but it reserves nothing against the consumer's TPM.

use super::{Shared, unreserved};
use crate::credentials::Credential;
use crate::record::Admitted;
use crate::request::Operation;
use crate::routing::Backend;
use crate::usage::Meter;
use http::{HeaderValue, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use tollgate_common::TokenUsage;
use tollgate_common::config::BackendApi;

/// Why an embedding could not be had (each ends in a bypass, never in a failed request).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embeddings backend unreachable")]
    Unreachable,
    #[error("embeddings backend answered {0}")]
    Status(u16),
    #[error("embeddings backend answered something unexpected")]
    Malformed,
    #[error("embeddings backend credential unavailable")]
    Credential,
}

/// An embeddings model on a backend.
pub struct Embedder {
    pub backend: Arc<Backend>,
    pub model: String,
}

/// One embedding and the tokens it took.
pub struct Embedding {
    pub vector: Vec<f32>,
    pub tokens: u64,
}

impl Embedder {
    pub async fn embed(
        &self,
        client: &reqwest::Client,
        text: &str,
    ) -> Result<Embedding, EmbedError> {
        let b = &self.backend;
        let url = b
            .target(Operation::Embeddings, &self.model, &b.config.api_version)
            .map_err(|_| EmbedError::Unreachable)?;
        let mut body = json!({"input": text});
        if b.config.api == BackendApi::Openai {
            body["model"] = json!(b.deployment(&self.model));
        }
        let mut req = client
            .post(url.to_string())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .body(body.to_string());
        match &b.credential {
            Credential::None => {}
            Credential::Header(name, value) => req = req.header(*name, value.clone()),
            Credential::Token(p) => {
                let v = p.header().await.map_err(|_| EmbedError::Credential)?;
                req = req.header(header::AUTHORIZATION, v);
            }
        }
        let resp = req.send().await.map_err(|_| EmbedError::Unreachable)?;
        if !resp.status().is_success() {
            return Err(EmbedError::Status(resp.status().as_u16()));
        }
        let v: Value = resp.json().await.map_err(|_| EmbedError::Malformed)?;
        let vector: Vec<f32> = v
            .pointer("/data/0/embedding")
            .and_then(Value::as_array)
            .ok_or(EmbedError::Malformed)?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or(EmbedError::Malformed)?;
        if vector.is_empty() || vector.len() > 16_384 || vector.iter().any(|x| !x.is_finite()) {
            return Err(EmbedError::Malformed);
        }
        let tokens = v
            .pointer("/usage/prompt_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Ok(Embedding { vector, tokens })
    }
}

/// Who a request is for, to record an embedding call against.
#[derive(Clone, Debug)]
pub struct Who {
    pub consumer: Arc<str>,
    pub team: String,
    pub request_id: String,
}

/// Embeds `text` and records the call as the consumer's usage (no TPM reserved).
pub(super) async fn embed(
    embedder: &Embedder,
    shared: &Shared,
    text: &str,
    who: &Who,
) -> Result<Vec<f32>, String> {
    let e = embedder
        .embed(&shared.client, text)
        .await
        .map_err(|e| e.to_string())?;
    let admitted = Admitted {
        request_id: who.request_id.clone(),
        consumer: who.consumer.clone(),
        team: who.team.clone(),
        model: embedder.model.clone(),
        op: Operation::Embeddings,
        stream: false,
        reserved: unreserved(&who.team),
        prompt_tokens: e.tokens,
        started: Instant::now(),
        trace_id: String::new(),
        dims: Vec::new(),
    };
    let mut meter = Meter::new(shared.usage_tx.clone(), admitted, None);
    let o = meter.observed();
    o.backend = Some(embedder.backend.clone());
    o.status = 200;
    o.complete = true;
    o.reported = Some(TokenUsage {
        input: e.tokens,
        output: 0,
        cached_input: 0,
    });
    Ok(e.vector)
}

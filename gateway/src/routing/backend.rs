//! A configured backend: its URLs, credential, prices and response limits, and its circuit.

use super::circuit::Circuit;
use crate::credentials::Credential;
use crate::error::Error;
use crate::request::Operation;
use crate::secrets::Secrets;
use http::Uri;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_common::config::{BackendApi, BackendConfig};

/// Prices in micro-units per one million tokens (so cost in pico-units is tokens × price).
#[derive(Clone, Copy, Debug, Default)]
pub struct PriceMicros {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// A configured backend and its live state.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub config: BackendConfig,
    /// `url` without a trailing `/` (and without a trailing `/v1` for OpenAI-style backends,
    /// which the gateway adds itself).
    pub base: String,
    pub credential: Credential,
    pub price: PriceMicros,
    /// Parsed URLs per operation and model for the backend's own `api_version`.
    pub urls: HashMap<Operation, HashMap<String, Uri>>,
    /// The circuit as this replica knows it (routing reads only this).
    pub circuit: Circuit,
    /// Every secret the gateway holds (shared by all backends): none of them may pass from
    /// this backend's answers to a client.
    pub secrets: Arc<Secrets>,
    pub limits: ResponseLimits,
}

/// What one response may cost a replica (`server.max_response_bytes`,
/// `server.max_sse_event_bytes`): set server-wide, kept with each backend so that forwarding
/// needs nothing else.
#[derive(Clone, Copy, Debug)]
pub struct ResponseLimits {
    pub max_response_bytes: u64,
    pub max_sse_event_bytes: usize,
}

impl Backend {
    /// The URL for an operation on a model, parsed once at start-up for the backend's own
    /// `api_version`; another version (the client's) is built on the spot.
    pub fn target(&self, op: Operation, model: &str, api_version: &str) -> Result<Uri, Error> {
        if api_version == self.config.api_version
            && let Some(u) = self.urls.get(&op).and_then(|m| m.get(model))
        {
            return Ok(u.clone());
        }
        Uri::try_from(self.url(op, self.deployment(model), api_version))
            .map_err(|_| Error::bad_request("api-version is not valid in a URL"))
    }

    pub fn url(&self, op: Operation, deployment: &str, api_version: &str) -> String {
        match (self.config.api, op) {
            (BackendApi::Openai, _) => format!("{}/v1/{}", self.base, op.path()),
            (BackendApi::Azure, Operation::Responses) => {
                format!("{}/openai/v1/responses", self.base)
            }
            (BackendApi::Azure, _) => format!(
                "{}/openai/deployments/{}/{}?api-version={}",
                self.base,
                deployment,
                op.path(),
                api_version
            ),
        }
    }

    /// This backend's own name for a model.
    pub fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.config
            .deployments
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }
}

pub(super) fn price_micros(p: f64) -> u64 {
    (p * 1_000_000.0).round() as u64
}

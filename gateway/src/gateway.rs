//! The gateway's shared state: what every request needs, built once by [`crate::server`] and
//! handed to each request by reference.

use crate::alerts::Alerts;
use crate::auth::Auth;
use crate::cache::Caches;
use crate::estimate::Tokenizer;
use crate::limits::Limits;
use crate::routing::{Breakers, Routes};
use crate::telemetry::Telemetry;
use crate::usage::Finished;
use std::sync::Arc;
use tokio::sync::mpsc;
use tollgate_common::Config;

/// Everything a request needs, shared by all requests.
pub struct Gateway {
    pub config: Config,
    pub limits: Arc<Limits>,
    pub auth: Auth,
    pub routes: Routes,
    pub breakers: Arc<Breakers>,
    /// Forwards requests to backends (hyper's client: [`crate::proxy::upstream`]).
    pub upstream: crate::proxy::Upstream,
    /// For the calls off the request path: embeddings for the cache, JWKS, webhooks.
    pub client: reqwest::Client,
    pub telemetry: Telemetry,
    pub tokenizer: Tokenizer,
    /// The `[[cache]]`s, in file order.
    pub caches: Arc<Caches>,
    /// Budget and quota thresholds, circuit and store alerts (delivered off the path).
    pub alerts: Arc<Alerts>,
    /// Where finished requests go: the usage worker.
    pub usage_tx: mpsc::UnboundedSender<Finished>,
}

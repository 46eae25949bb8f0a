//! tollgate: a gateway for AI model traffic. Applications call it as they would call OpenAI or
//! Azure OpenAI; it authenticates the caller, reserves the request's tokens against the
//! consumer's limits, routes to the best available backend, streams the answer back, and
//! settles and accounts the tokens actually used.
//!
//! # Layout
//! - [`pipeline`] — the request path, one step per stage, in order.
//! - [`auth`] — `auth.mode`: subscription keys (hashed) and/or JWTs → consumer.
//! - [`jwt`] — JWT validation against a cached JWKS, claims → consumer, team, model access.
//! - [`limits`] — the reservation against the shared store, and what happens when it fails.
//! - [`request`] — what the client asked for (route, body fields), body rewriting for backends.
//! - [`tokens`] — tiktoken counting for estimates and for backends that report no usage.
//! - [`routing`] — backends, priority groups and weights, the local circuit cache.
//! - [`breaker`] — failure counting and tripping.
//! - [`credentials`] — backend tokens (OAuth2 client credentials, managed identity), kept fresh.
//! - [`proxy`] — forwarding with failover; which backend answers reach the client.
//! - [`headers`] — which request headers go to a backend, which response headers come back.
//! - [`secrets`] — every secret the gateway holds, scrubbed from what backends send back.
//! - [`tap`] — the response body on its way back: usage read, size and time bounded.
//! - [`usage`] — settle, cost and usage totals, off the request path.
//! - [`telemetry`] — Prometheus metrics at `/metrics`.
//! - [`otel`] — OTLP export: a GenAI span per request, token metrics, one log record per usage record.
//! - [`server`] — building the app and running it.
//! - [`connections`] — accepting and serving connections: timeouts, a connection cap, drain.
//! - [`cli`] — the `tollgate` commands.

#![forbid(unsafe_code)]

pub mod auth;
pub mod breaker;
pub mod cli;
pub mod connections;
pub mod credentials;
pub mod error;
pub mod estimate;
pub mod headers;
pub mod jwt;
pub mod limits;
pub mod otel;
pub mod pipeline;
pub mod proxy;
pub mod request;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod tap;
pub mod telemetry;
pub mod tokens;
pub mod usage;

pub use server::{Gateway, app, run};

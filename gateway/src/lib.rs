//! tollgate: a gateway for AI model traffic. Applications call it as they would call OpenAI or
//! Azure OpenAI; it authenticates the caller, reserves the request's tokens against the
//! consumer's limits, routes to the best available backend, streams the answer back, and
//! settles and accounts the tokens actually used.
//!
//! # Layout
//!
//! One folder per stage of the request path (DESIGN.md), in the order a request meets them;
//! data flows one way, from [`pipeline`] down (no module imports one that imports it):
//!
//! - [`pipeline`] — the request path, one step per stage, in order.
//! - [`auth`] — `auth.mode`: subscription keys (hashed) and/or JWTs → the caller.
//! - [`cache`] — `[[cache]]`: answers replayed for repeated and similar prompts.
//! - [`request`] — what the client asked for (route, body fields), the body a backend gets.
//! - [`estimate`] — every billed input counted before admission; the tokenizer.
//! - [`limits`] — the reservation against the shared store, leases, the failure policy.
//! - [`routing`] — backends, priority groups and weights, circuits and their sharing.
//! - [`credentials`] — backend credentials (keys, OAuth2 and managed-identity tokens).
//! - [`proxy`] — forwarding with failover; the response tap that reads usage.
//! - [`record`] — the per-request record handed from stage to stage.
//! - [`dimensions`] — `[telemetry] dimensions`: the end user, the app; read at admission.
//! - [`usage`] — the meter, settle, cost and usage totals, off the request path.
//! - [`telemetry`] — Prometheus at `/metrics`, OTLP spans, metrics and usage log records.
//! - [`mcp`] — `/mcp` and `/mcp/{server}`: MCP tool traffic through the same auth, limits,
//!   showback and traces (its own path, beside the model pipeline); REST APIs exported as
//!   tools from their OpenAPI documents (`mcp/openapi/`).
//! - [`budgets`] — around the reservation: `x-budget-remaining`, budget gauges, thresholds.
//! - [`alerts`] — webhooks for budgets, quotas, circuits and the store, off the request path.
//! - [`gateway`] — the shared state every request reads.
//! - [`server`] — building the gateway, the HTTP routes, running and draining.
//! - [`connections`] — accepting connections: timeouts, a connection cap.
//! - [`cli`] — the `tollgate` commands.
//! - [`clock`], [`error`], [`secrets`], [`heavy`] — time, errors, secrets and CPU-heavy work
//!   off the runtime, used by every stage.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod auth;
pub mod budgets;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod connections;
pub mod credentials;
pub mod dimensions;
pub mod error;
pub mod estimate;
pub mod gateway;
pub mod heavy;
pub mod limits;
pub mod mcp;
pub mod pipeline;
pub mod proxy;
pub mod record;
pub mod request;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod telemetry;
pub mod usage;

pub use gateway::Gateway;
pub use server::{app, run};

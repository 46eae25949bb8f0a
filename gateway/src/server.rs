//! Building the gateway from a validated config and the HTTP routes. [`run`] is what the binary
//! and the real-socket tests call; [`app`] gives the router alone for in-process tests
//! (`app(config).await?.0.oneshot(request)`); [`prepare`] is what `check-config` runs.

use crate::auth::{Auth, KeyAuth};
use crate::breaker::Breakers;
use crate::jwt::JwtAuth;
use crate::limits::{AnyStore, Limits, Policy};
use crate::otel::Otel;
use crate::pipeline;
use crate::request::{Operation, RouteStyle};
use crate::routing::Routes;
use crate::telemetry::Metrics;
use crate::tokens::Tokenizer;
use crate::usage::{Outcome, UsageWorker};
use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::HeaderMap;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tollgate_common::config::{AuthMode, Config, StoreKind};
use tollgate_common::key_hash;
use tollgate_quota::{ConsumerRecord, LimitDefaults, MemoryStore, RedisStore, Store};

/// Everything a request needs, shared by all requests.
pub struct Gateway {
    pub config: Config,
    pub limits: Arc<Limits>,
    pub auth: Auth,
    pub routes: Routes,
    pub breakers: Arc<Breakers>,
    pub client: reqwest::Client,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Tokenizer,
    pub usage_tx: mpsc::UnboundedSender<Outcome>,
    /// OTLP export, when `telemetry.otlp_endpoint` is set: the pipeline starts request spans.
    pub otel: Option<Arc<Otel>>,
}

/// The background work that outlives requests: the usage worker.
pub struct Background {
    usage: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    /// Its unused leases are returned at shutdown.
    limits: Arc<Limits>,
    /// Flushed after the usage worker: it ends the last spans and emits the last usage logs.
    otel: Option<Arc<Otel>>,
}

impl Background {
    /// Waits for the usage worker to write what is pending (after every request has ended).
    pub async fn finish(self, within: Duration) {
        for t in &self.tasks {
            t.abort();
        }
        self.limits.sweep_leases(true).await;
        if tokio::time::timeout(within, self.usage).await.is_err() {
            tracing::error!("usage worker did not finish in time; some usage may not be written");
        }
        if let Some(otel) = self.otel {
            otel.shutdown(within).await;
        }
    }
}

/// The store the config asks for.
pub async fn connect_store(config: &Config) -> anyhow::Result<AnyStore> {
    Ok(match config.store.kind {
        StoreKind::Memory => AnyStore::Memory(MemoryStore::new()),
        StoreKind::Redis => {
            let url =
                std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| config.store.url.clone());
            let opts = tollgate_quota::RedisOpts {
                timeout: Duration::from_millis(config.store.timeout_ms),
                pool_size: config.store.pool_size,
                usage_retention_days: config.store.usage_retention_days.min(u32::MAX as u64) as u32,
                ..Default::default()
            };
            AnyStore::Redis(RedisStore::connect(&url, opts).await.context("store.url")?)
        }
    })
}

/// Consumers from the config, as store records with their key hashes (from `key_sha256` and
/// the plain key in `key_env`).
pub fn config_consumers(config: &Config) -> anyhow::Result<Vec<(ConsumerRecord, Vec<String>)>> {
    let mut out = Vec::new();
    for c in &config.consumers {
        let mut keys = c
            .key_sha256
            .iter()
            .map(|k| k.to_ascii_lowercase())
            .collect::<Vec<_>>();
        if let Some(var) = &c.key_env {
            let key = tollgate_common::config::secret_from_env(var)
                .map_err(|e| anyhow::anyhow!("consumers.{}.key_env: {e}", c.id))?;
            keys.push(key_hash(key.expose()));
        }
        let rec = ConsumerRecord {
            id: c.id.clone(),
            team: c.team.clone().unwrap_or_else(|| c.id.clone()),
            tpm: c.tpm,
            quota: c.quota,
            quota_period: c.quota_period,
            models: c.models.clone(),
            disabled: c.disabled,
        };
        out.push((rec, keys));
    }
    Ok(out)
}

/// What `serve` builds from a config before it touches the network: the consumers with their
/// key hashes (`key_env` read), the backends with their credentials (secrets read), the JWKS
/// file when JWTs are in use. `check-config` runs exactly this, so both reject the same
/// configs, naming the key at fault.
pub struct Prepared {
    pub consumers: Vec<(ConsumerRecord, Vec<String>)>,
    pub routes: Routes,
}

pub async fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let consumers = config_consumers(config)?;
    let routes = Routes::from_config(config)?;
    if let Some(j) = &config.auth.jwt
        && config.auth.mode != AuthMode::Key
        && j.jwks_url.is_none()
    {
        // A file must load now; a URL is fetched (and may fail, with a warning) at start-up.
        JwtAuth::start(j).await?;
    }
    Ok(Prepared { consumers, routes })
}

/// Builds the gateway and its router. Spawns the usage worker.
pub async fn app(config: Config) -> anyhow::Result<(Router, Arc<Gateway>, Background)> {
    let Prepared { consumers, routes } = prepare(&config).await?;
    let store = connect_store(&config).await?;
    let defaults = LimitDefaults {
        tpm: config.limits.default_tpm,
        quota: config.limits.default_quota,
        quota_period: config.limits.default_quota_period,
    };
    let policy = Policy {
        on_error: config.store.on_error,
        defaults,
        timeout: Duration::from_millis(config.store.timeout_ms),
        max_degraded_ms: config.store.max_degraded_ms,
    };
    let mut limits = Limits::new(store, policy, consumers.clone());
    if config.store.kind == StoreKind::Redis && config.limits.lease {
        limits = limits.with_leases();
    }
    for (rec, keys) in &consumers {
        // The local fallback knows every configured consumer from the start.
        let _ = limits.local.seed_consumer(rec, keys).await;
    }
    // Seeded now when the store answers (written only where absent: the store wins once an
    // operator has changed a consumer), and kept seeded in the background: retried until it
    // succeeds, and again whenever the store lost its data.
    if let Err(e) = limits.seeds.seed_all(&limits.store).await {
        tracing::warn!(error = %e, "could not seed the configured consumers yet; retrying in the background");
    }
    let seeder = {
        let limits = limits.clone();
        tokio::spawn(async move { limits.seeds.keep_seeded(limits.store.clone()).await })
    };
    let breakers = Breakers::new(limits.store.clone());
    let breaker_tasks = breakers.start(&routes);
    // Token credentials: one refresh task per backend fetches the first token now.
    for b in &routes.backends {
        if let crate::routing::Credential::Token(p) = &b.credential {
            p.start()
                .with_context(|| format!("backends.{}.auth", b.name))?;
        }
    }
    let jwt = match &config.auth.jwt {
        Some(j) if config.auth.mode != AuthMode::Key => Some(JwtAuth::start(j).await?),
        _ => None,
    };
    let connect_ms = config
        .backends
        .iter()
        .map(|b| b.timeouts.connect_ms)
        .min()
        .unwrap_or(2_000);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(connect_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        // A redirect would take the credential (and, for 307/308, the prompt) elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the HTTP client")?;
    let metrics = Arc::new(Metrics::default());
    let tokenizer = Tokenizer::load();
    let (usage_tx, usage_rx) = mpsc::unbounded_channel();
    let key_ttl = match config.store.kind {
        StoreKind::Memory => Duration::ZERO,
        StoreKind::Redis => Duration::from_millis(config.limits.key_cache_ms),
    };
    let otel = Otel::start(&config.telemetry).context("telemetry")?;
    let worker = UsageWorker {
        limits: limits.clone(),
        metrics: metrics.clone(),
        tokenizer,
        otel: otel.clone(),
    };
    let flush_for = Duration::from_millis(config.server.shutdown_grace_ms.min(10_000));
    let usage = tokio::spawn(worker.run(usage_rx, flush_for));
    let sweeper = (config.store.kind == StoreKind::Redis && config.limits.lease).then(|| {
        let limits = limits.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                limits.sweep_leases(false).await;
            }
        })
    });
    let replica = uuid::Uuid::new_v4().to_string();
    if config.store.kind == StoreKind::Redis {
        // Know how many replicas share the limits before serving (the `local` policy's 1/N).
        limits.heartbeat(&replica).await;
    }
    let heartbeat = (config.store.kind == StoreKind::Redis).then(|| {
        let limits = limits.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                limits.heartbeat(&replica).await;
            }
        })
    });
    let background_limits = limits.clone();
    let gw = Arc::new(Gateway {
        auth: Auth::new(config.auth.mode, KeyAuth::new(key_ttl), jwt),
        config,
        limits,
        routes,
        breakers,
        client,
        metrics,
        tokenizer,
        usage_tx,
        otel: otel.clone(),
    });
    Ok((
        router(gw.clone()),
        gw,
        Background {
            usage,
            otel,
            tasks: heartbeat
                .into_iter()
                .chain(Some(seeder))
                .chain(sweeper)
                .chain(breaker_tasks)
                .collect(),
            limits: background_limits,
        },
    ))
}

fn model_route(op: Operation, azure_v1: bool) -> axum::routing::MethodRouter<Arc<Gateway>> {
    post(
        move |State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body| {
            let style = if azure_v1 {
                RouteStyle::AzureV1
            } else {
                RouteStyle::OpenAi
            };
            pipeline::handle(gw, op, style, headers, body)
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
            pipeline::handle(gw, op, style, headers, body)
        },
    )
}

/// Every route of the HTTP surface.
pub fn router(gw: Arc<Gateway>) -> Router {
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
    .route("/metrics", get(metrics))
    .fallback(|| async { crate::error::Error::RouteNotFound.into_response() })
    .method_not_allowed_fallback(|| async { crate::error::Error::MethodNotAllowed.into_response() })
    .with_state(gw)
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    use tollgate_common::config::OnError;
    let kind = match gw.config.store.kind {
        StoreKind::Memory => "memory",
        StoreKind::Redis => "redis",
    };
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

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
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
    let now = crate::routing::now_ms();
    for b in &gw.routes.backends {
        let open = b.open_until_ms.load(std::sync::atomic::Ordering::Relaxed) > now;
        let tripped = b.tripped.load(std::sync::atomic::Ordering::Relaxed);
        let state = match (open, tripped) {
            (true, _) => 1,
            (false, true) => 2,
            (false, false) => 0,
        };
        let _ = writeln!(
            extra,
            "tollgate_breaker_state{{backend=\"{}\"}} {state}",
            b.name
        );
    }
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render(&extra),
    )
        .into_response()
}

/// Serves until `shutdown` resolves, then drains in-flight requests (streams included) for up
/// to `server.shutdown_grace_ms` and writes pending usage before returning. Connections are
/// served by [`crate::connections`] (timeouts, connection cap).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_ready(listener, config, shutdown, |_| {}).await
}

/// [`run`], calling `ready` once the gateway is built (store connected, consumers seeded) and
/// about to accept requests: the binary prints its `listening on` line there.
pub async fn run_ready(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let server = config.server.clone();
    let (router, gw, background) = app(config).await?;
    drop(gw);
    ready(listener.local_addr()?);
    crate::connections::serve(listener, router, &server, shutdown).await?;
    background.finish(Duration::from_secs(10)).await;
    Ok(())
}

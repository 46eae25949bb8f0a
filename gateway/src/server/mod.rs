//! Building the gateway from a validated config and the HTTP routes. [`run`] is what the binary
//! and the real-socket tests call; [`app`] gives the router alone for in-process tests
//! (`app(config).await?.0.oneshot(request)`); [`prepare`] is what `check-config` runs.

mod routes;

pub use crate::gateway::Gateway;
pub use routes::router;

use crate::alerts::Alerts;
use crate::auth::{Auth, JwtAuth, KeyAuth};
use crate::credentials::Credential;
use crate::estimate::Tokenizer;
use crate::limits::{Limits, Policy};
use crate::routing::{Breakers, Routes};
use crate::telemetry::{Metrics, Otel, Telemetry};
use crate::usage::UsageWorker;
use anyhow::Context as _;
use axum::Router;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tollgate_common::config::{AuthMode, Config};
use tollgate_common::key_hash;
use tollgate_common::{BudgetAction, Period};
use tollgate_quota::{
    AnyStore, Budget, ConsumerRecord, LimitDefaults, Store, TeamRecord, nano_from_units,
};

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
    Ok(tollgate_quota::connect(&config.store).await?)
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
            budget: budget(c.budget, c.budget_period, c.budget_action),
        };
        out.push((rec, keys));
    }
    Ok(out)
}

/// A configured budget as the store holds it.
fn budget(amount: Option<f64>, period: Period, action: BudgetAction) -> Option<Budget> {
    amount.map(|a| Budget {
        limit_nano: nano_from_units(a),
        period,
        action,
    })
}

/// Teams from the config, as store records.
pub fn config_teams(config: &Config) -> Vec<TeamRecord> {
    config
        .teams
        .iter()
        .map(|t| TeamRecord {
            id: t.id.clone(),
            budget: budget(t.budget, t.budget_period, t.budget_action),
        })
        .collect()
}

/// Writes the configured teams where the store has none (the store wins afterwards), retrying
/// in the background until the store takes them.
async fn seed_teams(store: AnyStore, teams: Vec<TeamRecord>) {
    let mut left = teams;
    loop {
        let mut failed = Vec::new();
        for t in left {
            if let Err(e) = store.seed_team(&t).await {
                tracing::warn!(team = %t.id, error = %e, "could not seed a team yet; retrying");
                failed.push(t);
            }
        }
        if failed.is_empty() {
            return;
        }
        left = failed;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What `serve` builds from a config before it touches the network: the consumers with their
/// key hashes (`key_env` read), the backends with their credentials (secrets read), the JWKS
/// file when JWTs are in use. `check-config` runs exactly this, so both reject the same
/// configs, naming the key at fault.
pub struct Prepared {
    pub consumers: Vec<(ConsumerRecord, Vec<String>)>,
    pub routes: Routes,
    pub alerts: (Alerts, Option<mpsc::Receiver<crate::alerts::Event>>),
}

pub async fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let consumers = config_consumers(config)?;
    let routes = Routes::from_config(config)?;
    let alerts = Alerts::from_config(config)?;
    if let Some(j) = &config.auth.jwt
        && config.auth.mode != AuthMode::Key
        && j.jwks_url.is_none()
    {
        // A file must load now; a URL is fetched (and may fail, with a warning) at start-up.
        JwtAuth::start(j).await?;
    }
    Ok(Prepared {
        consumers,
        routes,
        alerts,
    })
}

/// Builds the gateway and its router. Spawns the usage worker.
pub async fn app(config: Config) -> anyhow::Result<(Router, Arc<Gateway>, Background)> {
    let Prepared {
        consumers,
        routes,
        alerts: (alerts, alerts_rx),
    } = prepare(&config).await?;
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
        currency: config.pricing.currency.as_str().into(),
    };
    let mut limits = Limits::new(store, policy, consumers.clone());
    if config.store.kind.is_redis() && config.limits.lease {
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
    let team_seeder = tokio::spawn(seed_teams(limits.store.clone(), config_teams(&config)));
    let breakers = Breakers::new(limits.store.clone());
    let breaker_tasks = breakers.start(&routes);
    // Token credentials: one refresh task per backend fetches the first token now.
    for b in &routes.backends {
        if let Credential::Token(p) = &b.credential {
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
    let tokenizer = Tokenizer::load();
    let (usage_tx, usage_rx) = mpsc::unbounded_channel();
    let key_ttl = if config.store.kind.is_redis() {
        Duration::from_millis(config.limits.key_cache_ms)
    } else {
        Duration::ZERO
    };
    let metrics = Arc::new(Metrics::default().with_dimensions(&config.telemetry));
    let otel = Otel::start(&config.telemetry, &metrics).context("telemetry")?;
    let telemetry = Telemetry {
        metrics,
        otel: otel.clone(),
        dims: Arc::new(crate::dimensions::Dimensions::from_config(
            &config.telemetry,
        )),
    };
    let worker = UsageWorker {
        limits: limits.clone(),
        telemetry: telemetry.clone(),
        tokenizer,
    };
    let flush_for = Duration::from_millis(config.server.shutdown_grace_ms.min(10_000));
    let usage = tokio::spawn(worker.run(usage_rx, flush_for));
    let sweeper = (config.store.kind.is_redis() && config.limits.lease).then(|| {
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
    let alert_replica = replica.clone();
    if config.store.kind.is_redis() {
        // Know how many replicas share the limits before serving (the `local` policy's 1/N).
        limits.heartbeat(&replica).await;
    }
    let heartbeat = (config.store.kind.is_redis()).then(|| {
        let limits = limits.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                limits.heartbeat(&replica).await;
            }
        })
    });
    let caches = Arc::new(
        crate::cache::Caches::build(&config, &routes, client.clone(), usage_tx.clone()).await?,
    );
    // Entry counts and the vector index's size for `/metrics`.
    let cache_stats = (!caches.is_empty())
        .then(|| tokio::spawn(caches.clone().watch_stats(Duration::from_secs(10))));
    let alerts = Arc::new(alerts);
    let mut alert_tasks = Vec::new();
    if let Some(rx) = alerts_rx {
        // Webhooks get a client of their own: a hanging webhook holds none of the backends'
        // connections.
        let hooks = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the alerts HTTP client")?;
        use crate::alerts::deliver;
        alert_tasks.push(tokio::spawn(deliver::run(
            alerts.clone(),
            limits.clone(),
            rx,
            hooks,
        )));
        alert_tasks.push(tokio::spawn(deliver::watch_circuits(
            alerts.clone(),
            limits.clone(),
        )));
        alert_tasks.push(tokio::spawn(deliver::watch_store(
            alerts.clone(),
            limits.clone(),
            alert_replica,
        )));
    }
    let background_limits = limits.clone();
    let gw = Arc::new(Gateway {
        auth: Auth::new(config.auth.mode, KeyAuth::new(key_ttl), jwt),
        config,
        limits,
        routes,
        breakers,
        upstream: crate::proxy::upstream(connect_ms),
        client,
        telemetry,
        tokenizer,
        caches,
        usage_tx,
        alerts,
    });
    // The MCP routes hold their own state beside the gateway's (`mcp` reads the gateway).
    let mcp = crate::mcp::Mcp::build(&gw.config)?;
    crate::mcp::rest::reload_on_sighup(&mcp);
    let metrics_mcp = mcp.metrics.clone();
    Ok((
        router(gw.clone(), Some(metrics_mcp)).merge(crate::mcp::router(gw.clone(), mcp)),
        gw,
        Background {
            usage,
            otel,
            tasks: heartbeat
                .into_iter()
                .chain(Some(seeder))
                .chain(Some(team_seeder))
                .chain(alert_tasks)
                .chain(sweeper)
                .chain(cache_stats)
                .chain(breaker_tasks)
                .collect(),
            limits: background_limits,
        },
    ))
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

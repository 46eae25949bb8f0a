//! The `tollgate` commands: `serve`, `demo`, `check-config`, `keys create`, `usage`,
//! `cache purge`, `cache stats`.
//!
//! - [`report`]: the usage report; [`ptu`]: PTU cost allocation; [`html`]: the report as one
//!   self-contained HTML page; [`budgets`]: the budgets in the usage report; [`burndown`]: the
//!   page's budget burn-down, cache savings and top users; [`dims`]: usage
//!   by dimension (`--by user`, `--by dimension:NAME`).
//! - [`cache`]: the answer cache's admin.
//! - [`keys`]: key creation.
//! - [`demo`]: the demo gateway.

mod budgets;
mod burndown;
mod cache;
mod demo;
mod dims;
mod html;
mod keys;
mod ptu;
mod report;
mod tools;

pub use demo::demo;
pub use keys::new_key;
pub use ptu::PtuSpec;
pub use report::{Period, fmt_cost, render_report};

use keys::keys_create;
use report::read_usage;

use crate::server;
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tollgate_common::config::Config;
use tollgate_quota::Store as _;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An AI gateway: token limits, PTU-first routing, cost showback"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve with a configuration file.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Overrides `server.listen`; `127.0.0.1:0` picks a free port.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Serve on embedded defaults: memory store, bundled mock PTU and PAYG backends, a demo key.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Validate a configuration file and explain what is wrong.
    CheckConfig { file: PathBuf },
    /// Manage subscription keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The showback report: tokens, requests and cost from the store's usage totals.
    Usage {
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// First day (YYYY-MM-DD, UTC); default: the first of this month.
        #[arg(long)]
        since: Option<String>,
        /// Last day (YYYY-MM-DD, UTC), inclusive; default: today.
        #[arg(long)]
        until: Option<String>,
        /// consumer, team, model, backend, day, ptu, server, tool, user or dimension:NAME.
        #[arg(long, default_value = "consumer", value_parser = By::parse)]
        by: By,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// The answer cache (`[[cache]]`): purge entries, show its size.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Delete the entries of every cache, one cache (`--cache`), or one partition.
    Purge {
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// The `[[cache]]` name; default: every cache.
        #[arg(long)]
        cache: Option<String>,
        /// One partition by its `vary_by` values: `team=finance` or
        /// `team=finance,header:x-tenant=acme`.
        #[arg(long)]
        partition: Option<String>,
    },
    /// Entries per cache and the vector index's size.
    Stats {
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        cache: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Print a new key for a consumer and store its SHA-256 hash.
    Create {
        #[arg(long)]
        consumer: String,
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// What `--by` groups by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum By {
    Consumer,
    Team,
    Model,
    Backend,
    Day,
    /// PTU cost allocation to teams (backends with `monthly_cost`).
    Ptu,
    /// A `[telemetry] dimensions` dimension (`user`, or `dimension:NAME`).
    Dimension(String),
    /// MCP tool calls per server, consumer and team (calls, errors).
    Server,
    /// MCP tool calls per tool (and its server), consumer and team.
    Tool,
}

impl By {
    /// `consumer`, `team`, `model`, `backend`, `day`, `ptu`, `server`, `tool`, `user` or
    /// `dimension:NAME`.
    pub fn parse(s: &str) -> Result<By, String> {
        Ok(match s {
            "consumer" => By::Consumer,
            "team" => By::Team,
            "model" => By::Model,
            "backend" => By::Backend,
            "day" => By::Day,
            "ptu" => By::Ptu,
            "server" => By::Server,
            "tool" => By::Tool,
            "user" => By::Dimension("user".into()),
            _ => match s.strip_prefix("dimension:") {
                Some(d) if !d.is_empty() => By::Dimension(d.to_string()),
                _ => {
                    return Err(format!(
                        "{s:?}: expected consumer, team, model, backend, day, ptu, server, tool, \
                         user or dimension:NAME"
                    ));
                }
            },
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    /// One self-contained page: charts as inline SVG, no network at view time.
    Html,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Reads and validates a config file; errors name the file and the key.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::from_toml(&text).with_context(|| format!("{}", path.display()))
}

async fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve { config, listen } => {
            let mut config = load_config(&config)?;
            if let Some(l) = listen {
                config.server.listen = l;
            }
            serve(config, None).await?;
        }
        Command::Demo { listen } => crate::cli::demo(listen).await?,
        Command::CheckConfig { file } => {
            let config = load_config(&file)?;
            // What `serve` checks before it binds: the same errors, the same keys named.
            server::prepare(&config)
                .await
                .with_context(|| format!("{}", file.display()))?;
            println!(
                "{}: ok ({} backends, {} consumers, models: {})",
                file.display(),
                config.backends.len(),
                config.consumers.len(),
                config.models().join(", ")
            );
        }
        Command::Keys {
            command: KeysCommand::Create { consumer, config },
        } => {
            keys_create(&consumer, config.as_deref()).await?;
        }
        Command::Usage {
            config,
            since,
            until,
            by,
            format,
        } => {
            let config = match config {
                Some(p) => load_config(&p)?,
                None => anyhow::bail!("--config FILE (or TOLLGATE_CONFIG) is required"),
            };
            if matches!(by, By::Server | By::Tool) {
                let (rows, _) = tools::read(&config, since.as_deref(), until.as_deref()).await?;
                print!("{}", tools::render(&rows, &by, format));
                return Ok(ExitCode::SUCCESS);
            }
            let (rows, period) = read_usage(&config, since.as_deref(), until.as_deref()).await?;
            let store = crate::server::connect_store(&config).await?;
            let budgets = budgets::read_budgets(&config, &store).await?;
            let ptus = PtuSpec::from_config(&config);
            let report = match (&by, format) {
                (_, Format::Html) => {
                    let dims = store.dimension_usage(period.since, period.until).await?;
                    let extra = html::Extra {
                        budgets: &budgets,
                        dims: &dims,
                        now_s: crate::clock::now_ms() / 1000,
                    };
                    html::render_with(&rows, period, &ptus, &extra)
                }
                (By::Dimension(d), _) => {
                    let dims = store.dimension_usage(period.since, period.until).await?;
                    dims::render(&dims, d, format)
                }
                _ => render_report(&rows, period, &ptus, by, format),
            };
            let currency = &config.pricing.currency;
            print!(
                "{}",
                budgets::with_budgets(report, &budgets, currency, format)
            );
        }
        Command::Cache { command } => match command {
            CacheCommand::Purge {
                config,
                cache: name,
                partition,
            } => {
                let config = load_config(&config)?;
                print!(
                    "{}",
                    cache::purge(&config, name.as_deref(), partition.as_deref()).await?
                );
            }
            CacheCommand::Stats {
                config,
                cache: name,
            } => {
                let config = load_config(&config)?;
                print!("{}", cache::stats(&config, name.as_deref()).await?);
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Connections the kernel queues for the accept loop (capped by `net.core.somaxconn`). tokio's
/// default (1024) overflows when more clients than that connect at once; an overflowing queue
/// drops their handshakes, and the kernel's SYN retries make them wait 1, 3, 7, then 15 s.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `listen` (`host:port`) with [`LISTEN_BACKLOG`].
async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .context("the address resolves to nothing")?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

/// Binds, prints `listening on IP:PORT`, and serves until SIGTERM or Ctrl-C.
pub async fn serve(config: Config, banner: Option<String>) -> anyhow::Result<()> {
    let listener = bind(&config.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.server.listen))?;
    // Printed once the gateway is ready: scripts and process managers wait for this line.
    let announce = move |addr: std::net::SocketAddr| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {addr}");
        if let Some(b) = banner {
            let _ = writeln!(out, "{}", b.replace("{addr}", &addr.to_string()));
        }
        let _ = out.flush();
    };
    server::run_ready(listener, config, shutdown_signal(), announce).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

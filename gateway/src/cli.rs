//! The `tollgate` commands: `serve`, `demo`, `check-config`, `keys create`, `usage`.

use crate::limits::AnyStore;
use crate::server;
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use rand::Rng;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tollgate_common::config::{Config, StoreKind};
use tollgate_common::key_hash;
use tollgate_quota::{Store, UsageRow};

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
        #[arg(long, value_enum, default_value = "consumer")]
        by: By,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
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

#[derive(Clone, Copy, ValueEnum)]
pub enum By {
    Consumer,
    Team,
    Model,
    Backend,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
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
            let rows = read_usage(&config, since.as_deref(), until.as_deref()).await?;
            print!("{}", render_usage(&rows, by, format));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Binds, prints `listening on IP:PORT`, and serves until SIGTERM or Ctrl-C.
pub async fn serve(config: Config, banner: Option<String>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
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

/// A new random subscription key.
pub fn new_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("tg-{body}")
}

async fn keys_create(consumer: &str, config: Option<&Path>) -> anyhow::Result<()> {
    let key = new_key();
    let hash = key_hash(&key);
    let config = config.map(load_config).transpose()?;
    match config {
        Some(c) if c.store.kind == StoreKind::Redis => {
            let store = server::connect_store(&c).await?;
            if store.get_consumer(consumer).await?.is_none() {
                eprintln!(
                    "warning: consumer {consumer:?} has no record in the store yet; the key works once it has one"
                );
            }
            store.put_key(&hash, consumer).await?;
            println!("{key}");
            eprintln!("stored tg:key:{hash} -> {consumer}");
        }
        _ => {
            println!("{key}");
            eprintln!(
                "the memory store lives inside the gateway process; add the hash to the consumer in the config:\n\
                 [[consumers]]\nid = \"{consumer}\"\nkey_sha256 = [\"{hash}\"]"
            );
        }
    }
    Ok(())
}

fn parse_day(s: &str) -> anyhow::Result<u32> {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("{s:?}: expected YYYY-MM-DD"))?;
    use chrono::Datelike;
    Ok(d.year() as u32 * 10_000 + d.month() * 100 + d.day())
}

async fn read_usage(
    config: &Config,
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<Vec<UsageRow>> {
    if config.store.kind != StoreKind::Redis {
        anyhow::bail!(
            "usage totals are kept in the store; with store.kind = \"memory\" they live inside the \
             running gateway (see its /metrics). Use store.kind = \"redis\" for the showback report."
        );
    }
    let today = tollgate_quota::day_of(crate::routing::now_ms() / 1000);
    let since = since
        .map(parse_day)
        .transpose()?
        .unwrap_or(today / 100 * 100 + 1);
    let until = until.map(parse_day).transpose()?.unwrap_or(today);
    let store: AnyStore = server::connect_store(config).await?;
    Ok(store.usage(since, until).await?)
}

/// Groups rows and renders them as a table (with a totals row), CSV or JSON.
pub fn render_usage(rows: &[UsageRow], by: By, format: Format) -> String {
    use std::collections::BTreeMap;
    let (label, key): (&str, fn(&UsageRow) -> &str) = match by {
        By::Consumer => ("consumer", |r| &r.consumer),
        By::Team => ("team", |r| &r.team),
        By::Model => ("model", |r| &r.model),
        By::Backend => ("backend", |r| &r.backend),
    };
    #[derive(Default, Clone, Copy)]
    struct T {
        input: u64,
        output: u64,
        cached: u64,
        requests: u64,
        cost_pico: u128,
    }
    let mut groups: BTreeMap<&str, T> = BTreeMap::new();
    let mut total = T::default();
    for r in rows {
        for t in [groups.entry(key(r)).or_default(), &mut total] {
            t.input += r.input;
            t.output += r.output;
            t.cached += r.cached_input;
            t.requests += r.requests;
            t.cost_pico += r.cost_pico as u128;
        }
    }
    let cost = |p: u128| p as f64 / 1e12;
    let exact = |p: u128| fmt_cost(p);
    let mut out = String::new();
    match format {
        Format::Json => {
            let items: Vec<serde_json::Value> = groups
                .iter()
                .map(|(k, t)| {
                    serde_json::json!({label: k, "requests": t.requests, "input_tokens": t.input,
                        "output_tokens": t.output, "cached_input_tokens": t.cached,
                        "cost": cost(t.cost_pico), "cost_exact": exact(t.cost_pico),
                        "cost_pico": t.cost_pico.to_string()})
                })
                .collect();
            let doc = serde_json::json!({"by": label, "rows": items, "total": {
                "requests": total.requests, "input_tokens": total.input, "output_tokens": total.output,
                "cached_input_tokens": total.cached, "cost": cost(total.cost_pico),
                "cost_exact": exact(total.cost_pico), "cost_pico": total.cost_pico.to_string()}});
            out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str(&format!(
                "{label},requests,input_tokens,output_tokens,cached_input_tokens,cost\n"
            ));
            for (k, t) in &groups {
                out.push_str(&format!(
                    "{},{},{},{},{},{}\n",
                    csv_field(k),
                    t.requests,
                    t.input,
                    t.output,
                    t.cached,
                    exact(t.cost_pico)
                ));
            }
        }
        Format::Table => {
            let w = groups
                .keys()
                .map(|k| k.len())
                .chain([label.len(), 5])
                .max()
                .unwrap_or(8);
            out.push_str(&format!(
                "{label:<w$}  {:>10}  {:>14}  {:>14}  {:>14}  {:>18}\n",
                "requests", "input_tokens", "output_tokens", "cached_tokens", "cost"
            ));
            let line = |name: &str, t: &T| {
                format!(
                    "{name:<w$}  {:>10}  {:>14}  {:>14}  {:>14}  {:>18}\n",
                    t.requests,
                    t.input,
                    t.output,
                    t.cached,
                    exact(t.cost_pico)
                )
            };
            for (k, t) in &groups {
                out.push_str(&line(k, t));
            }
            out.push_str(&line("TOTAL", &total));
        }
    }
    out
}

/// A cost in pico-units as an exact decimal in currency units: every significant digit kept
/// (a token at 0.15 per 1M is 0.00000015), at least two decimals.
pub fn fmt_cost(pico: u128) -> String {
    const ONE: u128 = 1_000_000_000_000;
    let frac = format!("{:012}", pico % ONE);
    let frac = frac.trim_end_matches('0');
    format!("{}.{frac:0<2}", pico / ONE)
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// `tollgate demo`: bundled mock PTU and PAYG backends, a memory store and a demo key.
pub async fn demo(listen: String) -> anyhow::Result<()> {
    use tollgate_loadtest::mock::{MockOpts, serve as mock_serve};
    let mut urls = Vec::new();
    for (name, tpm) in [("demo-ptu", Some(20_000)), ("demo-payg", None)] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", l.local_addr()?));
        let opts = MockOpts {
            name: name.into(),
            tpm,
            ttft_ms: 50,
            tokens_per_sec: Some(200.0),
            ..Default::default()
        };
        tokio::spawn(async move {
            if let Err(e) = mock_serve(l, opts, std::future::pending()).await {
                tracing::error!(error = %e, "demo mock backend failed");
            }
        });
    }
    let key = new_key();
    let toml = format!(
        r#"
[server]
listen = "{listen}"
debug_headers = true
[[consumers]]
id = "demo"
team = "demo-team"
tpm = 100000
key_sha256 = ["{hash}"]
[[backends]]
name = "ptu-eastus"
url = "{ptu}"
api = "azure"
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
deployments = {{ "gpt-4o" = "gpt4o-ptu-eastus" }}
priority = 1
breaker = {{ failures = 3, window_ms = 10000, trip_ms = 10000, statuses = [429, 500, 502, 503, 504], accept_retry_after = true }}
[[backends]]
name = "payg-openai"
url = "{payg}"
api = "openai"
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
priority = 2
price = {{ input_per_1m = 2.5, output_per_1m = 10.0 }}
"#,
        hash = key_hash(&key),
        ptu = urls[0],
        payg = urls[1],
    );
    let config = Config::from_toml(&toml).context("demo config")?;
    let banner = format!(
        "demo key: {key}\n\
         backends: ptu-eastus (mock PTU, 20k TPM, priority 1) at {ptu}; payg-openai (mock PAYG, priority 2) at {payg}\n\
         try:\n  curl -s http://{{addr}}/v1/chat/completions -H 'Authorization: Bearer {key}' \
         -H 'Content-Type: application/json' \
         -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":20}}'",
        ptu = urls[0],
        payg = urls[1],
    );
    serve(config, Some(banner)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table groups rows, aligns columns and ends with a totals row; cost is exact.
    #[test]
    fn usage_table() {
        let row = |c: &str, m: &str, i, o, cost| UsageRow {
            day: 20261126,
            consumer: c.into(),
            team: "t".into(),
            model: m.into(),
            backend: "b".into(),
            input: i,
            output: o,
            cached_input: 0,
            requests: 1,
            cost_pico: cost,
        };
        let rows = vec![
            row("a", "m1", 10, 5, 1_500_000),
            row("a", "m2", 1, 1, 0),
            row("b", "m1", 2, 2, 0),
        ];
        let t = render_usage(&rows, By::Consumer, Format::Table);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[3].starts_with("TOTAL"));
        assert!(
            lines[1].contains("11") && lines[1].contains("0.0000015"),
            "{t}"
        );
        let csv = render_usage(&rows, By::Consumer, Format::Csv);
        assert_eq!(csv.lines().nth(1), Some("a,2,11,6,0,0.0000015"), "{csv}");
        let j: serde_json::Value =
            serde_json::from_str(&render_usage(&rows, By::Model, Format::Json)).unwrap();
        assert_eq!(j["total"]["input_tokens"], 13);
        assert_eq!(j["rows"][0]["model"], "m1");
        assert_eq!(j["rows"][0]["requests"], 2);
        assert_eq!(j["total"]["cost_pico"], "1500000");
        assert_eq!(j["total"]["cost_exact"], "0.0000015");
    }

    /// Costs print exactly: no rounding of small amounts away, no float drift in large ones.
    #[test]
    fn cost_precision() {
        assert_eq!(fmt_cost(0), "0.00");
        assert_eq!(fmt_cost(150_000), "0.00000015");
        assert_eq!(fmt_cost(2_500_000_000_000), "2.50");
        assert_eq!(
            fmt_cost(123_456_789_012_345_678_901),
            "123456789.012345678901"
        );
    }
}

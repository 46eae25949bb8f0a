//! A Redis Cluster owned by one test: 3 masters and 3 replicas ([`Node`]s on free ports, each
//! with its own cluster bus port), formed with `redis-cli --cluster create --cluster-replicas 1`
//! (`valkey-cli` for the Valkey flavor) and ready once every node reports `cluster_state:ok`,
//! knows all six nodes, agrees on who serves which slots, and every replica's link to its
//! master is up. A short `cluster-node-timeout` makes a killed master's replica take over in
//! about two seconds.
//!
//! Operations take the topology from `CLUSTER NODES` ([`ClusterNode`]):
//! [`masters`](Cluster::masters), [`master_of`](Cluster::master_of) a key, a
//! [`cli`](Cluster::cli) that follows redirections (`-c`),
//! [`kill_master`](Cluster::kill_master) (SIGKILL) and
//! [`wait_promotion`](Cluster::wait_promotion) of its replica, and
//! [`reshard`](Cluster::reshard) (slots moved with `--cluster reshard`, keys included);
//! [`key_slot`] computes a key's slot without asking.

use anyhow::{Context as _, bail};
use std::ffi::OsString;
use std::process::Command;
use std::time::Duration;

use crate::server::{self, Flavor, Node, free_ports, standard_args, tail, temp_dir, wait_for};

/// Masters in the cluster; each has one replica.
const MASTERS: usize = 3;
/// How long a node may be unreachable before it is failed over: short, for fast failover
/// tests, yet long enough that a busy machine does not fail over a healthy node.
const NODE_TIMEOUT_MS: u64 = 1000;
/// Deadline of every wait (formation, promotion, resharding).
const WAIT: Duration = Duration::from_secs(30);
/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// A running 3-master, 3-replica cluster.
pub struct Cluster {
    flavor: Flavor,
    nodes: Vec<Node>,
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Flagged `fail` (or suspected, `fail?`) by the node that was asked.
    pub failed: bool,
    /// A replica's master.
    pub master_id: Option<String>,
    /// Slot ranges served (inclusive); empty for replicas.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    fn slot_list(&self) -> Vec<u16> {
        self.slots.iter().flat_map(|&(a, b)| a..=b).collect()
    }
}

impl Cluster {
    /// Starts six nodes, forms the cluster and waits until it is fully up (a few seconds).
    pub fn start(flavor: Flavor) -> anyhow::Result<Cluster> {
        let mut last = None;
        // A probed port may be taken before a node binds it: start over on fresh ports.
        for _ in 0..3 {
            match Cluster::try_start(flavor) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the cluster did not start")))
    }

    fn try_start(flavor: Flavor) -> anyhow::Result<Cluster> {
        let n = MASTERS * 2;
        let ports = free_ports(n * 2)?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let (port, bus) = (ports[i], ports[n + i]);
            let dir = temp_dir()?;
            let mut args = standard_args(dir.path(), port);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    "--cluster-require-full-coverage",
                    "no",
                    // The bus port defaults to port + 10000, which may be taken or past 65535.
                    "--cluster-port",
                    &bus.to_string(),
                ]
                .map(OsString::from),
            );
            nodes.push(Node::spawn(flavor, dir, port, args)?);
        }
        let cluster = Cluster { flavor, nodes };
        let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
        create.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        cluster.cluster_cli(&create)?;
        cluster.wait_ok().context("forming the cluster")?;
        cluster.wait_in_sync()?;
        Ok(cluster)
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Every node, killed ones included.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, port: u16) -> Option<&Node> {
        self.nodes.iter().find(|n| n.port() == port)
    }

    pub fn node_mut(&mut self, port: u16) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// `redis://127.0.0.1:PORT` of every node: the seed list a cluster client takes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Nodes not killed by the test.
    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.pid().is_some())
    }

    fn any_live(&self) -> anyhow::Result<&Node> {
        self.live().next().context("every cluster node was killed")
    }

    /// The cluster as one live node sees it (`CLUSTER NODES`).
    pub fn topology(&self) -> anyhow::Result<Vec<ClusterNode>> {
        topology_from(self.any_live()?)
    }

    /// Masters not flagged as failed, each with its slots.
    pub fn masters(&self) -> anyhow::Result<Vec<ClusterNode>> {
        Ok(self
            .topology()?
            .into_iter()
            .filter(|n| n.master && !n.failed)
            .collect())
    }

    /// The master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> anyhow::Result<ClusterNode> {
        let slot: u16 = self
            .any_live()?
            .cli(&["CLUSTER", "KEYSLOT", key])?
            .parse()
            .context("CLUSTER KEYSLOT")?;
        self.masters()?
            .into_iter()
            .find(|m| m.serves(slot))
            .with_context(|| format!("no master serves slot {slot}"))
    }

    /// `redis-cli -c args…` against a live node: the command follows MOVED/ASK redirections
    /// to whichever master serves its key.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.any_live()?.cli(&all)
    }

    /// Kills the master on `port` with SIGKILL and returns how it looked before: its id and
    /// slots, for [`wait_promotion`](Self::wait_promotion).
    pub fn kill_master(&mut self, port: u16) -> anyhow::Result<ClusterNode> {
        let before = self
            .topology()?
            .into_iter()
            .find(|n| n.port == port)
            .with_context(|| format!("no cluster node on port {port}"))?;
        if !before.master {
            bail!("the node on port {port} is a replica, not a master");
        }
        self.node_mut(port)
            .with_context(|| format!("no cluster node on port {port}"))?
            .stop();
        Ok(before)
    }

    /// Waits until every live node sees `killed` as failed and one of its replicas as the
    /// master of all its slots, with `cluster_state:ok` everywhere; returns the new master.
    pub fn wait_promotion(&self, killed: &ClusterNode) -> anyhow::Result<ClusterNode> {
        let promoted = wait_for(
            WAIT,
            "a replica promoted in the killed master's place",
            || {
                let mut agreed: Option<ClusterNode> = None;
                for node in self.live() {
                    let topo = topology_from(node)?;
                    let seen_failed = topo.iter().any(|n| n.id == killed.id && n.failed);
                    let heir = topo.into_iter().find(|n| {
                        n.master && !n.failed && n.id != killed.id && n.slots == killed.slots
                    });
                    match (seen_failed, heir, &agreed) {
                        (true, Some(h), None) => agreed = Some(h),
                        (true, Some(h), Some(a)) if h.id == a.id => {}
                        _ => return Ok(None),
                    }
                }
                Ok(agreed)
            },
        )
        .map_err(|e| self.explain(e))?;
        self.wait_ok()?;
        Ok(promoted)
    }

    /// Moves `count` slots from the master on `from` to the master on `to` with
    /// `redis-cli --cluster reshard … --cluster-yes` (keys migrate with them), waits until every
    /// live node agrees, and returns the moved slot ranges: `--cluster reshard` takes a single
    /// source's lowest-numbered slots.
    pub fn reshard(&self, from: u16, to: u16, count: u16) -> anyhow::Result<Vec<(u16, u16)>> {
        let topo = self.topology()?;
        let find = |port: u16| {
            topo.iter()
                .find(|n| n.port == port && n.master && !n.failed)
                .with_context(|| format!("no live master on port {port}"))
        };
        let (source, target) = (find(from)?, find(to)?);
        let moving: Vec<u16> = source
            .slot_list()
            .into_iter()
            .take(usize::from(count))
            .collect();
        if moving.len() < usize::from(count) {
            bail!("the master on {from} serves only {} slots", moving.len());
        }
        let seed = format!("127.0.0.1:{}", self.any_live()?.port());
        self.cluster_cli(&[
            "--cluster".into(),
            "reshard".into(),
            seed,
            "--cluster-from".into(),
            source.id.clone(),
            "--cluster-to".into(),
            target.id.clone(),
            "--cluster-slots".into(),
            count.to_string(),
            "--cluster-yes".into(),
        ])?;
        let target_id = target.id.clone();
        wait_for(WAIT, "every node agreeing on the resharded slots", || {
            for node in self.live() {
                let topo = topology_from(node)?;
                let Some(t) = topo.iter().find(|n| n.id == target_id) else {
                    return Ok(None);
                };
                if !moving.iter().all(|&s| t.serves(s)) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .map_err(|e| self.explain(e))?;
        Ok(ranges(&moving))
    }

    /// Waits until every live node reports `cluster_state:ok`, all slots served by healthy
    /// masters, every node known, and the same masters with the same slots.
    pub fn wait_ok(&self) -> anyhow::Result<()> {
        wait_for(WAIT, "cluster_state:ok on every node", || {
            let mut view: Option<Vec<ClusterNode>> = None;
            for node in self.live() {
                let info = node.cli(&["CLUSTER", "INFO"])?;
                let field = |f: &str| server::info_value(&info, f).unwrap_or_default();
                if field("cluster_state") != "ok"
                    || field("cluster_slots_ok") != SLOTS.to_string()
                    || field("cluster_known_nodes") != self.nodes.len().to_string()
                {
                    return Ok(None);
                }
                let mut masters: Vec<_> = topology_from(node)?
                    .into_iter()
                    .filter(|n| n.master && !n.failed)
                    .collect();
                masters.sort_by(|a, b| a.id.cmp(&b.id));
                match &view {
                    None => view = Some(masters),
                    Some(v) if *v == masters => {}
                    Some(_) => return Ok(None),
                }
            }
            Ok(Some(()))
        })
        .map_err(|e| self.explain(e))
    }

    /// Waits until every live replica's link to its master is up and every live master's
    /// replicas have acknowledged all it has written (their offsets equal its own): a write
    /// made before this call survives a failover.
    pub fn wait_in_sync(&self) -> anyhow::Result<()> {
        wait_for(WAIT, "every replica in sync with its master", || {
            for node in self.live() {
                let info = node.cli(&["INFO", "replication"])?;
                let role = server::info_value(&info, "role");
                if role.as_deref() == Some("slave") {
                    if server::info_value(&info, "master_link_status").as_deref() != Some("up") {
                        return Ok(None);
                    }
                    continue;
                }
                if !node.replicas_caught_up()?.1 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .map_err(|e| self.explain(e))
    }

    /// `redis-cli --cluster …` (the flavor's cli); fails with its output.
    fn cluster_cli(&self, args: &[String]) -> anyhow::Result<String> {
        let cli = self.any_live()?.cli_bin();
        let out = Command::new(cli)
            .args(args)
            .output()
            .with_context(|| format!("running {}", cli.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("{} {}: {text}", cli.display(), args.join(" "));
        }
        Ok(text)
    }

    /// Adds what the cluster looks like now, and the tail of each node's log, to `e`.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let nodes = self
            .any_live()
            .and_then(|n| n.cli(&["CLUSTER", "NODES"]))
            .unwrap_or_else(|e| format!("({e})"));
        let logs: String = self
            .nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}\n", n.port(), tail(&n.log(), 15)))
            .collect();
        e.context(format!("CLUSTER NODES:\n{nodes}\n{logs}"))
    }
}

/// The slot of `key` as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of its
/// `{hash tag}` when it has a non-empty one, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// `CLUSTER NODES` of `node`, parsed.
fn topology_from(node: &Node) -> anyhow::Result<Vec<ClusterNode>> {
    node.cli(&["CLUSTER", "NODES"])?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_node)
        .collect()
}

/// One `CLUSTER NODES` line: `<id> <ip:port@bus[,host]> <flags> <master|-> <ping> <pong>
/// <epoch> <link> <slot|a-b|[migrating]>…`.
fn parse_node(line: &str) -> anyhow::Result<ClusterNode> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        bail!("unexpected CLUSTER NODES line {line:?}");
    }
    let port = f[1]
        .split('@')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {line:?}"))?;
    let flags: Vec<&str> = f[2].split(',').collect();
    let mut slots = Vec::new();
    for s in &f[8..] {
        if s.starts_with('[') {
            continue; // a slot being migrated or imported
        }
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        slots.push((a.parse()?, b.parse()?));
    }
    Ok(ClusterNode {
        id: f[0].to_string(),
        port,
        master: flags.contains(&"master"),
        failed: flags.iter().any(|&x| x == "fail" || x == "fail?"),
        master_id: (f[3] != "-").then(|| f[3].to_string()),
        slots,
    })
}

/// Sorted slots as inclusive ranges.
fn ranges(slots: &[u16]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &s in slots {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == s => *b = s,
            _ => out.push((s, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `CLUSTER NODES` master line with slot ranges, a single slot and a migrating entry
    /// parses into its port, flags and slots; a failed replica line keeps its master id.
    #[test]
    fn parses_cluster_nodes_lines() {
        let m = parse_node(
            "650e 127.0.0.1:17000@18000 myself,master - 0 0 1 connected 0-5460 5470 [5471->-f597]",
        )
        .unwrap();
        assert_eq!(m.port, 17000);
        assert!(m.master && !m.failed && m.master_id.is_none());
        assert_eq!(m.slots, vec![(0, 5460), (5470, 5470)]);
        assert!(m.serves(5470) && !m.serves(5465));
        let r = parse_node("8d0c 127.0.0.1:17005@18005,host slave,fail 71e0 0 0 3 disconnected")
            .unwrap();
        assert!(!r.master && r.failed);
        assert_eq!(r.master_id.as_deref(), Some("71e0"));
        assert!(r.slots.is_empty());
    }

    /// Key slots match what Redis answers to `CLUSTER KEYSLOT` (values taken from a real
    /// server), hash tags included.
    #[test]
    fn key_slots() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"k1"), 12706);
        assert_eq!(key_slot(b"{foo}.bar"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), 3443);
        assert_eq!(key_slot(b"a{b}c{d}"), 3300);
        // An empty tag hashes the whole key.
        assert_eq!(key_slot(b"{}foo"), 9500);
        assert_eq!(key_slot(b"foo{}{bar}"), 8363);
    }

    /// Slot lists compress into inclusive ranges.
    #[test]
    fn slot_ranges() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        assert!(ranges(&[]).is_empty());
    }
}

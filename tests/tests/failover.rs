//! A master failover loses no usage, on a Redis Cluster and under Sentinel, Redis and Valkey:
//! a settle batch that a master acknowledged but its replica never received (the replica is
//! frozen, then the master is killed) is confirmed by nobody (`WAIT 1`), re-sent under its
//! batch id, and counted exactly once on the promoted replica; a batch the replica did receive
//! is not counted twice. After the promotion the store serves the dead master's consumers
//! again (scripts loaded anew on NOSCRIPT), with the state the replica had.

use std::time::{Duration, Instant};
use tollgate_quota::{
    ConsumerRecord, Credentials, Decision, LimitDefaults, Period, RedisOpts, RedisStore,
    ReserveRequest, Settlement, Store, Topology, UsageCounts, UsageDelta, new_batch_id,
    new_reservation_id,
};
use tollgate_tests::sentinel::MASTER_NAME;
use tollgate_tests::{Cluster, Flavor, Node, Sentinel, usage_settlement};

const DAY: u32 = 20260101;

fn opts() -> RedisOpts {
    RedisOpts {
        timeout: Duration::from_secs(2),
        pool_size: 2,
        confirm_writes: true,
        confirm_timeout: Duration::from_millis(100),
        ..RedisOpts::default()
    }
}

fn record(id: &str) -> ConsumerRecord {
    ConsumerRecord {
        id: id.into(),
        quota: Some(1_000_000),
        quota_period: Period::Month,
        ..ConsumerRecord::default()
    }
}

async fn reserve(s: &RedisStore, id: &str, tokens: u64) -> Decision {
    let defaults = LimitDefaults::default();
    s.reserve(&ReserveRequest {
        consumer: id,
        model: "gpt-4o",
        tokens,
        defaults: &defaults,
        require_record: true,
        id: new_reservation_id(),
        background: false,
        cost_nano: 0,
    })
    .await
    .expect("reserve")
}

/// A batch of `requests` requests of usage for `id` (no correction).
fn usage(id: &str, requests: u64) -> Settlement {
    usage_settlement(
        id,
        UsageDelta {
            day: DAY,
            team: "t".into(),
            model: "gpt-4o".into(),
            backend: "b".into(),
            counts: UsageCounts {
                requests,
                ..UsageCounts::default()
            },
            dims: None,
        },
    )
}

/// Requests counted for `id`, or `None` while the store cannot answer.
async fn requests(s: &RedisStore, id: &str) -> Option<u64> {
    let rows = s.usage(DAY, DAY).await.ok()?;
    Some(
        rows.iter()
            .filter(|r| r.consumer == id)
            .map(|r| r.counts.requests)
            .sum(),
    )
}

/// Waits until `id` shows `want` requests, then checks that it stays there (no double count
/// from later re-sends).
async fn expect_requests(s: &RedisStore, id: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = requests(s, id).await;
        if got == Some(want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage of {id} after the failover: {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(requests(s, id).await, Some(want), "counted twice");
}

/// Closes the master's links to its replicas (`CLIENT KILL TYPE replica`).
fn cut_replication(master: &Node) {
    let killed = master.cli(&["CLIENT", "KILL", "TYPE", "replica"]).unwrap();
    assert_eq!(killed, "1", "one replica link closed");
}
/// The ports of a master and of its replica that [`Servers::freeze_replica`] froze.
#[derive(Clone, Copy)]
struct Frozen {
    master: u16,
    replica: u16,
}

/// What the scenario does to the servers behind the store: a Redis Cluster or a Sentinel group.
trait Servers {
    fn topology(&self) -> Topology;
    fn wait_in_sync(&self);
    /// Pauses the replica of the master that holds `key` and closes that master's replication
    /// links: nothing written from now on reaches the replica.
    fn freeze_replica(&mut self, key: &str) -> Frozen;
    /// Kills the frozen master, resumes its replica and waits for a promotion; returns the
    /// promoted master's port.
    fn fail_over(&mut self, frozen: Frozen) -> u16;
}

impl Servers for Cluster {
    fn topology(&self) -> Topology {
        Topology::Cluster(self.urls())
    }

    fn wait_in_sync(&self) {
        Cluster::wait_in_sync(self).unwrap();
    }

    fn freeze_replica(&mut self, key: &str) -> Frozen {
        let master = self.master_of(key).unwrap();
        let replica = self
            .topology()
            .unwrap()
            .into_iter()
            .find(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .expect("the master's replica")
            .port;
        self.node(replica).unwrap().pause().unwrap();
        // Its replication link is cut while it cannot reconnect: nothing written from now on
        // reaches it (a paused process would still find the bytes in its socket on resume).
        cut_replication(self.node(master.port).unwrap());
        Frozen {
            master: master.port,
            replica,
        }
    }

    fn fail_over(&mut self, frozen: Frozen) -> u16 {
        let killed = self.kill_master(frozen.master).unwrap();
        self.node(frozen.replica).unwrap().resume().unwrap();
        self.wait_promotion(&killed).unwrap().port
    }
}

impl Servers for Sentinel {
    fn topology(&self) -> Topology {
        Topology::Sentinel {
            sentinels: self.sentinel_urls(),
            master_name: MASTER_NAME.into(),
        }
    }

    fn wait_in_sync(&self) {
        Sentinel::wait_in_sync(self).unwrap();
    }

    /// (One master, one replica: `key` does not choose.)
    fn freeze_replica(&mut self, _key: &str) -> Frozen {
        let replica = self.replica().unwrap().port();
        self.replica().unwrap().pause().unwrap();
        let master = self.master().unwrap();
        cut_replication(master);
        Frozen {
            master: master.port(),
            replica,
        }
    }

    fn fail_over(&mut self, frozen: Frozen) -> u16 {
        let old = self.kill_master().unwrap();
        assert_eq!(old, frozen.master, "the frozen master was killed");
        self.node(frozen.replica).unwrap().resume().unwrap();
        self.wait_failover(old).unwrap()
    }
}

/// The scenario on either kind of servers: a batch that only the master got is counted once
/// on the promoted replica, which then serves the consumer from the state it had.
async fn failover_loses_no_usage(mut servers: impl Servers) {
    let s = RedisStore::open(&servers.topology(), &Credentials::default(), opts())
        .await
        .expect("connect");
    let id = "failover";
    s.put_consumer(&record(id)).await.unwrap();
    assert!(matches!(reserve(&s, id, 1000).await, Decision::Admitted(_)));
    s.settle(new_batch_id(), &[usage(id, 5)]).await.unwrap();
    servers.wait_in_sync();

    // The replica of this consumer's master stops acknowledging; the next batch reaches the
    // master only.
    let frozen = servers.freeze_replica(&format!("tg:usage:{{{id}}}:{DAY}"));
    s.settle(new_batch_id(), &[usage(id, 7)]).await.unwrap();
    assert_eq!(requests(&s, id).await, Some(12), "the master applied it");
    let promoted = servers.fail_over(frozen);
    assert_eq!(promoted, frozen.replica);

    // The promoted replica never had the second batch: the re-send brings it, once.
    expect_requests(&s, id, 12).await;
    // The dead master's consumer is served again, from the state the replica had: one
    // reservation of 1000 (the second reserve below runs its script on a server that never
    // loaded it).
    let Decision::Admitted(a) = reserve(&s, id, 1).await else {
        panic!("not admitted after the failover")
    };
    assert_eq!(a.remaining_quota, Some(1_000_000 - 1000 - 1));
}

/// On a Redis Cluster, a batch only the dying master had is counted once after promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_redis_failover_loses_no_usage() {
    failover_loses_no_usage(Cluster::start(Flavor::Redis).expect("start a cluster")).await;
}

/// The same on a Valkey cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_valkey_failover_loses_no_usage() {
    failover_loses_no_usage(Cluster::start(Flavor::Valkey).expect("start a cluster")).await;
}

/// Under Sentinel, the store follows the promoted master and loses no usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_redis_failover_loses_no_usage() {
    failover_loses_no_usage(Sentinel::start(Flavor::Redis).expect("start a sentinel group")).await;
}

/// The same with Valkey sentinels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_valkey_failover_loses_no_usage() {
    failover_loses_no_usage(Sentinel::start(Flavor::Valkey).expect("start a sentinel group")).await;
}

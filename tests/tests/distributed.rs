//! Three gateway processes on a Redis Cluster (3 masters, 3 replicas; Redis and Valkey), with
//! `store.kind = "redis_cluster"`: many consumers whose keys spread over every master; and on
//! a Sentinel group (`store.kind = "redis_sentinel"`) whose master is killed under load.
//!
//! - Quotas hold exactly under concurrent load on all three gateways (admitted ≤ Q + one
//!   request, ≥ 0.9 Q, per consumer), while a slot range moves between masters
//!   (`redis-cli --cluster reshard`) without an error reaching a client.
//! - A circuit tripped through one gateway is seen by the other two.
//! - An operator's `redis-cli -c HSET` applies on every gateway.
//! - A master killed (SIGKILL) under load: no 5xx for keys in use (`on_error = "local"` for the
//!   dead master's consumers, exact shared limits for the others); a key never seen whose
//!   mapping lives on the dead master gets 503 with `retry-after`; after the promotion the
//!   gateways use the shared store for those consumers again; `tollgate usage` equals what the
//!   backend served, request for request and token for token.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::sentinel::MASTER_NAME;
use tollgate_tests::{
    Cluster, ClusterNode, Flavor, Harness, Running, Sentinel, client, key_for, key_slot,
};

const MAX_TOKENS: u64 = 40;

fn body() -> Value {
    json!({"model": "gpt-4o", "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "One line about hash slots."}]})
}

/// Consumer ids, `per_master` of them for each master, in slot order.
fn spread_ids(cluster: &Cluster, per_master: usize) -> Vec<String> {
    let masters = cluster.masters().unwrap();
    let mut count = vec![0; masters.len()];
    let mut ids = Vec::new();
    for i in 0.. {
        let id = format!("c{i}");
        let slot = key_slot(id.as_bytes());
        let m = masters.iter().position(|m| m.serves(slot)).unwrap();
        if count[m] < per_master {
            count[m] += 1;
            ids.push(id);
        }
        if count.iter().all(|&c| c == per_master) {
            break;
        }
    }
    ids
}

/// What one consumer's clients saw: statuses and the tokens of the answers they got.
#[derive(Debug, Default)]
struct Seen {
    statuses: BTreeMap<u16, u64>,
    tokens: u64,
}

type Tally = Arc<Mutex<BTreeMap<String, Seen>>>;

/// `clients` tasks per gateway and consumer send requests back to back until `until`, or (with
/// `stop_on`) until that status is answered.
async fn hammer(
    h: &Running,
    ids: &[String],
    clients: usize,
    until: Instant,
    stop_on: Option<u16>,
) -> Tally {
    let tally: Tally = Arc::default();
    let mut tasks = Vec::new();
    for g in 0..h.gateways.len() {
        for id in ids {
            for _ in 0..clients {
                let url = format!("{}/v1/chat/completions", h.url(g));
                let (id, tally, c) = (id.clone(), tally.clone(), client());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let (status, tokens) = match c
                            .post(&url)
                            .bearer_auth(key_for(&id))
                            .json(&body())
                            .send()
                            .await
                        {
                            Ok(r) => {
                                let s = r.status().as_u16();
                                let v: Value = r.json().await.unwrap_or_default();
                                (s, v["usage"]["total_tokens"].as_u64().unwrap_or(0))
                            }
                            Err(_) => (599, 0),
                        };
                        {
                            let mut t = tally.lock().unwrap();
                            let seen = t.entry(id.clone()).or_default();
                            *seen.statuses.entry(status).or_default() += 1;
                            seen.tokens += tokens;
                        }
                        if Some(status) == stop_on {
                            break;
                        }
                        if status == 429 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }));
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally
}

fn count(t: &Tally, pred: impl Fn(u16) -> bool) -> u64 {
    t.lock()
        .unwrap()
        .values()
        .flat_map(|s| s.statuses.iter())
        .filter(|(s, _)| pred(**s))
        .map(|(_, n)| n)
        .sum()
}

async fn start(cluster: &Cluster, ids: &[String], consumer: &str, extra: &str) -> Running {
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let mut h = Harness::new()
        .store(&format!(
            "kind = \"redis_cluster\"\nurls = [{}]\ntimeout_ms = 200\n{extra}",
            urls.join(", ")
        ))
        .backend("m", MockOpts::default(), "")
        .gateways(3);
    for id in ids {
        h = h.consumer(id, consumer);
    }
    h.start().await.expect("start gateways on the cluster")
}

async fn status_of(h: &Running, g: usize, key: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", h.url(g)))
        .bearer_auth(key)
        .json(&body())
        .send()
        .await
        .unwrap()
}

async fn limits_reshard_breaker_admin(flavor: Flavor) {
    const Q: u64 = 12_000;
    let cluster = Cluster::start(flavor).expect("start a cluster");
    let mut ids = spread_ids(&cluster, 2);
    // Quotas, under load on every gateway, while 200 slots (keys included) change master; one
    // more consumer lives in those slots.
    let masters = cluster.masters().unwrap();
    let (from, to) = (masters[0].port, masters[1].port);
    let first = masters[0].slots[0].0;
    let moving = (0..)
        .map(|i| format!("r{i}"))
        .find(|id| (first..first + 200).contains(&key_slot(id.as_bytes())))
        .unwrap();
    ids.push(moving.clone());
    let h = start(
        &cluster,
        &ids,
        &format!("quota = {Q}\nquota_period = \"day\""),
        "",
    )
    .await;
    let load = hammer(
        &h,
        &ids,
        2,
        Instant::now() + Duration::from_secs(60),
        Some(403),
    );
    let reshard = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| cluster.reshard(from, to, 200)).expect("reshard under load")
    };
    let (tally, moved) = tokio::join!(load, reshard);
    let slot = key_slot(moving.as_bytes());
    assert!(
        moved.iter().any(|&(a, b)| (a..=b).contains(&slot)),
        "{moving} (slot {slot}) did not move: {moved:?}"
    );
    let per_request = count_prompt_tokens(&body()) + MAX_TOKENS;
    for (id, seen) in tally.lock().unwrap().iter() {
        assert!(
            seen.tokens <= Q + per_request && seen.tokens * 10 >= Q * 9,
            "{id}: {} tokens served for a quota of {Q}: {seen:?}",
            seen.tokens
        );
    }
    assert_eq!(
        count(&tally, |s| s >= 500),
        0,
        "an error reached a client: {tally:?}"
    );
    let served = h.mock("m").stats().await.unwrap();
    assert_eq!(served.ok, count(&tally, |s| s == 200));

    // An operator's change through any node, followed to the right master, applies on every
    // gateway (within the 1 s a refusal is remembered, and the 250 ms a lease lives).
    let id = &ids[0];
    let quota = format!("tg:consumer:{{{id}}}");
    cluster
        .cli(&["HSET", &quota, "quota", "100000000"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for g in 0..3 {
        assert_eq!(
            status_of(&h, g, &key_for(id)).await.status(),
            200,
            "gateway {g}"
        );
    }
    cluster.cli(&["HSET", &quota, "disabled", "1"]).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    for g in 0..3 {
        let r = status_of(&h, g, &key_for(id)).await;
        assert_eq!(r.status(), 403, "gateway {g}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "consumer_disabled");
    }
}

/// On a Redis Cluster: per-consumer quotas exact across three gateways during a reshard, and
/// `redis-cli -c` admin applied everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_redis_limits_reshard_admin() {
    limits_reshard_breaker_admin(Flavor::Redis).await;
}

/// The same on a Valkey 8 cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_valkey_limits_reshard_admin() {
    limits_reshard_breaker_admin(Flavor::Valkey).await;
}

/// A circuit tripped through gateway 0 (its only failure trips it) is open on gateways 1 and
/// 2 at once: they never call the broken backend (Redis cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_redis_breaker_trip_reaches_every_gateway() {
    breaker_trip_reaches_every_gateway(Flavor::Redis).await;
}

/// The same on a Valkey cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_valkey_breaker_trip_reaches_every_gateway() {
    breaker_trip_reaches_every_gateway(Flavor::Valkey).await;
}

async fn breaker_trip_reaches_every_gateway(flavor: Flavor) {
    let cluster = Cluster::start(flavor).expect("start a cluster");
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let h = Harness::new()
        .store(&format!(
            "kind = \"redis_cluster\"\nurls = [{}]\ntimeout_ms = 200",
            urls.join(", ")
        ))
        .backend(
            "broken",
            MockOpts {
                fail_rate: 1.0,
                ..Default::default()
            },
            "priority = 1\nbreaker = { failures = 1, window_ms = 10000, trip_ms = 60000 }",
        )
        .backend("ok", MockOpts::default(), "priority = 2")
        .consumer("b", "")
        .gateways(3)
        .start()
        .await
        .unwrap();
    assert_eq!(status_of(&h, 0, &key_for("b")).await.status(), 200);
    assert_eq!(h.mock("broken").stats().await.unwrap().requests, 1);
    // Pushed over the cluster's pub/sub (the periodic re-read would take up to 2 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for g in [1, 2] {
        for _ in 0..3 {
            assert_eq!(status_of(&h, g, &key_for("b")).await.status(), 200);
        }
    }
    assert_eq!(
        h.mock("broken").stats().await.unwrap().requests,
        1,
        "a gateway called the tripped backend"
    );
}

/// A key (not in the config) whose mapping lives on the master serving `victim`'s slots.
fn key_on(victim: &ClusterNode) -> (String, String) {
    for i in 0.. {
        let key = format!("tg-admin-key-{i}");
        let hash = tollgate_common::key_hash(&key);
        if victim.serves(key_slot(format!("tg:key:{hash}").as_bytes())) {
            return (key, hash);
        }
    }
    unreachable!()
}

async fn master_killed_under_load(flavor: Flavor) {
    let mut cluster = Cluster::start(flavor).expect("start a cluster");
    let ids = spread_ids(&cluster, 2);
    let h = start(
        &cluster,
        &ids,
        "quota = 1000000000\nquota_period = \"day\"",
        "on_error = \"local\"",
    )
    .await;
    let victim = cluster.master_of(&ids[0]).unwrap();
    let (fresh_key, fresh_hash) = key_on(&victim);
    cluster
        .cli(&["SET", &format!("tg:key:{fresh_hash}"), &ids[0]])
        .unwrap();
    cluster.wait_in_sync().unwrap();

    let started = Instant::now();
    let load = hammer(&h, &ids, 1, started + Duration::from_secs(12), None);
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed = cluster.kill_master(victim.port).unwrap();
        // Never seen by any gateway, its mapping unreachable: 503 with retry-after, not 401.
        let r = status_of(&h, 1, &fresh_key).await;
        let status = r.status().as_u16();
        let retry = r.headers().get("retry-after").is_some();
        let promoted = tokio::task::block_in_place(|| cluster.wait_promotion(&killed)).unwrap();
        (status, retry, promoted, started.elapsed())
    };
    let (tally, (fresh_status, fresh_retry, promoted, promoted_at)) = tokio::join!(load, chaos);
    eprintln!(
        "promoted {} after {promoted_at:?}: {tally:?}",
        promoted.port
    );
    assert_eq!(
        (fresh_status, fresh_retry),
        (503, true),
        "a never-seen key during the outage"
    );
    assert_eq!(
        count(&tally, |s| s >= 500),
        0,
        "5xx for keys in use: {tally:?}"
    );
    for (id, seen) in tally.lock().unwrap().iter() {
        assert!(
            seen.statuses.get(&200).copied().unwrap_or(0) > 0,
            "{id}: {seen:?}"
        );
    }

    // After the promotion the dead master's consumers are limited by the shared store again:
    // an operator's change there applies on every gateway.
    let id = &ids[0];
    cluster
        .cli(&["HSET", &format!("tg:consumer:{{{id}}}"), "disabled", "1"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for g in 0..3 {
        assert_eq!(
            status_of(&h, g, &key_for(id)).await.status(),
            403,
            "gateway {g}"
        );
    }

    assert_usage_matches_backend(&h).await;
}

/// Every request the backend served is in `tollgate usage`, once (waits for the settles).
async fn assert_usage_matches_backend(h: &Running) {
    let served = h.mock("m").stats().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = tokio::task::block_in_place(|| h.usage("consumer")).unwrap_or_default();
        let sum = |f: &str| -> u64 {
            rows["rows"]
                .as_array()
                .map(|a| a.iter().map(|r| r[f].as_u64().unwrap_or(0)).sum())
                .unwrap_or(0)
        };
        let (requests, tokens) = (sum("requests"), sum("input_tokens") + sum("output_tokens"));
        if requests == served.ok && tokens == served.total_tokens {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "usage {requests} requests / {tokens} tokens, backend served {} / {}: {rows}",
            served.ok,
            served.total_tokens
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGKILL of a Redis master under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_redis_master_killed_under_load() {
    master_killed_under_load(Flavor::Redis).await;
}

/// SIGKILL of a Valkey master under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_valkey_master_killed_under_load() {
    master_killed_under_load(Flavor::Valkey).await;
}

async fn sentinel_master_killed_under_load(flavor: Flavor) {
    let mut group = Sentinel::start(flavor).expect("start a sentinel group");
    let sentinels: Vec<String> = group
        .sentinel_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    let ids: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let mut h = Harness::new()
        .store(&format!(
            "kind = \"redis_sentinel\"\nsentinels = [{}]\nmaster_name = \"{MASTER_NAME}\"\n\
             timeout_ms = 200\non_error = \"local\"",
            sentinels.join(", ")
        ))
        .backend("m", MockOpts::default(), "")
        .gateways(3);
    for id in &ids {
        h = h.consumer(id, "quota = 1000000000\nquota_period = \"day\"");
    }
    let h = h
        .start()
        .await
        .expect("start gateways through the sentinels");
    group.wait_in_sync().unwrap();
    let started = Instant::now();
    let load = hammer(&h, &ids, 1, started + Duration::from_secs(10), None);
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let old = group.kill_master().unwrap();
        let new = tokio::task::block_in_place(|| group.wait_failover(old)).unwrap();
        (new, started.elapsed())
    };
    let (tally, (new, at)) = tokio::join!(load, chaos);
    eprintln!("failed over to {new} after {at:?}: {tally:?}");
    assert_eq!(
        count(&tally, |s| s >= 500),
        0,
        "5xx during the failover: {tally:?}"
    );
    // The gateways follow the promoted master: an operator's change there applies everywhere.
    let master = group.master().unwrap();
    master
        .cli(&[
            "HSET",
            &format!("tg:consumer:{{{}}}", ids[0]),
            "disabled",
            "1",
        ])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for g in 0..3 {
        assert_eq!(
            status_of(&h, g, &key_for(&ids[0])).await.status(),
            403,
            "gateway {g}"
        );
    }
    assert_usage_matches_backend(&h).await;
}

/// SIGKILL of the Redis master under Sentinel, under load: no 5xx, the gateways follow the
/// promoted replica, and usage equals the backend's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_redis_master_killed_under_load() {
    sentinel_master_killed_under_load(Flavor::Redis).await;
}

/// The same with Valkey sentinels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_valkey_master_killed_under_load() {
    sentinel_master_killed_under_load(Flavor::Valkey).await;
}

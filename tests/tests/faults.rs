//! Exact admission under partial faults, with real processes: three gateways, one real
//! `redis-server`, a mock backend, and faults injected from outside: a latency proxy in front
//! of one replica's Redis link, Redis frozen with SIGSTOP, Redis losing its data, Redis
//! refusing writes. The invariant: the backend never serves more than the quota plus one
//! request per replica, the usage totals equal what the backend served exactly, the quota
//! counter ends equal to it too (no phantom debit outlives its request), and configured keys
//! are never refused because the store lost them.

use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::latency::LatencyProxy;
use tollgate_tests::{Harness, Running, assert_served, chat, client, key_for};

fn body() -> Value {
    chat(40).json()
}

fn per_request() -> u64 {
    count_prompt_tokens(&body()) + 40
}

type Counts = Arc<Mutex<BTreeMap<u16, u64>>>;

/// `clients` tasks per node send requests back to back until `until`, or until 2 s after the
/// first 403 anywhere (the quota is spent), counting statuses.
async fn load(h: &Running, key: &str, clients: usize, until: Instant) -> Counts {
    // The first client in a process pays for its TLS set-up (seconds in a debug build).
    drop(client());
    let counts: Counts = Arc::default();
    let spent: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for node in 0..h.gateways.len() {
        for _ in 0..clients {
            let (url, key, counts, spent) = (
                format!("{}/v1/chat/completions", h.url(node)),
                key.to_string(),
                counts.clone(),
                spent.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let c = client();
                let over = || {
                    let s = *spent.lock().unwrap();
                    s.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
                };
                while Instant::now() < until && !over() {
                    let r = c.post(&url).bearer_auth(&key).json(&body()).send().await;
                    let status = match r {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 599,
                    };
                    *counts.lock().unwrap().entry(status).or_default() += 1;
                    if status == 403 {
                        spent.lock().unwrap().get_or_insert_with(Instant::now);
                        break;
                    }
                    if status != 200 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    counts
}

/// Input + output over every usage row once they reach `expect` (a slow replica's last batch
/// may land seconds after the load ends: its settles are retried every 500 ms until the store
/// answers in time), or what they say after 30 s.
async fn settled_usage(h: &Running, expect: u64) -> u64 {
    let total = |v: &Value| -> u64 {
        v["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        r["input_tokens"].as_u64().unwrap_or(0)
                            + r["output_tokens"].as_u64().unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = total(&h.usage("consumer").unwrap());
        if now == expect || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the quota counter says was used.
fn quota_used(h: &Running, consumer: &str) -> u64 {
    h.redis
        .as_ref()
        .unwrap()
        .cli(&["HGET", &format!("tg:quota:{{{consumer}}}"), "used"])
        .unwrap()
        .parse()
        .unwrap_or(0)
}

/// The shared checks after a faulty run: never more than Q + one request per replica, every
/// served token in the usage totals, the quota counter equal to what was served.
async fn assert_exact(h: &Running, consumer: &str, q: u64, counts: &Counts) {
    let served = h.mock("m").stats().await.unwrap();
    let counts = counts.lock().unwrap().clone();
    let context = format!("{counts:?}");
    assert_served(served.total_tokens, q, q + 3 * per_request(), 8, &context);
    assert_eq!(
        counts.get(&200).copied().unwrap_or(0),
        served.ok,
        "{counts:?}"
    );
    let bad: Vec<_> = counts
        .iter()
        .filter(|(s, _)| **s >= 500 && **s != 503)
        .collect();
    assert!(bad.is_empty(), "{counts:?}");
    let usage = settled_usage(h, served.total_tokens).await;
    assert_eq!(
        usage, served.total_tokens,
        "usage totals {usage} ≠ tokens served {}",
        served.total_tokens
    );
    let ok = tollgate_tests::eventually(Duration::from_secs(10), || async {
        quota_used(h, consumer) == served.total_tokens
    })
    .await;
    println!(
        "served {} tokens against Q {q} (one request: {}); usage totals {usage}; statuses {counts:?}",
        served.total_tokens,
        per_request()
    );
    assert!(
        ok,
        "quota counter {} ≠ tokens served {} (a phantom debit or a lost refund)",
        quota_used(h, consumer),
        served.total_tokens
    );
}

async fn three_nodes(q: u64) -> Running {
    Harness::new()
        .redis()
        .backend("m", MockOpts::default(), "")
        .consumer("q", &format!("quota = {q}\nquota_period = \"day\""))
        .store("timeout_ms = 50")
        .gateways(3)
        .start()
        .await
        .unwrap()
}

/// One replica behind a 100 ms link (its store calls time out at 50 ms) while the others are
/// healthy: it may serve only from allowances it obtained from Redis (leases, reserved with the
/// background deadline), never a fresh local share, so the cluster admits no more than the
/// quota; its usage reaches the totals; the quota counter equals what was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_slow_replica_cannot_double_the_quota() {
    const Q: u64 = 300_000;
    // The proxy needs Redis's address before the gateways start.
    let redis = tollgate_tests::RedisServer::start().unwrap();
    let target = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    let proxy = LatencyProxy::start(target, Duration::from_millis(100))
        .await
        .unwrap();
    let h = Harness::new()
        .with_redis(redis)
        .backend("m", MockOpts::default(), "")
        .consumer("q", &format!("quota = {Q}\nquota_period = \"day\""))
        .store("timeout_ms = 50")
        .gateway_env(0, "TOLLGATE_REDIS_URL", &proxy.redis_url())
        .gateways(3)
        .start()
        .await
        .unwrap();
    let counts = load(
        &h,
        &key_for("q"),
        6,
        Instant::now() + Duration::from_secs(40),
    )
    .await;
    assert_exact(&h, "q", Q, &counts).await;
    // The slow replica knew it (its store calls failed, it said so) and still served the busy
    // consumer from leases: slow is not down.
    let m = tollgate_tests::metrics(&h.url(0)).await;
    assert!(m.contains("tollgate_store_degraded_seconds"), "{m}");
    let served_by_slow =
        tollgate_tests::metric_sum(&m, "tollgate_requests_total", &[("status", "200")]);
    assert!(
        served_by_slow > 0,
        "the slow replica served nothing: {counts:?}"
    );
}

/// Redis frozen (SIGSTOP) under load for `pause`: reserves time out on every replica, run
/// when Redis wakes, and are refunded; nothing beyond the quota is served; every token served
/// is in the totals once, and the quota counter equals it.
async fn redis_stall(pause: Duration) {
    // Large enough that the stall falls in the middle of spending it.
    const Q: u64 = 200_000;
    let h = three_nodes(Q).await;
    let until = Instant::now() + Duration::from_secs(40);
    let key = key_for("q");
    let runner = load(&h, &key, 6, until);
    let stall = async {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let redis = h.redis.as_ref().unwrap();
        redis.pause().unwrap();
        tokio::time::sleep(pause).await;
        redis.resume().unwrap();
    };
    let (counts, ()) = tokio::join!(runner, stall);
    assert_exact(&h, "q", Q, &counts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stalled_2s_stays_exact() {
    redis_stall(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stalled_5s_stays_exact() {
    redis_stall(Duration::from_secs(5)).await;
}

/// Redis loses its data while requests flow (an empty restart that no request noticed as a
/// failure): configured keys keep working on every replica (no 401), and the configured
/// consumer is back in Redis within seconds. An operator's `DEL tg:key:<hash>` still revokes
/// the configured key within 2 s, and it stays revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configured_keys_survive_a_store_that_lost_them() {
    let h = Harness::new()
        .redis()
        .backend("m", MockOpts::default(), "")
        .consumer("cfg", "tpm = 100000000")
        .gateways(3)
        .start()
        .await
        .unwrap();
    let redis = h.redis.as_ref().unwrap();
    let until = Instant::now() + Duration::from_secs(4);
    let flush = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        redis.cli(&["FLUSHALL"]).unwrap();
    };
    let key = key_for("cfg");
    let (counts, ()) = tokio::join!(load(&h, &key, 2, until), flush);
    let counts = counts.lock().unwrap().clone();
    assert_eq!(counts.get(&401), None, "configured key refused: {counts:?}");
    assert!(counts.get(&200).copied().unwrap_or(0) > 10, "{counts:?}");
    let back = tollgate_tests::eventually(Duration::from_secs(3), || async {
        redis
            .cli(&["HGET", "tg:consumer:{cfg}", "tpm"])
            .unwrap_or_default()
            == "100000000"
    })
    .await;
    assert!(back, "the configured consumer was not seeded again");

    let hash = tollgate_common::key_hash(&key_for("cfg"));
    redis.cli(&["DEL", &format!("tg:key:{hash}")]).unwrap();
    let started = Instant::now();
    let c = client();
    for node in 0..3 {
        let url = format!("{}/v1/chat/completions", h.url(node));
        let revoked = tollgate_tests::eventually(Duration::from_secs(3), || {
            let (c, url) = (c.clone(), url.clone());
            async move {
                c.post(&url)
                    .bearer_auth(key_for("cfg"))
                    .json(&body())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
                    == 401
            }
        })
        .await;
        assert!(revoked, "node {node} still accepts a revoked key");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Revoked means revoked: the key is not seeded back.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        redis.cli(&["EXISTS", &format!("tg:key:{hash}")]).unwrap(),
        "0"
    );
}

/// Seeding that fails at start (Redis refuses writes: out of memory) is retried until it
/// succeeds: meanwhile `/readyz` says not ready and configured keys get 503 with retry-after
/// (never 401, which SDKs treat as final); once Redis takes writes, both recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeding_is_retried_until_the_store_takes_it() {
    let redis = tollgate_tests::RedisServer::start().unwrap();
    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).unwrap();
    let h = Harness::new()
        .with_redis(redis)
        .backend("m", MockOpts::default(), "")
        .consumer("late", "tpm = 100000")
        .start()
        .await
        .unwrap();
    let c = client();
    let ready = |c: reqwest::Client, url: String| async move {
        let r = c.get(format!("{url}/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (status, v) = ready(c.clone(), h.url(0)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["mode"], "seeding", "{v}");
    let r = h.chat("late", &body()).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));

    h.redis
        .as_ref()
        .unwrap()
        .cli(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    let ok = tollgate_tests::eventually(Duration::from_secs(10), || {
        let (c, url) = (c.clone(), h.url(0));
        async move {
            c.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key_for("late"))
                .json(&body())
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(ok, "the configured key never worked");
    // The seeding loop marks the replica ready once its retry lands (it may trail the first
    // request the refreshed key cache served by a moment).
    let ready_again = tollgate_tests::eventually(Duration::from_secs(5), || {
        let (c, url) = (c.clone(), h.url(0));
        async move { ready(c, url).await.0 == 200 }
    })
    .await;
    assert!(ready_again, "{:?}", ready(c.clone(), h.url(0)).await);
}

/// While Redis is unreachable, a valid key that exists only in Redis (`tollgate keys create`)
/// and that this replica never saw cannot be checked: 503 with retry-after, not 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_during_an_outage_is_503() {
    let mut h = Harness::new()
        .redis()
        .backend("m", MockOpts::default(), "")
        .consumer("cfg", "")
        .start()
        .await
        .unwrap();
    let key = h
        .tollgate(&["keys", "create", "--consumer", "cfg"])
        .unwrap()
        .trim()
        .to_string();
    assert!(key.len() > 16, "{key}");
    h.redis.as_mut().unwrap().stop();
    let r = client()
        .post(format!("{}/v1/chat/completions", h.url(0)))
        .bearer_auth(&key)
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_ne!(e["error"]["code"], "invalid_api_key", "{e}");
    // A made-up key gets the same answer: without the store nobody can tell them apart.
    let r = client()
        .post(format!("{}/v1/chat/completions", h.url(0)))
        .bearer_auth("tg-made-up")
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

/// A replica degraded for longer than `store.max_degraded_ms` logs it at error level and says
/// for how long in `/metrics`; with `store.unready_when_degraded` its `/readyz` turns 503 so a
/// load balancer stops sending it traffic, and back to 200 once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_degradation_is_reported() {
    let mut h = Harness::new()
        .persistent_redis()
        .backend("m", MockOpts::default(), "")
        .consumer("cfg", "")
        .store("max_degraded_ms = 300\nunready_when_degraded = true")
        .start()
        .await
        .unwrap();
    let c = client();
    let url = h.url(0);
    let ready = || async {
        let r = c.get(format!("{url}/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    h.redis.as_mut().unwrap().stop();
    // A request notices the outage.
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key_for("cfg"))
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let unready = tollgate_tests::eventually(Duration::from_secs(5), || async {
        let (s, v) = ready().await;
        s == 503 && v["mode"] == "degraded"
    })
    .await;
    assert!(unready, "{:?}", ready().await);
    let m = tollgate_tests::metrics(&url).await;
    let secs: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("tollgate_store_degraded_seconds ")?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(secs >= 0.3, "{secs}");
    let logged = tollgate_tests::eventually(Duration::from_secs(5), || async {
        h.gateways[0]
            .log_text()
            .contains("longer than store.max_degraded_ms")
    })
    .await;
    assert!(logged, "{}", h.gateways[0].log_text());
    h.redis.as_mut().unwrap().restart().unwrap();
    let back = tollgate_tests::eventually(Duration::from_secs(10), || async {
        // The next request that reaches Redis ends the degradation.
        let _ = c
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key_for("cfg"))
            .json(&body())
            .send()
            .await;
        ready().await.0 == 200
    })
    .await;
    assert!(back, "{:?}", ready().await);
}

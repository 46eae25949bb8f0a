//! The answer cache's conformance suite: one set of checks run against the in-process
//! [`MemoryCache`] and against [`RedisCache`] on a real Valkey with the RediSearch module
//! (started by each test). Passing both proves the Lua scripts and RediSearch make the same
//! decisions as the memory twin: exact entries, the nearest neighbour inside a partition and
//! its cosine distance, per-partition and whole-cache bounds (oldest evicted first), TTL,
//! purge, and the entry count.

use std::sync::Arc;
use std::time::Duration;
use tollgate_quota::SystemClock;
use tollgate_quota::cache::{AnyCache, MemoryCache, NewEntry, RedisCache, cosine_distance};
use tollgate_tests::Valkey;

fn entry<'a>(
    partition: &'a str,
    key: &'a str,
    answer: &'a [u8],
    v: Option<&'a [f32]>,
) -> NewEntry<'a> {
    NewEntry {
        cache: "faq",
        partition,
        key,
        answer,
        vector: v,
        prompt: key,
        ttl_ms: 60_000,
        max_entries: 100,
        max_total_entries: 1000,
    }
}

/// A unit vector at `deg` degrees in the plane of the first two axes (4 dimensions).
fn at(deg: f32) -> Vec<f32> {
    let r = deg.to_radians();
    vec![r.cos(), r.sin(), 0.0, 0.0]
}

/// Exact entries live per partition; a put replaces; other partitions never see them.
async fn check_exact(c: &AnyCache) {
    c.put(&entry("p1", "k1", b"one", None)).await.unwrap();
    assert_eq!(
        c.get("faq", "p1", "k1").await.unwrap(),
        Some(b"one".to_vec())
    );
    assert_eq!(c.get("faq", "p2", "k1").await.unwrap(), None);
    assert_eq!(c.get("other", "p1", "k1").await.unwrap(), None);
    c.put(&entry("p1", "k1", b"uno", None)).await.unwrap();
    assert_eq!(
        c.get("faq", "p1", "k1").await.unwrap(),
        Some(b"uno".to_vec())
    );
    assert_eq!(c.stats("faq").await.unwrap().entries, 1);
}

/// The nearest vector inside the partition, with the cosine distance both agree on; entries
/// without a vector and other partitions are never candidates.
async fn check_nearest(c: &AnyCache) {
    assert_eq!(c.nearest("faq", "p1", &at(0.0), 1).await.unwrap(), vec![]);
    let (v10, v40, v90) = (at(10.0), at(40.0), at(90.0));
    c.put(&entry("p1", "near", b"a-near", Some(&v10)))
        .await
        .unwrap();
    c.put(&entry("p1", "far", b"a-far", Some(&v90)))
        .await
        .unwrap();
    c.put(&entry("p1", "plain", b"a-plain", None))
        .await
        .unwrap();
    c.put(&entry("p2", "closest", b"a-closest", Some(&at(1.0))))
        .await
        .unwrap();
    let n = c.nearest("faq", "p1", &at(0.0), 1).await.unwrap().remove(0);
    assert_eq!(
        (n.key.as_str(), n.answer.as_slice(), n.prompt.as_str()),
        ("near", &b"a-near"[..], "near")
    );
    let want = cosine_distance(&at(0.0), &v10);
    assert!((n.distance - want).abs() < 1e-4, "{} vs {want}", n.distance);
    let n = c.nearest("faq", "p1", &v40, 1).await.unwrap().remove(0);
    assert_eq!(n.key, "near");
    let n = c
        .nearest("faq", "p1", &at(80.0), 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(n.key, "far");
    // k candidates, nearest first, each with its own distance.
    let two = c.nearest("faq", "p1", &at(80.0), 2).await.unwrap();
    assert_eq!((two[0].key.as_str(), two[1].key.as_str()), ("far", "near"));
    assert!((two[1].distance - cosine_distance(&at(80.0), &v10)).abs() < 1e-4);
    assert_eq!(c.nearest("faq", "p3", &at(0.0), 1).await.unwrap(), vec![]);
}

/// `max_entries` keeps the newest of a partition, `max_total_entries` the newest of the cache.
async fn check_bounds(c: &AnyCache) {
    for i in 0..5 {
        let key = format!("k{i}");
        let v = at(i as f32 * 10.0);
        let mut e = entry("small", &key, b"x", Some(&v));
        e.max_entries = 3;
        c.put(&e).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for (k, live) in [
        ("k0", false),
        ("k1", false),
        ("k2", true),
        ("k3", true),
        ("k4", true),
    ] {
        assert_eq!(
            c.get("faq", "small", k).await.unwrap().is_some(),
            live,
            "{k}"
        );
    }
    // The evicted are gone from the vector search too.
    let near = c.nearest("faq", "small", &at(0.0), 5).await.unwrap();
    let keys: Vec<&str> = near.iter().map(|n| n.key.as_str()).collect();
    assert_eq!(keys, ["k2", "k3", "k4"], "nearest first, k at most");
    assert_eq!(c.stats("faq").await.unwrap().entries, 3);
    for (i, p) in ["a", "b", "c"].into_iter().enumerate() {
        let mut e = entry(p, "k", b"y", None);
        e.max_total_entries = 4;
        c.put(&e).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(c.stats("faq").await.unwrap().entries <= 4, "after {i}");
    }
    // Oldest first: two of "small" went, the newest of it stays.
    assert_eq!(c.get("faq", "small", "k2").await.unwrap(), None);
    assert_eq!(c.get("faq", "small", "k3").await.unwrap(), None);
    assert!(c.get("faq", "small", "k4").await.unwrap().is_some());
    for p in ["a", "b", "c"] {
        assert!(c.get("faq", p, "k").await.unwrap().is_some(), "{p}");
    }
}

/// Purge removes one partition or the whole cache, and says how many entries went.
async fn check_purge(c: &AnyCache) {
    for p in ["a", "a", "b"] {
        let key = format!("k{}", c.stats("faq").await.unwrap().entries);
        c.put(&entry(p, &key, b"z", Some(&at(5.0)))).await.unwrap();
    }
    assert_eq!(c.purge("faq", Some("a")).await.unwrap(), 2);
    assert_eq!(c.stats("faq").await.unwrap().entries, 1);
    assert_eq!(c.nearest("faq", "a", &at(5.0), 1).await.unwrap(), vec![]);
    assert!(!c.nearest("faq", "b", &at(5.0), 1).await.unwrap().is_empty());
    assert_eq!(c.purge("faq", None).await.unwrap(), 1);
    assert_eq!(c.stats("faq").await.unwrap().entries, 0);
}

/// Entries expire after their TTL, from the exact layer and the vector search alike.
async fn check_ttl(c: &AnyCache, advance: impl Fn(u64)) {
    let v = at(0.0);
    let mut e = entry("t", "k", b"soon", Some(&v));
    e.ttl_ms = 300;
    c.put(&e).await.unwrap();
    assert!(c.get("faq", "t", "k").await.unwrap().is_some());
    advance(400);
    assert_eq!(c.get("faq", "t", "k").await.unwrap(), None);
    assert_eq!(c.nearest("faq", "t", &v, 1).await.unwrap(), vec![]);
    assert_eq!(c.stats("faq").await.unwrap().entries, 0);
}

/// Many entries stored at once (the Redis writer sends them in batches): every put succeeds,
/// each partition keeps exactly its `max_entries` and the cache its `max_total_entries`,
/// and the entry count says what lives.
async fn check_concurrent(c: &AnyCache) {
    let puts = (0..300).map(|i| {
        let c = c.clone();
        async move {
            let (p, key) = (if i % 3 == 0 { "other" } else { "busy" }, format!("k{i}"));
            let mut e = entry(p, &key, b"a", None);
            e.max_entries = 50;
            e.max_total_entries = 80;
            c.put(&e).await
        }
    });
    for r in futures::future::join_all(puts).await {
        r.unwrap();
    }
    let mut live = [0, 0];
    for i in 0..300 {
        let p = if i % 3 == 0 { "other" } else { "busy" };
        if c.get("faq", p, &format!("k{i}")).await.unwrap().is_some() {
            live[usize::from(p == "busy")] += 1;
        }
    }
    assert!(live[0] <= 50 && live[1] <= 50, "{live:?}");
    assert_eq!(live[0] + live[1], 80, "{live:?}");
    assert_eq!(c.stats("faq").await.unwrap().entries, 80);
    // One key stored many times at once (in one batch, for Redis) is one entry: it takes one
    // place, and only one older entry leaves for it.
    let same = (0..20).map(|_| {
        let c = c.clone();
        async move {
            let mut e = entry("other", "again", b"b", None);
            e.max_entries = 50;
            e.max_total_entries = 80;
            c.put(&e).await
        }
    });
    for r in futures::future::join_all(same).await {
        r.unwrap();
    }
    assert_eq!(
        c.get("faq", "other", "again").await.unwrap(),
        Some(b"b".to_vec())
    );
    assert_eq!(c.stats("faq").await.unwrap().entries, 80);
    let mut still = 0;
    for i in 0..300 {
        let p = if i % 3 == 0 { "other" } else { "busy" };
        still += usize::from(c.get("faq", p, &format!("k{i}")).await.unwrap().is_some());
    }
    assert_eq!(still, 79);
}

async fn memory() -> (AnyCache, Arc<SystemClock>) {
    let clock = Arc::new(SystemClock::default());
    (
        AnyCache::Memory(MemoryCache::with_clock(clock.clone())),
        clock,
    )
}

fn redis(v: &Valkey) -> AnyCache {
    AnyCache::Redis(RedisCache::connect_lazy(&v.url(), Duration::from_secs(2)).unwrap())
}

macro_rules! both {
    ($name:ident, $check:ident) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn memory_cache() {
                $check(&memory().await.0).await;
            }
            #[tokio::test]
            async fn redis_cache() {
                let v = Valkey::start_search().unwrap();
                $check(&redis(&v)).await;
            }
        }
    };
}

both!(exact, check_exact);
both!(nearest, check_nearest);
both!(bounds, check_bounds);
both!(purge, check_purge);
both!(concurrent, check_concurrent);

/// A server that lost its scripts (restart, `SCRIPT FLUSH`) still stores: the writer loads
/// them and sends the refused calls again.
#[tokio::test]
async fn redis_cache_reloads_its_scripts() {
    let v = Valkey::start_search().unwrap();
    let c = redis(&v);
    c.put(&entry("p", "k1", b"one", None)).await.unwrap();
    let mut raw = redis::Client::open(v.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut raw).unwrap();
    c.put(&entry("p", "k2", b"two", None)).await.unwrap();
    assert_eq!(
        c.get("faq", "p", "k2").await.unwrap(),
        Some(b"two".to_vec())
    );
    assert_eq!(c.stats("faq").await.unwrap().entries, 2);
}

/// TTL: the memory cache's clock is moved; Redis waits the 400 ms out.
#[tokio::test]
async fn ttl_memory_cache() {
    let (c, clock) = memory().await;
    check_ttl(&c, |ms| clock.advance_ms(ms as i64)).await;
}

#[tokio::test]
async fn ttl_redis_cache() {
    let v = Valkey::start_search().unwrap();
    check_ttl(&redis(&v), |ms| {
        std::thread::sleep(Duration::from_millis(ms))
    })
    .await;
}

/// Both report vector search; a plain Valkey (no module) does not.
#[tokio::test]
async fn vector_search_is_detected() {
    assert!(memory().await.0.has_vector_search().await.unwrap());
    let v = Valkey::start_search().unwrap();
    assert!(redis(&v).has_vector_search().await.unwrap());
    let plain = Valkey::start().unwrap();
    assert!(!redis(&plain).has_vector_search().await.unwrap());
}

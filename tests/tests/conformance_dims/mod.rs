//! The dimension part of the conformance suite: per-dimension usage rows and their cap, the
//! same on every store (the memory twin, `settle.lua` on Redis, Valkey, Cluster, Sentinel).

use std::collections::BTreeMap;
use tollgate_quota::{
    DimRow, DimUsage, OTHER_DIM_VALUE, Settlement, Store, UsageCounts, UsageDelta, new_batch_id,
};
use tollgate_tests::usage_settlement;

const DAY: u32 = 20260105;

/// A settlement of `consumer`'s request with these dimension values, under `cap`.
pub fn dim_settlement(
    consumer: &str,
    day: u32,
    values: &[(&str, &str)],
    input: u64,
    cap: u32,
) -> Settlement {
    usage_settlement(
        consumer,
        UsageDelta {
            day,
            team: "fin".into(),
            model: "gpt-4o".into(),
            backend: "b".into(),
            counts: UsageCounts {
                input,
                output: 1,
                requests: 1,
                cost_pico: input * 10,
                ..UsageCounts::default()
            },
            dims: Some(DimUsage {
                values: values
                    .iter()
                    .map(|(d, v)| (d.to_string(), v.to_string()))
                    .collect(),
                cap,
                retention_days: 35,
            }),
        },
    )
}

/// Input tokens per (consumer, dimension, value) on `day`.
fn inputs(rows: &[DimRow], day: u32) -> BTreeMap<(String, String, String), u64> {
    let mut m = BTreeMap::new();
    for r in rows.iter().filter(|r| r.day == day) {
        *m.entry((r.consumer.clone(), r.dimension.clone(), r.value.clone()))
            .or_default() += r.counts.input;
    }
    m
}

/// Usage is counted per dimension value; past `cap` distinct values of a dimension (per
/// consumer and day) the rest go to `other`; other dimensions, consumers and days have caps of
/// their own; a retried batch counts once; rows filter by day.
pub async fn check_dimensions<S: Store>(s: &S) {
    let cap = 3;
    let mut batch = Vec::new();
    for (i, user) in ["u1", "u2", "u3", "u4", "u5", "u1"].iter().enumerate() {
        let input = 10 * (i as u64 + 1);
        batch.push(dim_settlement(
            "c1",
            DAY,
            &[("user", user), ("x-app", "web")],
            input,
            cap,
        ));
    }
    let id = new_batch_id();
    s.settle(id, &batch).await.unwrap();
    s.settle(id, &batch).await.unwrap();
    // Another consumer and another day start their own count.
    s.settle(
        new_batch_id(),
        &[
            dim_settlement("c2", DAY, &[("user", "u9")], 7, cap),
            dim_settlement("c1", DAY + 1, &[("user", "u5")], 8, cap),
        ],
    )
    .await
    .unwrap();
    // A value seen before the cap was reached keeps counting as itself.
    s.settle(
        new_batch_id(),
        &[dim_settlement("c1", DAY, &[("user", "u2")], 100, cap)],
    )
    .await
    .unwrap();

    let rows = s.dimension_usage(DAY, DAY + 1).await.unwrap();
    let day1 = inputs(&rows, DAY);
    let key = |c: &str, d: &str, v: &str| (c.to_string(), d.to_string(), v.to_string());
    let want: BTreeMap<_, _> = [
        (key("c1", "user", "u1"), 10 + 60),
        (key("c1", "user", "u2"), 20 + 100),
        (key("c1", "user", "u3"), 30),
        (key("c1", "user", OTHER_DIM_VALUE), 40 + 50),
        (key("c1", "x-app", "web"), 210),
        (key("c2", "user", "u9"), 7),
    ]
    .into_iter()
    .collect();
    assert_eq!(day1, want, "{rows:#?}");
    assert_eq!(
        inputs(&rows, DAY + 1),
        [(key("c1", "user", "u5"), 8)].into_iter().collect()
    );
    let u1 = rows
        .iter()
        .find(|r| r.day == DAY && r.consumer == "c1" && r.value == "u1")
        .unwrap();
    assert_eq!(u1.team, "fin");
    assert_eq!(u1.counts.requests, 2);
    assert_eq!(u1.counts.output, 2);
    assert_eq!(u1.counts.cost_pico, 700);
    assert!(
        s.dimension_usage(DAY + 1, DAY + 1)
            .await
            .unwrap()
            .iter()
            .all(|r| r.day == DAY + 1)
    );
}

/// Replicas settling different new values at once never keep more than `cap` of them: the
/// check and the count move together.
pub async fn check_dimension_cap_concurrency<S: Store + Clone>(s: &S) {
    let cap = 4;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let user = format!("user-{i}");
                let one = dim_settlement("cc", DAY, &[("user", &user)], 1, cap);
                s.settle(new_batch_id(), &[one]).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rows = s.dimension_usage(DAY, DAY).await.unwrap();
    let kept = rows.iter().filter(|r| r.value != OTHER_DIM_VALUE).count();
    let other: u64 = rows
        .iter()
        .filter(|r| r.value == OTHER_DIM_VALUE)
        .map(|r| r.counts.requests)
        .sum();
    assert_eq!(kept, cap as usize, "{rows:#?}");
    assert_eq!(other, 24 - u64::from(cap));
}

/// The per-dimension key carries the dimension retention as its TTL, not the usage one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_dims_expire() {
    use tollgate_quota::{RedisOpts, RedisStore};
    let server = tollgate_tests::redis::RedisServer::start().expect("start redis-server");
    let s = RedisStore::connect(&server.url(), RedisOpts::default())
        .await
        .expect("connect");
    let one = dim_settlement("ttl", DAY, &[("user", "u1")], 1, 10);
    s.settle(new_batch_id(), &[one]).await.unwrap();
    let pttl: i64 = server
        .cli(&["PTTL", &format!("tg:dims:{{ttl}}:{DAY}")])
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        pttl > 34 * 86_400_000 && pttl <= 35 * 86_400_000,
        "dims PTTL {pttl}"
    );
}

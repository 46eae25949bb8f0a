//! The store conformance suite: one set of checks, generic over [`Store`], run against the
//! memory store and against a real `redis-server` started by each test. Passing both proves the
//! Lua scripts and `MemoryStore` make the same decisions, so the local fallback enforces what
//! the cluster enforces.
//!
//! Time: both stores take "now" from their own clock (Redis `TIME`, the memory store's
//! [`SystemClock`]) shifted by an offset, so a check can place now where it needs it — by
//! default at 12:30 UTC (far from any window boundary), or 1.5 s before the next hour to sleep
//! across a boundary. The `redis_only_*` tests at the end cover what only Redis has: scripts
//! lost by the server, TTLs, operators' `HSET`s, reconnection and deadlines.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tollgate_quota::{
    ANY_WINDOW, Admission, BreakerFailure, Budget, BudgetAction, BudgetScope, ConsumerRecord,
    Credentials, Decision, LimitDefaults, MAX_TRIP_MS, MemoryStore, Money, Period, RedisOpts,
    RedisStore, ReservationEnd, ReserveRequest, Settlement, Store, SystemClock, TeamCharge,
    TeamDecision, TeamRecord, TeamReserve, ToolCallRequest, ToolDecision, ToolUsage, Topology,
    UsageCounts, UsageDelta, UsageRow, new_batch_id, new_reservation_id, window_bounds,
};
use tollgate_tests::redis::RedisServer;

mod conformance_dims;
use conformance_dims::{check_dimension_cap_concurrency, check_dimensions};
use tollgate_tests::sentinel::MASTER_NAME;
use tollgate_tests::{Cluster, Flavor, Sentinel, Valkey, usage_settlement};

// ---------------------------------------------------------------------------------------------
// Environments: how each store is made, with its clock shifted by `offset_ms`.

trait Env: Sync {
    type S: Store + Clone;
    fn store(&self, offset_ms: i64) -> impl Future<Output = Self::S> + Send;
}

struct MemEnv;

impl Env for MemEnv {
    type S = MemoryStore;
    async fn store(&self, offset_ms: i64) -> MemoryStore {
        let clock = Arc::new(SystemClock::default());
        clock.advance_ms(offset_ms);
        MemoryStore::with_clock(clock)
    }
}

struct RedisEnv {
    server: RedisServer,
}

impl RedisEnv {
    fn start() -> RedisEnv {
        RedisEnv {
            server: RedisServer::start().expect("start redis-server"),
        }
    }
}

/// Test deadlines are generous: a shared 2-core machine also compiles while tests run.
fn test_opts(offset_ms: i64) -> RedisOpts {
    RedisOpts {
        timeout: Duration::from_secs(2),
        pool_size: 2,
        time_offset_ms: offset_ms,
        ..RedisOpts::default()
    }
}

impl Env for RedisEnv {
    type S = RedisStore;
    async fn store(&self, offset_ms: i64) -> RedisStore {
        RedisStore::connect(&self.server.url(), test_opts(offset_ms))
            .await
            .expect("connect")
    }
}

/// A store over `topology` that confirms its writes on a replica (cluster, sentinels); `what`
/// says what failed when it does not connect.
async fn open_confirmed(topology: &Topology, offset_ms: i64, what: &str) -> RedisStore {
    let opts = RedisOpts {
        confirm_writes: true,
        ..test_opts(offset_ms)
    };
    RedisStore::open(topology, &Credentials::default(), opts)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// A 3-master, 3-replica Redis Cluster (Redis or Valkey), reached through its seed nodes.
struct ClusterEnv {
    cluster: Cluster,
}

impl Env for ClusterEnv {
    type S = RedisStore;
    async fn store(&self, offset_ms: i64) -> RedisStore {
        open_confirmed(
            &Topology::Cluster(self.cluster.urls()),
            offset_ms,
            "connect to the cluster",
        )
        .await
    }
}

/// A master, a replica and three sentinels (Redis or Valkey), reached through the sentinels.
struct SentinelEnv {
    group: Sentinel,
}

impl Env for SentinelEnv {
    type S = RedisStore;
    async fn store(&self, offset_ms: i64) -> RedisStore {
        let topology = Topology::Sentinel {
            sentinels: self.group.sentinel_urls(),
            master_name: MASTER_NAME.into(),
        };
        open_confirmed(&topology, offset_ms, "connect through the sentinels").await
    }
}

/// A standalone Valkey 8.1.
struct ValkeyEnv {
    server: Valkey,
}

impl Env for ValkeyEnv {
    type S = RedisStore;
    async fn store(&self, offset_ms: i64) -> RedisStore {
        RedisStore::connect(&self.server.url(), test_opts(offset_ms))
            .await
            .expect("connect to valkey")
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The offset that puts now at 12:30:00 UTC today: far from hour, day and month boundaries.
fn mid_hour() -> i64 {
    let now = now_ms();
    now - now % 86_400_000 + 45_000_000 - now
}

/// The offset that puts now `ms` before the next full hour.
fn before_hour(ms: i64) -> i64 {
    let now = now_ms();
    now - now % 3_600_000 + 3_600_000 - ms - now
}

/// The offset that puts now at unix second `s`.
fn at(s: u64) -> i64 {
    s as i64 * 1000 - now_ms()
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the checks.

const NO_DEFAULTS: LimitDefaults = LimitDefaults {
    tpm: None,
    quota: None,
    quota_period: Period::Month,
};

fn consumer(id: &str) -> ConsumerRecord {
    ConsumerRecord {
        id: id.into(),
        team: format!("team-{id}"),
        ..ConsumerRecord::default()
    }
}

fn with_tpm(id: &str, tpm: u64) -> ConsumerRecord {
    ConsumerRecord {
        tpm: Some(tpm),
        ..consumer(id)
    }
}

fn with_quota(id: &str, quota: u64, period: Period) -> ConsumerRecord {
    ConsumerRecord {
        quota: Some(quota),
        quota_period: period,
        ..consumer(id)
    }
}

async fn reserve_with<S: Store>(
    s: &S,
    id: &str,
    model: &str,
    tokens: u64,
    defaults: &LimitDefaults,
    require_record: bool,
) -> Decision {
    let req = ReserveRequest {
        consumer: id,
        model,
        tokens,
        defaults,
        require_record,
        id: new_reservation_id(),
        background: false,
        cost_nano: 0,
    };
    s.reserve(&req).await.expect("reserve")
}

async fn reserve<S: Store>(s: &S, id: &str, tokens: u64) -> Decision {
    reserve_with(s, id, "gpt-4o", tokens, &NO_DEFAULTS, true).await
}

#[track_caller]
fn admitted(d: Decision) -> Admission {
    match d {
        Decision::Admitted(a) => a,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

#[track_caller]
fn rate_limited(d: Decision) -> (u64, i64) {
    match d {
        Decision::RateLimited {
            retry_after_ms,
            remaining_tpm,
        } => (retry_after_ms, remaining_tpm),
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[track_caller]
fn quota_exceeded(d: Decision) -> u64 {
    match d {
        Decision::QuotaExceeded { retry_after_ms, .. } => retry_after_ms,
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
}

fn correction(id: &str, a: &Admission, reserved: u64, actual: u64) -> Settlement {
    Settlement {
        consumer: id.into(),
        end: ReservationEnd::None,
        reserved,
        actual,
        window: a.window,
        tpm: a.tpm,
        usage: None,
        money: Default::default(),
    }
}

/// Sleeps until the store-clock (now + `offset_ms`) has passed the next full hour by `ms`.
async fn sleep_past_hour(offset_ms: i64, ms: i64) {
    let now = now_ms() + offset_ms;
    let wait = now - now % 3_600_000 + 3_600_000 + ms - now;
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Decisions before any counting: unknown, disabled, model not allowed — in that order.
async fn check_decisions<S: Store>(s: &S) {
    assert_eq!(reserve(s, "ghost", 10).await, Decision::UnknownConsumer);
    // Without require_record (a JWT caller) the defaults apply and the team is empty.
    let defaults = LimitDefaults {
        tpm: Some(1000),
        quota: None,
        quota_period: Period::Day,
    };
    let a = admitted(reserve_with(s, "ghost", "any", 10, &defaults, false).await);
    assert_eq!(
        (a.team.as_str(), a.tpm, a.remaining_tpm),
        ("", Some(1000), Some(990))
    );

    let off = ConsumerRecord {
        disabled: true,
        models: vec!["other".into()],
        ..consumer("off")
    };
    s.put_consumer(&off).await.unwrap();
    assert_eq!(
        reserve(s, "off", 10).await,
        Decision::Disabled,
        "disabled before model"
    );
    assert_eq!(
        reserve_with(s, "off", "x", 1, &defaults, false).await,
        Decision::Disabled
    );

    let picky = ConsumerRecord {
        models: vec!["a".into(), "b".into()],
        ..with_tpm("picky", 100)
    };
    s.put_consumer(&picky).await.unwrap();
    assert_eq!(
        reserve_with(s, "picky", "c", 1, &NO_DEFAULTS, true).await,
        Decision::ModelNotAllowed
    );
    let a = admitted(reserve_with(s, "picky", "b", 1, &NO_DEFAULTS, true).await);
    assert_eq!((a.team.as_str(), a.tpm), ("team-picky", Some(100)));

    // A stored record without limits takes them from the defaults; empty models = all.
    s.put_consumer(&consumer("plain")).await.unwrap();
    let a = admitted(reserve_with(s, "plain", "whatever", 7, &defaults, true).await);
    assert_eq!(
        (a.team.as_str(), a.tpm, a.remaining_tpm, a.remaining_quota),
        ("team-plain", Some(1000), Some(993), None)
    );
    let (ws, _) = window_bounds(Period::Day, a.window + 1);
    assert_eq!(a.window, ws, "the window is the defaults' period's");
}

/// A full bucket admits a burst up to its capacity, then refuses with retry ≈ deficit·60000/tpm.
async fn check_burst<S: Store>(s: &S) {
    s.put_consumer(&with_tpm("burst", 6000)).await.unwrap();
    for i in 0..6 {
        let a = admitted(reserve(s, "burst", 1000).await);
        let left = a.remaining_tpm.unwrap();
        assert!(
            (5000 - 1000 * i..5000 - 1000 * i + 50).contains(&left),
            "left {left}"
        );
    }
    let (retry, left) = rate_limited(reserve(s, "burst", 1000).await);
    assert!((0..50).contains(&left), "remaining {left}");
    // 100 tokens/s refill: a deficit of ~1000 tokens is ~10 s.
    assert!((9_400..=10_000).contains(&retry), "retry_after_ms {retry}");
    // A refusal debits nothing.
    let (_, again) = rate_limited(reserve(s, "burst", 1000).await);
    assert!(again >= left, "{again} < {left}");
}

/// The bucket refills continuously with real elapsed time (60000 tpm = 1000 tokens/s).
async fn check_refill<S: Store>(s: &S) {
    s.put_consumer(&with_tpm("refill", 60_000)).await.unwrap();
    admitted(reserve(s, "refill", 60_000).await);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, level) = rate_limited(reserve(s, "refill", 5_000).await);
    let elapsed = start.elapsed().as_millis() as i64;
    assert!(
        level >= 290 && level <= elapsed + 20,
        "level {level} after {elapsed} ms"
    );
    let a = admitted(reserve(s, "refill", level as u64).await);
    assert!(a.remaining_tpm.unwrap() < 50, "{a:?}");
}

/// A request larger than the whole bucket passes only when the bucket is full.
async fn check_oversized<S: Store>(s: &S) {
    s.put_consumer(&with_tpm("big", 1000)).await.unwrap();
    let a = admitted(reserve(s, "big", 5000).await);
    assert_eq!(a.remaining_tpm, Some(-4000));
    let (retry, left) = rate_limited(reserve(s, "big", 1).await);
    assert!((-4000..-3990).contains(&left), "{left}");
    // deficit 4001 tokens at 1000/60 s per token: ~240 s.
    assert!((239_000..=240_060).contains(&retry), "{retry}");

    s.put_consumer(&with_tpm("big2", 1000)).await.unwrap();
    admitted(reserve(s, "big2", 10).await);
    let (retry, _) = rate_limited(reserve(s, "big2", 5000).await);
    assert!((1..=600).contains(&retry), "needs a full bucket: {retry}");
}

/// A spent period quota refuses with retry ≈ time to the window end (now is 12:30 UTC).
async fn check_quota<S: Store>(s: &S) {
    s.put_consumer(&with_quota("q", 1000, Period::Hour))
        .await
        .unwrap();
    let a = admitted(reserve(s, "q", 600).await);
    assert_eq!(
        (a.remaining_quota, a.remaining_tpm, a.tpm),
        (Some(400), None, None)
    );
    // Usage admitted during an outage is charged to whatever window the counter holds.
    let outage = Settlement {
        consumer: "q".into(),
        end: ReservationEnd::None,
        reserved: 0,
        actual: 100,
        window: tollgate_quota::ANY_WINDOW,
        tpm: None,
        usage: None,
        money: Default::default(),
    };
    s.settle(new_batch_id(), std::slice::from_ref(&outage))
        .await
        .unwrap();
    let a = admitted(reserve(s, "q", 0).await);
    assert_eq!(a.remaining_quota, Some(300));
    let refund = Settlement {
        reserved: 100,
        actual: 0,
        ..outage
    };
    s.settle(new_batch_id(), &[refund]).await.unwrap();
    let retry = quota_exceeded(reserve(s, "q", 500).await);
    assert!(
        (1_795_000..=1_800_000).contains(&retry),
        "retry_after_ms {retry}"
    );
    let a = admitted(reserve(s, "q", 400).await);
    assert_eq!(a.remaining_quota, Some(0));
    quota_exceeded(reserve(s, "q", 1).await);
    // The quota outranks the bucket: a spent quota refuses even with tokens in the bucket.
    let both = ConsumerRecord {
        tpm: Some(10),
        ..with_quota("qb", 5, Period::Day)
    };
    s.put_consumer(&both).await.unwrap();
    quota_exceeded(reserve(s, "qb", 8).await);
    // And a bucket refusal leaves the quota untouched.
    let both = ConsumerRecord {
        tpm: Some(10),
        ..with_quota("qb2", 100, Period::Day)
    };
    s.put_consumer(&both).await.unwrap();
    assert_eq!(
        admitted(reserve(s, "qb2", 50).await).remaining_quota,
        Some(50)
    );
    rate_limited(reserve(s, "qb2", 1).await);
    s.put_consumer(&with_quota("qb2", 100, Period::Day))
        .await
        .unwrap();
    assert_eq!(
        admitted(reserve(s, "qb2", 50).await).remaining_quota,
        Some(0)
    );
}

/// The next hour resets an hourly quota (now starts 1.5 s before the hour).
async fn check_rollover<S: Store>(s: &S, offset_ms: i64) {
    s.put_consumer(&with_quota("roll", 1000, Period::Hour))
        .await
        .unwrap();
    let first = admitted(reserve(s, "roll", 1000).await);
    let retry = quota_exceeded(reserve(s, "roll", 1).await);
    assert!((1000..=2000).contains(&retry), "retry_after_ms {retry}");
    sleep_past_hour(offset_ms, 300).await;
    let next = admitted(reserve(s, "roll", 1000).await);
    assert_eq!(next.window, first.window + 3600);
    assert_eq!(next.remaining_quota, Some(0));
}

/// Settling below the reservation refunds bucket and quota; above it, both are charged more.
async fn check_settle<S: Store>(s: &S) {
    let rec = ConsumerRecord {
        tpm: Some(6000),
        ..with_quota("down", 10_000, Period::Day)
    };
    s.put_consumer(&rec).await.unwrap();
    let a = admitted(reserve(s, "down", 3000).await);
    s.settle(new_batch_id(), &[correction("down", &a, 3000, 1000)])
        .await
        .unwrap();
    let b = admitted(reserve(s, "down", 1).await);
    let left = b.remaining_tpm.unwrap();
    assert!(
        (4999..5030).contains(&left),
        "refund returned to the bucket: {left}"
    );
    assert_eq!(
        b.remaining_quota,
        Some(8999),
        "refund returned to the quota"
    );
    // A refund never lifts the bucket above capacity.
    s.settle(new_batch_id(), &[correction("down", &b, 100_000, 0)])
        .await
        .unwrap();
    let c = admitted(reserve(s, "down", 6000).await);
    assert_eq!(c.remaining_tpm, Some(0));
    // ... and never pushes the quota below 0.
    assert_eq!(
        c.remaining_quota,
        Some(10_000 - 6000),
        "used clamped at 0, then 6000"
    );

    let rec = ConsumerRecord {
        tpm: Some(6000),
        ..with_quota("up", 100_000, Period::Day)
    };
    s.put_consumer(&rec).await.unwrap();
    let a = admitted(reserve(s, "up", 1000).await);
    s.settle(new_batch_id(), &[correction("up", &a, 1000, 9000)])
        .await
        .unwrap();
    let (retry, left) = rate_limited(reserve(s, "up", 1).await);
    assert!(
        (-3000..-2950).contains(&left),
        "over-use pushed the bucket negative: {left}"
    );
    assert!((29_500..=30_010).contains(&retry), "{retry}");

    s.put_consumer(&with_quota("up2", 10_000, Period::Day))
        .await
        .unwrap();
    let a = admitted(reserve(s, "up2", 1000).await);
    // Two corrections of one consumer in one batch both apply.
    let batch = [
        correction("up2", &a, 1000, 3000),
        correction("up2", &a, 0, 1000),
    ];
    s.settle(new_batch_id(), &batch).await.unwrap();
    assert_eq!(
        admitted(reserve(s, "up2", 1).await).remaining_quota,
        Some(5999)
    );
}

/// A settlement for a window that has since rolled over leaves the new window alone.
async fn check_settle_old_window<S: Store>(s: &S, offset_ms: i64) {
    s.put_consumer(&with_quota("old", 1000, Period::Hour))
        .await
        .unwrap();
    let a = admitted(reserve(s, "old", 600).await);
    sleep_past_hour(offset_ms, 300).await;
    let b = admitted(reserve(s, "old", 100).await);
    assert_eq!(b.window, a.window + 3600);
    s.settle(new_batch_id(), &[correction("old", &a, 600, 0)])
        .await
        .unwrap();
    let c = admitted(reserve(s, "old", 900).await);
    assert_eq!(
        c.remaining_quota,
        Some(0),
        "the refund for the old window was not applied"
    );
    quota_exceeded(reserve(s, "old", 1).await);
}

/// An admin change to a consumer applies to the very next reservation.
async fn check_admin_change<S: Store>(s: &S) {
    s.put_consumer(&with_tpm("adm", 1000)).await.unwrap();
    admitted(reserve(s, "adm", 800).await);
    rate_limited(reserve(s, "adm", 800).await);
    // Raising the limit: capacity grows, the level (~200) carries over.
    s.put_consumer(&with_tpm("adm", 1_000_000)).await.unwrap();
    let a = admitted(reserve(s, "adm", 150).await);
    assert!(
        a.remaining_tpm.unwrap() >= 50 && a.tpm == Some(1_000_000),
        "{a:?}"
    );
    s.put_consumer(&ConsumerRecord {
        disabled: true,
        ..with_tpm("adm", 1000)
    })
    .await
    .unwrap();
    assert_eq!(reserve(s, "adm", 1).await, Decision::Disabled);
    let rec = ConsumerRecord {
        models: vec!["x".into()],
        ..with_tpm("adm", 1_000_000)
    };
    s.put_consumer(&rec).await.unwrap();
    assert_eq!(reserve(s, "adm", 1).await, Decision::ModelNotAllowed);
    s.put_consumer(&with_quota("adm", 10, Period::Day))
        .await
        .unwrap();
    quota_exceeded(reserve(s, "adm", 100).await);
    // put_consumer replaces: the old tpm is gone.
    assert_eq!(admitted(reserve(s, "adm", 10).await).tpm, None);
    assert_eq!(
        s.get_consumer("adm").await.unwrap(),
        Some(with_quota("adm", 10, Period::Day))
    );
}

/// Seeding never overwrites a stored consumer or an existing key mapping.
async fn check_seed<S: Store>(s: &S) {
    let first = with_tpm("seed", 100);
    let k1 = "a".repeat(64);
    let k2 = "b".repeat(64);
    assert!(
        s.seed_consumer(&first, std::slice::from_ref(&k1))
            .await
            .unwrap()
    );
    let second = with_tpm("seed", 999);
    assert!(
        !s.seed_consumer(&second, &[k1.clone(), k2.clone()])
            .await
            .unwrap()
    );
    assert_eq!(s.get_consumer("seed").await.unwrap(), Some(first));
    assert_eq!(
        s.lookup_key(&k2).await.unwrap().as_deref(),
        Some("seed"),
        "new keys are mapped"
    );

    assert!(
        s.seed_consumer(&with_tpm("other", 1), std::slice::from_ref(&k1))
            .await
            .unwrap()
    );
    assert_eq!(
        s.lookup_key(&k1).await.unwrap().as_deref(),
        Some("seed"),
        "not remapped"
    );
    s.put_key(&k1, "other").await.unwrap();
    assert_eq!(
        s.lookup_key(&k1).await.unwrap().as_deref(),
        Some("other"),
        "put_key overwrites"
    );
    assert_eq!(s.lookup_key(&"c".repeat(64)).await.unwrap(), None);
    assert_eq!(s.get_consumer("nobody").await.unwrap(), None);

    let full = ConsumerRecord {
        id: "full".into(),
        team: "t".into(),
        tpm: Some(1),
        quota: Some(2),
        quota_period: Period::Week,
        models: vec!["m1".into(), "m2".into()],
        disabled: true,
        budget: None,
    };
    s.put_consumer(&full).await.unwrap();
    assert_eq!(
        s.get_consumer("full").await.unwrap(),
        Some(full),
        "round trip"
    );
    s.ping().await.unwrap();
}

/// Usage totals add up per day × consumer × team × model × backend; `usage()` filters by day.
async fn check_usage<S: Store>(s: &S) {
    let u = |day, model: &str, input, output| UsageDelta {
        day,
        team: "fin".into(),
        model: model.into(),
        backend: "ptu-1".into(),
        counts: UsageCounts {
            input,
            output,
            cached_input: input / 2,
            requests: 1,
            cost_pico: input * 1_000_000 + output,
            // A cache hit's savings are counted beside the usage, the same in both stores.
            saved_tokens: output,
            saved_cost_pico: output * 3,
        },
        dims: None,
    };
    s.settle(
        new_batch_id(),
        &[
            usage_settlement("u1", u(20260101, "gpt-4o", 100, 10)),
            usage_settlement("u2", u(20260101, "gpt-4o", 1, 1)),
            usage_settlement("u1", u(20260101, "gpt-4o", 200, 20)),
            usage_settlement("u1", u(20260102, "gpt-4o", 5, 5)),
            usage_settlement("u1", u(20260101, "mini", 7, 0)),
        ],
    )
    .await
    .unwrap();
    s.settle(
        new_batch_id(),
        &[usage_settlement("u1", u(20260103, "gpt-4o", 1, 1))],
    )
    .await
    .unwrap();

    let row = |day, consumer: &str, model: &str, input, output, requests, cost_pico| UsageRow {
        day,
        consumer: consumer.into(),
        team: "fin".into(),
        model: model.into(),
        backend: "ptu-1".into(),
        counts: UsageCounts {
            input,
            output,
            cached_input: input / 2,
            requests,
            cost_pico,
            saved_tokens: output,
            saved_cost_pico: output * 3,
        },
    };
    let day1 = vec![
        row(20260101, "u1", "gpt-4o", 300, 30, 2, 300_000_030),
        row(20260101, "u1", "mini", 7, 0, 1, 7_000_000),
        row(20260101, "u2", "gpt-4o", 1, 1, 1, 1_000_001),
    ];
    assert_eq!(s.usage(20260101, 20260101).await.unwrap(), day1);
    let two = s.usage(20260101, 20260102).await.unwrap();
    assert_eq!(two.len(), 4);
    assert_eq!(two[3], row(20260102, "u1", "gpt-4o", 5, 5, 1, 5_000_005));
    assert_eq!(s.usage(20260104, 20261231).await.unwrap(), vec![]);
    let all = s.usage(0, u32::MAX).await.unwrap();
    assert_eq!(all.iter().map(|r| r.counts.requests).sum::<u64>(), 6);
}

/// Quota windows agree with `window_bounds` at the awkward instants: month ends, leap days,
/// year ends, a Monday week start — in both stores.
async fn check_windows<E: Env>(env: &E) {
    let instants = [
        1_835_481_590, // 2028-02-29 23:59:50 (leap day)
        1_835_481_610, // 2028-03-01 00:00:10
        1_798_761_590, // 2026-12-31 23:59:50
        1_798_761_610, // 2027-01-01 00:00:10 (a Friday)
        1_795_391_990, // 2026-11-22 23:59:50 (a Sunday)
        1_795_392_010, // 2026-11-23 00:00:10 (a Monday)
        4_107_542_410, // 2100-03-01 00:00:10 (2100 is not a leap year; a Monday)
    ];
    for t in instants {
        let s = env.store(at(t)).await;
        for period in [Period::Hour, Period::Day, Period::Week, Period::Month] {
            let defaults = LimitDefaults {
                tpm: None,
                quota: Some(100),
                quota_period: period,
            };
            let id = format!("w{t}{}", period.as_str());
            let a = admitted(reserve_with(&s, &id, "m", 100, &defaults, false).await);
            let (start, end) = window_bounds(period, t);
            assert_eq!(a.window, start, "{period:?} at {t}");
            let retry = quota_exceeded(reserve_with(&s, &id, "m", 1, &defaults, false).await);
            let expected = (end - t) * 1000;
            assert!(
                retry <= expected && retry + 3000 >= expected,
                "{period:?} at {t}: {retry}"
            );
        }
    }
}

/// 2000 reservations of random sizes from 50 tasks never admit more than the quota (or the
/// bucket allows), and admit nearly all of it.
async fn check_concurrency<S: Store + Clone>(s: &S) {
    const Q: u64 = 50_000;
    const LARGEST: u64 = 200;
    s.put_consumer(&ConsumerRecord {
        tpm: Some(60_000),
        ..with_quota("conc", Q, Period::Month)
    })
    .await
    .unwrap();
    s.put_consumer(&with_tpm("conc-tpm", 6000)).await.unwrap();
    for (id, limit) in [("conc", Q), ("conc-tpm", 6000)] {
        let start = Instant::now();
        let tasks: Vec<_> = (0..50u64)
            .map(|t| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1).wrapping_mul(0xBF58_476D);
                    let mut admitted = 0;
                    for _ in 0..40 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let n = 1 + rng % LARGEST;
                        if let Decision::Admitted(_) = reserve(&s, id, n).await {
                            admitted += n;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        // The bucket refills while the test runs (100 tokens/s for conc-tpm).
        let refill = if id == "conc-tpm" {
            start.elapsed().as_millis() as u64 / 10 + 1
        } else {
            0
        };
        assert!(
            total <= limit + refill,
            "{id}: admitted {total} > {limit} + {refill}"
        );
        assert!(
            total + LARGEST >= limit,
            "{id}: admitted only {total} of {limit}"
        );
    }
}

/// An MCP tool call of `id` under these limits (key caller: a record is required).
async fn tool_call<S: Store>(
    s: &S,
    id: &str,
    per_min: Option<u64>,
    quota: Option<u64>,
    require_record: bool,
) -> ToolDecision {
    s.tool_call(&ToolCallRequest {
        consumer: id,
        per_min,
        quota,
        quota_period: Period::Month,
        require_record,
    })
    .await
    .expect("tool_call")
}

async fn check_tool_calls<S: Store>(s: &S) {
    // Unknown consumers: refused for key callers, unlimited for JWT callers without limits.
    assert_eq!(
        tool_call(s, "nobody", Some(1), None, true).await,
        ToolDecision::UnknownConsumer
    );
    assert!(matches!(
        tool_call(s, "jwt-only", None, None, false).await,
        ToolDecision::Admitted {
            remaining_per_min: None,
            remaining_quota: None
        }
    ));
    // A rolling minute of 3: three calls, then a refusal until the oldest leaves the minute.
    s.put_consumer(&consumer("tools")).await.unwrap();
    for left in [2, 1, 0] {
        assert_eq!(
            tool_call(s, "tools", Some(3), None, true).await,
            ToolDecision::Admitted {
                remaining_per_min: Some(left),
                remaining_quota: None
            }
        );
    }
    match tool_call(s, "tools", Some(3), None, true).await {
        ToolDecision::RateLimited {
            retry_after_ms,
            limit,
        } => {
            assert_eq!(limit, 3);
            assert!(
                retry_after_ms > 55_000 && retry_after_ms <= 60_000,
                "{retry_after_ms}"
            );
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    // A limit of 0 refuses every call for a minute.
    assert_eq!(
        tool_call(s, "tools", Some(0), None, true).await,
        ToolDecision::RateLimited {
            retry_after_ms: 60_000,
            limit: 0
        }
    );
    // A raised limit applies at once; the refused calls were not counted.
    assert_eq!(
        tool_call(s, "tools", Some(5), None, true).await,
        ToolDecision::Admitted {
            remaining_per_min: Some(1),
            remaining_quota: None
        }
    );
    // A period quota of 2 in the record's hourly window.
    s.put_consumer(&with_quota("tq", 1_000_000, Period::Hour))
        .await
        .unwrap();
    for left in [1, 0] {
        assert_eq!(
            tool_call(s, "tq", None, Some(2), true).await,
            ToolDecision::Admitted {
                remaining_per_min: None,
                remaining_quota: Some(left)
            }
        );
    }
    match tool_call(s, "tq", Some(100), Some(2), true).await {
        ToolDecision::QuotaExceeded {
            retry_after_ms,
            limit,
        } => {
            assert_eq!(limit, 2);
            // mid_hour(): the hourly window ends 30 minutes from now.
            assert!(
                retry_after_ms > 1_700_000 && retry_after_ms <= 1_800_000,
                "{retry_after_ms}"
            );
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    // Disabled consumers are refused.
    s.put_consumer(&ConsumerRecord {
        disabled: true,
        ..consumer("off")
    })
    .await
    .unwrap();
    assert_eq!(
        tool_call(s, "off", None, None, true).await,
        ToolDecision::Disabled
    );
    // Tool-call totals add up per day, consumer, team, server and tool.
    let row = |day, tool: &str, calls, errors| ToolUsage {
        day,
        consumer: "tools".into(),
        team: "ops".into(),
        server: "tickets".into(),
        tool: tool.into(),
        calls,
        errors,
    };
    s.add_tool_usage(&[row(20260101, "search", 1, 0), row(20260101, "create", 1, 1)])
        .await
        .unwrap();
    s.add_tool_usage(&[row(20260101, "search", 2, 1), row(20260102, "search", 1, 0)])
        .await
        .unwrap();
    let got = s.tool_usage(20260101, 20260101).await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    let search = got.iter().find(|r| r.tool == "search").unwrap();
    assert_eq!((search.calls, search.errors), (3, 1));
    assert_eq!(s.tool_usage(20260101, 20260102).await.unwrap().len(), 3);
}

async fn check_tool_concurrency<S: Store + Clone>(s: &S) {
    s.put_consumer(&consumer("tc")).await.unwrap();
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                matches!(
                    tool_call(&s, "tc", Some(17), Some(1000), true).await,
                    ToolDecision::Admitted { .. }
                )
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += u32::from(t.await.unwrap());
    }
    assert_eq!(admitted, 17, "exactly the rolling-minute limit");
}

// ---------------------------------------------------------------------------------------------
// Instantiation: each check once per store.

async fn check_settle_once<S: Store>(s: &S) {
    let usage = UsageDelta {
        day: 20261126,
        team: "t".into(),
        model: "m".into(),
        backend: "b".into(),
        counts: UsageCounts {
            input: 10,
            output: 5,
            cached_input: 0,
            requests: 1,
            cost_pico: 7,
            ..UsageCounts::default()
        },
        dims: None,
    };
    let batch = vec![usage_settlement("once", usage)];
    let id = new_batch_id();
    s.settle(id, &batch).await.unwrap();
    s.settle(id, &batch).await.unwrap();
    s.settle(new_batch_id(), &batch).await.unwrap();
    let rows = s.usage(20261126, 20261126).await.unwrap();
    let row = rows.iter().find(|r| r.consumer == "once").unwrap();
    assert_eq!(
        (row.counts.requests, row.counts.input, row.counts.cost_pico),
        (2, 20, 14),
        "{rows:?}"
    );
}

async fn reserve_id<S: Store>(s: &S, consumer: &str, tokens: u64, id: u64) -> Decision {
    let req = ReserveRequest {
        consumer,
        model: "gpt-4o",
        tokens,
        defaults: &NO_DEFAULTS,
        require_record: true,
        id,
        background: false,
        cost_nano: 0,
    };
    s.reserve(&req).await.expect("reserve")
}

fn ended(
    consumer: &str,
    a: &Admission,
    end: ReservationEnd,
    reserved: u64,
    actual: u64,
) -> Settlement {
    Settlement {
        end,
        ..correction(consumer, a, reserved, actual)
    }
}

fn abandon(consumer: &str, id: u64) -> Settlement {
    Settlement {
        consumer: consumer.into(),
        end: ReservationEnd::Abandoned { id },
        reserved: 0,
        actual: 0,
        window: 0,
        tpm: None,
        usage: None,
        money: Default::default(),
    }
}

/// The quota left, read with a reservation of 0 tokens.
async fn quota_left<S: Store>(s: &S) -> i64 {
    admitted(reserve(s, "rid", 0).await)
        .remaining_quota
        .unwrap()
}

/// Reservation ids: a reserve sent twice debits once; an abandoned one is refunded if it ran,
/// never debits if it runs later, and is refunded once however often it is abandoned; a
/// retried one leaves a tombstone at settle.
async fn check_reservation_ids<S: Store>(s: &S) {
    let rec = ConsumerRecord {
        tpm: Some(100_000),
        ..with_quota("rid", 10_000, Period::Day)
    };
    s.put_consumer(&rec).await.unwrap();

    // Twice with one id: one debit.
    let x = new_reservation_id();
    let a = admitted(reserve_id(s, "rid", 100, x).await);
    assert_eq!(a.remaining_quota, Some(9_900));
    let again = admitted(reserve_id(s, "rid", 100, x).await);
    assert_eq!(again.window, a.window, "a replay answers the same window");
    assert_eq!(quota_left(s).await, 9_900, "the replay debited nothing");

    // Settled after a retry: a late copy finds a tombstone and debits nothing.
    let end = ReservationEnd::Settled {
        id: x,
        retried: true,
    };
    s.settle(new_batch_id(), &[ended("rid", &a, end, 100, 60)])
        .await
        .unwrap();
    assert_eq!(quota_left(s).await, 9_940);
    assert_eq!(reserve_id(s, "rid", 100, x).await, Decision::Cancelled);
    assert_eq!(quota_left(s).await, 9_940);

    // Abandoned after it ran: refunded (quota and bucket), then cancelled for good.
    let y = new_reservation_id();
    let b = admitted(reserve_id(s, "rid", 500, y).await);
    assert_eq!(b.remaining_quota, Some(9_440));
    let tpm_before = b.remaining_tpm.unwrap();
    s.settle(new_batch_id(), &[abandon("rid", y)])
        .await
        .unwrap();
    let c = admitted(reserve(s, "rid", 0).await);
    assert_eq!(c.remaining_quota, Some(9_940), "refunded");
    assert!(
        c.remaining_tpm.unwrap() >= tpm_before + 500,
        "bucket refunded too"
    );
    // Abandoned again (a retried batch with another id): no second refund.
    s.settle(new_batch_id(), &[abandon("rid", y)])
        .await
        .unwrap();
    assert_eq!(quota_left(s).await, 9_940);
    assert_eq!(reserve_id(s, "rid", 500, y).await, Decision::Cancelled);
    assert_eq!(quota_left(s).await, 9_940);

    // Abandoned before it ran (the reserve reaches the store late): it never debits.
    let z = new_reservation_id();
    s.settle(new_batch_id(), &[abandon("rid", z)])
        .await
        .unwrap();
    assert_eq!(reserve_id(s, "rid", 700, z).await, Decision::Cancelled);
    assert_eq!(quota_left(s).await, 9_940);

    // Settled without a retry: the record goes, and the next id is a fresh reservation.
    let w = new_reservation_id();
    let d = admitted(reserve_id(s, "rid", 40, w).await);
    let end = ReservationEnd::Settled {
        id: w,
        retried: false,
    };
    s.settle(new_batch_id(), &[ended("rid", &d, end, 40, 40)])
        .await
        .unwrap();
    assert_eq!(quota_left(s).await, 9_900);
    // Settled again (a lease return retried under a new batch id): corrected once.
    s.settle(new_batch_id(), &[ended("rid", &d, end, 40, 0)])
        .await
        .unwrap();
    assert_eq!(
        quota_left(s).await,
        9_900,
        "a second settlement corrected again"
    );
    // A quota refusal says what is left.
    match reserve(s, "rid", 9_901).await {
        Decision::QuotaExceeded {
            remaining_quota, ..
        } => assert_eq!(remaining_quota, 9_900),
        other => panic!("{other:?}"),
    }
}

/// The seed marker names the keys seeded from configuration; the seeded mark is set once.
async fn check_seed_marker<S: Store>(s: &S) {
    assert!(!s.is_seeded().await.unwrap());
    let keys = vec!["a".repeat(64), "b".repeat(64)];
    s.seed_consumer(&consumer("marked"), &keys).await.unwrap();
    assert!(s.key_was_seeded("marked", &keys[0]).await.unwrap());
    assert!(s.key_was_seeded("marked", &keys[1]).await.unwrap());
    assert!(!s.key_was_seeded("marked", &"c".repeat(64)).await.unwrap());
    assert!(!s.key_was_seeded("other", &keys[0]).await.unwrap());
    s.mark_seeded().await.unwrap();
    assert!(s.is_seeded().await.unwrap());
}

fn failure(trip_for_ms: Option<u64>, probe: bool) -> BreakerFailure {
    BreakerFailure {
        failures: 3,
        window_ms: 2_000,
        trip_ms: 400,
        trip_for_ms,
        probe,
    }
}

async fn check_breaker<S: Store>(s: &S) {
    let mut events = s.breaker_events();
    // Give a pub/sub listener time to subscribe before anything is published.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = "ptu-1";
    for _ in 0..2 {
        let st = s.breaker_failure(b, &failure(None, false)).await.unwrap();
        assert_eq!(
            (st.open_until_ms, st.trip),
            (0, 0),
            "two failures of three keep it closed"
        );
    }
    let st = s.breaker_failure(b, &failure(None, false)).await.unwrap();
    assert_eq!(st.trip, 1);
    assert!((350..=400).contains(&st.open_for_ms()), "{st:?}");
    let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ev.backend.as_str(), ev.trip), (b, 1));
    assert!(ev.open_for_ms() > 300, "{ev:?}");
    assert!(
        !s.breaker_probe(b, 5_000).await.unwrap(),
        "no probe while open"
    );

    tokio::time::sleep(Duration::from_millis(450)).await;
    let st = &s
        .breaker_states(&[b.to_string(), "other".into()])
        .await
        .unwrap();
    assert!(st[0].half_open(), "{st:?}");
    assert_eq!((st[1].open_until_ms, st[1].trip), (0, 0));
    assert!(
        s.breaker_probe(b, 5_000).await.unwrap(),
        "the first asker probes"
    );
    assert!(
        !s.breaker_probe(b, 5_000).await.unwrap(),
        "one probe per trip"
    );

    // The probe failed: re-open at once, a new trip.
    let st = s.breaker_failure(b, &failure(None, true)).await.unwrap();
    assert_eq!(st.trip, 2);
    assert!(st.open_for_ms() > 300);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(
        s.breaker_probe(b, 5_000).await.unwrap(),
        "a new trip has its own probe"
    );
    assert!(s.breaker_close(b).await.unwrap());
    assert!(
        !s.breaker_close(b).await.unwrap(),
        "closing a closed circuit changes nothing"
    );
    let st = &s.breaker_states(&[b.to_string()]).await.unwrap()[0];
    assert_eq!((st.open_until_ms, st.trip), (0, 2));
    // The events arrive in order: open(1), open(2), closed.
    let mut seen = Vec::new();
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
        seen.push((ev.trip, ev.open_until_ms == 0));
    }
    assert_eq!(seen, vec![(2, false), (2, true)]);

    // A retry-after trips at once, for exactly that long.
    let st = s
        .breaker_failure("payg", &failure(Some(1_500), false))
        .await
        .unwrap();
    assert!((1_450..=1_500).contains(&st.open_for_ms()), "{st:?}");
    // A shorter retry-after never shortens an open circuit.
    let st = s
        .breaker_failure("payg", &failure(Some(10), false))
        .await
        .unwrap();
    assert!(st.open_for_ms() > 1_000);
    // The lease lapses if a probe is never resolved (its replica died).
    let st = s
        .breaker_failure("lapse", &failure(Some(50), false))
        .await
        .unwrap();
    assert_eq!(st.trip, 1);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(s.breaker_probe("lapse", 100).await.unwrap());
    assert!(!s.breaker_probe("lapse", 100).await.unwrap());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        s.breaker_probe("lapse", 100).await.unwrap(),
        "lapsed lease granted again"
    );
}

/// Absurd durations (a `retry-after` of u64::MAX ms, a trip or window of u64::MAX) are cut to
/// `MAX_TRIP_MS`: the circuit holds an integer time one day ahead at most, and every read of
/// the states still works.
async fn check_breaker_bounds<S: Store>(s: &S) {
    let st = s
        .breaker_failure("absurd", &failure(Some(u64::MAX), false))
        .await
        .unwrap();
    assert_eq!((st.open_for_ms(), st.trip), (MAX_TRIP_MS, 1), "{st:?}");
    let huge = BreakerFailure {
        failures: 1,
        window_ms: u64::MAX,
        trip_ms: u64::MAX,
        trip_for_ms: None,
        probe: false,
    };
    let st = s.breaker_failure("huge-trip", &huge).await.unwrap();
    assert_eq!((st.open_for_ms(), st.trip), (MAX_TRIP_MS, 1), "{st:?}");
    let window_only = BreakerFailure {
        failures: 3,
        ..huge.clone()
    };
    let st = s
        .breaker_failure("huge-window", &window_only)
        .await
        .unwrap();
    assert_eq!((st.open_until_ms, st.trip), (0, 0), "one failure of three");
    let names = ["absurd", "huge-trip", "huge-window"].map(String::from);
    let states = s.breaker_states(&names).await.unwrap();
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(states[0].open_for_ms() <= MAX_TRIP_MS && states[0].open_for_ms() > 0);
    assert_eq!(states[2].open_until_ms, 0);
}

/// Heartbeats count the live replicas; a silent replica drops out after its ttl.
#[tokio::test]
async fn redis_only_heartbeat_counts_replicas() {
    let env = RedisEnv::start();
    let s = env.store(0).await;
    assert_eq!(s.heartbeat("a", 300).await.unwrap(), 1);
    assert_eq!(s.heartbeat("b", 300).await.unwrap(), 2);
    assert_eq!(s.heartbeat("a", 300).await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(s.heartbeat("a", 300).await.unwrap(), 1, "b went silent");
    assert_eq!(MemoryStore::new().heartbeat("x", 300).await.unwrap(), 1);
}

// ---------------------------------------------------------------------------------------------
// Budgets in money (issue 18): the consumer's budget in reserve.lua / settle.lua, the team step
// in team_reserve.lua / team_settle.lua, alert claims.

const UNIT: u64 = 1_000_000_000;

fn with_budget(id: &str, units: u64, action: BudgetAction) -> ConsumerRecord {
    ConsumerRecord {
        budget: Some(Budget {
            limit_nano: units * UNIT,
            period: Period::Day,
            action,
        }),
        ..consumer(id)
    }
}

async fn reserve_cost<S: Store>(
    s: &S,
    id: &str,
    tokens: u64,
    cost_nano: u64,
    rid: u64,
) -> Decision {
    let req = ReserveRequest {
        consumer: id,
        model: "gpt-4o",
        tokens,
        defaults: &NO_DEFAULTS,
        require_record: true,
        id: rid,
        background: false,
        cost_nano,
    };
    s.reserve(&req).await.expect("reserve")
}

fn money_settlement(id: &str, rid: u64, reserved: u64, actual: u64, a: &Admission) -> Settlement {
    Settlement {
        consumer: id.into(),
        end: ReservationEnd::Settled {
            id: rid,
            retried: false,
        },
        reserved: 10,
        actual: 10,
        window: a.window,
        tpm: a.tpm,
        usage: None,
        money: Money {
            reserved,
            actual,
            window: a.budget.map_or(0, |b| b.window),
            team: None,
        },
    }
}

/// A consumer's budget: debited with the reservation, refused (403-worthy) when the estimate
/// does not fit, settled to the actual cost, refunded when abandoned; "alert" never refuses.
async fn check_consumer_budget<S: Store>(s: &S) {
    s.put_consumer(&with_budget("bud", 10, BudgetAction::Block))
        .await
        .unwrap();
    assert_eq!(
        s.get_consumer("bud")
            .await
            .unwrap()
            .unwrap()
            .budget
            .unwrap()
            .limit_nano,
        10 * UNIT,
        "the budget round-trips through the record"
    );
    let r1 = new_reservation_id();
    let a = admitted(reserve_cost(s, "bud", 10, 6 * UNIT, r1).await);
    let b = a.budget.expect("a budget use");
    assert_eq!((b.limit_nano, b.spent_nano), (10 * UNIT, 6 * UNIT as i64));
    let (start, end) = window_bounds(Period::Day, b.window);
    assert_eq!((b.window, b.window_end), (start, end));
    // 6 + 5 > 10: refused, nothing debited.
    match reserve_cost(s, "bud", 10, 5 * UNIT, new_reservation_id()).await {
        Decision::BudgetExceeded(r) => {
            assert_eq!(
                (r.remaining_nano, r.limit_nano),
                (4 * UNIT as i64, 10 * UNIT)
            );
            assert!(r.retry_after_ms > 0 && r.retry_after_ms <= 86_400_000);
        }
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }
    // Settled to the actual cost (2 of the 6 reserved): 8 left.
    s.settle(
        new_batch_id(),
        &[money_settlement("bud", r1, 6 * UNIT, 2 * UNIT, &a)],
    )
    .await
    .unwrap();
    assert_eq!(
        s.spend(BudgetScope::Consumer, "bud").await.unwrap(),
        Some((b.window, 2 * UNIT as i64))
    );
    let r2 = new_reservation_id();
    let c = admitted(reserve_cost(s, "bud", 10, 8 * UNIT, r2).await);
    assert_eq!(c.budget.unwrap().remaining_nano(), 0, "exactly the budget");
    // Abandoned: the record's cost comes back.
    s.settle(new_batch_id(), &[abandon("bud", r2)])
        .await
        .unwrap();
    assert_eq!(
        s.spend(BudgetScope::Consumer, "bud").await.unwrap(),
        Some((b.window, 2 * UNIT as i64))
    );
    // Settling a settled reservation again changes nothing.
    s.settle(
        new_batch_id(),
        &[money_settlement("bud", r1, 6 * UNIT, 0, &a)],
    )
    .await
    .unwrap();
    assert_eq!(
        s.spend(BudgetScope::Consumer, "bud")
            .await
            .unwrap()
            .unwrap()
            .1,
        2 * UNIT as i64
    );

    // "alert": spends past the budget, never refuses.
    s.put_consumer(&with_budget("loud", 1, BudgetAction::Alert))
        .await
        .unwrap();
    for _ in 0..3 {
        admitted(reserve_cost(s, "loud", 1, UNIT, new_reservation_id()).await);
    }
    let d = admitted(reserve_cost(s, "loud", 1, UNIT, new_reservation_id()).await);
    assert_eq!(d.budget.unwrap().spent_nano, 4 * UNIT as i64);
    assert_eq!(d.budget.unwrap().action, BudgetAction::Alert);
    // No budget: nothing counted.
    s.put_consumer(&consumer("free")).await.unwrap();
    let e = admitted(reserve_cost(s, "free", 1, UNIT, new_reservation_id()).await);
    assert_eq!(e.budget, None);
    assert_eq!(s.spend(BudgetScope::Consumer, "free").await.unwrap(), None);
}

fn team_settlement(
    team: &str,
    end: ReservationEnd,
    reserved: u64,
    actual: u64,
    window: u64,
) -> Settlement {
    Settlement {
        consumer: "member".into(),
        end: ReservationEnd::None,
        reserved: 0,
        actual: 0,
        window: 0,
        tpm: None,
        usage: None,
        money: Money {
            reserved,
            actual,
            window: 0,
            team: Some(TeamCharge {
                team: team.into(),
                end,
                window,
                reserved,
            }),
        },
    }
}

async fn reserve_team<S: Store>(s: &S, team: &str, cost_nano: u64, id: u64) -> TeamDecision {
    let req = TeamReserve {
        team,
        cost_nano,
        id,
        background: false,
    };
    s.reserve_team(&req).await.expect("reserve_team")
}

/// The team step: no budget → NoBudget; a budget is debited atomically, refuses what does not
/// fit, settles to the actual cost, is refunded once when abandoned (compensation), and a
/// reservation id debits once.
async fn check_team_budget<S: Store>(s: &S) {
    assert_eq!(
        reserve_team(s, "none", UNIT, new_reservation_id()).await,
        TeamDecision::NoBudget
    );
    let team = TeamRecord {
        id: "fin".into(),
        budget: Some(Budget {
            limit_nano: 10 * UNIT,
            period: Period::Month,
            action: BudgetAction::Block,
        }),
    };
    assert!(s.seed_team(&team).await.unwrap());
    assert!(
        !s.seed_team(&TeamRecord {
            budget: None,
            ..team.clone()
        })
        .await
        .unwrap()
    );
    assert_eq!(s.get_team("fin").await.unwrap(), Some(team.clone()));

    let r1 = new_reservation_id();
    let TeamDecision::Admitted(u) = reserve_team(s, "fin", 7 * UNIT, r1).await else {
        panic!("admitted")
    };
    assert_eq!(u.spent_nano, 7 * UNIT as i64);
    assert_eq!(
        window_bounds(Period::Month, u.window),
        (u.window, u.window_end)
    );
    // The same id again: no second debit.
    let TeamDecision::Admitted(again) = reserve_team(s, "fin", 7 * UNIT, r1).await else {
        panic!("replayed")
    };
    assert_eq!(again.spent_nano, 7 * UNIT as i64);
    match reserve_team(s, "fin", 4 * UNIT, new_reservation_id()).await {
        TeamDecision::Exceeded(r) => assert_eq!(r.remaining_nano, 3 * UNIT as i64),
        other => panic!("expected Exceeded, got {other:?}"),
    }
    // Settled at 5 of 7.
    let settle = team_settlement(
        "fin",
        ReservationEnd::Settled {
            id: r1,
            retried: false,
        },
        7 * UNIT,
        5 * UNIT,
        u.window,
    );
    s.settle(new_batch_id(), std::slice::from_ref(&settle))
        .await
        .unwrap();
    s.settle(new_batch_id(), &[settle]).await.unwrap();
    assert_eq!(
        s.spend(BudgetScope::Team, "fin").await.unwrap(),
        Some((u.window, 5 * UNIT as i64)),
        "corrected once"
    );
    // Compensation: a team step whose consumer was refused is refunded, once.
    let r2 = new_reservation_id();
    assert!(matches!(
        reserve_team(s, "fin", 5 * UNIT, r2).await,
        TeamDecision::Admitted(_)
    ));
    let refund = team_settlement("fin", ReservationEnd::Abandoned { id: r2 }, 0, 0, 0);
    s.settle(new_batch_id(), std::slice::from_ref(&refund))
        .await
        .unwrap();
    s.settle(new_batch_id(), &[refund]).await.unwrap();
    assert_eq!(
        s.spend(BudgetScope::Team, "fin").await.unwrap().unwrap().1,
        5 * UNIT as i64
    );
    assert_eq!(
        reserve_team(s, "fin", UNIT, r2).await,
        TeamDecision::Cancelled,
        "a late copy debits nothing"
    );
    // An abandon that arrives before its reserve: the reserve debits nothing.
    let r3 = new_reservation_id();
    s.settle(
        new_batch_id(),
        &[team_settlement(
            "fin",
            ReservationEnd::Abandoned { id: r3 },
            0,
            0,
            0,
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        reserve_team(s, "fin", UNIT, r3).await,
        TeamDecision::Cancelled
    );
    // Usage admitted without the store is charged to whatever window the counter holds.
    s.settle(
        new_batch_id(),
        &[team_settlement(
            "fin",
            ReservationEnd::None,
            0,
            UNIT,
            ANY_WINDOW,
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        s.spend(BudgetScope::Team, "fin").await.unwrap().unwrap().1,
        6 * UNIT as i64
    );
    // An operator's change applies to the next step.
    s.put_team(&TeamRecord {
        budget: Some(Budget {
            limit_nano: 100 * UNIT,
            period: Period::Month,
            action: BudgetAction::Alert,
        }),
        ..team.clone()
    })
    .await
    .unwrap();
    let TeamDecision::Admitted(big) =
        reserve_team(s, "fin", 200 * UNIT, new_reservation_id()).await
    else {
        panic!("alert mode never refuses")
    };
    assert_eq!(
        (big.limit_nano, big.action),
        (100 * UNIT, BudgetAction::Alert)
    );
    s.put_team(&TeamRecord {
        id: "fin".into(),
        budget: None,
    })
    .await
    .unwrap();
    assert_eq!(
        reserve_team(s, "fin", UNIT, new_reservation_id()).await,
        TeamDecision::NoBudget
    );
}

/// Alert claims: one caller wins until the claim expires or is released.
async fn check_alert_claims<S: Store>(s: &S) {
    assert!(
        s.claim_alert("t:budget:team:fin:0.5:1", 60_000)
            .await
            .unwrap()
    );
    assert!(
        !s.claim_alert("t:budget:team:fin:0.5:1", 60_000)
            .await
            .unwrap()
    );
    assert!(
        s.claim_alert("t:budget:team:fin:0.8:1", 60_000)
            .await
            .unwrap()
    );
    s.release_alert("t:budget:team:fin:0.5:1").await.unwrap();
    assert!(s.claim_alert("t:budget:team:fin:0.5:1", 200).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.claim_alert("t:budget:team:fin:0.5:1", 200).await.unwrap(),
        "expired"
    );
}

/// Concurrent team steps from many callers never pass the budget: exactly floor(budget/cost)
/// are admitted.
async fn check_team_concurrency<S: Store + Clone>(s: &S) {
    s.put_team(&TeamRecord {
        id: "race".into(),
        budget: Some(Budget {
            limit_nano: 25 * UNIT,
            period: Period::Day,
            action: BudgetAction::Block,
        }),
    })
    .await
    .unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { reserve_team(&s, "race", UNIT, new_reservation_id()).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), TeamDecision::Admitted(_)) {
            ok += 1;
        }
    }
    assert_eq!(ok, 25);
    assert_eq!(
        s.spend(BudgetScope::Team, "race").await.unwrap().unwrap().1,
        25 * UNIT as i64
    );
}

/// An operator's budget fields in Redis: `budget` in currency units, a bad value is an error
/// naming the field, never a lifted budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_budget_fields() {
    let env = RedisEnv::start();
    let s = env.store(mid_hour()).await;
    s.put_consumer(&consumer("ops")).await.unwrap();
    let mut conn = redis::Client::open(env.server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("tg:consumer:{ops}")
        .arg("budget")
        .arg("0.5")
        .arg("budget_period")
        .arg("week")
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = admitted(reserve_cost(&s, "ops", 1, UNIT / 4, new_reservation_id()).await);
    assert_eq!(a.budget.unwrap().limit_nano, UNIT / 2);
    assert_eq!(a.budget.unwrap().period, Period::Week);
    assert!(matches!(
        reserve_cost(&s, "ops", 1, UNIT / 2, new_reservation_id()).await,
        Decision::BudgetExceeded(_)
    ));
    let _: () = redis::cmd("HSET")
        .arg("tg:consumer:{ops}")
        .arg("budget")
        .arg("lots")
        .query_async(&mut conn)
        .await
        .unwrap();
    let req = ReserveRequest {
        consumer: "ops",
        model: "gpt-4o",
        tokens: 1,
        defaults: &NO_DEFAULTS,
        require_record: true,
        id: new_reservation_id(),
        background: false,
        cost_nano: 1,
    };
    let err = s.reserve(&req).await.unwrap_err().to_string();
    assert!(err.contains("budget"), "{err}");
    let _: () = redis::cmd("HSET")
        .arg("tg:team:{ops-team}")
        .arg("budget")
        .arg("2")
        .arg("budget_action")
        .arg("bogus")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = s
        .reserve_team(&TeamReserve {
            team: "ops-team",
            cost_nano: 1,
            id: 1,
            background: false,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("budget_action"), "{err}");
}

macro_rules! suite {
    ($( $(#[$doc:meta])* $check:ident($offset:expr) => $mem:ident, $redis:ident; )*) => {$(
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $mem() {
            let offset = $offset;
            $check(&MemEnv.store(offset).await).await;
        }
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let env = RedisEnv::start();
            let offset = $offset;
            $check(&env.store(offset).await).await;
        }
    )*};
}

macro_rules! suite_timed {
    ($( $(#[$doc:meta])* $check:ident($offset:expr) => $mem:ident, $redis:ident; )*) => {$(
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $mem() {
            let offset = $offset;
            $check(&MemEnv.store(offset).await, offset).await;
        }
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let env = RedisEnv::start();
            let offset = $offset;
            $check(&env.store(offset).await, offset).await;
        }
    )*};
}

suite! {
    /// Unknown, disabled and model-not-allowed decisions, in order.
    check_decisions(mid_hour()) => memory_decisions, redis_decisions;
    /// Burst to capacity, then RateLimited with retry ≈ deficit·60000/tpm.
    check_burst(mid_hour()) => memory_burst, redis_burst;
    /// Continuous refill over real elapsed time.
    check_refill(mid_hour()) => memory_refill, redis_refill;
    /// A request larger than tpm passes only on a full bucket.
    check_oversized(mid_hour()) => memory_oversized, redis_oversized;
    /// A spent quota refuses until the window ends.
    check_quota(mid_hour()) => memory_quota, redis_quota;
    /// Settle refunds and over-use move bucket and quota.
    check_settle(mid_hour()) => memory_settle, redis_settle;
    /// Admin changes apply to the next reservation.
    check_admin_change(mid_hour()) => memory_admin_change, redis_admin_change;
    /// Seeding never overwrites.
    check_seed(mid_hour()) => memory_seed, redis_seed;
    /// Usage totals add up and filter by day.
    check_usage(mid_hour()) => memory_usage, redis_usage;
    /// Concurrent reservations never over-admit.
    check_concurrency(mid_hour()) => memory_concurrency, redis_concurrency;
    /// A settle batch retried with the same id applies once.
    check_settle_once(mid_hour()) => memory_settle_once, redis_settle_once;
    /// A reservation id debits once; abandoned ones are refunded once or never debit.
    check_reservation_ids(mid_hour()) => memory_reservation_ids, redis_reservation_ids;
    /// Seed markers and the seeded mark.
    check_seed_marker(mid_hour()) => memory_seed_marker, redis_seed_marker;
    /// Circuits: rolling-window trips, retry-after trips, one probe per trip, close, events.
    check_breaker(0) => memory_breaker, redis_breaker;
    /// Circuit durations are bounded: integer times at most a day ahead, states readable.
    check_breaker_bounds(0) => memory_breaker_bounds, redis_breaker_bounds;
    /// A consumer's budget: debit, refusal, settle to the actual cost, refund; alert mode.
    check_consumer_budget(mid_hour()) => memory_consumer_budget, redis_consumer_budget;
    /// The team step: debit, refusal, settle, compensation, replays, admin changes.
    check_team_budget(mid_hour()) => memory_team_budget, redis_team_budget;
    /// Concurrent team steps never pass the budget.
    check_team_concurrency(mid_hour()) => memory_team_concurrency, redis_team_concurrency;
    /// Alert claims: once until expiry or release.
    check_alert_claims(mid_hour()) => memory_alert_claims, redis_alert_claims;
    /// MCP tool calls: rolling minute, period quota, unknown and disabled, usage totals.
    check_tool_calls(mid_hour()) => memory_tool_calls, redis_tool_calls;
    /// Concurrent tool calls never pass the rolling-minute limit.
    check_tool_concurrency(mid_hour()) => memory_tool_concurrency, redis_tool_concurrency;
    /// Per-dimension usage rows, their cap and its `other` bucket.
    check_dimensions(mid_hour()) => memory_dimensions, redis_dimensions;
    /// The dimension cap holds under concurrent settles.
    check_dimension_cap_concurrency(mid_hour()) => memory_dimension_cap, redis_dimension_cap;
}

suite_timed! {
    /// The next hour resets an hourly quota.
    check_rollover(before_hour(1500)) => memory_rollover, redis_rollover;
    /// A settlement for a rolled-over window does not touch the new one.
    check_settle_old_window(before_hour(1500)) => memory_settle_old_window, redis_settle_old_window;
}

/// Quota windows agree with `window_bounds` at awkward instants (memory store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_windows() {
    check_windows(&MemEnv).await;
}

/// Quota windows computed in Lua agree with `window_bounds` at awkward instants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_windows() {
    check_windows(&RedisEnv::start()).await;
}

// ---------------------------------------------------------------------------------------------
// The whole suite on one server of each other kind: Valkey, Redis Cluster and Sentinel (each
// flavor). One topology per test (a cluster takes seconds to form), emptied between checks.

/// Every check above against `env`, each on a fresh store (with its own clock offset) after
/// `reset` emptied the data.
async fn whole_suite<E: Env>(env: &E, reset: impl Fn()) {
    macro_rules! run {
        ($($check:ident($offset:expr);)*) => {$(
            reset();
            let started = Instant::now();
            $check(&env.store($offset).await).await;
            eprintln!("{} passed in {:?}", stringify!($check), started.elapsed());
        )*};
    }
    macro_rules! run_timed {
        ($($check:ident($offset:expr);)*) => {$(
            reset();
            let offset = $offset;
            $check(&env.store(offset).await, offset).await;
            eprintln!("{} passed", stringify!($check));
        )*};
    }
    run! {
        check_decisions(mid_hour());
        check_burst(mid_hour());
        check_refill(mid_hour());
        check_oversized(mid_hour());
        check_quota(mid_hour());
        check_settle(mid_hour());
        check_admin_change(mid_hour());
        check_seed(mid_hour());
        check_usage(mid_hour());
        check_concurrency(mid_hour());
        check_settle_once(mid_hour());
        check_reservation_ids(mid_hour());
        check_seed_marker(mid_hour());
        check_breaker(0);
        check_breaker_bounds(0);
        check_consumer_budget(mid_hour());
        check_team_budget(mid_hour());
        check_team_concurrency(mid_hour());
        check_alert_claims(mid_hour());
        check_tool_calls(mid_hour());
        check_tool_concurrency(mid_hour());
        check_dimensions(mid_hour());
        check_dimension_cap_concurrency(mid_hour());
    }
    run_timed! {
        check_rollover(before_hour(1500));
        check_settle_old_window(before_hour(1500));
    }
    reset();
    check_windows(env).await;
}

/// `FLUSHALL` on every master of the cluster (replicas follow).
fn flush_cluster(c: &Cluster) {
    for m in c.masters().expect("cluster masters") {
        let node = c.node(m.port).expect("master node");
        assert_eq!(node.cli(&["FLUSHALL"]).unwrap(), "OK");
    }
}

fn flush_sentinel_master(s: &Sentinel) {
    assert_eq!(s.master().unwrap().cli(&["FLUSHALL"]).unwrap(), "OK");
}

/// The Lua scripts decide on Valkey 8 exactly as the memory store does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_whole_suite() {
    let env = ValkeyEnv {
        server: Valkey::start().expect("start valkey-server"),
    };
    whole_suite(&env, || {
        env.server.cli(&["FLUSHALL"]).unwrap();
    })
    .await;
}

/// The whole suite on a cluster of `flavor`.
async fn cluster_suite(flavor: Flavor) {
    let env = ClusterEnv {
        cluster: Cluster::start(flavor)
            .unwrap_or_else(|e| panic!("start a {flavor:?} cluster: {e:?}")),
    };
    whole_suite(&env, || flush_cluster(&env.cluster)).await;
}

/// The whole suite through a sentinel group of `flavor`.
async fn sentinel_suite(flavor: Flavor) {
    let env = SentinelEnv {
        group: Sentinel::start(flavor)
            .unwrap_or_else(|e| panic!("start a {flavor:?} sentinel group: {e:?}")),
    };
    whole_suite(&env, || flush_sentinel_master(&env.group)).await;
}

/// On a Redis Cluster (3 masters, 3 replicas) every script, pipeline, scan and the breaker
/// channel work as on one server: keys spread over every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_redis_whole_suite() {
    cluster_suite(Flavor::Redis).await;
}

/// The same on a Valkey 8 cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_valkey_whole_suite() {
    cluster_suite(Flavor::Valkey).await;
}

/// Through Redis sentinels, the store behaves as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_redis_whole_suite() {
    sentinel_suite(Flavor::Redis).await;
}

/// Through Valkey sentinels, the store behaves as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_valkey_whole_suite() {
    sentinel_suite(Flavor::Valkey).await;
}

// ---------------------------------------------------------------------------------------------
// Redis only.

/// After `SCRIPT FLUSH` every script call loads its script again and succeeds, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_noscript_recovery() {
    let env = RedisEnv::start();
    let s = env.store(mid_hour()).await;
    let rec = ConsumerRecord {
        tpm: Some(6000),
        ..with_quota("ns", 10_000, Period::Day)
    };
    s.put_consumer(&rec).await.unwrap();
    let a = admitted(reserve(&s, "ns", 1000).await);
    assert_eq!(env.server.cli(&["SCRIPT", "FLUSH"]).unwrap(), "OK");
    let b = admitted(reserve(&s, "ns", 1000).await);
    assert_eq!(b.remaining_quota, Some(8000));
    env.server.cli(&["SCRIPT", "FLUSH"]).unwrap();
    // Two consumers in one settle pipeline: each correction applied once, not twice.
    s.put_consumer(&with_quota("ns2", 10_000, Period::Day))
        .await
        .unwrap();
    let c = admitted(reserve(&s, "ns2", 1000).await);
    s.settle(
        new_batch_id(),
        &[
            correction("ns", &a, 1000, 0),
            correction("ns2", &c, 1000, 0),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        admitted(reserve(&s, "ns", 1).await).remaining_quota,
        Some(8999)
    );
    assert_eq!(
        admitted(reserve(&s, "ns2", 1).await).remaining_quota,
        Some(9999)
    );
    env.server.cli(&["SCRIPT", "FLUSH"]).unwrap();
    assert!(s.seed_consumer(&consumer("ns3"), &[]).await.unwrap());
}

/// Bucket, quota and usage keys all carry a TTL: nothing in Redis grows without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_keys_expire() {
    let env = RedisEnv::start();
    let s = env.store(0).await;
    let rec = ConsumerRecord {
        tpm: Some(6000),
        ..with_quota("ttl", 10_000, Period::Hour)
    };
    s.put_consumer(&rec).await.unwrap();
    let a = admitted(reserve(&s, "ttl", 3000).await);
    let usage = UsageDelta {
        day: 20260101,
        counts: UsageCounts {
            requests: 1,
            ..UsageCounts::default()
        },
        ..UsageDelta::default()
    };
    s.settle(
        new_batch_id(),
        &[Settlement {
            usage: Some(usage),
            ..correction("ttl", &a, 3000, 2000)
        }],
    )
    .await
    .unwrap();
    let pttl = |key: &str| -> i64 { env.server.cli(&["PTTL", key]).unwrap().parse().unwrap() };
    let bucket = pttl("tg:bucket:{ttl}");
    // 2000 tokens missing at 100/s: full again in 20 s, +1 s.
    assert!((19_000..=21_000).contains(&bucket), "bucket PTTL {bucket}");
    let quota = pttl("tg:quota:{ttl}");
    assert!(
        quota > 86_400_000 && quota <= 90_000_000,
        "quota PTTL {quota}"
    );
    let usage = pttl("tg:usage:{ttl}:20260101");
    assert!(
        usage > 399 * 86_400_000 && usage <= 400 * 86_400_000,
        "usage PTTL {usage}"
    );
    assert_eq!(
        pttl("tg:consumer:{ttl}"),
        -1,
        "consumers are the operator's: no TTL"
    );
}

/// Circuit rows keep integers and a TTL whatever the `retry-after` was; a row no script could
/// have written (a float `open_until` without a TTL, as older versions left after
/// `retry-after: inf`) is skipped by the re-sync without hiding the others, counts as closed,
/// and is replaced by the next trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_breaker_rows_stay_sane() {
    let env = RedisEnv::start();
    let s = env.store(0).await;
    let cli = |args: &[&str]| env.server.cli(args).unwrap();
    let st = s
        .breaker_failure("absurd", &failure(Some(u64::MAX), false))
        .await
        .unwrap();
    assert_eq!(st.open_for_ms(), MAX_TRIP_MS);
    let stored = cli(&["HGET", "tg:breaker:{absurd}", "open_until"]);
    assert!(
        stored.chars().all(|c| c.is_ascii_digit()),
        "open_until {stored:?}"
    );
    let pttl: i64 = cli(&["PTTL", "tg:breaker:{absurd}"]).parse().unwrap();
    assert!(
        pttl > 0 && pttl as u64 <= MAX_TRIP_MS + 86_400_000,
        "PTTL {pttl}"
    );

    // A poisoned row, as an older version wrote it: a float, no TTL.
    cli(&[
        "HSET",
        "tg:breaker:{poisoned}",
        "open_until",
        "1.8446744073709552e+19",
        "trip",
        "1",
    ]);
    let st = s
        .breaker_failure("healthy", &failure(Some(5_000), false))
        .await
        .unwrap();
    assert_eq!(st.trip, 1);
    let names = ["poisoned", "healthy"].map(String::from);
    let states = s.breaker_states(&names).await.unwrap();
    assert_eq!(states.len(), 1, "the poisoned row is skipped: {states:?}");
    assert_eq!(states[0].backend, "healthy");
    assert!(states[0].open_for_ms() > 4_000, "{states:?}");
    assert!(
        !s.breaker_probe("poisoned", 1_000).await.unwrap(),
        "a poisoned row is no open circuit to probe"
    );
    let st = s
        .breaker_failure("poisoned", &failure(Some(2_000), false))
        .await
        .unwrap();
    assert_eq!(st.trip, 2, "the next trip replaces it");
    assert!((1_900..=2_000).contains(&st.open_for_ms()), "{st:?}");
    let pttl: i64 = cli(&["PTTL", "tg:breaker:{poisoned}"]).parse().unwrap();
    assert!(pttl > 0, "PTTL {pttl}");
    assert_eq!(s.breaker_states(&names).await.unwrap().len(), 2);

    // Closing a poisoned row rewrites it closed, with a TTL.
    cli(&["HSET", "tg:breaker:{p2}", "open_until", "inf", "trip", "4"]);
    assert!(!s.breaker_close("p2").await.unwrap());
    assert_eq!(cli(&["HGET", "tg:breaker:{p2}", "open_until"]), "0");
    let pttl: i64 = cli(&["PTTL", "tg:breaker:{p2}"]).parse().unwrap();
    assert!(pttl > 0, "PTTL {pttl}");
}

/// Operators' plain `HSET`/`HDEL`/`SET`/`DEL` apply to the next call; absent fields fall back
/// to the request's defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_operator_commands() {
    let env = RedisEnv::start();
    let s = env.store(mid_hour()).await;
    let cli = |args: &[&str]| env.server.cli(args).unwrap();
    cli(&[
        "HSET",
        "tg:consumer:{op}",
        "team",
        "fin",
        "tpm",
        "1000",
        "models",
        "gpt-4o, mini",
    ]);
    let defaults = LimitDefaults {
        tpm: Some(5),
        quota: Some(50_000),
        quota_period: Period::Day,
    };
    let a = admitted(reserve_with(&s, "op", "mini", 100, &defaults, true).await);
    assert_eq!(
        (a.team.as_str(), a.tpm, a.remaining_quota),
        ("fin", Some(1000), Some(49_900))
    );
    assert_eq!(
        reserve_with(&s, "op", "other", 1, &defaults, true).await,
        Decision::ModelNotAllowed
    );
    cli(&["HSET", "tg:consumer:{op}", "disabled", "1"]);
    assert_eq!(
        reserve_with(&s, "op", "mini", 1, &defaults, true).await,
        Decision::Disabled
    );
    cli(&[
        "HSET",
        "tg:consumer:{op}",
        "disabled",
        "0",
        "quota",
        "100",
        "quota_period",
        "hour",
    ]);
    quota_exceeded(reserve_with(&s, "op", "mini", 101, &defaults, true).await);
    cli(&["HDEL", "tg:consumer:{op}", "tpm", "quota", "models"]);
    let a = admitted(reserve_with(&s, "op", "any", 1, &defaults, true).await);
    assert_eq!(
        (a.tpm, a.remaining_quota),
        (Some(5), Some(49_899)),
        "back to the defaults"
    );

    cli(&["SET", &format!("tg:key:{}", "d".repeat(64)), "op"]);
    assert_eq!(
        s.lookup_key(&"d".repeat(64)).await.unwrap().as_deref(),
        Some("op")
    );
    cli(&["DEL", &format!("tg:key:{}", "d".repeat(64))]);
    assert_eq!(s.lookup_key(&"d".repeat(64)).await.unwrap(), None);

    // A malformed field is the operator's error, reported, never silently ignored.
    cli(&["HSET", "tg:consumer:{op}", "tpm", "50k"]);
    let req = ReserveRequest {
        consumer: "op",
        model: "m",
        tokens: 1,
        defaults: &defaults,
        require_record: true,
        id: new_reservation_id(),
        background: false,
        cost_nano: 0,
    };
    let err = s.reserve(&req).await.unwrap_err();
    assert!(err.to_string().contains("tpm"), "{err}");
}

/// The unix socket URL forms work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_unix_socket() {
    let env = RedisEnv::start();
    let url = env.server.unix_url();
    let s = RedisStore::connect(&url, test_opts(0)).await.unwrap();
    s.ping().await.unwrap();
    let plain = url.replacen("redis+unix://", "unix://", 1);
    let s = RedisStore::connect(&plain, test_opts(0)).await.unwrap();
    s.put_key(&"e".repeat(64), "sock").await.unwrap();
    assert_eq!(
        s.lookup_key(&"e".repeat(64)).await.unwrap().as_deref(),
        Some("sock")
    );
}

/// A restarted server (empty, without scripts) is used again without a new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_reconnects() {
    let mut env = RedisEnv::start();
    let s = env.store(mid_hour()).await;
    s.put_consumer(&with_tpm("re", 1000)).await.unwrap();
    admitted(reserve(&s, "re", 10).await);
    env.server.stop();
    let err = s.ping().await.unwrap_err();
    assert!(
        matches!(
            err,
            tollgate_quota::Error::Unavailable(_) | tollgate_quota::Error::Timeout
        ),
        "{err:?}"
    );
    env.server.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.ping().await.is_err() {
        assert!(Instant::now() < deadline, "no reconnection within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.put_consumer(&with_tpm("re", 1000)).await.unwrap();
    assert_eq!(
        admitted(reserve(&s, "re", 10).await).remaining_tpm,
        Some(990),
        "a fresh bucket"
    );
}

/// A server that does not answer in time gives `Timeout`; an unreachable one `Unavailable`,
/// whose message never shows the URL's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_only_deadlines_and_errors() {
    let env = RedisEnv::start();
    let opts = RedisOpts {
        timeout: Duration::from_millis(50),
        ..test_opts(0)
    };
    let s = RedisStore::connect(&env.server.url(), opts).await.unwrap();
    s.ping().await.unwrap();
    env.server.cli(&["CLIENT", "PAUSE", "500", "ALL"]).unwrap();
    let err = s.ping().await.unwrap_err();
    assert!(matches!(err, tollgate_quota::Error::Timeout), "{err:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.ping().await.unwrap();

    env.server
        .cli(&["CONFIG", "SET", "requirepass", "right-one"])
        .unwrap();
    let url = format!("redis://:hunter2secret@127.0.0.1:{}/0", env.server.port());
    let err = match RedisStore::connect(&url, test_opts(0)).await {
        Ok(_) => panic!("connected with a wrong password"),
        Err(e) => e,
    };
    assert!(
        matches!(err, tollgate_quota::Error::Unavailable(_)),
        "{err:?}"
    );
    assert!(
        !format!("{err} {err:?}").contains("hunter2secret"),
        "{err:?}"
    );
    let url = format!("redis://:right-one@127.0.0.1:{}/0", env.server.port());
    RedisStore::connect(&url, test_opts(0))
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();

    let closed = RedisServer::start().unwrap();
    let url = closed.url();
    drop(closed);
    let err = match RedisStore::connect(&url, test_opts(0)).await {
        Ok(_) => panic!("connected to a stopped server"),
        Err(e) => e,
    };
    assert!(
        matches!(err, tollgate_quota::Error::Unavailable(_)),
        "{err:?}"
    );
}

//! Budgets in money and alerts, with real processes: one `redis-server`, three gateway
//! processes, a priced mock backend, clients spread over the three nodes, and a webhook
//! receiver in the test that counts the alerts it gets. The money the backend actually served
//! (its `/stats` tokens × the price) must respect a team's and a consumer's budget as if one
//! process enforced them; `alert` mode never blocks; each threshold fires once per window
//! across the cluster; a webhook that hangs does not slow requests.

use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::{CHAT, Harness, Running, client, header, key_for};

/// 1000 per 1M tokens: one token costs 0.001.
const PRICE: &str = "price = { input_per_1m = 1000.0, output_per_1m = 1000.0 }";
const PER_TOKEN: f64 = 0.001;

fn body(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "What does a budget in money buy?"}]})
}

/// `h` with `app-1` and `app-2` in team `team`, started on three gateways.
async fn two_of_team(h: Harness, team: &str) -> Running {
    let toml = format!("team = \"{team}\"");
    h.consumer("app-1", &toml)
        .consumer("app-2", &toml)
        .gateways(3)
        .start()
        .await
        .unwrap()
}

/// `x-budget-remaining` on one request of `app-1` (`body(100)`, gateway 0), which is served.
async fn budget_left_after_one(h: &Running) -> f64 {
    let r = h.post(0, "app-1", CHAT, body(100)).await;
    assert_eq!(r.status(), 200);
    header(&r, "x-budget-remaining")
}

/// Statuses (and error codes) per node.
type Counts = Arc<Mutex<BTreeMap<(usize, String), u64>>>;

/// `clients` tasks per node and per consumer send requests until each was refused with 403,
/// or for `time`; counts `status` or `status code` per node.
async fn hammer(h: &Running, consumers: &[&str], clients: usize, time: Duration) -> Counts {
    let until = Instant::now() + time;
    let counts: Counts = Arc::default();
    let mut tasks = Vec::new();
    for node in 0..h.gateways.len() {
        for key in consumers.iter().map(|id| key_for(id)) {
            for _ in 0..clients {
                let url = format!("{}{CHAT}", h.url(node));
                let (key, counts, c) = (key.clone(), counts.clone(), client());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let r = c.post(&url).bearer_auth(&key).json(&body(100)).send().await;
                        let label = match r {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let v: Value = r.json().await.unwrap_or(Value::Null);
                                match v["error"]["code"].as_str() {
                                    Some(code) => format!("{status} {code}"),
                                    None => status.to_string(),
                                }
                            }
                            Err(_) => "error".into(),
                        };
                        let refused = label.starts_with("403");
                        *counts.lock().unwrap().entry((node, label)).or_default() += 1;
                        if refused {
                            break;
                        }
                    }
                }));
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    counts
}

fn total(c: &Counts, label: &str) -> u64 {
    c.lock()
        .unwrap()
        .iter()
        .filter(|((_, l), _)| l == label)
        .map(|(_, n)| n)
        .sum()
}

/// The cost the backend really served, and the most one request can cost.
async fn served_cost(h: &Running) -> (f64, f64) {
    let stats = h.mock("m").stats().await.unwrap();
    let one = (count_prompt_tokens(&body(100)) + 100) as f64 * PER_TOKEN;
    (stats.total_tokens as f64 * PER_TOKEN, one)
}

/// Spend ≤ budget + one request, ≥ 90 % of it, and every node answered 403 budget_exceeded.
async fn assert_exact(h: &Running, counts: &Counts, budget: f64) {
    let (spent, one) = served_cost(h).await;
    eprintln!("spent {spent:.3} of {budget} (one request <= {one:.3}): {counts:?}");
    assert!(
        spent <= budget + one,
        "over-spent: {spent:.3} > {budget} + {one:.3}; {counts:?}"
    );
    assert!(
        spent >= 0.9 * budget,
        "under-spent: {spent:.3} of {budget}; {counts:?}"
    );
    for node in 0..3 {
        let refused = counts
            .lock()
            .unwrap()
            .get(&(node, "403 budget_exceeded".to_string()))
            .copied()
            .unwrap_or(0);
        assert!(refused > 0, "node {node} never refused: {counts:?}");
    }
    let c = counts.lock().unwrap();
    let other: Vec<_> = c
        .iter()
        .filter(|((_, l), _)| l != "200" && l != "403 budget_exceeded")
        .collect();
    assert!(other.is_empty(), "unexpected answers: {other:?}");
}

/// A team budget is shared by the team's consumers on every node: the money served stays
/// within the budget plus one request, uses at least 90 % of it, then every node answers 403
/// `budget_exceeded` (with the budget and currency in the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn team_budget_holds_across_three_nodes() {
    const BUDGET: f64 = 5.0;
    let h = two_of_team(
        Harness::new()
            .redis()
            .backend("m", MockOpts::default(), PRICE)
            .config(&format!(
                "[pricing]\ncurrency = \"EUR\"\n[[teams]]\nid = \"finance\"\nbudget = {BUDGET}\n\
                 budget_period = \"month\"\nbudget_action = \"block\"\n"
            )),
        "finance",
    )
    .await;
    let counts = hammer(&h, &["app-1", "app-2"], 3, Duration::from_secs(60)).await;
    assert_exact(&h, &counts, BUDGET).await;
    // What a team sees when it runs out.
    let r = h.post(1, "app-2", CHAT, body(100)).await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert_eq!(v["error"]["type"], "insufficient_quota");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("team budget of 5.00 EUR per month"), "{msg}");
    // `tollgate usage` shows the budget, settled to what was served.
    let (served, one) = served_cost(&h).await;
    let mut report = Value::Null;
    for _ in 0..50 {
        report = h.usage("team").unwrap();
        let spent = report["budgets"][0]["spent"].as_f64().unwrap_or(0.0);
        if (spent - served).abs() < 0.01 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = &report["budgets"][0];
    assert_eq!(
        (b["scope"].as_str(), b["id"].as_str()),
        (Some("team"), Some("finance")),
        "{report}"
    );
    assert_eq!(
        (b["budget"].as_f64(), b["currency"].as_str()),
        (Some(BUDGET), Some("EUR"))
    );
    let spent = b["spent"].as_f64().unwrap();
    assert!(
        (spent - served).abs() < 0.01 && spent <= BUDGET + one,
        "the budget settled to the cost served ({served:.3}): {report}"
    );
}

/// A busy team (consumers served from their token leases, the team from slices of its
/// budget) is charged exactly what its requests cost: the spend settles to the served cost,
/// never to the estimates (a token-leased request once left its team step's estimate
/// uncorrected), on a single node and across three.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_team_is_charged_what_was_served() {
    let h = two_of_team(
        Harness::new()
            .redis()
            .backend("m", MockOpts::default(), PRICE)
            .config("[[teams]]\nid = \"ops\"\nbudget = 100000.0\nbudget_period = \"month\"\n"),
        "ops",
    )
    .await;
    let counts = hammer(&h, &["app-1", "app-2"], 4, Duration::from_secs(3)).await;
    let ok = total(&counts, "200");
    assert!(
        ok > 300,
        "too few requests to make the team busy: {counts:?}"
    );
    assert_eq!(counts.lock().unwrap().len(), 3, "only 200s: {counts:?}");
    let (served, _) = served_cost(&h).await;
    let mut spent = f64::NAN;
    for _ in 0..50 {
        let report = h.usage("team").unwrap();
        spent = report["budgets"][0]["spent"].as_f64().unwrap_or(f64::NAN);
        if (spent - served).abs() < 1e-6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        (spent - served).abs() < 1e-6,
        "team spend {spent} ≠ served {served} after {ok} requests"
    );
}

/// A consumer's own budget holds the same way; a request admitted before shows what is left in
/// `x-budget-remaining`, and `/metrics` carries the budget gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_budget_holds_across_three_nodes() {
    const BUDGET: f64 = 3.0;
    let h = Harness::new()
        .redis()
        .backend("m", MockOpts::default(), PRICE)
        .config("[pricing]\ncurrency = \"EUR\"\n")
        .consumer(
            "app-1",
            &format!("budget = {BUDGET}\nbudget_period = \"day\"\nbudget_action = \"block\""),
        )
        .gateways(3)
        .start()
        .await
        .unwrap();
    let left = budget_left_after_one(&h).await;
    let one = (count_prompt_tokens(&body(100)) + 100) as f64 * PER_TOKEN;
    assert!(
        (left - (BUDGET - one)).abs() < 0.002,
        "x-budget-remaining {left} after one request of at most {one}"
    );
    let metrics = h.metrics(0).await;
    assert!(
        metrics.contains(
            "tollgate_budget_limit{scope=\"consumer\",id=\"app-1\",period=\"day\",currency=\"EUR\"} 3"
        ),
        "{metrics}"
    );
    let counts = hammer(&h, &["app-1"], 4, Duration::from_secs(60)).await;
    assert_exact(&h, &counts, BUDGET).await;
}

/// What the webhook receiver got.
#[derive(Clone, Default)]
struct Hook {
    bodies: Arc<Mutex<Vec<Value>>>,
    /// Requests that arrived (a hanging hook never answers them).
    arrived: Arc<AtomicU64>,
}

impl Hook {
    /// Starts a receiver; `hang` makes it take every request and never answer.
    async fn start(hang: bool) -> (Hook, String) {
        let hook = Hook::default();
        let h = hook.clone();
        let app = Router::new().route(
            "/hook",
            post(move |body: axum::Json<Value>| {
                let h = h.clone();
                async move {
                    h.arrived.fetch_add(1, Ordering::SeqCst);
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    h.bodies.lock().unwrap().push(body.0);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (hook, url)
    }

    /// Waits (up to 10 s) until `n` calls arrived, then `more` for any that should not come.
    async fn wait_for(&self, n: usize, more: Duration) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bodies.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(more).await;
    }

    /// Calls per (event, scope, id, threshold).
    fn counts(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for b in self.bodies.lock().unwrap().iter() {
            let k = format!(
                "{} {} {} {}",
                b["event"].as_str().unwrap_or("?"),
                b["scope"].as_str().unwrap_or("-"),
                b["id"].as_str().unwrap_or("-"),
                b["threshold"]
            );
            *m.entry(k).or_default() += 1;
        }
        m
    }
}

/// `alert` mode never blocks, and each threshold's webhook fires exactly once per window
/// across three nodes (the receiver counts them), with a Slack- and Teams-compatible `text`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alert_mode_never_blocks_and_thresholds_fire_once() {
    let (hook, url) = Hook::start(false).await;
    let h = two_of_team(
        Harness::new()
            .redis()
            .backend("m", MockOpts::default(), PRICE)
            .config(
                "[pricing]\ncurrency = \"EUR\"\n[[teams]]\nid = \"ops\"\nbudget = 1.0\n\
                 budget_action = \"alert\"\n[[alerts]]\nurl_env = \"HOOK_URL\"\nteams = [\"ops\"]\n\
                 thresholds = [0.5, 0.8, 1.0]\n",
            )
            .env("HOOK_URL", &url),
        "ops",
    )
    .await;
    // ~3x the budget, from every node at once: nothing is refused.
    let counts = hammer(&h, &["app-1", "app-2"], 2, Duration::from_secs(4)).await;
    let (spent, _) = served_cost(&h).await;
    assert!(spent > 2.0, "the load spent {spent:.3}: {counts:?}");
    assert_eq!(
        total(&counts, "200"),
        counts.lock().unwrap().values().sum::<u64>(),
        "alert mode never refuses: {counts:?}"
    );
    // Deliveries are off the request path: give them a moment.
    hook.wait_for(3, Duration::from_secs(2)).await;
    let got = hook.counts();
    let want: BTreeMap<String, u64> = ["0.5", "0.8", "1.0"]
        .iter()
        .map(|t| (format!("budget team ops {t}"), 1))
        .collect();
    assert_eq!(got, want, "{:?}", hook.bodies.lock().unwrap());
    let text = hook.bodies.lock().unwrap()[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("team ops"), "{text}");
    assert!(
        !h.gateways.iter().any(|g| g.log_text().contains(&url)),
        "the webhook URL is a secret and never logged"
    );
}

/// A webhook that accepts and never answers does not slow requests: with a delivery timeout
/// of 30 s, every request of a load that crosses many thresholds still answers within a
/// second, while the hook holds deliveries open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_webhook_does_not_slow_requests() {
    let (hook, url) = Hook::start(true).await;
    let thresholds: Vec<String> = (1..=40).map(|i| format!("{}", i as f64 / 40.0)).collect();
    let h = Harness::new()
        .redis()
        .backend("m", MockOpts::default(), PRICE)
        .config(&format!(
            "[pricing]\ncurrency = \"EUR\"\n[[alerts]]\nurl = \"{url}\"\ntimeout_ms = 30000\n\
             thresholds = [{}]\n",
            thresholds.join(", ")
        ))
        .consumer(
            "app-1",
            "budget = 0.6\nbudget_action = \"alert\"\nquota = 4000\nquota_period = \"day\"",
        )
        .gateways(3)
        .start()
        .await
        .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        let started = Instant::now();
        let r = h.post(i % 3, "app-1", CHAT, body(20)).await;
        let status = r.status();
        let _ = r.bytes().await;
        slowest = slowest.max(started.elapsed());
        assert!(status == 200 || status == 403, "{status}");
    }
    assert!(
        hook.arrived.load(Ordering::SeqCst) >= 10,
        "the hook was called ({} times) and hangs",
        hook.arrived.load(Ordering::SeqCst)
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited on the webhook: {slowest:?}"
    );
}

/// Budgets reach OTLP as gauges (limit, spent, remaining by scope and id), like `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_gauges_reach_otlp() {
    let rx = tollgate_tests::otlp::OtlpReceiver::start().await.unwrap();
    let mut h = Harness::new()
        .backend("m", MockOpts::default(), PRICE)
        .config(&format!(
            "[pricing]\ncurrency = \"EUR\"\n[telemetry]\notlp_endpoint = \"{}\"\n\
             [[teams]]\nid = \"finance\"\nbudget = 2.0\nbudget_period = \"week\"\n",
            rx.url()
        ))
        .consumer("app-1", "team = \"finance\"\nbudget = 1.0")
        .start()
        .await
        .unwrap();
    let left = budget_left_after_one(&h).await;
    // Metrics leave at the shutdown flush.
    h.gateways[0].terminate().await.unwrap();
    let point = |metric: &str, scope: &str| -> f64 {
        rx.latest_points(metric)
            .iter()
            .find(|p| p.attributes["tollgate.budget.scope"] == scope)
            .unwrap_or_else(|| panic!("{metric} {scope} missing: {:?}", rx.metric_names()))
            .value
    };
    assert_eq!(point("tollgate.budget.limit", "consumer"), 1.0);
    assert_eq!(point("tollgate.budget.limit", "team"), 2.0);
    let remaining = point("tollgate.budget.remaining", "consumer");
    assert!(
        (remaining - left).abs() < 1e-6,
        "{remaining} vs header {left}"
    );
    assert!(point("tollgate.budget.spent", "team") > 0.0);
}

/// Alerts also fire on a token quota crossing its thresholds and on a circuit opening (a PTU
/// saturated, traffic failing over to PAYG): each once across three nodes, though every node
/// sees the circuit open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_and_circuit_alerts_fire_once_across_three_nodes() {
    let (hook, url) = Hook::start(false).await;
    let h = Harness::new()
        .redis()
        .backend(
            "ptu",
            MockOpts {
                tpm: Some(600),
                ..MockOpts::default()
            },
            "priority = 1",
        )
        .backend(
            "payg",
            MockOpts::default(),
            &format!("priority = 2\n{PRICE}"),
        )
        .config(&format!(
            "[[alerts]]\nurl = \"{url}\"\nthresholds = [0.5]\n"
        ))
        .consumer("app-1", "quota = 3000\nquota_period = \"day\"")
        .gateways(3)
        .start()
        .await
        .unwrap();
    let mut i = 0;
    // Until half the quota is used (the PTU saturates long before).
    while i < 200 {
        let r = h.post(i % 3, "app-1", CHAT, body(20)).await;
        let left: u64 = header(&r, "x-quota-remaining-tokens");
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        i += 1;
        if left < 1200 {
            break;
        }
    }
    hook.wait_for(2, Duration::from_secs(2)).await;
    let bodies = hook.bodies.lock().unwrap().clone();
    let quota: Vec<_> = bodies.iter().filter(|b| b["event"] == "quota").collect();
    assert_eq!(quota.len(), 1, "{bodies:?}");
    assert_eq!(
        (quota[0]["id"].as_str(), quota[0]["threshold"].as_f64()),
        (Some("app-1"), Some(0.5))
    );
    let circuits: Vec<_> = bodies
        .iter()
        .filter(|b| b["event"] == "circuit" && b["backend"] == "ptu")
        .collect();
    let trips: std::collections::BTreeSet<u64> =
        circuits.iter().filter_map(|b| b["trip"].as_u64()).collect();
    assert!(!circuits.is_empty(), "the PTU's circuit opened: {bodies:?}");
    assert_eq!(
        trips.len(),
        circuits.len(),
        "one alert per trip: {bodies:?}"
    );
    assert!(circuits[0]["text"].as_str().unwrap().contains("ptu"));
}

/// A replica that loses the store says so once: the store alert fires when requests find
/// Redis gone (the store cannot deduplicate it, so each degraded replica sends its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_degradation_alert_fires_once() {
    let (hook, url) = Hook::start(false).await;
    let mut h = Harness::new()
        .redis()
        .backend("m", MockOpts::default(), "")
        .config(&format!(
            "[[alerts]]\nurl = \"{url}\"\nevents = [\"store\"]\n"
        ))
        .consumer("app-1", "")
        .start()
        .await
        .unwrap();
    h.redis.as_mut().unwrap().stop();
    for _ in 0..10 {
        let r = h.post(0, "app-1", CHAT, body(20)).await;
        assert_eq!(r.status(), 503, "escrow without a lease answers 503");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    hook.wait_for(1, Duration::from_secs(1)).await;
    let bodies = hook.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["event"], "store");
    assert_eq!(bodies[0]["policy"], "escrow");
}

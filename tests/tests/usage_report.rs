//! The showback report end to end: three gateway processes share one Redis; mixed consumers,
//! teams, models and backends (with different prices), streamed and not, spread over every
//! node. `tollgate usage --format json` must then equal what the mock backends say they served
//! (their `/stats`), exactly, grouped by consumer, team, model and backend, and the cost must be
//! tokens × price to the pico-unit — also when Redis goes away for a few seconds under load.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::{Harness, Running, client, key_for};

/// Backend name → (input, output) price per 1M tokens in micro-units.
const PRICES: [(&str, u64, u64); 3] = [
    ("ptu", 500_000, 1_500_000),
    ("payg", 2_500_000, 10_000_000),
    ("vllm", 150_000, 600_000),
];

const CONSUMERS: [(&str, &str); 3] = [
    ("team-a", "finance"),
    ("team-b", "research"),
    ("team-c", "finance"),
];

fn harness() -> Harness {
    let mut h = Harness::new()
        .backend(
            "ptu",
            MockOpts::default(),
            "api = \"azure\"\nmodels = [\"gpt-4o\"]\npriority = 1\n\
             price = { input_per_1m = 0.5, output_per_1m = 1.5 }",
        )
        .backend(
            "payg",
            MockOpts::default(),
            "api = \"openai\"\nmodels = [\"gpt-4o-mini\", \"text-embedding-3-small\"]\n\
             price = { input_per_1m = 2.5, output_per_1m = 10.0, cached_input_per_1m = 1.25 }",
        )
        .backend(
            "vllm",
            MockOpts::default(),
            "api = \"openai\"\nmodels = [\"llama-3-8b\"]\n\
             price = { input_per_1m = 0.15, output_per_1m = 0.6 }",
        );
    for (id, team) in CONSUMERS {
        h = h.consumer(id, &format!("team = \"{team}\"\ntpm = 10000000"));
    }
    h
}

/// What the clients sent and got 200 for: per consumer, per team, requests and the tokens the
/// mock's documented rule gives (prompt tokens of the body, completion = `max_tokens`).
#[derive(Default, Clone, Copy, Debug, PartialEq)]
struct Sent {
    requests: u64,
    input: u64,
    output: u64,
}

type Ledger = Arc<Mutex<BTreeMap<String, Sent>>>;

/// Request `i`: a consumer, a model, an operation and whether it streams, all varying.
fn request(i: usize) -> (&'static str, &'static str, Value) {
    let (consumer, _) = CONSUMERS[i % 3];
    let model = [
        "gpt-4o",
        "gpt-4o-mini",
        "llama-3-8b",
        "text-embedding-3-small",
    ][(i / 3) % 4];
    let max_tokens = 3 + (i % 7) as u64;
    if model == "text-embedding-3-small" {
        let body = json!({"model": model, "input": format!("embed request number {i} please")});
        return (consumer, "/v1/embeddings", body);
    }
    let mut body = json!({"model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": format!("Question {i}: how many tokens is this?")}]});
    match i % 4 {
        0 => body["stream"] = json!(true),
        1 => {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        _ => {}
    }
    let path = if i.is_multiple_of(5) {
        "/openai/v1/chat/completions"
    } else {
        "/v1/chat/completions"
    };
    (consumer, path, body)
}

/// Sends requests `range` from `tasks` concurrent clients, node = i % 3, recording every 200;
/// returns how many were answered 200.
async fn send(h: &Running, range: std::ops::Range<usize>, tasks: usize, ledger: &Ledger) -> u64 {
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let urls: Vec<String> = (0..h.gateways.len()).map(|n| h.url(n)).collect();
        let (next, ledger, end, ok) = (next.clone(), ledger.clone(), range.end, ok.clone());
        handles.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let (consumer, path, body) = request(i);
                let url = format!("{}{path}", urls[i % urls.len()]);
                let Ok(resp) = c
                    .post(&url)
                    .bearer_auth(key_for(consumer))
                    .json(&body)
                    .send()
                    .await
                else {
                    continue;
                };
                let status = resp.status().as_u16();
                // Read the body to its end: a stream is only settled once it is over.
                let text = resp.text().await.unwrap_or_default();
                if status != 200 {
                    continue;
                }
                assert!(!text.is_empty());
                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let input = if path.ends_with("embeddings") {
                    count_prompt_tokens(&json!({"input": body["input"]}))
                } else {
                    count_prompt_tokens(&body)
                };
                let output = body["max_tokens"].as_u64().unwrap_or(0);
                let team = CONSUMERS.iter().find(|(c, _)| *c == consumer).unwrap().1;
                let mut l = ledger.lock().unwrap();
                for k in [format!("consumer:{consumer}"), format!("team:{team}")] {
                    let e = l.entry(k).or_default();
                    e.requests += 1;
                    e.input += input;
                    e.output += output;
                }
            }
        }));
    }
    for t in handles {
        t.await.unwrap();
    }
    ok.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs `tollgate usage --config FILE --by BY --format json` and parses its output.
fn usage_report(h: &Running, by: &str) -> Value {
    h.usage(by).expect("tollgate usage")
}

/// The report's row for `key` under `by`.
fn row<'a>(report: &'a Value, by: &str, key: &str) -> Option<&'a Value> {
    report["rows"]
        .as_array()?
        .iter()
        .find(|r| r[by].as_str() == Some(key))
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .or_else(|| v[field].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

/// What the mocks served: per backend (requests ok, prompt, completion) and per model.
async fn served(h: &Running) -> (BTreeMap<String, Sent>, BTreeMap<String, Sent>) {
    let mut by_backend = BTreeMap::new();
    let mut by_model: BTreeMap<String, Sent> = BTreeMap::new();
    for m in &h.mocks {
        let s = m.stats().await.unwrap();
        by_backend.insert(
            m.name.clone(),
            Sent {
                requests: s.ok,
                input: s.prompt_tokens,
                output: s.completion_tokens,
            },
        );
        for (model, ms) in s.by_model {
            let e = by_model.entry(model).or_default();
            e.requests += ms.requests;
            e.input += ms.prompt_tokens;
            e.output += ms.completion_tokens;
        }
    }
    (by_backend, by_model)
}

/// Waits until the report's total requests reach `want` (the usage workers settle in the
/// background), then returns the backend report.
async fn settled_report(h: &Running, want: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = usage_report(h, "backend");
        if num(&r["total"], "requests") >= want || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks every grouping of the report against the mocks' counts and the clients' ledger.
async fn check_report(h: &Running, ledger: &Ledger) {
    let (by_backend, by_model) = served(h).await;
    let total_ok: u64 = by_backend.values().map(|s| s.requests).sum();
    assert!(total_ok > 0, "no request was served");
    let report = settled_report(h, total_ok).await;

    // By backend: tokens and requests equal the mock's, cost = tokens × that backend's price.
    for (name, pin, pout) in PRICES {
        let s = by_backend[name];
        let r = row(&report, "backend", name)
            .unwrap_or_else(|| panic!("no row for backend {name}: {report:#}"));
        assert_eq!(
            num(r, "requests"),
            s.requests,
            "{name} requests: {report:#}"
        );
        assert_eq!(num(r, "input_tokens"), s.input, "{name} input tokens");
        assert_eq!(num(r, "output_tokens"), s.output, "{name} output tokens");
        assert_eq!(
            num(r, "cost_pico"),
            s.input * pin + s.output * pout,
            "{name}: cost must be tokens × price exactly"
        );
    }
    let total = &report["total"];
    assert_eq!(num(total, "requests"), total_ok);
    let expected_cost: u64 = PRICES
        .iter()
        .map(|(n, pin, pout)| by_backend[*n].input * pin + by_backend[*n].output * pout)
        .sum();
    assert_eq!(num(total, "cost_pico"), expected_cost);

    // By model: equal to the mocks' per-model counts.
    let report = usage_report(h, "model");
    for (model, s) in &by_model {
        let r = row(&report, "model", model)
            .unwrap_or_else(|| panic!("no row for model {model}: {report:#}"));
        assert_eq!(num(r, "requests"), s.requests, "{model} requests");
        assert_eq!(num(r, "input_tokens"), s.input, "{model} input tokens");
        assert_eq!(num(r, "output_tokens"), s.output, "{model} output tokens");
    }
    assert_eq!(
        report["rows"].as_array().unwrap().len(),
        by_model.len(),
        "{report:#}"
    );

    // By consumer and by team: equal to what each client sent and got served.
    let ledger = ledger.lock().unwrap().clone();
    let sum = |prefix: &str| {
        ledger
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .fold(Sent::default(), |a, (_, s)| Sent {
                requests: a.requests + s.requests,
                input: a.input + s.input,
                output: a.output + s.output,
            })
    };
    let mocks_total = by_backend.values().fold(Sent::default(), |a, s| Sent {
        requests: a.requests + s.requests,
        input: a.input + s.input,
        output: a.output + s.output,
    });
    assert_eq!(
        sum("consumer:"),
        mocks_total,
        "the clients' ledger must agree with the mocks"
    );
    for by in ["consumer", "team"] {
        let report = usage_report(h, by);
        for (k, s) in ledger.iter().filter(|(k, _)| k.starts_with(by)) {
            let key = &k[by.len() + 1..];
            let r = row(&report, by, key)
                .unwrap_or_else(|| panic!("no row for {by} {key}: {report:#}"));
            assert_eq!(num(r, "requests"), s.requests, "{by} {key} requests");
            assert_eq!(num(r, "input_tokens"), s.input, "{by} {key} input tokens");
            assert_eq!(
                num(r, "output_tokens"),
                s.output,
                "{by} {key} output tokens"
            );
        }
    }
}

/// Three nodes, three consumers in two teams, four models on three priced backends, streamed
/// and not: every grouping of `tollgate usage` equals the mocks' `/stats` exactly, and cost
/// equals tokens × price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_report_equals_what_the_backends_served() {
    let h = harness().redis().gateways(3).start().await.unwrap();
    let ledger = Ledger::default();
    assert_eq!(send(&h, 0..240, 12, &ledger).await, 240);
    check_report(&h, &ledger).await;

    // The table is the default and ends with the totals row; CSV has one line per group.
    let table = h.usage_every_day("team", &[]).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("team") && lines[3].starts_with("TOTAL"),
        "{table}"
    );
}

/// Redis stopped for a few seconds while the three nodes are under load, then restarted:
/// nothing is lost — the usage totals still equal what the mocks served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_redis_outage() {
    let mut h = harness()
        .persistent_redis()
        .store("on_error = \"local\"")
        .gateways(3)
        .start()
        .await
        .unwrap();
    let ledger = Ledger::default();
    assert_eq!(send(&h, 0..60, 6, &ledger).await, 60);

    // Load keeps flowing while Redis is down: settlements queue on every node.
    h.redis.as_mut().unwrap().stop();
    let outage = Instant::now();
    let during = send(&h, 60..200, 6, &ledger).await;
    assert_eq!(
        during, 140,
        "on_error = \"local\" keeps serving while Redis is down"
    );
    let rest = Duration::from_secs(3).saturating_sub(outage.elapsed());
    tokio::time::sleep(rest).await;
    h.redis.as_mut().unwrap().restart().unwrap();
    assert_eq!(send(&h, 200..260, 6, &ledger).await, 60);

    check_report(&h, &ledger).await;
}

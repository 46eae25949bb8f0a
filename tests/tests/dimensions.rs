//! Usage by dimension end to end: two gateway processes share one Redis; requests name their
//! end user in the OpenAI `user` field or `x-user-id`, and their app in `x-app`.
//! `tollgate usage --by user` must then hold, per user, the tokens the backend reported for
//! that user's requests — with every user past `dimension_cap` in `other` — and
//! `--by dimension:x-app` likewise; only the allow-listed `x-app` reaches `/metrics`.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Running, chat, client, eventually, key_for, metric_sum};

const CAP: u64 = 3;

async fn cluster() -> Running {
    tollgate_tests::Harness::new()
        .redis()
        .gateways(2)
        .backend(
            "ptu",
            MockOpts::default(),
            "price = { input_per_1m = 1.0, output_per_1m = 4.0 }",
        )
        .consumer("app-a", "team = \"red\"")
        .consumer("app-b", "team = \"blue\"")
        .config(&format!(
            "[telemetry]\ndimensions = [\"body:user\", \"header:x-user-id\", \"header:x-app\"]\n\
             dimension_cap = {CAP}\nprometheus_dimensions = [\"x-app\"]"
        ))
        .start()
        .await
        .unwrap()
}

/// One request: `user` in the body (or, when it starts with `hdr:`, in `x-user-id`), the app
/// in `x-app`; returns the tokens the backend reported.
async fn send(h: &Running, gateway: usize, consumer: &str, user: &str, app: &str, n: u64) -> u64 {
    let mut body = chat(10 + n).json();
    let mut req = client()
        .post(format!("{}/v1/chat/completions", h.url(gateway)))
        .bearer_auth(key_for(consumer))
        .header("x-app", app);
    match user.strip_prefix("hdr:") {
        Some(u) => req = req.header("x-user-id", u),
        None => body["user"] = json!(user),
    }
    let r = req.json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["usage"]["prompt_tokens"].as_u64().unwrap()
        + v["usage"]["completion_tokens"].as_u64().unwrap()
}

/// Tokens per (value, consumer) of a `--by user` / `--by dimension:NAME` JSON report.
fn per_value(report: &Value) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for r in report["rows"].as_array().unwrap() {
        let k = (
            r["value"].as_str().unwrap().to_string(),
            r["consumer"].as_str().unwrap().to_string(),
        );
        *m.entry(k).or_default() += r["tokens"].as_u64().unwrap();
    }
    m
}

/// Waits until the `--by` report counts `requests` requests.
async fn settled(h: &Running, by: &str, requests: u64) -> Value {
    let ok = eventually(Duration::from_secs(10), || async {
        h.usage(by)
            .is_ok_and(|v| v["total"]["requests"] == requests)
    })
    .await;
    assert!(ok, "{:?}", h.usage(by));
    h.usage(by).unwrap()
}

/// Per-user tokens equal what the backend reported per user, the cap holds across both
/// gateways (later users of the consumer go to `other`, another consumer has its own cap),
/// the header source stands in when the body has none, and the formats agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_user_matches_the_backend_with_an_other_bucket() {
    let h = cluster().await;
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut apps: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut sent = 0;
    let mut go = async |gw, consumer: &str, user: &str, app: &str, value: &str| {
        sent += 1;
        let t = send(&h, gw, consumer, user, app, sent).await;
        *want.entry((value.into(), consumer.into())).or_default() += t;
        *apps.entry((app.into(), consumer.into())).or_default() += t;
        sent
    };
    // The first CAP users of app-a, one through a header, over both gateways.
    go(0, "app-a", "u1", "web", "u1").await;
    go(1, "app-a", "hdr:u2", "web", "u2").await;
    let n = go(0, "app-a", "u3", "cli", "u3").await;
    settled(&h, "user", n).await;
    // Past the cap: new users of app-a are `other`, known ones keep counting; app-b has its
    // own cap.
    go(1, "app-a", "u4", "web", "other").await;
    go(0, "app-a", "u5", "cli", "other").await;
    go(1, "app-a", "u1", "web", "u1").await;
    let n = go(0, "app-b", "u4", "web", "u4").await;
    let by_user = settled(&h, "user", n).await;

    assert_eq!(per_value(&by_user), want, "{by_user:#}");
    let served = h.mock("ptu").stats().await.unwrap();
    assert_eq!(by_user["total"]["tokens"], served.total_tokens);
    let red_u1 = by_user["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["value"] == "u1")
        .unwrap();
    assert_eq!(red_u1["team"], "red");
    assert_eq!(red_u1["requests"], 2);
    // Cost per value: tokens at the backend's price (1 and 4 per 1M).
    let cost: u128 = by_user["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cost_pico"].as_str().unwrap().parse::<u128>().unwrap())
        .sum();
    let price = u128::from(served.prompt_tokens) * 1_000_000
        + u128::from(served.completion_tokens) * 4_000_000;
    assert_eq!(cost, price);

    let by_app = settled(&h, "dimension:x-app", n).await;
    assert_eq!(per_value(&by_app), apps, "{by_app:#}");

    // CSV carries the same per-user tokens (input + output columns).
    let csv = h.usage_every_day("user", &["--format", "csv"]).unwrap();
    let mut from_csv: BTreeMap<(String, String), u64> = BTreeMap::new();
    for l in csv.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        let tokens: u64 = f[4].parse::<u64>().unwrap() + f[5].parse::<u64>().unwrap();
        *from_csv.entry((f[0].into(), f[1].into())).or_default() += tokens;
    }
    assert_eq!(from_csv, want, "{csv}");

    // Prometheus: the allow-listed app, never the user.
    let m = format!("{}{}", h.metrics(0).await, h.metrics(1).await);
    let web = metric_sum(
        &m,
        "tollgate_dimension_requests_total",
        &[("dimension", "x-app"), ("value", "web")],
    );
    assert_eq!(web, 5);
    assert!(!m.contains("dimension=\"user\"") && !m.contains("\"u1\""));
}

/// On the memory store too, an allow-listed dimension reaches `/metrics` with at most
/// `dimension_cap` values, the rest labelled `other`; requests without the header carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_dimension_labels_are_capped() {
    let h = tollgate_tests::Harness::new()
        .backend("m", MockOpts::default(), "")
        .consumer("app-a", "")
        .config(
            "[telemetry]\ndimensions = [\"header:x-app\", \"body:user\"]\ndimension_cap = 2\n\
             prometheus_dimensions = [\"x-app\"]",
        )
        .start_in_process()
        .await;
    for app in ["a", "b", "c", "a", "d", ""] {
        let mut req = client()
            .post(format!("{}/v1/chat/completions", h.url(0)))
            .bearer_auth(key_for("app-a"));
        if !app.is_empty() {
            req = req.header("x-app", app);
        }
        let body = chat(5).set("user", json!(format!("user-{app}"))).json();
        let r = req.json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    let count = |m: &str, v: &str| {
        metric_sum(
            m,
            "tollgate_dimension_requests_total",
            &[("dimension", "x-app"), ("value", v)],
        )
    };
    let ok = eventually(Duration::from_secs(10), || async {
        let m = h.metrics(0).await;
        count(&m, "a") + count(&m, "b") + count(&m, "other") == 5
    })
    .await;
    let m = h.metrics(0).await;
    assert!(ok, "{m}");
    assert_eq!(
        (count(&m, "a"), count(&m, "b"), count(&m, "other")),
        (2, 1, 2)
    );
    assert_eq!(count(&m, "c") + count(&m, "d"), 0);
    assert!(
        !m.contains("user-"),
        "the user dimension is not allow-listed"
    );
    let tokens = metric_sum(
        &m,
        "tollgate_dimension_tokens_total",
        &[("dimension", "x-app"), ("type", "output")],
    );
    assert_eq!(tokens, 25, "5 requests of 5 output tokens");
}

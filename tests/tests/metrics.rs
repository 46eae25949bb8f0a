//! `/metrics` is what Prometheus ingests: the whole exposition parses with the official
//! `prometheus_client` parser, latencies are histograms with buckets (not a summary without
//! quantiles), and the build is announced.

use std::io::Write as _;
use std::process::{Command, Stdio};
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Harness, client, key_for};

/// Parses `text` with `tests/python/parse_metrics.py` (the venv's prometheus_client).
fn parse(text: &str) -> serde_json::Value {
    let python = tollgate_tests::pyenv::python().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/parse_metrics.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not a valid exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// After a streamed and a plain request, every family parses; request duration and time to
/// first token are histograms with buckets labelled by model and backend; build info is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_with_histograms() {
    let h = Harness::new()
        .backend("m", MockOpts::default(), "")
        .consumer("c", "")
        .start_in_process()
        .await;
    let c = client();
    for stream in [false, true] {
        let r = c
            .post(format!("{}/v1/chat/completions", h.url(0)))
            .bearer_auth(key_for("c"))
            .json(
                &serde_json::json!({"model": "gpt-4o", "max_tokens": 5, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    // The usage worker records the requests just after they end.
    let text = h
        .metrics_when(0, |t| {
            t.contains("tollgate_request_duration_seconds_count{model=\"gpt-4o\",backend=\"m\"} 2")
        })
        .await;
    let families = parse(&text);
    for (name, labels) in [
        ("tollgate_request_duration_seconds", ["backend", "model"]),
        ("tollgate_time_to_first_token_seconds", ["backend", "model"]),
    ] {
        let f = &families[name];
        assert_eq!(f["type"], "histogram", "{name}: {f}");
        let samples: Vec<&str> = f["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for s in ["_bucket", "_sum", "_count"] {
            assert!(samples.contains(&format!("{name}{s}").as_str()), "{f}");
        }
        for l in labels.iter().chain(&["le"]) {
            assert!(
                f["labels"].as_array().unwrap().iter().any(|x| x == l),
                "{f}"
            );
        }
    }
    assert_eq!(families["tollgate_build_info"]["type"], "gauge");
    assert_eq!(families["tollgate_requests"]["type"], "counter");
}

/// Every metric the Grafana dashboard (`deploy/grafana/tollgate.json`) queries is one that
/// `/metrics` exposes, after traffic that produces each kind: a PTU serving (with its
/// `monthly_cost` and `capacity_tpm`), a failover to PAYG, a 429 and an unknown model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_only_exposed_metrics() {
    let h = Harness::new()
        .backend(
            "ptu",
            MockOpts::default(),
            "priority = 1\nmodels = [\"gpt-4o\"]\nmonthly_cost = 20000.0\ncapacity_tpm = 300000\nprice = { input_per_1m = 1.0, output_per_1m = 4.0 }",
        )
        .backend_with("broken", "priority = 1\nmodels = [\"gpt-4o-mini\"]", |m| {
            m.fail_rate = 1.0
        })
        .backend(
            "payg",
            MockOpts::default(),
            "priority = 2\napi = \"openai\"",
        )
        .consumer("c", "")
        .consumer("tiny", "tpm = 100")
        .start_in_process()
        .await;
    for (who, body) in [
        ("c", tollgate_tests::chat(5)),
        ("c", tollgate_tests::chat(5).model("gpt-4o-mini")),
        // Larger than its bucket: the first passes on a full bucket, the second waits (429).
        ("tiny", tollgate_tests::chat(500)),
        ("tiny", tollgate_tests::chat(500)),
        ("c", tollgate_tests::chat(5).model("no-such-model")),
    ] {
        let _ = h.chat(who, body).await.bytes().await;
    }
    let seen = tollgate_tests::eventually(std::time::Duration::from_secs(5), || async {
        let text = h.metrics(0).await;
        text.contains("tollgate_failovers_total{") && text.contains("tollgate_cost_pico_total{")
    })
    .await;
    let text = h.metrics(0).await;
    assert!(seen, "{text}");
    let families = parse(&text);
    let exposed: std::collections::BTreeSet<String> = families
        .as_object()
        .unwrap()
        .values()
        .flat_map(|f| f["samples"].as_array().unwrap().iter())
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/tollgate.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("tollgate_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|q| !exposed.contains(*q)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not in /metrics:\n{text}"
    );
    // The 429 panel counts the token-limit refusals.
    assert!(
        text.contains("tollgate_errors_total{code=\"rate_limit_exceeded\"} 1"),
        "{text}"
    );
    for ptu in [
        "tollgate_backend_capacity_tpm{backend=\"ptu\"} 300000",
        "tollgate_backend_info{backend=\"ptu\",priority=\"1\",ptu=\"true\"} 1",
        "tollgate_backend_info{backend=\"payg\",priority=\"2\",ptu=\"false\"} 1",
    ] {
        assert!(text.contains(ptu), "{ptu}");
    }
}

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
        .in_process()
        .start()
        .await
        .unwrap();
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
    let mut text = String::new();
    for _ in 0..100 {
        text = c
            .get(format!("{}/metrics", h.url(0)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text
            .contains("tollgate_request_duration_seconds_count{model=\"gpt-4o\",backend=\"m\"} 2")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
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

//! OTLP telemetry end to end: a gateway process exports to a fake collector (the tests crate's
//! [`OtlpReceiver`], decoding `opentelemetry-proto`). Spans carry the GenAI attributes with the
//! token counts the mock served, metrics and one usage log record per request arrive, a client's
//! `traceparent` is continued through the gateway to the backend, and a dead collector costs a
//! log line, never a request.

use serde_json::Value;
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::otlp::OtlpReceiver;
use tollgate_tests::{Harness, Running, client, key_for};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn chat(model: &str, stream: bool, max_tokens: u64) -> Value {
    tollgate_tests::chat(max_tokens)
        .model(model)
        .stream(stream)
        .prompt("Trace this request, please.")
        .json()
}

async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Sends `n` chat requests as team-a, `pause` apart (request `i` streamed when `stream(i)`),
/// each answered 200; returns the slowest.
async fn slowest_of(h: &Running, n: u32, stream: fn(u32) -> bool, pause: Duration) -> Duration {
    let c = client();
    let url = format!("{}/v1/chat/completions", h.url(0));
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        let resp = c
            .post(&url)
            .bearer_auth(key_for("team-a"))
            .json(&chat("gpt-4o", stream(i), 5))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.text().await.unwrap();
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(pause).await;
    }
    slowest
}

/// Spans with GenAI attributes and the mock's exact token counts, the traceparent continued to
/// the backend and back to the client, token metrics and one usage log record per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_metrics_and_usage_logs_reach_the_collector() {
    let rx = OtlpReceiver::start().await.unwrap();
    let mut h = Harness::new()
        .backend(
            "ptu",
            MockOpts::default(),
            "api = \"azure\"\nmodels = [\"gpt-4o\"]\npriority = 1\n\
             deployments = { \"gpt-4o\" = \"gpt4o-ptu\" }",
        )
        .backend(
            "payg",
            MockOpts::default(),
            "api = \"openai\"\nmodels = [\"gpt-4o-mini\"]\n\
             price = { input_per_1m = 2.5, output_per_1m = 10.0 }",
        )
        .consumer("team-a", "team = \"finance\"")
        .config(&format!(
            "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"tollgate-e2e\"\n\
             dimensions = [\"body:user\", \"header:x-app\"]",
            rx.url()
        ))
        // Spans and logs leave within 200 ms; metrics only at the shutdown flush.
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_BLRP_SCHEDULE_DELAY", "200")
        .start()
        .await
        .unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", h.url(0));
    let key = key_for("team-a");

    // 1. A traced, non-streamed request to the PTU backend, naming its user and app.
    let mut first = chat("gpt-4o", false, 9);
    first["user"] = "alice".into();
    let resp = c
        .post(&url)
        .bearer_auth(&key)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("x-app", "web")
        .json(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let back = resp.headers()["traceparent"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    let parts: Vec<&str> = back.split('-').collect();
    assert_eq!(
        parts[1], CLIENT_TRACE,
        "the response continues the client's trace"
    );
    assert_ne!(parts[2], CLIENT_SPAN, "... with the gateway's own span");
    let gateway_span = parts[2].to_string();

    // The backend got a traceparent of the same trace whose parent is the gateway span.
    let ptu = h.mock("ptu").stats().await.unwrap();
    let sent = &ptu.last_request.as_ref().unwrap().headers["traceparent"];
    assert!(
        sent.starts_with(&format!("00-{CLIENT_TRACE}-{gateway_span}-")),
        "{sent}"
    );

    // 2. A streamed request to the PAYG backend, and 3. one without a traceparent.
    let resp = c
        .post(&url)
        .bearer_auth(&key)
        .json(&chat("gpt-4o-mini", true, 5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.text().await.unwrap();
    let resp = c
        .post(&url)
        .bearer_auth(&key)
        .json(&chat("gpt-4o-mini", false, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.text().await.unwrap();
    let payg_last = h.mock("payg").stats().await.unwrap();
    let untraced = &payg_last.last_request.as_ref().unwrap().headers["traceparent"];
    assert!(
        !untraced.contains(CLIENT_TRACE),
        "a request without a traceparent starts a new trace: {untraced}"
    );

    // Spans arrive while the gateway runs (batched, within the schedule delay).
    assert!(
        eventually(Duration::from_secs(10), || rx.spans().len() >= 3).await,
        "spans: {:?}",
        rx.spans()
    );
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert_eq!(rx.bad_bodies(), 0);
    let traced = spans
        .iter()
        .find(|s| s.trace_id == CLIENT_TRACE)
        .expect("the traced request's span");
    assert_eq!(traced.parent_span_id, CLIENT_SPAN);
    assert_eq!(traced.span_id, gateway_span);
    assert_eq!(traced.kind, 2, "a server span");
    assert_eq!(traced.name, "chat gpt-4o");
    assert_eq!(traced.resource["service.name"], "tollgate-e2e");
    let a = &traced.attributes;
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.request.model"], "gpt-4o");
    assert_eq!(a["gen_ai.response.model"], "gpt4o-ptu");
    assert_eq!(a["gen_ai.provider.name"], "azure.ai.openai");
    assert_eq!(a["gen_ai.system"], "azure.ai.openai");
    assert_eq!(a["tollgate.consumer"], "team-a");
    assert_eq!(a["tollgate.team"], "finance");
    assert_eq!(a["tollgate.backend"], "ptu");
    assert_eq!(a["tollgate.dimension.user"], "alice");
    assert_eq!(a["tollgate.dimension.x-app"], "web");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(
        a["gen_ai.usage.input_tokens"],
        body["usage"]["prompt_tokens"]
    );
    assert_eq!(a["gen_ai.usage.output_tokens"], 9);
    assert_eq!(
        a["gen_ai.usage.input_tokens"].as_u64(),
        Some(ptu.prompt_tokens),
        "span tokens equal the mock's"
    );
    assert!(traced.end_unix_nano >= traced.start_unix_nano);

    // Token totals over all spans equal what the mocks served.
    let payg = h.mock("payg").stats().await.unwrap();
    let span_sum = |k: &str| -> u64 {
        spans
            .iter()
            .map(|s| s.attributes[k].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        span_sum("gen_ai.usage.input_tokens"),
        ptu.prompt_tokens + payg.prompt_tokens
    );
    assert_eq!(
        span_sum("gen_ai.usage.output_tokens"),
        ptu.completion_tokens + payg.completion_tokens
    );
    let streamed = spans
        .iter()
        .find(|s| s.attributes["tollgate.stream"] == true)
        .expect("the streamed span");
    assert_eq!(streamed.attributes["gen_ai.provider.name"], "openai");
    assert_eq!(streamed.attributes["gen_ai.usage.output_tokens"], 5);
    assert!(
        !streamed.attributes.contains_key("tollgate.dimension.user"),
        "a request without a user has no user dimension"
    );

    // SIGTERM flushes the rest: metrics (no periodic export has run yet) and logs.
    h.gateways[0].terminate().await.unwrap();
    let logs = rx.logs();
    let usage: Vec<_> = logs
        .iter()
        .filter(|l| l.event_name == "tollgate.usage")
        .collect();
    assert_eq!(
        usage.len(),
        3,
        "one usage log record per request: {logs:#?}"
    );
    let traced_log = usage
        .iter()
        .find(|l| l.trace_id == CLIENT_TRACE)
        .expect("the traced request's usage record");
    assert_eq!(traced_log.span_id, gateway_span);
    let la = &traced_log.attributes;
    assert_eq!(la["consumer"], "team-a");
    assert_eq!(la["team"], "finance");
    assert_eq!(la["model"], "gpt-4o");
    assert_eq!(la["backend"], "ptu");
    assert_eq!(la["dimension.user"], "alice");
    assert_eq!(la["dimension.x-app"], "web");
    assert_eq!(la["priority"], 1);
    assert_eq!(la["trace_id"], CLIENT_TRACE);
    assert_eq!(la["status"], 200);
    assert_eq!(la["stream"], false);
    assert_eq!(la["input_tokens"].as_u64(), Some(ptu.prompt_tokens));
    assert_eq!(la["output_tokens"], 9);
    assert!(la["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(la["latency_ms"].as_i64().is_some() && la["ttft_ms"].as_i64().is_some());
    let log_cost: i64 = usage
        .iter()
        .map(|l| l.attributes["cost_pico"].as_i64().unwrap())
        .sum();
    assert_eq!(
        log_cost as u64,
        payg.prompt_tokens * 2_500_000 + payg.completion_tokens * 10_000_000,
        "cost = tokens × price (the PTU is free)"
    );

    let names = rx.metric_names();
    for m in [
        "gen_ai.client.token.usage",
        "tollgate.tokens",
        "tollgate.requests",
        "tollgate.cost",
        "gen_ai.client.operation.duration",
        "gen_ai.server.time_to_first_token",
    ] {
        assert!(
            names.iter().any(|n| n == m),
            "metric {m} missing: {names:?}"
        );
    }
    let tokens = rx.latest_points("tollgate.tokens");
    let sum_tokens = |kind: &str, backend: &str| -> u64 {
        tokens
            .iter()
            .filter(|p| {
                p.attributes["gen_ai.token.type"] == kind
                    && p.attributes["tollgate.backend"] == backend
                    && p.attributes["tollgate.consumer"] == "team-a"
                    && p.attributes["tollgate.team"] == "finance"
            })
            .map(|p| p.value as u64)
            .sum()
    };
    assert_eq!(sum_tokens("input", "ptu"), ptu.prompt_tokens);
    assert_eq!(sum_tokens("output", "ptu"), ptu.completion_tokens);
    assert_eq!(sum_tokens("input", "payg"), payg.prompt_tokens);
    assert_eq!(sum_tokens("output", "payg"), payg.completion_tokens);
    let usage_hist = rx.latest_points("gen_ai.client.token.usage");
    let hist = |kind: &str| -> (u64, u64) {
        usage_hist
            .iter()
            .filter(|p| p.attributes["gen_ai.token.type"] == kind)
            .fold((0, 0), |(n, s), p| (n + p.count, s + p.value as u64))
    };
    assert!(usage_hist.iter().all(|p| p.is_histogram));
    assert_eq!(
        hist("input"),
        (3, ptu.prompt_tokens + payg.prompt_tokens),
        "one input observation per request"
    );
    assert_eq!(
        hist("output"),
        (3, ptu.completion_tokens + payg.completion_tokens)
    );
}

/// A collector that is not there: every request still answers 200 quickly, the gateway logs
/// one warning (not one per request or per export), and shutdown is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_only_a_log_line() {
    // A port that was just free and now has no listener: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut h = Harness::new()
        .backend("ptu", MockOpts::default(), "api = \"azure\"")
        .consumer("team-a", "")
        .config(&format!("[telemetry]\notlp_endpoint = \"http://{dead}\""))
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env("OTEL_BLRP_SCHEDULE_DELAY", "50")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "100")
        .start()
        .await
        .unwrap();
    // Streamed and not, spread over several export cycles.
    let slowest = slowest_of(&h, 40, |i| i.is_multiple_of(2), Duration::from_millis(10)).await;
    assert!(
        slowest < Duration::from_millis(500),
        "a dead collector must not slow requests: slowest {slowest:?}"
    );
    let stats = h.mock("ptu").stats().await.unwrap();
    assert_eq!(stats.ok, 40);

    let t = Instant::now();
    h.gateways[0].terminate().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        t.elapsed()
    );
    let log = h.gateways[0].log_text();
    let warnings = log.matches("OTLP export failed").count();
    assert_eq!(warnings, 1, "exactly one warning line; the log:\n{log}");
}

/// Sampling and collector settings follow the standard variables: a client trace marked not
/// sampled (`-00`) is continued (same trace, flag kept) but its span is not exported, while
/// its usage log record still is; `OTEL_EXPORTER_OTLP_HEADERS` reaches the collector and
/// `OTEL_RESOURCE_ATTRIBUTES` the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_traces_are_followed_not_exported() {
    let rx = OtlpReceiver::start().await.unwrap();
    let mut h = Harness::new()
        .backend("ptu", MockOpts::default(), "api = \"azure\"")
        .consumer("team-a", "")
        .config(&format!("[telemetry]\notlp_endpoint = \"{}\"", rx.url()))
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env("OTEL_BLRP_SCHEDULE_DELAY", "50")
        .env("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=s%20ecret")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .start()
        .await
        .unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", h.url(0));
    for flags in ["00", "01"] {
        let resp = c
            .post(&url)
            .bearer_auth(key_for("team-a"))
            .header(
                "traceparent",
                format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}"),
            )
            .json(&chat("gpt-4o", false, 5))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let back = resp.headers()["traceparent"].to_str().unwrap().to_string();
        assert!(
            back.starts_with(&format!("00-{CLIENT_TRACE}-")) && back.ends_with(flags),
            "{back}"
        );
        let _ = resp.text().await.unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || !rx.spans().is_empty()).await);
    h.gateways[0].terminate().await.unwrap();
    let spans = rx.spans();
    assert_eq!(
        spans.len(),
        1,
        "only the sampled request's span: {spans:#?}"
    );
    assert_eq!(spans[0].resource["deployment.environment"], "test");
    assert_eq!(spans[0].resource["service.name"], "tollgate");
    let usage = rx
        .logs()
        .into_iter()
        .filter(|l| l.event_name == "tollgate.usage")
        .count();
    assert_eq!(usage, 2, "every request's usage record is exported");
    assert_eq!(rx.header("x-collector-token").as_deref(), Some("s ecret"));
}

/// A collector that accepts connections and never answers: requests stay fast, and what the
/// bounded export queue cannot hold is dropped and counted in `/metrics`
/// (`tollgate_otlp_dropped_total`), not kept in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_collector_drops_and_counts() {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hung.accept().await {
            conns.push(c);
        }
    });
    let mut h = Harness::new()
        .backend("ptu", MockOpts::default(), "api = \"azure\"")
        .consumer("team-a", "")
        .config(&format!("[telemetry]\notlp_endpoint = \"http://{addr}\""))
        // One span per export, two waiting at most: the first export hangs, the rest queue
        // or are dropped.
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
        .env("OTEL_BSP_MAX_QUEUE_SIZE", "2")
        .start()
        .await
        .unwrap();
    let slowest = slowest_of(&h, 10, |_| false, Duration::ZERO).await;
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    let dropped = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_otlp_dropped_total{signal=\"traces\"} "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the dropped counter")
    };
    // The usage worker ends the spans just after the answers: wait for the last ones.
    let n = dropped(&h.metrics_when(0, |t| dropped(t) >= 7).await);
    // Ten spans: one in the hung export, two waiting, the rest dropped.
    assert!((7..=10).contains(&n), "dropped {n}");
    h.gateways[0].terminate().await.unwrap();
    held.abort();
}

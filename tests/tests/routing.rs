//! PTU-first routing with real processes and sockets: priority groups, failover before the
//! first byte, circuit state shared across three gateway processes through Redis (one probe
//! per trip, cluster-wide), and the failure modes of a single backend: refused connections, a
//! hang, a stream that dies midway, every circuit open.

use futures::StreamExt as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::{Harness, Running, chat, client, header, key_for};
use tollgate_tests::{eventually, metric_sum, metrics};

fn body(max_tokens: u64, stream: bool) -> Value {
    chat(max_tokens).stream(stream).json()
}

/// `first` (the backends at priority 1) followed by a default `payg` backend at priority 2,
/// with consumer `a`, started in process.
async fn before_payg(first: Harness) -> Running {
    first
        .backend("payg", MockOpts::default(), "priority = 2")
        .consumer("a", "")
        .start_in_process()
        .await
}

const BREAKER: &str = "breaker = { failures = 3, window_ms = 10000, trip_ms = 5000, statuses = [429, 500, 502, 503, 504], accept_retry_after = true }";

/// Load above the PTU's capacity through three gateways: clients never see a 429 or 5xx, the
/// PTU is kept near full, the cluster stops sending to it as soon as it answers 429, exactly
/// one probe goes out per trip, and the PTU gets traffic again after each trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ptu_first_overflow_to_payg_across_three_nodes() {
    const PTU_TPM: u64 = 12_000;
    const SECS: u64 = 10;
    let h = Harness::new()
        .redis()
        .backend_with("ptu", &format!("priority = 1\n{BREAKER}"), |m| {
            m.tpm = Some(PTU_TPM)
        })
        .backend(
            "payg",
            MockOpts::default(),
            "priority = 2\napi = \"openai\"",
        )
        .consumer("app", "")
        .gateways(3)
        .start()
        .await
        .unwrap();
    let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let until = Instant::now() + Duration::from_secs(SECS);
    let mut tasks = Vec::new();
    for node in 0..3 {
        for _ in 0..4 {
            let (url, statuses) = (
                format!("{}/v1/chat/completions", h.url(node)),
                statuses.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let c = client();
                while Instant::now() < until {
                    let s = match c
                        .post(&url)
                        .bearer_auth(key_for("app"))
                        .json(&body(50, false))
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 599,
                    };
                    *statuses.lock().unwrap().entry(s).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
    }
    let mid = {
        tokio::time::sleep(Duration::from_secs(SECS / 2)).await;
        h.mock("ptu").stats().await.unwrap()
    };
    for t in tasks {
        t.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    let ptu = h.mock("ptu").stats().await.unwrap();
    let payg = h.mock("payg").stats().await.unwrap();
    let redis = h.redis.as_ref().unwrap();
    let trips: u64 = redis
        .cli(&["HGET", "tg:breaker:{ptu}", "trip"])
        .unwrap()
        .parse()
        .unwrap_or(0);
    println!(
        "clients {statuses:?}\nptu ok={} 429={} probes={} tokens={}\npayg ok={}\ntrips={trips}",
        ptu.ok, ptu.rate_limited, ptu.probes, ptu.total_tokens, payg.ok
    );

    let bad: u64 = statuses
        .iter()
        .filter(|(s, _)| **s == 429 || **s >= 500)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(bad, 0, "clients saw 429/5xx: {statuses:?}");
    assert!(payg.ok > 0, "overflow never reached PAYG");
    // The PTU is kept busy: at least 80 % of what it can serve in the run (a full bucket at
    // the start plus its refill).
    let capacity = PTU_TPM + PTU_TPM * SECS / 60;
    assert!(
        ptu.total_tokens * 10 >= capacity * 8,
        "PTU served {} of {capacity}",
        ptu.total_tokens
    );
    assert!(trips >= 2, "the PTU never tripped repeatedly ({trips})");
    // One probe per trip cluster-wide (the last trip may still be running).
    assert!(
        ptu.probes == trips || ptu.probes + 1 == trips,
        "probes {} for {trips} trips",
        ptu.probes
    );
    // Each 429 trips the circuit at once on every node, so per trip the PTU answers 429 only
    // to requests already in flight when it tripped: at most one per client (3 nodes × 4).
    // (Measured: about 3 per trip — one per node.)
    assert!(
        ptu.rate_limited <= trips * 12,
        "429s {} over {trips} trips",
        ptu.rate_limited
    );
    // Traffic returned to the PTU after trips ended.
    assert!(
        ptu.ok > mid.ok,
        "PTU got no traffic in the second half ({} -> {})",
        mid.ok,
        ptu.ok
    );
}

/// A backend that refuses connections: requests fail over to the next, and after
/// `failures` attempts its circuit opens so it is no longer tried.
#[tokio::test]
async fn refused_connections_fail_over_and_trip() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = Harness::new()
        .backend("payg", MockOpts::default(), "priority = 2")
        .consumer("a", "")
        .config(&format!("[[backends]]\nname = \"dead\"\nurl = \"http://{dead}\"\nmodels = [\"gpt-4o\"]\npriority = 1\n{BREAKER}\n"))
        .start_in_process()
        .await;
    for _ in 0..5 {
        let r = h.chat("a", &body(3, false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tollgate-backend"], "payg");
    }
    let m = metrics(&h.url(0)).await;
    assert_eq!(
        metric_sum(&m, "tollgate_breaker_state", &[("backend", "dead")]),
        1,
        "{m}"
    );
    assert!(metric_sum(&m, "tollgate_failovers_total", &[]) >= 3, "{m}");
}

/// A backend that hangs: the first-byte timeout moves the request on, fast.
#[tokio::test]
async fn hanging_backend_times_out_and_fails_over() {
    let h = before_payg(Harness::new().backend_with(
        "hang",
        "priority = 1\ntimeouts = { connect_ms = 500, first_byte_ms = 300, idle_ms = 1000 }",
        |m| m.hang = true,
    ))
    .await;
    let started = Instant::now();
    let r = h.chat("a", &body(3, false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-backend"], "payg");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

/// A stream that dies midway is not retried: the client sees the stream cut, the next
/// backend gets nothing, and the tokens already streamed are settled.
#[tokio::test]
async fn mid_stream_failure_is_not_retried_and_settles() {
    let h = before_payg(Harness::new().backend_with("flaky", "priority = 1", |m| {
        m.fail_mid_stream_after = Some(3)
    }))
    .await;
    let r = h.chat("a", &body(20, true)).await;
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let mut text = String::new();
    let mut failed = false;
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed || !text.contains("[DONE]"),
        "the stream looked complete: {text}"
    );
    assert_eq!(
        h.mock("payg").stats().await.unwrap().requests,
        0,
        "a started stream was retried"
    );
    let flaky = h.mock("flaky").stats().await.unwrap();
    assert_eq!(flaky.completion_tokens, 3);
    let prompt = count_prompt_tokens(&body(20, true));
    h.wait_for_tokens(0, prompt, 3).await;
}

/// Every circuit open: 503 with `retry-after` = time until the first circuit closes.
#[tokio::test]
async fn all_tripped_is_503_with_retry_after() {
    let h = Harness::new()
        .backend_with(
            "broken",
            "breaker = { failures = 1, window_ms = 10000, trip_ms = 8000 }",
            |m| m.fail_rate = 1.0,
        )
        .consumer("a", "")
        .start_in_process()
        .await;
    let r = h.chat("a", &body(3, false)).await;
    assert_eq!(r.status(), 502);
    let ok = eventually(Duration::from_secs(2), || async {
        let r = h.chat("a", &body(3, false)).await;
        if r.status() != 503 {
            return false;
        }
        let secs: u64 = header(&r, "retry-after");
        let ms: u64 = header(&r, "retry-after-ms");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "service_unavailable");
        (7..=8).contains(&secs) && ms > 6_000 && ms <= 8_000
    })
    .await;
    assert!(ok, "no 503 with retry-after once the only circuit opened");
    assert_eq!(
        h.mock("broken").stats().await.unwrap().requests,
        1,
        "a tripped backend was called"
    );
}

/// With `spill_utilization`, a PTU reporting high utilization sends new requests to the next
/// group before it ever answers 429.
#[tokio::test]
async fn spill_before_the_ptu_is_full() {
    let h = before_payg(Harness::new().backend_with(
        "ptu",
        "priority = 1\nspill_utilization = 0.5",
        |m| m.tpm = Some(6_000),
    ))
    .await;
    for _ in 0..60 {
        let r = h.chat("a", &body(80, false)).await;
        assert_eq!(r.status(), 200);
    }
    let ptu = h.mock("ptu").stats().await.unwrap();
    let payg = h.mock("payg").stats().await.unwrap();
    assert_eq!(ptu.rate_limited, 0, "the PTU was pushed to 429");
    assert!(
        ptu.ok > 10 && payg.ok > 10,
        "ptu {} payg {}",
        ptu.ok,
        payg.ok
    );
}

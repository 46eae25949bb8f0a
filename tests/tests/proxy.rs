//! The proxy over real sockets: both route styles against both backend kinds, streamed and
//! not, byte-exact pass-through of streamed content, usage counted right with and without the
//! client's `include_usage`, tiktoken counting when a backend reports no usage, credentials,
//! client disconnects and graceful drain.

use futures::StreamExt as _;
use serde_json::{Value, json};
use std::time::Duration;
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::{Harness, chat, client, key_for};
use tollgate_tests::{eventually, metric_sum, metrics};

fn chat_body(
    model: Option<&str>,
    stream: bool,
    include_usage: Option<bool>,
    max_tokens: u64,
) -> Value {
    let b = chat(max_tokens)
        .no_model()
        .prompt("Count the tokens of this prompt, please.")
        .system("Be brief.")
        .stream(stream);
    let b = match model {
        Some(m) => b.model(m),
        None => b,
    };
    match include_usage {
        Some(u) => b.include_usage(u),
        None => b,
    }
    .json()
}

/// Reads an SSE response into its `data:` payloads.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

/// A client on either route style reaches either backend kind: Azure backends on their
/// deployment route with their own deployment name, OpenAI backends on /v1 with the model in
/// the body; usage totals equal what the mocks served.
#[tokio::test]
async fn both_route_styles_reach_both_backend_kinds() {
    let h = Harness::new()
        .backend("az", MockOpts::default(), "api = \"azure\"\nmodels = [\"gpt-4o\"]\ndeployments = { \"gpt-4o\" = \"gpt4o-ptu-eastus\" }")
        .backend("oai", MockOpts::default(), "api = \"openai\"\nmodels = [\"gpt-4o-mini\"]\ndeployments = { \"gpt-4o-mini\" = \"vendor/mini\" }")
        .consumer("team-a", "team = \"finance\"")
        .start_in_process()
        .await;
    let c = client();
    let base = h.url(0);
    let key = key_for("team-a");
    for model in ["gpt-4o", "gpt-4o-mini"] {
        let urls = [
            (format!("{base}/v1/chat/completions"), Some(model)),
            (format!("{base}/openai/v1/chat/completions"), Some(model)),
            (
                format!(
                    "{base}/openai/deployments/{model}/chat/completions?api-version=2024-10-21"
                ),
                None,
            ),
        ];
        for (url, body_model) in urls {
            for stream in [false, true] {
                let resp = c
                    .post(&url)
                    .header("api-key", &key)
                    .json(&chat_body(body_model, stream, None, 7))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "{url} stream={stream}");
                let backend = resp.headers()["x-tollgate-backend"]
                    .to_str()
                    .unwrap()
                    .to_string();
                assert_eq!(backend, if model == "gpt-4o" { "az" } else { "oai" });
                if stream {
                    let events = sse_events(resp).await;
                    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                    let content: String = events
                        .iter()
                        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                        .filter_map(|v| {
                            v["choices"][0]["delta"]["content"]
                                .as_str()
                                .map(str::to_string)
                        })
                        .collect();
                    assert_eq!(content, tollgate_loadtest::mock::completion_text(7));
                    assert!(
                        events.iter().all(|e| !e.contains("\"usage\":{")),
                        "usage chunk leaked to a client that did not ask"
                    );
                } else {
                    let v: Value = resp.json().await.unwrap();
                    assert_eq!(v["usage"]["completion_tokens"], 7);
                }
                let m = h.mock(&backend).stats().await.unwrap();
                let last = m.last_request.unwrap();
                if model == "gpt-4o" {
                    assert_eq!(
                        last.path,
                        "/openai/deployments/gpt4o-ptu-eastus/chat/completions"
                    );
                    assert!(last.query.unwrap_or_default().contains("api-version="));
                } else {
                    assert_eq!(last.path, "/v1/chat/completions");
                    assert_eq!(last.body["model"], "vendor/mini");
                }
                if stream {
                    assert_eq!(
                        last.body["stream_options"]["include_usage"], true,
                        "gateway asks for usage"
                    );
                }
                assert!(
                    !last.headers.contains_key("api-key"),
                    "client key reached the backend"
                );
            }
        }
    }
    // Every token the mocks served is accounted, per backend.
    for name in ["az", "oai"] {
        let s = h.mock(name).stats().await.unwrap();
        assert_eq!(s.ok, 6);
        let ok = eventually(Duration::from_secs(3), || async {
            let m = metrics(&base).await;
            metric_sum(
                &m,
                "tollgate_tokens_total",
                &[("backend", name), ("type", "input")],
            ) == s.prompt_tokens
                && metric_sum(
                    &m,
                    "tollgate_tokens_total",
                    &[("backend", name), ("type", "output")],
                ) == s.completion_tokens
        })
        .await;
        assert!(ok, "{name}: metrics {} vs mock {s:?}", metrics(&base).await);
    }
}

/// A client that asked for include_usage gets the usage chunk; one that did not never sees
/// it; usage is counted right in both cases.
#[tokio::test]
async fn include_usage_is_honoured_and_counted() {
    let h = Harness::new()
        .backend("m", MockOpts::default(), "")
        .consumer("a", "")
        .start_in_process()
        .await;
    let c = client();
    let url = format!("{}/v1/chat/completions", h.url(0));
    for asked in [Some(true), Some(false), None] {
        let resp = c
            .post(&url)
            .bearer_auth(key_for("a"))
            .json(&chat_body(Some("gpt-4o"), true, asked, 5))
            .send()
            .await
            .unwrap();
        let events = sse_events(resp).await;
        let usage: Vec<Value> = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter(|v| v["usage"].is_object())
            .collect();
        if asked == Some(true) {
            assert_eq!(usage.len(), 1, "{events:?}");
            assert_eq!(usage[0]["usage"]["completion_tokens"], 5);
        } else {
            assert!(usage.is_empty(), "{events:?}");
        }
    }
    let s = h.mock("m").stats().await.unwrap();
    assert_eq!(s.completion_tokens, 15);
    let base = h.url(0);
    assert!(
        eventually(Duration::from_secs(3), || async {
            let m = metrics(&base).await;
            metric_sum(&m, "tollgate_tokens_total", &[("type", "output")]) == 15
                && metric_sum(&m, "tollgate_tokens_total", &[("type", "input")]) == s.prompt_tokens
        })
        .await
    );
}

/// A backend that reports no usage: the gateway counts prompt and streamed completion text
/// with tiktoken, and the count equals the tokens the mock generated.
#[tokio::test]
async fn counts_tokens_when_backend_reports_none() {
    let h = Harness::new()
        .backend_with("quiet", "api = \"openai\"", |m| m.no_usage = true)
        .consumer("a", "")
        .start_in_process()
        .await;
    let body = chat_body(Some("gpt-4o"), true, None, 9);
    let resp = h.chat("a", &body).await;
    let _ = resp.text().await.unwrap();
    let body2 = chat_body(Some("gpt-4o"), false, None, 4);
    let resp = h.chat("a", &body2).await;
    let v: Value = resp.json().await.unwrap();
    assert!(v.get("usage").is_none());
    let expected_prompt = count_prompt_tokens(&body) + count_prompt_tokens(&body2);
    h.wait_for_tokens(0, expected_prompt, 13).await;
}

/// Streamed bytes pass through exactly as the backend sent them — split events, CRLF lines,
/// comments, named events — except the usage-only chunk a client did not ask for.
#[tokio::test]
async fn stream_bytes_pass_through_exactly() {
    use axum::body::Body;
    const PIECES: [&str; 7] = [
        ": keep-alive\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel",
        "lo\"}}],\"usage\":null}\n\n",
        "event: message\r\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wörld\"}}],\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14}}\n\n",
        "data: [DONE]\n\n",
    ];
    let seen = std::sync::Arc::new(parking_lot_like::Mutex::default());
    let seen2 = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: String| {
            let seen = seen2.clone();
            async move {
                *seen.lock().unwrap() = body;
                let s = futures::stream::iter(PIECES).then(|p| async move {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(p.as_bytes()))
                });
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(s))
                    .unwrap()
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[consumers]]\nid = \"a\"\nkey_sha256 = [\"{}\"]\n[[backends]]\nname = \"raw\"\nurl = \"http://{addr}\"\napi = \"openai\"\nmodels = [\"gpt-4o\"]\n",
        tollgate_common::key_hash(&key_for("a"))
    );
    let gw =
        tollgate_tests::Gateway::in_process(tollgate_common::Config::from_toml(&toml).unwrap())
            .await
            .unwrap();
    let c = client();
    let all: String = PIECES.concat();
    let usage_event = PIECES[5];
    for asked in [true, false] {
        let resp = c
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth(key_for("a"))
            .json(&chat_body(Some("gpt-4o"), true, asked.then_some(true), 3))
            .send()
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        let want = if asked {
            all.clone()
        } else {
            all.replace(usage_event, "")
        };
        assert_eq!(String::from_utf8(got).unwrap(), want, "asked={asked}");
        let sent: Value = serde_json::from_str(&seen.lock().unwrap()).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }
    let base = gw.url();
    assert!(
        eventually(Duration::from_secs(3), || async {
            let m = metrics(&base).await;
            metric_sum(&m, "tollgate_tokens_total", &[("type", "output")]) == 6
                && metric_sum(&m, "tollgate_tokens_total", &[("type", "input")]) == 22
        })
        .await
    );
}

mod parking_lot_like {
    pub type Mutex<T> = std::sync::Mutex<T>;
}

/// Embeddings, completions and the Responses API (whose stream reports usage in
/// `response.completed`) are forwarded and counted.
#[tokio::test]
async fn embeddings_completions_responses() {
    let h = Harness::new()
        .backend("m", MockOpts::default(), "api = \"openai\"")
        .consumer("a", "")
        .start_in_process()
        .await;
    let c = client();
    let base = h.url(0);
    let k = key_for("a");
    let r = c
        .post(format!("{base}/v1/embeddings"))
        .bearer_auth(&k)
        .json(&json!({"model": "text-embedding-3-small", "input": ["one two", "three"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let r = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth(&k)
        .json(&json!({"model": "gpt-4o", "prompt": "Say this", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.post(format!("{base}/v1/responses")).bearer_auth(&k)
        .json(&json!({"model": "gpt-4o", "input": "hi there", "max_output_tokens": 4, "stream": true})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("response.completed"), "{text}");
    let r = c
        .post(format!("{base}/v1/responses"))
        .bearer_auth(&k)
        .json(&json!({"model": "gpt-4o", "input": "hi there", "max_output_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = h.mock("m").stats().await.unwrap();
    assert_eq!(s.ok, 4);
    h.wait_for_tokens(0, s.prompt_tokens, s.completion_tokens)
        .await;
}

/// A client that disconnects mid-stream cancels the backend call, and the tokens already
/// streamed are settled.
#[tokio::test]
async fn disconnect_cancels_backend_and_settles() {
    let h = Harness::new()
        .backend_with("slow", "", |m| m.tokens_per_sec = Some(50.0))
        .consumer("a", "")
        .start_in_process()
        .await;
    let base = h.url(0);
    let resp = h
        .chat("a", &chat_body(Some("gpt-4o"), true, None, 500))
        .await;
    let mut s = resp.bytes_stream();
    let mut seen = 0;
    while seen < 4 {
        let chunk = s.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    drop(s);
    let mock = h.mock("slow");
    assert!(
        eventually(Duration::from_secs(3), || async {
            mock.stats().await.unwrap().in_flight == 0
        })
        .await,
        "backend call still running after the client left"
    );
    let stats = mock.stats().await.unwrap();
    assert!(
        stats.completion_tokens < 100,
        "backend kept generating: {stats:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            let m = metrics(&base).await;
            let out = metric_sum(&m, "tollgate_tokens_total", &[("type", "output")]);
            (3..100).contains(&out)
        })
        .await,
        "{}",
        metrics(&base).await
    );
}

/// Backend credentials come from the environment and are injected; the client's credential
/// headers never reach the backend (real gateway process).
#[tokio::test]
async fn backend_credentials_injected_client_credentials_stripped() {
    let h = Harness::new()
        .backend("az", MockOpts::default(), "api = \"azure\"\nmodels = [\"gpt-4o\"]\nauth = { type = \"api_key\", key_env = \"AZ_KEY\" }")
        .backend("oai", MockOpts::default(), "api = \"openai\"\nmodels = [\"gpt-4o-mini\"]\nauth = { type = \"bearer\", token_env = \"OAI_TOKEN\" }")
        .consumer("a", "")
        .env("AZ_KEY", "backend-secret-az")
        .env("OAI_TOKEN", "backend-secret-oai")
        .start()
        .await
        .unwrap();
    let c = client();
    for (model, header) in [
        ("gpt-4o", "api-key"),
        ("gpt-4o-mini", "ocp-apim-subscription-key"),
    ] {
        let r = c
            .post(format!("{}/v1/chat/completions", h.url(0)))
            .header(header, key_for("a"))
            .header("cookie", "session=abc")
            .json(&chat_body(Some(model), false, None, 2))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = h.chat("a", &chat_body(Some(model), false, None, 2)).await;
        assert_eq!(r.status(), 200);
    }
    let az = h.mock("az").stats().await.unwrap();
    assert_eq!(
        az.auth_seen.get("api-key").cloned().unwrap_or_default(),
        vec!["backend-secret-az".to_string()]
    );
    assert!(
        az.auth_seen
            .get("authorization")
            .is_none_or(|v| v.is_empty()),
        "{az:?}"
    );
    let oai = h.mock("oai").stats().await.unwrap();
    assert_eq!(
        oai.auth_seen
            .get("authorization")
            .cloned()
            .unwrap_or_default(),
        vec!["Bearer backend-secret-oai".to_string()]
    );
    assert!(
        oai.auth_seen
            .get("ocp-apim-subscription-key")
            .is_none_or(|v| v.is_empty()),
        "{oai:?}"
    );
    let last = oai.last_request.clone().unwrap();
    assert!(!last.headers.contains_key("cookie"));
    let client_key = key_for("a");
    for s in [&az, &oai] {
        let all = serde_json::to_string(&s.auth_seen).unwrap();
        assert!(!all.contains(&client_key), "client key reached a backend");
    }
    let log = h.gateways[0].log_text();
    assert!(
        !log.contains("backend-secret") && !log.contains(&client_key),
        "secret in log:\n{log}"
    );
}

/// SIGTERM lets an in-flight stream finish, then the process exits and its usage is counted.
#[tokio::test]
async fn sigterm_drains_streams() {
    let mut h = Harness::new()
        .backend_with("slow", "", |m| m.tokens_per_sec = Some(40.0))
        .consumer("a", "")
        .start()
        .await
        .unwrap();
    let resp = h
        .chat("a", &chat_body(Some("gpt-4o"), true, None, 40))
        .await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move { sse_events(resp).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    h.gateways[0].terminate().await.unwrap();
    let events = reader.await.unwrap();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream cut by shutdown"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "exited before the stream ended"
    );
    assert_eq!(h.mock("slow").stats().await.unwrap().completion_tokens, 40);
}

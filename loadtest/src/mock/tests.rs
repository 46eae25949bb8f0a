//! Real-socket tests of the mock: each starts it on `127.0.0.1:0` in-process and talks to it
//! with reqwest, checking the shapes and numbers the gateway relies on.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::*;

/// A mock running on a free port until dropped.
struct Running {
    base: String,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

async fn start(opts: MockOpts) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, opts, async move {
        let _ = stopped.await;
    }));
    Running {
        base,
        client: reqwest::Client::new(),
        _stop: stop,
    }
}

impl Running {
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn stats(&self) -> Stats {
        let url = format!("{}/stats", self.base);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn chat(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Say hello to the quick brown fox."}],
        "max_tokens": 7,
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect()
}

/// A non-streamed chat answer reports prompt tokens by the documented rule and max_tokens.
#[tokio::test]
async fn chat_usage_is_exact() {
    let mock = start(MockOpts::default()).await;
    let body = chat(false, false);
    let response = mock.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let prompt = count_prompt_tokens(&body);
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "gpt-4o");
    assert_eq!(answer["usage"]["prompt_tokens"], prompt);
    assert_eq!(answer["usage"]["completion_tokens"], 7);
    assert_eq!(answer["usage"]["total_tokens"], prompt + 7);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(count_tokens(content), 7);
}

/// A stream with include_usage ends with a `choices: []` usage chunk and then `[DONE]`.
#[tokio::test]
async fn stream_with_include_usage_has_usage_chunk() {
    let mock = start(MockOpts::default()).await;
    let body = chat(true, true);
    let response = mock.post("/v1/chat/completions", &body).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let frames = sse_data(&text);
    assert_eq!(frames.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(count_tokens(&content), 7);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"],
        count_prompt_tokens(&body)
    );
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
}

/// Without include_usage a stream carries no usage at all.
#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let mock = start(MockOpts::default()).await;
    let text = mock
        .post("/v1/chat/completions", &chat(true, false))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert_eq!(sse_data(&text).last(), Some(&"[DONE]"));
}

/// Azure deployment routes report the deployment as the model and require api-version.
#[tokio::test]
async fn azure_route_reports_deployment() {
    let mock = start(MockOpts::default()).await;
    let path = "/openai/deployments/gpt4o-ptu/chat/completions?api-version=2024-10-21";
    let answer: Value = mock
        .post(path, &chat(false, false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "gpt4o-ptu");
    let missing = "/openai/deployments/gpt4o-ptu/chat/completions";
    assert_eq!(mock.post(missing, &chat(false, false)).await.status(), 400);
    let stats = mock.stats().await;
    assert_eq!(stats.by_model["gpt4o-ptu"].requests, 1);
    assert_eq!(stats.last_request.unwrap().query, None);
}

/// Once the TPM bucket is spent the mock answers 429 with retry-after-ms and retry-after.
#[tokio::test]
async fn tpm_bucket_answers_429() {
    let mock = start(MockOpts {
        tpm: Some(100),
        ..MockOpts::default()
    })
    .await;
    let body = json!({"model": "m", "prompt": completion_text(10), "max_tokens": 40});
    let first = mock.post("/v1/completions", &body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["azure-openai-deployment-utilization"],
        "50.0%"
    );
    assert_eq!(first.headers()["x-ratelimit-remaining-tokens"], "50");
    assert_eq!(mock.post("/v1/completions", &body).await.status(), 200);
    let limited = mock.post("/v1/completions", &body).await;
    assert_eq!(limited.status(), 429);
    let retry_ms: u64 = limited.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 50 tokens at 100/60 per second take ~30 s; a little has refilled since.
    assert!((29_000..=30_000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(limited.headers()["retry-after"], "30");
    let error: Value = limited.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_exceeded");
    assert_eq!(mock.stats().await.rate_limited, 1);
}

/// `/stats` counts requests, outcomes, tokens, paths and credentials, and resets.
#[tokio::test]
async fn stats_add_up() {
    let mock = start(MockOpts {
        name: "ptu-1".into(),
        ..MockOpts::default()
    })
    .await;
    let body = chat(false, false);
    let prompt = count_prompt_tokens(&body);
    for key in ["k1", "k2", "k1"] {
        let url = format!("{}/v1/chat/completions", mock.base);
        let response = mock
            .client
            .post(url)
            .header("api-key", key)
            .json(&body)
            .send()
            .await;
        assert_eq!(response.unwrap().status(), 200);
    }
    let text = mock
        .post("/v1/chat/completions", &chat(true, false))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let url = format!("{}/v1/chat/completions", mock.base);
    let bad = mock
        .client
        .post(url)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        mock.post("/v1/embeddings", &json!({"input": "x"}))
            .await
            .status(),
        400
    );

    let stats = mock.stats().await;
    assert_eq!(stats.name, "ptu-1");
    assert_eq!(
        (stats.requests, stats.ok, stats.bad_request, stats.streams),
        (6, 4, 2, 1)
    );
    assert_eq!(stats.prompt_tokens, 4 * prompt);
    assert_eq!(stats.completion_tokens, 4 * 7);
    assert_eq!(stats.total_tokens, 4 * (prompt + 7));
    assert_eq!(
        stats.by_model["gpt-4o"],
        ModelStats {
            requests: 4,
            prompt_tokens: 4 * prompt,
            completion_tokens: 28
        }
    );
    assert_eq!(stats.paths["/v1/chat/completions"], 5);
    assert_eq!(stats.auth_seen["api-key"], ["k1", "k2"]);
    assert_eq!(stats.last_request.unwrap().path, "/v1/embeddings");
    assert!(stats.max_concurrency >= 1);
    assert_eq!(stats.in_flight, 0);

    mock.client
        .post(format!("{}/stats/reset", mock.base))
        .send()
        .await
        .unwrap();
    let stats = mock.stats().await;
    assert_eq!((stats.requests, stats.total_tokens), (0, 0));
}

/// A Responses API stream sends deltas and ends with response.completed carrying usage.
#[tokio::test]
async fn responses_stream_ends_with_completed_usage() {
    let mock = start(MockOpts::default()).await;
    let body = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hi there",
                      "max_output_tokens": 5, "stream": true});
    let text = mock
        .post("/v1/responses", &body)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.starts_with("event: response.created\n"));
    assert!(!text.contains("[DONE]"));
    let events: Vec<Value> = sse_data(&text)
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let deltas = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .count();
    assert_eq!(deltas, 5);
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(
        completed["response"]["usage"]["input_tokens"],
        count_prompt_tokens(&body)
    );
    assert_eq!(completed["response"]["usage"]["output_tokens"], 5);
}

/// Embeddings answer one vector per input and usage without completion tokens; no_usage drops it.
#[tokio::test]
async fn embeddings_shape_and_no_usage() {
    let mock = start(MockOpts::default()).await;
    let body = json!({"model": "text-embedding-3-small", "input": ["a b", "c"]});
    let answer: Value = mock
        .post("/openai/v1/embeddings", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        answer["data"][1]["embedding"].as_array().unwrap().len(),
        DEFAULT_DIMENSIONS
    );
    assert_eq!(answer["usage"]["prompt_tokens"], count_prompt_tokens(&body));

    let quiet = start(MockOpts {
        no_usage: true,
        ..MockOpts::default()
    })
    .await;
    let answer: Value = quiet
        .post("/v1/chat/completions", &chat(false, false))
        .await
        .json()
        .await
        .unwrap();
    assert!(answer.get("usage").is_none());
}

/// Each embedding is the bag-of-words vector of its own input text ([`embed`]), in the
/// requested `dimensions`, as floats or base64; a bad `dimensions` is a 400.
#[tokio::test]
async fn embeddings_embed_the_input_text() {
    let mock = start(MockOpts::default()).await;
    let texts = [
        "What is the capital of France?",
        "the capital of France is what",
        "Sales report",
    ];
    let body = json!({"model": "text-embedding-3-small", "input": texts, "dimensions": 64});
    let answer: Value = mock
        .post("/v1/embeddings", &body)
        .await
        .json()
        .await
        .unwrap();
    let vectors: Vec<Vec<f32>> = (0..3)
        .map(|i| serde_json::from_value(answer["data"][i]["embedding"].clone()).unwrap())
        .collect();
    for (v, text) in vectors.iter().zip(texts) {
        assert_eq!(*v, embed(text, 64));
    }
    assert!(
        cosine_distance(&vectors[0], &vectors[1]) < 1e-6,
        "same words"
    );
    assert!(cosine_distance(&vectors[0], &vectors[2]) > 0.5);
    assert_eq!(answer["usage"]["prompt_tokens"], count_prompt_tokens(&body));

    let b64 = json!({"model": "m", "input": texts[0], "encoding_format": "base64"});
    let answer: Value = mock
        .post("/v1/embeddings", &b64)
        .await
        .json()
        .await
        .unwrap();
    let encoded = answer["data"][0]["embedding"].as_str().unwrap();
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).unwrap();
    assert_eq!(bytes.len(), DEFAULT_DIMENSIONS * 4);
    let first = f32::from_le_bytes(bytes[..4].try_into().unwrap());
    assert_eq!(first, embed(texts[0], DEFAULT_DIMENSIONS)[0]);

    let bad = json!({"model": "m", "input": "x", "dimensions": 0});
    let r = mock.post("/v1/embeddings", &bad).await;
    assert_eq!(r.status(), 400);
}

/// fail_mid_stream_after breaks the connection mid-body and counts only the tokens sent.
#[tokio::test]
async fn fail_mid_stream_aborts_and_counts_sent_tokens() {
    let mock = start(MockOpts {
        fail_mid_stream_after: Some(3),
        ..MockOpts::default()
    })
    .await;
    let response = mock.post("/v1/chat/completions", &chat(true, true)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.text().await.is_err(),
        "the body should end with an error"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = mock.stats().await;
    assert_eq!(stats.completion_tokens, 3);
    assert_eq!(stats.in_flight, 0);
}

/// A hanging mock never answers, and releases the request once the client gives up.
#[tokio::test]
async fn hang_holds_until_client_leaves() {
    let mock = start(MockOpts {
        hang: true,
        ..MockOpts::default()
    })
    .await;
    let url = format!("{}/v1/chat/completions", mock.base);
    let request = mock
        .client
        .post(url)
        .timeout(Duration::from_millis(200))
        .json(&chat(false, false));
    assert!(request.send().await.unwrap_err().is_timeout());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = mock.stats().await;
    assert_eq!((stats.requests, stats.ok, stats.in_flight), (1, 0, 0));
}

/// Pacing: tokens_per_sec and ttft_ms set how long a stream takes.
#[tokio::test]
async fn stream_is_paced() {
    let opts = MockOpts {
        ttft_ms: 100,
        tokens_per_sec: Some(50.0),
        ..MockOpts::default()
    };
    let mock = start(opts).await;
    let started = std::time::Instant::now();
    let text = mock
        .post("/v1/chat/completions", &chat(true, false))
        .await
        .text()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(text.ends_with("data: [DONE]\n\n"));
    // 100 ms to the first token, then 6 gaps of 20 ms.
    assert!(elapsed >= Duration::from_millis(215), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
}

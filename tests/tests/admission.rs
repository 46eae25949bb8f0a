//! Exact admission whatever the client sends: every billed input counts against the limits
//! (tool definitions, images, content arrays), what cannot be classified is refused, answers
//! the client left uncapped are capped at what was reserved, a stream cut before its usage
//! chunk is settled from the whole estimate, and a consumer whose quota is spent is refused
//! before its prompt costs the gateway any tokenizing.

use serde_json::{Value, json};
use tollgate_loadtest::mock::{MockOpts, count_prompt_tokens};
use tollgate_tests::{Harness, Running, client, header, key_for};

/// `n` function definitions that OpenAI renders to about 40 tokens each.
fn tools(n: usize) -> Value {
    let fs: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "function", "function": {
                "name": format!("lookup_record_{i}"),
                "description": "Looks up a customer record by its identifier and returns the \
                    account details, the open orders and the last invoices of that customer.",
                "parameters": {"type": "object", "properties": {
                    "id": {"type": "string", "description": "The customer identifier"},
                    "region": {"type": "string", "enum": ["emea", "amer", "apac"],
                        "description": "Where the record lives"}},
                    "required": ["id"]}}})
        })
        .collect();
    Value::Array(fs)
}

/// One default mock backend `m` and `consumers` (id, TOML), started in process.
async fn with_m(consumers: &[(&str, &str)]) -> Running {
    let mut h = Harness::new().backend("m", MockOpts::default(), "");
    for (id, toml) in consumers {
        h = h.consumer(id, toml);
    }
    h.start_in_process().await
}

async fn post(h: &Running, consumer: &str, body: &Value) -> reqwest::Response {
    h.chat(consumer, body).await
}

/// Requests carrying tool definitions are admitted on their whole cost: 24 concurrent
/// requests against a 5,000-token quota are billed at most the quota by a backend that bills
/// tools as OpenAI does (before, all 24 were admitted and billed ~6× the quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_definitions_count_against_limits() {
    const Q: u64 = 5_000;
    let h = Harness::new()
        .redis()
        .backend("m", MockOpts::default(), "")
        .consumer(
            "tools",
            &format!("tpm = 2000\nquota = {Q}\nquota_period = \"day\""),
        )
        .start()
        .await
        .unwrap();
    let body = json!({"model": "gpt-4o", "max_tokens": 20, "tools": tools(24),
        "messages": [{"role": "user", "content": "Find customer 42."}]});
    let billed = count_prompt_tokens(&body) + 20;
    assert!(billed > 900, "each request bills {billed}");
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (h_url, body) = (h.url(0), body.clone());
        tasks.push(tokio::spawn(async move {
            client()
                .post(format!("{h_url}/v1/chat/completions"))
                .bearer_auth(key_for("tools"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let served = h.mock("m").stats().await.unwrap();
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(served.ok, ok);
    assert!(ok >= 1, "{statuses:?}");
    assert!(
        served.total_tokens <= Q,
        "billed {} against a quota of {Q}: {statuses:?}",
        served.total_tokens
    );
    assert!(
        statuses.iter().all(|s| [200, 403, 429].contains(s)),
        "{statuses:?}"
    );
}

/// Images count at their tile cost: two linked images (size unknown: the most an image can
/// cost, 1,445 tokens each) do not fit a 2,000-token quota; one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_count_against_limits() {
    let h = with_m(&[("img", "quota = 2000\nquota_period = \"day\"")]).await;
    let image = json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}});
    let body = |n: usize| {
        let mut parts = vec![json!({"type": "text", "text": "What is in these?"})];
        parts.extend(std::iter::repeat_n(image.clone(), n));
        json!({"model": "gpt-4o", "max_tokens": 10,
            "messages": [{"role": "user", "content": parts}]})
    };
    let r = post(&h, "img", &body(2)).await;
    assert_eq!(r.status(), 403, "{}", r.text().await.unwrap());
    let r = post(&h, "img", &body(1)).await;
    assert_eq!(r.status(), 200);
    // What is left reflects the whole estimate, not the text alone.
    let left: u64 = header(&r, "x-quota-remaining-tokens");
    assert!(left <= 2000 - 1445, "{left}");
}

/// Prompts that cannot be classified are refused before anything is reserved or forwarded:
/// a content array holding a bare string (estimated at almost nothing before, and forwarded),
/// deep nesting, messages that are not objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclassifiable_prompts_are_refused() {
    let h = with_m(&[("odd", "quota = 100000\nquota_period = \"day\"")]).await;
    let big = "tokens ".repeat(20_000);
    let mut deep = json!("x");
    for _ in 0..200 {
        deep = json!([deep]);
    }
    for messages in [
        json!([{"role": "user", "content": [{"type": "text", "text": big}, "x"]}]),
        json!([{"role": "user", "content": deep}]),
        json!([[{"role": "user", "content": "hi"}]]),
        json!([{"role": "user", "content": 42}]),
    ] {
        let r = post(&h, "odd", &json!({"model": "gpt-4o", "messages": messages})).await;
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert_eq!(e["error"]["param"], "messages", "{e}");
    }
    assert_eq!(h.mock("m").stats().await.unwrap().requests, 0);
}

/// A client that sets no output limit gets the reserved output as its cap: a backend that
/// would write 4,000 tokens writes `limits.default_max_tokens`, so a quota holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncapped_answers_are_capped_at_the_reservation() {
    const Q: u64 = 5_000;
    let h = Harness::new()
        .backend_with("m", "", |m| m.default_completion_tokens = 4_000)
        .consumer("cap", &format!("quota = {Q}\nquota_period = \"day\""))
        .consumer("free", "")
        .config("[limits]\ndefault_max_tokens = 500")
        .start_in_process()
        .await;
    let chat =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Write a lot."}]});
    let mut ok = 0;
    for _ in 0..12 {
        let r = post(&h, "cap", &chat).await;
        if r.status() == 200 {
            ok += 1;
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 500, "{v}");
        }
    }
    assert!(ok >= 8, "{ok}");
    let stats = h.mock("m").stats().await.unwrap();
    assert!(stats.total_tokens <= Q, "served {}", stats.total_tokens);
    let sent = &stats.last_request.unwrap().body;
    assert_eq!(sent["max_completion_tokens"], 500, "{sent}");
    // Completions and responses get their own field.
    let r = h
        .post(
            0,
            "free",
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "hi"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let sent = h.mock("m").last_body().await;
    assert_eq!(sent["max_output_tokens"], 500, "{sent}");
    // A client's own limit is left as it is.
    let r = post(
        &h,
        "free",
        &json!({"model": "gpt-4o", "max_tokens": 7, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let sent = h.mock("m").last_body().await;
    assert_eq!(sent["max_tokens"], 7);
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");
}

/// A stream cut before its usage chunk is settled from the whole estimate (tools included),
/// never below what the backend billed for the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_stream_is_settled_from_the_whole_estimate() {
    let h = Harness::new()
        .redis()
        .backend_with("m", "", |m| m.fail_mid_stream_after = Some(2))
        .consumer("cut", "")
        .start()
        .await
        .unwrap();
    let body = json!({"model": "gpt-4o", "max_tokens": 50, "stream": true, "tools": tools(30),
        "messages": [{"role": "user", "content": "Find customer 7."}]});
    let r = post(&h, "cut", &body).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await; // the stream breaks
    let billed_prompt = h.mock("m").stats().await.unwrap().prompt_tokens;
    assert!(billed_prompt > 1_000, "{billed_prompt}");
    let mut input = 0;
    let recorded = tollgate_tests::eventually(std::time::Duration::from_secs(10), || {
        let report = h.usage("consumer").unwrap();
        input = report["rows"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|r| r["input_tokens"].as_u64())
            .unwrap_or(0);
        async move { input > 0 }
    })
    .await;
    assert!(recorded, "no usage recorded");
    assert!(
        input >= billed_prompt,
        "recorded {input} prompt tokens, the backend billed {billed_prompt}"
    );
}

/// A consumer whose quota this replica just saw spent is refused before its prompt is
/// tokenized: a 3 MB prompt costs no tokenizing (the estimate metric does not move), while a
/// consumer with quota left is tokenized as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_quota_is_refused_before_tokenizing() {
    let h = with_m(&[
        ("spent", "quota = 100\nquota_period = \"day\""),
        ("fine", ""),
    ])
    .await;
    let tokenized = || async {
        tollgate_tests::metric_value(
            &tollgate_tests::metrics(&h.url(0)).await,
            "tollgate_estimate_text_bytes_total",
        )
    };
    let small = json!({"model": "gpt-4o", "max_tokens": 200,
        "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&h, "spent", &small).await.status(), 403);
    let before = tokenized().await;
    let huge = json!({"model": "gpt-4o", "max_tokens": 1,
        "messages": [{"role": "user", "content": "a".repeat(3 << 20)}]});
    let r = post(&h, "spent", &huge).await;
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "quota_exceeded", "{e}");
    assert_eq!(
        tokenized().await,
        before,
        "the refused prompt was tokenized"
    );
    // Another consumer's prompt of the same size is counted (in linear time).
    let r = post(&h, "fine", &huge).await;
    assert_eq!(r.status(), 200);
    assert!(tokenized().await >= before + (3 << 20));
}

//! The answer cache end to end: exact hits on the memory store (JSON and replayed streams,
//! `include_usage` on and off), `Cache-Control`, what is never cached or stored, partitions
//! by team, TTL; and on a real Valkey with the RediSearch module and three gateway processes:
//! an entry stored through one replica is a hit on another, paraphrases hit, near-misses with
//! other numbers or negations are refused, an unreachable embeddings backend only bypasses,
//! savings reach `tollgate usage`; a Redis without the module refuses semantic mode at start.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Harness, RedisServer, Running, Valkey, client, key_for, metric_sum, metrics};

/// The harness's chat body with a system message and this user prompt.
fn chat(prompt: &str) -> Value {
    tollgate_tests::chat(12)
        .prompt(prompt)
        .system("Answer briefly.")
        .json()
}

async fn post(
    base: &str,
    consumer: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = client()
        .post(format!("{base}/v1/chat/completions"))
        .header("api-key", key_for(consumer))
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn cache_header(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Reads a replayed stream: its content, whether it had a usage chunk, and that it ended.
fn read_stream(text: &str) -> (String, Option<Value>, bool) {
    let mut content = String::new();
    let mut usage = None;
    let mut done = false;
    for ev in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = ev.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if !v["usage"].is_null() && v.get("usage").is_some() {
            usage = Some(v["usage"].clone());
        }
    }
    (content, usage, done)
}

/// Repeats the request until it is a hit (entries are written off the request path).
async fn until_hit(base: &str, consumer: &str, body: &Value) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post(base, consumer, body, &[]).await;
        if cache_header(&r) == "hit" {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "never a hit: {}",
            cache_header(&r)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn mock_requests(h: &Running, name: &str) -> u64 {
    h.mock(name).stats().await.unwrap().requests
}

/// `h` with a default mock backend `ptu`, consumer `app` of team `support` and the
/// `cache` TOML, started in process.
async fn support_app(h: Harness, cache: &str) -> Running {
    h.backend("ptu", MockOpts::default(), "")
        .consumer("app", "team = \"support\"")
        .config(cache)
        .start_in_process()
        .await
}

const EXACT: &str = "[[cache]]\nname = \"faq\"\nttl_s = 60\n";

/// An identical request (whitespace aside) is answered from the cache without reaching the
/// backend, as JSON with a fresh id and as a stream with and without `include_usage`; a
/// streamed miss is stored once complete and served to a JSON client.
#[tokio::test]
async fn exact_hits_replay_json_and_streams() {
    let h = support_app(Harness::new(), EXACT).await;
    let base = h.url(0);
    let first = post(&base, "app", &chat("How do I reset my password?"), &[]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(cache_header(&first), "miss");
    let first: Value = first.json().await.unwrap();
    // The entry is written off the request path.
    let again = chat("How  do I reset my password? ");
    let hit: Value = until_hit(&base, "app", &again).await.json().await.unwrap();
    assert_eq!(
        hit["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    assert_eq!(hit["usage"], first["usage"]);
    assert_ne!(hit["id"], first["id"], "a hit gets a fresh id");
    let served = mock_requests(&h, "ptu").await;

    for include_usage in [false, true] {
        let mut body = again.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": include_usage});
        let r = post(&base, "app", &body, &[]).await;
        assert_eq!(cache_header(&r), "hit");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let (content, usage, done) = read_stream(&r.text().await.unwrap());
        assert!(done, "the replay ends with [DONE]");
        assert_eq!(
            content,
            first["choices"][0]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(
            usage.is_some(),
            include_usage,
            "usage chunk only when asked"
        );
        if include_usage {
            assert_eq!(usage.unwrap(), first["usage"]);
        }
    }
    assert_eq!(
        mock_requests(&h, "ptu").await,
        served,
        "hits never reach the backend"
    );

    // A streamed miss is assembled and stored; a JSON client then hits it.
    let mut streamed = chat("What are your opening hours?");
    streamed["stream"] = json!(true);
    let r = post(&base, "app", &streamed, &[]).await;
    assert_eq!(cache_header(&r), "miss");
    let (content, _, done) = read_stream(&r.text().await.unwrap());
    assert!(done);
    let plain = chat("What are your opening hours?");
    let got: Value = until_hit(&base, "app", &plain).await.json().await.unwrap();
    assert_eq!(got["choices"][0]["message"]["content"], json!(content));
    assert_eq!(got["object"], "chat.completion");

    let m = metrics(&base).await;
    assert!(
        metric_sum(
            &m,
            "tollgate_cache_requests_total",
            &[("cache", "faq"), ("result", "hit")]
        ) >= 4
    );
    assert!(metric_sum(&m, "tollgate_cache_tokens_saved_total", &[("cache", "faq")]) > 0);
}

/// `Cache-Control: no-cache` skips the lookup (the backend answers), `no-store` keeps the
/// answer out; `n > 1`, tools and a high temperature are never cached; a changed parameter
/// or system message is another entry; the entry expires after `ttl_s`.
#[tokio::test]
async fn what_is_never_served_or_stored() {
    let h = support_app(Harness::new(), "[[cache]]\nname = \"faq\"\nttl_s = 2\n").await;
    let base = h.url(0);
    let body = chat("Where is my parcel?");
    // no-store: answered, not kept.
    let r = post(&base, "app", &body, &[("cache-control", "no-store")]).await;
    assert_eq!(cache_header(&r), "miss");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cache_header(&post(&base, "app", &body, &[]).await), "miss");
    until_hit(&base, "app", &body).await;
    // no-cache: the backend answers although an entry exists.
    let before = mock_requests(&h, "ptu").await;
    let r = post(&base, "app", &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(cache_header(&r), "bypass");
    assert_eq!(mock_requests(&h, "ptu").await, before + 1);

    // Answer-changing parameters and the system message are part of the key.
    let mut warmer = body.clone();
    warmer["temperature"] = json!(0.5);
    assert_eq!(
        cache_header(&post(&base, "app", &warmer, &[]).await),
        "miss"
    );
    let mut system = body.clone();
    system["messages"][0]["content"] = json!("Answer in French.");
    assert_eq!(
        cache_header(&post(&base, "app", &system, &[]).await),
        "miss"
    );

    // Never cached.
    for (k, v) in [
        ("n", json!(2)),
        ("temperature", json!(1.2)),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}]),
        ),
    ] {
        let mut b = body.clone();
        b[k] = v;
        for _ in 0..2 {
            let r = post(&base, "app", &b, &[]).await;
            assert_eq!(r.status(), 200);
            assert_eq!(cache_header(&r), "bypass", "{k}");
        }
    }

    // TTL: the entry is gone after ttl_s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(cache_header(&post(&base, "app", &body, &[]).await), "miss");
}

/// With the default `vary_by = ["team"]`, two teams asking the same thing never share an
/// entry; two consumers of one team do.
#[tokio::test]
async fn teams_never_share_entries() {
    let h = Harness::new()
        .backend("ptu", MockOpts::default(), "")
        .consumer("a1", "team = \"alpha\"")
        .consumer("a2", "team = \"alpha\"")
        .consumer("b1", "team = \"beta\"")
        .config(EXACT)
        .start_in_process()
        .await;
    let base = h.url(0);
    let body = chat("What is the refund policy?");
    assert_eq!(cache_header(&post(&base, "a1", &body, &[]).await), "miss");
    until_hit(&base, "a2", &body).await;
    // Alpha's entry is there (a2 hit it), yet beta's first ask goes to the backend.
    let before = mock_requests(&h, "ptu").await;
    assert_eq!(cache_header(&post(&base, "b1", &body, &[]).await), "miss");
    assert_eq!(mock_requests(&h, "ptu").await, before + 1);
    // ...and from then on beta has its own entry.
    until_hit(&base, "b1", &body).await;
}

/// A stream cut mid-way by the backend is never stored: the next identical request misses.
#[tokio::test]
async fn a_cut_stream_is_not_stored() {
    let h = Harness::new()
        .backend(
            "ptu",
            MockOpts {
                fail_mid_stream_after: Some(2),
                ..MockOpts::default()
            },
            "",
        )
        .consumer("app", "")
        .config(EXACT)
        .start_in_process()
        .await;
    let base = h.url(0);
    let mut body = chat("Tell me a long story about the sea.");
    body["max_tokens"] = json!(50);
    body["stream"] = json!(true);
    for _ in 0..3 {
        let r = post(&base, "app", &body, &[]).await;
        assert_eq!(cache_header(&r), "miss");
        let _ = r.text().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = metrics(&base).await;
    assert_eq!(
        metric_sum(&m, "tollgate_cache_stores_total", &[("result", "stored")]),
        0
    );
}

fn semantic(threshold: f64, emb_url_backend: &str) -> String {
    format!(
        "[[cache]]\nname = \"faq\"\nmode = \"semantic\"\nscore_threshold = {threshold}\n\
         ttl_s = 600\nignore_system_messages = true\nembeddings_backend = \"{emb_url_backend}\"\n\
         embeddings_model = \"text-embedding-3-small\"\nlookup_timeout_ms = 2000\n"
    )
}

/// Three replicas on one Valkey with RediSearch: an entry stored through replica 1 is a hit
/// on replica 3 within 100 ms; paraphrases hit (with their distance), near-misses with another
/// number or a negation are refused; the savings reach `tollgate usage`.
#[tokio::test]
async fn semantic_cache_shared_by_three_replicas() {
    let valkey = Valkey::start_search().unwrap();
    let h = Harness::new()
        .store(&format!("kind = \"redis\"\nurl = \"{}\"", valkey.url()))
        .backend(
            "ptu",
            MockOpts::default(),
            "price = { input_per_1m = 2.5, output_per_1m = 10.0 }",
        )
        .consumer("app", "team = \"support\"")
        .config(&semantic(0.3, "ptu"))
        .gateways(3)
        .start()
        .await
        .unwrap();
    // The first semantic store creates the index: not what this test times.
    let warm = chat("Warm up the vector index");
    post(&h.url(0), "app", &warm, &[]).await;
    until_hit(&h.url(0), "app", &warm).await;
    let q = chat("How do I reset my account password?");
    let r = post(&h.url(0), "app", &q, &[]).await;
    assert_eq!(cache_header(&r), "miss");
    let first: Value = r.json().await.unwrap();
    // Stored off the path; then visible to replica 3 at once.
    let stored = Instant::now();
    let mut seen = None;
    while stored.elapsed() < Duration::from_secs(5) {
        let r = post(&h.url(2), "app", &q, &[]).await;
        if cache_header(&r) == "hit" {
            seen = Some(stored.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = seen.expect("replica 3 never hit the entry replica 1 stored");
    assert!(seen < Duration::from_millis(100), "{seen:?}");
    // Exactly: once stored, each replica hits on its first try.
    for g in 0..3 {
        let t = Instant::now();
        let r = post(&h.url(g), "app", &q, &[]).await;
        assert_eq!(cache_header(&r), "hit", "replica {g}");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
    }

    // A paraphrase sharing most words: a semantic hit with its distance.
    let para = chat("how can I reset my account password");
    let r = post(&h.url(1), "app", &para, &[]).await;
    assert_eq!(cache_header(&r), "hit");
    let d: f64 = r.headers()["x-tollgate-cache-distance"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(d > 0.0 && d <= 0.3, "{d}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );

    // Near-misses: another number, a negation.
    let pct = chat("What is 15% of 200?");
    assert_eq!(
        cache_header(&post(&h.url(0), "app", &pct, &[]).await),
        "miss"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = chat("What is 15% of 300?");
    assert_eq!(
        cache_header(&post(&h.url(1), "app", &other, &[]).await),
        "miss"
    );
    let neg = chat("How do I not reset my account password?");
    assert_eq!(
        cache_header(&post(&h.url(2), "app", &neg, &[]).await),
        "miss"
    );

    // Savings in the showback report equal what the hits replayed.
    // What the replicas' hits replayed, by their own count.
    let (mut hits, mut avoided) = (0, 0u128);
    for g in 0..3 {
        let m = metrics(&h.url(g)).await;
        hits += metric_sum(&m, "tollgate_cache_tokens_saved_total", &[("cache", "faq")]);
        avoided += metric_sum(
            &m,
            "tollgate_cache_cost_avoided_pico_total",
            &[("cache", "faq")],
        ) as u128;
    }
    assert!(hits > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = h.usage("team").unwrap();
        if report["total"]["saved_tokens"].as_u64() == Some(hits) {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "saved tokens never reached {hits}: {report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let saved_cost: u128 = report["total"]["saved_cost_pico"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(saved_cost > 0, "{report}");
    assert_eq!(saved_cost, avoided, "{report}");
    // Each hit is priced at the backend that produced the answer: 2.5 in, 10 out per 1M.
    let per_hit = first["usage"]["prompt_tokens"].as_u64().unwrap() * 2_500_000
        + first["usage"]["completion_tokens"].as_u64().unwrap() * 10_000_000;
    assert!(saved_cost >= 5 * per_hit as u128, "{report}");
    // The embedding calls are the consumer's usage, on the embeddings model.
    let by_model = h.usage("model").unwrap();
    let emb = by_model["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "text-embedding-3-small")
        .unwrap_or_else(|| panic!("no embeddings usage: {by_model}"));
    assert!(emb["input_tokens"].as_u64().unwrap() > 0 && emb["requests"].as_u64().unwrap() >= 5);
}

/// `tollgate cache ARGS --config FILE`'s output.
fn cache_cli(h: &Running, args: &[&str]) -> String {
    let mut all = vec!["cache"];
    all.extend_from_slice(args);
    h.tollgate(&all).unwrap()
}

/// `tollgate cache stats` counts the entries and the index; `tollgate cache purge
/// --partition team=…` empties that team's partition only, and the next ask misses.
#[tokio::test]
async fn purge_and_stats_from_the_cli() {
    let valkey = Valkey::start_search().unwrap();
    let h = Harness::new()
        .store(&format!("kind = \"redis\"\nurl = \"{}\"", valkey.url()))
        .backend("ptu", MockOpts::default(), "")
        .consumer("s1", "team = \"support\"")
        .consumer("f1", "team = \"finance\"")
        .config(&semantic(0.1, "ptu"))
        .start_in_process()
        .await;
    let base = h.url(0);
    let q = chat("Which plan includes phone support?");
    for who in ["s1", "f1"] {
        post(&base, who, &q, &[]).await;
        until_hit(&base, who, &q).await;
    }
    let stats = cache_cli(&h, &["stats"]);
    assert!(
        stats.starts_with("faq: 2 entries, 2 vectors indexed"),
        "{stats}"
    );
    assert_eq!(
        cache_cli(&h, &["purge", "--partition", "team=finance"]),
        "faq: 1 entries purged\n"
    );
    assert_eq!(cache_header(&post(&base, "f1", &q, &[]).await), "miss");
    assert_eq!(cache_header(&post(&base, "s1", &q, &[]).await), "hit");
    until_hit(&base, "f1", &q).await;
    assert_eq!(cache_cli(&h, &["purge"]), "faq: 2 entries purged\n");
    assert_eq!(cache_header(&post(&base, "s1", &q, &[]).await), "miss");
}

/// The exact mode on a plain Redis (no search module); a hit is served only to a caller the
/// reservation would admit: once an operator disables the consumer or narrows its models, the
/// next request after 250 ms is refused, not answered from the cache.
#[tokio::test]
async fn hits_follow_admin_changes_within_250_ms() {
    let h = support_app(Harness::new().redis(), EXACT).await;
    let base = h.url(0);
    let q = chat("Is there a student discount?");
    post(&base, "app", &q, &[]).await;
    until_hit(&base, "app", &q).await;
    let redis = h.redis.as_ref().unwrap();
    redis
        .cli(&["HSET", "tg:consumer:{app}", "models", "gpt-4o-mini"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = post(&base, "app", &q, &[]).await;
    assert_eq!(r.status(), 403, "{}", cache_header(&r));
    redis
        .cli(&["HSET", "tg:consumer:{app}", "models", "", "disabled", "1"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post(&base, "app", &q, &[]).await.status(), 403);
    redis
        .cli(&["HSET", "tg:consumer:{app}", "disabled", "0"])
        .unwrap();
    // A refusal is remembered for a second (limits/refusals.rs), then hits resume.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post(&base, "app", &q, &[]).await;
    assert_eq!(
        (r.status().as_u16(), cache_header(&r).as_str()),
        (200, "hit")
    );
}

/// An embeddings backend that is down makes semantic lookups bypass: every request still
/// succeeds, marked `bypass`, and the failure is counted.
#[tokio::test]
async fn embeddings_down_only_bypasses() {
    let valkey = Valkey::start_search().unwrap();
    let h = Harness::new()
        .store(&format!("kind = \"redis\"\nurl = \"{}\"", valkey.url()))
        .backend("ptu", MockOpts::default(), "models = [\"gpt-4o\"]")
        .config("[[backends]]\nname = \"emb\"\nurl = \"http://127.0.0.1:9\"\nmodels = [\"text-embedding-3-small\"]\n")
        .consumer("app", "")
        .config(&semantic(0.1, "emb").replace("lookup_timeout_ms = 2000", "lookup_timeout_ms = 200"))
        .start_in_process()
        .await;
    let base = h.url(0);
    for i in 0..5 {
        let t = Instant::now();
        let r = post(
            &base,
            "app",
            &chat(&format!("Question number {i} about billing")),
            &[],
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(cache_header(&r), "bypass");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    let m = metrics(&base).await;
    assert_eq!(
        metric_sum(&m, "tollgate_cache_failures_total", &[("cache", "faq")]),
        5
    );
}

/// Semantic mode on a Redis without the search module refuses to start, saying why; exact
/// mode on the same Redis starts and caches.
#[tokio::test]
async fn semantic_needs_the_search_module() {
    let redis = RedisServer::start().unwrap();
    let mock = tollgate_tests::Mock::start(MockOpts::default())
        .await
        .unwrap();
    let toml = |cache: &str| {
        format!(
            "[store]\nkind = \"redis\"\nurl = \"{}\"\n[[backends]]\nname = \"ptu\"\nurl = \"{}\"\n\
             models = [\"gpt-4o\", \"text-embedding-3-small\"]\n{cache}",
            redis.url(),
            mock.url()
        )
    };
    let config = tollgate_common::Config::from_toml(&toml(&semantic(0.1, "ptu"))).unwrap();
    let err = match tollgate::server::app(config).await {
        Ok(_) => panic!("semantic mode started on a Redis without search"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("search module") && err.contains("mode = \"exact\""),
        "{err}"
    );
    let config = tollgate_common::Config::from_toml(&toml(EXACT)).unwrap();
    assert!(tollgate::server::app(config).await.is_ok());
}

/// The official openai Python SDK reads hits as normal answers: chat JSON and streams (with
/// and without `include_usage`), the Responses API and completions, JSON and streamed.
#[tokio::test]
async fn openai_sdk_reads_hits() {
    let python = tollgate_tests::pyenv::python().unwrap();
    let h = Harness::new()
        .backend("ptu", MockOpts::default(), "")
        .consumer("sdk", "")
        .config(EXACT)
        .start()
        .await
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/cache_sdk.py");
    let (url, key) = (h.url(0), key_for("sdk"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(url)
            .arg(key)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.gateways[0].log_text()
    );
    assert!(stdout.contains("5 checks passed"), "{stdout}");
}

//! Every error of the HTTP contract, through the router in-process (`app().oneshot()`): the
//! status, the OpenAI error body, the retry headers, and that no credential ever appears in it.

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tollgate_common::{Config, key_hash};
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{CHAT, Mock};
use tower::ServiceExt as _;

const KEY: &str = "tg-secret-key-alpha";
const LIMITED_KEY: &str = "tg-secret-key-limited";
const QUOTA_KEY: &str = "tg-secret-key-quota";
const OFF_KEY: &str = "tg-secret-key-off";

async fn config(extra_backends: &str) -> (Config, Mock) {
    let mock = Mock::start(MockOpts {
        name: "m".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A consumer may list only models some backend serves.
    let alpha_models = if extra_backends.is_empty() {
        r#"["gpt-4o"]"#
    } else {
        r#"["gpt-4o", "dead-model", "hang-model"]"#
    };
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 2048
[[consumers]]
id = "alpha"
models = {alpha_models}
key_sha256 = ["{k1}"]
[[consumers]]
id = "limited"
tpm = 100
key_sha256 = ["{k2}"]
[[consumers]]
id = "quota"
quota = 60
quota_period = "day"
key_sha256 = ["{k3}"]
[[consumers]]
id = "off"
disabled = true
key_sha256 = ["{k4}"]
[[backends]]
name = "m"
url = "{url}"
models = ["gpt-4o", "gpt-4o-mini"]
{extra_backends}
"#,
        k1 = key_hash(KEY),
        k2 = key_hash(LIMITED_KEY),
        k3 = key_hash(QUOTA_KEY),
        k4 = key_hash(OFF_KEY),
        url = mock.url(),
    );
    (Config::from_toml(&toml).unwrap(), mock)
}

async fn call(
    router: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, http::HeaderMap, Value, String) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v, text)
}

fn post(path: &str, key: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(body.into()).unwrap()
}

fn chat(model: &str, max_tokens: u64) -> String {
    tollgate_tests::chat(max_tokens)
        .model(model)
        .prompt("hello there")
        .json()
        .to_string()
}

/// A chat completion for `model` with `max_tokens` as `key`, answered by `router`.
async fn chat_as(
    router: &axum::Router,
    key: &str,
    model: &str,
    max_tokens: u64,
) -> (StatusCode, http::HeaderMap, Value, String) {
    call(router, post(CHAT, Some(key), chat(model, max_tokens))).await
}

/// Header `name` of an answer, parsed (a number).
fn number<T: std::str::FromStr>(h: &http::HeaderMap, name: &str) -> T {
    let text = h[name].to_str().unwrap();
    text.parse()
        .unwrap_or_else(|_| panic!("{name}: {text:?} does not parse"))
}

/// Sends `req` and checks the answer is `status` with an OpenAI-shaped error `code`/`kind`.
async fn expect_error(
    router: &axum::Router,
    req: Request<Body>,
    status: u16,
    code: &str,
    kind: &str,
) {
    let (s, _, v, text) = call(router, req).await;
    assert_eq!(s, status, "{text}");
    assert_error(&v, &text, code, kind);
}

fn assert_error(v: &Value, text: &str, code: &str, kind: &str) {
    assert_eq!(v["error"]["code"], code, "{text}");
    assert_eq!(v["error"]["type"], kind, "{text}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    assert!(
        v["error"].as_object().unwrap().contains_key("param"),
        "{text}"
    );
    for secret in [KEY, LIMITED_KEY, QUOTA_KEY, OFF_KEY] {
        assert!(!text.contains(secret), "error body leaks a key: {text}");
    }
}

/// 400 for every malformed body, naming the problem, OpenAI-shaped.
#[tokio::test]
async fn bad_requests_are_400() {
    let (c, _m) = config("").await;
    let (router, _gw, _bg) = tollgate::app(c).await.unwrap();
    for (body, param) in [
        ("{oops".to_string(), Value::Null),
        ("[]".to_string(), Value::Null),
        (json!({"messages": []}).to_string(), json!("model")),
        (json!({"model": "gpt-4o"}).to_string(), json!("messages")),
        (
            json!({"model": "gpt-4o", "messages": "hi"}).to_string(),
            json!("messages"),
        ),
        (
            json!({"model": "gpt-4o", "messages": [], "stream": "yes"}).to_string(),
            Value::Null,
        ),
        (String::new(), Value::Null),
    ] {
        let (s, _, v, text) = call(
            &router,
            post("/v1/chat/completions", Some(KEY), body.clone()),
        )
        .await;
        assert_eq!(s, 400, "{body}: {text}");
        assert_error(&v, &text, "invalid_request_error", "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{body}");
    }
    let (s, _, v, text) = call(
        &router,
        post(
            "/v1/embeddings",
            Some(KEY),
            json!({"model": "gpt-4o"}).to_string(),
        ),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "input", "{text}");
}

/// 401 without a key, with an unknown key, and with a non-bearer scheme; the message never
/// repeats the key.
#[tokio::test]
async fn unauthenticated_is_401() {
    let (c, _m) = config("").await;
    let (router, _gw, _bg) = tollgate::app(c).await.unwrap();
    expect_error(
        &router,
        post("/v1/chat/completions", None, chat("gpt-4o", 5)),
        401,
        "invalid_api_key",
        "authentication_error",
    )
    .await;
    let wrong = "tg-secret-wrong-key-zzz";
    let (s, _, _, text) = chat_as(&router, wrong, "gpt-4o", 5).await;
    assert_eq!(s, 401);
    assert!(!text.contains(wrong));
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Basic {KEY}"))
        .body(Body::from(chat("gpt-4o", 5)))
        .unwrap();
    assert_eq!(call(&router, req).await.0, 401);
    // Each header style works with the right key.
    for h in ["api-key", "ocp-apim-subscription-key"] {
        let req = Request::post("/v1/chat/completions")
            .header(h, KEY)
            .body(Body::from(chat("gpt-4o", 5)))
            .unwrap();
        assert_eq!(call(&router, req).await.0, 200, "{h}");
    }
}

/// 403 for a model outside the allow-list and for a disabled consumer; 404 for an unknown
/// model and an unknown route; 405 for a wrong method.
#[tokio::test]
async fn forbidden_and_not_found() {
    let (c, _m) = config("").await;
    let (router, _gw, _bg) = tollgate::app(c).await.unwrap();
    let cases = [
        (
            "/v1/chat/completions",
            KEY,
            "gpt-4o-mini",
            403,
            "model_not_allowed",
            "permission_error",
        ),
        (
            "/v1/chat/completions",
            OFF_KEY,
            "gpt-4o",
            403,
            "consumer_disabled",
            "permission_error",
        ),
        (
            "/v1/chat/completions",
            KEY,
            "gpt-9",
            404,
            "model_not_found",
            "invalid_request_error",
        ),
        (
            "/v1/nope",
            KEY,
            "gpt-4o",
            404,
            "not_found",
            "invalid_request_error",
        ),
    ];
    for (path, key, model, status, code, kind) in cases {
        let req = post(path, Some(key), chat(model, 5));
        expect_error(&router, req, status, code, kind).await;
    }
    let req = Request::get("/v1/chat/completions")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&router, req).await.0, 405);
}

/// 413 when the body is over `max_body_bytes`, declared or not.
#[tokio::test]
async fn body_too_large_is_413() {
    let (c, _m) = config("").await;
    let (router, _gw, _bg) = tollgate::app(c).await.unwrap();
    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(5000)}]})
            .to_string();
    expect_error(
        &router,
        post("/v1/chat/completions", Some(KEY), big.clone()),
        413,
        "request_too_large",
        "invalid_request_error",
    )
    .await;
    // Streamed without a content-length.
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let (s, _, _, _) = call(
        &router,
        post("/v1/chat/completions", Some(KEY), Body::from_stream(stream)),
    )
    .await;
    assert_eq!(s, 413);
}

/// 429 with retry-after and retry-after-ms once the per-minute tokens are spent, and 403
/// quota_exceeded once the period quota is; the rate-limit headers count down.
#[tokio::test]
async fn limits_answer_429_and_403() {
    let (c, _m) = config("").await;
    let (router, _gw, _bg) = tollgate::app(c).await.unwrap();
    let (s, h, _, text) = chat_as(&router, LIMITED_KEY, "gpt-4o", 60).await;
    assert_eq!(s, 200, "{text}");
    let remaining: i64 = number(&h, "x-ratelimit-remaining-tokens");
    assert!(remaining < 40, "{remaining}");
    let (s, h, v, text) = chat_as(&router, LIMITED_KEY, "gpt-4o", 60).await;
    assert_eq!(s, 429, "{text}");
    assert_error(&v, &text, "rate_limit_exceeded", "rate_limit_error");
    let ms: u64 = number(&h, "retry-after-ms");
    let secs: u64 = number(&h, "retry-after");
    assert!(ms > 0 && secs == ms.div_ceil(1000), "{ms} {secs}");

    let (s, h, _, text) = chat_as(&router, QUOTA_KEY, "gpt-4o", 30).await;
    assert_eq!(s, 200, "{text}");
    assert!(h.contains_key("x-quota-remaining-tokens"));
    let (s, _, v, text) = chat_as(&router, QUOTA_KEY, "gpt-4o", 30).await;
    assert_eq!(s, 403, "{text}");
    assert_error(&v, &text, "quota_exceeded", "insufficient_quota");
}

/// 502 when the only backend refuses connections, 504 when it hangs past the first-byte
/// timeout; the reservation is refunded either way.
#[tokio::test]
async fn backend_failures_are_502_and_504() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let hang = Mock::start(MockOpts {
        name: "hang".into(),
        hang: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let extra = format!(
        r#"
[[backends]]
name = "dead"
url = "http://{dead}"
models = ["dead-model"]
timeouts = {{ connect_ms = 500, first_byte_ms = 500, idle_ms = 500 }}
[[backends]]
name = "hang"
url = "{}"
models = ["hang-model"]
timeouts = {{ connect_ms = 500, first_byte_ms = 300, idle_ms = 300 }}
"#,
        hang.url()
    );
    let (c, _m) = config(&extra).await;
    let (router, gw, _bg) = tollgate::app(c).await.unwrap();
    let (s, _, v, text) = chat_as(&router, KEY, "dead-model", 5).await;
    assert_eq!(s, 502, "{text}");
    assert_error(&v, &text, "bad_gateway", "api_error");
    assert!(
        !text.contains(&dead.to_string()),
        "error names the backend address: {text}"
    );
    let started = std::time::Instant::now();
    let (s, _, v, text) = chat_as(&router, KEY, "hang-model", 5).await;
    assert_eq!(s, 504, "{text}");
    assert_error(&v, &text, "gateway_timeout", "api_error");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // Nothing was used, so no usage totals were written.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    use tollgate_quota::Store as _;
    let rows = gw.limits.store.usage(0, 99_999_999).await.unwrap();
    assert!(rows.is_empty(), "{rows:?}");
}

/// `/healthz`, `/readyz` and `/metrics` answer without a key.
#[tokio::test]
async fn probes_need_no_key() {
    let (c, _m) = config("").await;
    let (router, _gw, _bg) = tollgate::app(c).await.unwrap();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (s, _, _, text) = call(&router, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(s, 200, "{path}: {text}");
    }
    let (_, _, v, _) = call(
        &router,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(v["store"], "memory");
    let req = Request::get("/v1/models")
        .header("api-key", KEY)
        .body(Body::empty())
        .unwrap();
    let (s, _, v, _) = call(&router, req).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["gpt-4o"],
        "alpha may use only gpt-4o of the served models"
    );
}

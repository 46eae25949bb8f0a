//! A mock OpenAI / Azure OpenAI backend: the thing tollgate forwards to in tests and
//! benchmarks. It serves the OpenAI routes (`/v1/...`), Azure deployment routes
//! (`/openai/deployments/{deployment}/...?api-version=`) and Azure v1 routes (`/openai/v1/...`),
//! streamed and not, with exact `usage` (see [`count_prompt_tokens`]) and embeddings that are
//! bag-of-words vectors of the input text (see [`embed`]), and can behave like a
//! provisioned (PTU) deployment that answers 429 once its own tokens-per-minute are spent, or
//! like a slow, failing, hanging or stream-dropping backend ([`MockOpts`]). `GET /stats`
//! reports what it has seen ([`Stats`]).
//!
//! One request goes: record it → (hang?) → parse and validate → random failure → TPM bucket →
//! wait the configured latency → answer whole, or stream from a spawned task that paces the
//! frames and stops as soon as the client goes away.

mod bucket;
mod embeddings;
mod shapes;
mod stats;
mod tokens;

#[cfg(test)]
mod tests;

use std::future::{Future, IntoFuture};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use bucket::{Admission, TokenBucket};
pub use embeddings::{DEFAULT_DIMENSIONS, MAX_DIMENSIONS, cosine_distance, embed};
use shapes::{Op, Reply};
pub use stats::{LastRequest, ModelStats, Stats};
pub use tokens::{
    TOKENS_PER_MESSAGE, TOKENS_PER_REPLY, completion_text, count_prompt_tokens, count_tokens,
};

/// Completion length when the request names none and [`MockOpts::default_completion_tokens`] is 0.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Largest request body accepted (the gateway's own default limit is 10 MiB).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// After the shutdown signal, in-flight requests get this long before `serve` returns anyway
/// (a `hang` request would otherwise hold shutdown forever).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How a mock backend behaves. `MockOpts::default()` is a fast, well-behaved backend.
#[derive(Clone, Debug, Default)]
pub struct MockOpts {
    /// Reported at `/stats` and in the `x-mock-backend` response header.
    pub name: String,
    /// Tokens per minute, like a PTU deployment: beyond it requests get 429.
    pub tpm: Option<u64>,
    /// Delay before any response (headers included).
    pub latency_ms: u64,
    /// Further delay before the first content token (a non-streamed answer waits it too).
    pub ttft_ms: u64,
    /// Generation speed; unset means as fast as possible.
    pub tokens_per_sec: Option<f64>,
    /// Fraction (0..=1) of requests answered 500.
    pub fail_rate: f64,
    /// Leave `usage` out of every answer, as some OpenAI-compatible servers do.
    pub no_usage: bool,
    /// Accept requests and never answer them.
    pub hang: bool,
    /// Abort a stream's connection after this many content chunks.
    pub fail_mid_stream_after: Option<u32>,
    /// Completion length when the request sets no max tokens; 0 means 16.
    pub default_completion_tokens: u64,
    /// Send `azure-openai-deployment-utilization` even without `tpm` (always `0.0%`); with
    /// `tpm` it is always sent.
    pub utilization_header: bool,
}

/// Runs the mock on `listener` until `shutdown` completes, then lets in-flight requests
/// finish for up to two seconds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: MockOpts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = listener.tap_io(|tcp| {
        // Best effort: Nagle only adds latency to small SSE frames.
        let _ = tcp.set_nodelay(true);
    });
    let signalled = Arc::new(Notify::new());
    let notify = Arc::clone(&signalled);
    let server = axum::serve(listener, router(opts)).with_graceful_shutdown(async move {
        shutdown.await;
        notify.notify_one();
    });
    tokio::select! {
        result = server.into_future() => result.context("mock server failed"),
        () = async {
            signalled.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// The mock's routes, with its state (stats, TPM bucket) inside.
pub fn router(opts: MockOpts) -> Router {
    // Load the tokenizer now (~100 ms) rather than inside the first request.
    count_tokens("warm up");
    let mock = Arc::new(Mock::new(opts));
    let api = post(handle);
    let mut router = Router::new();
    for prefix in ["/v1", "/openai/v1"] {
        for op in ["chat/completions", "completions", "embeddings", "responses"] {
            router = router.route(&format!("{prefix}/{op}"), api.clone());
        }
        router = router.route(&format!("{prefix}/models"), get(models));
    }
    for op in ["chat/completions", "completions", "embeddings"] {
        router = router.route(
            &format!("/openai/deployments/{{deployment}}/{op}"),
            api.clone(),
        );
    }
    router
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(mock)
}

struct Mock {
    opts: MockOpts,
    stats: Arc<stats::Recorder>,
    bucket: Option<TokenBucket>,
    /// Numbers response ids.
    next_id: AtomicU64,
    name_header: HeaderValue,
}

impl Mock {
    fn new(opts: MockOpts) -> Self {
        let name_header =
            HeaderValue::from_str(&opts.name).unwrap_or_else(|_| HeaderValue::from_static("mock"));
        Mock {
            bucket: opts.tpm.map(TokenBucket::new),
            stats: Arc::default(),
            next_id: AtomicU64::new(1),
            name_header,
            opts,
        }
    }

    /// A JSON answer with the status recorded and the backend name attached.
    fn answer(&self, status: StatusCode, extra: HeaderMap, body: &Value) -> Response {
        self.stats.answered(status, false);
        let mut response = (status, extra, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(X_MOCK_BACKEND, self.name_header.clone());
        response
    }

    fn error(&self, status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
        self.answer(
            status,
            HeaderMap::new(),
            &shapes::error_body(message, kind, code),
        )
    }
}

const X_MOCK_BACKEND: HeaderName = HeaderName::from_static("x-mock-backend");
const UTILIZATION: HeaderName = HeaderName::from_static("azure-openai-deployment-utilization");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// What the handler needs from a validated request body.
struct Parsed {
    model: String,
    stream: bool,
    include_usage: bool,
    /// The client's cap on output tokens, if any.
    max_tokens: Option<u64>,
    prompt_tokens: u64,
    embeddings: embeddings::Request,
}

/// Which operation a route serves, and the Azure deployment named in its path.
fn classify(path: &str) -> (Op, Option<&str>) {
    let (deployment, op) = match path.strip_prefix("/openai/deployments/") {
        Some(rest) => match rest.split_once('/') {
            Some((deployment, op)) => (Some(deployment), op),
            None => (None, rest),
        },
        None => (None, path.rsplit_once("/v1/").map_or(path, |(_, op)| op)),
    };
    let op = match op {
        "chat/completions" => Op::Chat,
        "completions" => Op::Completions,
        "embeddings" => Op::Embeddings,
        _ => Op::Responses,
    };
    (op, deployment)
}

/// Validates a request the way the real APIs do; `Err` is the 400 message.
fn parse(
    op: Op,
    deployment: Option<&str>,
    query: Option<&str>,
    body: &[u8],
) -> Result<Parsed, String> {
    if deployment.is_some()
        && !query.is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")))
    {
        return Err("missing required query parameter 'api-version'".into());
    }
    let json: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    if !json.is_object() {
        return Err("request body must be a JSON object".into());
    }
    let model = match (deployment, json.get("model").and_then(Value::as_str)) {
        (Some(deployment), _) => deployment.to_owned(),
        (None, Some(model)) if !model.is_empty() => model.to_owned(),
        (None, _) => return Err("you must provide a model parameter".into()),
    };
    let required = match op {
        Op::Chat => "messages",
        Op::Completions => "prompt",
        Op::Embeddings | Op::Responses => "input",
    };
    if json.get(required).is_none_or(Value::is_null) {
        return Err(format!("missing required parameter: '{required}'"));
    }
    let max_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|field| json.get(*field).and_then(Value::as_u64));
    let stream = op != Op::Embeddings && json.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = json
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    Ok(Parsed {
        model,
        stream,
        include_usage,
        max_tokens,
        prompt_tokens: count_prompt_tokens(&json),
        embeddings: if op == Op::Embeddings {
            embeddings::Request::parse(&json)?
        } else {
            embeddings::Request::default()
        },
    })
}

async fn handle(
    State(mock): State<Arc<Mock>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let in_flight = mock.stats.enter();
    mock.stats.received(&uri, &headers, &body);
    if mock.opts.hang {
        // Dropped (and `in_flight` released) when the client goes away.
        std::future::pending::<()>().await;
    }

    let (op, deployment) = classify(uri.path());
    let req = match parse(op, deployment, uri.query(), &body) {
        Ok(req) => req,
        Err(message) => {
            return mock.error(
                StatusCode::BAD_REQUEST,
                &message,
                "invalid_request_error",
                None,
            );
        }
    };
    mock.stats.model(&req.model);

    if mock.opts.fail_rate > 0.0 && rand::random::<f64>() < mock.opts.fail_rate {
        return mock.error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request (mock fail_rate).",
            "server_error",
            Some("internal_error"),
        );
    }

    let completion_tokens = match op {
        Op::Embeddings => 0,
        _ => req
            .max_tokens
            .unwrap_or(match mock.opts.default_completion_tokens {
                0 => DEFAULT_COMPLETION_TOKENS,
                n => n,
            }),
    };
    let mut extra = HeaderMap::new();
    match mock
        .bucket
        .as_ref()
        .map(|b| b.take(req.prompt_tokens + completion_tokens))
    {
        Some(Admission::Limited { retry_after }) => return rate_limited(&mock, retry_after),
        Some(Admission::Admitted {
            remaining,
            utilization_pct,
        }) => {
            extra.insert(UTILIZATION, header_value(format!("{utilization_pct:.1}%")));
            extra.insert(REMAINING_TOKENS, HeaderValue::from(remaining));
        }
        None if mock.opts.utilization_header => {
            extra.insert(UTILIZATION, HeaderValue::from_static("0.0%"));
        }
        None => {}
    }

    let reply = Reply {
        op,
        id: format!(
            "{}{}",
            id_prefix(op),
            mock.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: req.model,
        prompt_tokens: req.prompt_tokens,
        completion_tokens,
        finish_reason: if req.max_tokens.is_some() {
            "length"
        } else {
            "stop"
        },
        usage: !mock.opts.no_usage,
        stream_usage: req.include_usage && !mock.opts.no_usage,
        embeddings: req.embeddings,
    };
    pause(Duration::from_millis(mock.opts.latency_ms)).await;

    if req.stream {
        mock.stats.answered(StatusCode::OK, true);
        let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(1);
        tokio::spawn(produce_stream(Arc::clone(&mock), reply, tx, in_flight));
        let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut response = (extra, Body::from_stream(frames)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(X_MOCK_BACKEND, mock.name_header.clone());
        return response;
    }

    let generation = mock.opts.tokens_per_sec.map_or(Duration::ZERO, |tps| {
        Duration::from_secs_f64(completion_tokens as f64 / tps.max(f64::MIN_POSITIVE))
    });
    pause(Duration::from_millis(mock.opts.ttft_ms) + generation).await;
    mock.stats
        .served(&reply.model, reply.prompt_tokens, completion_tokens);
    mock.answer(StatusCode::OK, extra, &reply.body())
}

fn rate_limited(mock: &Mock, retry_after: Duration) -> Response {
    let ms = retry_after.as_millis().max(1) as u64;
    let mut headers = HeaderMap::new();
    headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(ms.div_ceil(1000).max(1)),
    );
    headers.insert(REMAINING_TOKENS, HeaderValue::from(0));
    let message = format!(
        "Requests to this deployment have exceeded the token rate limit of your current \
         pricing tier. Please retry after {} seconds.",
        ms.div_ceil(1000).max(1)
    );
    let body = shapes::error_body(&message, "rate_limit_exceeded", Some("429"));
    mock.answer(StatusCode::TOO_MANY_REQUESTS, headers, &body)
}

/// Sends a stream's frames, paced by `ttft_ms` and `tokens_per_sec`, stopping early when the
/// client disconnects or `fail_mid_stream_after` cuts it. Holds the request's in-flight slot.
async fn produce_stream(
    mock: Arc<Mock>,
    reply: Reply,
    tx: mpsc::Sender<io::Result<Bytes>>,
    _in_flight: stats::InFlight,
) {
    let mut served = Served {
        mock: &mock,
        model: &reply.model,
        prompt: reply.prompt_tokens,
        completion: 0,
    };
    if let Some(frame) = reply.stream_open()
        && tx.send(Ok(frame)).await.is_err()
    {
        return;
    }
    let pace = mock.opts.tokens_per_sec.map_or(Duration::ZERO, |tps| {
        Duration::from_secs_f64(1.0 / tps.max(f64::MIN_POSITIVE))
    });
    let total = reply.completion_tokens;
    let cut = mock
        .opts
        .fail_mid_stream_after
        .map(u64::from)
        .filter(|&n| n <= total);
    for i in 0..cut.unwrap_or(total) {
        let wait = if i == 0 {
            Duration::from_millis(mock.opts.ttft_ms)
        } else {
            pace
        };
        if !wait_unless_closed(&tx, wait).await || tx.send(Ok(reply.stream_token(i))).await.is_err()
        {
            return;
        }
        served.completion += 1;
    }
    if cut.is_some() {
        // An error body makes hyper drop the connection instead of ending the stream cleanly.
        let _ = tx
            .send(Err(io::Error::other("mock: fail_mid_stream_after")))
            .await;
        return;
    }
    for frame in reply.stream_close() {
        if tx.send(Ok(frame)).await.is_err() {
            return;
        }
    }
}

/// Sleeps `wait`; false if the client went away meanwhile.
async fn wait_unless_closed(tx: &mpsc::Sender<io::Result<Bytes>>, wait: Duration) -> bool {
    if wait.is_zero() {
        return !tx.is_closed();
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = tx.closed() => false,
    }
}

/// Adds the usage of one answer to the stats when dropped, so a stream cut short by either side
/// still counts exactly what it delivered.
struct Served<'a> {
    mock: &'a Mock,
    model: &'a str,
    prompt: u64,
    completion: u64,
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        self.mock
            .stats
            .served(self.model, self.prompt, self.completion);
    }
}

fn id_prefix(op: Op) -> &'static str {
    match op {
        Op::Chat => "chatcmpl-mock",
        Op::Completions => "cmpl-mock",
        Op::Embeddings => "emb-mock",
        Op::Responses => "resp_mock",
    }
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Sleeps `wait`, skipping the timer entirely when it is zero: even a zero-length tokio
/// sleep waits for the next 1 ms timer tick.
async fn pause(wait: Duration) {
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// `GET /v1/models`: a few well-known models plus every model requested so far.
async fn models(State(mock): State<Arc<Mock>>) -> axum::Json<Value> {
    let mut ids: Vec<String> = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
        .map(String::from)
        .into();
    ids.extend(mock.stats.snapshot(&mock.opts.name).by_model.into_keys());
    ids.sort();
    ids.dedup();
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate-mock"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

async fn stats(State(mock): State<Arc<Mock>>) -> axum::Json<Stats> {
    axum::Json(mock.stats.snapshot(&mock.opts.name))
}

async fn reset(State(mock): State<Arc<Mock>>) -> StatusCode {
    mock.stats.reset();
    StatusCode::NO_CONTENT
}

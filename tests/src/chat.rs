//! What tests send and read: one request-body builder ([`chat`]), requests to a running
//! cluster ([`Running::chat`], [`Running::post`]), and its metrics read the way a scraper
//! reads them ([`Running::metrics`], [`Running::wait_for_tokens`], [`eventually`]), and the
//! numbers in its response headers ([`header`]).

use crate::{Running, client, key_for};
use serde_json::{Value, json};
use std::time::Duration;

/// The chat-completions path every OpenAI-style test posts to.
pub const CHAT: &str = "/v1/chat/completions";

/// The prompt a test sends when the text does not matter.
pub const PROMPT: &str = "Tell me about token buckets in one line.";

/// A chat-completions body: model `gpt-4o`, one user message ([`PROMPT`]), `max_tokens`.
/// Change what the scenario needs, then pass it to [`Running::chat`] (or `.json()` it).
///
/// ```ignore
/// let body = chat(20).stream(true).prompt("Count me").json();
/// ```
#[derive(Clone, Debug)]
pub struct Chat(Value);

pub fn chat(max_tokens: u64) -> Chat {
    Chat(json!({"model": "gpt-4o", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": PROMPT}]}))
}

impl Chat {
    pub fn model(self, model: &str) -> Chat {
        self.set("model", json!(model))
    }

    /// No `model` field (Azure deployment routes carry it in the path).
    pub fn no_model(mut self) -> Chat {
        self.0.as_object_mut().expect("object").remove("model");
        self
    }

    /// The one user message's text.
    pub fn prompt(mut self, text: &str) -> Chat {
        self.0["messages"] = json!([{"role": "user", "content": text}]);
        self
    }

    /// A system message before the user message.
    pub fn system(mut self, text: &str) -> Chat {
        let user = self.0["messages"][0].clone();
        self.0["messages"] = json!([{"role": "system", "content": text}, user]);
        self
    }

    pub fn stream(self, on: bool) -> Chat {
        self.set("stream", json!(on))
    }

    /// `stream_options.include_usage` (with [`Chat::stream`] for a streamed request).
    pub fn include_usage(self, on: bool) -> Chat {
        self.set("stream_options", json!({"include_usage": on}))
    }

    /// Any other field (`tools`, `user`, `n`, ...).
    pub fn set(mut self, key: &str, value: Value) -> Chat {
        self.0[key] = value;
        self
    }

    pub fn json(self) -> Value {
        self.0
    }
}

impl From<Chat> for Value {
    fn from(c: Chat) -> Value {
        c.0
    }
}

/// What [`Running::post`] accepts as a body: a [`Chat`] or any JSON value, owned or borrowed.
pub trait Body {
    fn into_body(self) -> Value;
}

impl Body for Value {
    fn into_body(self) -> Value {
        self
    }
}

impl Body for &Value {
    fn into_body(self) -> Value {
        self.clone()
    }
}

impl Body for Chat {
    fn into_body(self) -> Value {
        self.0
    }
}

impl Body for &Chat {
    fn into_body(self) -> Value {
        self.0.clone()
    }
}

impl Running {
    /// POSTs `body` to `path` on gateway `gateway` as consumer `consumer` (its harness key).
    pub async fn post(
        &self,
        gateway: usize,
        consumer: &str,
        path: &str,
        body: impl Body,
    ) -> reqwest::Response {
        client()
            .post(format!("{}{path}", self.url(gateway)))
            .bearer_auth(key_for(consumer))
            .json(&body.into_body())
            .send()
            .await
            .expect("request to the gateway")
    }

    /// A chat completion on gateway 0 as `consumer`.
    pub async fn chat(&self, consumer: &str, body: impl Body) -> reqwest::Response {
        self.post(0, consumer, CHAT, body).await
    }

    /// GETs `path` on gateway `gateway` with `headers` and parses the answer as JSON.
    pub async fn get_json(&self, gateway: usize, path: &str, headers: &[(&str, &str)]) -> Value {
        let mut req = client().get(format!("{}{path}", self.url(gateway)));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("request to the gateway");
        r.json().await.expect("a JSON answer")
    }

    /// Gateway `gateway`'s `/metrics` text.
    pub async fn metrics(&self, gateway: usize) -> String {
        metrics(&self.url(gateway)).await
    }

    /// Waits (up to 5 s) until gateway `gateway` has counted exactly `input` prompt and
    /// `output` completion tokens in `tollgate_tokens_total` (settle runs off the request
    /// path); panics with the metrics otherwise.
    pub async fn wait_for_tokens(&self, gateway: usize, input: u64, output: u64) {
        let base = self.url(gateway);
        let seen = eventually(Duration::from_secs(5), || async {
            let m = metrics(&base).await;
            metric_sum(&m, "tollgate_tokens_total", &[("type", "input")]) == input
                && metric_sum(&m, "tollgate_tokens_total", &[("type", "output")]) == output
        })
        .await;
        assert!(
            seen,
            "wanted {input} input and {output} output tokens:\n{}",
            metrics(&base).await
        );
    }
}

/// Response header `name` parsed as a `T` (a number, usually); panics when it is missing or
/// does not parse.
pub fn header<T: std::str::FromStr>(r: &reqwest::Response, name: &str) -> T {
    let text = r
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header: {:?}", r.headers()))
        .to_str()
        .unwrap_or_else(|e| panic!("{name} is not text: {e}"));
    text.parse()
        .unwrap_or_else(|_| panic!("{name}: {text:?} does not parse"))
}

/// Asserts that a load against a token quota of `quota` was served `served` tokens, at most
/// `most` (no over-admission) and at least `least_tenths` tenths of the quota (no
/// under-admission); `context` ends both messages.
pub fn assert_served(served: u64, quota: u64, most: u64, least_tenths: u64, context: &str) {
    assert!(
        served <= most,
        "over-admitted: served {served} against a quota of {quota} (at most {most}): {context}"
    );
    assert!(
        served * 10 >= quota * least_tenths,
        "under-admitted: served {served} of {quota}: {context}"
    );
}

/// Sum of a Prometheus counter over the series whose labels contain every `want` pair.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The value of an unlabelled metric (0 when absent).
pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `base`'s `/metrics` text.
pub async fn metrics(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// Polls `f` every 50 ms until it returns true (then true) or `within` passes (then false).
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

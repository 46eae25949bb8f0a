//! What the mock has seen and served, exposed at `GET /stats` so end-to-end tests can check
//! what really reached a backend: request and token counts, which credentials arrived, the
//! last request verbatim, and peak concurrency.
//!
//! Counters live behind one short `parking_lot` mutex that is never held across an await;
//! in-flight tracking uses atomics and RAII guards so a request dropped by a disconnecting
//! client still leaves the counts right.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, StatusCode, Uri};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Credential headers whose distinct values are kept in [`Stats::auth_seen`].
const AUTH_HEADERS: [&str; 3] = ["api-key", "authorization", "ocp-apim-subscription-key"];
/// At most this many distinct values are kept per credential header.
const MAX_AUTH_VALUES: usize = 16;

/// The JSON document served at `GET /stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub name: String,
    /// Every POST to an API route, whatever its outcome.
    pub requests: u64,
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests answered 429 by the `tpm` bucket.
    pub rate_limited: u64,
    /// Requests answered 500 by `fail_rate`.
    pub failed: u64,
    /// Requests answered 400 (bad JSON, missing model, missing api-version).
    pub bad_request: u64,
    /// Requests marked `x-tollgate-probe: 1` (a gateway probing a tripped circuit).
    #[serde(default)]
    pub probes: u64,
    /// 2xx answers that were streams.
    pub streams: u64,
    /// Usage actually served in 2xx answers; a stream cut short counts the tokens it sent.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub by_model: BTreeMap<String, ModelStats>,
    /// Request count per URL path.
    pub paths: BTreeMap<String, u64>,
    /// Distinct values of `api-key`, `authorization` and `ocp-apim-subscription-key` seen.
    pub auth_seen: BTreeMap<String, Vec<String>>,
    pub last_request: Option<LastRequest>,
    /// Peak number of requests in flight at once since start or the last reset.
    pub max_concurrency: u64,
    pub in_flight: u64,
}

/// Per-model counts in [`Stats::by_model`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStats {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The most recent API request, as received.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LastRequest {
    pub path: String,
    pub query: Option<String>,
    /// Lower-case header names; values that are not UTF-8 are replaced lossily.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON, or a JSON string holding it when it is not valid JSON.
    pub body: Value,
}

/// The live counters behind [`Stats`].
#[derive(Default)]
pub(crate) struct Recorder {
    in_flight: AtomicU64,
    max_concurrency: AtomicU64,
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    requests: u64,
    ok: u64,
    rate_limited: u64,
    failed: u64,
    bad_request: u64,
    probes: u64,
    streams: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    by_model: HashMap<String, ModelStats>,
    paths: HashMap<String, u64>,
    auth_seen: [Vec<String>; 3],
    /// Kept raw (cheap clones) and only turned into JSON when `/stats` is read.
    last: Option<(Uri, HeaderMap, Bytes)>,
}

impl Recorder {
    /// Counts a request as in flight until the returned guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_concurrency.fetch_max(now, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Records an API request as it arrives, before anything is decided about it.
    pub(crate) fn received(&self, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
        let mut c = self.counters.lock();
        c.requests += 1;
        if headers.get("x-tollgate-probe").is_some_and(|v| v == "1") {
            c.probes += 1;
        }
        match c.paths.get_mut(uri.path()) {
            Some(count) => *count += 1,
            None => {
                c.paths.insert(uri.path().to_owned(), 1);
            }
        }
        for (seen, name) in c.auth_seen.iter_mut().zip(AUTH_HEADERS) {
            for value in headers.get_all(name) {
                let value = String::from_utf8_lossy(value.as_bytes());
                if seen.len() < MAX_AUTH_VALUES && !seen.iter().any(|s| *s == value) {
                    seen.push(value.into_owned());
                }
            }
        }
        c.last = Some((uri.clone(), headers.clone(), body.clone()));
    }

    /// Records the model a well-formed request asked for.
    pub(crate) fn model(&self, model: &str) {
        let mut c = self.counters.lock();
        match c.by_model.get_mut(model) {
            Some(m) => m.requests += 1,
            None => {
                let m = ModelStats {
                    requests: 1,
                    ..ModelStats::default()
                };
                c.by_model.insert(model.to_owned(), m);
            }
        }
    }

    /// Records the status a request was answered with; `stream` marks a streamed 2xx.
    pub(crate) fn answered(&self, status: StatusCode, stream: bool) {
        let mut c = self.counters.lock();
        match status.as_u16() {
            200..=299 => {
                c.ok += 1;
                c.streams += u64::from(stream);
            }
            429 => c.rate_limited += 1,
            400 => c.bad_request += 1,
            _ => c.failed += 1,
        }
    }

    /// Adds usage actually delivered to a client.
    pub(crate) fn served(&self, model: &str, prompt: u64, completion: u64) {
        let mut c = self.counters.lock();
        c.prompt_tokens += prompt;
        c.completion_tokens += completion;
        if let Some(m) = c.by_model.get_mut(model) {
            m.prompt_tokens += prompt;
            m.completion_tokens += completion;
        }
    }

    /// A point-in-time copy of every counter.
    pub(crate) fn snapshot(&self, name: &str) -> Stats {
        let c = self.counters.lock();
        let auth_seen = AUTH_HEADERS
            .iter()
            .zip(&c.auth_seen)
            .map(|(name, seen)| ((*name).to_owned(), seen.clone()))
            .collect();
        let last_request = c.last.as_ref().map(|(uri, headers, body)| LastRequest {
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into(),
                    )
                })
                .collect(),
            body: serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned())),
        });
        Stats {
            name: name.to_owned(),
            requests: c.requests,
            ok: c.ok,
            rate_limited: c.rate_limited,
            failed: c.failed,
            bad_request: c.bad_request,
            probes: c.probes,
            streams: c.streams,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            total_tokens: c.prompt_tokens + c.completion_tokens,
            by_model: c
                .by_model
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            paths: c.paths.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            auth_seen,
            last_request,
            max_concurrency: self.max_concurrency.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Zeroes every counter; requests still in flight stay counted in `in_flight`.
    pub(crate) fn reset(&self) {
        *self.counters.lock() = Counters::default();
        let now = self.in_flight.load(Ordering::Relaxed);
        self.max_concurrency.store(now, Ordering::Relaxed);
    }
}

/// Holds one unit of [`Stats::in_flight`] for as long as a request (or its stream) lives.
pub(crate) struct InFlight(Arc<Recorder>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

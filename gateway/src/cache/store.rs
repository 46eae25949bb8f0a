//! Keeping a miss's answer. The pipeline hands a [`Pending`] to forwarding; a backend's 200
//! gets a [`Recorder`] in its response tap, which copies the bytes as they pass (bounded by
//! [`MAX_ANSWER_BYTES`]) and, only when the response completed, hands them to a task that
//! checks and assembles the answer ([`Stored`]), embeds the prompt if the lookup did not, and
//! writes the entry: off the request path. A response cut, failed, too large or dropped by
//! the client is never stored.

use super::answer::{MAX_ANSWER_BYTES, Stored};
use super::embed::{Who, embed};
use super::key::Keyed;
use super::{Rule, Shared};
use crate::request::Operation;
use std::sync::Arc;
use tollgate_quota::cache::NewEntry;

/// Where a miss's answer goes.
#[derive(Clone)]
pub struct Pending {
    inner: Arc<Inner>,
}

struct Inner {
    rule: Arc<Rule>,
    shared: Arc<Shared>,
    op: Operation,
    partition: String,
    key: String,
    text: String,
    vector: Option<Vec<f32>>,
    who: Who,
}

impl Pending {
    pub(super) fn new(
        rule: Arc<Rule>,
        shared: Arc<Shared>,
        op: Operation,
        partition: &str,
        keyed: &Keyed,
        who: Who,
    ) -> Pending {
        Pending {
            inner: Arc::new(Inner {
                rule,
                shared,
                op,
                partition: partition.to_string(),
                key: keyed.key.clone(),
                text: keyed.text.clone(),
                vector: None,
                who,
            }),
        }
    }

    /// The prompt's embedding from the lookup, so storing does not embed it again.
    pub(super) fn with_vector(self, vector: Option<Vec<f32>>) -> Pending {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.vector = vector;
                Pending {
                    inner: Arc::new(inner),
                }
            }
            Err(inner) => Pending { inner },
        }
    }

    /// A recorder for the response of `backend`.
    pub fn recorder(&self, backend: &Arc<str>) -> Recorder {
        Recorder {
            pending: self.clone(),
            backend: backend.clone(),
            bytes: Vec::new(),
            over: false,
        }
    }
}

/// Copies a response on its way to the client, to store it once it completed.
pub struct Recorder {
    pending: Pending,
    backend: Arc<str>,
    bytes: Vec<u8>,
    over: bool,
}

impl Recorder {
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.over {
            return;
        }
        if self.bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
            self.over = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(chunk);
    }

    /// The response completed: store its answer in the background (`sse`: it was a stream).
    pub fn finish(self, sse: bool) {
        if self.over {
            let p = &self.pending.inner;
            p.shared
                .metrics
                .count("tollgate_cache_stores_total", &p.rule.name, "too_large");
            return;
        }
        tokio::spawn(store(self.pending, self.backend, self.bytes, sse));
    }
}

async fn store(pending: Pending, backend: Arc<str>, bytes: Vec<u8>, sse: bool) {
    let p = &pending.inner;
    let (rule, metrics) = (&p.rule, &p.shared.metrics);
    let (op, len) = (p.op, bytes.len());
    // The entry to keep: a plain JSON answer around its own bytes, anything else through its
    // parsed tree.
    let read = move || {
        if sse {
            Stored::from_sse(op, &backend, &bytes).map(|s| s.to_bytes())
        } else {
            super::plain::entry(op, &backend, &bytes)
        }
    };
    // A large answer is parsed off the async runtime.
    let answer = if len > crate::heavy::INLINE_BYTES {
        crate::heavy::offload(len, read).await.flatten()
    } else {
        read()
    };
    let Some(answer) = answer else {
        metrics.count("tollgate_cache_stores_total", &rule.name, "not_storable");
        return;
    };
    let vector = match (&rule.embedder, rule.semantic(), &p.vector) {
        (_, false, _) => None,
        (_, true, Some(v)) => Some(v.clone()),
        (Some(e), true, None) => match embed(e, &p.shared, &p.text, &p.who).await {
            Ok(v) => Some(v),
            Err(err) => {
                metrics.count("tollgate_cache_failures_total", &rule.name, "embeddings");
                p.shared.quiet.warn(&rule.name, "embeddings", &err);
                None
            }
        },
        (None, true, None) => None,
    };
    let c = &rule.config;
    let entry = NewEntry {
        cache: &rule.name,
        partition: &p.partition,
        key: &p.key,
        answer: &answer,
        vector: vector.as_deref(),
        prompt: &p.text,
        ttl_ms: c.ttl_s.saturating_mul(1000),
        max_entries: c.max_entries,
        max_total_entries: c.max_total_entries,
    };
    match rule.store.put(&entry).await {
        Ok(()) => metrics.count("tollgate_cache_stores_total", &rule.name, "stored"),
        Err(e) => {
            metrics.count("tollgate_cache_failures_total", &rule.name, "store");
            p.shared.quiet.warn(&rule.name, "store", &e);
        }
    }
}

//! Export batches: encoded spans and log records wait in a bounded [`Queue`] until a batch is
//! full or the schedule delay passes, then one task per signal posts them (OTLP/HTTP,
//! `application/x-protobuf`) through the gateway's own reqwest client. A dead or slow
//! collector costs dropped telemetry and one warning a minute, never a request.

use super::wire::Pb;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// At most one "export failed" warning per this many seconds.
const WARN_EVERY_S: u64 = 60;
/// About the encoded size of one span or usage log record.
const RECORD_BYTES: usize = 768;

/// A batch: encoded records (each a repeated field of the scope message) and their count.
struct Chunk {
    buf: Vec<u8>,
    n: usize,
}

#[derive(Default)]
struct Pending {
    chunks: VecDeque<Chunk>,
    queued: usize,
}

/// Batching limits of one signal (the standard `OTEL_BSP_*` / `OTEL_BLRP_*` variables).
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub delay: Duration,
    pub max_queue: usize,
    pub max_batch: usize,
}

impl Limits {
    /// `prefix` is `OTEL_BSP` (spans, default delay 5 s) or `OTEL_BLRP` (logs, 1 s).
    pub(super) fn from_env(prefix: &str, delay_ms: u64) -> Limits {
        let var = |name: &str, default: u64| {
            std::env::var(format!("{prefix}_{name}"))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        let max_queue = var("MAX_QUEUE_SIZE", 2048).clamp(1, 1 << 20) as usize;
        Limits {
            delay: Duration::from_millis(
                var("SCHEDULE_DELAY", delay_ms).clamp(1, super::env::MAX_MS),
            ),
            max_queue,
            max_batch: (var("MAX_EXPORT_BATCH_SIZE", 512).max(1) as usize).min(max_queue),
        }
    }
}

/// Encoded records waiting for export, at most `max_queue` of them (more are dropped and
/// counted).
pub(super) struct Queue {
    limits: Limits,
    pending: Mutex<Pending>,
    /// A batch is full.
    full: Notify,
    /// Dropped since the last flush's report, and since the start.
    dropped: AtomicU64,
    dropped_total: AtomicU64,
}

impl Queue {
    pub(super) fn new(limits: Limits) -> Queue {
        Queue {
            limits,
            pending: Mutex::default(),
            full: Notify::new(),
            dropped: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
        }
    }

    #[cfg(test)]
    pub(super) fn for_tests() -> Arc<Queue> {
        Arc::new(Queue::new(Limits {
            delay: Duration::from_secs(1),
            max_queue: 100,
            max_batch: 10,
        }))
    }

    /// Appends one record, encoded by `encode` straight into the current batch.
    pub(super) fn push(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        let full = {
            let mut p = self.pending.lock();
            if p.queued >= self.limits.max_queue {
                drop(p);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if p.chunks.back().is_none_or(|c| c.n >= self.limits.max_batch) {
                // Sized for a batch of typical records: no regrowth (and copy) while it fills.
                let cap = self
                    .limits
                    .max_batch
                    .saturating_mul(RECORD_BYTES)
                    .min(1 << 20);
                p.chunks.push_back(Chunk {
                    buf: Vec::with_capacity(cap),
                    n: 0,
                });
            }
            p.queued += 1;
            let c = p.chunks.back_mut().expect("a batch was just added");
            encode(&mut c.buf);
            c.n += 1;
            c.n >= self.limits.max_batch
        };
        if full {
            self.full.notify_one();
        }
    }

    /// The oldest batch: a full one, or (`any`) whatever is waiting.
    fn take(&self, any: bool) -> Option<Chunk> {
        let mut p = self.pending.lock();
        let ready = p
            .chunks
            .front()
            .is_some_and(|c| c.n > 0 && (any || c.n >= self.limits.max_batch));
        let c = ready.then(|| p.chunks.pop_front()).flatten()?;
        p.queued -= c.n;
        Some(c)
    }

    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.pending.lock().queued
    }

    /// The schedule delay.
    pub(super) fn delay(&self) -> Duration {
        self.limits.delay
    }

    /// Resolves when a batch is full.
    pub(super) fn full(&self) -> tokio::sync::futures::Notified<'_> {
        self.full.notified()
    }

    /// Records dropped since the start (queue full).
    pub(super) fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Records dropped since the last call (queue full).
    fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

/// How one signal's export request is posted.
pub(super) struct Sender {
    pub client: reqwest::Client,
    pub url: String,
    pub headers: http::HeaderMap,
    /// Unix seconds of the last failure warning (0 = never), shared by the signals.
    pub warned_at: Arc<AtomicU64>,
}

impl Sender {
    /// Posts one export request; failures are reported at most once a minute.
    pub(super) async fn send(&self, body: Vec<u8>) -> bool {
        let sent = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await;
        let detail = match sent {
            Ok(r) if r.status().is_success() => {
                // Read the (small) answer so the connection is reused.
                let _ = r.bytes().await;
                return true;
            }
            Ok(r) => format!("collector answered {}", r.status().as_u16()),
            Err(e) if e.is_connect() => "connection failed".into(),
            Err(e) if e.is_timeout() => "timed out".into(),
            Err(_) => "request failed".into(),
        };
        self.warn(&detail);
        false
    }

    fn warn(&self, detail: &str) {
        let now = crate::clock::now_ms() / 1000;
        let last = self.warned_at.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_EVERY_S)
            && self
                .warned_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                endpoint = %self.url,
                error = detail,
                "OTLP export failed; telemetry is dropped until the collector answers \
                 (requests are not affected; next warning in {WARN_EVERY_S} s at most)"
            );
        }
    }
}

/// One signal's pipeline: its queue, where it is sent, and the envelope around a batch.
pub(super) struct Pipeline {
    pub queue: Arc<Queue>,
    pub sender: Sender,
    /// The encoded `Resource` and `InstrumentationScope` every batch carries.
    pub resource: Arc<[u8]>,
    pub scope: Arc<[u8]>,
    pub signal: &'static str,
}

impl Pipeline {
    /// `Export*ServiceRequest { resource_*: [{ resource, scope_*: [{ scope, records }] }] }`:
    /// the same field numbers (1, then 1 and 2, then 1 and 2) for traces and logs.
    fn envelope(&self, records: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(records.len() + self.resource.len() + 64);
        Pb(&mut out).message(1, |rs| {
            rs.bytes(1, &self.resource);
            rs.message(2, |ss| {
                ss.bytes(1, &self.scope);
                ss.0.extend_from_slice(records);
            });
        });
        out
    }

    /// Sends every waiting batch (`all`) or only full ones.
    pub(super) async fn flush(&self, all: bool) {
        while let Some(c) = self.queue.take(all) {
            self.sender.send(self.envelope(&c.buf)).await;
        }
        let dropped = self.queue.take_dropped();
        if dropped > 0 {
            tracing::debug!(
                signal = self.signal,
                dropped,
                "OTLP queue full: records dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records fill batches of `max_batch`; only full ones leave early; past `max_queue`
    /// records are dropped and counted; a flush of everything empties the queue.
    #[test]
    fn batches_and_bounds() {
        let q = Queue::new(Limits {
            delay: Duration::from_secs(1),
            max_queue: 25,
            max_batch: 10,
        });
        for i in 0..30u8 {
            q.push(|b| b.push(i));
        }
        assert_eq!(q.take_dropped(), 5);
        assert_eq!(q.dropped_total(), 5);
        let first = q.take(false).unwrap();
        assert_eq!((first.n, first.buf.len()), (10, 10));
        assert_eq!(first.buf[0], 0);
        assert!(q.take(false).is_some());
        assert!(q.take(false).is_none(), "the third batch is not full");
        let last = q.take(true).unwrap();
        assert_eq!(last.n, 5);
        assert!(q.take(true).is_none());
        q.push(|b| b.push(1));
        assert_eq!(q.take(true).unwrap().n, 1, "room again after the flush");
    }
}

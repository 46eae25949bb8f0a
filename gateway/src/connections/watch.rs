//! What each client connection is doing, and when it must close: a [`Watched`] socket notes
//! when a request's first bytes arrive, the service notes when requests start ([`Activity`])
//! and responses end ([`RequestGuard`], carried by the response body in [`Guarded`]), at the
//! cost of a few atomic operations against a coarse [`Clock`]. The [`Registry`] holds every
//! open connection in opening order: swept a few times per second for deadlines, and asked
//! for the oldest quiet connection when the connection cap is reached. So a request costs no
//! timer and no wake-up of its own.

use super::Timeouts;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A coarse clock for connection times: ms since the server started, read (not computed) on
/// every socket read and advanced by each sweep and each accept.
pub(super) struct Clock {
    epoch: Instant,
    now_ms: AtomicU64,
}

impl Clock {
    pub(super) fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }

    /// The time as of the last tick.
    pub(super) fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Advances to the real time and returns it.
    pub(super) fn tick(&self) -> u64 {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.now_ms.fetch_max(now, Ordering::Relaxed);
        now
    }
}

/// The open connections in the order they opened: swept for deadlines, and at the cap the one
/// that has waited longest without a request makes room for a new one.
pub(super) struct Registry {
    pub(super) clock: Arc<Clock>,
    pub(super) next: AtomicU64,
    pub(super) open: parking_lot::Mutex<BTreeMap<u64, Arc<Activity>>>,
}

impl Registry {
    pub(super) fn new() -> Registry {
        Registry {
            clock: Arc::new(Clock::new()),
            next: AtomicU64::new(0),
            open: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }

    /// Tells every connection whose deadline has passed (no request in flight) to close.
    pub(super) fn sweep(&self, t: &Timeouts) {
        let now = self.clock.tick();
        for a in self.open.lock().values() {
            if a.deadline(t).is_some_and(|d| now >= d) {
                a.tell_to_close();
            }
        }
    }

    pub(super) fn add(&self, a: Arc<Activity>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().insert(id, a);
        id
    }

    pub(super) fn remove(&self, id: u64) {
        self.open.lock().remove(&id);
    }

    /// Tells the oldest connection that has had no request in flight for at least `min_age`
    /// ms (since it opened or since its last response) to close; false if there is none.
    pub(super) fn evict_oldest_idle(&self, min_age: u64) -> bool {
        let now = self.clock.tick();
        let open = self.open.lock();
        for a in open.values() {
            if a.opened + min_age > now {
                // The map is in opening order: every later one is younger still.
                return false;
            }
            let quiet_since = a.opened.max(a.idle_since.load(Ordering::Acquire));
            if a.in_flight() == 0 && quiet_since + min_age <= now && a.tell_to_close() {
                return true;
            }
        }
        false
    }
}

/// What one connection is doing, for its deadlines. Times are [`Clock`] ms (+1 where 0 means
/// "not set").
pub(super) struct Activity {
    pub(super) clock: Arc<Clock>,
    pub(super) opened: u64,
    /// Requests started and not yet answered to the end of their body.
    pub(super) in_flight: AtomicUsize,
    /// Whether a request has started on this connection.
    pub(super) served: AtomicBool,
    /// When the last response ended.
    pub(super) idle_since: AtomicU64,
    /// When the first byte of the next request arrived (+1; 0 = none yet).
    pub(super) head_since: AtomicU64,
    /// Set on the first read: the connection speaks HTTP/2, whose idle connections carry
    /// frames (pings, settings) that are no request head.
    pub(super) h2: AtomicBool,
    pub(super) sniffed: AtomicBool,
    /// Told to close: a deadline passed, or room is needed at `server.max_connections`.
    pub(super) close: AtomicBool,
    /// Wakes the connection task when told to close.
    pub(super) told: Notify,
}

impl Activity {
    pub(super) fn new(clock: Arc<Clock>) -> Activity {
        Activity {
            opened: clock.tick(),
            clock,
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            sniffed: AtomicBool::new(false),
            close: AtomicBool::new(false),
            told: Notify::new(),
        }
    }

    /// Tells the connection to close, once; whether this call did.
    pub(super) fn tell_to_close(&self) -> bool {
        if self.close.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.told.notify_one();
        true
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When (clock ms) the connection must close if nothing changes; None while a request is
    /// in flight.
    pub(super) fn deadline(&self, t: &Timeouts) -> Option<u64> {
        if self.in_flight() > 0 {
            return None;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        if !self.served.load(Ordering::Acquire) {
            return Some(self.opened + ms(t.header));
        }
        let head = self.head_since.load(Ordering::Acquire);
        if head != 0 && !self.h2.load(Ordering::Relaxed) {
            return Some(head - 1 + ms(t.header));
        }
        Some(self.idle_since.load(Ordering::Acquire) + ms(t.idle))
    }

    /// Bytes arrived (at clock ms `at`): the first ones while no request is in flight start a
    /// head's clock.
    pub(super) fn read(&self, bytes: &[u8], at: u64) {
        if !self.sniffed.load(Ordering::Relaxed) && !self.sniffed.swap(true, Ordering::Relaxed) {
            self.h2.store(bytes.starts_with(b"PRI "), Ordering::Relaxed);
        }
        if self.in_flight() == 0 && self.head_since.load(Ordering::Relaxed) == 0 {
            let _ =
                self.head_since
                    .compare_exchange(0, at + 1, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    pub(super) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.head_since.store(0, Ordering::Release);
    }

    /// A response ended (at clock ms `at`).
    pub(super) fn request_ended(&self, at: u64) {
        self.idle_since.store(at, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held from a request's start to the end of its response body.
pub(super) struct RequestGuard(pub(super) Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended(self.0.clock.now());
    }
}

/// A response body that ends its request's [`RequestGuard`] when it is done or dropped.
pub(super) struct Guarded {
    pub(super) inner: Body,
    pub(super) _guard: RequestGuard,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client socket that tells its [`Activity`] about the bytes it reads.
pub(super) struct Watched {
    pub(super) inner: TcpStream,
    pub(super) activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let at = self.activity.clock.now();
            self.activity.read(&buf.filled()[before..], at);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }

    /// At the cap, the oldest connection that has been quiet for `min_age` is told to close,
    /// each once; busy and young ones never are.
    #[test]
    fn eviction_takes_the_oldest_quiet_one() {
        let r = Registry::new();
        let a: Vec<Arc<Activity>> = (0..3)
            .map(|_| Arc::new(Activity::new(r.clock.clone())))
            .collect();
        let ids: Vec<u64> = a.iter().map(|x| r.add(x.clone())).collect();
        a[0].request_started();
        assert!(!r.evict_oldest_idle(3_600_000), "all too young");
        assert!(r.evict_oldest_idle(0));
        assert!(!a[0].close.load(Ordering::Relaxed));
        assert!(a[1].close.load(Ordering::Relaxed));
        assert!(r.evict_oldest_idle(0));
        assert!(a[2].close.load(Ordering::Relaxed));
        assert!(!r.evict_oldest_idle(0), "only a busy connection is left");
        r.remove(ids[0]);
        assert!(!r.evict_oldest_idle(0));
    }

    /// Deadlines: a new connection has the header timeout; after a response, the idle timeout;
    /// once the next head's first byte arrives, the header timeout from then; none while a
    /// request is in flight; HTTP/2 frames on an idle connection are no head. The sweep tells
    /// exactly the connections past their deadline.
    #[test]
    fn deadlines_follow_the_connection() {
        let t = timeouts();
        let clock = Arc::new(Clock::new());
        let a = Activity::new(clock.clone());
        let open = a.opened;
        assert_eq!(a.deadline(&t), Some(open + 10_000));
        a.read(b"GET / HTTP/1.1\r\n", open);
        assert_eq!(a.deadline(&t), Some(open + 10_000));
        a.request_started();
        assert_eq!(a.deadline(&t), None);
        a.read(b"more", open + 1_000);
        assert_eq!(a.deadline(&t), None, "bytes of a request in flight");
        a.request_ended(open + 5_000);
        assert_eq!(a.deadline(&t), Some(open + 65_000));
        a.read(b"G", open + 25_000);
        assert_eq!(a.deadline(&t), Some(open + 35_000));
        a.read(b"ET", open + 26_000);
        assert_eq!(
            a.deadline(&t),
            Some(open + 35_000),
            "the clock runs from the first byte"
        );

        let h2 = Activity::new(clock.clone());
        let open = h2.opened;
        h2.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", open);
        h2.request_started();
        h2.request_ended(open + 1_000);
        h2.read(b"\0\0\x08\x06\0\0\0\0\0", open + 2_000); // a PING
        assert_eq!(h2.deadline(&t), Some(open + 61_000));

        let r = Registry::new();
        let fresh = Arc::new(Activity::new(r.clock.clone()));
        let stale = Arc::new(Activity::new(r.clock.clone()));
        stale.request_started();
        stale.request_ended(0);
        stale.read(b"P", 0);
        r.add(fresh.clone());
        r.add(stale.clone());
        let short = Timeouts {
            header: Duration::ZERO,
            ..t
        };
        r.sweep(&t);
        assert!(!fresh.close.load(Ordering::Relaxed));
        assert!(!stale.close.load(Ordering::Relaxed));
        r.sweep(&short);
        assert!(fresh.close.load(Ordering::Relaxed));
        assert!(stale.close.load(Ordering::Relaxed));
    }
}

//! Accepting and serving client connections (HTTP/1.1 and HTTP/2 cleartext, on hyper), so that
//! no client can hold a replica's connections or file descriptors for nothing:
//!
//! - `server.header_timeout_ms`: a request's head must arrive within this long of the
//!   connection opening, or of its first byte on a kept-alive connection (a client trickling
//!   headers is cut off);
//! - `server.body_timeout_ms`: a request's body must arrive within this long of its head, else
//!   the pipeline answers 408;
//! - `server.idle_timeout_ms`: a connection with no request in flight is closed after this long;
//! - `server.max_connections`: connections served at once. At the cap, a new connection makes
//!   the oldest one with no request in flight (idle, or still sending its head) close; when
//!   every connection is busy, new ones wait in the listen backlog. At start-up the cap is
//!   lowered to what the process's file-descriptor limit can hold, counting a backend
//!   connection for every client one.
//!
//! What a connection is doing is noted as it happens, at the cost of a few atomic operations:
//! a [`Watched`] socket notes when a request's first bytes arrive, the service notes when
//! requests start and responses end. One sweeper task checks every connection a few times per
//! second and tells each whose deadline has passed, with no request in flight, to close; so a
//! request costs no timer and no wake-up of its own.
//! Shutdown stops accepting, lets in-flight requests (streams included) finish for up to
//! `server.shutdown_grace_ms`, then closes what is left.

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::Request;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tollgate_common::config::ServerConfig;
use tower::ServiceExt as _;

/// File descriptors kept for everything but client and backend connections (the store, the
/// telemetry exporter, token endpoints, the listener, logs).
const RESERVED_FDS: u64 = 128;

/// After a connection is told to close, how long it may take before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// At the connection cap, a connection younger than this (or than the header timeout) is not
/// closed to make room: it has had no fair chance to send its request.
const EVICT_MIN_AGE: Duration = Duration::from_secs(1);

/// At the cap with nothing to close, how often closing is tried again.
const EVICT_RETRY: Duration = Duration::from_millis(100);

/// Longest pause between two sweeps of the connections (shorter for short timeouts).
const MAX_SWEEP: Duration = Duration::from_millis(250);

/// The connection timeouts, from `[server]`.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    header: Duration,
    body: Duration,
    idle: Duration,
}

/// Where the server is in its life; every connection task follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutdown: finish in-flight requests, accept no new ones.
    Draining,
    /// The grace period is over: close now.
    Closing,
}

/// `max_connections` as the file-descriptor limit `nofile` allows: every client connection
/// may need a backend connection too, and some descriptors are for everything else.
pub fn effective_max_connections(configured: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => {
            let room = (n.saturating_sub(RESERVED_FDS) / 2).max(1);
            configured.min(usize::try_from(room).unwrap_or(usize::MAX))
        }
        None => configured,
    }
}

/// The process's soft limit on open files (Linux `/proc/self/limits`); None where unknown.
fn nofile_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains (see the module docs).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let nofile = nofile_limit();
    let max = effective_max_connections(config.max_connections, nofile);
    if max < config.max_connections {
        tracing::warn!(
            configured = config.max_connections,
            serving = max,
            nofile = ?nofile,
            "server.max_connections lowered to what the file-descriptor limit holds (each client \
             connection may need a backend connection); raise `ulimit -n` to serve more"
        );
    }
    let timeouts = Timeouts {
        header: Duration::from_millis(config.header_timeout_ms),
        body: Duration::from_millis(config.body_timeout_ms),
        idle: Duration::from_millis(config.idle_timeout_ms),
    };
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    // `max` ≤ MAX_CONNECTIONS (validated), far below what a semaphore or u32 holds.
    let permits = Arc::new(Semaphore::new(max));
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let registry = Arc::new(Registry::new());
    let min_age = EVICT_MIN_AGE.min(timeouts.header).as_millis() as u64;
    let sweeper = {
        let registry = registry.clone();
        let every =
            (timeouts.header.min(timeouts.idle) / 8).clamp(Duration::from_millis(10), MAX_SWEEP);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                registry.sweep(&timeouts);
            }
        })
    };
    let mut last_warned: Option<Instant> = None;
    let mut last_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e, &mut last_warned).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Without TCP_NODELAY, Nagle holds a stream's first event behind the response head
        // until the client's delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        // At the cap, the connection that has waited longest without a request makes room (a
        // client trickling its head, an idle keep-alive), once it has had `min_age` to send
        // one; while every connection is busy or newer, this one waits.
        let permit = loop {
            if let Ok(p) = permits.clone().try_acquire_owned() {
                break Some(p);
            }
            let evicted = registry.evict_oldest_idle(min_age);
            if last_full.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                last_full = Some(Instant::now());
                tracing::warn!(
                    max_connections = max,
                    evicted,
                    "at server.max_connections: closing the oldest connections without a request"
                );
            }
            tokio::select! {
                p = permits.clone().acquire_owned() => break Some(p?),
                _ = tokio::time::sleep(EVICT_RETRY) => {}
                _ = &mut shutdown => break None,
            }
        };
        let Some(permit) = permit else { break };
        let activity = Arc::new(Activity::new(registry.clock.clone()));
        let id = registry.add(activity.clone());
        let conn = connection(
            tcp,
            activity,
            router.clone(),
            builder.clone(),
            timeouts,
            phase_rx.clone(),
        );
        let registry = registry.clone();
        tokio::spawn(async move {
            conn.await;
            registry.remove(id);
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    let _sweeper = AbortOnDrop(sweeper);
    let _ = phase_tx.send(Phase::Draining);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
        let _ = phase_tx.send(Phase::Closing);
        let _ = permits.acquire_many(all).await;
    }
    Ok(())
}

/// Stops a background task when the server stops, however it stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An accept that failed: a connection reset before it was accepted is nothing; anything
/// else (out of file descriptors) is logged at most every 5 s and waited out briefly.
async fn accept_failed(e: std::io::Error, last_warned: &mut Option<Instant>) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
        *last_warned = Some(Instant::now());
        tracing::error!(error = %e, "accepting a connection failed");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A coarse clock for connection times: ms since the server started, read (not computed) on
/// every socket read and advanced by each sweep and each accept.
struct Clock {
    epoch: Instant,
    now_ms: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }

    /// The time as of the last tick.
    fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Advances to the real time and returns it.
    fn tick(&self) -> u64 {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.now_ms.fetch_max(now, Ordering::Relaxed);
        now
    }
}

/// The open connections in the order they opened: swept for deadlines, and at the cap the one
/// that has waited longest without a request makes room for a new one.
struct Registry {
    clock: Arc<Clock>,
    next: AtomicU64,
    open: parking_lot::Mutex<BTreeMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            clock: Arc::new(Clock::new()),
            next: AtomicU64::new(0),
            open: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }

    /// Tells every connection whose deadline has passed (no request in flight) to close.
    fn sweep(&self, t: &Timeouts) {
        let now = self.clock.tick();
        for a in self.open.lock().values() {
            if a.deadline(t).is_some_and(|d| now >= d) {
                a.tell_to_close();
            }
        }
    }

    fn add(&self, a: Arc<Activity>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().insert(id, a);
        id
    }

    fn remove(&self, id: u64) {
        self.open.lock().remove(&id);
    }

    /// Tells the oldest connection that has had no request in flight for at least `min_age`
    /// ms (since it opened or since its last response) to close; false if there is none.
    fn evict_oldest_idle(&self, min_age: u64) -> bool {
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

/// One connection, from accept to close.
async fn connection(
    tcp: TcpStream,
    activity: Arc<Activity>,
    router: Router,
    builder: Arc<Builder<TokioExecutor>>,
    timeouts: Timeouts,
    mut phase: watch::Receiver<Phase>,
) {
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            activity.request_started();
            let guard = RequestGuard(activity.clone());
            let router = router.clone();
            let body_deadline = Instant::now() + timeouts.body;
            async move {
                let req = req.map(|b| Body::new(TimedBody::new(b, body_deadline)));
                let resp = router.oneshot(req).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|inner| Guarded {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    // An HTTP/2 connection told to close gets a GOAWAY first: dropped if it has not closed by
    // then and still has no request in flight.
    let mut close_by: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            changed = phase.changed() => {
                let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closing };
                match now {
                    Phase::Closing => return,
                    Phase::Draining if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
            }
            _ = activity.told.notified(), if close_by.is_none() => {
                if activity.in_flight() > 0 {
                    // A request started meanwhile: it is served; the connection may be told
                    // again.
                    activity.close.store(false, Ordering::Release);
                } else if !activity.h2.load(Ordering::Relaxed) {
                    // HTTP/1 with nothing in flight: closing loses nothing.
                    return;
                } else {
                    conn.as_mut().graceful_shutdown();
                    close_by = Some(Instant::now() + CLOSE_GRACE);
                }
            }
            _ = sleep_until(close_by) => {
                if activity.in_flight() == 0 {
                    return;
                }
                // A request slipped in: let the graceful close finish it.
                close_by = None;
                activity.close.store(false, Ordering::Release);
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What one connection is doing, for its deadlines. Times are [`Clock`] ms (+1 where 0 means
/// "not set").
struct Activity {
    clock: Arc<Clock>,
    opened: u64,
    /// Requests started and not yet answered to the end of their body.
    in_flight: AtomicUsize,
    /// Whether a request has started on this connection.
    served: AtomicBool,
    /// When the last response ended.
    idle_since: AtomicU64,
    /// When the first byte of the next request arrived (+1; 0 = none yet).
    head_since: AtomicU64,
    /// Set on the first read: the connection speaks HTTP/2, whose idle connections carry
    /// frames (pings, settings) that are no request head.
    h2: AtomicBool,
    sniffed: AtomicBool,
    /// Told to close: a deadline passed, or room is needed at `server.max_connections`.
    close: AtomicBool,
    /// Wakes the connection task when told to close.
    told: Notify,
}

impl Activity {
    fn new(clock: Arc<Clock>) -> Activity {
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
    fn tell_to_close(&self) -> bool {
        if self.close.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.told.notify_one();
        true
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When (clock ms) the connection must close if nothing changes; None while a request is
    /// in flight.
    fn deadline(&self, t: &Timeouts) -> Option<u64> {
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
    fn read(&self, bytes: &[u8], at: u64) {
        if !self.sniffed.load(Ordering::Relaxed) && !self.sniffed.swap(true, Ordering::Relaxed) {
            self.h2.store(bytes.starts_with(b"PRI "), Ordering::Relaxed);
        }
        if self.in_flight() == 0 && self.head_since.load(Ordering::Relaxed) == 0 {
            let _ =
                self.head_since
                    .compare_exchange(0, at + 1, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.head_since.store(0, Ordering::Release);
    }

    /// A response ended (at clock ms `at`).
    fn request_ended(&self, at: u64) {
        self.idle_since.store(at, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held from a request's start to the end of its response body.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended(self.0.clock.now());
    }
}

/// A response body that ends its request's [`RequestGuard`] when it is done or dropped.
struct Guarded {
    inner: Body,
    _guard: RequestGuard,
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

/// The request body did not arrive within `server.body_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

/// Whether a body error (anywhere in its chain of sources) is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<BodyTimeout>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A request body that fails with [`BodyTimeout`] once its deadline passes. The timer is set
/// only if the body does not arrive at once.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, deadline: Instant) -> TimedBody {
        TimedBody {
            inner,
            deadline,
            sleep: None,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client socket that tells its [`Activity`] about the bytes it reads.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
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

    /// The cap leaves room for a backend connection per client connection and a reserve;
    /// where the limit is unknown the configured cap stands.
    #[test]
    fn cap_fits_the_descriptor_limit() {
        assert_eq!(effective_max_connections(10_000, Some(1_048_576)), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(4_096)), 1_984);
        assert_eq!(effective_max_connections(10_000, Some(1_024)), 448);
        assert_eq!(effective_max_connections(10_000, Some(100)), 1);
        assert_eq!(effective_max_connections(10_000, None), 10_000);
        assert!(nofile_limit().is_some_and(|n| n > 0));
    }

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

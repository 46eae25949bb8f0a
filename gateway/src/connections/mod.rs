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
//! What each connection is doing, and when it must close, is kept in [`watch`]; the request
//! body deadline is in [`body`]. Shutdown stops accepting, lets in-flight requests (streams included) finish for up to
//! `server.shutdown_grace_ms`, then closes what is left.

mod body;
mod watch;

pub use body::{BodyTimeout, is_body_timeout};

use axum::Router;
use axum::body::Body;
use body::TimedBody;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch as channel};
use tokio::time::Instant;
use tollgate_common::config::ServerConfig;
use tower::ServiceExt as _;
use watch::{Activity, Guarded, Registry, RequestGuard, Watched};

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
    let (phase_tx, phase_rx) = channel::channel(Phase::Serving);
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

/// One connection, from accept to close.
async fn connection(
    tcp: TcpStream,
    activity: Arc<Activity>,
    router: Router,
    builder: Arc<Builder<TokioExecutor>>,
    timeouts: Timeouts,
    mut phase: channel::Receiver<Phase>,
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
}

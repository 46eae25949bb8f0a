//! The master of a Sentinel-managed Redis, followed across failovers: [`SentinelConn`] asks the
//! sentinels for the master of `master_name` (they check that it answers `ROLE` as a master),
//! keeps one multiplexed connection to it, and drops that connection on any sign that it no
//! longer leads — a broken link, a refused connection, or `READONLY` (the old master came
//! back as a replica) — so the next call asks the sentinels again. Until the sentinels have
//! promoted a replica, calls fail fast as unreachable and the gateway applies `on_error`.

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};
use std::sync::Arc;

/// One connection to whichever node the sentinels name as master. Clones share it.
#[derive(Clone)]
pub(crate) struct SentinelConn {
    inner: Arc<Inner>,
}

struct Inner {
    sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
    config: AsyncConnectionConfig,
    current: Mutex<Option<MultiplexedConnection>>,
}

impl SentinelConn {
    pub(crate) fn new(
        sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
        config: AsyncConnectionConfig,
    ) -> SentinelConn {
        SentinelConn {
            inner: Arc::new(Inner {
                sentinels,
                config,
                current: Mutex::new(None),
            }),
        }
    }

    /// The connection to the current master, asking the sentinels when there is none.
    async fn master(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.inner.current.lock().clone() {
            return Ok(c);
        }
        let mut sentinels = self.inner.sentinels.lock().await;
        // Another caller may have found it while this one waited.
        if let Some(c) = self.inner.current.lock().clone() {
            return Ok(c);
        }
        let client = sentinels.async_get_client().await?;
        drop(sentinels);
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.inner.config)
            .await?;
        *self.inner.current.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the connection after an error that says it may no longer reach the master.
    fn check<T>(&self, r: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &r
            && lost_master(e)
        {
            self.inner.current.lock().take();
        }
        r
    }
}

/// An error after which the connection may be talking to something other than the master.
fn lost_master(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = match self.master().await {
                Ok(mut c) => c.req_packed_command(cmd).await,
                Err(e) => Err(e),
            };
            self.check(r)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = match self.master().await {
                Ok(mut c) => c.req_packed_commands(pipeline, offset, count).await,
                Err(e) => Err(e),
            };
            self.check(r)
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

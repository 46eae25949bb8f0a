//! Connections: the pool's [`Conn`]s used round-robin (each reconnects, or follows the cluster
//! or the sentinels, on its own after a failure), the deadlines every operation runs under, scripts run with EVALSHA (and
//! loaded again on NOSCRIPT), and errors mapped to whose fault they are with every credential
//! scrubbed from their text.

use super::conn::Conn;
use super::target::{self, Credentials, Topology};
use super::*;
use crate::{Error, Result};
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind, Value};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

impl RedisStore {
    /// Connects to one server: `redis://host:port/db`, `rediss://…`, `redis+unix:///path.sock`
    /// or `unix:///path.sock` (see [`open`](Self::open)).
    pub async fn connect(url: &str, opts: RedisOpts) -> Result<RedisStore> {
        Self::open(
            &Topology::Single(url.to_string()),
            &Credentials::default(),
            opts,
        )
        .await
    }

    /// Connects to the deployment `topology` describes, checks that it answers and loads the
    /// scripts (on every master of a cluster). Fails with [`Error::Unavailable`] when it does
    /// not answer within `max(timeout, 2 s)`.
    pub async fn open(
        topology: &Topology,
        creds: &Credentials,
        opts: RedisOpts,
    ) -> Result<RedisStore> {
        let mut secrets: Vec<String> = match topology {
            Topology::Single(u) => url_secrets(u),
            Topology::Cluster(urls)
            | Topology::Sentinel {
                sentinels: urls, ..
            } => urls.iter().flat_map(|u| url_secrets(u)).collect(),
        };
        secrets.extend(creds.secrets());
        let scrubbed = |e: RedisError| Error::Unavailable(scrub(&secrets, e.to_string()));
        let wait = opts.timeout.max(Duration::from_secs(2));
        let connect_timeout = opts.timeout.max(Duration::from_secs(1));
        let pool = match tokio::time::timeout(
            wait,
            target::open(topology, creds, opts.pool_size, connect_timeout),
        )
        .await
        {
            Ok(r) => r.map_err(scrubbed)?,
            Err(_) => return Err(Error::Unavailable("no answer from redis".into())),
        };
        secrets.extend(pool.url_passwords.iter().filter(|p| !p.is_empty()).cloned());
        let store = RedisStore {
            inner: Arc::new(Inner {
                conns: pool.conns,
                settle_conn: pool.settle,
                next: AtomicUsize::new(0),
                opts,
                secrets,
                reserve: Script::new(RESERVE_LUA),
                settle: Script::new(SETTLE_LUA),
                seed: Script::new(SEED_LUA),
                breaker_failure: Script::new(BREAKER_FAILURE_LUA),
                breaker_probe: Script::new(BREAKER_PROBE_LUA),
                breaker_close: Script::new(BREAKER_CLOSE_LUA),
                heartbeat: Script::new(HEARTBEAT_LUA),
                team_reserve: Script::new(TEAM_RESERVE_LUA),
                team_settle: Script::new(TEAM_SETTLE_LUA),
                listen: pool.listen,
                events: tokio::sync::broadcast::channel(1024).0,
                listening: std::sync::atomic::AtomicBool::new(false),
                failure_seq: AtomicUsize::new(0),
                confirm: parking_lot::Mutex::new(Default::default()),
                instance: format!(
                    "{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() % 1_000_000_007)
                        .unwrap_or(0)
                ),
            }),
        };
        let mut conn = store.conn();
        let load = async {
            redis::cmd("PING").query_async::<Value>(&mut conn).await?;
            // On a cluster `SCRIPT LOAD` goes to every master.
            for s in [&store.inner.reserve, &store.inner.settle, &store.inner.seed] {
                s.load_async(&mut conn).await?;
            }
            Ok::<_, RedisError>(())
        };
        match tokio::time::timeout(wait, load).await {
            Ok(r) => r.map_err(|e| store.error(e))?,
            Err(_) => return Err(Error::Unavailable("no answer from redis".into())),
        }
        Ok(store)
    }

    pub(super) fn conn(&self) -> Conn {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    /// Runs one operation under the deadline `limit`, mapping its errors.
    pub(super) async fn timed<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, op).await {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// The request-path deadline.
    pub(super) async fn hot<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        self.timed(self.inner.opts.timeout, op).await
    }

    /// The background deadline (settle, heartbeats, leases), never shorter than the hot one.
    pub(super) async fn background<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let o = &self.inner.opts;
        self.timed(o.background_timeout.max(o.timeout), op).await
    }

    /// One plain command under the request-path deadline.
    pub(super) async fn hot_cmd<T: redis::FromRedisValue>(&self, cmd: Cmd) -> Result<T> {
        let mut conn = self.conn();
        self.hot(cmd.query_async(&mut conn)).await
    }

    /// One plain command under the admin deadline.
    pub(super) async fn admin_cmd<T: redis::FromRedisValue>(&self, cmd: Cmd) -> Result<T> {
        let mut conn = self.conn();
        self.admin(cmd.query_async(&mut conn)).await
    }

    /// The admin-path deadline (scans, seeding): these may touch many keys.
    pub(super) async fn admin<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        self.timed(self.inner.opts.timeout.max(Duration::from_secs(5)), op)
            .await
    }

    /// Whose fault: a connection problem is `Unavailable`; anything the server or a script
    /// answered that we cannot use is `Protocol`. Never carries a credential.
    pub(super) fn error(&self, e: RedisError) -> Error {
        let unavailable = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                ErrorKind::AuthenticationFailed
                    | ErrorKind::InvalidClientConfig
                    | ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::ClusterDown
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::ReadOnly
                    )
            );
        if e.is_timeout() {
            return Error::Timeout;
        }
        let msg = scrub(&self.inner.secrets, e.to_string());
        if unavailable {
            Error::Unavailable(msg)
        } else {
            Error::Protocol(msg)
        }
    }
}

/// `EVALSHA` of `script` with `keys` and `args` prepared.
pub(super) fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

pub(super) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Runs an EVALSHA; if the server lost its scripts (restart, `SCRIPT FLUSH`), loads the script
/// and retries once.
pub(super) async fn eval<T: redis::FromRedisValue>(
    conn: &mut Conn,
    script: &Script,
    cmd: &Cmd,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if is_noscript(&e) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        r => r,
    }
}

/// The substrings of `url` that are credentials: the userinfo password and a `pass=` query
/// parameter (unix socket URLs), raw and percent-decoded.
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            out.push(
                userinfo
                    .split_once(':')
                    .map_or(userinfo, |(_, p)| p)
                    .to_string(),
            );
        }
        if let Some((_, query)) = rest.split_once('?') {
            for kv in query.split('&') {
                if let Some(("pass" | "password", p)) = kv.split_once('=') {
                    out.push(p.to_string());
                }
            }
        }
    }
    let decoded: Vec<String> = out.iter().map(|s| percent_decode(s)).collect();
    out.extend(decoded);
    out.retain(|s| !s.is_empty());
    out
}

pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn scrub(secrets: &[String], mut msg: String) -> String {
    for s in secrets {
        if msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "***");
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials in a URL are found in both its userinfo and `pass=` forms, and scrubbed.
    #[test]
    fn secrets_are_scrubbed() {
        let s = url_secrets("redis://user:s%40cret@host:6379/0");
        assert!(s.contains(&"s%40cret".to_string()) && s.contains(&"s@cret".to_string()));
        let s = url_secrets("redis+unix:///tmp/r.sock?db=1&pass=hunter2");
        assert_eq!(scrub(&s, "auth hunter2 failed".into()), "auth *** failed");
        assert!(url_secrets("redis://127.0.0.1:6379/0").is_empty());
    }
}

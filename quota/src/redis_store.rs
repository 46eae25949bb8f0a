//! The Redis store: the cluster's shared state, so N replicas enforce limits as one process
//! would. Every request-path operation is one round trip: `reserve` is one EVALSHA of
//! `quota/lua/reserve.lua`, and `settle` sends one EVALSHA of `quota/lua/settle.lua` per
//! consumer in the batch, pipelined. The scripts are the memory store's logic line for line;
//! the conformance suite (`tests/tests/conformance.rs`) holds the two together.
//!
//! Connections are multiplexed [`ConnectionManager`]s, used round-robin; each reconnects on
//! its own after a failure. They beat a checkout pool here: deadpool-redis PINGs on every
//! checkout, which would double the round trips of the hot path. Every operation runs under
//! [`RedisOpts::timeout`]. The key schema is a contract, documented in `docs/REDIS.md`.

use crate::model::*;
use crate::{Error, Result, Store};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, ErrorKind, RedisError, Script, ServerErrorKind, Value};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const RESERVE_LUA: &str = include_str!("../lua/reserve.lua");
const SETTLE_LUA: &str = include_str!("../lua/settle.lua");
const SEED_LUA: &str = include_str!("../lua/seed_consumer.lua");
const BREAKER_FAILURE_LUA: &str = include_str!("../lua/breaker_failure.lua");
const BREAKER_PROBE_LUA: &str = include_str!("../lua/breaker_probe.lua");
const BREAKER_CLOSE_LUA: &str = include_str!("../lua/breaker_close.lua");
const HEARTBEAT_LUA: &str = include_str!("../lua/heartbeat.lua");
/// The pub/sub channel of circuit changes.
pub const BREAKER_CHANNEL: &str = "tg:breaker";

/// Metric names of the usage hash fields, in [`UsageDelta`] order.
const METRICS: [&str; 5] = ["in", "out", "cached", "req", "cost"];

/// How to reach Redis and how long to wait for it.
#[derive(Clone, Debug)]
pub struct RedisOpts {
    /// Deadline of one operation on the request path (round trip included); past it the
    /// caller gets [`Error::Timeout`] and applies its `on_error` policy.
    pub timeout: Duration,
    /// Deadline of work off the request path (settle batches, heartbeats, lease reserves):
    /// a slow link delays it but does not fail it, since slow is not down.
    pub background_timeout: Duration,
    /// Multiplexed connections used round-robin (at least 1).
    pub pool_size: usize,
    /// Added to Redis `TIME` in the scripts: a test hook to place "now" near a window boundary.
    /// Always 0 in production.
    pub time_offset_ms: i64,
    /// How long daily usage totals (`tg:usage:{ID}:YYYYMMDD`) are kept.
    pub usage_retention_days: u32,
}

impl Default for RedisOpts {
    fn default() -> Self {
        RedisOpts {
            timeout: Duration::from_millis(50),
            background_timeout: Duration::from_secs(2),
            pool_size: 16,
            time_offset_ms: 0,
            usage_retention_days: 400,
        }
    }
}

/// A [`Store`] in Redis (standalone; every script touches one hash slot, so it is Cluster-ready).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    opts: RedisOpts,
    /// Credentials from the URL, scrubbed from every error message.
    secrets: Vec<String>,
    reserve: Script,
    settle: Script,
    seed: Script,
    breaker_failure: Script,
    breaker_probe: Script,
    breaker_close: Script,
    heartbeat: Script,
    client: Client,
    /// Circuit changes from the pub/sub listener (started on first subscription).
    events: tokio::sync::broadcast::Sender<BreakerState>,
    listening: std::sync::atomic::AtomicBool,
    /// Makes each counted failure a distinct member of the window's sorted set.
    failure_seq: AtomicUsize,
    instance: String,
}

impl RedisStore {
    /// Connects to `redis://host:port/db`, `redis+unix:///path.sock` or `unix:///path.sock`,
    /// checks that the server answers and loads the scripts. Fails with
    /// [`Error::Unavailable`] when it does not answer within `max(timeout, 2 s)`.
    pub async fn connect(url: &str, opts: RedisOpts) -> Result<RedisStore> {
        let store = Self::connect_lazy(url, opts)?;
        let wait = store.inner.opts.timeout.max(Duration::from_secs(2));
        let mut conn = store.conn();
        let load = async {
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
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

    /// Like [`connect`](Self::connect) but does not wait for the server: connections (and
    /// scripts) are set up on first use, so a gateway can start while Redis is down. Fails
    /// only on a malformed URL.
    pub fn connect_lazy(url: &str, opts: RedisOpts) -> Result<RedisStore> {
        let secrets = url_secrets(url);
        let scrub = |msg: String| scrub(&secrets, msg);
        let client = Client::open(url)
            .map_err(|e| Error::Unavailable(scrub(format!("bad redis url: {e}"))))?;
        let mut secrets = secrets.clone();
        if let Some(p) = client.get_connection_info().redis_settings().password()
            && !p.is_empty()
        {
            secrets.push(p.to_string());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.timeout.max(Duration::from_secs(1))))
            .set_response_timeout(None)
            // One quick retry: while Redis is down each call fails fast (the gateway falls
            // back), and the next call after a failure starts a fresh reconnect.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conns = (0..opts.pool_size.max(1))
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Unavailable(scrub(e.to_string())))?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conns,
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
                client: client.clone(),
                events: tokio::sync::broadcast::channel(1024).0,
                listening: std::sync::atomic::AtomicBool::new(false),
                failure_seq: AtomicUsize::new(0),
                instance: format!(
                    "{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() % 1_000_000_007)
                        .unwrap_or(0)
                ),
            }),
        })
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    /// Runs one operation under the deadline `limit`, mapping its errors.
    async fn timed<T>(
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
    async fn hot<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        self.timed(self.inner.opts.timeout, op).await
    }

    /// The background deadline (settle, heartbeats, leases), never shorter than the hot one.
    async fn background<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        let o = &self.inner.opts;
        self.timed(o.background_timeout.max(o.timeout), op).await
    }

    /// The admin-path deadline (scans, seeding): these may touch many keys.
    async fn admin<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        self.timed(self.inner.opts.timeout.max(Duration::from_secs(5)), op)
            .await
    }

    /// Whose fault: a connection problem is `Unavailable`; anything the server or a script
    /// answered that we cannot use is `Protocol`. Never carries a credential.
    fn error(&self, e: RedisError) -> Error {
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
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Runs an EVALSHA; if the server lost its scripts (restart, `SCRIPT FLUSH`), loads the script
/// and retries once.
async fn eval<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
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

fn consumer_key(id: &str) -> String {
    format!("tg:consumer:{{{id}}}")
}

fn bucket_key(id: &str) -> String {
    format!("tg:bucket:{{{id}}}")
}

fn quota_key(id: &str) -> String {
    format!("tg:quota:{{{id}}}")
}

fn reservation_key(id: &str, reservation: u64) -> String {
    format!("tg:resv:{{{id}}}:{reservation:x}")
}

fn usage_key(id: &str, day: u32) -> String {
    format!("tg:usage:{{{id}}}:{day}")
}

fn breaker_key(backend: &str) -> String {
    format!("tg:breaker:{{{backend}}}")
}

fn bfail_key(backend: &str) -> String {
    format!("tg:bfail:{{{backend}}}")
}

/// Parses a `BACKEND open_until trip now` pub/sub message.
fn parse_breaker_message(msg: &str) -> Option<BreakerState> {
    let mut it = msg.rsplitn(4, ' ');
    let now_ms = it.next()?.parse().ok()?;
    let trip = it.next()?.parse().ok()?;
    let open_until_ms = it.next()?.parse().ok()?;
    let backend = it.next()?.to_string();
    Some(BreakerState {
        backend,
        open_until_ms,
        trip,
        now_ms,
    })
}

/// A `tg:breaker:{BACKEND}` row as read by `HMGET open_until trip`: absent fields are a closed
/// circuit; anything but integers, or an open_until further ahead than one trip can reach, is
/// not a state (None).
fn parse_breaker_row(
    backend: &str,
    open_until: Option<&str>,
    trip: Option<&str>,
    now_ms: u64,
) -> Option<BreakerState> {
    let open_until_ms: u64 = open_until.map_or(Ok(0), str::parse).ok()?;
    let trip: u64 = trip.map_or(Ok(0), str::parse).ok()?;
    if open_until_ms > now_ms.saturating_add(MAX_TRIP_MS) {
        return None;
    }
    Some(BreakerState {
        backend: backend.to_string(),
        open_until_ms,
        trip,
        now_ms,
    })
}

/// Listens on the breaker channel, reconnecting with backoff, forwarding to `tx`.
async fn breaker_listener(client: Client, tx: tokio::sync::broadcast::Sender<BreakerState>) {
    use futures::StreamExt as _;
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.receiver_count() == 0 {
            return;
        }
        match client.get_async_pubsub().await {
            Ok(mut ps) => {
                if ps.subscribe(BREAKER_CHANNEL).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    let mut stream = ps.on_message();
                    while let Some(msg) = stream.next().await {
                        if let Ok(text) = msg.get_payload::<String>()
                            && let Some(state) = parse_breaker_message(&text)
                        {
                            let _ = tx.send(state);
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "breaker channel: cannot connect"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn seed_keys_key(id: &str) -> String {
    format!("tg:seedkeys:{{{id}}}")
}

/// Set once every configured consumer was seeded; gone when Redis lost its data.
const SEEDED_KEY: &str = "tg:seeded";

fn api_key(sha: &str) -> String {
    format!("tg:key:{sha}")
}

/// Pushes a `u64` limit, or `""` for none (keeps ARGV positions fixed).
fn opt_arg(cmd: &mut Cmd, v: Option<u64>) {
    match v {
        Some(n) => cmd.arg(n),
        None => cmd.arg(""),
    };
}

/// The hash fields of a consumer record; unset limits are left out (absent = unset).
fn record_fields(c: &ConsumerRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![("team", c.team.clone())];
    if let Some(t) = c.tpm {
        f.push(("tpm", t.to_string()));
    }
    if let Some(q) = c.quota {
        f.push(("quota", q.to_string()));
    }
    f.push(("quota_period", c.quota_period.as_str().to_string()));
    f.push(("models", c.models.join(",")));
    f.push(("disabled", if c.disabled { "1" } else { "0" }.to_string()));
    f
}

fn parse_limit(id: &str, field: &str, v: Option<&String>) -> Result<Option<u64>> {
    match v.map(|s| s.trim()) {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            Error::Protocol(format!(
                "tg:consumer:{{{id}}} field {field} is not a whole number: {s}"
            ))
        }),
    }
}

fn decode_record(id: &str, h: HashMap<String, String>) -> Result<ConsumerRecord> {
    let quota_period = match h.get("quota_period").map(|s| s.trim()) {
        None | Some("") => Period::default(),
        Some(p) => Period::parse(p).ok_or_else(|| {
            Error::Protocol(format!(
                "tg:consumer:{{{id}}} quota_period is not hour|day|week|month"
            ))
        })?,
    };
    Ok(ConsumerRecord {
        id: id.to_string(),
        team: h.get("team").cloned().unwrap_or_default(),
        tpm: parse_limit(id, "tpm", h.get("tpm"))?,
        quota: parse_limit(id, "quota", h.get("quota"))?,
        quota_period,
        models: h
            .get("models")
            .map(|m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
            })
            .into_iter()
            .flatten()
            .collect(),
        disabled: matches!(h.get("disabled").map(|s| s.trim()), Some("1" | "true")),
    })
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::Protocol(format!("reserve.lua returned a bad number: {s}")))
}

fn decode_decision(v: &[String]) -> Result<Decision> {
    fn opt<T: std::str::FromStr>(s: &str) -> Result<Option<T>> {
        if s.is_empty() {
            Ok(None)
        } else {
            num(s).map(Some)
        }
    }
    let bad = || Error::Protocol(format!("reserve.lua returned {v:?}"));
    Ok(match v.first().map(String::as_str) {
        Some("A") if v.len() == 8 => Decision::Admitted(Admission {
            team: v[1].clone(),
            remaining_tpm: opt(&v[2])?,
            remaining_quota: opt(&v[3])?,
            window: num(&v[4])?,
            tpm: opt(&v[5])?,
            quota: opt(&v[6])?,
            quota_period: Period::parse(&v[7]).ok_or_else(bad)?,
        }),
        Some("R") if v.len() == 3 => Decision::RateLimited {
            retry_after_ms: num(&v[1])?,
            remaining_tpm: num(&v[2])?,
        },
        Some("Q") if v.len() == 3 => Decision::QuotaExceeded {
            retry_after_ms: num(&v[1])?,
            remaining_quota: num(&v[2])?,
        },
        Some("M") => Decision::ModelNotAllowed,
        Some("D") => Decision::Disabled,
        Some("U") => Decision::UnknownConsumer,
        Some("C") => Decision::Cancelled,
        _ => return Err(bad()),
    })
}

/// The substrings of `url` that are credentials: the userinfo password and a `pass=` query
/// parameter (unix socket URLs), raw and percent-decoded.
fn url_secrets(url: &str) -> Vec<String> {
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

fn percent_decode(s: &str) -> String {
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

fn scrub(secrets: &[String], mut msg: String) -> String {
    for s in secrets {
        if msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "***");
        }
    }
    msg
}

/// Usage of one consumer in one settle batch, summed per day × team × model × backend.
#[derive(Default)]
struct UsageSum {
    rows: Vec<((u32, String), [u64; 5])>,
}

impl UsageSum {
    fn add(&mut self, u: &UsageDelta) {
        let field = format!("{}|{}|{}", u.team, u.model, u.backend);
        let v = [u.input, u.output, u.cached_input, u.requests, u.cost_pico];
        match self
            .rows
            .iter_mut()
            .find(|(k, _)| k.0 == u.day && k.1 == field)
        {
            Some((_, t)) => t.iter_mut().zip(v).for_each(|(t, v)| *t += v),
            None => self.rows.push(((u.day, field), v)),
        }
    }
}

/// Parses `tg:usage:{ID}:YYYYMMDD` into (ID, day).
fn parse_usage_key(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("tg:usage:{")?;
    let (id, day) = rest.rsplit_once("}:")?;
    Some((id, day.parse().ok()?))
}

/// Parses a usage field `<team>|<model>|<backend>|<metric>` (the model may contain `|`).
fn parse_usage_field(field: &str) -> Option<(&str, &str, &str, usize)> {
    let (rest, metric) = field.rsplit_once('|')?;
    let metric = METRICS.iter().position(|m| *m == metric)?;
    let (team, rest) = rest.split_once('|')?;
    let (model, backend) = rest.rsplit_once('|')?;
    Some((team, model, backend, metric))
}

impl Store for RedisStore {
    async fn lookup_key(&self, key_sha256: &str) -> Result<Option<String>> {
        let mut conn = self.conn();
        let cmd = redis::cmd("GET").arg(api_key(key_sha256)).to_owned();
        self.hot(cmd.query_async(&mut conn)).await
    }

    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<Decision> {
        let (c, b, q, r) = (
            consumer_key(req.consumer),
            bucket_key(req.consumer),
            quota_key(req.consumer),
            reservation_key(req.consumer, req.id),
        );
        let mut cmd = evalsha(&self.inner.reserve, &[&c, &b, &q, &r]);
        cmd.arg(req.model)
            .arg(req.tokens)
            .arg(if req.require_record { "1" } else { "0" });
        opt_arg(&mut cmd, req.defaults.tpm);
        opt_arg(&mut cmd, req.defaults.quota);
        cmd.arg(req.defaults.quota_period.as_str())
            .arg(self.inner.opts.time_offset_ms)
            .arg(crate::RESERVATION_TTL_MS);
        let mut conn = self.conn();
        let run = eval(&mut conn, &self.inner.reserve, &cmd);
        let v: Vec<String> = if req.background {
            self.background(run).await?
        } else {
            self.hot(run).await?
        };
        decode_decision(&v)
    }

    async fn settle(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        // Group by consumer, keeping each consumer's corrections in order.
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<(&str, Vec<&Settlement>, UsageSum)> = Vec::new();
        for s in batch {
            let i = *index.entry(&s.consumer).or_insert_with(|| {
                groups.push((&s.consumer, Vec::new(), UsageSum::default()));
                groups.len() - 1
            });
            let g = &mut groups[i];
            if s.actual != s.reserved || s.end != ReservationEnd::None {
                g.1.push(s);
            }
            if let Some(u) = &s.usage {
                g.2.add(u);
            }
        }
        let retention = u64::from(self.inner.opts.usage_retention_days) * 86_400;
        let mut cmds = Vec::with_capacity(groups.len());
        for (id, corrections, usage) in &groups {
            if corrections.is_empty() && usage.rows.is_empty() {
                continue;
            }
            let mut keys = vec![
                bucket_key(id),
                quota_key(id),
                format!("tg:settled:{{{id}}}:{batch_id:x}"),
            ];
            let mut days: Vec<u32> = Vec::new();
            for ((day, _), _) in &usage.rows {
                if !days.contains(day) {
                    days.push(*day);
                    keys.push(usage_key(id, *day));
                }
            }
            let first_record = keys.len() + 1;
            for s in corrections {
                if let ReservationEnd::Settled { id: r, .. } | ReservationEnd::Abandoned { id: r } =
                    s.end
                {
                    keys.push(reservation_key(id, r));
                }
            }
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut cmd = evalsha(&self.inner.settle, &keys);
            cmd.arg(self.inner.opts.time_offset_ms)
                .arg(retention)
                .arg(corrections.len())
                .arg(crate::RESERVATION_TTL_MS);
            let mut record = first_record;
            for s in corrections {
                let (key, mode) = match s.end {
                    ReservationEnd::None => (0, "c"),
                    ReservationEnd::Settled { retried: false, .. } => (record, "c"),
                    ReservationEnd::Settled { retried: true, .. } => (record, "r"),
                    ReservationEnd::Abandoned { .. } => (record, "a"),
                };
                if key > 0 {
                    record += 1;
                }
                cmd.arg(key)
                    .arg(mode)
                    .arg(s.actual as i64 - s.reserved as i64);
                opt_arg(&mut cmd, s.tpm);
                if s.window == ANY_WINDOW {
                    cmd.arg("any");
                } else {
                    cmd.arg(s.window);
                }
            }
            for ((day, field), v) in &usage.rows {
                let k = 4 + days.iter().position(|d| d == day).unwrap_or(0);
                cmd.arg(k).arg(field).arg(&v[..]);
            }
            cmds.push(cmd);
        }
        if cmds.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let script = &self.inner.settle;
        self.background(async move {
            let mut pending: Vec<&Cmd> = cmds.iter().collect();
            for attempt in 0..2 {
                let mut pipe = redis::pipe();
                for c in &pending {
                    pipe.add_command((*c).clone());
                }
                let results: Vec<redis::RedisResult<Value>> =
                    pipe.ignore_errors().query_async(&mut conn).await?;
                let mut retry = Vec::new();
                for (c, r) in pending.iter().zip(results) {
                    match r {
                        Ok(_) => {}
                        // Only the calls that did not run are sent again: a retry never
                        // applies a settlement twice.
                        Err(e) if is_noscript(&e) && attempt == 0 => retry.push(*c),
                        Err(e) => return Err(e),
                    }
                }
                if retry.is_empty() {
                    break;
                }
                script.load_async(&mut conn).await?;
                pending = retry;
            }
            Ok(())
        })
        .await
    }

    async fn seed_consumer(
        &self,
        consumer: &ConsumerRecord,
        key_hashes: &[String],
    ) -> Result<bool> {
        let key = consumer_key(&consumer.id);
        let mut cmd = evalsha(&self.inner.seed, &[&key]);
        for (f, v) in record_fields(consumer) {
            cmd.arg(f).arg(v);
        }
        let mut conn = self.conn();
        let written: i64 = self.admin(eval(&mut conn, &self.inner.seed, &cmd)).await?;
        if !key_hashes.is_empty() {
            let mut pipe = redis::pipe();
            for h in key_hashes {
                pipe.cmd("SET")
                    .arg(api_key(h))
                    .arg(&consumer.id)
                    .arg("NX")
                    .ignore();
            }
            self.admin(pipe.exec_async(&mut conn)).await?;
            // The marker only after the keys are written: a key the marker names but the store
            // lacks is a revoked key, never one that failed to be written.
            let cmd = redis::cmd("SADD")
                .arg(seed_keys_key(&consumer.id))
                .arg(key_hashes)
                .to_owned();
            self.admin(cmd.exec_async(&mut conn)).await?;
        }
        Ok(written == 1)
    }

    async fn key_was_seeded(&self, consumer: &str, key_sha256: &str) -> Result<bool> {
        let cmd = redis::cmd("SISMEMBER")
            .arg(seed_keys_key(consumer))
            .arg(key_sha256)
            .to_owned();
        let mut conn = self.conn();
        self.hot(cmd.query_async(&mut conn)).await
    }

    async fn mark_seeded(&self) -> Result<()> {
        let cmd = redis::cmd("SET").arg(SEEDED_KEY).arg("1").to_owned();
        let mut conn = self.conn();
        self.admin(cmd.exec_async(&mut conn)).await
    }

    async fn is_seeded(&self) -> Result<bool> {
        let cmd = redis::cmd("EXISTS").arg(SEEDED_KEY).to_owned();
        let mut conn = self.conn();
        self.admin(cmd.query_async(&mut conn)).await
    }

    async fn put_consumer(&self, consumer: &ConsumerRecord) -> Result<()> {
        let key = consumer_key(&consumer.id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(&key)
            .ignore()
            .hset_multiple(&key, &record_fields(consumer))
            .ignore();
        let mut conn = self.conn();
        self.admin(pipe.exec_async(&mut conn)).await
    }

    async fn put_key(&self, key_sha256: &str, consumer: &str) -> Result<()> {
        let cmd = redis::cmd("SET")
            .arg(api_key(key_sha256))
            .arg(consumer)
            .to_owned();
        let mut conn = self.conn();
        self.admin(cmd.exec_async(&mut conn)).await
    }

    async fn get_consumer(&self, id: &str) -> Result<Option<ConsumerRecord>> {
        let cmd = redis::cmd("HGETALL").arg(consumer_key(id)).to_owned();
        let mut conn = self.conn();
        let h: HashMap<String, String> = self.hot(cmd.query_async(&mut conn)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        decode_record(id, h).map(Some)
    }

    async fn usage(&self, since: u32, until: u32) -> Result<Vec<UsageRow>> {
        let mut conn = self.conn();
        // The admin path: SCAN is O(keyspace), never on the request path.
        let mut keys = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let cmd = redis::cmd("SCAN")
                .cursor_arg(cursor)
                .arg("MATCH")
                .arg("tg:usage:*")
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, batch): (u64, Vec<String>) = self.admin(cmd.query_async(&mut conn)).await?;
            for k in batch {
                if parse_usage_key(&k).is_some_and(|(_, d)| d >= since && d <= until) {
                    keys.insert(k);
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let mut rows: HashMap<(u32, &str, &str, &str, &str), UsageRow> = HashMap::new();
        let mut hashes = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(200) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.hgetall(k);
            }
            let got: Vec<HashMap<String, String>> = self.admin(pipe.query_async(&mut conn)).await?;
            hashes.extend(chunk.iter().zip(got));
        }
        for (key, h) in &hashes {
            let Some((consumer, day)) = parse_usage_key(key) else {
                continue;
            };
            for (field, value) in h {
                let Some((team, model, backend, metric)) = parse_usage_field(field) else {
                    continue;
                };
                let v: u64 = value.parse().map_err(|_| {
                    Error::Protocol(format!("{key} field {field} is not a count: {value}"))
                })?;
                let r = rows
                    .entry((day, consumer, team, model, backend))
                    .or_insert_with(|| UsageRow {
                        day,
                        consumer: consumer.to_string(),
                        team: team.to_string(),
                        model: model.to_string(),
                        backend: backend.to_string(),
                        ..UsageRow::default()
                    });
                *match metric {
                    0 => &mut r.input,
                    1 => &mut r.output,
                    2 => &mut r.cached_input,
                    3 => &mut r.requests,
                    _ => &mut r.cost_pico,
                } += v;
            }
        }
        let mut rows: Vec<UsageRow> = rows.into_values().collect();
        rows.sort_by(|a, b| {
            (a.day, &a.consumer, &a.model, &a.backend, &a.team).cmp(&(
                b.day,
                &b.consumer,
                &b.model,
                &b.backend,
                &b.team,
            ))
        });
        Ok(rows)
    }

    async fn heartbeat(&self, replica: &str, ttl_ms: u64) -> Result<u32> {
        let mut conn = self.conn();
        let mut cmd = evalsha(&self.inner.heartbeat, &["tg:replicas"]);
        cmd.arg(replica).arg(ttl_ms);
        let n: u32 = self
            .background(eval(&mut conn, &self.inner.heartbeat, &cmd))
            .await?;
        Ok(n.max(1))
    }

    async fn breaker_failure(&self, backend: &str, f: &BreakerFailure) -> Result<BreakerState> {
        let mut conn = self.conn();
        let (k1, k2) = (breaker_key(backend), bfail_key(backend));
        let mut cmd = evalsha(&self.inner.breaker_failure, &[&k1, &k2]);
        let seq = self.inner.failure_seq.fetch_add(1, Ordering::Relaxed);
        let f = f.bounded();
        cmd.arg(f.failures)
            .arg(f.window_ms)
            .arg(f.trip_ms)
            .arg(f.trip_for_ms.map(|v| v.to_string()).unwrap_or_default())
            .arg(if f.probe { "1" } else { "0" })
            .arg(BREAKER_CHANNEL)
            .arg(format!("{}:{seq}", self.inner.instance))
            .arg(MAX_TRIP_MS);
        let v: Vec<String> = self
            .hot(eval(&mut conn, &self.inner.breaker_failure, &cmd))
            .await?;
        let bad = || Error::Protocol(format!("breaker_failure.lua returned {v:?}"));
        Ok(BreakerState {
            backend: backend.to_string(),
            open_until_ms: v.first().and_then(|s| s.parse().ok()).ok_or_else(bad)?,
            trip: v.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?,
            now_ms: v.get(2).and_then(|s| s.parse().ok()).ok_or_else(bad)?,
        })
    }

    async fn breaker_close(&self, backend: &str) -> Result<bool> {
        let mut conn = self.conn();
        let (k1, k2) = (breaker_key(backend), bfail_key(backend));
        let mut cmd = evalsha(&self.inner.breaker_close, &[&k1, &k2]);
        cmd.arg(BREAKER_CHANNEL).arg(MAX_TRIP_MS);
        let n: i64 = self
            .hot(eval(&mut conn, &self.inner.breaker_close, &cmd))
            .await?;
        Ok(n == 1)
    }

    async fn breaker_probe(&self, backend: &str, lease_ms: u64) -> Result<bool> {
        let mut conn = self.conn();
        let k1 = breaker_key(backend);
        let mut cmd = evalsha(&self.inner.breaker_probe, &[&k1]);
        cmd.arg(lease_ms.max(1)).arg(MAX_TRIP_MS);
        let n: i64 = self
            .hot(eval(&mut conn, &self.inner.breaker_probe, &cmd))
            .await?;
        Ok(n == 1)
    }

    async fn breaker_states(&self, backends: &[String]) -> Result<Vec<BreakerState>> {
        let mut conn = self.conn();
        let (secs, micros): (u64, u64) = self
            .admin(redis::cmd("TIME").query_async(&mut conn))
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        let mut pipe = redis::pipe();
        for b in backends {
            pipe.cmd("HMGET")
                .arg(breaker_key(b))
                .arg("open_until")
                .arg("trip");
        }
        // Read as text: one row this version could not have written must not fail the others.
        let rows: Vec<(Option<String>, Option<String>)> = if backends.is_empty() {
            Vec::new()
        } else {
            self.admin(pipe.query_async(&mut conn)).await?
        };
        Ok(backends
            .iter()
            .zip(rows)
            .filter_map(|(b, (o, t))| {
                let state = parse_breaker_row(b, o.as_deref(), t.as_deref(), now_ms);
                if state.is_none() {
                    tracing::warn!(backend = %b, open_until = ?o, trip = ?t,
                        "circuit state in the store is not valid; skipped");
                }
                state
            })
            .collect())
    }

    fn breaker_events(&self) -> tokio::sync::broadcast::Receiver<BreakerState> {
        let rx = self.inner.events.subscribe();
        if !self.inner.listening.swap(true, Ordering::SeqCst) {
            tokio::spawn(breaker_listener(
                self.inner.client.clone(),
                self.inner.events.clone(),
            ));
        }
        rx
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn();
        self.hot(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(|_| ())
    }
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

    /// Usage keys and fields parse back into their parts; a model may contain `|`.
    #[test]
    fn usage_names_parse() {
        assert_eq!(
            parse_usage_key("tg:usage:{team-a}:20260101"),
            Some(("team-a", 20260101))
        );
        assert_eq!(parse_usage_key("tg:usage:{x}:notaday"), None);
        assert_eq!(
            parse_usage_field("fin|gpt|4o|ptu-1|cost"),
            Some(("fin", "gpt|4o", "ptu-1", 4))
        );
        assert_eq!(parse_usage_field("fin|gpt-4o|ptu-1|bogus"), None);
    }

    /// A hash written by `put_consumer` decodes to the same record; absent fields are unset.
    #[test]
    fn record_round_trip() {
        let rec = ConsumerRecord {
            id: "a".into(),
            team: "fin".into(),
            tpm: Some(10),
            quota: None,
            quota_period: Period::Week,
            models: vec!["m1".into(), "m2".into()],
            disabled: true,
        };
        let h = record_fields(&rec)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(decode_record("a", h).ok(), Some(rec));
    }

    /// A circuit row parses when it holds integers within one trip from now; a float, a word or
    /// an open_until years ahead is no state (and the re-sync skips it).
    #[test]
    fn breaker_rows_parse_or_are_skipped() {
        let now = 1_700_000_000_000;
        let st = parse_breaker_row("b", Some("1700000005000"), Some("3"), now).unwrap();
        assert_eq!((st.open_for_ms(), st.trip), (5_000, 3));
        assert_eq!(
            parse_breaker_row("b", None, None, now).map(|s| s.open_until_ms),
            Some(0)
        );
        for bad in ["1.8446744073709552e+19", "inf", "nan", "-5", "x"] {
            assert!(
                parse_breaker_row("b", Some(bad), Some("1"), now).is_none(),
                "{bad}"
            );
        }
        assert!(parse_breaker_row("b", Some("1"), Some("1e3"), now).is_none());
        let far = (now + MAX_TRIP_MS + 1).to_string();
        assert!(parse_breaker_row("b", Some(&far), Some("1"), now).is_none());
    }
}

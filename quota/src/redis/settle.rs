//! Settle batches: the settlements of a batch grouped per consumer (each consumer's
//! corrections in order, its usage summed per day × team × model × backend), one
//! `settle.lua` call per consumer, and one `team_settle.lua` call per team whose budget a
//! settlement corrects, all in one pipeline (one per slot on a cluster), on a connection of
//! their own. A call lost to NOSCRIPT is sent again alone after the script is loaded; a batch
//! is applied once per id (`tg:settled:{ID}:<batch>`).
//!
//! Redis replicates asynchronously: a batch a master acknowledged may die with it before its
//! replica has it. With [`RedisOpts::confirm_writes`](super::RedisOpts) (cluster, sentinel)
//! every batch is kept until a `WAIT 1 <confirm_timeout>` sent after it (at most one every
//! 50 ms, on every master) confirms it; batches no replica confirmed within a second are
//! re-sent under the same id every second for 30 s, so a promoted replica that missed one
//! applies it once, and one that had it ignores it.

use super::RedisStore;
use super::codec::opt_arg;
use super::conn::per_slot;
use super::connection::{evalsha, is_noscript};
use super::keys::{
    bucket_key, dims_key, quota_key, reservation_key, settled_key, spend_key, usage_key,
};
use crate::Result;
use crate::model::*;
use redis::Cmd;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `WAIT` at most this often: it covers every batch the connection wrote before it.
const CONFIRM_EVERY: Duration = Duration::from_millis(50);
/// How long an unconfirmed batch is re-sent: past any failover's promotion.
const CONFIRM_FOR: Duration = Duration::from_secs(30);
/// How often an unconfirmed batch is re-sent.
const RESEND_EVERY: Duration = Duration::from_secs(1);
/// Unconfirmed batches kept at most (the oldest go first).
const MAX_UNCONFIRMED: usize = 10_000;
/// Unconfirmed batches re-sent with one settle call at most.
const RESEND_AT_ONCE: usize = 64;
/// How long every `WAIT` must time out before settling stops waiting for replicas.
const NO_REPLICA_AFTER: Duration = Duration::from_secs(2);
/// How long settling then goes without `WAIT` before it tries again.
const RECHECK_AFTER: Duration = Duration::from_secs(5);

/// Settle batches no replica confirmed yet, and whether waiting for replicas is worth it.
#[derive(Default)]
pub(crate) struct Confirm {
    list: Vec<Unconfirmed>,
    /// Since when every `WAIT` timed out.
    failing_since: Option<Instant>,
    /// Until then no `WAIT` is sent (some master has no replica).
    off_until: Option<Instant>,
    /// When the last `WAIT` was sent.
    last_wait: Option<Instant>,
}

/// A batch a master applied but no replica confirmed yet: its calls, re-sent under the same
/// batch id (the `tg:settled` markers make a re-send to the same master a no-op, and one to a
/// promoted replica that never got the batch applies it once).
pub(crate) struct Unconfirmed {
    cmds: Vec<(String, Cmd)>,
    first: Instant,
    resend_at: Instant,
    /// When the master last acknowledged it (a `WAIT` sent later covers it).
    applied: Instant,
}

impl Unconfirmed {
    fn new(cmds: Vec<(String, Cmd)>) -> Unconfirmed {
        let now = Instant::now();
        Unconfirmed {
            cmds,
            first: now,
            resend_at: now,
            applied: now,
        }
    }
}

/// (day, dimension, value, team) of a dimension counter.
type DimKey<'a> = (u32, &'a str, &'a str, &'a str);

/// One consumer's part of a batch.
#[derive(Default)]
struct Group<'a> {
    corrections: Vec<&'a Settlement>,
    /// Usage per (day, `team|model|backend`).
    usage: Vec<((u32, String), UsageCounts)>,
    /// Usage per (day, dimension, value, team), and the cap and retention (days) to keep.
    dims: Vec<(DimKey<'a>, UsageCounts)>,
    dim_policy: (u32, u32),
}

impl<'a> Group<'a> {
    fn add_dims(&mut self, u: &'a UsageDelta) {
        let Some(d) = &u.dims else { return };
        self.dim_policy = (d.cap, d.retention_days);
        for (dim, value) in &d.values {
            let k = (u.day, dim.as_str(), value.as_str(), u.team.as_str());
            match self.dims.iter_mut().find(|(x, _)| *x == k) {
                Some((_, t)) => t.add(&u.counts),
                None => self.dims.push((k, u.counts)),
            }
        }
    }

    fn add_usage(&mut self, u: &UsageDelta) {
        let field = format!("{}|{}|{}", u.team, u.model, u.backend);
        match self
            .usage
            .iter_mut()
            .find(|(k, _)| k.0 == u.day && k.1 == field)
        {
            Some((_, t)) => t.add(&u.counts),
            None => self.usage.push(((u.day, field), u.counts)),
        }
    }
}

impl RedisStore {
    pub(super) async fn settle_batch(&self, batch_id: u64, batch: &[Settlement]) -> Result<()> {
        // Group by consumer, keeping each consumer's corrections in order.
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<(&str, Group<'_>)> = Vec::new();
        for s in batch {
            let i = *index.entry(&s.consumer).or_insert_with(|| {
                groups.push((&s.consumer, Group::default()));
                groups.len() - 1
            });
            let g = &mut groups[i].1;
            if s.actual != s.reserved
                || s.end != ReservationEnd::None
                || s.money.actual != s.money.reserved
            {
                g.corrections.push(s);
            }
            if let Some(u) = &s.usage {
                g.add_usage(u);
                g.add_dims(u);
            }
        }
        let mut cmds: Vec<(String, Cmd)> = groups
            .iter()
            .filter(|(_, g)| !(g.corrections.is_empty() && g.usage.is_empty()))
            .map(|(id, g)| (bucket_key(id), self.settle_command(id, batch_id, g)))
            .collect();
        cmds.extend(self.team_settle_commands(batch_id, batch));
        let due = self.due_unconfirmed();
        if cmds.is_empty() && due.is_empty() {
            return Ok(());
        }
        let mut all = cmds.clone();
        for u in &due {
            all.extend(u.cmds.iter().cloned());
        }
        let sent = self.background(self.run_settle(all)).await;
        if let Err(e) = sent {
            // Nothing is lost: the caller retries its batch, and the re-sends wait their turn.
            self.keep_unconfirmed(due);
            return Err(e);
        }
        if self.inner.opts.confirm_writes {
            self.confirm(cmds, due).await;
        }
        Ok(())
    }

    /// Keeps what was just applied until a replica confirms it: `WAIT 1` at most every
    /// [`CONFIRM_EVERY`] (one `WAIT` covers everything the connection wrote before it).
    async fn confirm(&self, cmds: Vec<(String, Cmd)>, due: Vec<Unconfirmed>) {
        let now = Instant::now();
        let (waiting, wait_now) = {
            let mut c = self.inner.confirm.lock();
            let waiting = c.off_until.is_none_or(|t| now >= t);
            let wait_now = waiting
                && c.last_wait
                    .is_none_or(|t| now.duration_since(t) >= CONFIRM_EVERY);
            if wait_now {
                c.last_wait = Some(now);
            }
            (waiting, wait_now)
        };
        let mut pending = due;
        // While some master has no replica to wait for, none can be promoted with less than
        // it has: new batches need no re-send; earlier unconfirmed ones are re-sent until
        // they expire (a failover may be under way).
        if waiting && !cmds.is_empty() {
            pending.push(Unconfirmed::new(cmds));
        }
        for u in &mut pending {
            u.applied = now;
        }
        self.keep_unconfirmed(pending);
        if !wait_now {
            return;
        }
        if self.confirmed().await {
            let mut c = self.inner.confirm.lock();
            // Applied before the WAIT was sent, on the same connection: on a replica now.
            c.list.retain(|u| u.applied > now);
            c.failing_since = None;
        } else {
            self.no_confirmation();
        }
    }

    /// Sends settle calls (one pipeline per slot on the settle connection); calls refused with
    /// `NOSCRIPT` (a restarted or promoted server) are sent again, alone, once the script is
    /// loaded.
    async fn run_settle(&self, cmds: Vec<(String, Cmd)>) -> redis::RedisResult<()> {
        let mut conn = self.inner.settle_conn.clone();
        let mut pending = cmds;
        for attempt in 0..2 {
            let results = per_slot(&conn, pending.clone()).await?;
            let mut retry = Vec::new();
            for (c, r) in pending.into_iter().zip(results) {
                match r {
                    Ok(_) => {}
                    // Only the calls that did not run are sent again: a retry never applies a
                    // settlement twice.
                    Err(e) if is_noscript(&e) && attempt == 0 => retry.push(c),
                    Err(e) => return Err(e),
                }
            }
            if retry.is_empty() {
                return Ok(());
            }
            for script in [&self.inner.settle, &self.inner.team_settle] {
                script.load_async(&mut conn).await?;
            }
            pending = retry;
        }
        Ok(())
    }

    /// `WAIT 1 <confirm_timeout>` on the settle connection: whether a replica of every master
    /// acknowledged what this connection wrote (a failover can then not lose it).
    async fn confirmed(&self) -> bool {
        let mut conn = self.inner.settle_conn.clone();
        let ms = self.inner.opts.confirm_timeout.as_millis() as u64;
        let wait = redis::cmd("WAIT").arg(1).arg(ms).to_owned();
        let r: Result<i64> = self.background(wait.query_async(&mut conn)).await;
        matches!(r, Ok(n) if n >= 1)
    }

    /// Every `WAIT` for [`NO_REPLICA_AFTER`] timed out: some master has no replica (a
    /// promoted one, before its old master returns as a replica). Stop waiting for
    /// [`RECHECK_AFTER`], so that settling does not slow down for nothing.
    fn no_confirmation(&self) {
        let now = Instant::now();
        let mut c = self.inner.confirm.lock();
        let since = *c.failing_since.get_or_insert(now);
        if now.duration_since(since) >= NO_REPLICA_AFTER {
            c.failing_since = None;
            c.off_until = Some(now + RECHECK_AFTER);
            tracing::warn!(
                "no replica acknowledges settle batches (WAIT 1): a master has no replica; \
                 usage written now would not survive its failover"
            );
        }
    }

    /// The unconfirmed batches due for a re-send (at most [`RESEND_AT_ONCE`]); drops (with a
    /// warning) those past [`CONFIRM_FOR`].
    fn due_unconfirmed(&self) -> Vec<Unconfirmed> {
        let now = Instant::now();
        let mut confirm = self.inner.confirm.lock();
        let list = &mut confirm.list;
        if list.is_empty() {
            return Vec::new();
        }
        let before = list.len();
        list.retain(|u| now.duration_since(u.first) < CONFIRM_FOR);
        if list.len() < before {
            tracing::warn!(
                batches = before - list.len(),
                "settle batches never confirmed by a replica (WAIT); no longer re-sent"
            );
        }
        let mut due = Vec::new();
        list.retain_mut(|u| {
            if u.resend_at <= now && due.len() < RESEND_AT_ONCE {
                due.push(Unconfirmed {
                    cmds: std::mem::take(&mut u.cmds),
                    ..*u
                });
                false
            } else {
                true
            }
        });
        due
    }

    /// Keeps batches for a re-send, and makes sure one happens even when no new batch comes
    /// (a background task re-sends every second until the list is empty).
    fn keep_unconfirmed(&self, batches: Vec<Unconfirmed>) {
        if batches.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut confirm = self.inner.confirm.lock();
        let list = &mut confirm.list;
        if list.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let store = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RESEND_EVERY).await;
                    if store.inner.confirm.lock().list.is_empty() {
                        return;
                    }
                    let _ = store.settle_batch(crate::new_batch_id(), &[]).await;
                }
            });
        }
        for mut u in batches {
            u.resend_at = now + RESEND_EVERY;
            list.push(u);
        }
        let over = list.len().saturating_sub(MAX_UNCONFIRMED);
        if over > 0 {
            list.drain(..over);
            tracing::warn!(
                batches = over,
                "too many unconfirmed settle batches; the oldest are no longer re-sent"
            );
        }
    }

    /// The `settle.lua` call of one consumer's group (see the script's header for the layout).
    fn settle_command(&self, id: &str, batch_id: u64, g: &Group<'_>) -> Cmd {
        let retention = u64::from(self.inner.opts.usage_retention_days) * 86_400;
        let mut keys = vec![
            bucket_key(id),
            quota_key(id),
            settled_key(id, batch_id),
            spend_key(id),
        ];
        let mut days: Vec<u32> = Vec::new();
        for ((day, _), _) in &g.usage {
            if !days.contains(day) {
                days.push(*day);
                keys.push(usage_key(id, *day));
            }
        }
        let first_record = keys.len() + 1;
        for s in &g.corrections {
            if let ReservationEnd::Settled { id: r, .. } | ReservationEnd::Abandoned { id: r } =
                s.end
            {
                keys.push(reservation_key(id, r));
            }
        }
        let mut dim_days: Vec<u32> = Vec::new();
        let first_dims = keys.len() + 1;
        for ((day, ..), _) in &g.dims {
            if !dim_days.contains(day) {
                dim_days.push(*day);
                keys.push(dims_key(id, *day));
            }
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = evalsha(&self.inner.settle, &keys);
        cmd.arg(self.inner.opts.time_offset_ms)
            .arg(retention)
            .arg(g.corrections.len())
            .arg(crate::RESERVATION_TTL_MS);
        let mut record = first_record;
        for s in &g.corrections {
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
            cmd.arg(s.money.actual as i64 - s.money.reserved as i64);
            if s.money.window == ANY_WINDOW {
                cmd.arg("any");
            } else {
                cmd.arg(s.money.window);
            }
        }
        for ((day, field), v) in &g.usage {
            let k = 5 + days.iter().position(|d| d == day).unwrap_or(0);
            cmd.arg(k).arg(field).arg(&v.to_array()[..]);
        }
        if !g.dims.is_empty() {
            let (cap, days) = g.dim_policy;
            cmd.arg("dims")
                .arg(cap)
                .arg(u64::from(days.max(1)) * 86_400);
            for ((day, dim, value, team), v) in &g.dims {
                let k = first_dims + dim_days.iter().position(|d| d == day).unwrap_or(0);
                cmd.arg(k).arg(*dim).arg(*value).arg(*team);
                cmd.arg(&v.to_array()[..]);
            }
        }
        cmd
    }
}

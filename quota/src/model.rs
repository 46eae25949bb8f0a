//! The records and decisions that cross the [`Store`](crate::Store) boundary.

pub use tollgate_common::Period;
pub use tollgate_common::config::MAX_TRIP_MS;

use crate::budget::*;

/// A consumer as the store holds it (`tg:consumer:{id}` in Redis).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub id: String,
    pub team: String,
    /// Tokens per minute; `None` = no per-minute limit.
    pub tpm: Option<u64>,
    /// Tokens per `quota_period`; `None` = no period quota.
    pub quota: Option<u64>,
    pub quota_period: Period,
    /// Models this consumer may use; empty = all.
    pub models: Vec<String>,
    pub disabled: bool,
    /// The consumer's own budget in money, checked in its reservation.
    pub budget: Option<Budget>,
}

/// Limits applied to a consumer that has no stored record or leaves a field unset
/// (consumers known only through a JWT).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitDefaults {
    pub tpm: Option<u64>,
    pub quota: Option<u64>,
    pub quota_period: Period,
}

#[derive(Clone, Debug)]
pub struct ReserveRequest<'a> {
    pub consumer: &'a str,
    pub model: &'a str,
    /// The estimate to debit: prompt tokens + requested completion tokens.
    pub tokens: u64,
    pub defaults: &'a LimitDefaults,
    /// Key-authenticated callers must have a stored consumer; JWT callers may not.
    pub require_record: bool,
    /// The reservation's id ([`new_reservation_id`](crate::new_reservation_id)). The store
    /// keeps a record of it until it is settled, so a reserve sent twice (a retry after a lost
    /// answer) debits once, and one abandoned by the caller can be refunded
    /// ([`ReservationEnd::Abandoned`]).
    pub id: u64,
    /// Off the request path (a lease): the store waits its longer background deadline.
    pub background: bool,
    /// The estimate's cost (nano-units) debited from the consumer's budget, if it has one.
    pub cost_nano: u64,
}

/// The outcome of a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Admitted(Admission),
    /// The per-minute bucket lacks `tokens`; nothing was debited.
    RateLimited {
        retry_after_ms: u64,
        remaining_tpm: i64,
    },
    /// The period quota lacks `tokens`; nothing was debited. Retry when the window ends.
    QuotaExceeded {
        retry_after_ms: u64,
        /// What is left of the quota (a smaller request would still pass).
        remaining_quota: i64,
    },
    /// The consumer's budget lacks the estimate's cost; nothing was debited.
    BudgetExceeded(BudgetRefusal),
    ModelNotAllowed,
    Disabled,
    UnknownConsumer,
    /// This reservation id was abandoned by its caller before the store saw it: nothing was
    /// debited, and nothing ever will be under this id.
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    pub team: String,
    /// Tokens left in the per-minute bucket after this debit (`None`: no limit).
    pub remaining_tpm: Option<i64>,
    /// Tokens left in the period quota after this debit (`None`: no quota).
    pub remaining_quota: Option<i64>,
    /// Start (unix seconds) of the quota window debited, so settle corrects the same window.
    pub window: u64,
    /// The per-minute limit in force for this reservation, handed back at settle.
    pub tpm: Option<u64>,
    /// The period quota in force (so a replica can keep enforcing a share of it locally while
    /// the shared store is unreachable).
    pub quota: Option<u64>,
    pub quota_period: Period,
    /// The consumer's budget after this debit (`None`: no budget, or a replayed reservation).
    pub budget: Option<BudgetUse>,
}

impl Admission {
    /// An admission under no limit (fail-open, a cache hit): nothing remaining to report,
    /// nothing to hand back at settle.
    pub fn unlimited(team: String) -> Admission {
        Admission {
            team,
            remaining_tpm: None,
            remaining_quota: None,
            window: 0,
            tpm: None,
            quota: None,
            quota_period: Period::default(),
            budget: None,
        }
    }
}

/// [`Settlement::window`] meaning "the window the quota counter holds now": usage admitted while
/// the store was unreachable, charged to the shared quota once it is back.
pub const ANY_WINDOW: u64 = u64::MAX;

/// What a settlement does with the store's record of the reservation it corrects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReservationEnd {
    /// No record: usage admitted without the store, or requests served from a lease.
    #[default]
    None,
    /// The request ran and is settled: the correction applies only while the record lives (so
    /// settling one reservation twice corrects it once), then the record is dropped, or kept
    /// as a tombstone when the reserve was sent more than once, so that a late copy debits
    /// nothing.
    Settled { id: u64, retried: bool },
    /// The caller gave up on the reserve (no answer in time) and did not admit the request:
    /// whatever the reserve debited, if it ran at all, is refunded, and a copy arriving later
    /// debits nothing. `reserved`, `actual`, `window` and `tpm` are ignored: the store's record
    /// holds what was debited.
    Abandoned { id: u64 },
}

/// A correction of one earlier reservation, plus the usage totals it adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub consumer: String,
    pub end: ReservationEnd,
    pub reserved: u64,
    pub actual: u64,
    /// [`Admission::window`] of the reservation; a quota window that has rolled over since is
    /// not corrected.
    pub window: u64,
    /// [`Admission::tpm`] of the reservation: the bucket capacity to refill against.
    pub tpm: Option<u64>,
    pub usage: Option<UsageDelta>,
    /// The money of the reservation: corrected in the consumer's and the team's budgets.
    pub money: Money,
}

/// Money of one settlement: the estimate reserved and the actual cost (nano-units), corrected
/// like tokens, in the consumer's budget and, when the team step was taken, the team's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Money {
    pub reserved: u64,
    pub actual: u64,
    /// The consumer budget window the reservation debited ([`ANY_WINDOW`](crate::ANY_WINDOW)
    /// for usage admitted without the store). A reservation with a live record is corrected
    /// in the window its record names.
    pub window: u64,
    pub team: Option<TeamCharge>,
}

/// The team part of a settlement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamCharge {
    pub team: String,
    /// The team reservation's record: `Settled` or `Abandoned` like the consumer's, `None` for
    /// usage admitted without a team reservation (charged to the current window).
    pub end: ReservationEnd,
    pub window: u64,
    /// What the team step debited for this request (nano-units): the estimate when a team
    /// reservation (or a slice the team leased) covered it, 0 when nothing was debited (the
    /// step was skipped, or usage admitted without the store). The team's spend moves by
    /// `money.actual - reserved`: the consumer's own `money.reserved` is a different debit
    /// (0 for a request served from the consumer's token lease).
    pub reserved: u64,
}

/// The usage counters, the one shape in which usage is added, stored and reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub requests: u64,
    /// Cost in pico-units (1e-12 of the price currency): tokens × price per 1M tokens in
    /// micro-units, so totals are exact integers.
    pub cost_pico: u64,
    /// Tokens a cache hit replayed instead of a backend generating them (input + output).
    pub saved_tokens: u64,
    /// What those tokens would have cost at the backend that produced the stored answer.
    pub saved_cost_pico: u64,
}

impl UsageCounts {
    /// The counters in their storage order (`in`, `out`, `cached`, `req`, `cost`, `saved`,
    /// `savedcost`).
    pub fn to_array(self) -> [u64; 7] {
        [
            self.input,
            self.output,
            self.cached_input,
            self.requests,
            self.cost_pico,
            self.saved_tokens,
            self.saved_cost_pico,
        ]
    }

    /// The counter at position `i` of [`to_array`](Self::to_array).
    pub fn at_mut(&mut self, i: usize) -> &mut u64 {
        match i {
            0 => &mut self.input,
            1 => &mut self.output,
            2 => &mut self.cached_input,
            3 => &mut self.requests,
            4 => &mut self.cost_pico,
            5 => &mut self.saved_tokens,
            _ => &mut self.saved_cost_pico,
        }
    }

    /// Adds `other`, saturating (totals never wrap).
    pub fn add(&mut self, other: &UsageCounts) {
        for (i, v) in other.to_array().into_iter().enumerate() {
            let t = self.at_mut(i);
            *t = t.saturating_add(v);
        }
    }
}

/// Usage added to the daily totals of one consumer × model × backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// `YYYYMMDD` (UTC) of the request.
    pub day: u32,
    pub team: String,
    pub model: String,
    pub backend: String,
    pub counts: UsageCounts,
    /// The request's dimension values (`[telemetry] dimensions`), counted per value too.
    pub dims: Option<DimUsage>,
}

/// The dimension values of a request's usage, and how the store keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DimUsage {
    /// (dimension, value): names of letters, digits and `-_.@`; values without `|` or
    /// control characters, at most [`MAX_DIM_VALUE`] bytes.
    pub values: Vec<(String, String)>,
    /// Distinct values kept per dimension, consumer and day; the rest count as
    /// [`OTHER_DIM_VALUE`].
    pub cap: u32,
    /// How long a day's rows are kept.
    pub retention_days: u32,
}

/// The longest dimension value kept (bytes).
pub const MAX_DIM_VALUE: usize = 128;

/// What values past a dimension's cap are counted as.
pub const OTHER_DIM_VALUE: &str = "other";

/// One row of the per-dimension usage: a consumer's usage on a day under one value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DimRow {
    pub day: u32,
    pub consumer: String,
    pub team: String,
    pub dimension: String,
    pub value: String,
    pub counts: UsageCounts,
}

/// One row of the daily usage totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub day: u32,
    pub consumer: String,
    pub team: String,
    pub model: String,
    pub backend: String,
    pub counts: UsageCounts,
}

/// A failure to count against a backend's circuit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BreakerFailure {
    /// Failures within `window_ms` that trip the circuit.
    pub failures: u32,
    pub window_ms: u64,
    /// How long a trip lasts.
    pub trip_ms: u64,
    /// Trip at once for exactly this long (the backend's `retry-after`).
    pub trip_for_ms: Option<u64>,
    /// The failure is a probe's: re-open at once.
    pub probe: bool,
}

impl BreakerFailure {
    /// The failure with every duration cut to [`MAX_TRIP_MS`]: what a store keeps is an
    /// integer time with a TTL however absurd the `retry-after` was. Both stores apply it.
    pub fn bounded(&self) -> BreakerFailure {
        BreakerFailure {
            failures: self.failures.max(1),
            window_ms: self.window_ms.clamp(1, MAX_TRIP_MS),
            trip_ms: self.trip_ms.min(MAX_TRIP_MS),
            trip_for_ms: self.trip_for_ms.map(|ms| ms.min(MAX_TRIP_MS)),
            probe: self.probe,
        }
    }
}

/// A backend's circuit: closed when `open_until_ms` is 0; open until then; half-open (one
/// probe allowed) once that time has passed without a close.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BreakerState {
    pub backend: String,
    /// Unix ms until which the circuit is open; 0 = closed.
    pub open_until_ms: u64,
    /// Trips so far (identifies a trip: one probe per trip).
    pub trip: u64,
    /// The store's clock when this state was read: a replica compares `open_until_ms` with
    /// this, never with its own clock.
    pub now_ms: u64,
}

impl BreakerState {
    /// Milliseconds the circuit stays open from `now_ms` (0 when closed or half-open).
    pub fn open_for_ms(&self) -> u64 {
        self.open_until_ms.saturating_sub(self.now_ms)
    }

    /// Tripped and its time is up, not closed yet: one probe may go.
    pub fn half_open(&self) -> bool {
        self.open_until_ms != 0 && self.open_until_ms <= self.now_ms
    }
}

/// Start and end (unix seconds, end exclusive) of the UTC window of `period` containing `now`.
/// Weeks start on Monday 00:00 UTC.
pub fn window_bounds(period: Period, now_s: u64) -> (u64, u64) {
    use chrono::{Datelike, TimeZone, Utc};
    let day = 86_400;
    match period {
        Period::Hour => {
            let s = now_s - now_s % 3600;
            (s, s + 3600)
        }
        Period::Day => {
            let s = now_s - now_s % day;
            (s, s + day)
        }
        Period::Week => {
            // 1970-01-01 was a Thursday: shift so weeks start on Monday.
            let days = now_s / day;
            let start_day = (days + 3) / 7 * 7 - 3;
            (start_day * day, start_day * day + 7 * day)
        }
        Period::Month => {
            let dt = Utc
                .timestamp_opt(now_s as i64, 0)
                .single()
                .unwrap_or_default();
            let start = Utc
                .with_ymd_and_hms(dt.year(), dt.month(), 1, 0, 0, 0)
                .single()
                .unwrap_or_default();
            let (y, m) = if dt.month() == 12 {
                (dt.year() + 1, 1)
            } else {
                (dt.year(), dt.month() + 1)
            };
            let end = Utc
                .with_ymd_and_hms(y, m, 1, 0, 0, 0)
                .single()
                .unwrap_or_default();
            (start.timestamp() as u64, end.timestamp() as u64)
        }
    }
}

/// `YYYYMMDD` of a unix time (UTC).
pub fn day_of(now_s: u64) -> u32 {
    use chrono::{Datelike, TimeZone, Utc};
    let dt = Utc
        .timestamp_opt(now_s as i64, 0)
        .single()
        .unwrap_or_default();
    dt.year() as u32 * 10_000 + dt.month() * 100 + dt.day()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows are fixed UTC calendar windows; weeks start on Monday.
    #[test]
    fn windows() {
        // 2026-11-26 13:45:10 UTC, a Thursday.
        let t = 1_795_700_000 - 1_795_700_000 % 86_400 + 13 * 3600 + 45 * 60 + 10;
        assert_eq!(day_of(t), 20261126);
        let (s, e) = window_bounds(Period::Hour, t);
        assert_eq!((s % 3600, e - s), (0, 3600));
        let (s, _) = window_bounds(Period::Week, t);
        assert_eq!(day_of(s), 20261123, "Monday");
        let (s, e) = window_bounds(Period::Month, t);
        assert_eq!((day_of(s), day_of(e)), (20261101, 20261201));
        let (s, e) = window_bounds(Period::Month, 1_796_083_200 + 10); // 2026-12-01
        assert_eq!((day_of(s), day_of(e)), (20261201, 20270101));
    }
}

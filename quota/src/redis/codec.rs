//! What crosses the wire besides key names: script arguments and answers, consumer hashes,
//! circuit rows and pub/sub messages, each decoded strictly (a value that is not what it should
//! be is a [`Error::Protocol`] naming it, never a silently lifted limit).

use crate::model::*;
use crate::{
    Budget, BudgetAction, BudgetRefusal, BudgetUse, Error, MAX_TRIP_MS, Result, TeamDecision,
    TeamRecord, nano_from_units, units_from_nano,
};
use redis::Cmd;
use std::collections::HashMap;

/// Pushes a `u64` limit, or `""` for none (keeps ARGV positions fixed).
pub(super) fn opt_arg(cmd: &mut Cmd, v: Option<u64>) {
    match v {
        Some(n) => cmd.arg(n),
        None => cmd.arg(""),
    };
}

/// The hash fields of a consumer record; unset limits are left out (absent = unset).
pub(super) fn record_fields(c: &ConsumerRecord) -> Vec<(&'static str, String)> {
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
    budget_fields(&mut f, c.budget.as_ref());
    f
}

/// The budget fields of a consumer or team hash (`budget` in currency units, as operators write
/// it); none when there is no budget.
pub(super) fn budget_fields(f: &mut Vec<(&'static str, String)>, b: Option<&Budget>) {
    if let Some(b) = b {
        f.push(("budget", units_from_nano(b.limit_nano as i64).to_string()));
        f.push(("budget_period", b.period.as_str().to_string()));
        f.push(("budget_action", b.action.as_str().to_string()));
    }
}

/// The hash fields of a team record.
pub(super) fn team_fields(t: &TeamRecord) -> Vec<(&'static str, String)> {
    let mut f = Vec::new();
    budget_fields(&mut f, t.budget.as_ref());
    f
}

/// The budget of a consumer or team hash, strictly: an amount that is not one is an error
/// naming the key, never a lifted budget.
pub(super) fn decode_budget(key: &str, h: &HashMap<String, String>) -> Result<Option<Budget>> {
    let Some(v) = h.get("budget").map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let bad = |what: &str| Error::Protocol(format!("{key} {what}"));
    let amount: f64 = v
        .parse()
        .ok()
        .filter(|a: &f64| a.is_finite() && *a >= 0.0)
        .ok_or_else(|| bad(&format!("budget is not an amount: {v}")))?;
    let period = match h.get("budget_period").map(|s| s.trim()) {
        None | Some("") => Period::Month,
        Some(p) => {
            Period::parse(p).ok_or_else(|| bad("budget_period is not hour|day|week|month"))?
        }
    };
    let action = match h.get("budget_action").map(|s| s.trim()) {
        None | Some("") => BudgetAction::Block,
        Some(a) => BudgetAction::parse(a).ok_or_else(|| bad("budget_action is not block|alert"))?,
    };
    Ok(Some(Budget {
        limit_nano: nano_from_units(amount),
        period,
        action,
    }))
}

pub(super) fn parse_limit(id: &str, field: &str, v: Option<&String>) -> Result<Option<u64>> {
    match v.map(|s| s.trim()) {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            Error::Protocol(format!(
                "tg:consumer:{{{id}}} field {field} is not a whole number: {s}"
            ))
        }),
    }
}

pub(super) fn decode_record(id: &str, h: HashMap<String, String>) -> Result<ConsumerRecord> {
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
        budget: decode_budget(&format!("tg:consumer:{{{id}}}"), &h)?,
    })
}

pub(super) fn num<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::Protocol(format!("reserve.lua returned a bad number: {s}")))
}

pub(super) fn decode_decision(v: &[String]) -> Result<Decision> {
    fn opt<T: std::str::FromStr>(s: &str) -> Result<Option<T>> {
        if s.is_empty() {
            Ok(None)
        } else {
            num(s).map(Some)
        }
    }
    let bad = || Error::Protocol(format!("reserve.lua returned {v:?}"));
    Ok(match v.first().map(String::as_str) {
        Some("A") if v.len() == 14 => Decision::Admitted(Admission {
            team: v[1].clone(),
            remaining_tpm: opt(&v[2])?,
            remaining_quota: opt(&v[3])?,
            window: num(&v[4])?,
            tpm: opt(&v[5])?,
            quota: opt(&v[6])?,
            quota_period: Period::parse(&v[7]).ok_or_else(bad)?,
            budget: if v[8].is_empty() {
                None
            } else {
                Some(budget_use(&v[8..14]).ok_or_else(bad)?)
            },
        }),
        Some("B") if v.len() == 5 => {
            Decision::BudgetExceeded(budget_refusal(&v[1..5]).ok_or_else(bad)?)
        }
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

/// `budget, spent, window, window_end, period, action` as the scripts answer them.
fn budget_use(v: &[String]) -> Option<BudgetUse> {
    Some(BudgetUse {
        limit_nano: v[0].parse().ok()?,
        spent_nano: v[1].parse().ok()?,
        window: v[2].parse().ok()?,
        window_end: v[3].parse().ok()?,
        period: Period::parse(&v[4])?,
        action: BudgetAction::parse(&v[5])?,
    })
}

/// `retry_after_ms, remaining, budget, period` as the scripts answer them.
fn budget_refusal(v: &[String]) -> Option<BudgetRefusal> {
    Some(BudgetRefusal {
        retry_after_ms: v[0].parse().ok()?,
        remaining_nano: v[1].parse().ok()?,
        limit_nano: v[2].parse().ok()?,
        period: Period::parse(&v[3])?,
    })
}

pub(super) fn decode_team_decision(v: &[String]) -> Result<TeamDecision> {
    let bad = || Error::Protocol(format!("team_reserve.lua returned {v:?}"));
    Ok(match v.first().map(String::as_str) {
        Some("N") => TeamDecision::NoBudget,
        Some("C") => TeamDecision::Cancelled,
        Some("A") if v.len() == 7 => TeamDecision::Admitted(budget_use(&v[1..7]).ok_or_else(bad)?),
        Some("B") if v.len() == 5 => {
            TeamDecision::Exceeded(budget_refusal(&v[1..5]).ok_or_else(bad)?)
        }
        _ => return Err(bad()),
    })
}

/// Parses a `BACKEND open_until trip now` pub/sub message.
pub(super) fn parse_breaker_message(msg: &str) -> Option<BreakerState> {
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
pub(super) fn parse_breaker_row(
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

#[cfg(test)]
mod tests {
    use super::*;

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
            budget: Some(Budget {
                limit_nano: 12_345_000_000,
                period: Period::Day,
                action: BudgetAction::Alert,
            }),
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

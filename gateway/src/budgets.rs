//! What the pipeline does with money and quotas around the reservation, in one place: the
//! `x-budget-remaining` header, the budget gauges, and the thresholds handed to [`alerts`]
//! (compared here, delivered off the request path).

use crate::alerts::Use;
use crate::auth::Caller;
use crate::error::Error;
use crate::gateway::Gateway;
use crate::limits::Reserved;
use http::HeaderValue;
use tollgate_common::config::AlertEvent;
use tollgate_quota::{BudgetScope, Period, units_from_nano};

/// After an admission: alerts for thresholds crossed, gauges, and the header value (the least
/// left of the consumer's and the team's budgets, in currency units).
pub fn admitted(gw: &Gateway, consumer: &str, team: &str, r: &Reserved) -> Option<HeaderValue> {
    let a = &r.admission;
    if let (Some(q), Some(rem)) = (a.quota, a.remaining_quota) {
        gw.alerts
            .quota(consumer, team, q, rem, a.quota_period, a.window);
    }
    let mut least: Option<i64> = None;
    if let Some(b) = &a.budget {
        gw.alerts
            .budget(BudgetScope::Consumer, consumer, team, consumer, b);
        gw.telemetry
            .budget(BudgetScope::Consumer, consumer, b, gw.alerts.currency());
        least = Some(b.remaining_nano());
    }
    if let Some(t) = &r.team {
        gw.alerts
            .budget(BudgetScope::Team, &t.team, &t.team, consumer, &t.budget);
        gw.telemetry
            .budget(BudgetScope::Team, &t.team, &t.budget, gw.alerts.currency());
        let left = t.budget.remaining_nano();
        least = Some(least.map_or(left, |l| l.min(left)));
    }
    least.and_then(|n| HeaderValue::from_str(&format!("{:.6}", units_from_nano(n.max(0)))).ok())
}

/// After a refusal: a spent budget or quota crosses every threshold up to 100 %.
pub fn refused(gw: &Gateway, caller: &Caller, e: &Error) {
    if gw.alerts.is_empty() {
        return;
    }
    let consumer = &*caller.consumer;
    let team = caller
        .team
        .clone()
        .or_else(|| gw.limits.known_team(consumer))
        .unwrap_or_default();
    let (event, scope, id, limit, unit, period, retry_after_ms) = match e {
        Error::BudgetExceeded {
            scope,
            id,
            limit,
            period,
            retry_after_ms,
            ..
        } => (
            AlertEvent::Budget,
            *scope,
            id.as_str(),
            *limit,
            gw.alerts.currency(),
            Period::parse(period),
            *retry_after_ms,
        ),
        // A spent token quota says neither its size nor its period.
        Error::QuotaExceeded { retry_after_ms } => (
            AlertEvent::Quota,
            "consumer",
            consumer,
            0.0,
            "tokens",
            None,
            *retry_after_ms,
        ),
        _ => return,
    };
    let team = if scope == "team" { id } else { &team };
    let u = Use {
        event,
        scope,
        id,
        team,
        consumer,
        used: 0.0,
        limit,
        unit,
        period,
        window_end: 0,
    };
    gw.alerts.refused(u, retry_after_ms, crate::clock::now_ms());
}

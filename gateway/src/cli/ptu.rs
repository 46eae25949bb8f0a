//! PTU cost allocation: a provisioned backend's fixed monthly price, prorated to the report's
//! days and split between the teams by their share of its tokens, to the cent; and its
//! utilization, tokens served against `capacity_tpm` over the period.
//!
//! Nobody is charged for what nobody used twice: the whole period cost is allocated (the idle
//! part of a PTU is shared in proportion to use, which is how a fixed price is cross-charged),
//! and the utilization says how much of the capacity that cost bought was used.

use chrono::{Datelike, NaiveDate};
use serde::Serialize;
use std::collections::BTreeMap;
use tollgate_common::config::Config;
use tollgate_quota::UsageRow;

use super::Format;
use super::report::Period;

/// A backend that declares `monthly_cost`: a PTU in reports.
#[derive(Clone, Debug)]
pub struct PtuSpec {
    pub backend: String,
    pub monthly_cost: f64,
    pub capacity_tpm: Option<u64>,
}

impl PtuSpec {
    pub fn from_config(config: &Config) -> Vec<PtuSpec> {
        config
            .backends
            .iter()
            .filter_map(|b| {
                Some(PtuSpec {
                    backend: b.name.clone(),
                    monthly_cost: b.monthly_cost?,
                    capacity_tpm: b.capacity_tpm,
                })
            })
            .collect()
    }
}

/// One team's part of one PTU.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PtuShare {
    pub team: String,
    pub tokens: u64,
    /// The team's fraction of the PTU's tokens.
    pub share: f64,
    /// Its part of the period cost, in cents; the parts sum to the period cost exactly.
    pub cost_cents: u64,
}

/// One PTU over the report's period.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PtuReport {
    pub backend: String,
    pub monthly_cost: f64,
    pub days: u32,
    /// `monthly_cost` prorated by days (each day costs `monthly_cost / days in its month`).
    pub period_cost_cents: u64,
    /// Input + output tokens the PTU served in the period.
    pub tokens: u64,
    pub capacity_tpm: Option<u64>,
    /// `capacity_tpm` × the period's minutes.
    pub capacity_tokens: Option<u64>,
    /// `tokens / capacity_tokens`.
    pub utilization: Option<f64>,
    pub teams: Vec<PtuShare>,
}

/// The days from `since` to `until` (YYYYMMDD, inclusive) grouped by month: (days in the
/// month, days of it in the period).
fn month_spans(since: u32, until: u32) -> Vec<(u32, u32)> {
    let date = |d: u32| NaiveDate::from_ymd_opt((d / 10_000) as i32, d / 100 % 100, d % 100);
    let (Some(mut day), Some(last)) = (date(since), date(until)) else {
        return Vec::new();
    };
    let mut spans: BTreeMap<(i32, u32), (u32, u32)> = BTreeMap::new();
    while day <= last {
        let in_month = days_in_month(day.year(), day.month());
        spans
            .entry((day.year(), day.month()))
            .or_insert((in_month, 0))
            .1 += 1;
        day = day.succ_opt().expect("a date before the end of time");
    }
    spans.into_values().collect()
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let first = NaiveDate::from_ymd_opt(year, month, 1).expect("valid month");
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    };
    next.expect("valid month")
        .signed_duration_since(first)
        .num_days() as u32
}

/// `monthly_cost` for the period, in cents: each month contributes its days' part.
pub fn period_cost_cents(monthly_cost: f64, since: u32, until: u32) -> u64 {
    let monthly_cents = (monthly_cost * 100.0).round().max(0.0) as u128;
    // Exact rational sum over the months on a common denominator (every month length divides
    // lcm(28, 29, 30, 31)), rounded once, half up.
    const DENOM: u128 = 377_580;
    let denom = DENOM;
    let numer: u128 = month_spans(since, until)
        .iter()
        .map(|(dim, n)| monthly_cents * *n as u128 * (DENOM / *dim as u128))
        .sum();
    ((numer * 2 + denom) / (denom * 2)) as u64
}

/// Splits `cents` by `weights` (largest remainder): the parts sum to `cents` exactly and each is
/// within one cent of its exact share; ties go to the earlier entry.
fn split_cents(cents: u64, weights: &[u64]) -> Vec<u64> {
    let total: u128 = weights.iter().map(|w| *w as u128).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<u64> = weights
        .iter()
        .map(|w| (cents as u128 * *w as u128 / total) as u64)
        .collect();
    let mut left = cents - parts.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cents as u128 * weights[i] as u128 % total));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

/// Each PTU's period cost, utilization and allocation to teams, from the period's usage rows.
pub fn allocate(specs: &[PtuSpec], rows: &[UsageRow], period: Period) -> Vec<PtuReport> {
    let Period { since, until } = period;
    let days: u32 = month_spans(since, until).iter().map(|(_, n)| n).sum();
    specs
        .iter()
        .map(|spec| {
            let mut by_team: BTreeMap<&str, u64> = BTreeMap::new();
            for r in rows.iter().filter(|r| r.backend == spec.backend) {
                *by_team.entry(&r.team).or_default() += r.counts.input + r.counts.output;
            }
            let tokens: u64 = by_team.values().sum();
            let cost = period_cost_cents(spec.monthly_cost, since, until);
            let weights: Vec<u64> = by_team.values().copied().collect();
            let cents = split_cents(cost, &weights);
            let capacity_tokens = spec
                .capacity_tpm
                .map(|tpm| tpm.saturating_mul(days as u64 * 24 * 60));
            PtuReport {
                backend: spec.backend.clone(),
                monthly_cost: spec.monthly_cost,
                days,
                period_cost_cents: cost,
                tokens,
                capacity_tpm: spec.capacity_tpm,
                capacity_tokens,
                utilization: capacity_tokens
                    .filter(|c| *c > 0)
                    .map(|c| tokens as f64 / c as f64),
                teams: by_team
                    .iter()
                    .zip(cents)
                    .map(|((team, t), c)| PtuShare {
                        team: team.to_string(),
                        tokens: *t,
                        share: *t as f64 / tokens.max(1) as f64,
                        cost_cents: c,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The allocation as a table, CSV or JSON: one row per PTU and team, then each PTU's totals.
pub fn render(reports: &[PtuReport], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Json | Format::Html => {
            let doc = serde_json::json!({"by": "ptu", "ptus": reports});
            out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str("backend,team,tokens,share,cost\n");
            for r in reports {
                for t in &r.teams {
                    out.push_str(&format!(
                        "{},{},{},{:.6},{}\n",
                        r.backend,
                        t.team,
                        t.tokens,
                        t.share,
                        fmt_cents(t.cost_cents)
                    ));
                }
            }
        }
        Format::Table => {
            for r in reports {
                let util = r.utilization.map_or("n/a (no capacity_tpm)".into(), |u| {
                    format!("{:.2} %", u * 100.0)
                });
                out.push_str(&format!(
                    "PTU {}: {} for {} days ({} per month), {} tokens, utilization {util}\n",
                    r.backend,
                    fmt_cents(r.period_cost_cents),
                    r.days,
                    r.monthly_cost,
                    r.tokens
                ));
                out.push_str(&format!(
                    "  {:<24} {:>14} {:>8} {:>14}\n",
                    "team", "tokens", "share", "cost"
                ));
                for t in &r.teams {
                    out.push_str(&format!(
                        "  {:<24} {:>14} {:>7.2}% {:>14}\n",
                        t.team,
                        t.tokens,
                        t.share * 100.0,
                        fmt_cents(t.cost_cents)
                    ));
                }
            }
            if reports.is_empty() {
                out.push_str("no PTU: no backend declares monthly_cost\n");
            }
        }
    }
    out
}

/// Cents as a decimal amount (`1234` → `12.34`).
pub fn fmt_cents(c: u64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

#[cfg(test)]
#[path = "ptu_tests.rs"]
mod tests;

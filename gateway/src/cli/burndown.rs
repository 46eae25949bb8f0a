//! The parts of the HTML report that need more than the usage rows: each team's budget burn-down
//! (spent against the budget over its window, with a linear projection to the window's end),
//! the cache's savings, and the top users once dimensions exist. The JSON and CSV reports carry
//! the same figures ([`Burn`] is computed once for all formats).

use super::budgets::BudgetRow;
use super::report::fmt_cost;
use std::fmt::Write as _;
use tollgate_quota::{BudgetScope, DimRow, UsageRow, units_from_nano};

/// One budget's burn: spent so far and where a straight line takes it by the window's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Burn {
    pub budget: f64,
    pub spent: f64,
    /// Spent × window length ÷ time elapsed (at least a minute), to the cent.
    pub projected: f64,
    pub window_start: u64,
    pub window_end: u64,
    pub now: u64,
}

impl Burn {
    pub fn of(r: &BudgetRow, now_s: u64) -> Burn {
        let budget = units_from_nano(r.budget.limit_nano as i64);
        let spent = units_from_nano(r.spent_nano);
        let end = r.window_end.max(r.window + 1);
        let elapsed = now_s.clamp(r.window, end).saturating_sub(r.window).max(60);
        let length = end - r.window;
        let projected = (spent * length as f64 / elapsed as f64 * 100.0).round() / 100.0;
        Burn {
            budget,
            spent,
            projected: projected.max(spent),
            window_start: r.window,
            window_end: end,
            now: now_s.clamp(r.window, end),
        }
    }

    /// The number as the JSON report prints it (the HTML's `data-*` attributes use it too).
    pub fn text(v: f64) -> String {
        serde_json::Value::from(v).to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Budget burn-down per team: a small chart each (budget line, spent so far, dashed projection).
pub fn budgets_section(h: &mut String, budgets: &[BudgetRow], now_s: u64) {
    let teams: Vec<&BudgetRow> = budgets
        .iter()
        .filter(|b| b.scope == BudgetScope::Team)
        .collect();
    if teams.is_empty() {
        return;
    }
    h.push_str("<h2>Budget burn-down per team</h2>\n<div id=\"budgets\">");
    for r in teams {
        let b = Burn::of(r, now_s);
        let (w, ht) = (480.0, 120.0);
        let top = b.budget.max(b.projected).max(0.01);
        let x = |t: u64| (t - b.window_start) as f64 / (b.window_end - b.window_start) as f64 * w;
        let y = |v: f64| ht - v / top * (ht - 10.0);
        let over = b.projected > b.budget;
        let _ = write!(
            h,
            "<div class=\"burn\" data-team=\"{id}\" data-budget=\"{budget}\" data-spent=\"{spent}\" \
             data-projected=\"{projected}\"><h3>{id} ({period})</h3>\
             <svg role=\"img\" viewBox=\"0 0 {w} {vh}\" width=\"480\"><title>{id}: spent {spent_c} of {budget_c}, projected {projected_c}</title>\
             <line x1=\"0\" y1=\"{by:.1}\" x2=\"{w}\" y2=\"{by:.1}\" stroke=\"#e15759\"/>\
             <polyline fill=\"none\" stroke=\"#4e79a7\" stroke-width=\"3\" points=\"0,{ht} {nx:.1},{sy:.1}\"/>\
             <polyline fill=\"none\" stroke=\"#4e79a7\" stroke-dasharray=\"6 4\" points=\"{nx:.1},{sy:.1} {w},{py:.1}\"/></svg>\
             <p>spent <b class=\"spent\">{spent_c}</b> of <b class=\"budget\">{budget_c}</b>; \
             projected by the end of {end}: <b class=\"projected{cls}\">{projected_c}</b></p></div>",
            id = esc(&r.id),
            period = r.budget.period.as_str(),
            budget = Burn::text(b.budget),
            spent = Burn::text(b.spent),
            projected = Burn::text(b.projected),
            vh = ht + 2.0,
            by = y(b.budget),
            nx = x(b.now),
            sy = y(b.spent),
            py = y(b.projected),
            spent_c = format!("{:.2}", b.spent),
            budget_c = format!("{:.2}", b.budget),
            projected_c = format!("{:.2}", b.projected),
            end = chrono::DateTime::from_timestamp(b.window_end as i64 - 1, 0)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default(),
            cls = if over { " over" } else { "" },
        );
    }
    h.push_str("</div>\n");
}

/// What the cache saved over the period (tokens replayed, their cost), when it saved anything.
pub fn savings_section(h: &mut String, rows: &[UsageRow]) {
    let tokens: u64 = rows.iter().map(|r| r.counts.saved_tokens).sum();
    let cost: u128 = rows.iter().map(|r| r.counts.saved_cost_pico as u128).sum();
    if tokens == 0 && cost == 0 {
        return;
    }
    let _ = writeln!(
        h,
        "<h2>Cache savings</h2>\n<section id=\"savings\"><div class=\"card\"><b id=\"saved-tokens\">{tokens}</b>\
         <span>tokens replayed from the cache</span></div><div class=\"card\"><b id=\"saved-cost\" \
         data-exact=\"{}\">{:.2}</b><span>not spent</span></div></section>",
        fmt_cost(cost),
        cost as f64 / 1e12
    );
}

/// The top users (the `user` dimension) by tokens, when dimensions were recorded.
pub fn users_section(h: &mut String, dims: &[DimRow]) {
    let mut users: std::collections::BTreeMap<&str, (u64, u128)> = Default::default();
    for r in dims.iter().filter(|r| r.dimension == "user") {
        let u = users.entry(&r.value).or_default();
        u.0 += r.counts.input + r.counts.output;
        u.1 += r.counts.cost_pico as u128;
    }
    if users.is_empty() {
        return;
    }
    let mut v: Vec<(&str, (u64, u128))> = users.into_iter().collect();
    v.sort_by(|a, b| (b.1.1, b.1.0).cmp(&(a.1.1, a.1.0)).then(a.0.cmp(b.0)));
    v.truncate(10);
    h.push_str("<h2>Top users</h2>\n<table id=\"users\"><tr><th>user</th><th>tokens</th><th>cost</th></tr>");
    for (u, (tokens, cost)) in v {
        let _ = write!(
            h,
            "<tr data-user=\"{0}\"><td>{0}</td><td>{tokens}</td><td data-exact=\"{1}\">{2:.2}</td></tr>",
            esc(u),
            fmt_cost(cost),
            cost as f64 / 1e12
        );
    }
    h.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_quota::{Budget, BudgetAction, Period};

    /// A third of the window gone with 100 spent projects 300; the projection never falls
    /// below what is spent, and a window just begun does not divide by zero.
    #[test]
    fn linear_projection() {
        let row = |spent_units: i64, window: u64, end: u64| BudgetRow {
            scope: BudgetScope::Team,
            id: "red".into(),
            budget: Budget {
                limit_nano: 500_000_000_000,
                period: Period::Day,
                action: BudgetAction::Block,
            },
            spent_nano: spent_units * 1_000_000_000,
            window,
            window_end: end,
        };
        let b = Burn::of(&row(100, 0, 86_400), 28_800);
        assert_eq!((b.budget, b.spent, b.projected), (500.0, 100.0, 300.0));
        let b = Burn::of(&row(1, 1000, 87_400), 1000);
        assert_eq!(b.projected, 1440.0);
        let mut h = String::new();
        budgets_section(&mut h, &[row(100, 0, 86_400)], 28_800);
        assert!(h.contains("data-projected=\"300.0\""), "{h}");
    }
}

//! The budgets part of `tollgate usage`: every configured team and consumer that has a budget
//! (the store's record wins, as on the request path), with what its current window has spent
//! and what is left, in the price currency.

use super::Format;
use super::burndown::Burn;
use super::report::csv_field;
use tollgate_common::config::Config;
use tollgate_quota::{AnyStore, Budget, BudgetScope, Store, units_from_nano, window_bounds};

/// One budget as the report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRow {
    pub scope: BudgetScope,
    pub id: String,
    pub budget: Budget,
    /// Spent in the current window (reservations in flight included), nano-units.
    pub spent_nano: i64,
    /// Start of the current window (unix seconds).
    pub window: u64,
    /// Its end (unix seconds, exclusive).
    pub window_end: u64,
}

/// Reads the budgets of the configured teams (and consumers' teams) and consumers.
pub async fn read_budgets(config: &Config, store: &AnyStore) -> anyhow::Result<Vec<BudgetRow>> {
    let now_s = crate::clock::now_ms() / 1000;
    let mut teams: Vec<String> = config.teams.iter().map(|t| t.id.clone()).collect();
    for c in &config.consumers {
        let t = c.team.clone().unwrap_or_else(|| c.id.clone());
        if !teams.contains(&t) {
            teams.push(t);
        }
    }
    let mut rows = Vec::new();
    let mut add = async |scope, id: &str, budget: Option<Budget>| -> anyhow::Result<()> {
        let Some(budget) = budget else { return Ok(()) };
        let (window, window_end) = window_bounds(budget.period, now_s);
        let spent_nano = match store.spend(scope, id).await? {
            Some((w, spent)) if w == window => spent,
            _ => 0,
        };
        rows.push(BudgetRow {
            scope,
            id: id.to_string(),
            budget,
            spent_nano,
            window,
            window_end,
        });
        Ok(())
    };
    for t in &teams {
        let budget = store.get_team(t).await?.and_then(|r| r.budget);
        add(BudgetScope::Team, t, budget).await?;
    }
    for c in &config.consumers {
        let budget = store.get_consumer(&c.id).await?.and_then(|r| r.budget);
        add(BudgetScope::Consumer, &c.id, budget).await?;
    }
    Ok(rows)
}

fn rfc3339(s: u64) -> String {
    chrono::DateTime::from_timestamp(s as i64, 0)
        .map(|d| d.to_rfc3339())
        .unwrap_or_default()
}

/// Budgets as JSON values, with the linear projection to the window's end ([`Burn`]).
pub fn budgets_json(rows: &[BudgetRow], currency: &str, now_s: u64) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            let b = Burn::of(r, now_s);
            serde_json::json!({
                "scope": r.scope.as_str(), "id": r.id, "period": r.budget.period.as_str(),
                "action": r.budget.action.as_str(), "currency": currency,
                "budget": b.budget, "spent": b.spent, "remaining": b.budget - b.spent,
                "projected": b.projected, "window_start": rfc3339(r.window),
                "window_end": rfc3339(r.window_end),
            })
        })
        .collect()
}

/// Budgets as a second CSV table (after a blank line), the same figures as the JSON's.
pub fn budgets_csv(rows: &[BudgetRow], currency: &str, now_s: u64) -> String {
    let mut out = String::from(
        "\nbudget_scope,id,period,action,currency,budget,spent,remaining,projected,window_start,window_end\n",
    );
    for r in rows {
        let b = Burn::of(r, now_s);
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            r.scope.as_str(),
            csv_field(&r.id),
            r.budget.period.as_str(),
            r.budget.action.as_str(),
            csv_field(currency),
            Burn::text(b.budget),
            Burn::text(b.spent),
            Burn::text(b.budget - b.spent),
            Burn::text(b.projected),
            rfc3339(r.window),
            rfc3339(r.window_end)
        ));
    }
    out
}

/// The budgets section of the table report (empty when no budget is set).
pub fn budgets_table(rows: &[BudgetRow], currency: &str) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let w = rows
        .iter()
        .map(|r| r.id.len())
        .chain([6])
        .max()
        .unwrap_or(8);
    let mut out = format!(
        "\nbudgets ({currency})\n{:<8}  {:<w$}  {:<6}  {:<5}  {:>14}  {:>14}  {:>14}\n",
        "scope", "id", "period", "action", "budget", "spent", "remaining"
    );
    for r in rows {
        let limit = units_from_nano(r.budget.limit_nano as i64);
        let spent = units_from_nano(r.spent_nano);
        out.push_str(&format!(
            "{:<8}  {:<w$}  {:<6}  {:<5}  {:>14.2}  {:>14.4}  {:>14.4}\n",
            r.scope.as_str(),
            r.id,
            r.budget.period.as_str(),
            r.budget.action.as_str(),
            limit,
            spent,
            limit - spent
        ));
    }
    out
}

/// Adds the budgets to a usage report already rendered in `format` (CSV: a second table after
/// a blank line; the HTML page draws them itself, see [`super::burndown`]).
pub fn with_budgets(report: String, rows: &[BudgetRow], currency: &str, format: Format) -> String {
    if rows.is_empty() {
        return report;
    }
    let now_s = crate::clock::now_ms() / 1000;
    match format {
        // Spliced in before the document's last `}`: the report is kept byte for byte.
        Format::Json => match report.trim_end().strip_suffix('}') {
            Some(head) => {
                let budgets = serde_json::to_string_pretty(&budgets_json(rows, currency, now_s))
                    .unwrap_or_else(|_| "[]".into());
                format!("{},\n  \"budgets\": {budgets}\n}}\n", head.trim_end())
            }
            None => report,
        },
        Format::Table => report + &budgets_table(rows, currency),
        Format::Csv => report + &budgets_csv(rows, currency, now_s),
        Format::Html => report,
    }
}

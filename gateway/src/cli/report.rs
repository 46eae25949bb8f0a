//! `tollgate usage`: the showback report, read from the store's daily usage totals and grouped
//! by consumer, team, model, backend or day, as a table, CSV or JSON; the PTU allocation
//! (`--by ptu`, see [`super::ptu`]); and the whole report as one HTML page (`--format html`,
//! see [`super::html`]).

use super::ptu::{self, PtuSpec};
use super::{By, Format};
use crate::server;
use anyhow::Context as _;
use tollgate_common::config::Config;
use tollgate_quota::{AnyStore, Store, UsageCounts, UsageRow};

pub(super) fn parse_day(s: &str) -> anyhow::Result<u32> {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("{s:?}: expected YYYY-MM-DD"))?;
    use chrono::Datelike;
    Ok(d.year() as u32 * 10_000 + d.month() * 100 + d.day())
}

/// The report's days, YYYYMMDD, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub since: u32,
    pub until: u32,
}

/// `YYYYMMDD` as `YYYY-MM-DD`.
pub fn fmt_day(d: u32) -> String {
    format!("{:04}-{:02}-{:02}", d / 10_000, d / 100 % 100, d % 100)
}

pub(super) async fn read_usage(
    config: &Config,
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<(Vec<UsageRow>, Period)> {
    let (store, period) = open_period(
        config,
        since,
        until,
        "usage totals are kept in the store; with store.kind = \"memory\" they live inside the \
         running gateway (see its /metrics). Use a Redis store kind for the showback report.",
    )
    .await?;
    Ok((store.usage(period.since, period.until).await?, period))
}

/// The store and the days of `--since..=--until` (default: this month up to today) for a report
/// read from the store's daily totals; `in_memory` is the refusal when the store kind is memory.
pub(super) async fn open_period(
    config: &Config,
    since: Option<&str>,
    until: Option<&str>,
    in_memory: &str,
) -> anyhow::Result<(AnyStore, Period)> {
    if !config.store.kind.is_redis() {
        anyhow::bail!("{in_memory}");
    }
    let today = tollgate_quota::day_of(crate::clock::now_ms() / 1000);
    let since = since
        .map(parse_day)
        .transpose()?
        .unwrap_or(today / 100 * 100 + 1);
    let until = until.map(parse_day).transpose()?.unwrap_or(today);
    if since > until {
        anyhow::bail!(
            "--since {} is after --until {}",
            fmt_day(since),
            fmt_day(until)
        );
    }
    let store: AnyStore = server::connect_store(config).await?;
    Ok((store, Period { since, until }))
}

/// The whole `tollgate usage` output: the HTML page, the PTU allocation, or the rows grouped.
pub fn render_report(
    rows: &[UsageRow],
    period: Period,
    ptus: &[PtuSpec],
    by: By,
    format: Format,
) -> String {
    if let Format::Html = format {
        return super::html::render(rows, period, ptus);
    }
    let (label, key): (&str, fn(&UsageRow) -> String) = match by {
        By::Consumer => ("consumer", |r| r.consumer.clone()),
        By::Team => ("team", |r| r.team.clone()),
        By::Model => ("model", |r| r.model.clone()),
        By::Backend => ("backend", |r| r.backend.clone()),
        By::Day => ("day", |r| fmt_day(r.day)),
        By::Ptu => return ptu::render(&ptu::allocate(ptus, rows, period), format),
        // Dimensions have rows of their own (`Store::dimension_usage`): see `super::dims`.
        By::Dimension(_) => return String::new(),
        // Tool calls have their own totals: see `super::tools`.
        By::Server | By::Tool => return String::new(),
    };
    render_usage(rows, label, key, format)
}

/// Groups rows by `key` (a column named `label`) and renders them as a table (with a totals
/// row), CSV or JSON.
fn render_usage(
    rows: &[UsageRow],
    label: &str,
    key: fn(&UsageRow) -> String,
    format: Format,
) -> String {
    use std::collections::BTreeMap;
    /// A group's counts; its cost summed in u128, so a report's total never saturates.
    #[derive(Default, Clone, Copy)]
    struct T {
        counts: UsageCounts,
        cost_pico: u128,
        saved_cost_pico: u128,
    }
    impl T {
        /// The [`COLUMNS`], as CSV and the table print them.
        fn cells(&self) -> Vec<String> {
            let c = &self.counts;
            vec![
                c.requests.to_string(),
                c.input.to_string(),
                c.output.to_string(),
                c.cached_input.to_string(),
                fmt_cost(self.cost_pico),
                c.saved_tokens.to_string(),
                fmt_cost(self.saved_cost_pico),
            ]
        }
    }
    let mut groups: BTreeMap<String, T> = BTreeMap::new();
    let mut total = T::default();
    for r in rows {
        for t in [groups.entry(key(r)).or_default(), &mut total] {
            t.counts.add(&r.counts);
            t.cost_pico += r.counts.cost_pico as u128;
            t.saved_cost_pico += r.counts.saved_cost_pico as u128;
        }
    }
    let cost = |p: u128| p as f64 / 1e12;
    let exact = |p: u128| fmt_cost(p);
    let mut out = String::new();
    match format {
        Format::Json | Format::Html => {
            let items: Vec<serde_json::Value> = groups
                .iter()
                .map(|(k, t)| {
                    serde_json::json!({label: k, "requests": t.counts.requests, "input_tokens": t.counts.input,
                        "output_tokens": t.counts.output, "cached_input_tokens": t.counts.cached_input,
                        "cost": cost(t.cost_pico), "cost_exact": exact(t.cost_pico),
                        "cost_pico": t.cost_pico.to_string(), "saved_tokens": t.counts.saved_tokens,
                        "saved_cost": cost(t.saved_cost_pico), "saved_cost_exact": exact(t.saved_cost_pico),
                        "saved_cost_pico": t.saved_cost_pico.to_string()})
                })
                .collect();
            let doc = serde_json::json!({"by": label, "rows": items, "total": {
                "requests": total.counts.requests, "input_tokens": total.counts.input, "output_tokens": total.counts.output,
                "cached_input_tokens": total.counts.cached_input, "cost": cost(total.cost_pico),
                "cost_exact": exact(total.cost_pico), "cost_pico": total.cost_pico.to_string(),
                "saved_tokens": total.counts.saved_tokens, "saved_cost": cost(total.saved_cost_pico),
                "saved_cost_exact": exact(total.saved_cost_pico),
                "saved_cost_pico": total.saved_cost_pico.to_string()}});
            out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str(&format!("{label},{}\n", COLUMNS.join(",")));
            for (k, t) in &groups {
                out.push_str(&format!("{},{}\n", csv_field(k), t.cells().join(",")));
            }
        }
        Format::Table => {
            let w = groups
                .keys()
                .map(|k| k.len())
                .chain([label.len(), 5])
                .max()
                .unwrap_or(8);
            let line = |name: &str, cells: &[String]| {
                let mut l = format!("{name:<w$}");
                for (c, width) in cells.iter().zip(WIDTHS) {
                    l.push_str(&format!("  {c:>width$}"));
                }
                l + "\n"
            };
            let head: Vec<String> = COLUMNS.iter().map(|c| c.replace("_input", "")).collect();
            out.push_str(&line(label, &head));
            for (k, t) in &groups {
                out.push_str(&line(k.as_str(), &t.cells()));
            }
            out.push_str(&line("TOTAL", &total.cells()));
        }
    }
    out
}

/// The report's columns after the group's name, and their widths in the table.
const COLUMNS: [&str; 7] = [
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost",
    "saved_tokens",
    "saved_cost",
];
const WIDTHS: [usize; 7] = [10, 14, 14, 14, 18, 14, 18];

/// A cost in pico-units as an exact decimal in currency units: every significant digit kept
/// (a token at 0.15 per 1M is 0.00000015), at least two decimals.
pub fn fmt_cost(pico: u128) -> String {
    const ONE: u128 = 1_000_000_000_000;
    let frac = format!("{:012}", pico % ONE);
    let frac = frac.trim_end_matches('0');
    format!("{}.{frac:0<2}", pico / ONE)
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
pub(super) fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rows: &[UsageRow], by: By, format: Format) -> String {
        let period = Period {
            since: 20261101,
            until: 20261130,
        };
        render_report(rows, period, &[], by, format)
    }

    /// The table groups rows, aligns columns and ends with a totals row; cost is exact.
    #[test]
    fn usage_table() {
        let row = |c: &str, m: &str, i, o, cost| UsageRow {
            day: 20261126,
            consumer: c.into(),
            team: "t".into(),
            model: m.into(),
            backend: "b".into(),
            counts: UsageCounts {
                input: i,
                output: o,
                cached_input: 0,
                requests: 1,
                cost_pico: cost,
                ..UsageCounts::default()
            },
        };
        let rows = vec![
            row("a", "m1", 10, 5, 1_500_000),
            row("a", "m2", 1, 1, 0),
            row("b", "m1", 2, 2, 0),
        ];
        let t = report(&rows, By::Consumer, Format::Table);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[3].starts_with("TOTAL"));
        assert!(
            lines[1].contains("11") && lines[1].contains("0.0000015"),
            "{t}"
        );
        let csv = report(&rows, By::Consumer, Format::Csv);
        assert_eq!(
            csv.lines().nth(1),
            Some("a,2,11,6,0,0.0000015,0,0.00"),
            "{csv}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&report(&rows, By::Model, Format::Json)).unwrap();
        assert_eq!(j["total"]["input_tokens"], 13);
        assert_eq!(j["rows"][0]["model"], "m1");
        assert_eq!(j["rows"][0]["requests"], 2);
        assert_eq!(j["total"]["cost_pico"], "1500000");
        assert_eq!(j["total"]["cost_exact"], "0.0000015");
    }

    /// Costs print exactly: no rounding of small amounts away, no float drift in large ones.
    #[test]
    fn cost_precision() {
        assert_eq!(fmt_cost(0), "0.00");
        assert_eq!(fmt_cost(150_000), "0.00000015");
        assert_eq!(fmt_cost(2_500_000_000_000), "2.50");
        assert_eq!(
            fmt_cost(123_456_789_012_345_678_901),
            "123456789.012345678901"
        );
    }
}

//! `tollgate usage --by user` and `--by dimension:NAME`: usage per value of a dimension
//! (`[telemetry] dimensions`), from the store's per-dimension rows, with each value's consumer
//! and team, as a table, CSV or JSON. Values past the cap were counted as `other`.

use super::Format;
use super::report::{csv_field, fmt_cost};
use std::collections::BTreeMap;
use tollgate_quota::{DimRow, UsageCounts};

/// Counts with the cost summed in 128 bits, like the other reports.
#[derive(Default, Clone, Copy)]
struct Sum {
    counts: UsageCounts,
    cost: u128,
}

impl Sum {
    fn add(&mut self, c: &UsageCounts) {
        self.counts.add(c);
        self.cost += c.cost_pico as u128;
    }

    fn json(&self) -> serde_json::Value {
        let c = &self.counts;
        serde_json::json!({"requests": c.requests, "input_tokens": c.input,
            "output_tokens": c.output, "cached_input_tokens": c.cached_input,
            "tokens": c.input + c.output, "cost": self.cost as f64 / 1e12,
            "cost_exact": fmt_cost(self.cost), "cost_pico": self.cost.to_string()})
    }

    fn cells(&self) -> [String; 5] {
        let c = &self.counts;
        [
            c.requests.to_string(),
            c.input.to_string(),
            c.output.to_string(),
            c.cached_input.to_string(),
            fmt_cost(self.cost),
        ]
    }
}

/// The report of `dimension`: one row per value, consumer and team (a value's usage under
/// each consumer), the totals per value, and the grand total.
pub fn render(rows: &[DimRow], dimension: &str, format: Format) -> String {
    let mut groups: BTreeMap<(&str, &str, &str), Sum> = BTreeMap::new();
    let mut values: BTreeMap<&str, Sum> = BTreeMap::new();
    let mut total = Sum::default();
    for r in rows.iter().filter(|r| r.dimension == dimension) {
        groups
            .entry((&r.value, &r.consumer, &r.team))
            .or_default()
            .add(&r.counts);
        values.entry(&r.value).or_default().add(&r.counts);
        total.add(&r.counts);
    }
    let mut out = String::new();
    match format {
        Format::Json | Format::Html => {
            let with = |mut v: serde_json::Value, extra: serde_json::Value| {
                if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                    o.extend(e.clone());
                }
                v
            };
            let rows: Vec<_> = groups
                .iter()
                .map(|((v, c, t), s)| {
                    with(
                        s.json(),
                        serde_json::json!({"value": v, "consumer": c, "team": t}),
                    )
                })
                .collect();
            let vals: Vec<_> = values
                .iter()
                .map(|(v, s)| with(s.json(), serde_json::json!({ "value": v })))
                .collect();
            let doc = serde_json::json!({"by": format!("dimension:{dimension}"),
                "dimension": dimension, "rows": rows, "values": vals, "total": total.json()});
            out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str(&format!(
                "{},consumer,team,requests,input_tokens,output_tokens,cached_input_tokens,cost\n",
                csv_field(dimension)
            ));
            for ((v, c, t), s) in &groups {
                let cells = [csv_field(v), csv_field(c), csv_field(t)];
                out.push_str(&format!("{},{}\n", cells.join(","), s.cells().join(",")));
            }
        }
        Format::Table => {
            let w = |f: fn(&(&str, &str, &str)) -> usize, min: usize| {
                groups.keys().map(f).chain([min]).max().unwrap_or(min)
            };
            let (wv, wc, wt) = (
                w(|k| k.0.len(), dimension.len().max(5)),
                w(|k| k.1.len(), 8),
                w(|k| k.2.len(), 4),
            );
            let line = |v: &str, c: &str, t: &str, cells: &[String]| {
                format!(
                    "{v:<wv$}  {c:<wc$}  {t:<wt$}  {:>10}  {:>14}  {:>14}  {:>14}  {:>18}\n",
                    cells[0], cells[1], cells[2], cells[3], cells[4]
                )
            };
            let head = ["requests", "input", "output", "cached", "cost"].map(String::from);
            out.push_str(&line(dimension, "consumer", "team", &head));
            for ((v, c, t), s) in &groups {
                out.push_str(&line(v, c, t, &s.cells()));
            }
            out.push_str(&line("TOTAL", "", "", &total.cells()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: &str, consumer: &str, input: u64, cost_pico: u64) -> DimRow {
        DimRow {
            day: 20261127,
            consumer: consumer.into(),
            team: "fin".into(),
            dimension: "user".into(),
            value: value.into(),
            counts: UsageCounts {
                input,
                output: 1,
                requests: 1,
                cost_pico,
                ..Default::default()
            },
        }
    }

    /// Rows of other dimensions are left out; a value's days add up; the formats agree.
    #[test]
    fn groups_values_per_consumer() {
        let mut other_dim = row("web", "a", 100, 0);
        other_dim.dimension = "x-app".into();
        let mut next_day = row("alice", "a", 5, 500_000);
        next_day.day += 1;
        let rows = vec![
            row("alice", "a", 10, 1_000_000),
            next_day,
            row("bob", "b", 7, 0),
            other_dim,
        ];
        let j: serde_json::Value =
            serde_json::from_str(&render(&rows, "user", Format::Json)).unwrap();
        assert_eq!(j["rows"].as_array().unwrap().len(), 2);
        assert_eq!(j["rows"][0]["value"], "alice");
        assert_eq!(j["rows"][0]["input_tokens"], 15);
        assert_eq!(j["rows"][0]["tokens"], 17);
        assert_eq!(j["rows"][0]["cost_exact"], "0.0000015");
        assert_eq!(j["total"]["input_tokens"], 22);
        let csv = render(&rows, "user", Format::Csv);
        assert_eq!(csv.lines().nth(1), Some("alice,a,fin,2,15,2,0,0.0000015"));
        let table = render(&rows, "user", Format::Table);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.lines().last().unwrap().starts_with("TOTAL"));
    }
}

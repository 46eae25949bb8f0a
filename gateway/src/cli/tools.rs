//! `tollgate usage --by server|tool`: MCP tool calls from the store's daily tool-call totals,
//! one row per server (or tool, with its server), consumer and team, with calls and errors —
//! as a table, CSV or JSON.

use super::report::{Period, open_period};
use super::{By, Format};
use std::collections::BTreeMap;
use tollgate_common::config::Config;
use tollgate_quota::{Store, ToolUsage};

/// Reads the tool-call totals of `since..=until` (default: this month up to today).
pub(super) async fn read(
    config: &Config,
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<(Vec<ToolUsage>, Period)> {
    let (store, period) = open_period(
        config,
        since,
        until,
        "tool-call totals are kept in the store; with store.kind = \"memory\" they live inside \
         the running gateway (see its /metrics). Use a Redis store kind for the report.",
    )
    .await?;
    Ok((store.tool_usage(period.since, period.until).await?, period))
}

/// The rows grouped by (server or tool+server, consumer, team).
pub(super) fn render(rows: &[ToolUsage], by: &By, format: Format) -> String {
    let by_tool = matches!(by, By::Tool);
    let mut groups: BTreeMap<(String, String, String, String), (u64, u64)> = BTreeMap::new();
    for r in rows {
        let tool = if by_tool {
            r.tool.clone()
        } else {
            String::new()
        };
        let g = groups
            .entry((tool, r.server.clone(), r.consumer.clone(), r.team.clone()))
            .or_default();
        g.0 += r.calls;
        g.1 += r.errors;
    }
    let total = groups.values().fold((0, 0), |a, g| (a.0 + g.0, a.1 + g.1));
    let mut head: Vec<&str> = if by_tool { vec!["tool"] } else { vec![] };
    head.extend(["server", "consumer", "team", "calls", "errors"]);
    let cells = |(tool, server, consumer, team): &(String, String, String, String),
                 (c, e): (u64, u64)| {
        let mut v = if by_tool { vec![tool.clone()] } else { vec![] };
        v.extend([
            server.clone(),
            consumer.clone(),
            team.clone(),
            c.to_string(),
            e.to_string(),
        ]);
        v
    };
    match format {
        Format::Json | Format::Html => {
            let items: Vec<serde_json::Value> = groups
                .iter()
                .map(|(k, v)| {
                    let mut o = serde_json::json!({"server": k.1, "consumer": k.2, "team": k.3,
                        "calls": v.0, "errors": v.1});
                    if by_tool {
                        o["tool"] = serde_json::Value::String(k.0.clone());
                    }
                    o
                })
                .collect();
            let label = if by_tool { "tool" } else { "server" };
            let doc = serde_json::json!({"by": label, "rows": items,
                "total": {"calls": total.0, "errors": total.1}});
            let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
            out
        }
        Format::Csv => {
            let mut out = head.join(",") + "\n";
            for (k, v) in &groups {
                let row: Vec<String> = cells(k, *v)
                    .iter()
                    .map(|c| super::report::csv_field(c))
                    .collect();
                out.push_str(&(row.join(",") + "\n"));
            }
            out
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = groups.iter().map(|(k, v)| cells(k, *v)).collect();
            let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.len());
                }
            }
            let line = |r: &[String]| {
                let mut l = String::new();
                for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
                    if i + 2 >= r.len() {
                        l.push_str(&format!("  {c:>w$}"));
                    } else {
                        l.push_str(&format!("{c:<w$}  "));
                    }
                }
                l.trim_end().to_string() + "\n"
            };
            let mut out = line(&head.iter().map(|h| h.to_string()).collect::<Vec<_>>());
            for r in &rows {
                out.push_str(&line(r));
            }
            let mut t = vec!["TOTAL".to_string()];
            t.extend(std::iter::repeat_n(String::new(), head.len() - 3));
            t.extend([total.0.to_string(), total.1.to_string()]);
            out.push_str(&line(&t));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(server: &str, tool: &str, calls: u64, errors: u64) -> ToolUsage {
        ToolUsage {
            day: 20260101,
            consumer: "agent".into(),
            team: "ops".into(),
            server: server.into(),
            tool: tool.into(),
            calls,
            errors,
        }
    }

    /// Rows add up per server or per tool, in every format.
    #[test]
    fn groups_and_formats() {
        let rows = [
            row("t1", "echo", 2, 0),
            row("t1", "add", 1, 1),
            row("t2", "echo", 3, 0),
        ];
        let j: serde_json::Value =
            serde_json::from_str(&render(&rows, &By::Server, Format::Json)).unwrap();
        assert_eq!(j["rows"][0]["server"], "t1");
        assert_eq!(
            (
                j["rows"][0]["calls"].as_u64(),
                j["rows"][0]["errors"].as_u64()
            ),
            (Some(3), Some(1))
        );
        assert_eq!(j["total"]["calls"], 6);
        let csv = render(&rows, &By::Tool, Format::Csv);
        assert!(
            csv.starts_with("tool,server,consumer,team,calls,errors\n"),
            "{csv}"
        );
        assert!(csv.contains("echo,t2,agent,ops,3,0\n"), "{csv}");
        let table = render(&rows, &By::Tool, Format::Table);
        assert!(
            table.lines().last().unwrap().starts_with("TOTAL"),
            "{table}"
        );
        assert!(table.contains("echo"), "{table}");
    }
}

//! Tool-call limits in Redis: one EVALSHA of `quota/lua/tool_call.lua` per MCP tool call, in
//! the consumer's slot (`tg:consumer:{ID}`, `tg:toolrate:{ID}`, `tg:toolquota:{ID}`).

use super::RedisStore;
use super::codec::opt_arg;
use super::connection::{eval, evalsha};
use super::keys::{consumer_key, tool_quota_key, tool_rate_key, tool_usage_key};
use crate::tools::{ToolCallRequest, ToolDecision};
use crate::{Error, Result};
use redis::Script;
use std::sync::LazyLock;

/// Loaded on first use (and again after NOSCRIPT) by [`eval`].
static TOOL_CALL: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/tool_call.lua")));

impl RedisStore {
    pub(super) async fn tool_call_lua(&self, req: &ToolCallRequest<'_>) -> Result<ToolDecision> {
        let (c, r, q) = (
            consumer_key(req.consumer),
            tool_rate_key(req.consumer),
            tool_quota_key(req.consumer),
        );
        let mut cmd = evalsha(&TOOL_CALL, &[&c, &r, &q]);
        cmd.arg(if req.require_record { "1" } else { "0" });
        opt_arg(&mut cmd, req.per_min);
        opt_arg(&mut cmd, req.quota);
        cmd.arg(req.quota_period.as_str())
            .arg(self.inner.opts.time_offset_ms)
            .arg(format!("{:x}", crate::new_batch_id()));
        let mut conn = self.conn();
        let v: Vec<String> = self.hot(eval(&mut conn, &TOOL_CALL, &cmd)).await?;
        decode_tool_decision(&v)
    }
}

fn decode_tool_decision(v: &[String]) -> Result<ToolDecision> {
    let bad = || Error::Protocol(format!("tool_call.lua returned {v:?}"));
    let num = |s: &String| s.parse::<u64>().map_err(|_| bad());
    let opt = |s: &String| -> Result<Option<i64>> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse::<i64>().map(Some).map_err(|_| bad())
        }
    };
    Ok(match v.first().map(String::as_str) {
        Some("A") if v.len() == 3 => ToolDecision::Admitted {
            remaining_per_min: opt(&v[1])?,
            remaining_quota: opt(&v[2])?,
        },
        Some("R") if v.len() == 3 => ToolDecision::RateLimited {
            retry_after_ms: num(&v[1])?,
            limit: num(&v[2])?,
        },
        Some("Q") if v.len() == 3 => ToolDecision::QuotaExceeded {
            retry_after_ms: num(&v[1])?,
            limit: num(&v[2])?,
        },
        Some("D") => ToolDecision::Disabled,
        Some("U") => ToolDecision::UnknownConsumer,
        _ => return Err(bad()),
    })
}

impl RedisStore {
    /// One `HINCRBY` per count and an `EXPIRE` per key, pipelined per slot.
    pub(super) async fn add_tool_usage_redis(&self, rows: &[crate::ToolUsage]) -> Result<()> {
        let retention = u64::from(self.inner.opts.usage_retention_days) * 86_400;
        let conn = self.conn();
        let mut cmds = Vec::new();
        for r in rows {
            let key = tool_usage_key(&r.consumer, r.day);
            let field = format!("{}|{}|{}", r.team, r.server, r.tool.replace('|', "_"));
            let mut pipe = redis::pipe();
            pipe.hincr(&key, format!("{field}|calls"), r.calls)
                .ignore()
                .hincr(&key, format!("{field}|errors"), r.errors)
                .ignore()
                .expire(&key, retention as i64)
                .ignore();
            cmds.push((key, pipe));
        }
        for (key, pipe) in cmds {
            let mut c = conn.clone();
            let _: () = self
                .background(async move {
                    let _ = &key;
                    pipe.query_async(&mut c).await
                })
                .await?;
        }
        Ok(())
    }

    /// Every `tg:toolusage:*` key in the range of days, read with `HGETALL` (an admin path).
    pub(super) async fn scan_tool_usage(
        &self,
        since: u32,
        until: u32,
    ) -> Result<Vec<crate::ToolUsage>> {
        use std::collections::BTreeMap;
        let mut rows: BTreeMap<crate::tools::ToolUsageKey, (u64, u64)> = BTreeMap::new();
        for key in self.scan_all("tg:toolusage:*").await? {
            let Some((consumer, day)) = key
                .strip_prefix("tg:toolusage:{")
                .and_then(|r| r.rsplit_once("}:"))
                .and_then(|(id, d)| Some((id.to_string(), d.parse::<u32>().ok()?)))
            else {
                continue;
            };
            if day < since || day > until {
                continue;
            }
            let h: std::collections::HashMap<String, u64> = self
                .admin_cmd(redis::cmd("HGETALL").arg(&key).to_owned())
                .await?;
            for (field, v) in h {
                let mut parts = field.splitn(4, '|');
                let (Some(team), Some(server), Some(rest)) =
                    (parts.next(), parts.next(), parts.next().zip(parts.next()))
                else {
                    continue;
                };
                let (tool, metric) = rest;
                let r = rows
                    .entry((
                        day,
                        consumer.clone(),
                        team.into(),
                        server.into(),
                        tool.into(),
                    ))
                    .or_default();
                match metric {
                    "calls" => r.0 += v,
                    "errors" => r.1 += v,
                    _ => {}
                }
            }
        }
        Ok(rows
            .into_iter()
            .map(
                |((day, consumer, team, server, tool), (calls, errors))| crate::ToolUsage {
                    day,
                    consumer,
                    team,
                    server,
                    tool,
                    calls,
                    errors,
                },
            )
            .collect())
    }
}

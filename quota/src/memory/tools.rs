//! Tool-call limits in memory: the twin of `quota/lua/tool_call.lua`, decision for decision.

use super::MemoryStore;
use crate::model::window_bounds;
use crate::tools::{TOOL_WINDOW_US, ToolCallRequest, ToolDecision};
use std::collections::VecDeque;

/// A consumer's tool calls: the times (unix us) of those of the last minute, and the quota
/// window's count.
#[derive(Default)]
pub(super) struct ToolUse {
    recent: VecDeque<u64>,
    window: u64,
    used: u64,
}

impl MemoryStore {
    pub(super) fn tool_call_mem(&self, req: &ToolCallRequest<'_>) -> ToolDecision {
        let now_us = self.clock.now_us();
        let now_s = now_us / 1_000_000;
        let mut g = self.inner.lock();
        let (mut period, per_min, quota) = (req.quota_period, req.per_min, req.quota);
        match g.consumers.get(req.consumer) {
            Some(r) if r.disabled => return ToolDecision::Disabled,
            Some(r) => period = r.quota_period,
            None if req.require_record => return ToolDecision::UnknownConsumer,
            None => {}
        }
        let u = g.tool_use.entry(req.consumer.to_string()).or_default();
        let (w, w_end) = window_bounds(period, now_s);
        if let Some(q) = quota {
            if u.window != w {
                u.window = w;
                u.used = 0;
            }
            if u.used >= q {
                return ToolDecision::QuotaExceeded {
                    retry_after_ms: (w_end * 1000).saturating_sub(now_us / 1000),
                    limit: q,
                };
            }
        }
        let mut count = 0;
        if let Some(m) = per_min {
            while u
                .recent
                .front()
                .is_some_and(|t| *t <= now_us.saturating_sub(TOOL_WINDOW_US))
            {
                u.recent.pop_front();
            }
            count = u.recent.len() as u64;
            if m == 0 {
                return ToolDecision::RateLimited {
                    retry_after_ms: TOOL_WINDOW_US / 1000,
                    limit: 0,
                };
            }
            if count >= m {
                let oldest = u.recent[(count - m) as usize];
                let leaves = (oldest + TOOL_WINDOW_US).saturating_sub(now_us);
                return ToolDecision::RateLimited {
                    retry_after_ms: leaves.div_ceil(1000).max(1),
                    limit: m,
                };
            }
            u.recent.push_back(now_us);
        }
        if quota.is_some() {
            u.used += 1;
        }
        ToolDecision::Admitted {
            remaining_per_min: per_min.map(|m| m as i64 - count as i64 - 1),
            remaining_quota: quota.map(|q| q as i64 - u.used as i64),
        }
    }
}

impl MemoryStore {
    pub(super) fn add_tool_usage_mem(&self, rows: &[crate::ToolUsage]) {
        let mut g = self.inner.lock();
        for r in rows {
            let k = (
                r.day,
                r.consumer.clone(),
                r.team.clone(),
                r.server.clone(),
                r.tool.clone(),
            );
            let t = g.tool_totals.entry(k).or_default();
            t.0 = t.0.saturating_add(r.calls);
            t.1 = t.1.saturating_add(r.errors);
        }
    }

    pub(super) fn tool_usage_mem(&self, since: u32, until: u32) -> Vec<crate::ToolUsage> {
        let g = self.inner.lock();
        let mut rows: Vec<crate::ToolUsage> = g
            .tool_totals
            .iter()
            .filter(|(k, _)| k.0 >= since && k.0 <= until)
            .map(|(k, v)| crate::ToolUsage {
                day: k.0,
                consumer: k.1.clone(),
                team: k.2.clone(),
                server: k.3.clone(),
                tool: k.4.clone(),
                calls: v.0,
                errors: v.1,
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.day, &a.consumer, &a.server, &a.tool, &a.team).cmp(&(
                b.day,
                &b.consumer,
                &b.server,
                &b.tool,
                &b.team,
            ))
        });
        rows
    }
}

//! Tool-call limits (MCP, `[[consumers]] tool_calls_per_min` / `tool_calls_quota`): what a
//! replica asks the store before it forwards a `tools/call`, and what the store answers. One
//! atomic step per call, in the consumer's slot: `quota/lua/tool_call.lua` in Redis, its twin in
//! the memory store.
//!
//! The per-minute limit is a rolling minute (at most N calls in any 60 s), so it holds exactly
//! across replicas and across a minute boundary; the quota counts calls per `quota_period`
//! window like the token quota. In Redis the consumer's hash fields `tool_calls_per_min` and
//! `tool_calls_quota` win over the values the request carries (the configuration's), so an
//! operator changes them with `HSET` like token limits.

use tollgate_common::Period;

/// One tool call to admit or refuse.
#[derive(Clone, Debug)]
pub struct ToolCallRequest<'a> {
    pub consumer: &'a str,
    /// Calls in any rolling minute (the configured value; a stored field wins). `None` = none.
    pub per_min: Option<u64>,
    /// Calls per `quota_period` window (the configured value; a stored field wins).
    pub quota: Option<u64>,
    /// The window of `quota` when the consumer's record names none.
    pub quota_period: Period,
    /// Key-authenticated callers must have a stored consumer; JWT callers may not.
    pub require_record: bool,
}

/// The store's answer to a [`ToolCallRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolDecision {
    /// Counted. What is left after this call (`None`: no such limit).
    Admitted {
        remaining_per_min: Option<i64>,
        remaining_quota: Option<i64>,
    },
    /// `limit` calls were made in the last minute; the oldest leaves it in `retry_after_ms`.
    RateLimited {
        retry_after_ms: u64,
        limit: u64,
    },
    /// The period's `limit` calls are spent; the window ends in `retry_after_ms`.
    QuotaExceeded {
        retry_after_ms: u64,
        limit: u64,
    },
    Disabled,
    UnknownConsumer,
}

/// The rolling window of `per_min`, in microseconds.
pub const TOOL_WINDOW_US: u64 = 60_000_000;

/// Tool calls of one consumer, team, server and tool on one day, added to the totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolUsage {
    /// `YYYYMMDD` (UTC).
    pub day: u32,
    pub consumer: String,
    pub team: String,
    pub server: String,
    pub tool: String,
    pub calls: u64,
    /// Calls that ended in an error (a JSON-RPC error, `isError`, an upstream fault).
    pub errors: u64,
}

/// (day, consumer, team, server, tool): what tool-call totals are kept by.
pub(crate) type ToolUsageKey = (u32, String, String, String, String);

//! Tool lists: every page of an upstream's `tools/list` followed, filtered by the server's
//! `tools` globs and the caller's allow-list; and which tools exist, so that a call to a tool
//! the caller may not see and a call to a tool that does not exist get the same answer from
//! the gateway (`-32602 Unknown tool`) and the upstream sees neither.
//!
//! What each upstream offers is remembered per replica for [`FRESH_FOR`], refreshed by any
//! `tools/list` through the gateway or, when stale, by the next call.

use super::McpState;
use super::glob;
use super::serve::{Who, exchange};
use super::upstream::{Carry, Fault, Upstream};
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Most `tools/list` pages followed for one answer (a server that never stops paging).
const MAX_PAGES: usize = 100;
/// How long a server's tool names are trusted before a call refreshes them.
pub const FRESH_FOR: Duration = Duration::from_secs(30);

/// The tool names each upstream offered, and when they were read.
#[derive(Default)]
pub struct Known {
    by_server: Mutex<HashMap<String, (Instant, HashSet<String>)>>,
}

impl Known {
    /// Whether `tool` exists on `server`: `None` when not known recently.
    fn exists(&self, server: &str, tool: &str) -> Option<bool> {
        let g = self.by_server.lock();
        let (at, names) = g.get(server)?;
        (at.elapsed() < FRESH_FOR).then(|| names.contains(tool))
    }

    fn set(&self, server: &str, names: HashSet<String>) {
        self.by_server
            .lock()
            .insert(server.to_string(), (Instant::now(), names));
    }
}

/// Every tool of `u` (all pages), unfiltered; remembered as what `u` offers.
async fn fetch(
    s: &McpState,
    u: &Upstream,
    carry: &Carry<'_>,
    id: &Value,
) -> Result<Vec<Value>, Result<Value, Fault>> {
    let mut tools = Vec::new();
    let mut cursor: Option<Value> = None;
    for _ in 0..MAX_PAGES {
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"});
        if let Some(c) = cursor.take() {
            req["params"] = json!({"cursor": c});
        }
        let body = Bytes::from(req.to_string());
        let (answer, _) = exchange(s, u, carry, body, id).await.map_err(Err)?;
        if answer.get("error").is_some() {
            return Err(Ok(answer));
        }
        let result = &answer["result"];
        tools.extend(result["tools"].as_array().into_iter().flatten().cloned());
        match result.get("nextCursor") {
            Some(c) if !c.is_null() => cursor = Some(c.clone()),
            _ => break,
        }
    }
    let names = tools
        .iter()
        .filter_map(|t| t["name"].as_str().map(String::from))
        .collect();
    s.mcp.known.set(&u.name, names);
    Ok(tools)
}

/// Every tool of `u` the caller may see. `Err`: the upstream's error answer or a fault.
pub async fn list(
    s: &McpState,
    who: &Who,
    u: &Upstream,
    carry: &Carry<'_>,
    id: &Value,
) -> Result<Vec<Value>, Result<Value, Fault>> {
    let mut tools = fetch(s, u, carry, id).await?;
    tools.retain(|t| {
        let name = t["name"].as_str().unwrap_or_default();
        glob::any(&u.tools, name) && who.tools.allow.allows(&u.name, name)
    });
    s.mcp.metrics.listed(&u.name, &tools);
    Ok(tools)
}

/// Whether the caller may call `tool` of `u`: allowed, and offered by the upstream (when its
/// list cannot be read, the upstream decides).
pub async fn callable(
    s: &McpState,
    who: &Who,
    u: &Upstream,
    carry: &Carry<'_>,
    tool: &str,
) -> bool {
    if !(glob::any(&u.tools, tool) && who.tools.allow.allows(&u.name, tool)) {
        return false;
    }
    if let Some(known) = s.mcp.known.exists(&u.name, tool) {
        return known;
    }
    match fetch(s, u, carry, &json!("tollgate-tools")).await {
        Ok(_) => s.mcp.known.exists(&u.name, tool).unwrap_or(true),
        Err(_) => true,
    }
}

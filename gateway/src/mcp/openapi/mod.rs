//! OpenAPI → MCP: a REST API described by an OpenAPI 3.0/3.1 document (JSON or YAML) served as
//! MCP tools. [`load`] reads the document into a [`Catalog`] (one tool per selected operation,
//! warnings for the operations skipped); [`OpenApiTools`] holds the current catalog behind an
//! `Arc` (a reload swaps it whole), lists the tools in MCP's `Tool` shape and turns a
//! `tools/call` into the HTTP request, the answer into MCP's `CallToolResult` shape.
//! docs/OPENAPI.md describes the mapping.
//!
//! - [`document`]: the text into a JSON tree, `$ref`s inlined, problems named by JSON pointer.
//! - [`names`]: tool names (sanitized `operationId`s, generated names) and the selecting globs.
//! - [`schema`]: OpenAPI schemas into JSON Schema.
//! - [`operations`]: operations into tools.
//! - [`validate`]: arguments checked against the input schema.
//! - [`request`]: arguments into the URL, headers and body.
//! - [`call`]: the exchange with the upstream and the tool result.

pub mod call;
pub mod document;
pub mod names;
pub mod operations;
pub mod request;
pub mod schema;
pub mod validate;

use crate::credentials::Credential;
use anyhow::{Context as _, anyhow, bail};
use indexmap::IndexMap;
use parking_lot::RwLock;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use operations::Tool;

/// One REST API exported as tools: the fields an `[[mcp_servers]]` entry with `openapi` maps
/// onto (`openapi`, `base_url`, `operations`, `timeout_ms` are the config's names).
#[derive(Clone, Debug)]
pub struct OpenApiSpec {
    /// The server's name (`/mcp/{name}`), used in messages.
    pub name: String,
    /// The document's file.
    pub openapi: PathBuf,
    /// Replaces the document's `servers[0].url` (needed when that is missing or relative).
    pub base_url: Option<String>,
    /// Globs on the `operationId` (or the generated name) choosing the operations served.
    pub operations: Vec<String>,
    /// The longest one call may take, connect to last body byte.
    pub timeout_ms: u64,
    /// The most of an answer's body passed on; the rest is cut with a note.
    pub max_response_bytes: usize,
}

impl OpenApiSpec {
    /// A spec with the defaults: every operation, 10 s, 1 MiB.
    pub fn new(name: impl Into<String>, openapi: impl Into<PathBuf>) -> Self {
        OpenApiSpec {
            name: name.into(),
            openapi: openapi.into(),
            base_url: None,
            operations: vec!["*".into()],
            timeout_ms: 10_000,
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// The tools of one loaded document. Immutable; a reload builds a new one.
#[derive(Debug)]
pub struct Catalog {
    /// Where requests go: `scheme://host[:port][/prefix]`, no trailing `/`.
    pub base_url: String,
    pub tools: IndexMap<String, Tool>,
    /// The operations skipped and why, for the caller to log at start and on reload.
    pub warnings: Vec<String>,
}

/// Reads and converts `spec`'s document. Blocking (file I/O and parsing): call it at start-up
/// or from `spawn_blocking`. `credential_header` is the header the credential is sent in
/// ([`credential_header`]); a parameter of that name is not offered to callers.
pub fn load(spec: &OpenApiSpec, credential_header: Option<&str>) -> anyhow::Result<Catalog> {
    let file = spec.openapi.display();
    let text = std::fs::read_to_string(&spec.openapi).with_context(|| {
        format!(
            "mcp server {}: reading the OpenAPI document {file}",
            spec.name
        )
    })?;
    let json = spec
        .openapi
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let at = |p: document::Problem| {
        let place = if p.at.is_empty() {
            "the document".to_string()
        } else {
            format!("at {}", p.at)
        };
        anyhow!(
            "mcp server {}: OpenAPI document {file}: {place}: {}",
            spec.name,
            p.what
        )
    };
    let doc = document::Document::parse(&text, json).map_err(at)?;
    let base_url = base_url(spec, &doc).map_err(at)?;
    let built = operations::build(&doc, &spec.operations, credential_header).map_err(at)?;
    let tools = built
        .tools
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    Ok(Catalog {
        base_url,
        tools,
        warnings: built.warnings,
    })
}

/// `base_url`, else the document's `servers[0].url`; absolute http(s), no credentials, no query.
fn base_url(spec: &OpenApiSpec, doc: &document::Document) -> Result<String, document::Problem> {
    let (raw, at) = match &spec.base_url {
        Some(b) => (b.clone(), "(base_url)".to_string()),
        None => match doc.root.pointer("/servers/0/url").and_then(Value::as_str) {
            Some(u) => (u.to_string(), "/servers/0/url".to_string()),
            None => {
                return Err(document::Problem::new(
                    "/servers",
                    "no server URL; set base_url",
                ));
            }
        },
    };
    if raw.contains('{') {
        return Err(document::Problem::new(
            at,
            format!("{raw:?} has server variables (not supported); set base_url"),
        ));
    }
    let url = reqwest::Url::parse(&raw).map_err(|_| {
        document::Problem::new(&at, format!("{raw:?} is not an absolute URL (relative server URLs are not supported); set base_url"))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(document::Problem::new(
            at,
            format!("{raw:?}: expected an http:// or https:// URL"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(document::Problem::new(
            at,
            "credentials in the URL are not allowed; use auth",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(document::Problem::new(
            at,
            format!("{raw:?}: a base URL takes no query or fragment"),
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// The header `credential` is sent in (lower case), if any.
pub fn credential_header(credential: &Credential) -> Option<&'static str> {
    match credential {
        Credential::None => None,
        Credential::Header(name, _) => Some(name),
        Credential::Token(_) => Some("authorization"),
    }
}

/// A call refused before any request: JSON-RPC invalid params (-32602). The message names the
/// field; it never contains a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidParams {
    pub message: String,
}

impl InvalidParams {
    /// The JSON-RPC error code.
    pub const CODE: i64 = -32602;

    /// The JSON-RPC `error` object.
    pub fn to_jsonrpc(&self) -> Value {
        json!({ "code": Self::CODE, "message": self.message })
    }
}

impl std::fmt::Display for InvalidParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The outcome of a call that reached the point of sending (or tried to).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolResult {
    /// MCP's `isError`: the upstream answered an error, redirected, timed out or was unreachable.
    pub is_error: bool,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    pub text: String,
    /// The JSON object body, when the tool has an `outputSchema`.
    pub structured: Option<Value>,
}

impl ToolResult {
    pub fn error(status: Option<u16>, text: String) -> Self {
        ToolResult {
            is_error: true,
            status,
            text,
            structured: None,
        }
    }

    /// MCP's `CallToolResult`.
    pub fn to_mcp(&self) -> Value {
        let mut r = json!({
            "content": [{ "type": "text", "text": self.text }],
            "isError": self.is_error,
        });
        if let Some(s) = &self.structured {
            r["structuredContent"] = s.clone();
        }
        r
    }
}

/// One exported REST API: the current catalog, the upstream credential and the HTTP client.
pub struct OpenApiTools {
    spec: OpenApiSpec,
    credential: Credential,
    client: reqwest::Client,
    current: RwLock<Arc<Catalog>>,
}

impl OpenApiTools {
    /// Loads `spec` (blocking, as [`load`]) and builds the client (no redirects followed).
    pub fn new(spec: OpenApiSpec, credential: Credential) -> anyhow::Result<OpenApiTools> {
        if spec.timeout_ms == 0 {
            bail!("mcp server {}: timeout_ms must be > 0", spec.name);
        }
        let catalog = load(&spec, credential_header(&credential))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTP client")?;
        Ok(OpenApiTools {
            spec,
            credential,
            client,
            current: RwLock::new(Arc::new(catalog)),
        })
    }

    /// Reads the document again and swaps the catalog; on an error the old one stays.
    /// Returns the new catalog (its warnings to log). Blocking, as [`load`].
    pub fn reload(&self) -> anyhow::Result<Arc<Catalog>> {
        let fresh = Arc::new(load(&self.spec, credential_header(&self.credential))?);
        *self.current.write() = fresh.clone();
        Ok(fresh)
    }

    /// [`reload`](Self::reload) off the async runtime (the file is read and parsed on a
    /// blocking thread): what a SIGHUP handler calls.
    pub async fn reload_async(self: &Arc<Self>) -> anyhow::Result<Arc<Catalog>> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reload())
            .await
            .context("the reload task failed")?
    }

    /// The catalog in use now (a cheap clone of an `Arc`).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.current.read().clone()
    }

    pub fn spec(&self) -> &OpenApiSpec {
        &self.spec
    }

    /// The tools in MCP's `Tool` shape, by path (sorted), then method.
    pub fn list(&self) -> Vec<Value> {
        self.catalog().tools.values().map(Tool::to_mcp).collect()
    }

    /// Calls `tool` with `args`: validated first (an unknown tool or bad arguments send
    /// nothing), then one HTTP exchange bounded by `timeout_ms`.
    pub async fn call(&self, tool: &str, args: Value) -> Result<ToolResult, InvalidParams> {
        let catalog = self.catalog();
        let invalid = |message: String| InvalidParams { message };
        let t = catalog
            .tools
            .get(tool)
            .ok_or_else(|| invalid(format!("unknown tool {tool:?}")))?;
        let args = match args {
            Value::Null => Value::Object(serde_json::Map::new()),
            Value::Object(m) => Value::Object(m),
            _ => return Err(invalid("arguments: expected an object".into())),
        };
        validate::validate(&t.input_schema, &args).map_err(invalid)?;
        let empty = serde_json::Map::new();
        let fields = args.as_object().unwrap_or(&empty);
        let prepared = request::prepare(&catalog.base_url, t, fields).map_err(invalid)?;
        let limits = call::Limits {
            timeout: Duration::from_millis(self.spec.timeout_ms),
            max_response_bytes: self.spec.max_response_bytes,
            output_schema: t.output_schema.as_ref(),
        };
        Ok(call::send(&self.client, &self.credential, prepared, &limits).await)
    }
}

#[cfg(test)]
mod tests;

//! Operations into tools: which operations are selected, the tool's name, description and input
//! and output schemas, and what a call needs to rebuild the HTTP request (method, path template,
//! where each argument goes). Shapes a tool cannot carry are skipped with a warning; a broken
//! document is a [`Problem`].
//!
//! The input schema is one object: each path, query and header parameter is a property under
//! its name as written in the document, and the JSON request body is the property `body`. An
//! operation where two parameters share a name, or a parameter is called `body` while there is
//! a body, is skipped (the scheme has no second place to put it).

use super::document::{Document, Problem, escape};
use super::names;
use super::schema::{described, is_json, json_schema, output_schema};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// Header parameters OpenAPI says to ignore (the gateway sets them).
const IGNORED_HEADERS: &[&str] = &["accept", "content-type", "authorization"];
/// Headers an argument may never set: they frame the request or carry credentials.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "cookie",
    "proxy-authorization",
    "proxy-connection",
];

/// Where an argument goes in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
    Header,
}

/// One parameter of an operation.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub location: In,
    /// A query array as one `name=value` pair per item (`form`, `explode: true`, the default)
    /// or as one pair with the items joined by `,` (`explode: false`).
    pub explode: bool,
}

/// One tool: what `tools/list` shows and what `tools/call` needs.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
    pub output_schema: Option<Value>,
    pub method: http::Method,
    /// The path template as in the document (`/orders/{id}`).
    pub path: String,
    pub params: Vec<Param>,
    /// The body's media type, when the operation takes a JSON body.
    pub body: Option<String>,
}

impl Tool {
    /// The tool in MCP's `Tool` shape.
    pub fn to_mcp(&self) -> Value {
        let mut t = json!({
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
        });
        if let Some(o) = &self.output_schema {
            t["outputSchema"] = o.clone();
        }
        let safe = matches!(
            self.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        let idempotent = safe || matches!(self.method, http::Method::PUT | http::Method::DELETE);
        t["annotations"] = json!({ "readOnlyHint": safe, "idempotentHint": idempotent });
        t
    }
}

/// The selected operations as tools, and the warnings about those skipped.
#[derive(Debug)]
pub struct Built {
    pub tools: Vec<Tool>,
    pub warnings: Vec<String>,
}

/// Why an operation gave no tool.
enum Refusal {
    Broken(Problem),
    Skip(String),
}

impl From<Problem> for Refusal {
    fn from(p: Problem) -> Self {
        Refusal::Broken(p)
    }
}

/// Every operation of `doc` selected by `patterns` (globs on the `operationId`, or on the
/// generated name of an operation without one). `credential_header` is the header the upstream
/// credential goes in: a parameter of that name is left out (the gateway sets it).
pub fn build(
    doc: &Document,
    patterns: &[String],
    credential_header: Option<&str>,
) -> Result<Built, Problem> {
    let paths = match doc.root.get("paths") {
        Some(Value::Object(p)) => p,
        Some(_) => return Err(Problem::new("/paths", "not an object")),
        None => return Err(Problem::new("/paths", "missing")),
    };
    let mut built = Built {
        tools: Vec::new(),
        warnings: Vec::new(),
    };
    // Tool name -> the operation that took it, to name both on a collision.
    let mut taken: HashMap<String, String> = HashMap::new();
    for (path, item) in paths {
        let item_at = format!("/paths/{}", escape(path));
        if !path.starts_with('/') {
            return Err(Problem::new(item_at, "a path must start with '/'"));
        }
        let item = doc.inline(item, &item_at)?;
        let Value::Object(item) = item else {
            return Err(Problem::new(item_at, "not an object"));
        };
        let shared = item.get("parameters");
        for method in METHODS {
            let Some(op) = item.get(*method) else {
                continue;
            };
            let at = format!("{item_at}/{method}");
            let Value::Object(op) = op else {
                return Err(Problem::new(at, "not an object"));
            };
            let op_id = op.get("operationId").and_then(Value::as_str);
            let label = match op_id {
                Some(id) => format!("{} {path} ({id})", method.to_uppercase()),
                None => format!("{} {path}", method.to_uppercase()),
            };
            let (selector, name) = match op_id.and_then(|id| names::sanitize(id).map(|n| (id, n))) {
                Some((id, n)) => (id.to_string(), n),
                None => {
                    let n = names::generated(method, path);
                    (n.clone(), n)
                }
            };
            if !names::selected(patterns, &selector) {
                continue;
            }
            let tool = match operation(
                doc,
                op,
                shared,
                Site {
                    method,
                    path,
                    at: &at,
                },
                name,
                credential_header,
            ) {
                Ok(t) => t,
                Err(Refusal::Skip(why)) => {
                    built
                        .warnings
                        .push(format!("operation {label} skipped: {why}"));
                    continue;
                }
                Err(Refusal::Broken(p)) => return Err(p),
            };
            if let Some(first) = taken.insert(tool.name.clone(), label.clone()) {
                return Err(Problem::new(
                    at,
                    format!("{label} and {first} both become the tool {:?}", tool.name),
                ));
            }
            if op.contains_key("servers") || item.contains_key("servers") {
                built.warnings.push(format!(
                    "operation {label} declares its own servers; its calls go to the base URL"
                ));
            }
            built.tools.push(tool);
        }
    }
    Ok(built)
}

/// Where an operation sits: its method, path template and JSON pointer.
#[derive(Clone, Copy)]
struct Site<'a> {
    method: &'a str,
    path: &'a str,
    at: &'a str,
}

fn operation(
    doc: &Document,
    op: &Map<String, Value>,
    shared: Option<&Value>,
    site: Site<'_>,
    name: String,
    credential_header: Option<&str>,
) -> Result<Tool, Refusal> {
    let Site { method, path, at } = site;
    let mut properties = Map::new();
    let mut required = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    for (p, p_at) in merged_params(shared, op.get("parameters"), at)? {
        let Some(pname) = p.get("name").and_then(Value::as_str) else {
            return Err(Problem::new(format!("{p_at}/name"), "missing").into());
        };
        let location = match p.get("in").and_then(Value::as_str) {
            Some("path") => In::Path,
            Some("query") => In::Query,
            Some("header") => {
                let lower = pname.to_ascii_lowercase();
                if IGNORED_HEADERS.contains(&lower.as_str())
                    || credential_header.is_some_and(|c| c.eq_ignore_ascii_case(pname))
                {
                    continue;
                }
                if FORBIDDEN_HEADERS.contains(&lower.as_str())
                    || lower.starts_with("proxy-")
                    || http::HeaderName::from_bytes(pname.as_bytes()).is_err()
                {
                    return Err(Refusal::Skip(format!(
                        "header parameter {pname:?} cannot be set by a tool call"
                    )));
                }
                In::Header
            }
            Some("cookie") => {
                return Err(Refusal::Skip(format!(
                    "cookie parameter {pname:?} (cookies are not supported)"
                )));
            }
            _ => {
                return Err(Problem::new(
                    format!("{p_at}/in"),
                    "expected path, query, header or cookie",
                )
                .into());
            }
        };
        if p.get("content").is_some() && p.get("schema").is_none() {
            return Err(Refusal::Skip(format!(
                "parameter {pname:?} is described by `content` (not supported)"
            )));
        }
        if properties.contains_key(pname) {
            return Err(Refusal::Skip(format!(
                "two parameters are named {pname:?} (tool arguments need distinct names)"
            )));
        }
        let schema = json_schema(p.get("schema").unwrap_or(&json!({})), doc.version);
        let schema = described(schema, p.get("description").and_then(Value::as_str));
        properties.insert(pname.to_string(), schema);
        // The serialization styles built: `form` for the query, `simple` for path and header.
        let plain = if location == In::Query {
            "form"
        } else {
            "simple"
        };
        if let Some(style) = p.get("style").and_then(Value::as_str)
            && style != plain
        {
            return Err(Refusal::Skip(format!(
                "parameter {pname:?} uses style {style:?} (only {plain:?} is supported here)"
            )));
        }
        let explode = p
            .get("explode")
            .and_then(Value::as_bool)
            .unwrap_or(location == In::Query);
        if location == In::Path || p.get("required") == Some(&Value::Bool(true)) {
            required.push(Value::String(pname.to_string()));
        }
        params.push(Param {
            name: pname.to_string(),
            location,
            explode,
        });
    }
    for placeholder in placeholders(path) {
        if !params
            .iter()
            .any(|p| p.location == In::Path && p.name == placeholder)
        {
            return Err(Refusal::Skip(format!(
                "path parameter {{{placeholder}}} is not declared"
            )));
        }
    }
    let body = match op.get("requestBody") {
        None => None,
        Some(rb) => {
            let (media, schema) = json_body(rb)?;
            if properties.contains_key("body") {
                return Err(Refusal::Skip(
                    "a parameter is named \"body\", which is where the request body goes".into(),
                ));
            }
            let schema = described(
                json_schema(&schema, doc.version),
                rb.get("description").and_then(Value::as_str),
            );
            properties.insert("body".into(), schema);
            if rb.get("required") == Some(&Value::Bool(true)) {
                required.push(Value::String("body".into()));
            }
            Some(media)
        }
    };
    let mut input = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false,
    });
    if !required.is_empty() {
        input["required"] = Value::Array(required);
    }
    Ok(Tool {
        name,
        description: description(op, method, path),
        input_schema: input,
        output_schema: output_schema(doc, op),
        method: method
            .to_uppercase()
            .parse()
            .map_err(|_| Problem::new(at, "not an HTTP method"))?,
        path: path.to_string(),
        params,
        body,
    })
}

/// A parameter object and its pointer.
type Located<'a> = (&'a Map<String, Value>, String);

/// The path item's parameters overlaid with the operation's (same name and location: the
/// operation's wins), each with its pointer.
fn merged_params<'a>(
    shared: Option<&'a Value>,
    own: Option<&'a Value>,
    at: &str,
) -> Result<Vec<Located<'a>>, Problem> {
    let item_at = at.rsplit_once('/').map_or(at, |(item, _)| item);
    let mut out: Vec<Located<'a>> = Vec::new();
    for (list, list_at) in [(shared, item_at), (own, at)] {
        let Some(list) = list else { continue };
        let Value::Array(list) = list else {
            return Err(Problem::new(format!("{list_at}/parameters"), "not a list"));
        };
        for (i, p) in list.iter().enumerate() {
            let p_at = format!("{list_at}/parameters/{i}");
            let Value::Object(p) = p else {
                return Err(Problem::new(p_at, "not an object"));
            };
            let key = (p.get("name"), p.get("in"));
            out.retain(|(q, _)| (q.get("name"), q.get("in")) != key);
            out.push((p, p_at));
        }
    }
    Ok(out)
}

/// The `{name}`s of a path template.
pub fn placeholders(path: &str) -> impl Iterator<Item = &str> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
}

/// The JSON media type of a request body and its schema; any other body is skipped.
fn json_body(rb: &Value) -> Result<(String, Value), Refusal> {
    let content = rb.get("content").and_then(Value::as_object);
    let found = content.and_then(|c| c.iter().find(|(media, _)| is_json(media)));
    match found {
        Some((media, m)) => Ok((
            media.clone(),
            m.get("schema").cloned().unwrap_or_else(|| json!({})),
        )),
        None => {
            let kinds: Vec<&str> =
                content.map_or(Vec::new(), |c| c.keys().map(String::as_str).collect());
            Err(Refusal::Skip(format!(
                "request body {} is not JSON (only application/json and +json bodies are supported)",
                kinds.join(", ")
            )))
        }
    }
}

fn description(op: &Map<String, Value>, method: &str, path: &str) -> String {
    let text = |k: &str| {
        op.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    match (text("summary"), text("description")) {
        (Some(s), Some(d)) if s != d => format!("{s}\n\n{d}"),
        (Some(s), _) => s.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => format!("{} {path}", method.to_uppercase()),
    }
}

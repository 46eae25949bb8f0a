//! Reading an OpenAPI document: JSON or YAML text into one JSON tree, the version check, and
//! `$ref`s inlined. Every problem names the JSON pointer where it sits in the document
//! ([`Problem`]), so a broken document fails start-up with a place to look.

use serde_json::{Map, Value};

/// `$ref`s followed in one chain before the document counts as broken (a chain this long is
/// almost certainly a generated cycle the stack check did not see, e.g. through siblings).
const MAX_REF_CHAIN: usize = 32;
/// Nesting of the inlined tree: a bound on what inlining can build from a small document.
const MAX_NESTING: usize = 256;

/// What is wrong and where (a JSON pointer into the document, `""` for the whole of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub what: String,
}

impl Problem {
    pub fn new(at: impl Into<String>, what: impl Into<String>) -> Self {
        Problem {
            at: at.into(),
            what: what.into(),
        }
    }
}

/// The OpenAPI versions read: 3.0 schemas are converted to JSON Schema (`nullable`, boolean
/// `exclusiveMinimum`), 3.1 schemas already are JSON Schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V30,
    V31,
}

/// A parsed document.
#[derive(Debug)]
pub struct Document {
    pub root: Value,
    pub version: Version,
}

impl Document {
    /// Parses `text` (JSON when `json`, else YAML, which also reads JSON) and checks the
    /// `openapi` field.
    pub fn parse(text: &str, json: bool) -> Result<Document, Problem> {
        let root = if json {
            serde_json::from_str::<Value>(text)
                .map_err(|e| Problem::new("", format!("not valid JSON: {e}")))?
        } else {
            let y: serde_yaml::Value = serde_yaml::from_str(text)
                .map_err(|e| Problem::new("", format!("not valid YAML: {e}")))?;
            yaml_to_json(y, "")?
        };
        if !root.is_object() {
            return Err(Problem::new("", "the document is not an object"));
        }
        let version = match root.get("openapi").and_then(Value::as_str) {
            Some(v) if v.starts_with("3.0") => Version::V30,
            Some(v) if v.starts_with("3.1") => Version::V31,
            Some(v) => {
                return Err(Problem::new(
                    "/openapi",
                    format!("OpenAPI {v:?} is not supported (3.0 and 3.1 are)"),
                ));
            }
            None if root.get("swagger").is_some() => {
                return Err(Problem::new(
                    "/swagger",
                    "Swagger 2.0 is not supported (convert it to OpenAPI 3)",
                ));
            }
            None => {
                return Err(Problem::new(
                    "/openapi",
                    "missing (expected \"3.0.x\" or \"3.1.x\")",
                ));
            }
        };
        Ok(Document { root, version })
    }

    /// `v` (found at `at`) with every `$ref` inside it replaced by what it points to, to any
    /// depth. Refused: a `$ref` outside this document, one that does not resolve, a cycle.
    pub fn inline(&self, v: &Value, at: &str) -> Result<Value, Problem> {
        let mut chain = Vec::new();
        self.inline_in(v, at, &mut chain, 0)
    }

    fn inline_in(
        &self,
        v: &Value,
        at: &str,
        chain: &mut Vec<String>,
        nesting: usize,
    ) -> Result<Value, Problem> {
        if nesting > MAX_NESTING {
            return Err(Problem::new(at, "nested too deeply once $refs are inlined"));
        }
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref") {
                    return self.follow(m, r, at, chain, nesting);
                }
                let mut out = Map::with_capacity(m.len());
                for (k, child) in m {
                    let here = format!("{at}/{}", escape(k));
                    out.insert(k.clone(), self.inline_in(child, &here, chain, nesting + 1)?);
                }
                Ok(Value::Object(out))
            }
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, child)| self.inline_in(child, &format!("{at}/{i}"), chain, nesting + 1))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            other => Ok(other.clone()),
        }
    }

    /// One `$ref` object: the target inlined, with sibling keys (allowed in 3.1) laid over it.
    fn follow(
        &self,
        m: &Map<String, Value>,
        r: &Value,
        at: &str,
        chain: &mut Vec<String>,
        nesting: usize,
    ) -> Result<Value, Problem> {
        let here = format!("{at}/$ref");
        let Some(r) = r.as_str() else {
            return Err(Problem::new(here, "$ref is not a string"));
        };
        let Some(fragment) = r.strip_prefix('#') else {
            return Err(Problem::new(
                here,
                format!("$ref {r:?} points outside this document (not supported)"),
            ));
        };
        let target_at = percent_decode(fragment)
            .ok_or_else(|| Problem::new(&here, format!("$ref {r:?} is not a valid pointer")))?;
        let Some(target) = self.root.pointer(&target_at) else {
            return Err(Problem::new(here, format!("$ref {r:?} does not resolve")));
        };
        if chain.contains(&target_at) {
            return Err(Problem::new(
                here,
                format!("$ref {r:?} is cyclic (through {})", chain.join(" -> ")),
            ));
        }
        if chain.len() >= MAX_REF_CHAIN {
            return Err(Problem::new(
                here,
                format!("more than {MAX_REF_CHAIN} $refs followed in one chain"),
            ));
        }
        chain.push(target_at.clone());
        let resolved = self.inline_in(target, &target_at, chain, nesting + 1);
        chain.pop();
        let mut resolved = resolved?;
        if let Value::Object(out) = &mut resolved {
            for (k, child) in m.iter().filter(|(k, _)| *k != "$ref") {
                let child_at = format!("{at}/{}", escape(k));
                out.insert(
                    k.clone(),
                    self.inline_in(child, &child_at, chain, nesting + 1)?,
                );
            }
        }
        Ok(resolved)
    }
}

/// One reference token of a JSON pointer (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A `$ref` fragment is URI-encoded (`#/components/schemas/My%20Thing`).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// YAML into JSON. Map keys become strings (`200:` is a response code, as in JSON); keys that
/// are not scalars, and tagged values, are refused.
fn yaml_to_json(y: serde_yaml::Value, at: &str) -> Result<Value, Problem> {
    use serde_yaml::Value as Y;
    Ok(match y {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| Problem::new(at, "a number JSON cannot hold"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| yaml_to_json(v, &format!("{at}/{i}")))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err(Problem::new(at, "a map key that is not a scalar")),
                };
                let child = yaml_to_json(v, &format!("{at}/{}", escape(&key)))?;
                out.insert(key, child);
            }
            Value::Object(out)
        }
        Y::Tagged(_) => return Err(Problem::new(at, "YAML tags are not supported")),
    })
}

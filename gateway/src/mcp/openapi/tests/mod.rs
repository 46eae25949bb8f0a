//! Unit tests of the OpenAPI → MCP conversion, one file per module.

mod document;
mod load;
mod names;
mod operations;
mod request;
mod schema;
mod validate;

use super::document::Document;

/// A document from YAML text that must parse.
fn doc(yaml: &str) -> Document {
    match Document::parse(yaml, false) {
        Ok(d) => d,
        Err(p) => panic!("test document does not parse: {} {}", p.at, p.what),
    }
}

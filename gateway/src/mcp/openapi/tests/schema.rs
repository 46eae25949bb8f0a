use super::super::document::{Document, Version};
use super::super::operations::build;
use super::super::schema::json_schema;
use serde_json::json;

/// 3.0's `nullable` and boolean exclusive bounds become JSON Schema; OpenAPI-only keywords go;
/// a property that happens to be named like one of them stays.
#[test]
fn openapi_30_schemas_become_json_schema() {
    let s = json!({
        "type": "object",
        "discriminator": {"propertyName": "kind"},
        "properties": {
            "n": {"type": "integer", "minimum": 0, "exclusiveMinimum": true, "maximum": 9, "exclusiveMaximum": false},
            "kind": {"type": "string", "enum": ["a", "b"], "nullable": true},
            "xml": {"type": "string", "xml": {"name": "x"}},
            "list": {"type": "array", "items": {"type": "string", "nullable": true}}
        }
    });
    let out = json_schema(&s, Version::V30);
    assert!(out.get("discriminator").is_none());
    assert_eq!(
        out["properties"]["n"],
        json!({"type": "integer", "exclusiveMinimum": 0, "maximum": 9})
    );
    assert_eq!(out["properties"]["kind"]["type"], json!(["string", "null"]));
    assert_eq!(out["properties"]["kind"]["enum"], json!(["a", "b", null]));
    assert_eq!(
        out["properties"]["xml"],
        json!({"type": "string"}),
        "the property stays, its xml goes"
    );
    assert_eq!(
        out["properties"]["list"]["items"]["type"],
        json!(["string", "null"])
    );
    // 3.1 is JSON Schema already: `nullable` means nothing there and is left alone.
    let kept = json_schema(&json!({"type": "string", "nullable": true}), Version::V31);
    assert_eq!(kept, json!({"type": "string", "nullable": true}));
}

/// Malformed documents give a problem with a pointer or a skipped operation, never a panic.
#[test]
fn malformed_documents_never_panic() {
    let docs = [
        (r#"{"openapi":"3.1.0"}"#, Some("/paths")),
        (r#"{"openapi":"3.1.0","paths":[]}"#, Some("/paths")),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":[]}}"#,
            Some("/paths/~1a"),
        ),
        (r#"{"openapi":"3.1.0","paths":{"a":{}}}"#, Some("/paths/a")),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":7}}}"#,
            Some("/paths/~1a/get"),
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"parameters":{}}}}}"#,
            Some("/paths/~1a/get/parameters"),
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"parameters":[1]}}}}"#,
            Some("/paths/~1a/get/parameters/0"),
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"parameters":[{"in":"query"}]}}}}"#,
            Some("/paths/~1a/get/parameters/0/name"),
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"parameters":[{"name":"x","in":"body"}]}}}}"#,
            Some("/paths/~1a/get/parameters/0/in"),
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"parameters":[{"$ref":7}],"get":{}}}}"#,
            Some("/paths/~1a/parameters/0/$ref"),
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"operationId":7,"responses":[],"requestBody":{"content":7}}}}}"#,
            None,
        ),
        (
            r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"responses":{"200":{"content":{"application/json":{"schema":7}}}}}}}}"#,
            None,
        ),
        (r#"{"openapi":"3.1.0","paths":{"/a/{x":{"get":{}}}}"#, None),
    ];
    for (text, at) in docs {
        let d = Document::parse(text, true).unwrap();
        match (build(&d, &["*".into()], None), at) {
            (Err(p), Some(at)) => assert_eq!(p.at, at, "{text}: {}", p.what),
            (Ok(_), None) => {}
            (got, want) => panic!(
                "{text}: got {:?}, want a problem at {want:?}",
                got.map(|b| b.warnings)
            ),
        }
    }
}

use super::super::operations::build;
use super::super::request::{prepare, render_path};
use super::doc;
use serde_json::{Map, Value, json};

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Path values are one encoded segment: `/`, `%`, non-ASCII and reserved characters are
/// encoded, so no value leaves the template.
#[test]
fn path_values_are_encoded() {
    let cases = [
        ("../etc/passwd", "/files/..%2Fetc%2Fpasswd/meta"),
        ("../../admin", "/files/..%2F..%2Fadmin/meta"),
        ("a/b", "/files/a%2Fb/meta"),
        ("über", "/files/%C3%BCber/meta"),
        ("%2F", "/files/%252F/meta"),
        ("a b?c#d", "/files/a%20b%3Fc%23d/meta"),
        ("report.v2.pdf", "/files/report.v2.pdf/meta"),
    ];
    for (value, want) in cases {
        let got = render_path("/files/{name}/meta", &args(json!({ "name": value })));
        assert_eq!(got.as_deref(), Ok(want), "{value}");
    }
    let n = render_path("/orders/{id}", &args(json!({"id": 42}))).unwrap();
    assert_eq!(n, "/orders/42");
}

/// `.`, `..` and empty values are refused: URL parsers collapse them even encoded (`%2E%2E`).
#[test]
fn dot_segments_and_empty_values_are_refused() {
    for v in ["..", ".", "...", ""] {
        let e = render_path("/files/{name}", &args(json!({ "name": v }))).unwrap_err();
        assert!(e.starts_with("name:"), "{v:?}: {e}");
    }
    assert!(render_path("/files/{name}", &args(json!({"name": {"a": 1}}))).is_err());
}

/// The whole request: base prefix kept, query arrays repeated (form style), header and body set.
#[test]
fn requests_are_built_from_arguments() {
    let d = doc(r#"
openapi: 3.1.0
paths:
  /orders/{id}/items:
    post:
      operationId: addItems
      parameters:
        - { name: id, in: path, required: true, schema: { type: string } }
        - { name: tag, in: query, schema: { type: array, items: { type: string } } }
        - { name: dry run, in: query, schema: { type: boolean } }
        - { name: ids, in: query, explode: false, schema: { type: array, items: { type: integer } } }
        - { name: x-tenant, in: header, schema: { type: string } }
      requestBody: { content: { application/json: { schema: { type: object } } } }
      responses: {}
"#);
    let b = build(&d, &["*".into()], None).unwrap();
    let a = args(
        json!({"id": "a/b", "tag": ["x", "y&z"], "dry run": true, "ids": [1, 2], "x-tenant": "t1", "body": {"n": 1}}),
    );
    let p = prepare("http://127.0.0.1:9/api", &b.tools[0], &a).unwrap();
    assert_eq!(p.method, http::Method::POST);
    assert_eq!(p.url.path(), "/api/orders/a%2Fb/items");
    assert_eq!(
        p.url.query(),
        Some("tag=x&tag=y%26z&dry+run=true&ids=1%2C2")
    );
    assert_eq!(p.headers["x-tenant"], "t1");
    assert_eq!(p.headers["content-type"], "application/json");
    assert_eq!(p.body.as_deref(), Some(br#"{"n":1}"#.as_slice()));

    let bad = args(json!({"id": "1", "x-tenant": "a\r\nx-evil: 1"}));
    assert!(
        prepare("http://127.0.0.1:9", &b.tools[0], &bad)
            .unwrap_err()
            .contains("x-tenant")
    );
    let none = prepare("http://127.0.0.1:9", &b.tools[0], &args(json!({"id": "1"}))).unwrap();
    assert_eq!(none.url.query(), None);
    assert!(none.body.is_none());
}

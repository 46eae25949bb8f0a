use super::super::validate::validate;
use serde_json::{Value, json};

fn schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["id"],
        "properties": {
            "id": { "type": "string", "minLength": 1 },
            "status": { "type": "string", "enum": ["open", "shipped"] },
            "limit": { "type": "integer", "minimum": 1, "maximum": 100 },
            "body": {
                "type": "object",
                "required": ["items"],
                "properties": {
                    "items": { "type": "array", "items": {
                        "type": "object", "required": ["qty"],
                        "properties": { "qty": { "type": "integer" } } } },
                    "note": { "type": ["string", "null"] }
                }
            }
        }
    })
}

/// Good arguments pass, nulls where the type allows them included.
#[test]
fn valid_arguments_pass() {
    let args = json!({"id": "7", "status": "open", "limit": 5,
        "body": {"items": [{"qty": 2}], "note": null}});
    assert_eq!(validate(&schema(), &args), Ok(()));
}

/// Each failure names the field, nested ones by their path.
#[test]
fn failures_name_the_field() {
    let cases = [
        (json!({}), "id: required"),
        (json!({"id": 7}), "id: expected string, got integer"),
        (json!({"id": ""}), "id: shorter than 1 characters"),
        (
            json!({"id": "1", "status": "lost"}),
            "status: must be one of",
        ),
        (json!({"id": "1", "limit": 0}), "limit: must be at least 1"),
        (
            json!({"id": "1", "limit": 2.5}),
            "limit: expected integer, got number",
        ),
        (json!({"id": "1", "extra": true}), "extra: unknown field"),
        (json!({"id": "1", "body": {}}), "body.items: required"),
        (
            json!({"id": "1", "body": {"items": [{"qty": 1}, {"qty": "2"}]}}),
            "body.items[1].qty: expected integer, got string",
        ),
        (
            json!({"id": "1", "body": {"items": [], "note": 3}}),
            "body.note: expected string or null",
        ),
    ];
    for (args, want) in cases {
        let got = validate(&schema(), &args).expect_err(&args.to_string());
        assert!(got.starts_with(want), "{args}: got {got:?}, want {want:?}");
    }
}

/// anyOf, oneOf and allOf hold as JSON Schema says.
#[test]
fn combinators() {
    let s = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
    assert_eq!(validate(&s, &json!("a")), Ok(()));
    assert!(validate(&s, &json!(true)).is_err());
    let s = json!({"anyOf": [{"type": "number"}, {"type": "integer"}]});
    assert_eq!(validate(&s, &json!(1)), Ok(()));
    let s = json!({"oneOf": [{"type": "number"}, {"type": "integer"}]});
    assert!(validate(&s, &json!(1)).unwrap_err().contains("matches 2"));
    let s = json!({"allOf": [{"minimum": 1}, {"maximum": 3}]});
    assert!(validate(&s, &json!(4)).is_err());
}

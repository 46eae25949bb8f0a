use super::super::document::{Document, Version};
use super::doc;
use serde_json::json;

const REFS: &str = r##"
openapi: 3.1.0
paths: {}
components:
  schemas:
    Order:
      type: object
      properties:
        customer: { $ref: "#/components/schemas/Customer" }
    Customer:
      type: object
      properties:
        address: { $ref: "#/components/schemas/Address" }
    Address:
      type: object
      required: [city]
      properties: { city: { type: string } }
    Node:
      type: object
      properties:
        child: { $ref: "#/components/schemas/Node" }
    Ping: { $ref: "#/components/schemas/Pong" }
    Pong: { $ref: "#/components/schemas/Ping" }
    Described:
      $ref: "#/components/schemas/Address"
      description: where to ship
"##;

/// A `$ref` chain is inlined to any depth, required fields kept.
#[test]
fn nested_refs_are_inlined() {
    let d = doc(REFS);
    let order = d
        .inline(&json!({"$ref": "#/components/schemas/Order"}), "/x")
        .unwrap();
    assert_eq!(
        order.pointer("/properties/customer/properties/address/required"),
        Some(&json!(["city"]))
    );
    assert_eq!(
        order.pointer("/properties/customer/properties/address/properties/city/type"),
        Some(&json!("string"))
    );
}

/// Keys beside a `$ref` (OpenAPI 3.1) are laid over the target.
#[test]
fn ref_siblings_overlay() {
    let d = doc(REFS);
    let s = d
        .inline(&json!({"$ref": "#/components/schemas/Described"}), "/x")
        .unwrap();
    assert_eq!(s["description"], json!("where to ship"));
    assert_eq!(s["required"], json!(["city"]));
}

/// A schema that contains itself is refused, naming the `$ref` that closes the cycle.
#[test]
fn self_cycle_is_refused_with_its_pointer() {
    let d = doc(REFS);
    let e = d
        .inline(&json!({"$ref": "#/components/schemas/Node"}), "/x")
        .unwrap_err();
    assert_eq!(e.at, "/components/schemas/Node/properties/child/$ref");
    assert!(e.what.contains("cyclic"), "{}", e.what);
}

/// Two schemas that point at each other are refused too.
#[test]
fn mutual_cycle_is_refused() {
    let d = doc(REFS);
    let e = d
        .inline(&json!({"$ref": "#/components/schemas/Ping"}), "/x")
        .unwrap_err();
    assert_eq!(e.at, "/components/schemas/Pong/$ref");
    assert!(e.what.contains("cyclic"), "{}", e.what);
}

/// A `$ref` that points nowhere, or outside the document, is named where it is written.
#[test]
fn unresolved_and_external_refs_name_their_pointer() {
    let d = doc(REFS);
    let at = "/paths/~1orders~1{id}/get/requestBody/content/application~1json/schema";
    let e = d
        .inline(&json!({"$ref": "#/components/schemas/Nope"}), at)
        .unwrap_err();
    assert_eq!(e.at, format!("{at}/$ref"));
    assert!(e.what.contains("does not resolve"), "{}", e.what);
    let e = d.inline(&json!({"$ref": "other.yaml#/X"}), at).unwrap_err();
    assert!(e.what.contains("outside this document"), "{}", e.what);
}

/// Unparseable text, Swagger 2.0 and unknown versions are refused; 3.0 and 3.1 are read, and
/// YAML's integer keys (response codes) become strings.
#[test]
fn versions_and_parse_errors() {
    assert!(
        Document::parse("openapi: [", false)
            .unwrap_err()
            .what
            .contains("not valid YAML")
    );
    assert!(
        Document::parse("{", true)
            .unwrap_err()
            .what
            .contains("not valid JSON")
    );
    assert_eq!(
        Document::parse("swagger: '2.0'", false).unwrap_err().at,
        "/swagger"
    );
    assert_eq!(
        Document::parse("openapi: 4.0.0", false).unwrap_err().at,
        "/openapi"
    );
    assert_eq!(doc("openapi: 3.0.3\npaths: {}").version, Version::V30);
    let d = doc("openapi: 3.1.0\npaths: {}\nx:\n  200: ok");
    assert_eq!(d.version, Version::V31);
    assert_eq!(d.root["x"]["200"], json!("ok"));
}

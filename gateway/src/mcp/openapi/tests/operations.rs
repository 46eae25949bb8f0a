use super::super::operations::{In, build};
use super::doc;
use serde_json::json;

const ORDERS: &str = r##"
openapi: 3.0.3
servers: [{ url: "http://orders.internal/api" }]
paths:
  /orders/{id}:
    parameters:
      - { name: id, in: path, required: false, schema: { type: string }, description: the order }
    get:
      operationId: getOrder
      summary: Get an order
      description: One order by id.
      parameters:
        - { name: x-tenant, in: header, schema: { type: string } }
        - { name: x-api-key, in: header, schema: { type: string } }
        - { name: Authorization, in: header, schema: { type: string } }
      responses:
        "200":
          content:
            application/json: { schema: { $ref: "#/components/schemas/Order" } }
  /orders:
    get:
      operationId: listOrders
      parameters:
        - { name: status, in: query, required: true, schema: { type: string, enum: [open, shipped] } }
        - { name: tag, in: query, schema: { type: array, items: { type: string } } }
      responses:
        "200":
          content:
            application/json: { schema: { type: array, items: { $ref: "#/components/schemas/Order" } } }
    post:
      summary: Create an order
      requestBody:
        required: true
        content:
          application/json; charset=utf-8: { schema: { $ref: "#/components/schemas/NewOrder" } }
      responses: { "201": { description: created } }
  /upload:
    post:
      operationId: upload
      requestBody:
        content: { multipart/form-data: { schema: { type: object } } }
      responses: {}
  /search:
    get:
      operationId: search
      parameters: [{ name: filter, in: query, style: deepObject, schema: { type: object } }]
      responses: {}
  /session:
    get:
      operationId: whoami
      parameters: [{ name: sid, in: cookie, schema: { type: string } }]
      responses: {}
components:
  schemas:
    Order:
      type: object
      properties:
        id: { type: string }
        note: { type: string, nullable: true }
    NewOrder:
      type: object
      required: [item, qty]
      properties:
        item: { type: string }
        qty: { type: integer, minimum: 1 }
"##;

fn all() -> Vec<String> {
    vec!["*".into()]
}

/// Path, query and header parameters and the JSON body become the input schema, `$ref`s
/// inlined, required kept (a path parameter always), and a 2xx object schema the output schema.
#[test]
fn schemas_are_built() {
    let b = build(&doc(ORDERS), &all(), Some("x-api-key")).unwrap();
    let names: Vec<&str> = b.tools.iter().map(|t| t.name.as_str()).collect();
    // Paths in sorted order (the JSON tree keeps no document order), methods in OpenAPI's.
    assert_eq!(names, ["listOrders", "post_orders", "getOrder"]);

    let get = &b.tools[2];
    assert_eq!(get.description, "Get an order\n\nOne order by id.");
    assert_eq!(
        get.input_schema["required"],
        json!(["id"]),
        "a path parameter is required"
    );
    assert_eq!(
        get.input_schema["properties"]["id"]["description"],
        json!("the order")
    );
    assert!(get.input_schema["properties"].get("x-tenant").is_some());
    assert!(
        get.input_schema["properties"].get("x-api-key").is_none(),
        "the credential's header is the gateway's"
    );
    assert!(
        get.input_schema["properties"]
            .get("Authorization")
            .is_none()
    );
    assert_eq!(get.input_schema["additionalProperties"], json!(false));
    let out = get
        .output_schema
        .as_ref()
        .expect("an object response gives an outputSchema");
    assert_eq!(
        out["properties"]["note"]["type"],
        json!(["string", "null"]),
        "3.0 nullable"
    );
    assert!(out["properties"]["note"].get("nullable").is_none());

    let list = &b.tools[0];
    assert_eq!(list.input_schema["required"], json!(["status"]));
    assert_eq!(
        list.input_schema["properties"]["tag"]["type"],
        json!("array")
    );
    assert!(
        list.output_schema.is_none(),
        "an array response is no MCP outputSchema"
    );
    assert_eq!(
        list.params.iter().map(|p| p.location).collect::<Vec<_>>(),
        [In::Query, In::Query]
    );

    let post = &b.tools[1];
    assert_eq!(
        post.body.as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(post.input_schema["required"], json!(["body"]));
    assert_eq!(
        post.input_schema["properties"]["body"]["required"],
        json!(["item", "qty"])
    );
    assert_eq!(
        post.input_schema["properties"]["body"]["properties"]["qty"]["minimum"],
        json!(1)
    );
}

/// Multipart bodies, cookie parameters and unsupported styles are skipped with a warning naming the operation.
#[test]
fn unsupported_shapes_are_skipped_with_warnings() {
    let b = build(&doc(ORDERS), &all(), None).unwrap();
    assert!(
        b.tools
            .iter()
            .all(|t| t.name != "upload" && t.name != "whoami")
    );
    assert_eq!(b.warnings.len(), 3, "{:?}", b.warnings);
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("(search)") && w.contains("deepObject"))
    );
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("POST /upload (upload)") && w.contains("multipart/form-data"))
    );
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("GET /session (whoami)") && w.contains("cookie"))
    );
}

/// `operations` globs select by operationId, or by the generated name.
#[test]
fn globs_select_operations() {
    let d = doc(ORDERS);
    let b = build(&d, &["get*".into()], None).unwrap();
    assert_eq!(
        b.tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["getOrder"]
    );
    let b = build(&d, &["post_*".into(), "listOrders".into()], None).unwrap();
    assert_eq!(
        b.tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["listOrders", "post_orders"]
    );
}

/// Two operations whose names sanitize to the same tool name are refused, naming both.
#[test]
fn collisions_are_refused_naming_both() {
    let d = doc(r#"
openapi: 3.1.0
paths:
  /a: { get: { operationId: "get.order", responses: {} } }
  /b: { get: { operationId: "get_order", responses: {} } }
"#);
    let e = build(&d, &all(), None).unwrap_err();
    assert!(
        e.what.contains("GET /a (get.order)") && e.what.contains("GET /b (get_order)"),
        "{}",
        e.what
    );
    assert!(e.what.contains("\"get_order\""), "{}", e.what);
    assert_eq!(e.at, "/paths/~1b/get");
}

/// A parameter named `body` beside a body, and a template placeholder nobody declares, skip
/// the operation rather than guess; an operation with its own `servers` is kept with a warning.
#[test]
fn ambiguous_operations_are_skipped() {
    let d = doc(r#"
openapi: 3.1.0
paths:
  /x:
    post:
      operationId: clash
      parameters: [{ name: body, in: query, schema: { type: string } }]
      requestBody: { content: { application/json: { schema: { type: object } } } }
      responses: {}
  /y/{id}:
    get: { operationId: undeclared, responses: {} }
  /z:
    servers: [{ url: "https://elsewhere.example" }]
    get: { operationId: elsewhere, responses: {} }
"#);
    let b = build(&d, &all(), None).unwrap();
    let names: Vec<&str> = b.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["elsewhere"], "its own servers only warn");
    assert!(
        b.warnings[2].contains("elsewhere") && b.warnings[2].contains("own servers"),
        "{:?}",
        b.warnings
    );
    assert!(
        b.warnings[0].contains("clash") && b.warnings[0].contains("\"body\""),
        "{:?}",
        b.warnings
    );
    assert!(
        b.warnings[1].contains("{id} is not declared"),
        "{:?}",
        b.warnings
    );
}

/// A broken `$ref` inside an operation fails the build with the pointer of the `$ref`.
#[test]
fn broken_ref_names_its_pointer() {
    let d = doc(r##"
openapi: 3.1.0
paths:
  /orders/{id}:
    get:
      parameters: [{ name: id, in: path, required: true, schema: { type: string } }]
      requestBody:
        content:
          application/json: { schema: { $ref: "#/components/schemas/Missing" } }
      responses: {}
"##);
    let e = build(&d, &all(), None).unwrap_err();
    assert_eq!(
        e.at,
        "/paths/~1orders~1{id}/get/requestBody/content/application~1json/schema/$ref"
    );
}

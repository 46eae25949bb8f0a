//! OpenAPI → MCP over real sockets: a small orders REST service (axum, in this process, on a
//! free port) described by deploy/examples/orders-openapi.yaml records every request it gets
//! (method, raw path, query, headers, body). The document is loaded through
//! `tollgate::mcp::openapi` with an `x-api-key` credential (an OAuth2 token from the service's
//! own token endpoint in one test), and tool calls are checked against what the service saw:
//! paths, queries, bodies, the injected credential, traversal attempts, refused arguments,
//! errors, redirects, timeouts, the response cap and reloads.

mod openapi_support;

use openapi_support::{KEY, Orders, api_key, document, setup, spec};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::credentials::{Credential, Timing, TokenProvider, TokenSource};
use tollgate::mcp::openapi::{InvalidParams, OpenApiSpec, OpenApiTools};
use tollgate_common::Secret;

/// The selected operations are listed in MCP's Tool shape with their schemas; multipart is
/// skipped with a warning naming it.
#[tokio::test]
async fn tools_and_schemas_follow_the_document() {
    let (_orders, tools) = setup().await;
    let list = tools.list();
    let names: Vec<&str> = list.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "export",
            "get_moved",
            "listOrders",
            "createOrder",
            "getOrder",
            "slow"
        ]
    );
    let by = |n: &str| list.iter().find(|t| t["name"] == n).cloned().unwrap();

    let create = by("createOrder");
    assert_eq!(create["description"], "Create an order");
    let input = &create["inputSchema"];
    assert_eq!(input["type"], "object");
    assert_eq!(input["required"], json!(["body"]));
    assert_eq!(
        input["properties"]["body"]["required"],
        json!(["item", "qty"])
    );
    assert_eq!(
        input["properties"]["body"]["properties"]["note"]["type"],
        json!(["string", "null"])
    );
    assert!(
        input["properties"]["x-request-source"].is_object(),
        "a header parameter"
    );
    assert_eq!(
        create["outputSchema"]["properties"]["status"]["enum"],
        json!(["open", "shipped"])
    );

    let get = by("getOrder");
    assert_eq!(get["inputSchema"]["required"], json!(["id"]));
    assert_eq!(get["annotations"]["readOnlyHint"], true);
    let listed = by("listOrders");
    assert_eq!(
        listed["inputSchema"]["properties"]["status"]["enum"],
        json!(["open", "shipped"])
    );
    assert!(
        listed.get("outputSchema").is_none(),
        "an array answer has no MCP outputSchema"
    );

    let warnings = &tools.catalog().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("uploadAttachment") && warnings[0].contains("multipart/form-data")
    );
}

/// Calls reach the templated path with the query and JSON body built from the arguments, with
/// the upstream key injected; a JSON object answer is also structured content.
#[tokio::test]
async fn calls_reach_the_right_path_query_and_body_with_the_key() {
    let (orders, tools) = setup().await;
    let r = tools
        .call(
            "listOrders",
            json!({"status": "open", "tag": ["red", "big box"]}),
        )
        .await
        .unwrap();
    assert!(!r.is_error, "{r:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&r.text).unwrap()[0]["id"],
        "o-1"
    );
    assert!(r.structured.is_none());

    let body = json!({"item": "widget", "qty": 3, "note": null});
    let r = tools
        .call(
            "createOrder",
            json!({"body": body, "x-request-source": "agent"}),
        )
        .await
        .unwrap();
    assert!(!r.is_error, "{r:?}");
    assert_eq!(r.status, Some(201));
    let mcp = r.to_mcp();
    assert_eq!(mcp["structuredContent"]["id"], "o-2");
    assert_eq!(mcp["content"][0]["type"], "text");
    assert_eq!(mcp["isError"], false);

    let seen = orders.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/orders")
    );
    assert_eq!(
        seen[0].query.as_deref(),
        Some("status=open&tag=red&tag=big+box")
    );
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("POST", "/orders")
    );
    assert_eq!(serde_json::from_str::<Value>(&seen[1].body).unwrap(), body);
    assert_eq!(seen[1].headers["content-type"], "application/json");
    assert_eq!(seen[1].headers["x-request-source"], "agent");
    for s in &seen {
        assert_eq!(s.headers["x-api-key"], KEY, "the upstream key is injected");
        assert!(s.headers.get("authorization").is_none());
    }
}

/// A 404 comes back as an error result carrying the status and the body.
#[tokio::test]
async fn not_found_is_an_error_result() {
    let (_orders, tools) = setup().await;
    let r = tools.call("getOrder", json!({"id": "404"})).await.unwrap();
    assert!(r.is_error);
    assert_eq!(r.status, Some(404));
    assert!(
        r.text.contains("404") && r.text.contains("no such order"),
        "{}",
        r.text
    );
    assert_eq!(r.to_mcp()["isError"], true);
    assert!(r.to_mcp().get("structuredContent").is_none());
}

/// A 2xx answer that breaks the operation's declared response schema is an error result
/// naming what is wrong (an MCP client would reject its structured content).
#[tokio::test]
async fn an_answer_outside_its_response_schema_is_an_error() {
    let (_orders, tools) = setup().await;
    let r = tools
        .call("getOrder", json!({"id": "misshapen"}))
        .await
        .unwrap();
    assert!(r.is_error);
    assert_eq!(r.status, Some(200));
    assert!(r.text.contains("status: required"), "{}", r.text);
    assert!(r.structured.is_none());
    let ok = tools.call("getOrder", json!({"id": "o-9"})).await.unwrap();
    assert!(!ok.is_error, "{ok:?}");
    assert_eq!(
        ok.structured,
        Some(json!({"id": "o-9", "status": "shipped"}))
    );
}

/// A traversal argument stays one encoded segment of the template; `..` itself is refused
/// before any request. The service never sees `/admin`.
#[tokio::test]
async fn path_traversal_stays_inside_the_template() {
    let (orders, tools) = setup().await;
    let r = tools
        .call("getOrder", json!({"id": "../../admin"}))
        .await
        .unwrap();
    assert!(!r.is_error, "{r:?}");
    let r2 = tools
        .call("getOrder", json!({"id": "a/b?x=1#f"}))
        .await
        .unwrap();
    assert!(!r2.is_error, "{r2:?}");
    let e = tools
        .call("getOrder", json!({"id": ".."}))
        .await
        .unwrap_err();
    assert!(e.message.starts_with("id:"), "{e}");

    let paths: Vec<String> = orders.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        ["/orders/..%2F..%2Fadmin", "/orders/a%2Fb%3Fx%3D1%23f"]
    );
    assert!(orders.seen().iter().all(|s| s.query.is_none()));
}

/// Arguments that fail the input schema, and unknown tools, get invalid params (-32602)
/// naming the field, and nothing reaches the service.
#[tokio::test]
async fn invalid_arguments_are_refused_before_any_request() {
    let (orders, tools) = setup().await;
    let cases = [
        (
            "listOrders",
            json!({"status": "lost"}),
            "status: must be one of",
        ),
        ("listOrders", json!({}), "status: required"),
        (
            "listOrders",
            json!({"status": "open", "tag": "red"}),
            "tag: expected array",
        ),
        ("createOrder", json!({}), "body: required"),
        (
            "createOrder",
            json!({"body": {"item": "w", "qty": 0}}),
            "body.qty: must be at least 1",
        ),
        (
            "createOrder",
            json!({"body": {"item": "w", "qty": 1, "x": 1}}),
            "body.x: unknown field",
        ),
        (
            "getOrder",
            json!({"id": "1", "x-api-key": "stolen"}),
            "x-api-key: unknown field",
        ),
        ("getOrder", json!("1"), "arguments: expected an object"),
        ("deleteEverything", json!({}), "unknown tool"),
    ];
    for (tool, args, want) in cases {
        let e: InvalidParams = tools.call(tool, args.clone()).await.unwrap_err();
        assert!(e.message.contains(want), "{tool} {args}: {e}");
        assert_eq!(e.to_jsonrpc()["code"], -32602);
    }
    assert!(orders.seen().is_empty(), "{:?}", orders.seen());
}

/// A redirect is an error result with its status; the target is never requested.
#[tokio::test]
async fn redirects_are_not_followed() {
    let (orders, tools) = setup().await;
    let r = tools.call("get_moved", json!({})).await.unwrap();
    assert!(r.is_error);
    assert_eq!(r.status, Some(302));
    assert!(
        r.text.contains("302") && r.text.contains("not followed"),
        "{}",
        r.text
    );
    let paths: Vec<String> = orders.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/moved"]);
}

/// An endpoint that never answers gives an error result saying so, within `timeout_ms`
/// (bounded generously above: the assertion is that the call ends, not how fast).
#[tokio::test]
async fn a_slow_endpoint_times_out_within_timeout_ms() {
    let (_orders, tools) = setup().await;
    let started = Instant::now();
    let r = tools.call("slow", json!({})).await.unwrap();
    let took = started.elapsed();
    assert!(r.is_error);
    assert!(
        r.text.contains("500 ms") && r.text.contains("timed out"),
        "{}",
        r.text
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        took < Duration::from_millis(500) + Duration::from_secs(5),
        "{took:?}"
    );
}

/// A body larger than `max_response_bytes` is cut there, with a note.
#[tokio::test]
async fn a_huge_body_is_cut_with_a_note() {
    let (_orders, tools) = setup().await;
    let r = tools.call("export", json!({})).await.unwrap();
    assert!(
        !r.is_error,
        "{}",
        &r.text[r.text.len().saturating_sub(200)..]
    );
    let cap = 64 * 1024;
    assert!(r.text.starts_with("xxxx"));
    assert_eq!(r.text.bytes().take_while(|b| *b == b'x').count(), cap);
    assert!(
        r.text.ends_with(
            "[response cut at 65536 bytes: the upstream sent more than the gateway passes on]"
        ),
        "{}",
        &r.text[cap..]
    );
}

/// A reload swaps in the new document; a broken one fails naming the JSON pointer of the
/// problem and leaves the tools in use unchanged.
#[tokio::test]
async fn reload_swaps_and_a_broken_document_names_its_pointer() {
    let orders = Orders::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.yaml");
    let original = std::fs::read_to_string(document()).unwrap();
    std::fs::write(&file, &original).unwrap();
    let mut s = spec(&orders);
    s.openapi = file.clone();
    s.operations = vec!["getOrder".into(), "list*".into()];
    let tools = OpenApiTools::new(s, api_key()).unwrap();
    let before = tools.catalog();
    assert_eq!(
        before.tools.keys().collect::<Vec<_>>(),
        ["listOrders", "getOrder"]
    );

    std::fs::write(
        &file,
        original.replace("operationId: getOrder", "operationId: fetchOrder"),
    )
    .unwrap();
    let after = tools.reload().unwrap();
    assert_eq!(after.tools.keys().collect::<Vec<_>>(), ["listOrders"]);
    assert_eq!(tools.list().len(), 1);
    assert_eq!(
        before.tools.len(),
        2,
        "a catalog already handed out does not change"
    );

    let broken = original.replace(
        "schema: { $ref: \"#/components/schemas/NewOrder\" }",
        "schema: { $ref: \"#/components/schemas/Nope\" }",
    );
    std::fs::write(&file, broken).unwrap();
    let e = tools.reload().unwrap_err().to_string();
    assert!(
        e.contains("at /paths/~1orders/post/requestBody/content/application~1json/schema/$ref"),
        "{e}"
    );
    assert!(e.contains("does not resolve"), "{e}");
    assert_eq!(tools.list().len(), 1, "the tools in use stay");

    let mut relative = OpenApiSpec::new("orders", file.clone());
    std::fs::write(&file, original.replace("http://127.0.0.1:9200", "/api")).unwrap();
    relative.base_url = None;
    let e = OpenApiTools::new(relative, Credential::None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("/servers/0/url") && e.contains("relative"),
        "{e}"
    );
}

/// An OAuth2 client-credentials token is fetched and sent as `Authorization: Bearer`; when the
/// upstream refuses it (401), the call is an error and the next call carries a new token.
#[tokio::test]
async fn an_oauth2_token_is_injected_and_renewed_after_a_401() {
    let orders = Orders::start().await;
    let source = TokenSource::Oauth2 {
        token_url: format!("{}/token", orders.url),
        client_id: "tollgate".into(),
        client_secret: Secret::new("client-secret-456"),
        scope: None,
    };
    let timing = Timing {
        min_interval: Duration::from_millis(10),
        ..Timing::default()
    };
    let provider = Arc::new(TokenProvider::new("orders", source, timing));
    let tools = OpenApiTools::new(spec(&orders), Credential::Token(provider)).unwrap();
    let refused = tools
        .call("getOrder", json!({"id": "reject"}))
        .await
        .unwrap();
    assert!(
        refused.is_error && refused.status == Some(401),
        "{refused:?}"
    );
    let again = tools
        .call("getOrder", json!({"id": "reject"}))
        .await
        .unwrap();
    assert!(!again.is_error, "{again:?}");

    let seen = orders.seen();
    let sent: Vec<&str> = seen
        .iter()
        .filter(|s| s.path == "/orders/reject")
        .map(|s| s.headers["authorization"].to_str().unwrap())
        .collect();
    assert_eq!(sent, ["Bearer tok-1", "Bearer tok-2"]);
    assert_eq!(seen.iter().filter(|s| s.path == "/token").count(), 2);
    assert!(seen.iter().all(|s| s.headers.get("x-api-key").is_none()));
}

/// An upstream that is down gives an error result at once, not a hang or a panic.
#[tokio::test]
async fn an_unreachable_upstream_is_an_error_result() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut s = OpenApiSpec::new("orders", document());
    s.base_url = Some(format!("http://{addr}"));
    let tools = OpenApiTools::new(s, api_key()).unwrap();
    let r = tools.call("getOrder", json!({"id": "1"})).await.unwrap();
    assert!(r.is_error);
    assert_eq!(r.status, None);
    assert!(r.text.contains("could not connect"), "{}", r.text);
    assert!(!r.text.contains(KEY));
}

//! OpenAPI → MCP through the gateway: a gateway process serves the orders REST service
//! (tests/tests/openapi_support, described by deploy/examples/orders-openapi.yaml) as the MCP
//! server `orders` (`[[mcp_servers]]` with `openapi`), and the official Python `mcp` client
//! lists and calls its tools per server and federated. What the service saw is checked: the
//! paths, queries and bodies, the injected key (never the client's), traversal attempts kept
//! inside the template, invalid arguments refused before any request; allow-lists,
//! `tool_calls_per_min` and the usage report apply as for any MCP server.

mod openapi_support;

use openapi_support::{KEY, Orders, document};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tollgate_tests::mcp::client;
use tollgate_tests::{Harness, Running, key_for};

async fn gateway(orders: &Orders) -> Running {
    let server = format!(
        "[[mcp_servers]]\nname = \"orders\"\nopenapi = \"{}\"\nbase_url = \"{}\"\n\
         auth = {{ type = \"api_key\", header = \"x-api-key\", key_env = \"ORDERS_KEY\" }}\n\
         operations = [\"*\"]\ntimeout_ms = 2000\n",
        document().display(),
        orders.url
    );
    Harness::new()
        .redis()
        .config(&server)
        .consumer("agent", "team = \"ops\"\nmcp_tools = [\"orders.*\"]")
        .consumer(
            "limited",
            "mcp_tools = [\"orders.getOrder\"]\ntool_calls_per_min = 2",
        )
        .env("ORDERS_KEY", KEY)
        .start()
        .await
        .expect("gateway")
}

async fn call(url: &str, key: &str, tool: &str, args: Value) -> Value {
    client(&[
        "call",
        "--url",
        url,
        "--key",
        key,
        "--tool",
        tool,
        "--args",
        &args.to_string(),
    ])
    .await
}

/// One gateway, the whole contract: schemas, requests, errors, credentials, traversal,
/// refused arguments, federation, allow-lists, limits and usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_served_as_mcp_tools() {
    let orders = Orders::start().await;
    let h = gateway(&orders).await;
    let (key, base) = (key_for("agent"), h.url(0));
    let one = format!("{base}/mcp/orders");

    // Tools and their schemas: a path parameter, a query parameter (its `$ref` resolved to the
    // enum), a JSON body with its required fields.
    let listed = client(&["tools", "--url", &one, "--key", &key]).await;
    assert_eq!(
        listed["tools"],
        json!([
            "createOrder",
            "export",
            "getOrder",
            "get_moved",
            "listOrders",
            "slow"
        ]),
        "{listed}"
    );
    assert_eq!(listed["server"], "orders", "the gateway answers initialize");
    let schemas = &listed["schemas"];
    assert_eq!(schemas["getOrder"]["properties"]["id"]["type"], "string");
    assert_eq!(schemas["getOrder"]["required"], json!(["id"]));
    assert_eq!(
        schemas["listOrders"]["properties"]["status"]["enum"],
        json!(["open", "shipped"]),
        "the $ref of the query parameter is resolved: {schemas}"
    );
    assert_eq!(
        schemas["createOrder"]["properties"]["body"]["required"],
        json!(["item", "qty"])
    );
    assert!(
        schemas["createOrder"]["properties"]
            .get("x-api-key")
            .is_none(),
        "the credential's header is not offered to callers"
    );

    // A call with a path parameter: the right path, the upstream key, none of the client's.
    let got = call(&one, &key, "getOrder", json!({"id": "o-7"})).await;
    assert_eq!(got["result"]["is_error"], false, "{got}");
    assert!(
        got["result"]["text"].as_str().unwrap().contains("shipped"),
        "{got}"
    );
    let seen = orders.seen();
    assert_eq!(seen.len(), 1, "one request: {seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/orders/o-7")
    );
    assert_eq!(seen[0].headers["x-api-key"], KEY);
    assert!(
        seen[0].headers.get("api-key").is_none(),
        "the client's key stays"
    );
    assert!(seen[0].headers.get("authorization").is_none());

    // The key as `Authorization: Bearer` to the gateway: not forwarded either.
    let bearer = client(&[
        "call",
        "--url",
        &one,
        "--bearer",
        &key,
        "--tool",
        "getOrder",
        "--args",
        r#"{"id":"o-8"}"#,
    ])
    .await;
    assert_eq!(bearer["result"]["is_error"], false, "{bearer}");
    let seen = orders.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].headers["x-api-key"], KEY);
    assert!(
        seen[1].headers.get("authorization").is_none(),
        "the client's Authorization stays"
    );
    let sent = format!("{:?}", seen[1].headers);
    assert!(
        !sent.contains(&key),
        "the client's key reached the API: {sent}"
    );

    // A query parameter and a JSON body.
    let listed = call(&one, &key, "listOrders", json!({"status": "open"})).await;
    assert_eq!(listed["result"]["is_error"], false, "{listed}");
    let created = call(
        &one,
        &key,
        "createOrder",
        json!({"body": {"item": "pen", "qty": 2}}),
    )
    .await;
    assert_eq!(created["result"]["is_error"], false, "{created}");
    assert!(
        created["result"]["text"].as_str().unwrap().contains("o-2"),
        "{created}"
    );
    let seen = orders.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[2].path, "/orders");
    assert_eq!(seen[2].query.as_deref(), Some("status=open"));
    assert_eq!(
        (seen[3].method.as_str(), seen[3].path.as_str()),
        ("POST", "/orders")
    );
    let body: Value = serde_json::from_str(&seen[3].body).unwrap();
    assert_eq!(body, json!({"item": "pen", "qty": 2}));

    // A 404 is a tool error; a traversal attempt stays inside the template.
    let missing = call(&one, &key, "getOrder", json!({"id": "404"})).await;
    assert_eq!(missing["result"]["is_error"], true, "{missing}");
    assert!(
        missing["result"]["text"].as_str().unwrap().contains("404"),
        "{missing}"
    );
    let escape = call(&one, &key, "getOrder", json!({"id": "../admin"})).await;
    assert_eq!(escape["result"]["is_error"], false, "{escape}");
    let seen = orders.seen();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_eq!(seen[5].path, "/orders/..%2Fadmin");
    assert!(seen.iter().all(|s| s.path != "/admin"));

    // Invalid arguments: -32602 and no request at all.
    for (tool, args) in [
        ("createOrder", json!({"body": {"item": "pen"}})),
        ("listOrders", json!({"status": "lost"})),
        ("getOrder", json!({})),
    ] {
        let bad = call(&one, &key, tool, args.clone()).await;
        assert_eq!(bad["error"]["code"], -32602, "{tool} {args}: {bad}");
    }
    assert_eq!(orders.seen().len(), 6, "invalid arguments sent nothing");

    // Federated: `orders__getOrder` among the tools, callable.
    let fed = format!("{base}/mcp");
    let all = client(&["tools", "--url", &fed, "--key", &key]).await;
    assert!(
        all["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("orders__getOrder")),
        "{all}"
    );
    let via = call(&fed, &key, "orders__getOrder", json!({"id": "o-9"})).await;
    assert_eq!(via["result"]["is_error"], false, "{via}");
    assert_eq!(orders.seen().last().unwrap().path, "/orders/o-9");
    let before = orders.seen().len();

    // An allow-list hides tools, and the hidden one is refused as unknown, sending nothing.
    let lim = key_for("limited");
    let theirs = client(&["tools", "--url", &one, "--key", &lim]).await;
    assert_eq!(theirs["tools"], json!(["getOrder"]), "{theirs}");
    let hidden = call(
        &one,
        &lim,
        "createOrder",
        json!({"body": {"item": "pen", "qty": 1}}),
    )
    .await;
    assert_eq!(hidden["error"]["code"], -32602, "{hidden}");
    assert_eq!(orders.seen().len(), before, "a hidden tool sends nothing");

    // `tool_calls_per_min = 2`: the third call is refused in-band, naming the limit.
    let burst = client(&[
        "burst",
        "--urls",
        &one,
        "--key",
        &lim,
        "--tool",
        "getOrder",
        "--args",
        r#"{"id":"o-1"}"#,
        "--n",
        "3",
    ])
    .await;
    assert_eq!(burst["ok"], 2, "{burst}");
    assert_eq!(burst["refused"], 1, "{burst}");
    assert_eq!(burst["refusals"][0]["code"], -32029, "{burst}");
    assert_eq!(
        burst["refusals"][0]["data"]["limit"], "tool_calls_per_min",
        "{burst}"
    );
    assert_eq!(
        orders.seen().len(),
        before + 2,
        "only admitted calls reach it"
    );

    // Usage: the calls by tool. The agent's getOrder: o-7, o-8, 404, ../admin, o-9 and the
    // call refused for its arguments = 6 calls, 2 errors. The limited caller's refused call is not
    // a call.
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let v = h.usage("tool").expect("usage --by tool");
        let row = v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["tool"] == "getOrder" && r["consumer"] == "agent")
            .cloned();
        let limited = v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["tool"] == "getOrder" && r["consumer"] == "limited" && r["calls"] == 2);
        match row {
            Some(r) if r["calls"] == 6 && limited => break r,
            r if Instant::now() > deadline => panic!("getOrder rows not as expected: {r:?} {v}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(row["server"], "orders", "{row}");
    assert_eq!(row["team"], "ops", "{row}");
    assert_eq!(row["errors"], 2, "the 404 and the invalid arguments: {row}");
}

/// A broken document fails start-up, the error naming the file and the JSON pointer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_document_fails_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("orders-broken.yaml");
    let text = std::fs::read_to_string(document()).unwrap();
    let text = text.replacen(
        "$ref: \"#/components/schemas/NewOrder\"",
        "$ref: \"#/components/schemas/Nope\"",
        1,
    );
    std::fs::write(&broken, text).unwrap();
    let server = format!(
        "[[mcp_servers]]\nname = \"orders\"\nopenapi = \"{}\"\nbase_url = \"http://127.0.0.1:9\"\n",
        broken.display()
    );
    let e = Harness::new()
        .config(&server)
        .consumer("agent", "mcp_tools = [\"orders.*\"]")
        .start()
        .await
        .err()
        .expect("start-up fails");
    let e = format!("{e:#}");
    assert!(e.contains("orders-broken.yaml"), "{e}");
    assert!(
        e.contains("/paths/~1orders/post/requestBody"),
        "the JSON pointer: {e}"
    );
}

/// SIGHUP reads the document again: a changed document changes the tools; a broken one
/// leaves them as they were and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_document() {
    let orders = Orders::start().await;
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("orders.yaml");
    let original = std::fs::read_to_string(document()).unwrap();
    std::fs::write(&doc, &original).unwrap();
    let server = format!(
        "[[mcp_servers]]\nname = \"orders\"\nopenapi = \"{}\"\nbase_url = \"{}\"\n",
        doc.display(),
        orders.url
    );
    let h = Harness::new()
        .config(&server)
        .consumer("agent", "mcp_tools = [\"orders.*\"]")
        .start()
        .await
        .expect("gateway");
    let (key, url) = (key_for("agent"), format!("{}/mcp/orders", h.url(0)));
    let pid = h.gateways[0].pid().expect("a process").to_string();
    let names = || async {
        let v = client(&["tools", "--url", &url, "--key", &key]).await;
        v["tools"].clone()
    };
    assert!(
        names()
            .await
            .as_array()
            .unwrap()
            .contains(&json!("getOrder"))
    );
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP");
    };

    std::fs::write(
        &doc,
        original.replace("operationId: getOrder", "operationId: fetchOrder"),
    )
    .unwrap();
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    let renamed = loop {
        let n = names().await;
        if n.as_array().unwrap().contains(&json!("fetchOrder")) || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        renamed.as_array().unwrap().contains(&json!("fetchOrder")),
        "{renamed}"
    );
    assert!(
        !renamed.as_array().unwrap().contains(&json!("getOrder")),
        "{renamed}"
    );

    std::fs::write(&doc, "openapi: [not, a, document").unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(names().await, renamed, "a broken document keeps the tools");
    let got = call(&url, &key, "fetchOrder", json!({"id": "o-3"})).await;
    assert_eq!(got["result"]["is_error"], false, "{got}");
    assert_eq!(orders.seen().last().unwrap().path, "/orders/o-3");
}

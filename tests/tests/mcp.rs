//! The MCP gateway over real sockets: upstream MCP servers are the official Python SDK's
//! MCPServer (FastMCP) over streamable HTTP, the client is the SDK's own, gateways are real
//! processes. Tools are listed and called per server and federated; allow-lists hide tools;
//! upstream credentials replace the client's; sessions move between replicas; tool-call
//! limits hold exactly across replicas; JWT callers discover the authorization server; usage
//! reaches the report; an upstream that is down or slow gives a JSON-RPC error in time; an
//! upstream's sampling request reaches the client through the gateway.

mod jwt_support;

use jsonwebtoken::Algorithm;
use jwt_support::{Jwks, KEYS, claims, sign};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tollgate_tests::mcp::{McpUpstream, call, client, run};
use tollgate_tests::{Harness, Running, key_for};

/// Two upstreams: `t1` (every tool, a bearer credential) and `t2` (three tools, an api-key).
fn servers(t1: &McpUpstream, t2: &McpUpstream, extra_t1: &str) -> String {
    format!(
        "[[mcp_servers]]\nname = \"t1\"\nurl = \"{}\"\nauth = {{ type = \"bearer\", token_env = \"T1_TOKEN\" }}\n{extra_t1}\n\
         [[mcp_servers]]\nname = \"t2\"\nurl = \"{}\"\ntools = [\"echo\", \"add\", \"ask\"]\n\
         auth = {{ type = \"api_key\", key_env = \"T2_KEY\" }}\n",
        t1.url(),
        t2.url()
    )
}

fn upstreams() -> (McpUpstream, McpUpstream) {
    (
        McpUpstream::start("t1").expect("upstream t1"),
        McpUpstream::start("t2").expect("upstream t2"),
    )
}

async fn gateway(t1: &McpUpstream, t2: &McpUpstream) -> Running {
    Harness::new()
        .config(&servers(t1, t2, ""))
        .consumer("agent", "team = \"ops\"\nmcp_tools = [\"t1.*\", \"t2.*\"]")
        .consumer("limited", "mcp_tools = [\"t1.echo\", \"t2.add\"]")
        .consumer("nobody", "")
        .env("T1_TOKEN", "t1-upstream-secret")
        .env("T2_KEY", "t2-upstream-key")
        .start()
        .await
        .expect("gateway")
}

/// Both upstreams, the gateway before them ([`gateway`]), `consumer`'s key and the gateway's URL.
async fn started(consumer: &str) -> (McpUpstream, McpUpstream, Running, String, String) {
    let (t1, t2) = upstreams();
    let h = gateway(&t1, &t2).await;
    let (key, base) = (key_for(consumer), h.url(0));
    (t1, t2, h, key, base)
}

/// Starts the gateway `h` describes, the upstreams' credentials set to dummies (`t`, `k`).
async fn start(h: Harness) -> Running {
    h.env("T1_TOKEN", "t")
        .env("T2_KEY", "k")
        .start()
        .await
        .expect("gateway")
}

/// Sends `req`: the status, the `mcp-session-id` answered, and the response for its body.
async fn send(req: reqwest::RequestBuilder) -> (u16, Option<String>, reqwest::Response) {
    let resp = req.send().await.unwrap();
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), sid, resp)
}

/// `burst`: `n` concurrent calls of `count` as `agent`, spread over the comma-separated `urls`.
async fn burst(urls: &str, n: u32) -> Value {
    let n = n.to_string();
    client(&[
        "burst",
        "--urls",
        urls,
        "--key",
        &key_for("agent"),
        "--tool",
        "count",
        "--n",
        &n,
    ])
    .await
}

fn tools(v: &Value) -> Vec<String> {
    serde_json::from_value(v["tools"].clone()).unwrap_or_default()
}

/// Tools of two MCPServer upstreams are listed and called through `/mcp/{server}` and through
/// the federated `/mcp` (names `server__tool`), each server's `tools` globs applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_calls_tools_per_server_and_federated() {
    let (_t1, _t2, _h, key, base) = started("agent").await;
    let one = run("tools", &format!("{base}/mcp/t1"), &key, &[]).await;
    assert_eq!(
        tools(&one),
        [
            "add", "announce", "ask", "count", "echo", "secret", "slow", "whoami"
        ]
    );
    assert_eq!(
        one["server"], "t1",
        "per server: the upstream's own serverInfo"
    );
    let two = run("tools", &format!("{base}/mcp/t2"), &key, &[]).await;
    assert_eq!(
        tools(&two),
        ["add", "ask", "echo"],
        "t2 exposes only its globs"
    );
    let all = run("tools", &format!("{base}/mcp"), &key, &[]).await;
    let all = tools(&all);
    assert!(all.contains(&"t1__secret".to_string()), "{all:?}");
    assert!(all.contains(&"t2__add".to_string()), "{all:?}");
    assert!(!all.contains(&"t2__secret".to_string()), "{all:?}");
    assert_eq!(all.len(), 11, "{all:?}");

    let args = r#"{"text":"hi"}"#;
    for (url, tool, want) in [
        (format!("{base}/mcp/t1"), "echo", "t1:hi"),
        (format!("{base}/mcp/t2"), "echo", "t2:hi"),
        (format!("{base}/mcp"), "t1__echo", "t1:hi"),
        (format!("{base}/mcp"), "t2__echo", "t2:hi"),
    ] {
        let r = call(&url, &key, tool, args).await;
        assert_eq!(r["result"]["text"], want, "{url} {tool}: {r}");
        assert_eq!(r["result"]["is_error"], false);
    }
    let sum = call(&format!("{base}/mcp"), &key, "t2__add", r#"{"a":2,"b":40}"#).await;
    assert_eq!(sum["result"]["text"], "42", "{sum}");
}

/// A tool outside the caller's allow-list is not listed and calling it gets the same error as
/// a tool that does not exist; the upstream never runs it. A caller with no `mcp_tools` sees
/// no server at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_hides_tools() {
    let (t1, _t2, _h, key, base) = started("limited").await;
    let all = run("tools", &format!("{base}/mcp"), &key, &[]).await;
    assert_eq!(tools(&all), ["t1__echo", "t2__add"]);
    let one = run("tools", &format!("{base}/mcp/t1"), &key, &[]).await;
    assert_eq!(tools(&one), ["echo"]);

    let hidden = run(
        "call",
        &format!("{base}/mcp"),
        &key,
        &["--tool", "t1__secret"],
    )
    .await;
    let missing = run(
        "call",
        &format!("{base}/mcp"),
        &key,
        &["--tool", "t1__no_such_tool"],
    )
    .await;
    assert_eq!(hidden["error"]["code"], -32602, "{hidden}");
    assert_eq!(
        hidden["error"]["message"]
            .as_str()
            .unwrap()
            .replace("t1__secret", "X"),
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .replace("t1__no_such_tool", "X"),
        "a hidden tool and a missing one look alike"
    );
    let single = run(
        "call",
        &format!("{base}/mcp/t1"),
        &key,
        &["--tool", "secret"],
    )
    .await;
    assert_eq!(single["error"]["code"], -32602, "{single}");
    let single_missing = run(
        "call",
        &format!("{base}/mcp/t1"),
        &key,
        &["--tool", "no_such_tool"],
    )
    .await;
    assert_eq!(
        single["error"]["message"]
            .as_str()
            .unwrap()
            .replace("secret", "X"),
        single_missing["error"]["message"]
            .as_str()
            .unwrap()
            .replace("no_such_tool", "X"),
        "per server too: {single} {single_missing}"
    );
    assert_eq!(
        t1.stats().await["executed"],
        0,
        "the upstream never ran either"
    );

    // No allow-list: the server does not exist for this caller.
    let resp = tollgate_tests::client()
        .post(format!("{base}/mcp/t1"))
        .header("api-key", key_for("nobody"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// Each upstream gets its own credential (a bearer token, an api-key); the client's key is
/// never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_credentials_replace_the_clients() {
    let (t1, t2, _h, key, base) = started("agent").await;
    let r = run(
        "call",
        &format!("{base}/mcp/t1"),
        &key,
        &["--tool", "whoami"],
    )
    .await;
    let seen: Value = serde_json::from_str(r["result"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["authorization"], "Bearer t1-upstream-secret");
    assert_eq!(
        seen["api_key"],
        Value::Null,
        "the client's api-key is not forwarded"
    );
    call(&format!("{base}/mcp"), &key, "t2__echo", r#"{"text":"x"}"#).await;
    let (s1, s2) = (t1.stats().await, t2.stats().await);
    assert_eq!(s1["authorization"], json!(["Bearer t1-upstream-secret"]));
    assert_eq!(s1["api_key"], json!([]));
    assert_eq!(s2["api_key"], json!(["t2-upstream-key"]));
    assert_eq!(
        s2["authorization"],
        json!([]),
        "no client Authorization either"
    );
    let text = format!("{s1}{s2}");
    assert!(
        !text.contains(&key),
        "the client's key reached an upstream: {text}"
    );
}

/// An upstream's sampling request reaches the client through the gateway (per server and
/// federated, where its id is rewritten and mapped back), and the client's answer returns to
/// the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_request_reaches_the_client() {
    let (_t1, _t2, _h, key, base) = started("agent").await;
    let args = r#"{"question":"six times seven?"}"#;
    for (url, tool) in [
        (format!("{base}/mcp/t2"), "ask"),
        (format!("{base}/mcp"), "t2__ask"),
    ] {
        let r = run("sample", &url, &key, &["--tool", tool, "--args", args]).await;
        assert_eq!(
            r["result"]["text"], "sampled:answer to six times seven?",
            "{url}: {r}"
        );
    }
}

/// A session initialized through one replica continues through the others (its id is sealed
/// with the shared `mcp.session_key_env`); a made-up or tampered id gets 404, none gets 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_moves_between_replicas() {
    let (t1, t2) = upstreams();
    let h = Harness::new()
        .redis()
        .config("[mcp]\nsession_key_env = \"MCP_SESSION_KEY\"\n")
        .config(&servers(&t1, &t2, ""))
        .consumer("agent", "mcp_tools = [\"t1.*\", \"t2.*\"]")
        .env("T1_TOKEN", "t")
        .env("T2_KEY", "k")
        .env("MCP_SESSION_KEY", "shared-by-every-replica")
        .gateways(3)
        .start()
        .await
        .expect("gateways");
    let urls = (0..3)
        .map(|i| format!("{}/mcp", h.url(i)))
        .collect::<Vec<_>>()
        .join(",");
    let key = key_for("agent");
    let r = client(&[
        "hop",
        "--urls",
        &urls,
        "--key",
        &key,
        "--tool",
        "t1__echo",
        "--args",
        r#"{"text":"hop"}"#,
    ])
    .await;
    assert_eq!(tools(&r).len(), 11, "{r}");
    for c in r["calls"].as_array().unwrap() {
        assert_eq!(c["result"]["text"], "t1:hop", "{r}");
    }
    for n in r["served"].as_array().unwrap() {
        assert!(
            n.as_u64().unwrap() >= 2,
            "every replica served the session: {r}"
        );
    }

    // Raw: initialize on replica 0, then ids replica 1 must refuse.
    let http = tollgate_tests::client();
    let init = http
        .post(format!("{}/mcp/t1", h.url(0)))
        .header("api-key", &key)
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), 200);
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let list = |sid: Option<String>, path: &'static str| {
        let http = http.clone();
        let url = format!("{}{path}", h.url(1));
        let key = key.clone();
        async move {
            let mut req = http
                .post(url)
                .header("api-key", key)
                .header("accept", "application/json, text/event-stream")
                .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
            if let Some(s) = sid {
                req = req.header("mcp-session-id", s);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(list(Some(sid.clone()), "/mcp/t1").await, 200);
    assert_eq!(list(Some(sid.clone()), "/mcp").await, 404, "another route");
    let mut tampered = sid.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        list(Some(String::from_utf8(tampered).unwrap()), "/mcp/t1").await,
        404
    );
    assert_eq!(list(Some("made-up".into()), "/mcp/t1").await, 404);
    assert_eq!(list(None, "/mcp/t1").await, 400);
}

/// `tool_calls_per_min` holds exactly across three replicas under concurrent calls: the
/// upstream runs exactly the limit, the rest get an in-band error naming the limit with
/// `retry_after_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_per_min_is_exact_across_replicas() {
    let (t1, t2) = upstreams();
    let h = Harness::new()
        .redis()
        .config("[mcp]\nsession_key_env = \"MCP_SESSION_KEY\"\n")
        .config(&servers(&t1, &t2, ""))
        .consumer("agent", "mcp_tools = [\"t1.*\"]\ntool_calls_per_min = 7")
        .env("T1_TOKEN", "t")
        .env("T2_KEY", "k")
        .env("MCP_SESSION_KEY", "s")
        .gateways(3)
        .start()
        .await
        .expect("gateways");
    let urls = (0..3)
        .map(|i| format!("{}/mcp/t1", h.url(i)))
        .collect::<Vec<_>>()
        .join(",");
    let r = burst(&urls, 24).await;
    assert_eq!(r["ok"], 7, "{r}");
    assert_eq!(r["refused"], 17, "{r}");
    let refusal = &r["refusals"][0];
    assert_eq!(refusal["code"], -32029, "{r}");
    assert_eq!(refusal["data"]["limit"], "tool_calls_per_min", "{r}");
    let retry = refusal["data"]["retry_after_ms"].as_u64().unwrap();
    assert!(retry > 0 && retry <= 60_000, "{r}");
    assert_eq!(
        t1.stats().await["executed"],
        7,
        "the upstream ran exactly the limit"
    );

    // An operator lowers the limit in Redis: every replica applies it at once.
    let redis = h.redis.as_ref().unwrap();
    redis
        .cli(&["HSET", "tg:consumer:{agent}", "tool_calls_per_min", "100"])
        .unwrap();
    let again = burst(&urls, 3).await;
    assert_eq!(again["ok"], 3, "the raised limit applies: {again}");
}

/// Tool calls reach the showback report: `tollgate usage --by server|tool` in JSON and CSV,
/// with calls and errors per consumer and team.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_usage_in_the_report() {
    let (t1, t2) = upstreams();
    let h = start(
        Harness::new()
            .redis()
            .config(&servers(&t1, &t2, ""))
            .consumer("agent", "team = \"ops\"\nmcp_tools = [\"t1.*\", \"t2.*\"]"),
    )
    .await;
    let (key, base) = (key_for("agent"), h.url(0));
    for _ in 0..2 {
        call(&format!("{base}/mcp"), &key, "t1__echo", r#"{"text":"a"}"#).await;
    }
    // A tool error (missing arguments) counts as a call with an error.
    run("call", &format!("{base}/mcp"), &key, &["--tool", "t2__add"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let by_server = loop {
        let v = h.usage("server").expect("usage --by server");
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        let calls: u64 = rows.iter().map(|r| r["calls"].as_u64().unwrap_or(0)).sum();
        if calls >= 3 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rows = by_server["rows"].as_array().unwrap();
    let t1_row = rows.iter().find(|r| r["server"] == "t1").expect("t1 row");
    assert_eq!(t1_row["calls"], 2, "{by_server}");
    assert_eq!(t1_row["errors"], 0, "{by_server}");
    assert_eq!(t1_row["consumer"], "agent");
    assert_eq!(t1_row["team"], "ops");
    let t2_row = rows.iter().find(|r| r["server"] == "t2").expect("t2 row");
    assert_eq!(
        (t2_row["calls"].as_u64(), t2_row["errors"].as_u64()),
        (Some(1), Some(1))
    );
    let by_tool = h.usage("tool").expect("usage --by tool");
    let echo = by_tool["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tool"] == "echo")
        .expect("echo row");
    assert_eq!(echo["server"], "t1");
    assert_eq!(echo["calls"], 2, "{by_tool}");
    let csv = h.usage_every_day("tool", &["--format", "csv"]).unwrap();
    assert!(csv.lines().next().unwrap().contains("calls"), "{csv}");
    assert!(
        csv.lines().any(|l| l.starts_with("echo,t1,agent,ops,2,0")),
        "{csv}"
    );
}

/// An upstream that is down, slower than its `timeout_ms`, or answers something that is not
/// MCP gives a JSON-RPC error naming the server within the timeout: never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_or_slow_is_a_jsonrpc_error_in_time() {
    let (t1, mut t2) = upstreams();
    // An upstream that answers HTML: not MCP.
    let junk = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let junk_addr = junk.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async {
            (
                [(http::header::CONTENT_TYPE, "text/html")],
                "<html>oops</html>",
            )
        });
        axum::serve(junk, app).await
    });
    let h = start(
        Harness::new()
            .config(&servers(&t1, &t2, "timeout_ms = 1500"))
            .config(&format!(
                "[[mcp_servers]]\nname = \"junk\"\nurl = \"http://{junk_addr}/mcp\"\n"
            ))
            .consumer("agent", "mcp_tools = [\"t1.*\", \"t2.*\", \"junk.*\"]"),
    )
    .await;
    let (key, base) = (key_for("agent"), h.url(0));
    let garbage = run("call", &format!("{base}/mcp/junk"), &key, &["--tool", "x"]).await;
    assert_eq!(garbage["error"]["code"], -32000, "{garbage}");
    let message = garbage["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("junk") && message.contains("unreadable"),
        "{garbage}"
    );
    // On /mcp the junk server is left out; the others work.
    let listed = run("tools", &format!("{base}/mcp"), &key, &[]).await;
    assert!(
        tools(&listed).iter().all(|t| !t.starts_with("junk__")),
        "{listed}"
    );
    assert!(tools(&listed).contains(&"t1__echo".to_string()), "{listed}");
    let started = Instant::now();
    let slow = call(&format!("{base}/mcp/t1"), &key, "slow", r#"{"ms":20000}"#).await;
    assert_eq!(slow["error"]["code"], -32000, "{slow}");
    assert!(
        slow["error"]["message"].as_str().unwrap().contains("t1"),
        "{slow}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered in time: {:?}",
        started.elapsed()
    );

    // t2 goes down after a session started: its call fails in-band, t1 still works.
    let url = format!("{base}/mcp");
    t2.stop();
    let down = call(&url, &key, "t2__echo", r#"{"text":"x"}"#).await;
    assert!(
        down["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("t2"))
            || down["error"]["code"] == -32602,
        "{down}"
    );
    let still = call(&url, &key, "t1__echo", r#"{"text":"x"}"#).await;
    assert_eq!(still["result"]["text"], "t1:x", "{still}");
    let one = call(&format!("{base}/mcp/t2"), &key, "echo", r#"{"text":"x"}"#).await;
    assert!(
        one.get("error").is_some() || one["result"]["is_error"] == true,
        "{one}"
    );
}

/// JWT mode: the protected-resource metadata names the issuer, a request without a token gets
/// 401 with the `resource_metadata` challenge, and a token for `mcp_audience` (its tools from
/// `tools_claim`) lists and calls tools; the same token is refused on the model routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_discovery_challenge_and_success() {
    let (t1, t2) = upstreams();
    let jwks = Jwks::start(300).await;
    let h = start(
        Harness::new()
            .config(&jwks.auth_toml(
                "jwt",
                "tools_claim = \"mcp_tools\"\nmcp_audience = \"https://tools.example/mcp\"",
            ))
            .config(&servers(&t1, &t2, "")),
    )
    .await;
    let base = h.url(0);
    let http = tollgate_tests::client();
    let meta: Value = http
        .get(format!("{base}/.well-known/oauth-protected-resource/mcp"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["authorization_servers"], json!([jwt_support::ISSUER]));
    assert!(
        meta["resource"].as_str().unwrap().ends_with("/mcp"),
        "{meta}"
    );
    let resp = http
        .post(format!("{base}/mcp"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with("Bearer resource_metadata=\"")
            && challenge.contains("/.well-known/oauth-protected-resource/mcp"),
        "{challenge}"
    );
    let mut c = claims();
    c["aud"] = json!("https://tools.example/mcp");
    c["mcp_tools"] = json!(["t1.echo"]);
    let token = sign(&KEYS.rsa, Algorithm::RS256, &c);
    let listed = client(&["tools", "--url", &format!("{base}/mcp"), "--bearer", &token]).await;
    assert_eq!(tools(&listed), ["t1__echo"]);
    let r = client(&[
        "call",
        "--url",
        &format!("{base}/mcp"),
        "--bearer",
        &token,
        "--tool",
        "t1__echo",
        "--args",
        r#"{"text":"jwt"}"#,
    ])
    .await;
    assert_eq!(r["result"]["text"], "t1:jwt", "{r}");
    let models = http
        .get(format!("{base}/v1/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        models.status(),
        401,
        "an MCP-audience token is not a model-route token"
    );
}

/// Bad input gets the right JSON-RPC or HTTP error with a body: malformed JSON, a non-message,
/// an oversized message, a foreign Origin, an unknown method on `/mcp`, a missing session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_errors_with_bodies() {
    let (t1, t2) = upstreams();
    let h = start(
        Harness::new()
            .config("[mcp]\nmax_message_bytes = 10000\n")
            .config(&servers(&t1, &t2, ""))
            .consumer("agent", "mcp_tools = [\"t1.*\"]"),
    )
    .await;
    let (key, url) = (key_for("agent"), format!("{}/mcp", h.url(0)));
    let http = tollgate_tests::client();
    let post = |body: Vec<u8>, origin: Option<&'static str>| {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move {
            let mut req = http
                .post(url)
                .header("api-key", key)
                .header("content-type", "application/json")
                .body(body);
            if let Some(o) = origin {
                req = req.header("origin", o);
            }
            let (status, sid, resp) = send(req).await;
            (
                status,
                resp.json::<Value>().await.unwrap_or(Value::Null),
                sid,
            )
        }
    };
    let (s, b, _) = post(b"{not json".to_vec(), None).await;
    assert_eq!((s, b["error"]["code"].as_i64()), (400, Some(-32700)), "{b}");
    let (s, b, _) = post(b"[1,2]".to_vec(), None).await;
    assert_eq!((s, b["error"]["code"].as_i64()), (400, Some(-32600)), "{b}");
    let big =
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "a".repeat(20_000)}});
    let (s, b, _) = post(big.to_string().into_bytes(), None).await;
    assert_eq!(s, 413, "{b}");
    assert!(b["error"]["message"].is_string(), "{b}");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
    // Odd shapes of a valid message never break the gateway.
    let odd = json!({"jsonrpc": "2.0", "id": 9, "method": "initialize", "params": 5});
    let (s, b, _) = post(odd.to_string().into_bytes(), None).await;
    assert_eq!(s, 200, "{b}");
    let (s, _, _) = post(init.to_string().into_bytes(), Some("https://evil.example")).await;
    assert_eq!(s, 403);
    let (s, b, sid) = post(init.to_string().into_bytes(), Some("http://localhost:3000")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["result"]["serverInfo"]["name"], "tollgate");
    assert!(sid.is_some());
    let (s, b, _) = post(
        br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.to_vec(),
        None,
    )
    .await;
    assert_eq!(s, 400, "no session: {b}");
    let resp = http
        .post(&url)
        .header("api-key", &key)
        .header("mcp-session-id", sid.unwrap())
        .json(&json!({"jsonrpc": "2.0", "id": 3, "method": "no/such/method"}))
        .send()
        .await
        .unwrap();
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["error"]["code"], -32601, "{b}");
    let unauth = http.post(&url).json(&init).send().await.unwrap();
    assert_eq!(unauth.status(), 401);
}

/// Each tool call is a span `execute_tool <tool>` continuing the client's trace with the GenAI
/// and tollgate attributes; `/metrics` counts calls by server, tool and outcome (a refusal
/// included) with a duration histogram; the OTLP metrics arrive at the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_in_spans_and_metrics() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let (t1, t2) = upstreams();
    let rx = tollgate_tests::otlp::OtlpReceiver::start().await.unwrap();
    let mut h = Harness::new()
        .config(&servers(&t1, &t2, ""))
        .config(&format!("[telemetry]\notlp_endpoint = \"{}\"\n", rx.url()))
        .consumer(
            "agent",
            "team = \"ops\"\nmcp_tools = [\"t1.*\"]\ntool_calls_per_min = 1",
        )
        .env("T1_TOKEN", "t")
        .env("T2_KEY", "k")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .start()
        .await
        .expect("gateway");
    let (key, base) = (key_for("agent"), h.url(0));
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let args = r#"{"text":"traced"}"#;
    let url = format!("{base}/mcp");
    let ok = run(
        "call",
        &url,
        &key,
        &["--tool", "t1__echo", "--args", args, "--traceparent", &tp],
    )
    .await;
    assert_eq!(ok["result"]["text"], "t1:traced", "{ok}");
    let refused = call(&url, &key, "t1__echo", args).await;
    assert_eq!(refused["error"]["code"], -32029, "{refused}");

    let text = tollgate_tests::metrics(&base).await;
    let count = |outcome| {
        tollgate_tests::metric_sum(
            &text,
            "tollgate_mcp_tool_calls_total",
            &[("server", "t1"), ("tool", "echo"), ("outcome", outcome)],
        )
    };
    assert_eq!((count("ok"), count("refused")), (1, 1), "{text}");
    assert_eq!(
        tollgate_tests::metric_sum(
            &text,
            "tollgate_mcp_tool_call_duration_seconds_count",
            &[("server", "t1")]
        ),
        1,
        "{text}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let span = loop {
        if let Some(s) = rx
            .spans()
            .into_iter()
            .find(|s| s.name == "execute_tool echo")
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no tool span: {:?}", rx.spans());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(span.trace_id, TRACE, "continues the client's trace");
    assert_eq!(span.parent_span_id, PARENT);
    let attr = |k: &str| span.attributes.get(k).cloned().unwrap_or(Value::Null);
    assert_eq!(attr("gen_ai.operation.name"), "execute_tool");
    assert_eq!(attr("gen_ai.tool.name"), "echo");
    assert_eq!(attr("mcp.server"), "t1");
    assert_eq!(attr("tollgate.consumer"), "agent");
    assert_eq!(attr("tollgate.team"), "ops");
    assert_eq!(attr("tollgate.outcome"), "ok");

    // OTLP metrics leave at the latest with the shutdown flush.
    h.gateways[0].terminate().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rx
        .metric_names()
        .iter()
        .any(|m| m == "tollgate.mcp.tool_calls")
    {
        assert!(
            Instant::now() < deadline,
            "no tool-call metric: {:?}",
            rx.metric_names()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that restarts (losing its sessions) under a live client session: the gateway
/// initializes a new upstream session and sends the request again; the client notices nothing.
/// DELETE then ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_renews_its_session() {
    let (mut t1, t2) = upstreams();
    let h = gateway(&t1, &t2).await;
    let (key, url) = (key_for("agent"), format!("{}/mcp/t1", h.url(0)));
    let http = tollgate_tests::client();
    let post = |sid: Option<String>, body: Value| {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move {
            let mut req = http
                .post(url)
                .header("api-key", key)
                .header("accept", "application/json, text/event-stream")
                .json(&body);
            if let Some(s) = sid {
                req = req.header("mcp-session-id", s);
            }
            let (status, sid, resp) = send(req).await;
            (status, resp.text().await.unwrap(), sid)
        }
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
    let (status, _, sid) = post(None, init).await;
    assert_eq!(status, 200);
    let sid = sid.expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(Some(sid.clone()), initialized).await.0, 202);
    let echo = |id: u64, text: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}}})
    };
    let (status, body, _) = post(Some(sid.clone()), echo(2, "before")).await;
    assert_eq!(status, 200);
    assert!(body.contains("t1:before"), "{body}");

    let port = t1.port;
    t1.stop();
    t1 = McpUpstream::start_on("t1", port).expect("t1 again");
    let (status, body, _) = post(Some(sid.clone()), echo(3, "after")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("t1:after"), "renewed transparently: {body}");
    let (_, body, _) = post(Some(sid.clone()), echo(4, "again")).await;
    assert!(body.contains("t1:again"), "{body}");
    assert_eq!(t1.stats().await["executed"], 2, "each call ran once");

    // DELETE ends it: this replica answers 404 for the id afterwards.
    let deleted = http
        .delete(&url)
        .header("api-key", &key)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(post(Some(sid), echo(5, "gone")).await.0, 404);
    assert_eq!(t1.stats().await["executed"], 2);
}

/// A notification an upstream sends outside any request (on its own GET stream) reaches the
/// client: relayed on `/mcp/{server}`, merged from every member on `/mcp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_notifications_reach_the_client() {
    let (_t1, _t2, _h, key, base) = started("agent").await;
    for (url, tool) in [
        (format!("{base}/mcp/t1"), "announce"),
        (format!("{base}/mcp"), "t1__announce"),
    ] {
        let r = run(
            "listen",
            &url,
            &key,
            &[
                "--tool",
                tool,
                "--args",
                r#"{"text":"maintenance at noon"}"#,
            ],
        )
        .await;
        assert_eq!(r["result"]["text"], "announced", "{url}: {r}");
        // Each call announces once; the first may go out before the client's stream is open.
        let logs = r["logs"].as_array().expect("logs");
        let calls = r["calls"].as_u64().expect("calls") as usize;
        assert!(!logs.is_empty() && logs.len() <= calls, "{url}: {r}");
        for l in logs {
            assert_eq!(
                l,
                &json!({"level": "warning", "data": "maintenance at noon", "logger": "t1"}),
                "{url}: {r}"
            );
        }
    }
}

/// Resources and prompts pass through `/mcp/{server}`; `/mcp` federates tools only and lists
/// none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_and_prompts_pass_through_per_server() {
    let (_t1, _t2, _h, key, base) = started("agent").await;
    let one = run("resources", &format!("{base}/mcp/t2"), &key, &[]).await;
    assert_eq!(one["resources"], json!(["memo://notes"]), "{one}");
    assert_eq!(one["read"], json!(["t2 notes"]), "{one}");
    assert_eq!(one["prompts"], json!(["greet"]), "{one}");
    assert_eq!(one["prompt"], json!(["t2 greets ada"]), "{one}");
    let all = run("resources", &format!("{base}/mcp"), &key, &[]).await;
    assert_eq!(all["resources"], json!([]), "{all}");
    assert_eq!(all["prompts"], json!([]), "{all}");
}

use super::*;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
[[consumers]]
id = "team-a"
key_sha256 = ["ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]
[[backends]]
name = "ptu-1"
url = "http://127.0.0.1:9001"
models = ["gpt-4o"]
deployments = { "gpt-4o" = "gpt4o-ptu" }
auth = { type = "api_key", key_env = "PTU_KEY" }
breaker = { failures = 3, window_ms = 10000, trip_ms = 30000, statuses = [429, 500], accept_retry_after = true }
"#;

/// A full config parses with its defaults filled in.
#[test]
fn parses_a_good_config() {
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.backends[0].priority, 1);
    assert_eq!(c.backends[0].deployments["gpt-4o"], "gpt4o-ptu");
    assert!(matches!(c.backends[0].auth, BackendAuth::ApiKey { .. }));
    assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
}

/// A typo is an error that names the key's path.
#[test]
fn unknown_key_is_named() {
    let bad = GOOD.replace("failures = 3", "failures = 3, falures = 2");
    let e = Config::from_toml(&bad).unwrap_err();
    assert_eq!(e.path, "backends[0].breaker.falures");
    assert!(e.message.contains("falures"), "{e}");
    let e = Config::from_toml("[server]\nlisten_addr = \"x\"").unwrap_err();
    assert!(e.message.contains("listen_addr"), "{e}");
}

/// Bad values name their key.
#[test]
fn bad_values_are_named() {
    let e = Config::from_toml(&GOOD.replace("\"127.0.0.1:0\"", "\"nope\"")).unwrap_err();
    assert_eq!(e.path, "server.listen");
    let e = Config::from_toml(&GOOD.replace("[429, 500]", "[429, 900]")).unwrap_err();
    assert_eq!(e.path, "backends[0].breaker.statuses");
    let e = Config::from_toml(&GOOD.replace("\"api_key\"", "\"magic\"")).unwrap_err();
    assert!(e.path.starts_with("backends[0].auth"), "{e}");
    let e = Config::from_toml(&GOOD.replace("ba7816", "zz7816")).unwrap_err();
    assert_eq!(e.path, "consumers[0].key_sha256[0]");
    let e = Config::from_toml(&GOOD.replace("weight = 1", "")).map(|_| ());
    assert!(e.is_ok());
    let e = Config::from_toml(&format!("{GOOD}weight = 0\n")).unwrap_err();
    assert_eq!(e.path, "backends[0].weight");
}

/// A backend URL is a base for paths: no credentials, query or fragment in it.
#[test]
fn backend_url_is_a_plain_base() {
    for bad in [
        "http://user:pw@127.0.0.1:9001",
        "http://key@127.0.0.1:9001/",
        "http://127.0.0.1:9001/#frag",
        "http://127.0.0.1:9001/x?a=1",
        "http:///nohost/path",
    ] {
        let e = Config::from_toml(&GOOD.replace("http://127.0.0.1:9001", bad)).unwrap_err();
        assert_eq!(e.path, "backends[0].url", "{bad}: {e}");
        assert!(!e.message.contains("pw"), "{e}");
    }
    let ok = GOOD.replace("http://127.0.0.1:9001", "https://a.example.com/base/v1/");
    assert!(Config::from_toml(&ok).is_ok());
}

/// A consumer's models must be served by some backend: a typo denies nothing silently.
#[test]
fn consumer_models_must_be_served() {
    let bad = GOOD.replace(
        "id = \"team-a\"",
        "id = \"team-a\"\nmodels = [\"gpt-4o\", \"gpt4o\"]",
    );
    let e = Config::from_toml(&bad).unwrap_err();
    assert_eq!(e.path, "consumers[0].models[1]");
}

/// The hardening limits have their documented defaults and refuse 0 or unbounded values.
#[test]
fn hardening_defaults_and_bounds() {
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.server.header_timeout_ms, 10_000);
    assert_eq!(c.server.body_timeout_ms, 30_000);
    assert_eq!(c.server.idle_timeout_ms, 60_000);
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server.max_sse_event_bytes, 1024 * 1024);
    assert_eq!(c.server.max_response_bytes, 256 * 1024 * 1024);
    assert_eq!(c.backends[0].breaker.max_retry_after_ms, 300_000);
    assert_eq!(c.backends[0].timeouts.max_response_ms, 600_000);
    let e = Config::from_toml(&GOOD.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nheader_timeout_ms = 0",
    ))
    .unwrap_err();
    assert_eq!(e.path, "server.header_timeout_ms");
    let e = Config::from_toml(&GOOD.replace(
        "accept_retry_after = true",
        "accept_retry_after = true, max_retry_after_ms = 999999999999",
    ))
    .unwrap_err();
    assert_eq!(e.path, "backends[0].breaker.max_retry_after_ms");
}

/// `[[cache]]` takes the issue's names with their defaults (exact mode, vary by team, 0.05),
/// and refuses a bad `vary_by`, a semantic cache without an embeddings backend that serves its
/// model, a threshold outside 0..2 and a duplicate name, naming the key.
#[test]
fn cache_names_defaults_and_checks() {
    let full = format!(
        "{GOOD}\n[[cache]]\nname = \"faq\"\nmodels = [\"gpt-4o\"]\nconsumers = [\"app-1\"]\n\
         mode = \"semantic\"\nscore_threshold = 0.1\nttl_s = 3600\n\
         vary_by = [\"team\", \"header:X-Tenant\"]\nignore_system_messages = true\n\
         max_message_count = 10\nembeddings_backend = \"{b}\"\n\
         embeddings_model = \"{m}\"\nmax_entries = 10000\nmax_total_entries = 50000\n\
         lookup_timeout_ms = 50\ncache_tools = false\nmax_temperature = 0.7\n\
         store_url = \"redis://127.0.0.1:6380\"\n",
        b = first_backend_name(),
        m = first_backend_model(),
    );
    let c = Config::from_toml(&full).unwrap();
    assert_eq!(c.cache[0].mode, CacheMode::Semantic);
    assert_eq!(
        c.cache[0].vary(),
        vec![VaryBy::Team, VaryBy::Header("x-tenant".into())]
    );
    let d = Config::from_toml(&format!("{GOOD}\n[[cache]]\nname = \"d\"\n")).unwrap();
    let d = &d.cache[0];
    assert_eq!(
        (d.mode, d.score_threshold, d.vary_by.clone(), d.ttl_s),
        (CacheMode::Exact, 0.05, vec!["team".to_string()], 3600)
    );
    assert_eq!(
        (d.max_temperature, d.lookup_timeout_ms, d.cache_tools),
        (0.7, 50, false)
    );
    for (bad, path) in [
        ("vary_by = [\"teams\"]", "cache[0].vary_by[0]"),
        ("mode = \"semantic\"", "cache[0].embeddings_backend"),
        ("score_threshold = 3.0", "cache[0].score_threshold"),
        ("ttl_s = 0", "cache[0].ttl_s"),
        (
            "embeddings_backend = \"nope\"",
            "cache[0].embeddings_backend",
        ),
        ("store_url = \"http://x\"", "cache[0].store_url"),
        ("mdoe = \"exact\"", "cache[0]"),
    ] {
        let e =
            Config::from_toml(&format!("{GOOD}\n[[cache]]\nname = \"d\"\n{bad}\n")).unwrap_err();
        assert!(e.path.starts_with(path), "{bad}: {e}");
    }
    let e = Config::from_toml(&format!(
        "{GOOD}\n[[cache]]\nname = \"d\"\n[[cache]]\nname = \"d\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.path, "cache[1].name");
}

fn first_backend_name() -> String {
    Config::from_toml(GOOD).unwrap().backends[0].name.clone()
}

fn first_backend_model() -> String {
    Config::from_toml(GOOD).unwrap().backends[0].models[0].clone()
}

/// Budgets and alerts: the issue's names parse; bad amounts, hourly budgets, alerts without a
/// URL or with bad thresholds name their key, and a URL never shows in an error.
#[test]
fn budgets_and_alerts() {
    let money = format!(
        "{}[pricing]\ncurrency = \"EUR\"\n\
         [[teams]]\nid = \"finance\"\nbudget = 500.0\nbudget_period = \"month\"\nbudget_action = \"alert\"\n\
         [[alerts]]\nurl_env = \"HOOK\"\nteams = [\"finance\"]\nthresholds = [0.5, 0.8, 1.0]\n",
        GOOD.replace(
            "id = \"team-a\"",
            "id = \"team-a\"\nbudget = 50.0\nbudget_period = \"day\"\nbudget_action = \"block\""
        )
    );
    let c = Config::from_toml(&money).unwrap();
    assert_eq!(c.pricing.currency, "EUR");
    assert_eq!(c.teams[0].budget, Some(500.0));
    assert_eq!(c.teams[0].budget_action, crate::BudgetAction::Alert);
    assert_eq!(c.consumers[0].budget, Some(50.0));
    assert_eq!(c.consumers[0].budget_period, crate::Period::Day);
    assert_eq!(c.alerts[0].retries, 3);
    assert_eq!(c.alerts[0].events.len(), 4);
    for (from, to, path) in [
        ("budget = 500.0", "budget = -1.0", "teams[0].budget"),
        ("budget = 50.0", "budget = inf", "consumers[0].budget"),
        (
            "budget_period = \"month\"",
            "budget_period = \"hour\"",
            "teams[0].budget_period",
        ),
        (
            "url_env = \"HOOK\"",
            "url = \"ftp://secret-token@x\"",
            "alerts[0].url",
        ),
        (
            "url_env = \"HOOK\"",
            "url = \"http://x/\"\nurl_env = \"HOOK\"",
            "alerts[0].url",
        ),
        (
            "thresholds = [0.5, 0.8, 1.0]",
            "thresholds = [0.0]",
            "alerts[0].thresholds",
        ),
        ("currency = \"EUR\"", "currency = \"€\"", "pricing.currency"),
    ] {
        let e = Config::from_toml(&money.replacen(from, to, 1)).unwrap_err();
        assert_eq!(e.path, path, "{e}");
        assert!(!e.message.contains("secret-token"), "{e}");
    }
}

/// The distributed store kinds parse with their keys; a bad seed URL, a sentinel group
/// without a master name and an ACL user without a password name their key.
#[test]
fn store_kinds() {
    let cluster = "[store]\nkind = \"redis_cluster\"\nurls = [\"redis://a:7000\", \"rediss://b:7000\"]\n\
                   username = \"tg\"\npassword_env = \"PW\"\nca_file = \"/etc/ca.pem\"\n";
    let c = Config::from_toml(&format!("{cluster}{GOOD}")).unwrap();
    assert_eq!(c.store.kind, StoreKind::RedisCluster);
    assert!(c.store.kind.is_redis());
    assert_eq!(c.store.urls.len(), 2);
    assert_eq!(c.store.username.as_deref(), Some("tg"));
    let sentinel = "[store]\nkind = \"redis_sentinel\"\nsentinels = [\"redis://s:26379\"]\n\
                    master_name = \"main\"\nsentinel_password_env = \"SPW\"\n";
    let c = Config::from_toml(&format!("{sentinel}{GOOD}")).unwrap();
    assert_eq!(c.store.kind.as_str(), "redis_sentinel");
    assert_eq!(c.store.master_name, "main");
    let bad_url = cluster.replace("rediss://b:7000", "http://b:7000");
    let e = Config::from_toml(&format!("{bad_url}{GOOD}")).unwrap_err();
    assert_eq!(e.path, "store.urls[1]");
    let no_name = sentinel.replace("master_name = \"main\"", "master_name = \"\"");
    let e = Config::from_toml(&format!("{no_name}{GOOD}")).unwrap_err();
    assert_eq!(e.path, "store.master_name");
    let no_pw = cluster.replace("password_env = \"PW\"\n", "");
    let e = Config::from_toml(&format!("{no_pw}{GOOD}")).unwrap_err();
    assert_eq!(e.path, "store.username");
}

/// A cache on a cluster or sentinel store must name its own server (`store_url`).
#[test]
fn cache_on_a_cluster_needs_its_own_server() {
    let cache = format!(
        "[store]\nkind = \"redis_cluster\"\nurls = [\"redis://a:7000\"]\n{GOOD}\n\
         [[cache]]\nname = \"c\"\n"
    );
    let e = Config::from_toml(&cache).unwrap_err();
    assert_eq!(e.path, "cache[0].store_url", "{e}");
    let ok = cache.replace(
        "name = \"c\"\n",
        "name = \"c\"\nstore_url = \"redis://cache:6379\"\n",
    );
    Config::from_toml(&ok).unwrap();
}

/// `[[mcp_servers]]` and the consumers' MCP fields: defaults, and bad values named by key.
#[test]
fn mcp_servers_are_checked() {
    let mcp = "[[mcp_servers]]\nname = \"tickets\"\nurl = \"http://127.0.0.1:9100/mcp\"\n\
               auth = { type = \"bearer\", token_env = \"T\" }\n";
    let c = Config::from_toml(&format!("{GOOD}{mcp}")).unwrap();
    assert_eq!(c.mcp_servers[0].tools, ["*"]);
    assert_eq!(c.mcp_servers[0].timeout_ms, 30_000);
    assert_eq!(c.mcp.max_message_bytes, 4 * 1024 * 1024);
    let with_tools = GOOD.replace(
        "id = \"team-a\"\n",
        "id = \"team-a\"\nmcp_tools = [\"tickets.*\", \"wiki.search\"]\ntool_calls_per_min = 5\n",
    );
    let c = Config::from_toml(&format!("{with_tools}{mcp}")).unwrap();
    assert_eq!(c.consumers[0].tool_calls_per_min, Some(5));
    let bad_pattern = with_tools.replace("\"wiki.search\"", "\"wiki\"");
    let e = Config::from_toml(&format!("{bad_pattern}{mcp}")).unwrap_err();
    assert_eq!(e.path, "consumers[0].mcp_tools[1]", "{e}");
    let e = Config::from_toml(&format!("{GOOD}{mcp}{mcp}")).unwrap_err();
    assert_eq!(e.path, "mcp_servers[1].name", "{e}");
    assert!(e.message.contains("duplicate"), "{e}");
    for (bad, key) in [
        ("name = \"a__b\"", "mcp_servers[0].name"),
        ("name = \"a.b\"", "mcp_servers[0].name"),
        ("url = \"ftp://x/mcp\"", "mcp_servers[0].url"),
        ("url = \"not a url\"", "mcp_servers[0].url"),
        ("url = \"http://u:p@x/mcp\"", "mcp_servers[0].url"),
    ] {
        let field = bad.split(' ').next().unwrap();
        let line = mcp.lines().find(|l| l.starts_with(field)).unwrap();
        let e = Config::from_toml(&format!("{GOOD}{}", mcp.replace(line, bad))).unwrap_err();
        assert_eq!(e.path, key, "{bad}: {e}");
    }
    let e = Config::from_toml(&format!("{GOOD}{mcp}timeout_ms = 0\n")).unwrap_err();
    assert_eq!(e.path, "mcp_servers[0].timeout_ms");
    let e = Config::from_toml(&format!("{GOOD}{mcp}tools_x = []\n")).unwrap_err();
    assert!(e.path.starts_with("mcp_servers"), "{e}");
}

//! `tollgate demo`: a working gateway on embedded defaults: bundled mock PTU and PAYG backends,
//! the memory store, and a demo key, with a curl line that works.

use super::{new_key, serve};
use anyhow::Context as _;
use tollgate_common::config::Config;
use tollgate_common::key_hash;

/// `tollgate demo`: bundled mock PTU and PAYG backends, a memory store and a demo key.
pub async fn demo(listen: String) -> anyhow::Result<()> {
    use tollgate_loadtest::mock::{MockOpts, serve as mock_serve};
    let mut urls = Vec::new();
    for (name, tpm) in [("demo-ptu", Some(20_000)), ("demo-payg", None)] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", l.local_addr()?));
        let opts = MockOpts {
            name: name.into(),
            tpm,
            ttft_ms: 50,
            tokens_per_sec: Some(200.0),
            ..Default::default()
        };
        tokio::spawn(async move {
            if let Err(e) = mock_serve(l, opts, std::future::pending()).await {
                tracing::error!(error = %e, "demo mock backend failed");
            }
        });
    }
    let key = new_key();
    let toml = format!(
        r#"
[server]
listen = "{listen}"
debug_headers = true
[[consumers]]
id = "demo"
team = "demo-team"
tpm = 100000
key_sha256 = ["{hash}"]
[[backends]]
name = "ptu-eastus"
url = "{ptu}"
api = "azure"
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
deployments = {{ "gpt-4o" = "gpt4o-ptu-eastus" }}
priority = 1
breaker = {{ failures = 3, window_ms = 10000, trip_ms = 10000, statuses = [429, 500, 502, 503, 504], accept_retry_after = true }}
[[backends]]
name = "payg-openai"
url = "{payg}"
api = "openai"
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
priority = 2
price = {{ input_per_1m = 2.5, output_per_1m = 10.0 }}
"#,
        hash = key_hash(&key),
        ptu = urls[0],
        payg = urls[1],
    );
    let config = Config::from_toml(&toml).context("demo config")?;
    let banner = format!(
        "demo key: {key}\n\
         backends: ptu-eastus (mock PTU, 20k TPM, priority 1) at {ptu}; payg-openai (mock PAYG, priority 2) at {payg}\n\
         try:\n  curl -s http://{{addr}}/v1/chat/completions -H 'Authorization: Bearer {key}' \
         -H 'Content-Type: application/json' \
         -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":20}}'",
        ptu = urls[0],
        payg = urls[1],
    );
    serve(config, Some(banner)).await
}

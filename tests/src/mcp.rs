//! MCP pieces for the gateway's MCP tests: upstream MCP servers (the official Python SDK's
//! MCPServer over streamable HTTP, `tests/python/mcp_upstream.py`) started on free ports, and
//! the SDK's client driven through `tests/python/mcp_client.py`.

use crate::pyenv;
use anyhow::{Context as _, bail};
use serde_json::Value;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One upstream MCP server process (killed on drop).
pub struct McpUpstream {
    pub name: String,
    pub port: u16,
    child: Child,
}

impl McpUpstream {
    /// Starts `mcp_upstream.py --name NAME` and waits until it accepts connections.
    pub fn start(name: &str) -> anyhow::Result<McpUpstream> {
        Self::start_on(name, crate::server::free_ports(1)?[0])
    }

    /// Starts it on `port` (a restart: the same address, none of the old sessions).
    pub fn start_on(name: &str, port: u16) -> anyhow::Result<McpUpstream> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mcp_upstream.py");
        let child = Command::new(pyenv::python()?)
            .arg(script)
            .args(["--name", name, "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mcp_upstream.py")?;
        let mut up = McpUpstream {
            name: name.into(),
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = up.child.try_wait() {
                bail!("mcp_upstream.py {name} exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("mcp_upstream.py {name} did not listen on {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(up)
    }

    /// Its MCP endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// `GET /stats`: `executed` tool calls and the credential headers it was sent.
    pub async fn stats(&self) -> Value {
        crate::client()
            .get(format!("http://127.0.0.1:{}/stats", self.port))
            .send()
            .await
            .expect("GET /stats")
            .json()
            .await
            .expect("stats JSON")
    }

    /// Stops it (its port then refuses connections).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for McpUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `mcp_client.py ARGS...` (the SDK's client) and parses the JSON it prints.
pub async fn client(args: &[&str]) -> Value {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = pyenv::run_script("mcp_client.py", args.clone())
        .await
        .unwrap_or_else(|e| panic!("mcp_client.py {args:?}: {e:#}"));
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("mcp_client.py printed {out:?}: {e}"))
}

/// `mcp_client.py COMMAND --url URL --key KEY EXTRA...`: one client command against `url` as
/// the consumer whose key is `key`.
pub async fn run(command: &str, url: &str, key: &str, extra: &[&str]) -> Value {
    let mut args = vec![command, "--url", url, "--key", key];
    args.extend_from_slice(extra);
    client(&args).await
}

/// `call`: `tool` with the JSON arguments `args`, through `url` as the consumer whose key is `key`.
pub async fn call(url: &str, key: &str, tool: &str, args: &str) -> Value {
    run("call", url, key, &["--tool", tool, "--args", args]).await
}
